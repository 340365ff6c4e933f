// Package uffd is a thin, allocation-free wrapper around Linux userfaultfd(2)
// for the memory manager: creating a userfaultfd (non-blocking, close-on-exec),
// the UFFDIO_API handshake, registering a range in MISSING mode, and the
// ioctls a page server needs (UFFDIO_COPY, UFFDIO_ZEROPAGE, UFFDIO_WAKE),
// plus decoding struct uffd_msg events.
//
// golang.org/x/sys/unix has no userfaultfd constants, so the ioctl numbers
// and struct layouts of include/uapi/linux/userfaultfd.h are spelled out
// here (they are part of the stable kernel ABI; amd64 and arm64 agree).
//
// A process must never serve its own faults: a goroutine blocked on a
// missing page cannot be preempted, so the Go runtime's stop-the-world would
// wait for it forever. The registering process hands the fd to a separate
// page-server process (package memory does that over a unix socket).
package uffd

import (
	"errors"
	"fmt"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// ioctl numbers: _IOC(dir, 0xAA, nr, size) with dir<<30 | size<<16 | 0xAA<<8 | nr.
const (
	ioctlAPI      = 0xC018AA3F // _IOWR(UFFDIO, 0x3F, struct uffdio_api)      (24 bytes)
	ioctlRegister = 0xC020AA00 // _IOWR(UFFDIO, 0x00, struct uffdio_register) (32 bytes)
	ioctlWake     = 0x8010AA02 // _IOR(UFFDIO, 0x02, struct uffdio_range)     (16 bytes)
	ioctlCopy     = 0xC028AA03 // _IOWR(UFFDIO, 0x03, struct uffdio_copy)     (40 bytes)
	ioctlZeropage = 0xC020AA04 // _IOWR(UFFDIO, 0x04, struct uffdio_zeropage) (32 bytes)
	ioctlDevNew   = 0xAA00     // USERFAULTFD_IOC_NEW on /dev/userfaultfd: _IO(0xAA, 0x00)

	apiVersion = 0xAA // UFFD_API

	registerModeMissing = 1 << 0 // UFFDIO_REGISTER_MODE_MISSING
)

// Features requested in the UFFDIO_API handshake (UFFD_FEATURE_*).
const (
	FeatureEventFork   uint64 = 1 << 1
	FeatureEventRemap  uint64 = 1 << 2
	FeatureEventRemove uint64 = 1 << 3
	FeatureEventUnmap  uint64 = 1 << 6
	FeatureThreadID    uint64 = 1 << 8
)

// Mode bits for Copy and ZeroPage.
const (
	// ModeDontWake installs the pages without waking the threads waiting
	// on them; a later Wake over the range does that in one go.
	ModeDontWake uint64 = 1 << 0
)

// Event kinds in Msg.Event (UFFD_EVENT_*).
const (
	EventPagefault uint8 = 0x12
	EventFork      uint8 = 0x13
	EventRemap     uint8 = 0x14
	EventRemove    uint8 = 0x15
	EventUnmap     uint8 = 0x16
)

// Page-fault flags in Msg.Flags (UFFD_PAGEFAULT_FLAG_*).
const (
	PagefaultWrite uint64 = 1 << 0
	PagefaultWP    uint64 = 1 << 1
	PagefaultMinor uint64 = 1 << 2
)

// MsgSize is sizeof(struct uffd_msg).
const MsgSize = 32

type apiArg struct {
	API      uint64
	Features uint64
	Ioctls   uint64
}

type rangeArg struct {
	Start uint64
	Len   uint64
}

type registerArg struct {
	Range  rangeArg
	Mode   uint64
	Ioctls uint64
}

type copyArg struct {
	Dst  uint64
	Src  uint64
	Len  uint64
	Mode uint64
	Copy int64
}

type zeropageArg struct {
	Range    rangeArg
	Mode     uint64
	Zeropage int64
}

// Msg is one decoded struct uffd_msg.
type Msg struct {
	Event uint8
	// Pagefault: Flags and Address (the faulting address, page aligned
	// unless UFFD_FEATURE_EXACT_ADDRESS was requested).
	Flags   uint64
	Address uint64
	// Remove/Unmap: [Start, End). Remap: From=Start, To=End, Len.
	Start uint64
	End   uint64
	Len   uint64
}

// FD is a userfaultfd file descriptor. The zero value is not usable; build
// one with New or Wrap. FD is not safe for concurrent Close with other
// methods; the ioctls themselves may be issued from several goroutines.
type FD struct {
	fd int
}

// New creates a userfaultfd with O_NONBLOCK|O_CLOEXEC (poll(2) on a blocking
// uffd reports POLLERR), first through the userfaultfd(2) syscall and, if
// that is refused (vm.unprivileged_userfaultfd=0 without CAP_SYS_PTRACE),
// through /dev/userfaultfd. It then performs UFFDIO_API requesting features
// and fails naming any feature the kernel does not offer.
func New(features uint64) (*FD, error) {
	flags := unix.O_NONBLOCK | unix.O_CLOEXEC
	r, _, errno := unix.Syscall(unix.SYS_USERFAULTFD, uintptr(flags), 0, 0)
	fd := int(r)
	if errno != 0 {
		dev, err := unix.Open("/dev/userfaultfd", unix.O_RDWR|unix.O_CLOEXEC, 0)
		if err != nil {
			return nil, fmt.Errorf("create userfaultfd: syscall: %w; /dev/userfaultfd: %w", errno, err)
		}
		r, _, errno2 := unix.Syscall(unix.SYS_IOCTL, uintptr(dev), ioctlDevNew, uintptr(flags))
		unix.Close(dev)
		if errno2 != 0 {
			return nil, fmt.Errorf("create userfaultfd: syscall: %w; /dev/userfaultfd USERFAULTFD_IOC_NEW: %w", errno, errno2)
		}
		fd = int(r)
	}
	u := &FD{fd: fd}
	arg := apiArg{API: apiVersion, Features: features}
	if err := u.ioctl(ioctlAPI, unsafe.Pointer(&arg)); err != nil {
		u.Close()
		return nil, fmt.Errorf("UFFDIO_API (features %#x): %w", features, err)
	}
	if missing := features &^ arg.Features; missing != 0 {
		u.Close()
		return nil, fmt.Errorf("UFFDIO_API: kernel lacks features %#x", missing)
	}
	return u, nil
}

// Wrap adopts fd, a userfaultfd on which another process already did
// UFFDIO_API and REGISTER (received over SCM_RIGHTS). It checks that fd is a
// userfaultfd and makes it non-blocking. Close closes fd.
func Wrap(fd int) (*FD, error) {
	link, err := os.Readlink(fmt.Sprintf("/proc/self/fd/%d", fd))
	if err != nil {
		return nil, fmt.Errorf("inspect fd %d: %w", fd, err)
	}
	if link != "anon_inode:[userfaultfd]" {
		return nil, fmt.Errorf("fd %d is %q, not a userfaultfd", fd, link)
	}
	if err := unix.SetNonblock(fd, true); err != nil {
		return nil, fmt.Errorf("set fd %d non-blocking: %w", fd, err)
	}
	return &FD{fd: fd}, nil
}

// Int returns the file descriptor number (for SCM_RIGHTS and poll).
func (u *FD) Int() int { return u.fd }

// Close closes the descriptor. Further calls do nothing.
func (u *FD) Close() error {
	if u.fd < 0 {
		return nil
	}
	err := unix.Close(u.fd)
	u.fd = -1
	return err
}

func (u *FD) ioctl(req uintptr, arg unsafe.Pointer) error {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(u.fd), req, uintptr(arg))
	if errno != 0 {
		return errno
	}
	return nil
}

