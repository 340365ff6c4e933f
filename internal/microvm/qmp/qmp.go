// Package qmp is a minimal client of QEMU's machine protocol (QMP) over a
// unix socket: one command at a time, asynchronous events skipped.
package qmp

import (
	"bufio"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"sync"
	"time"
)

// Client is one QMP connection.
type Client struct {
	mu   sync.Mutex
	conn net.Conn
	rd   *bufio.Reader
}

// Error is an error answer of QEMU.
type Error struct {
	Command string
	Class   string
	Desc    string
}

func (e *Error) Error() string { return fmt.Sprintf("qmp %s: %s: %s", e.Command, e.Class, e.Desc) }

// Dial connects to the socket (retrying until it exists or ctx ends) and
// negotiates capabilities.
func Dial(ctx context.Context, path string) (*Client, error) {
	var d net.Dialer
	for {
		conn, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			c := &Client{conn: conn, rd: bufio.NewReaderSize(conn, 64<<10)}
			if err := c.handshake(ctx); err != nil {
				conn.Close()
				return nil, err
			}
			return c, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("qmp: connect %s: %w (last: %v)", path, ctx.Err(), err)
		case <-time.After(5 * time.Millisecond):
		}
	}
}

func (c *Client) handshake(ctx context.Context) error {
	c.setDeadline(ctx)
	line, err := c.rd.ReadBytes('\n')
	if err != nil {
		return fmt.Errorf("qmp: read greeting: %w", err)
	}
	var g struct {
		QMP json.RawMessage `json:"QMP"`
	}
	if err := json.Unmarshal(line, &g); err != nil || g.QMP == nil {
		return fmt.Errorf("qmp: unexpected greeting %.200q", line)
	}
	_, err = c.execute(ctx, "qmp_capabilities", nil)
	return err
}

func (c *Client) setDeadline(ctx context.Context) {
	if dl, ok := ctx.Deadline(); ok {
		_ = c.conn.SetDeadline(dl)
	} else {
		_ = c.conn.SetDeadline(time.Time{})
	}
}

// Execute runs cmd with args (nil for none) and returns its "return" value.
func (c *Client) Execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.setDeadline(ctx)
	return c.execute(ctx, cmd, args)
}

func (c *Client) execute(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("qmp %s: %w", cmd, err)
	}
	if _, err := c.conn.Write(append(b, '\n')); err != nil {
		return nil, fmt.Errorf("qmp %s: send: %w", cmd, err)
	}
	for {
		line, err := c.rd.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("qmp %s: read: %w", cmd, err)
		}
		var resp struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Class string `json:"class"`
				Desc  string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(line, &resp); err != nil {
			return nil, fmt.Errorf("qmp %s: bad answer %.200q: %w", cmd, line, err)
		}
		switch {
		case resp.Event != "":
			continue
		case resp.Error != nil:
			return nil, &Error{Command: cmd, Class: resp.Error.Class, Desc: resp.Error.Desc}
		default:
			return resp.Return, nil
		}
	}
}

// Close closes the connection.
func (c *Client) Close() error { return c.conn.Close() }
