package testutil

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"golang.org/x/sys/unix"
)

// Test ports: the range Port hands out. It lies below the ephemeral port
// range (32768-60999 on Linux by default; see
// /proc/sys/net/ipv4/ip_local_port_range), from which connect() and a listen
// on :0 pick their local ports, so no process's outgoing connection can take
// a port of this range; below Kubernetes' NodePort range (30000-32767) too.
const (
	PortRangeFirst = 26000
	PortRangeEnd   = 27000 // exclusive
)

// portLockDir holds one lock file per reserved port, shared by every test
// binary on the machine.
const portLockDir = "/run/vhive-test-ports"

// Port returns a 127.0.0.1 address whose port no other test on this machine
// is given and nothing else holds: for a server started later (often by a
// child process) that must be told its address before it binds.
//
// A port merely seen free (listen on :0, close, hand it over) can be taken
// before the server binds it: by any outgoing connection, since :0 ports lie
// in the ephemeral range, or by another test doing the same. Port rules out
// both: its range lies below the ephemeral range, so only an explicit bind
// can take a port there, and every port it gives out is locked (flock on a
// file under /run/vhive-test-ports) until the test ends, so no two tests,
// in this binary or any other running at the same time, are given the same
// port. The probe bind then catches ports held by programs that are not
// tests. The lock is released when the test (or the process) ends.
func Port(t testing.TB) string {
	t.Helper()
	addr, release, err := ReservePort()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(release)
	return addr
}

// ReservePort is Port without a test: it returns the address and the function
// that releases the reservation.
func ReservePort() (addr string, release func(), err error) {
	if err := os.MkdirAll(portLockDir, 0o755); err != nil {
		return "", nil, fmt.Errorf("testutil: port locks: %w", err)
	}
	for p := PortRangeFirst; p < PortRangeEnd; p++ {
		f, err := os.OpenFile(filepath.Join(portLockDir, strconv.Itoa(p)), os.O_CREATE|os.O_RDWR, 0o644)
		if err != nil {
			return "", nil, fmt.Errorf("testutil: port lock %d: %w", p, err)
		}
		if err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
			f.Close()
			if errors.Is(err, unix.EWOULDBLOCK) {
				continue // another test holds it
			}
			return "", nil, fmt.Errorf("testutil: lock port %d: %w", p, err)
		}
		a := net.JoinHostPort("127.0.0.1", strconv.Itoa(p))
		l, err := net.Listen("tcp", a)
		if err != nil {
			f.Close() // held by something that is not a test of ours
			continue
		}
		l.Close()
		return a, func() { f.Close() }, nil
	}
	return "", nil, fmt.Errorf("testutil: no free port in 127.0.0.1:%d-%d", PortRangeFirst, PortRangeEnd-1)
}
