package memory

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"strings"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/uffd"
)

// maxHandshake bounds the JSON payload (Firecracker's is a few hundred
// bytes per region).
const maxHandshake = 64 << 10

// Ack lines the manager writes back on the connection once the restore is
// ready (working set installed) or the handshake was rejected. A
// Firecracker peer never reads them; vhive's client waits for them.
const (
	ackOK    = "ok\n"
	ackError = "error: "
)

// handshake is what the manager received from a peer.
type handshake struct {
	regions []Region
	uffd    *uffd.FD
	pid     int // from SO_PEERCRED; 0 if unknown
	pidfd   int // from SO_PEERPIDFD (Linux 6.5+), race-free; -1 if unavailable
}

// recvHandshake reads the single handshake message from conn: the JSON
// region array with exactly one fd (the userfaultfd) attached via
// SCM_RIGHTS. Any fds received are closed on error.
func recvHandshake(conn *net.UnixConn, memSize uint64) (_ *handshake, retErr error) {
	h := &handshake{pidfd: -1}
	defer func() {
		if retErr != nil && h.pidfd >= 0 {
			unix.Close(h.pidfd)
		}
	}()
	raw, err := conn.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	var credErr error
	if err := raw.Control(func(fd uintptr) {
		var cred *unix.Ucred
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if credErr == nil {
			h.pid = int(cred.Pid)
		}
		if pfd, err := unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD); err == nil {
			unix.CloseOnExec(pfd)
			h.pidfd = pfd
		}
	}); err != nil {
		return nil, fmt.Errorf("handshake: %w", err)
	}
	if credErr != nil {
		return nil, fmt.Errorf("handshake: SO_PEERCRED: %w", credErr)
	}

	var fds []int
	defer func() {
		if retErr != nil {
			for _, fd := range fds {
				unix.Close(fd)
			}
		}
	}()
	payload := make([]byte, 0, 4096)
	buf := make([]byte, maxHandshake)
	oob := make([]byte, unix.CmsgSpace(4*8))
	for {
		n, oobn, flags, _, err := conn.ReadMsgUnix(buf, oob)
		n, oobn = max(n, 0), max(oobn, 0) // negative on some errors
		if oobn > 0 {
			got, perr := parseRights(oob[:oobn])
			fds = append(fds, got...)
			if perr != nil {
				return nil, fmt.Errorf("%w: control message: %w", ErrBadHandshake, perr)
			}
		}
		if flags&unix.MSG_CTRUNC != 0 {
			return nil, fmt.Errorf("%w: control message truncated (too many fds)", ErrBadHandshake)
		}
		payload = append(payload, buf[:n]...)
		if len(payload) > maxHandshake {
			return nil, fmt.Errorf("%w: payload larger than %d bytes", ErrBadHandshake, maxHandshake)
		}
		if n > 0 && json.Valid(payload) {
			break
		}
		if n > 0 {
			// The message is sent with one sendmsg: the rest of it, if
			// any, is already there. Do not wait long for more.
			conn.SetReadDeadline(time.Now().Add(time.Second))
		}
		if err != nil || n == 0 {
			if len(payload) == 0 {
				return nil, fmt.Errorf("%w: peer (pid %d) sent nothing: %v", ErrBadHandshake, h.pid, err)
			}
			// The peer stopped sending: validate what we have.
			break
		}
	}
	if len(fds) != 1 {
		return nil, fmt.Errorf("%w: want exactly 1 fd (the userfaultfd) with the message, got %d", ErrBadHandshake, len(fds))
	}
	regions, err := ParseRegions(payload, memSize)
	if err != nil {
		return nil, err
	}
	u, err := uffd.Wrap(fds[0])
	if err != nil {
		return nil, fmt.Errorf("%w: %w", ErrBadHandshake, err)
	}
	h.regions, h.uffd = regions, u
	return h, nil
}

func parseRights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		if m.Header.Level != unix.SOL_SOCKET || m.Header.Type != unix.SCM_RIGHTS {
			continue
		}
		got, err := unix.ParseUnixRights(&m)
		fds = append(fds, got...)
		if err != nil {
			return fds, err
		}
	}
	return fds, nil
}

// SendHandshake sends the Firecracker handshake on conn: the JSON array of
// regions as the payload, uffdFD attached with SCM_RIGHTS, in one message.
func SendHandshake(conn *net.UnixConn, uffdFD int, regions []Region) error {
	if len(regions) == 0 {
		return errors.New("send memory handshake: no regions")
	}
	payload, err := json.Marshal(regions)
	if err != nil {
		return fmt.Errorf("send memory handshake: %w", err)
	}
	n, oobn, err := conn.WriteMsgUnix(payload, unix.UnixRights(uffdFD), nil)
	if err != nil {
		return fmt.Errorf("send memory handshake to %s: %w", conn.RemoteAddr(), err)
	}
	if n != len(payload) || oobn == 0 {
		return fmt.Errorf("send memory handshake to %s: short write (%d of %d bytes)", conn.RemoteAddr(), n, len(payload))
	}
	return nil
}

