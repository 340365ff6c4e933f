package isolation

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os/exec"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/nodetest"
)

const probeRef = "localhost/vhive/netprobe:test"

// countingListener accepts connections on addr and counts them.
type countingListener struct {
	l        net.Listener
	accepted atomic.Int64
}

func listen(t *testing.T, addr string) *countingListener {
	t.Helper()
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingListener{l: l}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			cl.accepted.Add(1)
			c.Close()
		}
	}()
	t.Cleanup(func() { l.Close() })
	return cl
}

// hostAddrs are the host's own IPv4 addresses outside the daemon's subnet
// (its main interface, docker bridges, ...).
func hostAddrs(t *testing.T, skip netip.Prefix) []netip.Addr {
	t.Helper()
	as, err := net.InterfaceAddrs()
	if err != nil {
		t.Fatal(err)
	}
	var out []netip.Addr
	for _, a := range as {
		p, err := netip.ParsePrefix(a.String())
		if err != nil || !p.Addr().Is4() || p.Addr().IsLoopback() || skip.Contains(p.Addr()) {
			continue
		}
		out = append(out, p.Addr())
	}
	return out
}

func endpointOf(t *testing.T, n *nodetest.Node, fn string) netip.AddrPort {
	t.Helper()
	ls, err := n.Client.ListInstances(context.Background(), &vhivepb.ListInstancesRequest{Function: fn})
	if err != nil || len(ls.Instances) == 0 {
		t.Fatalf("instances of %s: %v, %v", fn, ls.GetInstances(), err)
	}
	ap, err := netip.ParseAddrPort(ls.Instances[0].Endpoint)
	if err != nil {
		t.Fatal(err)
	}
	return ap
}

// TestFunctionCannotReachOut: from inside a function (gVisor and runc) the
// daemon's control socket, the host's loopback services (the control API on
// TCP, the gateway, any other), services the host serves on all its
// addresses, and another instance's network are all out of reach. The probe
// also reaches its own server, so a probe that cannot connect at all would
// fail the test.
func TestFunctionCannotReachOut(t *testing.T) {
	bin := shared.Bin(t)
	subnet := netip.MustParsePrefix("10.188.2.0/24")
	tokFile := writeToken(t, t.TempDir(), token, 0o600)
	ctrlTCP := nodetest.Port(t)
	metrics := nodetest.Port(t)
	n := nodetest.Start(t, bin, nodetest.Options{NetPrefix: "h3bs", Subnet: subnet.String(),
		Args: []string{"--control-tcp", ctrlTCP, "--control-token-file", tokFile}, Metrics: metrics})
	n.Import(t, shared.GoImage(t, "./internal/reliability/isolation/testdata/netprobe"))

	loopSvc := listen(t, nodetest.Port(t))
	allSvc := listen(t, "0.0.0.0:"+strings.Split(nodetest.Port(t), ":")[1])
	allPort := allSvc.l.Addr().(*net.TCPAddr).Port

	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	invoke := func(fn, payload string) string {
		t.Helper()
		r, err := n.Client.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte(payload)})
		if err != nil {
			t.Fatalf("%s %q: %v", fn, payload, err)
		}
		return string(r.Payload)
	}
	// Another function's instance, whose network the probes try.
	n.Deploy(t, &vhivepb.FunctionSpec{Name: "peer", Image: probeRef, Sandbox: "runc"})
	invoke("peer", "addrs")
	peer := endpointOf(t, n, "peer")

	for _, sb := range []string{"gvisor", "runc"} {
		t.Run(sb, func(t *testing.T) {
			fn := "probe-" + sb
			// One instance serves every probe at once.
			n.Deploy(t, &vhivepb.FunctionSpec{Name: fn, Image: probeRef, Sandbox: sb, Concurrency: 64})
			invoke(fn, "addrs")
			self := endpointOf(t, n, fn)
			// The host side of its own veth is the address before it.
			gw := self.Addr().Prev()

			if got := invoke(fn, "tcp "+net.JoinHostPort("127.0.0.1", fmt.Sprint(self.Port()))); got != "connected" {
				t.Fatalf("the probe cannot reach its own server (%q): it could not report a reachable target", got)
			}
			targets := map[string]string{
				"the control socket":                   "unix " + n.Socket,
				"the control API on TCP":               "tcp " + ctrlTCP,
				"the gateway":                          "tcp " + n.Gateway,
				"the metrics endpoint":                 "tcp " + metrics,
				"a host loopback service":              "tcp " + loopSvc.l.Addr().String(),
				"another instance":                     "tcp " + peer.String(),
				"a host service via its own veth":      "tcp " + netip.AddrPortFrom(gw, uint16(allPort)).String(),
				"a host service via the other's veth":  "tcp " + netip.AddrPortFrom(peer.Addr().Prev(), uint16(allPort)).String(),
				"the gateway via its own veth":         "tcp " + netip.AddrPortFrom(gw, portOf(n.Gateway)).String(),
				"the control API on TCP via its veth":  "tcp " + netip.AddrPortFrom(gw, portOf(ctrlTCP)).String(),
				"a host loopback service via its veth": "tcp " + netip.AddrPortFrom(gw, portOf(loopSvc.l.Addr().String())).String(),
			}
			for i, a := range hostAddrs(t, subnet) {
				targets[fmt.Sprintf("a host service on host address %d (%s)", i, a)] = "tcp " + netip.AddrPortFrom(a, uint16(allPort)).String()
			}
			var wg sync.WaitGroup
			for what, req := range targets {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r, err := n.Client.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte(req)})
					switch got := string(r.GetPayload()); {
					case err != nil:
						t.Errorf("%s (%s): %v", what, req, err)
					case !strings.HasPrefix(got, "failed"):
						t.Errorf("%s (%s) from inside a %s function: %q, want a failure", what, req, sb, got)
					default:
						t.Logf("%s: %s", what, got)
					}
				}()
			}
			wg.Wait()
			if got := invoke(fn, "stat "+n.Socket); !strings.HasPrefix(got, "absent") {
				t.Errorf("the control socket's path %s inside the %s function: %q", n.Socket, sb, got)
			}
		})
	}
	if a, b := loopSvc.accepted.Load(), allSvc.accepted.Load(); a != 0 || b != 0 {
		t.Errorf("host services accepted %d (loopback) and %d (all addresses) connections from functions", a, b)
	}
	// The filter goes with the daemon.
	if out, err := exec.Command("nft", "list", "table", "inet", netpool.FilterTable("h3bs")).CombinedOutput(); err != nil {
		t.Fatalf("the daemon's nftables table is missing while it runs: %v %s", err, out)
	}
	if err := n.Stop(); err != nil {
		t.Error(err)
	}
	if out, err := exec.Command("nft", "list", "table", "inet", netpool.FilterTable("h3bs")).CombinedOutput(); err == nil {
		t.Errorf("the daemon's nftables table outlived it:\n%s", out)
	}
}

func portOf(addr string) uint16 {
	ap, err := netip.ParseAddrPort(addr)
	if err != nil {
		return 0
	}
	return ap.Port()
}
