package microvm

import (
	"errors"
	"fmt"
	"os"
	"runtime"

	"golang.org/x/sys/unix"
)

// recordDevice is a read-only loop device over a snapshot's memory file,
// made for one REAP record restore: QEMU maps the device instead of the
// file, so the guest's faults fill the device's own page cache (empty when
// attached: no eviction of the file needed, no other restore's pages mixed
// in) and the device's read-ahead is set to 0 — a setting of this device
// only, put back before it is released. Direct I/O keeps the reads out of
// the file's page cache (no double caching).
type recordDevice struct {
	f       *os.File // keeps the device bound (autoclear) until released
	path    string
	savedRA int
}

// maxLoopTries bounds the race with other users of /dev/loop-control
// between LOOP_CTL_GET_FREE and LOOP_CONFIGURE.
const maxLoopTries = 8

// attachRecordDevice binds mem (read-only) to a free loop device. It
// fails where the no-hugepage launcher cannot run QEMU (not x86_64): the
// advice would make the record read 4 MiB per fault.
func attachRecordDevice(mem string) (_ *recordDevice, retErr error) {
	if runtime.GOARCH != "amd64" {
		return nil, fmt.Errorf("the no-hugepage seccomp filter is built for x86_64 only, not %s", runtime.GOARCH)
	}
	backing, err := os.OpenFile(mem, os.O_RDONLY|unix.O_DIRECT, 0)
	if err != nil {
		// A file system without O_DIRECT: buffered.
		if backing, err = os.Open(mem); err != nil {
			return nil, err
		}
	}
	defer backing.Close()
	ctl, err := os.OpenFile("/dev/loop-control", os.O_RDWR, 0)
	if err != nil {
		return nil, fmt.Errorf("loop device: %w", err)
	}
	defer ctl.Close()
	for try := 0; ; try++ {
		n, err := unix.IoctlRetInt(int(ctl.Fd()), unix.LOOP_CTL_GET_FREE)
		if err != nil {
			return nil, fmt.Errorf("loop device: LOOP_CTL_GET_FREE: %w", err)
		}
		path := fmt.Sprintf("/dev/loop%d", n)
		dev, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			return nil, fmt.Errorf("loop device: %w", err)
		}
		cfg := unix.LoopConfig{Fd: uint32(backing.Fd()), Size: 4096}
		cfg.Info.Flags = unix.LO_FLAGS_READ_ONLY | unix.LO_FLAGS_AUTOCLEAR | unix.LO_FLAGS_DIRECT_IO
		if err := unix.IoctlLoopConfigure(int(dev.Fd()), &cfg); err != nil {
			dev.Close()
			if errors.Is(err, unix.EBUSY) && try < maxLoopTries {
				continue // taken meanwhile by someone else
			}
			return nil, fmt.Errorf("loop device: configure %s over %s: %w", path, mem, err)
		}
		d := &recordDevice{f: dev, path: path}
		ra, err := unix.IoctlGetInt(int(dev.Fd()), unix.BLKRAGET)
		if err == nil {
			d.savedRA = ra
			err = unix.IoctlSetInt(int(dev.Fd()), unix.BLKRASET, 0)
		}
		if err != nil {
			d.release()
			return nil, fmt.Errorf("loop device %s: read-ahead: %w", path, err)
		}
		return d, nil
	}
}

// release puts the read-ahead back and drops this process's reference;
// the device is unbound when QEMU has closed it too (autoclear).
func (d *recordDevice) release() {
	if d == nil || d.f == nil {
		return
	}
	_ = unix.IoctlSetInt(int(d.f.Fd()), unix.BLKRASET, d.savedRA)
	d.f.Close()
	d.f = nil
}
