package microvm

import (
	"bytes"
	"context"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net"
	"net/netip"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/testutil"
)

// netOf returns the Net a running sandbox holds.
func netOf(t testing.TB, sb sandbox.Sandbox) *netpool.Net {
	t.Helper()
	s := sb.(*Sandbox)
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.net == nil {
		t.Fatalf("sandbox %s holds no Net", s.id)
	}
	return s.net
}

// netnsState describes n's namespace in terms that hold for every Net of
// a pool: links (name, type, up), addresses and routes with n's own
// addresses written SUBNET, GUEST and GATEWAY, the nftables ruleset and IPv4
// forwarding.
func netnsState(t testing.TB, n *netpool.Net) string {
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
	generic := strings.NewReplacer(netip.PrefixFrom(n.GuestIP, n.Bits).Masked().String(), "SUBNET",
		n.GuestIP.String(), "GUEST", n.Gateway.String(), "GATEWAY")
	var lines []string
	links, err := h.LinkList()
	if err != nil {
		t.Fatal(err)
	}
	names := map[int]string{}
	for _, l := range links {
		a := l.Attrs()
		names[a.Index] = a.Name
		lines = append(lines, fmt.Sprintf("link %s %s up=%v", a.Name, l.Type(), a.Flags&net.FlagUp != 0))
		addrs, err := h.AddrList(l, netlink.FAMILY_ALL)
		if err != nil {
			t.Fatal(err)
		}
		for _, ad := range addrs {
			if !ad.IP.IsLinkLocalUnicast() {
				lines = append(lines, fmt.Sprintf("addr %s %s", a.Name, generic.Replace(ad.IPNet.String())))
			}
		}
	}
	routes, err := h.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		lines = append(lines, generic.Replace(fmt.Sprintf("route %v via %v dev %s", r.Dst, r.Gw, names[r.LinkIndex])))
	}
	var fwd []byte
	var ruleset bytes.Buffer
	err = inNetns(ns, func() error {
		var err error
		if fwd, err = os.ReadFile(ipForward); err != nil {
			return err
		}
		cmd := exec.Command("nft", "list", "ruleset")
		cmd.Stdout, cmd.Stderr = &ruleset, &ruleset
		return cmd.Run()
	})
	if err != nil {
		t.Fatalf("netns %s: %v: %s", n.Name, err, ruleset.String())
	}
	lines = append(lines, "ip_forward "+strings.TrimSpace(string(fwd)), "nft "+strings.TrimSpace(ruleset.String()))
	slices.Sort(lines)
	return strings.Join(lines, "\n")
}

// unusedNet takes a Net from e's pool other than those given (they are
// back in the pool) and returns its state; the Net goes back when t ends.
func unusedNetState(t testing.TB, e *env, used ...*netpool.Net) string {
	t.Helper()
	ctx := context.Background()
	var held []*netpool.Net
	defer func() {
		for _, n := range held {
			if err := e.pool.Put(ctx, n); err != nil {
				t.Error(err)
			}
		}
	}()
	for range len(used) + 1 {
		n, err := e.pool.Get(ctx)
		if err != nil {
			t.Fatal(err)
		}
		held = append(held, n)
		if !slices.Contains(used, n) {
			return netnsState(t, n)
		}
	}
	t.Fatal("the pool gave only Nets in use")
	return ""
}

