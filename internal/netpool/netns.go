package netpool

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
)

// Named network namespaces are nsfs bind mounts on empty files in
// NetnsDir. iproute2 (`ip netns add`) first makes NetnsDir a shared mount
// point of its own: when it is not one yet, it binds the directory onto
// itself recursively (MS_BIND|MS_REC) and marks it shared. A namespace
// bound while NetnsDir was still a plain directory is copied into that new
// mount, and the original stays below it, hidden: deleting the name then
// unmounts the copy only, unlink fails with EBUSY (the file is still a
// mount point in this mount namespace, under the cover), and what remains
// visible is a plain file that `ip netns exec` cannot enter ("Invalid
// argument") and `ip netns del` cannot remove. So a pool makes NetnsDir a
// shared mount point itself before it binds anything there
// (EnsureNetnsDir), and DeleteNamed removes every layer.

// maxLayers bounds the unmount loops: no tool stacks this many mounts.
const maxLayers = 64

// nsGetNstype is the NS_GET_NSTYPE ioctl (linux/nsfs.h): the CLONE_NEW*
// type of the namespace an nsfs file refers to.
const nsGetNstype = 0xb703

// realNetnsDir is NetnsDir with symlinks resolved (/var/run is usually a
// link to /run), as the mount table names it.
func realNetnsDir() string {
	if p, err := filepath.EvalSymlinks(NetnsDir); err == nil {
		return p
	}
	if p, err := filepath.EvalSymlinks(filepath.Dir(NetnsDir)); err == nil {
		return filepath.Join(p, filepath.Base(NetnsDir))
	}
	return NetnsDir
}

// mountsAt returns the mounts whose mount point is path (resolved), hidden
// ones included, in mount-table order.
func mountsAt(path string) ([]mountinfo.Mount, error) {
	all, err := mountinfo.All()
	if err != nil {
		return nil, err
	}
	var out []mountinfo.Mount
	for _, m := range all {
		if m.Point == path {
			out = append(out, m)
		}
	}
	return out, nil
}

// EnsureNetnsDir creates NetnsDir and makes it a shared mount point of its
// own, as iproute2 does, so that no later `ip netns add` stacks a
// recursive self-bind over namespaces already bound there. If NetnsDir is
// not a mount point but something is mounted below it (namespaces another
// tool bound to the plain directory), it is left as it is: binding over
// them would hide them from their owner. DeleteNamed copes with the stack
// such a directory may get later.
func EnsureNetnsDir() error {
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		return fmt.Errorf("netpool: create %s: %w", NetnsDir, err)
	}
	err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, "")
	if err == nil {
		return nil
	}
	if !errors.Is(err, unix.EINVAL) {
		return fmt.Errorf("netpool: make %s shared: %w", NetnsDir, err)
	}
	// EINVAL: not a mount point yet.
	all, err := mountinfo.All()
	if err != nil {
		return fmt.Errorf("netpool: %w", err)
	}
	dir := realNetnsDir()
	for _, m := range all {
		if strings.HasPrefix(m.Point, dir+"/") {
			return nil
		}
	}
	if err := unix.Mount(NetnsDir, NetnsDir, "none", unix.MS_BIND|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("netpool: bind %s onto itself: %w", NetnsDir, err)
	}
	if err := unix.Mount("", NetnsDir, "none", unix.MS_SHARED|unix.MS_REC, ""); err != nil {
		return fmt.Errorf("netpool: make %s shared: %w", NetnsDir, err)
	}
	return nil
}

