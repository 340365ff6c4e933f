// Package netpool keeps a pool of preallocated network configurations for
// sandboxes, like vHive's -netPoolSize: creating a network namespace and a
// veth pair costs milliseconds that a cold start should not pay.
//
// Each Net is
//
//	root netns                         netns /var/run/netns/<prefix>-<n>
//	<prefix>-<n> (veth, gateway/30) ── eth0 (veth, guest/30), lo up,
//	                                    default route via the gateway
//
// Namespaces are named (bind-mounted under /var/run/netns) so that runc and
// runsc can be given a path in the OCI spec and so that Cleanup can find what
// a crashed daemon left behind by name prefix. Addresses come from Subnet in
// /30 blocks: block n holds gateway base+4n+1 and guest base+4n+2. The pool
// never enables forwarding or NAT: a sandbox can reach only the host side of
// its own veth, and the daemon reaches the sandbox at GuestIP.
//
// gVisor (runsc --network=sandbox) moves the address and routes of eth0 into
// its own netstack and removes them from the namespace. Put therefore puts
// them back, and every Net handed out by Get has its address, route and links
// configured — which a runsc restore requires.
package netpool

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// NetnsDir is where named network namespaces are bind-mounted (iproute2's
// convention, also used by vishvananda/netns).
const NetnsDir = "/var/run/netns"

// GuestIfName is the name of the interface inside every namespace.
const GuestIfName = "eth0"

// DefaultSubnet is used when Options.Subnet is not set.
func DefaultSubnet() netip.Prefix { return netip.MustParsePrefix("10.168.0.0/16") }

// ErrClosed is returned by Get after Close.
var ErrClosed = errors.New("netpool: closed")

// Options configure a Pool.
type Options struct {
	// Size is the number of configurations created by New and kept ready.
	Size int
	// Subnet the /30 blocks are carved from (IPv4, prefix length <= 30).
	// Zero means DefaultSubnet().
	Subnet netip.Prefix
	// Prefix names the namespaces and host veths ("<Prefix>-<n>"). Default
	// "vh". At most 8 characters so interface names fit in 15 bytes.
	Prefix string
	// NoHostFilter leaves out the nftables table that keeps sandboxes from
	// reaching the host and each other (see filter.go). Only for tests of
	// the pool itself on machines without nftables.
	NoHostFilter bool
	// AllowForward lets the host filter accept connections forwarded into
	// the sandboxes (and their replies): on a Kubernetes node the CRI's
	// queue-proxy, in a pod network, dials its function. The sandboxes
	// still reach neither the host nor each other.
	AllowForward bool
	Logger       *slog.Logger
}

// Net is one network configuration. Its fields are read-only.
type Net struct {
	Index   int
	Name    string     // netns name and host-side veth name
	NsPath  string     // /var/run/netns/<Name>
	HostIf  string     // host-side veth in the root netns
	GuestIf string     // interface inside the netns
	Gateway netip.Addr // address of HostIf, the guest's default route
	GuestIP netip.Addr // address of GuestIf
	Bits    int        // prefix length of both addresses (30)
}

// Pool hands out Nets. It is safe for concurrent use.
type Pool struct {
	opts Options
	log  *slog.Logger

	mu     sync.Mutex
	closed bool
	free   []*Net
	used   map[int]*Net
	nextIx int
	freeIx []int // indices released by destroyed Nets, reused first
	maxIx  int
	// filtered: the host filter table is installed (cleared by Close).
	filtered bool
}

