package netpool

import (
	"context"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"net/netip"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"vhive.dev/vhive/internal/testutil"
)

// testOptions returns a prefix and subnet unlikely to collide with another
// test binary running at the same time on this machine.
func testOptions(size int) Options {
	r := rand.IntN(9000) + 1000
	return Options{
		Size:   size,
		Prefix: fmt.Sprintf("vt%d", r),
		Subnet: netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 200+r%50, r%250)),
	}
}

func assertNoLeftovers(t *testing.T, prefix string) {
	t.Helper()
	left, err := Leftovers(prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Fatalf("leftovers with prefix %q: %v", prefix, left)
	}
}

// listenIn opens a TCP listener inside the namespace at nsPath.
func listenIn(t *testing.T, nsPath, addr string) net.Listener {
	t.Helper()
	type res struct {
		ln  net.Listener
		err error
	}
	ch := make(chan res, 1)
	go func() {
		// This goroutine's thread is left locked (and so discarded) if it
		// cannot return to its namespace.
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			ch <- res{err: err}
			return
		}
		defer orig.Close()
		ns, err := netns.GetFromPath(nsPath)
		if err != nil {
			ch <- res{err: err}
			return
		}
		defer ns.Close()
		if err := netns.Set(ns); err != nil {
			ch <- res{err: err}
			return
		}
		ln, lerr := net.Listen("tcp", addr)
		if err := netns.Set(orig); err != nil {
			ch <- res{err: err}
			return
		}
		runtime.UnlockOSThread()
		ch <- res{ln: ln, err: lerr}
	}()
	r := <-ch
	if r.err != nil {
		t.Fatalf("listen in %s: %v", nsPath, r.err)
	}
	t.Cleanup(func() { r.ln.Close() })
	return r.ln
}

// checkReachable serves one connection inside n and dials it from the root
// namespace.
func checkReachable(t *testing.T, n *Net) {
	t.Helper()
	ln := listenIn(t, n.NsPath, net.JoinHostPort(n.GuestIP.String(), "7000"))
	go func() {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		_, _ = c.Write([]byte("hi " + n.Name))
		c.Close()
	}()
	c, err := net.DialTimeout("tcp", net.JoinHostPort(n.GuestIP.String(), "7000"), 5*time.Second)
	if err != nil {
		t.Fatalf("dial %s in %s: %v", n.GuestIP, n.Name, err)
	}
	defer c.Close()
	b, err := io.ReadAll(c)
	if err != nil || string(b) != "hi "+n.Name {
		t.Fatalf("read from %s: %q, %v", n.Name, b, err)
	}
	ln.Close()
}

func TestPoolGetPutClose(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := context.Background()
	opts := testOptions(2)
	p, err := New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Cleanup(context.Background(), opts.Prefix) })
	left, err := Leftovers(opts.Prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) != 4 {
		t.Fatalf("after New(Size=2): %v, want 2 netns + 2 veths", left)
	}

	var nets []*Net
	for i := 0; i < 3; i++ { // one beyond the preallocated ones
		n, err := p.Get(ctx)
		if err != nil {
			t.Fatal(err)
		}
		nets = append(nets, n)
	}
	seen := map[netip.Addr]bool{}
	for _, n := range nets {
		if seen[n.GuestIP] || !opts.Subnet.Contains(n.GuestIP) || !opts.Subnet.Contains(n.Gateway) {
			t.Fatalf("net %+v: address reused or outside %s", n, opts.Subnet)
		}
		seen[n.GuestIP] = true
		checkReachable(t, n)
	}

	// Simulate what gVisor does: strip the address and the routes inside
	// the namespace. Put must restore them.
	n := nets[0]
	stripGuest(t, n)
	if err := p.Put(ctx, n); err != nil {
		t.Fatal(err)
	}
	if err := p.Put(ctx, n); err == nil {
		t.Fatal("second Put of the same net succeeded")
	}
	again, err := p.Get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if again != n {
		t.Fatalf("Get after Put returned %q, want the recycled %q", again.Name, n.Name)
	}
	checkReachable(t, again)

	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := p.Get(ctx); err == nil {
		t.Fatal("Get after Close succeeded")
	}
	assertNoLeftovers(t, opts.Prefix)
}