// newNamedNetns creates a network namespace bind-mounted at
// NetnsDir/name without moving the calling goroutine's thread into it for
// longer than the creation itself.
func newNamedNetns(name string) (netns.NsHandle, error) {
	if err := EnsureNetnsDir(); err != nil {
		return netns.None(), err
	}
	runtime.LockOSThread()
	orig, err := netns.Get()
	if err != nil {
		runtime.UnlockOSThread()
		return netns.None(), fmt.Errorf("netpool: current netns: %w", err)
	}
	defer orig.Close()
	// NewNamed creates the file with O_EXCL: a name is never bound twice.
	ns, nerr := netns.NewNamed(name)
	// Whatever happened, go back to the original namespace; if that fails
	// the thread stays locked so that Go discards it when this goroutine
	// ends, instead of reusing a thread in the wrong namespace.
	if err := netns.Set(orig); err != nil {
		if ns.IsOpen() {
			ns.Close()
		}
		return netns.None(), fmt.Errorf("netpool: return to the original netns after creating %q: %w", name, err)
	}
	runtime.UnlockOSThread()
	if nerr != nil {
		// netns.NewNamed leaves the mount point file behind when the bind
		// mount fails.
		_ = os.Remove(filepath.Join(NetnsDir, name))
		return netns.None(), fmt.Errorf("netpool: create netns %q: %w", name, nerr)
	}
	return ns, nil
}

// unmountAll detaches every mount visible at path, topmost first, until
// path is no longer a mount point (or does not exist).
func unmountAll(path string) error {
	for range maxLayers {
		err := unix.Unmount(path, unix.MNT_DETACH)
		if errors.Is(err, unix.EINVAL) || errors.Is(err, unix.ENOENT) {
			return nil
		}
		if err != nil {
			return fmt.Errorf("netpool: unmount %s: %w", path, err)
		}
	}
	return fmt.Errorf("netpool: %s is still a mount point after %d unmounts", path, maxLayers)
}

// DeleteNamed removes the named network namespace NetnsDir/name: every
// mount stacked at the path, mounts hidden under a later mount of NetnsDir,
// and the file. A name that does not exist is not an error. The namespace
// itself goes when nothing else holds it.
func DeleteNamed(name string) error {
	if name == "" || strings.ContainsRune(name, '/') || name == "." || name == ".." {
		return fmt.Errorf("netpool: %q is not a namespace name", name)
	}
	path := filepath.Join(NetnsDir, name)
	if err := unmountAll(path); err != nil {
		return err
	}
	uerr := unix.Unlink(path)
	if uerr != nil && !errors.Is(uerr, unix.ENOENT) && !errors.Is(uerr, unix.EBUSY) {
		return fmt.Errorf("netpool: remove netns %q: %w", path, uerr)
	}
	real := filepath.Join(realNetnsDir(), name)
	hidden, err := mountsAt(real)
	if err != nil {
		return fmt.Errorf("netpool: delete netns %q: %w", path, err)
	}
	if !errors.Is(uerr, unix.EBUSY) && len(hidden) == 0 {
		return nil
	}
	// Mounts at path that no unmount of path reaches: they lie under a
	// later mount of NetnsDir. Uncover them in a mount namespace of our
	// own and unlink the file there; the kernel then detaches every mount
	// on it in every mount namespace, this one included.
	if err := unlinkUncovered(path); err != nil {
		return fmt.Errorf("netpool: delete netns %q hidden under a mount of %s: %w", path, NetnsDir, err)
	}
	left, err := mountsAt(real)
	if err != nil {
		return fmt.Errorf("netpool: delete netns %q: %w", path, err)
	}
	if len(left) > 0 {
		return fmt.Errorf("netpool: delete netns %q: %d mounts remain at %s", path, len(left), real)
	}
	if _, err := os.Lstat(path); err == nil {
		return fmt.Errorf("netpool: delete netns %q: the file remains", path)
	}
	return nil
}

// unlinkUncovered unlinks path from a private copy of this mount namespace
// in which it is not a mount point: the mounts at path and, while unlink
// still finds the file busy or missing, the topmost mount of NetnsDir are
// detached there. The copy lives on a thread of its own that is never
// handed back to the Go scheduler, so it ends with that thread and no
// unmount in it reaches another mount namespace (everything in it is made
// private first).
func unlinkUncovered(path string) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread() // never unlocked: the thread exits with this goroutine
		errc <- unlinkInPrivateCopy(path)
	}()
	return <-errc
}

