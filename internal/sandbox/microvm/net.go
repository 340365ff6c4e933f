package microvm

import (
	"fmt"
	"os"
	"runtime"
	"unsafe"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/netpool"
)

const (
	bridgeName = "vhbr0"
	tapName    = "vhtap0"
	// guestMAC is the same in every guest: each is alone in its netns, and a
	// restored guest keeps the MAC of its snapshot anyway.
	guestMAC = "52:54:00:76:68:01"
)

// plugTap moves n's address off the netns's eth0, bridges eth0 with a new
// tap device and returns the tap's fd for QEMU (the tap disappears when the
// last fd is closed).
func plugTap(n *netpool.Net) (_ *os.File, retErr error) {
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
	eth, err := h.LinkByName(n.GuestIf)
	if err != nil {
		return nil, fmt.Errorf("find %q in netns %q: %w", n.GuestIf, n.Name, err)
	}
	addrs, err := h.AddrList(eth, netlink.FAMILY_ALL)
	if err != nil {
		return nil, fmt.Errorf("addresses of %q in netns %q: %w", n.GuestIf, n.Name, err)
	}
	for _, a := range addrs {
		if a.IP.IsLinkLocalUnicast() {
			continue
		}
		if err := h.AddrDel(eth, &a); err != nil {
			return nil, fmt.Errorf("remove %s from %q in netns %q: %w", a.IPNet, n.GuestIf, n.Name, err)
		}
	}
	br := &netlink.Bridge{LinkAttrs: netlink.LinkAttrs{Name: bridgeName}}
	if err := h.LinkAdd(br); err != nil {
		return nil, fmt.Errorf("create bridge in netns %q: %w", n.Name, err)
	}
	defer func() {
		if retErr != nil {
			_ = h.LinkDel(br)
		}
	}()
	if err := h.LinkSetMaster(eth, br); err != nil {
		return nil, fmt.Errorf("bridge %q in netns %q: %w", n.GuestIf, n.Name, err)
	}
	tap, err := openTap(ns, tapName)
	if err != nil {
		return nil, fmt.Errorf("tap in netns %q: %w", n.Name, err)
	}
	defer func() {
		if retErr != nil {
			tap.Close()
		}
	}()
	tl, err := h.LinkByName(tapName)
	if err != nil {
		return nil, fmt.Errorf("find tap in netns %q: %w", n.Name, err)
	}
	if err := h.LinkSetMaster(tl, br); err != nil {
		return nil, fmt.Errorf("bridge the tap in netns %q: %w", n.Name, err)
	}
	for _, l := range []netlink.Link{tl, br, eth} {
		if err := h.LinkSetUp(l); err != nil {
			return nil, fmt.Errorf("set %q up in netns %q: %w", l.Attrs().Name, n.Name, err)
		}
	}
	return tap, nil
}

// unplugTap removes the bridge and the tap (eth0 is released); the pool's
// Put then gives eth0 its address back.
func unplugTap(n *netpool.Net) error {
	ns, err := netns.GetFromPath(n.NsPath)
	if err != nil {
		return fmt.Errorf("open netns %q: %w", n.NsPath, err)
	}
	defer ns.Close()
	h, err := netlink.NewHandleAt(ns)
	if err != nil {
		return fmt.Errorf("netlink in netns %q: %w", n.Name, err)
	}
	defer h.Close()
	for _, name := range []string{tapName, bridgeName} {
		if l, err := h.LinkByName(name); err == nil {
			if err := h.LinkDel(l); err != nil {
				return fmt.Errorf("delete %q in netns %q: %w", name, n.Name, err)
			}
		}
	}
	return nil
}

// openTap opens /dev/net/tun from inside ns (a tun file belongs to the
// netns of its opener) and creates the tap device name.
func openTap(ns netns.NsHandle, name string) (*os.File, error) {
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	defer orig.Close()
	if err := netns.Set(ns); err != nil {
		runtime.UnlockOSThread()
		return nil, err
	}
	f, openErr := os.OpenFile("/dev/net/tun", os.O_RDWR|unix.O_CLOEXEC, 0)
	if err := netns.Set(orig); err != nil {
		// This thread is in the wrong netns: never let it run anything else.
		if f != nil {
			f.Close()
		}
		return nil, fmt.Errorf("return to the host netns: %w", err)
	}
	runtime.UnlockOSThread()
	if openErr != nil {
		return nil, openErr
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