// WaitReady waits for the manager's answer to a handshake sent on conn: nil
// once guest memory is ready (in prefetch mode: the working set is
// installed) and the sandbox may resume; the manager's reason if it rejected
// the handshake. It reads only the ack line, so the connection stays usable.
func WaitReady(ctx context.Context, conn *net.UnixConn) error {
	if dl, ok := ctx.Deadline(); ok {
		conn.SetReadDeadline(dl)
		defer conn.SetReadDeadline(time.Time{})
	}
	stop := context.AfterFunc(ctx, func() { conn.SetReadDeadline(time.Unix(1, 0)) })
	defer stop()
	var line []byte
	var b [1]byte
	for len(line) < 4096 {
		n, err := conn.Read(b[:])
		if n == 1 {
			line = append(line, b[0])
			if b[0] == '\n' {
				break
			}
			continue
		}
		if ctx.Err() != nil {
			return fmt.Errorf("wait for memory manager: %w", ctx.Err())
		}
		return fmt.Errorf("wait for memory manager: connection closed before ready: %w", err)
	}
	s := string(line)
	if s == ackOK {
		return nil
	}
	return fmt.Errorf("memory manager: %s", strings.TrimSpace(strings.TrimPrefix(s, ackError)))
}

// Client is the sandbox side of one restore: a userfaultfd registered over
// guest memory and the connection to the manager. Keep it open while the
// guest memory is in use.
type Client struct {
	uffd    *uffd.FD
	conn    *net.UnixConn
	gone    chan struct{} // closed when the manager's side of conn ends
	watched chan struct{} // closed when the watching goroutine returns
}

// watch waits for the manager to close its side of the connection: the
// manager closes it when serving ends, and the kernel does when the manager
// process dies. Nothing else is ever sent after the ack.
func (c *Client) watch() {
	defer close(c.watched)
	var b [64]byte
	for {
		if _, err := c.conn.Read(b[:]); err != nil {
			close(c.gone)
			return
		}
	}
}

// ManagerGone is closed once the manager no longer serves this memory — it
// stopped serving or its process died — or after Close. A fault on a page
// not yet installed would then block forever, so a sandbox process should
// stop (exit) when this fires while it still runs the guest.
func (c *Client) ManagerGone() <-chan struct{} { return c.gone }

// Attach makes mem (page-aligned memory from mmap, never the Go heap) a
// lazily served view of the memory file starting at fileOffset: it creates
// a userfaultfd (non-blocking, close-on-exec, UFFD_FEATURE_EVENT_REMOVE),
// registers mem in MISSING mode, connects to the manager's socket, sends the
// handshake and waits until the manager says memory is ready. Until then
// mem must not be touched. The calling process must not serve the faults
// itself, and should touch mem only after Attach returns.
func Attach(ctx context.Context, socketPath string, mem []byte, fileOffset uint64) (_ *Client, retErr error) {
	ps := uint64(os.Getpagesize())
	if len(mem) == 0 {
		return nil, errors.New("attach guest memory: empty mapping")
	}
	addr := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if addr%ps != 0 || uint64(len(mem))%ps != 0 || fileOffset%ps != 0 {
		return nil, fmt.Errorf("attach guest memory [%#x, +%#x) @%#x: not aligned to page size %d", addr, len(mem), fileOffset, ps)
	}
	u, err := uffd.New(uffd.FeatureEventRemove)
	if err != nil {
		return nil, fmt.Errorf("attach guest memory: %w", err)
	}
	defer func() {
		if retErr != nil {
			u.Close()
		}
	}()
	if err := u.Register(uintptr(addr), uintptr(len(mem))); err != nil {
		return nil, fmt.Errorf("attach guest memory: %w", err)
	}
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("attach guest memory: dial memory manager: %w", err)
	}
	conn := c.(*net.UnixConn)
	defer func() {
		if retErr != nil {
			conn.Close()
		}
	}()
	regions := []Region{{BaseHostVirtAddr: addr, Size: uint64(len(mem)), Offset: fileOffset, PageSize: ps, PageSizeKiB: ps}}
	if err := SendHandshake(conn, u.Int(), regions); err != nil {
		return nil, fmt.Errorf("attach guest memory: %w", err)
	}
	if err := WaitReady(ctx, conn); err != nil {
		return nil, fmt.Errorf("attach guest memory via %s: %w", socketPath, err)
	}
	cl := &Client{uffd: u, conn: conn, gone: make(chan struct{}), watched: make(chan struct{})}
	go cl.watch()
	return cl, nil
}

// Close closes the connection and the userfaultfd. Once the manager closes
// its copy too, the range stops being userfault-registered.
func (c *Client) Close() error {
	err := c.conn.Close()
	<-c.watched
	if uerr := c.uffd.Close(); err == nil {
		err = uerr
	}
	return err
}