func unlinkInPrivateCopy(path string) error {
	if err := unix.Unshare(unix.CLONE_NEWNS); err != nil {
		return fmt.Errorf("unshare the mount namespace: %w", err)
	}
	if err := unix.Mount("", "/", "", unix.MS_REC|unix.MS_PRIVATE, ""); err != nil {
		return fmt.Errorf("make the private mount namespace's mounts private: %w", err)
	}
	for range maxLayers {
		if err := unmountAll(path); err != nil {
			return err
		}
		err := unix.Unlink(path)
		if err == nil {
			return nil
		}
		if !errors.Is(err, unix.EBUSY) && !errors.Is(err, unix.ENOENT) {
			return fmt.Errorf("remove %s: %w", path, err)
		}
		if uerr := unix.Unmount(NetnsDir, unix.MNT_DETACH); uerr != nil {
			if errors.Is(err, unix.ENOENT) {
				// Nothing left to uncover and no file: what mounts the
				// mount table still lists at path are not on this
				// directory's file; the caller reports them.
				return nil
			}
			return fmt.Errorf("remove %s: %w, and %s has no mount left to uncover: %w", path, err, NetnsDir, uerr)
		}
	}
	return fmt.Errorf("remove %s: still busy after uncovering %d mounts of %s", path, maxLayers, NetnsDir)
}

// NetnsNames returns the names in NetnsDir that match, both those the
// directory lists and those the mount table has a mount for (a mount
// hidden under a later mount of NetnsDir has no entry in the directory one
// sees), sorted.
func NetnsNames(match func(name string) bool) ([]string, error) {
	var out []string
	ents, err := os.ReadDir(NetnsDir)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("netpool: list %s: %w", NetnsDir, err)
	}
	for _, e := range ents {
		if match(e.Name()) {
			out = append(out, e.Name())
		}
	}
	all, err := mountinfo.All()
	if err != nil {
		return nil, fmt.Errorf("netpool: %w", err)
	}
	dir := realNetnsDir()
	for _, m := range all {
		if filepath.Dir(m.Point) == dir && match(filepath.Base(m.Point)) {
			out = append(out, filepath.Base(m.Point))
		}
	}
	slices.Sort(out)
	return slices.Compact(out), nil
}

// NetnsProblem says what is wrong with NetnsDir/name, or "" when it is
// what a pool makes: one nsfs mount of a network namespace, nothing
// stacked under it and nothing hidden.
func NetnsProblem(name string) string {
	path := filepath.Join(NetnsDir, name)
	var probs []string
	ms, err := mountsAt(filepath.Join(realNetnsDir(), name))
	if err != nil {
		probs = append(probs, err.Error())
	}
	visibleNs := false
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		probs = append(probs, fmt.Sprintf("cannot open it: %v", err))
	} else {
		var st unix.Statfs_t
		if err := unix.Fstatfs(fd, &st); err != nil {
			probs = append(probs, fmt.Sprintf("cannot stat its file system: %v", err))
		} else if st.Type != unix.NSFS_MAGIC {
			probs = append(probs, fmt.Sprintf("not a namespace: a file on a file system of type %#x", st.Type))
		} else if t, err := unix.IoctlRetInt(fd, nsGetNstype); err != nil {
			probs = append(probs, fmt.Sprintf("cannot read its namespace type: %v", err))
		} else if t != unix.CLONE_NEWNET {
			probs = append(probs, fmt.Sprintf("not a network namespace (type %#x)", t))
		} else {
			visibleNs = true
		}
		unix.Close(fd)
	}
	switch {
	case len(ms) == 0 && visibleNs:
		probs = append(probs, "the mount table has no mount at it")
	case len(ms) > 0 && !visibleNs:
		probs = append(probs, fmt.Sprintf("%d mounts at it hidden under another mount (%s)", len(ms), fsTypes(ms)))
	case len(ms) > 1:
		probs = append(probs, fmt.Sprintf("%d mounts stacked at it (%s)", len(ms), fsTypes(ms)))
	}
	return strings.Join(probs, "; ")
}

func fsTypes(ms []mountinfo.Mount) string {
	var ts []string
	for _, m := range ms {
		ts = append(ts, m.FSType)
	}
	return strings.Join(ts, ", ")
}