func stripGuest(t *testing.T, n *Net) {
	t.Helper()
	ns, err := netns.GetFromPath(n.NsPath)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		t.Fatal(err)
	}
	defer h.Close()
	l, err := h.LinkByName(n.GuestIf)
	if err != nil {
		t.Fatal(err)
	}
	addrs, err := h.AddrList(l, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, a := range addrs {
		if err := h.AddrDel(l, &a); err != nil {
			t.Fatal(err)
		}
	}
	routes, err := h.RouteList(l, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	if len(routes) != 0 {
		t.Fatalf("routes left after removing the address: %v", routes)
	}
}

func TestCleanupAfterCrash(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := context.Background()
	opts := testOptions(3)
	p, err := New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := p.Get(ctx); err != nil {
		t.Fatal(err)
	}
	// The "daemon" dies here: p is dropped without Close.
	if err := Cleanup(ctx, opts.Prefix); err != nil {
		t.Fatal(err)
	}
	assertNoLeftovers(t, opts.Prefix)
}

func TestStaleNamesAreReplaced(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := context.Background()
	opts := testOptions(1)
	p1, err := New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	_ = p1 // crashed: not closed
	p2, err := New(ctx, opts)
	if err != nil {
		t.Fatalf("New over stale names: %v", err)
	}
	t.Cleanup(func() { _ = Cleanup(context.Background(), opts.Prefix) })
	n, err := p2.Get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	checkReachable(t, n)
	if err := p2.Close(ctx); err != nil {
		t.Fatal(err)
	}
	assertNoLeftovers(t, opts.Prefix)
}

func TestOptionsValidation(t *testing.T) {
	ctx := context.Background()
	for _, o := range []Options{
		{Size: -1},
		{Subnet: netip.MustParsePrefix("fd00::/64")},
		{Subnet: netip.MustParsePrefix("10.0.0.0/31")},
		{Prefix: "a-b"},
		{Prefix: "waytoolongprefix"},
		{Size: 5, Subnet: netip.MustParsePrefix("10.0.0.0/29")},
	} {
		if _, err := New(ctx, o); err == nil {
			t.Errorf("New(%+v) succeeded", o)
		}
	}
}

func TestOwnName(t *testing.T) {
	for name, want := range map[string]bool{"vh-1": true, "vh-": false, "vh-1x": false, "vhx-1": false, "vh-12345": true, "eth0": false} {
		if got := OwnName("vh", name); got != want {
			t.Errorf("OwnName(vh, %q) = %v, want %v", name, got, want)
		}
	}
}

// TestConcurrentGetPut hammers the pool from several goroutines: every Net
// handed out is unique while in use and reachable, and Close leaves nothing.
func TestConcurrentGetPut(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := context.Background()
	opts := testOptions(2)
	p, err := New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = Cleanup(context.Background(), opts.Prefix) })
	const workers, rounds = 8, 10
	var mu sync.Mutex
	inUse := map[string]bool{}
	errs := make(chan error, workers)
	var wg sync.WaitGroup
	for w := 0; w < workers; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for r := 0; r < rounds; r++ {
				n, err := p.Get(ctx)
				if err != nil {
					errs <- err
					return
				}
				mu.Lock()
				if inUse[n.Name] {
					mu.Unlock()
					errs <- fmt.Errorf("net %q handed out twice", n.Name)
					return
				}
				inUse[n.Name] = true
				mu.Unlock()
				c, err := net.DialTimeout("tcp", net.JoinHostPort(n.GuestIP.String(), "1"), 2*time.Second)
				if err == nil {
					c.Close()
				} else if !errors.Is(err, syscall.ECONNREFUSED) {
					// Refused means the guest address answered.
					errs <- fmt.Errorf("net %q: %v", n.Name, err)
					return
				}
				mu.Lock()
				delete(inUse, n.Name)
				mu.Unlock()
				if err := p.Put(ctx, n); err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := p.Close(ctx); err != nil {
		t.Fatal(err)
	}
	assertNoLeftovers(t, opts.Prefix)
}