// New validates opts and creates opts.Size namespaces. On error nothing is
// left behind.
func New(ctx context.Context, opts Options) (*Pool, error) {
	if opts.Size < 0 {
		return nil, fmt.Errorf("netpool: Size %d is negative", opts.Size)
	}
	if !opts.Subnet.IsValid() {
		opts.Subnet = DefaultSubnet()
	}
	if !opts.Subnet.Addr().Is4() || opts.Subnet.Bits() > 30 {
		return nil, fmt.Errorf("netpool: Subnet %s must be IPv4 with a prefix length of at most 30", opts.Subnet)
	}
	opts.Subnet = opts.Subnet.Masked()
	if opts.Prefix == "" {
		opts.Prefix = "vh"
	}
	if len(opts.Prefix) > 8 || strings.ContainsAny(opts.Prefix, "/ \t-") {
		return nil, fmt.Errorf("netpool: Prefix %q must be 1-8 characters without '/', '-' or spaces", opts.Prefix)
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	p := &Pool{
		opts:  opts,
		log:   opts.Logger.With("component", "netpool"),
		used:  map[int]*Net{},
		maxIx: 1<<(32-opts.Subnet.Bits())/4 - 1,
	}
	if p.maxIx > 99999 {
		p.maxIx = 99999 // keeps "<prefix>-<n>" within 15 bytes
	}
	if opts.Size > p.maxIx+1 {
		return nil, fmt.Errorf("netpool: Size %d exceeds the %d /30 blocks of %s", opts.Size, p.maxIx+1, opts.Subnet)
	}
	if !opts.NoHostFilter {
		// Before any veth exists: no sandbox is ever unfiltered.
		if err := installFilter(ctx, opts.Prefix, opts.AllowForward); err != nil {
			return nil, err
		}
		p.filtered = true
	}
	for i := 0; i < opts.Size; i++ {
		n, err := p.create(ctx)
		if err != nil {
			_ = p.Close(context.WithoutCancel(ctx))
			return nil, err
		}
		p.free = append(p.free, n)
	}
	return p, nil
}

// Prefix returns the name prefix of this pool's namespaces and veths.
func (p *Pool) Prefix() string { return p.opts.Prefix }

// Get returns a ready Net, creating one if none is free.
func (p *Pool) Get(ctx context.Context) (*Net, error) {
	p.mu.Lock()
	if p.closed {
		p.mu.Unlock()
		return nil, ErrClosed
	}
	if k := len(p.free); k > 0 {
		n := p.free[k-1]
		p.free = p.free[:k-1]
		p.used[n.Index] = n
		p.mu.Unlock()
		return n, nil
	}
	p.mu.Unlock()
	n, err := p.create(ctx)
	if err != nil {
		return nil, err
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		p.destroy(n)
		return nil, ErrClosed
	}
	p.used[n.Index] = n
	return n, nil
}

// Put returns n to the pool after restoring its configuration (address,
// route, links up). A Net that cannot be restored is destroyed. Put of a Net
// not handed out by this pool, or Put twice, is an error.
func (p *Pool) Put(ctx context.Context, n *Net) error {
	if n == nil {
		return errors.New("netpool: Put of a nil Net")
	}
	p.mu.Lock()
	if p.used[n.Index] != n {
		p.mu.Unlock()
		return fmt.Errorf("netpool: Put of net %q that is not in use", n.Name)
	}
	delete(p.used, n.Index)
	closed := p.closed
	p.mu.Unlock()
	if closed {
		p.destroy(n)
		return nil
	}
	if err := p.configure(n); err != nil {
		p.log.Warn("net cannot be reset, destroying it", "net", n.Name, "err", err)
		p.destroy(n)
		p.releaseIndex(n.Index)
		return fmt.Errorf("netpool: reset net %q: %w", n.Name, err)
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		p.destroy(n)
		return nil
	}
	p.free = append(p.free, n)
	return nil
}

// Close destroys every Net of the pool, free or in use. Later Gets fail;
// later Puts destroy their Net.
func (p *Pool) Close(ctx context.Context) error {
	p.mu.Lock()
	p.closed = true
	filtered := p.filtered
	p.filtered = false
	all := append([]*Net(nil), p.free...)
	for _, n := range p.used {
		all = append(all, n)
	}
	p.free = nil
	p.used = map[int]*Net{}
	p.mu.Unlock()
	var errs []error
	for _, n := range all {
		if err := p.destroy(n); err != nil {
			errs = append(errs, err)
		}
	}
	if filtered {
		errs = append(errs, removeFilter(ctx, p.opts.Prefix))
	}
	return errors.Join(errs...)
}

// Cleanup removes every namespace and host veth named "<prefix>-*" — what a
// previous daemon run left behind, stacked or hidden mounts included
// (DeleteNamed). Call it before New.
func Cleanup(ctx context.Context, prefix string) error {
	if prefix == "" {
		prefix = "vh"
	}
	var errs []error
	names, err := NetnsNames(func(name string) bool { return OwnName(prefix, name) })
	if err != nil {
		errs = append(errs, err)
	}
	for _, name := range names {
		if err := DeleteNamed(name); err != nil {
			errs = append(errs, err)
		}
	}
	links, err := listLinks()
	if err != nil {
		errs = append(errs, fmt.Errorf("netpool: list links: %w", err))
	}
	for _, l := range links {
		if l.Type() == "veth" && OwnName(prefix, l.Attrs().Name) {
			if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
				errs = append(errs, fmt.Errorf("netpool: delete veth %q: %w", l.Attrs().Name, err))
			}
		}
	}
	errs = append(errs, removeFilter(ctx, prefix))
	return errors.Join(errs...)
}

