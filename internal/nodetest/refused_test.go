package nodetest

import (
	"errors"
	"net"
	"syscall"
	"testing"
)

// TestRefusedAddr: while held, a connection to the address is refused and
// nobody can listen there; after release the port can be bound again.
func TestRefusedAddr(t *testing.T) {
	addr, release, err := RefusedAddr()
	if err != nil {
		t.Fatal(err)
	}
	if c, err := net.Dial("tcp", addr); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			c.Close()
		}
		t.Errorf("dial %s: %v, want connection refused", addr, err)
	}
	if l, err := net.Listen("tcp", addr); !errors.Is(err, syscall.EADDRINUSE) {
		if l != nil {
			l.Close()
		}
		t.Errorf("listen %s while held: %v, want address in use", addr, err)
	}
	release()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("listen %s after release: %v", addr, err)
	}
	l.Close()
}
