package microvm

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/netpool"
)

// Network for clones (Firecracker's "network for clones"): every guest has
// the same address, guestIP/30, behind a tap whose address is tapIP, and
// the same MAC; clones of one snapshot carry both in their memory, so a
// restore changes nothing in the guest. Each instance's netns makes the
// guest reachable at its own Net.GuestIP, which stays on the netns's eth0:
//
//	root netns              netns <prefix>-<n>
//	<prefix>-<n> (Gateway) ── eth0 (GuestIP)     vhtap0 (tapIP) ── guest eth0 (guestIP)
//	                           DNAT GuestIP → guestIP; ip_forward=1 in this netns only
//
// The nftables table microVMTable in the netns DNATs whatever arrives on
// eth0 for GuestIP to guestIP (conntrack turns the replies' source back into
// GuestIP, so the host sees GuestIP), forwards only those connections and
// their replies, and drops every connection the guest opens: through the
// netns (egress) and to the netns itself. The guest therefore reaches no
// more than a runc or gVisor sandbox (nothing but its own answers; the
// pool's host filter drops the rest anyway). The table goes in while QEMU
// starts (natSetup). Stop removes the table and the tap and sets forwarding
// back as it was, so that the Net returns to the pool as the pool made it.
// Neither the pool's subnet nor any client of a guest may lie in
// guestPrefix (plugTap checks the Net's own addresses).
var (
	guestPrefix = netip.MustParsePrefix("172.16.0.0/30")
	guestIP     = netip.MustParseAddr("172.16.0.2")
	tapIP       = netip.MustParseAddr("172.16.0.1")
)

const (
	tapName = "vhtap0"
	// guestMAC and tapMAC are the same in every instance: each is alone in
	// its netns, and a restored guest keeps both in its memory (its ARP
	// cache holds tapMAC for tapIP).
	guestMAC = "52:54:00:76:68:01"
	tapMAC   = "52:54:00:76:68:00"
	// microVMTable is the nftables table (family inet) in the instance
	// netns.
	microVMTable = "vhive-microvm"
	// ipForward is the per-netns IPv4 forwarding switch; it names the
	// netns of the thread that opens it.
	ipForward = "/proc/sys/net/ipv4/ip_forward"
)

// guestNetDesc names the guest's network for RuntimeVersion: a snapshot
// taken with another address would be unreachable after a restore.
func guestNetDesc() string {
	return fmt.Sprintf("guest %s/%d via %s", guestIP, guestPrefix.Bits(), tapIP)
}

// natRuleset is the instance netns's table for n.
func natRuleset(n *netpool.Net) string {
	return fmt.Sprintf(`add table inet %[1]s
delete table inet %[1]s
table inet %[1]s {
	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		iifname %[2]q ip daddr %[3]s dnat ip to %[4]s
	}
	chain forward {
		type filter hook forward priority filter; policy drop;
		ct state established,related accept
		iifname %[2]q oifname %[5]q ip daddr %[4]s ct status dnat accept
		counter
	}
	chain input {
		type filter hook input priority filter; policy accept;
		iifname %[5]q ct state established,related accept
		iifname %[5]q counter drop
	}
}
`, microVMTable, n.GuestIf, n.GuestIP, guestIP, tapName)
}