// Leftovers lists the namespaces and host veths named "<prefix>-*" that
// exist now, a namespace with what is wrong with it if it is not a single
// nsfs mount (NetnsProblem), and one hidden under a later mount of NetnsDir
// too. Tests use it to check that nothing leaked.
func Leftovers(prefix string) ([]string, error) {
	var out []string
	names, err := NetnsNames(func(name string) bool { return OwnName(prefix, name) })
	if err != nil {
		return nil, err
	}
	for _, name := range names {
		if p := NetnsProblem(name); p != "" {
			out = append(out, fmt.Sprintf("netns %s (%s)", name, p))
		} else {
			out = append(out, "netns "+name)
		}
	}
	links, err := listLinks()
	if err != nil {
		return nil, fmt.Errorf("netpool: list links: %w", err)
	}
	for _, l := range links {
		if OwnName(prefix, l.Attrs().Name) {
			out = append(out, "link "+l.Attrs().Name)
		}
	}
	return out, nil
}

// listLinks lists the host's links. A dump that another process changed
// the link table during is reported as interrupted (its result may be
// incomplete); it is taken again: on a busy node other daemons and
// container runtimes create and delete veths all the time.
func listLinks() ([]netlink.Link, error) {
	var err error
	for try := 0; try < 20; try++ {
		var links []netlink.Link
		links, err = netlink.LinkList()
		if !errors.Is(err, netlink.ErrDumpInterrupted) {
			return links, err
		}
		time.Sleep(time.Duration(try+1) * 5 * time.Millisecond)
	}
	return nil, err
}

// OwnName reports whether name (a network namespace or host-side veth) is
// one a pool with prefix makes: "<prefix>-<n>".
func OwnName(prefix, name string) bool {
	rest, ok := strings.CutPrefix(name, prefix+"-")
	if !ok || rest == "" {
		return false
	}
	_, err := strconv.Atoi(rest)
	return err == nil
}

func (p *Pool) allocIndex() (int, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if k := len(p.freeIx); k > 0 {
		ix := p.freeIx[k-1]
		p.freeIx = p.freeIx[:k-1]
		return ix, nil
	}
	if p.nextIx > p.maxIx {
		return 0, fmt.Errorf("netpool: subnet %s exhausted (%d nets)", p.opts.Subnet, p.maxIx+1)
	}
	ix := p.nextIx
	p.nextIx++
	return ix, nil
}

func (p *Pool) releaseIndex(ix int) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.freeIx = append(p.freeIx, ix)
}

func (p *Pool) newNet(ix int) *Net {
	base := p.opts.Subnet.Addr().As4()
	v := uint32(base[0])<<24 | uint32(base[1])<<16 | uint32(base[2])<<8 | uint32(base[3])
	v += uint32(ix) * 4
	addr := func(off uint32) netip.Addr {
		x := v + off
		return netip.AddrFrom4([4]byte{byte(x >> 24), byte(x >> 16), byte(x >> 8), byte(x)})
	}
	name := p.opts.Prefix + "-" + strconv.Itoa(ix)
	return &Net{
		Index:   ix,
		Name:    name,
		NsPath:  filepath.Join(NetnsDir, name),
		HostIf:  name,
		GuestIf: GuestIfName,
		Gateway: addr(1),
		GuestIP: addr(2),
		Bits:    30,
	}
}

