package nodetest

import (
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox/microvm"
)

// Resources are the machine resources a daemon with one state dir and
// network prefix owns at one moment.
type Resources struct {
	// Netns maps each named network namespace "<prefix>-<n>" — every
	// entry of /var/run/netns and every mount the mount table has there
	// with such a name — to its cookie or to what is wrong with it.
	Netns map[string]NetnsEntry
	// Veths maps each host-side veth "<prefix>-<n>" to its ifindex.
	Veths map[string]int
	// Mounts are mount points under the state dir.
	Mounts []string
	// Cgroups are instance cgroup directories of the daemon's OCI backends.
	Cgroups []string
	// MicroVM are what microVM instances hold: QEMU processes, instance
	// directories, sockets, RAM files (microvm.Leftovers).
	MicroVM []string
	// Problems are what could not be inspected at all (a listing that
	// failed, a veth whose ifindex cannot be read): each is a leak, since
	// a check that skips what it cannot read cannot fail.
	Problems []string
}

// NetnsEntry is one named network namespace.
type NetnsEntry struct {
	// Cookie is SO_NETNS_COOKIE: never reused, unlike namespace inode
	// numbers, so a namespace recreated under the same name has another.
	// Zero when Problem is set.
	Cookie uint64
	// Problem says why the entry is not a single nsfs mount whose cookie
	// can be read (a plain file, a mount hidden under another or stacked,
	// an unreadable cookie): always a leak.
	Problem string
}

func (e NetnsEntry) String() string {
	if e.Problem != "" {
		return e.Problem
	}
	return fmt.Sprintf("cookie %d", e.Cookie)
}

// Snapshot records the resources of the daemon with stateDir and prefix.
func Snapshot(stateDir, prefix string) Resources {
	r := Resources{Netns: map[string]NetnsEntry{}, Veths: map[string]int{}}
	names, err := netpool.NetnsNames(func(name string) bool { return netpool.OwnName(prefix, name) })
	if err != nil {
		r.Problems = append(r.Problems, err.Error())
	}
	for _, name := range names {
		p := netpool.NetnsProblem(name)
		var c uint64
		if p == "" {
			if c, err = netnsCookie(filepath.Join(netpool.NetnsDir, name)); err != nil {
				p = fmt.Sprintf("cannot read its cookie: %v", err)
			}
		}
		if p != "" {
			if netnsGone(name) {
				continue // deleted while we looked: a running daemon's Put
			}
			r.Netns[name] = NetnsEntry{Problem: p}
			continue
		}
		r.Netns[name] = NetnsEntry{Cookie: c}
	}
	links, err := os.ReadDir("/sys/class/net")
	if err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("list veths: %v", err))
	}
	for _, l := range links {
		if !netpool.OwnName(prefix, l.Name()) {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/sys/class/net", l.Name(), "ifindex"))
		var ix int
		if err == nil {
			ix, err = strconv.Atoi(strings.TrimSpace(string(b)))
		}
		if err != nil {
			// Gone between the listing and the read is not a leak.
			if !errors.Is(err, os.ErrNotExist) {
				r.Problems = append(r.Problems, fmt.Sprintf("veth %s: cannot read its ifindex: %v", l.Name(), err))
			}
			continue
		}
		r.Veths[l.Name()] = ix
	}
	abs, _ := filepath.Abs(stateDir)
	if r.Mounts, err = mountinfo.Under(abs); err != nil {
		r.Problems = append(r.Problems, fmt.Sprintf("mounts under %s: %v", abs, err))
	}
	hier, _ := filepath.Glob("/sys/fs/cgroup/*")
	hier = append(hier, "/sys/fs/cgroup")
	for _, h := range hier {
		for _, p := range CgroupParents(stateDir) {
			ents, err := os.ReadDir(filepath.Join(h, p))
			if err != nil {
				// Not there, or h is a file of the unified hierarchy.
				if !errors.Is(err, os.ErrNotExist) && !errors.Is(err, unix.ENOTDIR) {
					r.Problems = append(r.Problems, fmt.Sprintf("cgroups in %s: %v", filepath.Join(h, p), err))
				}
				continue
			}
			for _, e := range ents {
				if e.IsDir() {
					r.Cgroups = append(r.Cgroups, filepath.Join(h, p, e.Name()))
				}
			}
		}
	}
	r.MicroVM = microvm.Leftovers(filepath.Join(abs, "sandboxes", "microvm"), "")
	sort.Strings(r.Mounts)
	sort.Strings(r.Cgroups)
	return r
}

