package cluster

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

const cgroupFS = "/sys/fs/cgroup"

// cgroupHierarchies lists the mounted cgroup hierarchies: every v1
// controller directory (and the v2 "unified" one in hybrid mode), or just
// /sys/fs/cgroup on a pure v2 host.
func cgroupHierarchies() ([]string, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(cgroupFS, &st); err != nil {
		return nil, fmt.Errorf("cluster: statfs %s: %w", cgroupFS, err)
	}
	if st.Type == unix.CGROUP2_SUPER_MAGIC {
		return []string{cgroupFS}, nil
	}
	ents, err := os.ReadDir(cgroupFS)
	if err != nil {
		return nil, fmt.Errorf("cluster: list %s: %w", cgroupFS, err)
	}
	var out []string
	for _, e := range ents {
		p := filepath.Join(cgroupFS, e.Name())
		fi, err := os.Lstat(p)
		if err != nil || !fi.IsDir() { // skip cpu,cpuacct-style symlinks
			continue
		}
		var s unix.Statfs_t
		if unix.Statfs(p, &s) == nil && (s.Type == unix.CGROUP_SUPER_MAGIC || s.Type == unix.CGROUP2_SUPER_MAGIC) {
			out = append(out, p)
		}
	}
	return out, nil
}

// pidsHierarchy is where a node's own daemons are placed and where the
// processes of a node are found: the v1 pids controller, or the v2 root.
func pidsHierarchy() (string, error) {
	hs, err := cgroupHierarchies()
	if err != nil {
		return "", err
	}
	if len(hs) == 1 && hs[0] == cgroupFS {
		return "", errors.New("cluster: cgroup v2 only: placing node daemons by thread needs cgroup v1 (this machine's kind is hybrid v1)")
	}
	p := filepath.Join(cgroupFS, "pids")
	if !slices.Contains(hs, p) {
		return "", errors.New("cluster: no v1 pids cgroup hierarchy is mounted")
	}
	return p, nil
}

// makeNodeCgroups creates the node's cgroup root in every hierarchy (kubelet
// requires it to exist) and rec records each directory before it is made.
func makeNodeCgroups(root string, rec func(dir string) error) error {
	hs, err := cgroupHierarchies()
	if err != nil {
		return err
	}
	for _, h := range hs {
		d := filepath.Join(h, root)
		if err := rec(d); err != nil {
			return err
		}
		if err := os.Mkdir(d, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("cluster: create cgroup %s: %w", d, err)
		}
		if filepath.Base(h) == "cpuset" {
			// A new v1 cpuset has no CPUs or memory nodes; tasks cannot join.
			for _, f := range []string{"cpuset.cpus", "cpuset.mems"} {
				v, err := os.ReadFile(filepath.Join(h, f))
				if err != nil {
					return fmt.Errorf("cluster: read %s: %w", filepath.Join(h, f), err)
				}
				if err := os.WriteFile(filepath.Join(d, f), v, 0o644); err != nil {
					return fmt.Errorf("cluster: write %s: %w", filepath.Join(d, f), err)
				}
			}
		}
	}
	return nil
}

// cgroupPids lists every process in the cgroup tree dir.
func cgroupPids(dir string) []int {
	var out []int
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || !d.IsDir() {
			return nil
		}
		b, err := os.ReadFile(filepath.Join(p, "cgroup.procs"))
		if err != nil {
			return nil
		}
		for _, f := range strings.Fields(string(b)) {
			if pid, err := strconv.Atoi(f); err == nil {
				out = append(out, pid)
			}
		}
		return nil
	})
	return out
}

// killCgroupTree SIGKILLs every process in dir's tree until it is empty.
func killCgroupTree(ctx context.Context, dir string) error {
	return killAll(ctx, "processes in cgroup "+dir, func() []int { return cgroupPids(dir) })
}

// killAll SIGKILLs the processes list names (never this one) until it
// names none, for 15 s at most; what says which they are in the error.
func killAll(ctx context.Context, what string, list func() []int) error {
	deadline := time.Now().Add(15 * time.Second)
	for {
		pids := list()
		if len(pids) == 0 {
			return nil
		}
		for _, pid := range pids {
			if pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if time.Now().After(deadline) || ctx.Err() != nil {
			return fmt.Errorf("cluster: %s survive SIGKILL: %v", what, pids)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// removeCgroupTree removes dir and every cgroup below it, deepest first.
func removeCgroupTree(dir string) error {
	var dirs []string
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			dirs = append(dirs, p)
		}
		return nil
	})
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("cluster: walk cgroup %s: %w", dir, err)
	}
	// A cgroup whose last task was just killed can stay busy for a moment
	// while the task exits.
	deadline := time.Now().Add(10 * time.Second)
	for {
		var errs []error
		busy := false
		for i := len(dirs) - 1; i >= 0; i-- {
			if err := os.Remove(dirs[i]); err != nil && !errors.Is(err, os.ErrNotExist) {
				busy = busy || errors.Is(err, unix.EBUSY)
				errs = append(errs, fmt.Errorf("cluster: remove cgroup %s: %w", dirs[i], err))
			}
		}
		if len(errs) == 0 || !busy || time.Now().After(deadline) {
			return errors.Join(errs...)
		}
		for _, pid := range cgroupPids(dir) {
			if pid != os.Getpid() {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		time.Sleep(200 * time.Millisecond)
	}
}
