package oci

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// processesWithArg lists live (non-zombie) processes whose command line has
// an argument containing s.
func processesWithArg(s string) []string {
	var out []string
	ents, _ := os.ReadDir("/proc")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || !alive(pid) {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		if strings.Contains(string(cmdline), s) {
			out = append(out, fmt.Sprintf("%d %s", pid, strings.ReplaceAll(string(cmdline), "\x00", " ")))
		}
	}
	return out
}

// TestCreateCancelled cancels Create (and Start) at different points: the
// error must come back and nothing may be left — no container, process,
// mount, bundle or cgroup — and the pool must still hand out working nets.
func TestCreateCancelled(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			for _, after := range []time.Duration{time.Millisecond, 20 * time.Millisecond, 60 * time.Millisecond, 150 * time.Millisecond, 300 * time.Millisecond} {
				id := fmt.Sprintf("cancel-%d", after.Milliseconds())
				ctx, cancel := context.WithTimeout(context.Background(), after)
				sb, err := e.b.Create(ctx, e.spec(id))
				if err == nil {
					err = sb.Start(ctx)
					if err != nil {
						// A failed Start leaves a created sandbox: the
						// caller stops it.
						if serr := sb.Stop(context.Background()); serr != nil {
							t.Errorf("%v: Stop after a cancelled Start: %v", after, serr)
						}
					} else if serr := sb.Stop(context.Background()); serr != nil {
						t.Errorf("%v: Stop: %v", after, serr)
					}
				}
				cancel()
				t.Logf("cancel after %v: %v", after, err)
				if err != nil && !errors.Is(err, context.DeadlineExceeded) {
					t.Errorf("%v: error %v does not wrap context.DeadlineExceeded", after, err)
				}
				e.assertClean(t, id)
				// Processes may take a moment to die after the kill.
				bundle := filepath.Join(e.root, "bundles", id)
				deadline := time.Now().Add(10 * time.Second)
				for {
					left := processesWithArg(bundle)
					if len(left) == 0 {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("%v: processes left: %v", after, left)
						break
					}
					time.Sleep(50 * time.Millisecond)
				}
			}
			// The pool still works after all that.
			sb := e.start(t, e.spec("after-cancel"))
			get(t, sb.Endpoint(), "/count")
		})
	}
}