// TestClonesShareTheGuestAddress: a source and two clones of its snapshot
// run at once, every guest with the same address and MAC (172.16.0.2
// behind its netns's tap, which each netns's neighbour table shows), each
// reached at its own Net's GuestIP, each with its own state. After Stop
// every namespace is as the pool made it: no tap, no nftables table,
// forwarding off, eth0 with its GuestIP (the state of a Net no instance
// used).
func TestClonesShareTheGuestAddress(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src := e.start(t, e.spec("net-src"))
	if got := get(t, src.Endpoint(), "/count"); got != "1" {
		t.Fatalf("/count = %q, want 1", got)
	}
	dir := t.TempDir()
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatal(err)
	}
	clones := make([]sandbox.Sandbox, 2)
	errs := make([]error, len(clones))
	var wg sync.WaitGroup
	for i := range clones {
		wg.Add(1)
		go func() {
			defer wg.Done()
			clones[i], errs[i] = e.b.Restore(ctx, e.spec("net-clone-"+strconv.Itoa(i)), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
		}()
	}
	wg.Wait()
	for i, c := range clones {
		if errs[i] != nil {
			t.Fatalf("clone %d: %v", i, errs[i])
		}
		t.Cleanup(func() { _ = c.Stop(context.Background()) })
	}
	all := append([]sandbox.Sandbox{src}, clones...)
	seen := map[string]string{}
	var nets []*netpool.Net
	for _, sb := range all {
		n := netOf(t, sb)
		nets = append(nets, n)
		if want := net.JoinHostPort(n.GuestIP.String(), "8080"); sb.Endpoint() != want {
			t.Errorf("%s: endpoint %s, want its Net's %s", sb.ID(), sb.Endpoint(), want)
		}
		if other, dup := seen[sb.Endpoint()]; dup {
			t.Errorf("%s and %s share the endpoint %s", sb.ID(), other, sb.Endpoint())
		}
		seen[sb.Endpoint()] = sb.ID()
	}
	// Interleaved: each answers with its own counter (the source has
	// counted 1 before the snapshot; the clones go on from there).
	for _, step := range []struct {
		sb   int
		want string
	}{{1, "2"}, {2, "2"}, {1, "3"}, {0, "2"}, {2, "3"}, {0, "3"}, {2, "4"}} {
		if got := get(t, all[step.sb].Endpoint(), "/count"); got != step.want {
			t.Errorf("%s /count = %q, want %s", all[step.sb].ID(), got, step.want)
		}
	}
	for i, n := range nets {
		if mac := guestNeighbour(t, n); mac != guestMAC {
			t.Errorf("%s: the netns's neighbour %s on %s has MAC %q, want %s", all[i].ID(), guestIP, tapName, mac, guestMAC)
		}
	}
	for _, sb := range all {
		if err := sb.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	clean := unusedNetState(t, e, nets...)
	for i, n := range nets {
		if got := netnsState(t, n); got != clean {
			t.Errorf("%s: netns %s after Stop:\n%s\nwant (a Net no instance used):\n%s", all[i].ID(), n.Name, got, clean)
		}
	}
}

// guestNeighbour returns the MAC that n's netns has for guestIP on the tap
// ("" if none).
func guestNeighbour(t testing.TB, n *netpool.Net) string {
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
	tl, err := h.LinkByName(tapName)
	if err != nil {
		t.Fatalf("netns %s: %v", n.Name, err)
	}
	neighs, err := h.NeighList(tl.Attrs().Index, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, nb := range neighs {
		if nb.IP.Equal(net.IP(guestIP.AsSlice())) {
			return nb.HardwareAddr.String()
		}
	}
	return ""
}

// probeRootfs builds a rootfs whose /bin/netprobe is testdata/netprobe.
func probeRootfs(t testing.TB) (dir, digest string) {
	t.Helper()
	dir = t.TempDir()
	for _, d := range []string{"bin", "etc", "tmp"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, "bin/netprobe"), "./testdata/netprobe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build netprobe: %v: %s", err, out)
	}
	digest, err := treeDigest(dir)
	if err != nil {
		t.Fatal(err)
	}
	return dir, digest
}

