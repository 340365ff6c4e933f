package testutil

import (
	"net"
	"strconv"
	"testing"
)

// TestPortReservedAgainstOthers: a reserved port is given to nobody else
// until released (flock locks are per open file, so a second reservation in
// this process is refused the same way one in another test binary is), it
// lies below the ephemeral range, and a port some non-test program listens on
// is never given out.
func TestPortReservedAgainstOthers(t *testing.T) {
	a, releaseA, err := ReservePort()
	if err != nil {
		t.Fatal(err)
	}
	b, releaseB, err := ReservePort()
	if err != nil {
		t.Fatal(err)
	}
	defer releaseB()
	if a == b {
		t.Fatalf("two reservations got the same address %s", a)
	}
	for _, addr := range []string{a, b} {
		_, p, _ := net.SplitHostPort(addr)
		n, _ := strconv.Atoi(p)
		if n < PortRangeFirst || n >= PortRangeEnd || n >= 32768 {
			t.Fatalf("port %d outside %d-%d or inside the ephemeral range", n, PortRangeFirst, PortRangeEnd-1)
		}
	}
	// Released, a's lock is free again, but a program that is not a test
	// now listens there: a must not be handed out.
	releaseA()
	l, err := net.Listen("tcp", a)
	if err != nil {
		t.Fatalf("listen on the released %s: %v", a, err)
	}
	defer l.Close()
	for i := 0; i < 3; i++ {
		c, release, err := ReservePort()
		if err != nil {
			t.Fatal(err)
		}
		defer release()
		if c == a || c == b {
			t.Fatalf("reservation %d got %s, which is taken (a=%s b=%s)", i, c, a, b)
		}
	}
}