// plugTap creates the tap (tapIP, tapMAC) in n's netns and returns its fd
// for QEMU (the tap disappears when the last fd is closed). On error it
// leaves no tap behind. The NAT is natUp's.
func plugTap(n *netpool.Net) (_ *os.File, retErr error) {
	if guestPrefix.Contains(n.GuestIP) || guestPrefix.Contains(n.Gateway) {
		return nil, fmt.Errorf("net %q (%s, gateway %s) overlaps the guests' own %s: choose another netpool subnet", n.Name, n.GuestIP, n.Gateway, guestPrefix)
	}
	ns, err := netns.GetFromPath(n.NsPath)
	if err != nil {
		return nil, fmt.Errorf("open netns %q: %w", n.NsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return nil, fmt.Errorf("netlink in netns %q: %w", n.Name, err)
	}
	defer h.Close()
	tap, err := openTap(ns, tapName)
	if err != nil {
		return nil, fmt.Errorf("tap in netns %q: %w", n.Name, err)
	}
	defer func() {
		if retErr != nil {
			tap.Close() // the last fd: the tap goes with it
		}
	}()
	tl, err := h.LinkByName(tapName)
	if err != nil {
		return nil, fmt.Errorf("find tap in netns %q: %w", n.Name, err)
	}
	mac, _ := net.ParseMAC(tapMAC)
	if err := h.LinkSetHardwareAddr(tl, mac); err != nil {
		return nil, fmt.Errorf("tap MAC in netns %q: %w", n.Name, err)
	}
	addr := &netlink.Addr{IPNet: &net.IPNet{IP: net.IP(tapIP.AsSlice()), Mask: net.CIDRMask(guestPrefix.Bits(), 32)}}
	if err := h.AddrAdd(tl, addr); err != nil {
		return nil, fmt.Errorf("address %s on the tap in netns %q: %w", addr.IPNet, n.Name, err)
	}
	if err := h.LinkSetUp(tl); err != nil {
		return nil, fmt.Errorf("set the tap up in netns %q: %w", n.Name, err)
	}
	return tap, nil
}

// natSetup is natUp running in the background: it costs a run of nft
// (≈15 ms), which overlaps QEMU's start instead of adding to a cold start.
// Until it is done the netns forwards nothing (forwarding is off in a pool's
// netns, and natUp turns it on only after the table is in), so a guest
// that runs already reaches nothing it could not reach later; nobody dials
// the guest before Start or Restore returns, which wait for it (launch).
type natSetup struct {
	done      chan struct{}
	fwdBefore string // the netns's ip_forward before natUp
	err       error
}

// startNAT runs natUp for n in the background.
func startNAT(ctx context.Context, n *netpool.Net) *natSetup {
	ns := &natSetup{done: make(chan struct{})}
	go func() {
		defer close(ns.done)
		ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		ns.fwdBefore, ns.err = natUp(ctx, n)
	}()
	return ns
}

// wait returns natUp's error once it has finished.
func (ns *natSetup) wait() error {
	<-ns.done
	return ns.err
}

// natUp installs the NAT table in n's netns and then turns forwarding on
// there. It returns the forwarding setting it found (for unplugTap).
func natUp(ctx context.Context, n *netpool.Net) (fwdBefore string, err error) {
	ns, err := netns.GetFromPath(n.NsPath)
	if err != nil {
		return "", fmt.Errorf("open netns %q: %w", n.NsPath, err)
	}
	defer ns.Close()
	err = inNetns(ns, func() error {
		b, err := os.ReadFile(ipForward)
		if err != nil {
			return err
		}
		fwdBefore = strings.TrimSpace(string(b))
		if err := runNft(ctx, natRuleset(n)); err != nil {
			return err
		}
		return os.WriteFile(ipForward, []byte("1\n"), 0)
	})
	if err != nil {
		return fwdBefore, fmt.Errorf("NAT to the guest in netns %q: %w", n.Name, err)
	}
	return fwdBefore, nil
}

// unplugTap undoes plugTap and natUp in n's netns: forwarding as it was
// (fwdBefore; "0" when unknown), the table and the tap gone. What is
// already gone is not an error.
func unplugTap(ctx context.Context, n *netpool.Net, fwdBefore string) error {
	if fwdBefore != "1" {
		fwdBefore = "0"
	}
	// Teardown runs to the end even when the caller gave up.
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
	defer cancel()
	ns, err := netns.GetFromPath(n.NsPath)
	if err != nil {
		return fmt.Errorf("open netns %q: %w", n.NsPath, err)
	}
	defer ns.Close()
	var errs []error
	err = inNetns(ns, func() error {
		return errors.Join(
			os.WriteFile(ipForward, []byte(fwdBefore+"\n"), 0),
			runNft(ctx, fmt.Sprintf("add table inet %[1]s\ndelete table inet %[1]s\n", microVMTable)))
	})
	if err != nil {
		errs = append(errs, fmt.Errorf("remove the NAT in netns %q: %w", n.Name, err))
	}
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return errors.Join(append(errs, fmt.Errorf("netlink in netns %q: %w", n.Name, err))...)
	}
	defer h.Close()
	if l, err := h.LinkByName(tapName); err == nil {
		if err := h.LinkDel(l); err != nil && !errors.Is(err, unix.ENODEV) {
			errs = append(errs, fmt.Errorf("delete %q in netns %q: %w", tapName, n.Name, err))
		}
	}
	return errors.Join(errs...)
}

// inNetns runs f on a thread of its own that has entered ns. That thread
// is never handed back to the Go scheduler (it ends with the goroutine), so
// no other code ever runs in ns by accident. Processes f starts are in ns.
func inNetns(ns netns.NsHandle, f func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with this goroutine
		if err := netns.Set(ns); err != nil {
			errc <- fmt.Errorf("enter netns: %w", err)
			return
		}
		errc <- f()
	}()
	return <-errc
}

// runNft applies an nft script (nft -f -) in the netns of the calling
// thread.
func runNft(ctx context.Context, script string) error {
	path, err := exec.LookPath("nft")
	if err != nil {
		for _, p := range []string{"/usr/sbin/nft", "/sbin/nft"} {
			if _, e := os.Stat(p); e == nil {
				path, err = p, nil
				break
			}
		}
	}
	if err != nil {
		return fmt.Errorf("the microvm network needs nft (apt-get install nftables): %w", err)
	}
	cmd := exec.CommandContext(ctx, path, "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("nft: %w: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// openTap opens /dev/net/tun from inside ns (a tun file belongs to the
// netns of its opener) and creates the tap device name.
func openTap(ns netns.NsHandle, name string) (*os.File, error) {
	var f *os.File
	err := inNetns(ns, func() error {
		var err error
		f, err = os.OpenFile("/dev/net/tun", os.O_RDWR|unix.O_CLOEXEC, 0)
		return err
	})
	if err != nil {
		return nil, err
	}
	var ifr [unix.IFNAMSIZ + 64]byte
	copy(ifr[:], name)
	*(*uint16)(unsafe.Pointer(&ifr[unix.IFNAMSIZ])) = unix.IFF_TAP | unix.IFF_NO_PI
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), unix.TUNSETIFF, uintptr(unsafe.Pointer(&ifr[0]))); e != 0 {
		f.Close()
		return nil, fmt.Errorf("TUNSETIFF %s: %w", name, e)
	}
	return f, nil
}
