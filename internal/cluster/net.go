package cluster

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/netpool"
)

func ipNet(p netip.Prefix) *net.IPNet {
	return &net.IPNet{IP: p.Addr().AsSlice(), Mask: net.CIDRMask(p.Bits(), p.Addr().BitLen())}
}

func isExist(err error) bool { return errors.Is(err, unix.EEXIST) }

// makeBridge creates the host bridge with the host's address (idempotent).
func makeBridge(c Config) error {
	name := c.BridgeName()
	l, err := netlink.LinkByName(name)
	if err != nil {
		br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: name}}
		if err := netlink.LinkAdd(br); err != nil && !isExist(err) {
			return fmt.Errorf("cluster: create bridge %s: %w", name, err)
		}
		if l, err = netlink.LinkByName(name); err != nil {
			return fmt.Errorf("cluster: bridge %s: %w", name, err)
		}
	}
	addr := &netlink.Addr{IPNet: ipNet(c.bridgePrefix())}
	if err := netlink.AddrReplace(l, addr); err != nil {
		return fmt.Errorf("cluster: address %s on %s: %w", c.bridgePrefix(), name, err)
	}
	if err := netlink.LinkSetUp(l); err != nil {
		return fmt.Errorf("cluster: bring up %s: %w", name, err)
	}
	return nil
}

// makeNetns creates the named network namespace (bind-mounted under
// /var/run/netns) without moving the calling thread into it.
func makeNetns(name string) error {
	if _, err := os.Stat(filepath.Join(netnsDir, name)); err == nil {
		return nil
	}
	// A shared mount point of its own first, so that no later `ip netns
	// add` hides this namespace under a recursive self-bind.
	if err := netpool.EnsureNetnsDir(); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := netns.Get()
		if err != nil {
			errc <- fmt.Errorf("cluster: current netns: %w", err)
			return // the thread dies locked
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err == nil {
			ns.Close()
		}
		if serr := netns.Set(orig); serr != nil {
			errc <- errors.Join(err, fmt.Errorf("cluster: return to the original netns: %w", serr))
			return // the thread stays locked and dies
		}
		runtime.UnlockOSThread()
		if err != nil {
			errc <- fmt.Errorf("cluster: create netns %s: %w", name, err)
			return
		}
		errc <- nil
	}()
	return <-errc
}

// deleteNetns removes a named network namespace, every mount at its path
// and those hidden under a later mount of /var/run/netns included; the
// namespace itself goes when its last process is gone.
func deleteNetns(name string) error {
	if err := netpool.DeleteNamed(name); err != nil {
		return fmt.Errorf("cluster: %w", err)
	}
	return nil
}