// Register registers [addr, addr+length) of the calling process in MISSING
// mode. addr and length must be page aligned.
func (u *FD) Register(addr, length uintptr) error {
	arg := registerArg{Range: rangeArg{Start: uint64(addr), Len: uint64(length)}, Mode: registerModeMissing}
	if err := u.ioctl(ioctlRegister, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("UFFDIO_REGISTER [%#x, +%#x): %w", addr, length, err)
	}
	return nil
}

// Copy atomically installs length bytes from src (in the calling process)
// at dst (in the registered process) with UFFDIO_COPY. It returns the bytes
// installed, which may be less than length together with an error:
// unix.EEXIST (a page in the range is already present), unix.EAGAIN (the
// mapping changed: drain events and retry), unix.ESRCH (the registered
// process's address space is gone).
func (u *FD) Copy(dst, src uintptr, length uint64, mode uint64) (uint64, error) {
	arg := copyArg{Dst: uint64(dst), Src: uint64(src), Len: length, Mode: mode}
	err := u.ioctl(ioctlCopy, unsafe.Pointer(&arg))
	if arg.Copy > 0 {
		return uint64(arg.Copy), err
	}
	if err == nil && arg.Copy < 0 {
		err = unix.Errno(-arg.Copy)
	}
	return 0, err
}