// newEnvWithPool is newEnv with pool options changed by mut.
func newEnvWithPool(t testing.TB, mut func(*netpool.Options)) *env {
	t.Helper()
	testutil.RequiresRoot(t)
	if assetsErr != nil {
		t.Fatalf("microVM assets (QEMU, kernel, initramfs) cannot be built: %v", assetsErr)
	}
	ctx := context.Background()
	r := rand.IntN(9000) + 1000
	prefix := fmt.Sprintf("vn%d", r)
	opts := netpool.Options{Size: 2, Prefix: prefix, Subnet: netip.MustParsePrefix(fmt.Sprintf("172.%d.%d.0/24", 26+r%4, r%250)),
		Logger: slog.New(slog.NewTextHandler(io.Discard, nil))}
	mut(&opts)
	pool, err := netpool.New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	root, err := os.MkdirTemp("", "mvm-")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{pool: pool, prefix: prefix, root: root}
	t.Cleanup(func() {
		ctx := context.Background()
		if e.b != nil {
			if err := e.b.Cleanup(ctx); err != nil {
				t.Errorf("backend cleanup: %v", err)
			}
		}
		if err := pool.Close(ctx); err != nil {
			t.Errorf("pool close: %v", err)
		}
		_ = netpool.Cleanup(ctx, prefix)
		_ = os.RemoveAll(root)
	})
	e.b, err = New(ctx, Config{Root: root, Assets: testAssets, NetPool: pool, RootfsDir: filepath.Join(root, "rootfs")})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// counting accepts TCP connections on l and counts them.
type counting struct {
	l net.Listener
	n atomic.Int64
}

func serveCounting(t testing.TB, l net.Listener) *counting {
	c := &counting{l: l}
	go func() {
		for {
			conn, err := l.Accept()
			if err != nil {
				return
			}
			c.n.Add(1)
			conn.Close()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return c
}

// listenIn listens on addr inside the netns at path (the socket belongs
// to the netns it was made in).
func listenIn(t testing.TB, path, addr string) *counting {
	t.Helper()
	ns, err := netns.GetFromPath(path)
	if err != nil {
		t.Fatal(err)
	}
	defer ns.Close()
	var l net.Listener
	if err := inNetns(ns, func() error {
		var err error
		l, err = net.Listen("tcp", addr)
		return err
	}); err != nil {
		t.Fatal(err)
	}
	return serveCounting(t, l)
}

// TestGuestCannotReachOut: from inside a microVM guest, what a runc or
// gVisor function cannot reach (internal/reliability/isolation) is out of
// reach too: host services on every host address (through the gateway, the
// host side of its own veth, or directly), the netns it runs in (the tap's
// address, its own GuestIP), another instance's network, and anything
// beyond the host. The guest reaches its own server, so a probe that
// cannot dial at all would fail the test. It holds with the pool's host
// filter and, because the instance netns forwards nothing the guest opens,
// without it.
func TestGuestCannotReachOut(t *testing.T) {
	for _, filtered := range []bool{true, false} {
		t.Run(map[bool]string{true: "host-filter", false: "netns-rules-only"}[filtered], func(t *testing.T) {
			e := newEnvWithPool(t, func(o *netpool.Options) { o.NoHostFilter = !filtered })
			ctx := context.Background()
			rootfs, digest := probeRootfs(t)
			spec := sandbox.Spec{ID: "probe", Function: "netprobe", ImageDigest: digest, Rootfs: rootfs,
				Process: sandbox.Process{Args: []string{"/bin/netprobe"}}, Port: 8080}
			sb := e.start(t, spec)
			self := netOf(t, sb)
			peer, err := e.pool.Get(ctx)
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = e.pool.Put(context.Background(), peer) })

			dial := func(addr string) string {
				t.Helper()
				return get(t, sb.Endpoint(), "/dial?addr="+url.QueryEscape(addr))
			}
			if got := dial("127.0.0.1:8080"); got != "connected" {
				t.Fatalf("the probe cannot reach its own server (%q): it could not report a reachable target", got)
			}

			hostAll, err := net.Listen("tcp", "0.0.0.0:0")
			if err != nil {
				t.Fatal(err)
			}
			all := serveCounting(t, hostAll)
			port := strconv.Itoa(hostAll.Addr().(*net.TCPAddr).Port)
			loop := serveCounting(t, mustListen(t, testutil.Port(t)))
			inNs := listenIn(t, self.NsPath, "0.0.0.0:"+port)
			inPeer := listenIn(t, peer.NsPath, net.JoinHostPort(peer.GuestIP.String(), port))
			targets := map[string]string{
				"a host service via its gateway":           net.JoinHostPort(self.Gateway.String(), port),
				"a host service via the peer's gateway":    net.JoinHostPort(peer.Gateway.String(), port),
				"a host loopback service via its gateway":  net.JoinHostPort(self.Gateway.String(), portOf(loop.l.Addr())),
				"its netns through the tap's address":      net.JoinHostPort(tapIP.String(), port),
				"its netns through its own GuestIP":        net.JoinHostPort(self.GuestIP.String(), port),
				"another instance's network":               net.JoinHostPort(peer.GuestIP.String(), port),
				"the host's default gateway (the outside)": "",
			}
			for i, a := range hostAddrs(t) {
				targets[fmt.Sprintf("a host service on host address %d (%s)", i, a)] = net.JoinHostPort(a.String(), port)
			}
			if gw := defaultGateway(t); gw.IsValid() {
				targets["the host's default gateway (the outside)"] = net.JoinHostPort(gw.String(), "53")
			} else {
				delete(targets, "the host's default gateway (the outside)")
			}
			var wg sync.WaitGroup
			results := map[string]string{}
			var mu sync.Mutex
			for what, addr := range targets {
				wg.Add(1)
				go func() {
					defer wg.Done()
					got := dial(addr)
					mu.Lock()
					results[what] = got
					mu.Unlock()
				}()
			}
			wg.Wait()
			for what, got := range results {
				switch {
				case !strings.HasPrefix(got, "failed"):
					t.Errorf("%s (%s) from inside the guest: %q, want a failure", what, targets[what], got)
				case strings.Contains(got, "refused"):
					// A refusal came back: the packet got there.
					t.Errorf("%s (%s): %q, want no answer at all (dropped)", what, targets[what], got)
				default:
					t.Logf("%s: %s", what, got)
				}
			}
			if a, l, n, p := all.n.Load(), loop.n.Load(), inNs.n.Load(), inPeer.n.Load(); a+l+n+p != 0 {
				t.Errorf("connections from the guest accepted: host all-addresses %d, host loopback %d, its netns %d, the peer's netns %d", a, l, n, p)
			}
		})
	}
}

func mustListen(t testing.TB, addr string) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func portOf(a net.Addr) string { return strconv.Itoa(a.(*net.TCPAddr).Port) }

// hostAddrs are the host's own IPv4 addresses but loopback (its main
// interface, the pools' veths, bridges...).
func hostAddrs(t testing.TB) []netip.Addr {
	t.Helper()
	as, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, a := range as {
		p, err := netip.ParsePrefix(a.String())
		if err != nil || !p.Addr().Is4() || p.Addr().IsLoopback() {
			continue
		}
		out = append(out, p.Addr())
	}
	return out
}

// defaultGateway is the host's IPv4 default gateway, if any.
func defaultGateway(t testing.TB) netip.Addr {
	t.Helper()
	routes, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range routes {
		if (r.Dst == nil || r.Dst.IP.IsUnspecified()) && r.Gw != nil {
			a, _ := netip.AddrFromSlice(r.Gw.To4())
			return a
		}
	}
	return netip.Addr{}
}