// handleAt returns a netlink handle in the namespace at path.
func handleAt(path string) (*netlink.Handle, error) {
	ns, err := netns.GetFromPath(path)
	if err != nil {
		return nil, fmt.Errorf("cluster: open netns %s: %w", path, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("cluster: netlink in %s: %w", path, err)
	}
	return h, nil
}

// nodeIf is the interface name of a node inside its namespace.
const nodeIf = "eth0"

// wireNode connects node n's namespace to the bridge: a veth (host end n.Name
// on the bridge, node end eth0 with n.IP), lo up, default route via the
// host, forwarding on inside the namespace.
func wireNode(c Config, n Node) error {
	br, err := netlink.LinkByName(c.BridgeName())
	if err != nil {
		return fmt.Errorf("cluster: bridge %s: %w", c.BridgeName(), err)
	}
	h, err := handleAt(n.NetnsPath)
	if err != nil {
		return err
	}
	defer h.Close()
	if _, err := h.LinkByName(nodeIf); err != nil {
		// Remove a host end left from an interrupted run first.
		if old, err := netlink.LinkByName(n.Name); err == nil {
			_ = netlink.LinkDel(old)
		}
		ns, err := netns.GetFromPath(n.NetnsPath)
		if err != nil {
			return fmt.Errorf("cluster: open netns %s: %w", n.NetnsPath, err)
		}
		veth := &netlink.Veth{
			LinkAttrs:     netlink.LinkAttrs{Name: n.Name, MasterIndex: br.Attrs().Index},
			PeerName:      nodeIf,
			PeerNamespace: netlink.NsFd(int(ns)),
		}
		err = netlink.LinkAdd(veth)
		ns.Close()
		if err != nil {
			return fmt.Errorf("cluster: create veth %s: %w", n.Name, err)
		}
	}
	host, err := netlink.LinkByName(n.Name)
	if err != nil {
		return fmt.Errorf("cluster: veth %s: %w", n.Name, err)
	}
	if err := netlink.LinkSetMaster(host, br); err != nil {
		return fmt.Errorf("cluster: attach %s to %s: %w", n.Name, c.BridgeName(), err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("cluster: bring up %s: %w", n.Name, err)
	}
	in, err := h.LinkByName(nodeIf)
	if err != nil {
		return fmt.Errorf("cluster: %s in %s: %w", nodeIf, n.Name, err)
	}
	if err := h.AddrReplace(in, &netlink.Addr{IPNet: ipNet(netip.PrefixFrom(n.IP, c.bridgePrefix().Bits()))}); err != nil {
		return fmt.Errorf("cluster: address %s in %s: %w", n.IP, n.Name, err)
	}
	for _, l := range []netlink.Link{in} {
		if err := h.LinkSetUp(l); err != nil {
			return fmt.Errorf("cluster: bring up %s in %s: %w", l.Attrs().Name, n.Name, err)
		}
	}
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("cluster: lo in %s: %w", n.Name, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("cluster: bring up lo in %s: %w", n.Name, err)
	}
	def := &netlink.Route{LinkIndex: in.Attrs().Index, Gw: c.HostIP().AsSlice(), Dst: ipNet(netip.MustParsePrefix("0.0.0.0/0"))}
	if err := h.RouteReplace(def); err != nil {
		return fmt.Errorf("cluster: default route in %s: %w", n.Name, err)
	}
	if err := inNetns(n.NetnsPath, func() error {
		return os.WriteFile("/proc/sys/net/ipv4/ip_forward", []byte("1\n"), 0o644)
	}); err != nil {
		return fmt.Errorf("cluster: enable forwarding in %s: %w", n.Name, err)
	}
	return nil
}

// routeNodes adds the routes between nodes and from the host: each node's
// pod CIDR and function subnet via its IP, in every other node and on the
// host; the service CIDR via node 1 on the host.
func routeNodes(c Config, nodes []Node) error {
	for _, dst := range nodes {
		for _, pfx := range []netip.Prefix{dst.PodCIDR, dst.FunctionSubnet} {
			r := &netlink.Route{Dst: ipNet(pfx), Gw: dst.IP.AsSlice()}
			if err := netlink.RouteReplace(r); err != nil {
				return fmt.Errorf("cluster: host route %s via %s: %w", pfx, dst.IP, err)
			}
			for _, src := range nodes {
				if src.Name == dst.Name {
					continue
				}
				h, err := handleAt(src.NetnsPath)
				if err != nil {
					return err
				}
				err = h.RouteReplace(&netlink.Route{Dst: ipNet(pfx), Gw: dst.IP.AsSlice()})
				h.Close()
				if err != nil {
					return fmt.Errorf("cluster: route %s via %s in %s: %w", pfx, dst.IP, src.Name, err)
				}
			}
		}
	}
	if err := netlink.RouteReplace(&netlink.Route{Dst: ipNet(c.ServiceCIDR()), Gw: nodes[0].IP.AsSlice()}); err != nil {
		return fmt.Errorf("cluster: host route %s via %s: %w", c.ServiceCIDR(), nodes[0].IP, err)
	}
	return nil
}

// inNetns runs fn on a locked thread inside the namespace at path (for
// /proc/sys/net writes, which follow the writing thread's namespace).
func inNetns(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restore, err := enterThread(path, "")
		if err == nil {
			err = fn()
		}
		if restore() {
			runtime.UnlockOSThread()
		}
		errc <- err
	}()
	return <-errc
}

// ownLink reports whether a host link name belongs to instance c.
func (c Config) ownLink(name string) bool {
	return name == c.BridgeName() || c.ownNodeName(name)
}

// ownNodeName matches vhcI-n<digits>.
func (c Config) ownNodeName(name string) bool {
	rest, ok := strings.CutPrefix(name, c.nodePrefix())
	return ok && rest != "" && strings.Trim(rest, "0123456789") == ""
}

// ownFuncNetns matches the node daemons' netpool namespaces vhcIf<i>-<n>.
func (c Config) ownFuncNetns(name string) bool {
	rest, ok := strings.CutPrefix(name, c.funcPrefix())
	if !ok {
		return false
	}
	i, n, ok := strings.Cut(rest, "-")
	return ok && i != "" && n != "" && strings.Trim(i, "0123456789") == "" && strings.Trim(n, "0123456789") == ""
}

func deleteLink(name string) error {
	l, err := netlink.LinkByName(name)
	if err != nil {
		var nf netlink.LinkNotFoundError
		if errors.As(err, &nf) {
			return nil
		}
		return fmt.Errorf("cluster: link %s: %w", name, err)
	}
	if err := netlink.LinkDel(l); err != nil && !errors.Is(err, syscall.ENODEV) {
		return fmt.Errorf("cluster: delete link %s: %w", name, err)
	}
	return nil
}

// hostRoutesIn lists the host routes whose destination lies in one of the
// instance's ranges.
func (c Config) hostRoutes() ([]string, error) {
	rs, err := netlink.RouteList(nil, netlink.FAMILY_V4)
	if err != nil {
		return nil, fmt.Errorf("cluster: list routes: %w", err)
	}
	var out []string
	for _, r := range rs {
		if r.Dst == nil {
			continue
		}
		a, ok := netip.AddrFromSlice(r.Dst.IP.To4())
		if !ok {
			continue
		}
		if c.ClusterCIDR().Contains(a) || c.ServiceCIDR().Contains(a) || c.functionRange().Contains(a) || c.bridgePrefix().Contains(a) {
			out = append(out, r.Dst.String())
		}
	}
	return out, nil
}

func (c Config) functionRange() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 185, byte(16 * c.Instance), 0}), 20)
}