// ZeroPage maps zero pages over [dst, dst+length) with UFFDIO_ZEROPAGE. The
// results are as for Copy.
func (u *FD) ZeroPage(dst uintptr, length uint64, mode uint64) (uint64, error) {
	arg := zeropageArg{Range: rangeArg{Start: uint64(dst), Len: length}, Mode: mode}
	err := u.ioctl(ioctlZeropage, unsafe.Pointer(&arg))
	if arg.Zeropage > 0 {
		return uint64(arg.Zeropage), err
	}
	if err == nil && arg.Zeropage < 0 {
		err = unix.Errno(-arg.Zeropage)
	}
	return 0, err
}

// Wake wakes the threads waiting on faults in [addr, addr+length).
func (u *FD) Wake(addr uintptr, length uint64) error {
	arg := rangeArg{Start: uint64(addr), Len: length}
	if err := u.ioctl(ioctlWake, unsafe.Pointer(&arg)); err != nil {
		return fmt.Errorf("UFFDIO_WAKE [%#x, +%#x): %w", addr, length, err)
	}
	return nil
}

// Read reads pending events into msgs and returns how many it decoded. With
// nothing pending it returns 0 and no error (the fd is non-blocking); poll
// for readability first.
func (u *FD) Read(msgs []Msg) (int, error) {
	if len(msgs) == 0 {
		return 0, nil
	}
	var buf [64 * MsgSize]byte
	n := min(len(msgs), 64) * MsgSize
	for {
		r, err := unix.Read(u.fd, buf[:n])
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if errors.Is(err, unix.EAGAIN) {
			return 0, nil
		}
		if err != nil {
			return 0, fmt.Errorf("read userfaultfd: %w", err)
		}
		cnt := r / MsgSize
		for i := range cnt {
			msgs[i] = DecodeMsg(buf[i*MsgSize : (i+1)*MsgSize])
		}
		return cnt, nil
	}
}

// DecodeMsg decodes one struct uffd_msg (len(b) >= MsgSize, host byte order
// little-endian as on every platform vhive targets).
func DecodeMsg(b []byte) Msg {
	_ = b[MsgSize-1]
	le := func(o int) uint64 {
		return uint64(b[o]) | uint64(b[o+1])<<8 | uint64(b[o+2])<<16 | uint64(b[o+3])<<24 |
			uint64(b[o+4])<<32 | uint64(b[o+5])<<40 | uint64(b[o+6])<<48 | uint64(b[o+7])<<56
	}
	m := Msg{Event: b[0]}
	switch m.Event {
	case EventPagefault:
		m.Flags = le(8)
		m.Address = le(16)
	case EventRemove, EventUnmap:
		m.Start, m.End = le(8), le(16)
	case EventRemap:
		m.Start, m.End, m.Len = le(8), le(16), le(24)
	}
	return m
}
