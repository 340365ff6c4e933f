package api

import (
	"bytes"
	"errors"
	"io"
	"net"
	"sync"
	"time"
)

// demux splits one listener's connections by their first bytes: those that
// open with HTTP/2's client preface ("PRI * HTTP/2.0", how gRPC begins) go
// to h2, the others (HTTP/1.x) to h1.
type demux struct {
	l      net.Listener
	h2, h1 *chanListener
}

func newDemux(l net.Listener) *demux {
	done := make(chan struct{})
	var once sync.Once
	closeAll := func() { once.Do(func() { close(done) }) }
	return &demux{l: l,
		h2: &chanListener{addr: l.Addr(), conns: make(chan net.Conn), done: done, close: closeAll},
		h1: &chanListener{addr: l.Addr(), conns: make(chan net.Conn), done: done, close: closeAll}}
}

// prefaceTimeout bounds how long a new connection may take to send its
// first bytes.
const prefaceTimeout = 10 * time.Second

// run accepts until the listener or either side is closed.
func (d *demux) run() error {
	go func() {
		<-d.h1.done
		d.l.Close()
	}()
	for {
		c, err := d.l.Accept()
		if err != nil {
			d.h1.close()
			select {
			case <-d.h1.done:
				if errors.Is(err, net.ErrClosed) {
					return nil
				}
			default:
			}
			return err
		}
		go d.route(c)
	}
}

func (d *demux) route(c net.Conn) {
	_ = c.SetReadDeadline(time.Now().Add(prefaceTimeout))
	var first [3]byte
	n, err := io.ReadFull(c, first[:])
	_ = c.SetReadDeadline(time.Time{})
	if err != nil {
		c.Close()
		return
	}
	pc := &prefixConn{Conn: c, prefix: first[:n]}
	to := d.h1
	if bytes.Equal(first[:n], []byte("PRI")) {
		to = d.h2
	}
	select {
	case to.conns <- pc:
	case <-to.done:
		c.Close()
	}
}

// prefixConn replays the bytes the demux read before the connection's own.
type prefixConn struct {
	net.Conn
	prefix []byte
}

func (p *prefixConn) Read(b []byte) (int, error) {
	if len(p.prefix) > 0 {
		n := copy(b, p.prefix)
		p.prefix = p.prefix[n:]
		return n, nil
	}
	return p.Conn.Read(b)
}

// chanListener is one side of a demux.
type chanListener struct {
	addr  net.Addr
	conns chan net.Conn
	done  chan struct{}
	close func()
}

func (l *chanListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		return nil, net.ErrClosed
	}
}

func (l *chanListener) Close() error   { l.close(); return nil }
func (l *chanListener) Addr() net.Addr { return l.addr }