// netnsGone reports whether /var/run/netns/name no longer exists, neither
// as a file nor as a mount.
func netnsGone(name string) bool {
	if _, err := os.Lstat(filepath.Join(netpool.NetnsDir, name)); !errors.Is(err, os.ErrNotExist) {
		return false
	}
	names, err := netpool.NetnsNames(func(n string) bool { return n == name })
	return err == nil && len(names) == 0
}

// Count is the number of resources of every kind.
func (r Resources) Count() int {
	return len(r.Netns) + len(r.Veths) + len(r.Mounts) + len(r.Cgroups) + len(r.MicroVM) + len(r.Problems)
}

// LeakedFrom lists what of old (taken before the old daemon died) still
// exists in now, and what now holds beyond a fresh idle daemon's pool of
// poolSize namespaces and veths with nothing else. A namespace entry with a
// problem and anything Snapshot could not inspect are always leaks. Empty
// means clean.
func (now Resources) LeakedFrom(old Resources, poolSize int) []string {
	var out []string
	for n, e := range old.Netns {
		if ne, ok := now.Netns[n]; ok && e.Problem == "" && ne == e {
			out = append(out, fmt.Sprintf("netns %s (cookie %d) of the dead daemon", n, e.Cookie))
		}
	}
	for _, n := range slices.Sorted(maps.Keys(now.Netns)) {
		if p := now.Netns[n].Problem; p != "" {
			out = append(out, fmt.Sprintf("netns %s: %s", n, p))
		}
	}
	out = append(out, now.Problems...)
	for n, ix := range old.Veths {
		if now.Veths[n] == ix {
			out = append(out, fmt.Sprintf("veth %s (ifindex %d) of the dead daemon", n, ix))
		}
	}
	if len(now.Netns) > poolSize {
		out = append(out, fmt.Sprintf("%d network namespaces, want the new pool's %d: %v", len(now.Netns), poolSize, now.Netns))
	}
	if len(now.Veths) > poolSize {
		out = append(out, fmt.Sprintf("%d veths, want the new pool's %d: %v", len(now.Veths), poolSize, now.Veths))
	}
	for _, m := range now.Mounts {
		out = append(out, "mount "+m)
	}
	for _, c := range now.Cgroups {
		out = append(out, "cgroup "+c)
	}
	for _, m := range now.MicroVM {
		out = append(out, "microvm "+m)
	}
	return out
}

// CgroupParents returns the cgroup parents (relative to a hierarchy root)
// the OCI backends of a daemon with this state dir use for instances.
func CgroupParents(stateDir string) []string {
	var out []string
	for _, rt := range []string{"gvisor", "runc"} {
		root, _ := filepath.Abs(filepath.Join(stateDir, "sandboxes", rt))
		out = append(out, fmt.Sprintf("/vhive/%s-%08x", rt, crc32.ChecksumIEEE([]byte(root))))
	}
	return out
}

// soNetnsCookie is SO_NETNS_COOKIE (asm-generic; not in x/sys/unix yet).
const soNetnsCookie = 71

// netnsCookie returns the cookie of the network namespace bind-mounted at
// path, read from a socket created inside it on a thread of its own.
func netnsCookie(path string) (uint64, error) {
	type result struct {
		c   uint64
		err error
	}
	ch := make(chan result, 1)
	go func() {
		runtime.LockOSThread()
		orig, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer orig.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			ch <- result{err: err}
			return
		}
		var r result
		fd, err := unix.Socket(unix.AF_INET, unix.SOCK_DGRAM, 0)
		if err == nil {
			r.c, r.err = unix.GetsockoptUint64(fd, unix.SOL_SOCKET, soNetnsCookie)
			unix.Close(fd)
		} else {
			r.err = err
		}
		// Back to the original namespace; a thread that cannot go back
		// stays locked and ends with this goroutine.
		if err := unix.Setns(int(orig.Fd()), unix.CLONE_NEWNET); err == nil {
			runtime.UnlockOSThread()
		}
		ch <- r
	}()
	r := <-ch
	return r.c, r.err
}
