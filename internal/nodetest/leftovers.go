package nodetest

import (
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
)

// Resources are the machine resources a daemon with one state dir and
// network prefix owns at one moment.
type Resources struct {
	// Netns maps each named network namespace "<prefix>-<n>" to its
	// cookie (SO_NETNS_COOKIE: never reused, unlike namespace inode
	// numbers, so a namespace recreated under the same name has another).
	Netns map[string]uint64
	// Veths maps each host-side veth "<prefix>-<n>" to its ifindex.
	Veths map[string]int
	// Mounts are mount points under the state dir.
	Mounts []string
	// Cgroups are instance cgroup directories of the daemon's OCI backends.
	Cgroups []string
}

// Snapshot records the resources of the daemon with stateDir and prefix.
func Snapshot(stateDir, prefix string) Resources {
	r := Resources{Netns: map[string]uint64{}, Veths: map[string]int{}}
	ents, _ := os.ReadDir("/var/run/netns")
	for _, e := range ents {
		if !netpool.OwnName(prefix, e.Name()) {
			continue
		}
		if c, err := netnsCookie(filepath.Join("/var/run/netns", e.Name())); err == nil {
			r.Netns[e.Name()] = c
		}
	}
	links, _ := os.ReadDir("/sys/class/net")
	for _, l := range links {
		if !netpool.OwnName(prefix, l.Name()) {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/sys/class/net", l.Name(), "ifindex"))
		if err != nil {
			continue
		}
		ix, _ := strconv.Atoi(strings.TrimSpace(string(b)))
		r.Veths[l.Name()] = ix
	}
	abs, _ := filepath.Abs(stateDir)
	r.Mounts, _ = mountinfo.Under(abs)
	hier, _ := filepath.Glob("/sys/fs/cgroup/*")
	hier = append(hier, "/sys/fs/cgroup")
	for _, h := range hier {
		for _, p := range CgroupParents(stateDir) {
			ents, err := os.ReadDir(filepath.Join(h, p))
			if err != nil {
				continue
			}
			for _, e := range ents {
				if e.IsDir() {
					r.Cgroups = append(r.Cgroups, filepath.Join(h, p, e.Name()))
				}
			}
		}
	}
	sort.Strings(r.Mounts)
	sort.Strings(r.Cgroups)
	return r
}

// Count is the number of resources of every kind.
func (r Resources) Count() int { return len(r.Netns) + len(r.Veths) + len(r.Mounts) + len(r.Cgroups) }

// LeakedFrom lists what of old (taken before the old daemon died) still
// exists in now, and what now holds beyond a fresh idle daemon's pool of
// poolSize namespaces and veths with nothing else. Empty means clean.
func (now Resources) LeakedFrom(old Resources, poolSize int) []string {
	var out []string
	for n, ino := range old.Netns {
		if now.Netns[n] == ino {
			out = append(out, fmt.Sprintf("netns %s (cookie %d) of the dead daemon", n, ino))
		}
	}
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
