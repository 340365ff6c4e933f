package oci

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
)

// TestCleanupAfterCrash drops a backend with live sandboxes (a daemon
// crash) and checks that a new backend's Cleanup plus netpool.Cleanup leave
// nothing behind.
func TestCleanupAfterCrash(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			ctx := context.Background()
			var pids []int
			for i, id := range []string{"crash-running", "crash-created"} {
				sb, err := e.b.Create(ctx, e.spec(id))
				if err != nil {
					t.Fatal(err)
				}
				if i == 0 {
					if err := sb.Start(ctx); err != nil {
						t.Fatal(err)
					}
					get(t, sb.Endpoint(), "/count")
				}
				// A sandbox that was only created has no process
				// unless Config.SeparateCreate ran the runtime's create.
				if pid := sb.(*Sandbox).initPid; pid > 0 {
					pids = append(pids, pid)
				}
			}
			// The daemon "restarts": a new backend on the same Root.
			b2, err := New(ctx, e.b.cfg)
			if err != nil {
				t.Fatal(err)
			}
			if err := b2.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			if err := netpool.Cleanup(ctx, e.prefix); err != nil {
				t.Fatal(err)
			}
			list, err := b2.rt.List(ctx)
			if err != nil || len(list) != 0 {
				t.Errorf("containers after Cleanup: %v, %v", list, err)
			}
			ents, err := os.ReadDir(filepath.Join(e.root, "bundles"))
			if err != nil || len(ents) != 0 {
				t.Errorf("bundles after Cleanup: %v, %v", ents, err)
			}
			if ms, _ := mountinfo.Under(filepath.Join(e.root, "bundles")); len(ms) > 0 {
				t.Errorf("mounts after Cleanup: %v", ms)
			}
			for _, id := range []string{"crash-running", "crash-created"} {
				if cg := b2.CgroupDirs(id); len(cg) > 0 {
					t.Errorf("cgroups after Cleanup: %v", cg)
				}
			}
			if left, _ := netpool.Leftovers(e.prefix); len(left) > 0 {
				t.Errorf("network leftovers: %v", left)
			}
			deadline := time.Now().Add(10 * time.Second)
			for _, pid := range pids {
				for {
					// The old instances' watchers reap them (this test
					// process is their subreaper); then the pid is gone.
					err := unix.Kill(pid, 0)
					if errors.Is(err, unix.ESRCH) {
						break
					}
					if time.Now().After(deadline) {
						t.Errorf("process %d still exists after Cleanup", pid)
						break
					}
					time.Sleep(20 * time.Millisecond)
				}
			}
		})
	}
}
