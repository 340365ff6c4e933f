package oci

import (
	"bufio"
	"bytes"
	"context"
	"fmt"
	"os"
	"strconv"
	"strings"

	"vhive.dev/vhive/internal/sandbox"
)

// Stats sums RSS and PSS (/proc/<pid>/smaps_rollup) over the sandbox's
// processes: the container's init and its descendants (runc), or the runsc
// sandbox process (sentry), its descendants (systrap stubs) and the gofer.
func (s *Sandbox) Stats(ctx context.Context) (sandbox.Stats, error) {
	select {
	case <-s.done:
		return sandbox.Stats{}, fmt.Errorf("oci: stats of sandbox %q: it has ended: %w", s.id, s.Err())
	default:
	}
	if s.initPid == 0 {
		return sandbox.Stats{}, fmt.Errorf("oci: stats of sandbox %q: it has no process yet", s.id)
	}
	pids := descendants(append([]int{s.initPid}, s.extra...))
	var st sandbox.Stats
	for _, pid := range pids {
		rss, pss, err := smapsRollup(pid)
		if err != nil {
			if pid == s.initPid {
				return sandbox.Stats{}, fmt.Errorf("oci: stats of sandbox %q: %w", s.id, err)
			}
			continue // a process that just exited
		}
		st.RSS += rss
		st.PSS += pss
	}
	return st, nil
}

// descendants returns roots and every process below them.
func descendants(roots []int) []int {
	children := map[int][]int{}
	if ents, err := os.ReadDir("/proc"); err == nil {
		for _, e := range ents {
			pid, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			if ppid, ok := parentOf(pid); ok {
				children[ppid] = append(children[ppid], pid)
			}
		}
	}
	seen := map[int]bool{}
	var out []int
	queue := append([]int(nil), roots...)
	for len(queue) > 0 {
		p := queue[0]
		queue = queue[1:]
		if seen[p] {
			continue
		}
		seen[p] = true
		out = append(out, p)
		queue = append(queue, children[p]...)
	}
	return out
}

// smapsRollup returns the Rss and Pss of pid in bytes.
func smapsRollup(pid int) (rss, pss int64, err error) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return 0, 0, err
	}
	sc := bufio.NewScanner(bytes.NewReader(data))
	for sc.Scan() {
		f := strings.Fields(sc.Text())
		if len(f) < 2 {
			continue
		}
		var dst *int64
		switch f[0] {
		case "Rss:":
			dst = &rss
		case "Pss:":
			dst = &pss
		default:
			continue
		}
		kb, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			return 0, 0, fmt.Errorf("parse %q of /proc/%d/smaps_rollup: %w", sc.Text(), pid, err)
		}
		*dst = kb * 1024
	}
	return rss, pss, nil
}