// create makes the namespace and veth pair of a new Net; on error it removes
// what it made.
func (p *Pool) create(ctx context.Context) (n *Net, retErr error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	ix, err := p.allocIndex()
	if err != nil {
		return nil, err
	}
	n = p.newNet(ix)
	// Not the named result: every error return sets that to nil.
	made := n
	defer func() {
		if retErr != nil {
			_ = p.destroy(made)
			p.releaseIndex(ix)
		}
	}()
	// A stale namespace or veth of the same name (crashed daemon that was
	// not cleaned up) would make creation fail; remove it first.
	if _, err := os.Stat(n.NsPath); err == nil {
		p.log.Warn("removing stale netns", "netns", n.Name)
		if err := DeleteNamed(n.Name); err != nil {
			return nil, err
		}
	}
	if l, err := netlink.LinkByName(n.HostIf); err == nil {
		p.log.Warn("removing stale veth", "veth", n.HostIf)
		// Deleting the stale netns above may take its veth with it at
		// any moment: gone is what we want.
		if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
			return nil, fmt.Errorf("netpool: delete stale veth %q: %w", n.HostIf, err)
		}
	}
	ns, err := newNamedNetns(n.Name)
	if err != nil {
		return nil, err
	}
	defer ns.Close()
	veth := &netlink.Veth{
		LinkAttrs:     netlink.LinkAttrs{Name: n.HostIf},
		PeerName:      n.GuestIf,
		PeerNamespace: netlink.NsFd(int(ns)),
	}
	if err := netlink.LinkAdd(veth); err != nil {
		return nil, fmt.Errorf("netpool: create veth %q: %w", n.HostIf, err)
	}
	if err := p.configure(n); err != nil {
		return nil, err
	}
	return n, nil
}

// configure (re)applies addresses, routes and link state on both sides. It
// is idempotent.
func (p *Pool) configure(n *Net) error {
	host, err := netlink.LinkByName(n.HostIf)
	if err != nil {
		return fmt.Errorf("netpool: find veth %q: %w", n.HostIf, err)
	}
	hostAddr := &netlink.Addr{IPNet: ipNet(n.Gateway, n.Bits)}
	if err := netlink.AddrReplace(host, hostAddr); err != nil {
		return fmt.Errorf("netpool: address %s on %q: %w", n.Gateway, n.HostIf, err)
	}
	if err := netlink.LinkSetUp(host); err != nil {
		return fmt.Errorf("netpool: set %q up: %w", n.HostIf, err)
	}

	ns, err := netns.GetFromPath(n.NsPath)
	if err != nil {
		return fmt.Errorf("netpool: open netns %q: %w", n.NsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netpool: netlink handle in netns %q: %w", n.Name, err)
	}
	defer h.Close()
	lo, err := h.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("netpool: find lo in netns %q: %w", n.Name, err)
	}
	if err := h.LinkSetUp(lo); err != nil {
		return fmt.Errorf("netpool: set lo up in netns %q: %w", n.Name, err)
	}
	guest, err := h.LinkByName(n.GuestIf)
	if err != nil {
		return fmt.Errorf("netpool: find %q in netns %q: %w", n.GuestIf, n.Name, err)
	}
	if err := h.AddrReplace(guest, &netlink.Addr{IPNet: ipNet(n.GuestIP, n.Bits)}); err != nil {
		return fmt.Errorf("netpool: address %s on %q in netns %q: %w", n.GuestIP, n.GuestIf, n.Name, err)
	}
	if err := h.LinkSetUp(guest); err != nil {
		return fmt.Errorf("netpool: set %q up in netns %q: %w", n.GuestIf, n.Name, err)
	}
	route := &netlink.Route{
		LinkIndex: guest.Attrs().Index,
		Dst:       &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)},
		Gw:        net.IP(n.Gateway.AsSlice()),
	}
	if err := h.RouteReplace(route); err != nil {
		return fmt.Errorf("netpool: default route via %s in netns %q: %w", n.Gateway, n.Name, err)
	}
	return nil
}

// destroy removes the namespace and the host veth of n (the peer goes with
// the namespace). Missing pieces are not errors.
func (p *Pool) destroy(n *Net) error {
	var errs []error
	if l, err := netlink.LinkByName(n.HostIf); err == nil {
		if err := netlink.LinkDel(l); err != nil && !isNotFound(err) {
			errs = append(errs, fmt.Errorf("netpool: delete veth %q: %w", n.HostIf, err))
		}
	}
	if err := DeleteNamed(n.Name); err != nil {
		errs = append(errs, err)
	}
	return errors.Join(errs...)
}

func ipNet(a netip.Addr, bits int) *net.IPNet {
	return &net.IPNet{IP: net.IP(a.AsSlice()), Mask: net.CIDRMask(bits, 32)}
}

func isNotFound(err error) bool {
	var lnf netlink.LinkNotFoundError
	return errors.As(err, &lnf) || errors.Is(err, unix.ENODEV) || errors.Is(err, unix.ENOENT)
}
