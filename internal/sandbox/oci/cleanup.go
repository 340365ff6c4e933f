package oci

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
)

// Cleanup removes what a previous run of this backend (same Root) left
// behind: it force-deletes every container in the runtime's state
// directory, unmounts every mount under Root and removes every bundle, and
// removes leftover cgroups under its cgroup parent. Call it at daemon start,
// before any Create; instances of this Backend that are still registered
// are skipped. Network namespaces are the pool's: see netpool.Cleanup.
func (b *Backend) Cleanup(ctx context.Context) error {
	b.mu.Lock()
	live := map[string]bool{}
	for id := range b.instances {
		live[id] = true
	}
	b.mu.Unlock()

	var errs []error
	list, err := b.rt.List(ctx)
	if err != nil {
		errs = append(errs, fmt.Errorf("oci: cleanup: list %s containers: %w", b.cfg.Runtime, err))
	}
	for _, c := range list {
		if live[c.ID] {
			continue
		}
		b.log.Info("cleanup: deleting leftover container", "id", c.ID, "status", c.Status, "pid", c.Pid)
		if err := b.rt.Delete(ctx, c.ID, &runc.DeleteOpts{Force: true}); err != nil && !b.gone(ctx, c.ID) {
			errs = append(errs, fmt.Errorf("oci: cleanup: delete container %q: %w", c.ID, err))
		}
	}
	mounts, err := mountinfo.Under(b.cfg.Root)
	if err != nil {
		errs = append(errs, fmt.Errorf("oci: cleanup: %w", err))
	}
	// Deepest first.
	for i := len(mounts) - 1; i >= 0; i-- {
		m := mounts[i]
		if id := bundleOf(b.bundles, m); id != "" && live[id] {
			continue
		}
		if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("oci: cleanup: unmount %q: %w", m, err))
		}
	}
	ents, err := os.ReadDir(b.bundles)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		errs = append(errs, fmt.Errorf("oci: cleanup: list bundles: %w", err))
	}
	for _, e := range ents {
		if live[e.Name()] {
			continue
		}
		if err := os.RemoveAll(filepath.Join(b.bundles, e.Name())); err != nil {
			errs = append(errs, fmt.Errorf("oci: cleanup: remove bundle %q: %w", e.Name(), err))
		}
	}
	for _, d := range b.cgroupDirs() {
		cg, err := os.ReadDir(d)
		if err != nil {
			continue
		}
		left := 0
		for _, e := range cg {
			if !e.IsDir() {
				continue
			}
			if live[e.Name()] {
				left++
				continue
			}
			// rmdir of a cgroup fails while it holds processes; those
			// were killed above.
			if err := os.Remove(filepath.Join(d, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("oci: cleanup: remove cgroup %q: %w", filepath.Join(d, e.Name()), err))
				left++
			}
		}
		if left == 0 {
			_ = os.Remove(d) // the per-Root parent, when empty
		}
	}
	return errors.Join(errs...)
}

// cgroupDirs lists the directories holding this backend's per-instance
// cgroups in every mounted hierarchy (v1 controllers and v2).
func (b *Backend) cgroupDirs() []string {
	var out []string
	ms, _ := filepath.Glob("/sys/fs/cgroup/*" + b.cgroupParent)
	out = append(out, ms...)
	if fi, err := os.Stat("/sys/fs/cgroup" + b.cgroupParent); err == nil && fi.IsDir() {
		out = append(out, "/sys/fs/cgroup"+b.cgroupParent)
	}
	return out
}

// removeCgroups removes the cgroup directories of instance id. Processes
// still in them (left by a runtime killed mid-create) are killed first:
// the cgroup is this instance's alone.
func (b *Backend) removeCgroups(ctx context.Context, id string) error {
	var errs []error
	for _, d := range b.CgroupDirs(id) {
		var err error
		for try := 0; try < 50; try++ {
			if err = os.Remove(d); err == nil || errors.Is(err, os.ErrNotExist) {
				err = nil
				break
			}
			if procs, rerr := os.ReadFile(filepath.Join(d, "cgroup.procs")); rerr == nil {
				for _, f := range strings.Fields(string(procs)) {
					if pid, perr := strconv.Atoi(f); perr == nil && pid > 0 {
						_ = unix.Kill(pid, unix.SIGKILL)
					}
				}
			}
			select {
			case <-ctx.Done():
				return fmt.Errorf("oci: remove cgroup %q: %w", d, ctx.Err())
			case <-time.After(20 * time.Millisecond):
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("oci: remove cgroup %q: %w", d, err))
		}
	}
	return errors.Join(errs...)
}

// CgroupDirs returns the cgroup directories of instance id that exist now
// (one per v1 controller, or the v2 one). Tests use it.
func (b *Backend) CgroupDirs(id string) []string {
	var out []string
	for _, d := range b.cgroupDirs() {
		p := filepath.Join(d, id)
		if _, err := os.Stat(p); err == nil {
			out = append(out, p)
		}
	}
	return out
}

// bundleOf returns the instance ID whose bundle holds path, or "".
func bundleOf(bundles, path string) string {
	rest, ok := strings.CutPrefix(path, bundles+"/")
	if !ok {
		return ""
	}
	id, _, _ := strings.Cut(rest, "/")
	return id
}
