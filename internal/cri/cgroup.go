package cri

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"golang.org/x/sys/unix"
)

// With cgroup v1 the runtime removes a container's cgroup as soon as its
// process exits, and with it the memory controller's oom_kill counter, so an
// OOM kill cannot be told from any other SIGKILL afterwards. vhive therefore
// puts each limited container in a cgroup of its own making:
//
//	<parent>/vhive-<id12>        memory.limit_in_bytes = the limit (ours)
//	<parent>/vhive-<id12>/ctr    the runtime's cgroup (no memory limit)
//
// The limit is enforced in the outer cgroup, which outlives the container
// until RemoveContainer, so whether the limit was hit can be read after the
// exit (see oomKilled).
const cgroupV1Root = "/sys/fs/cgroup"

func cgroupV1() bool {
	_, err := os.Stat(filepath.Join(cgroupV1Root, "memory", "memory.oom_control"))
	return err == nil
}

// memCgroupDir is the outer cgroup of container id in the memory hierarchy.
func memCgroupDir(outer string) string {
	return filepath.Join(cgroupV1Root, "memory", outer)
}

// setupMemCgroup creates the outer memory cgroup with the limit.
func setupMemCgroup(outer string, limit int64) error {
	dir := memCgroupDir(outer)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create memory cgroup %q: %w", dir, err)
	}
	if err := os.WriteFile(filepath.Join(dir, "memory.limit_in_bytes"), []byte(strconv.FormatInt(limit, 10)), 0o644); err != nil {
		_ = os.Remove(dir)
		return fmt.Errorf("set memory limit %d on %q: %w", limit, dir, err)
	}
	return nil
}

// oomKilled reports whether the container's SIGKILL came from the OOM
// killer. cgroup v1 counts oom_kill on the victim's (the runtime's, already
// removed) cgroup, so the outer cgroup's record is used: an OOM kill
// counted there, or the limit having been hit (failcnt) — with a SIGKILL
// exit, which the caller checks.
func oomKilled(outer string) bool {
	dir := memCgroupDir(outer)
	if b, err := os.ReadFile(filepath.Join(dir, "memory.oom_control")); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "oom_kill" {
				if n, _ := strconv.Atoi(f[1]); n > 0 {
					return true
				}
			}
		}
	}
	b, err := os.ReadFile(filepath.Join(dir, "memory.failcnt"))
	if err != nil {
		return false
	}
	n, _ := strconv.Atoi(strings.TrimSpace(string(b)))
	return n > 0
}

// removeOuterCgroups removes the outer cgroup (and the runtime's leftover
// parents of the same name) from every v1 hierarchy.
func removeOuterCgroups(outer string) error {
	ents, err := os.ReadDir(cgroupV1Root)
	if err != nil {
		return nil
	}
	var errs []error
	for _, e := range ents {
		dir := filepath.Join(cgroupV1Root, e.Name(), outer)
		_ = unix.Rmdir(filepath.Join(dir, "ctr"))
		if err := unix.Rmdir(dir); err != nil && !errors.Is(err, unix.ENOENT) {
			errs = append(errs, fmt.Errorf("remove cgroup %q: %w", dir, err))
		}
	}
	return errors.Join(errs...)
}
