package oci

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/testutil"
)

// crashHelperEnv makes the test binary act as a "daemon" that creates
// sandboxes and then waits to be killed (see TestCleanupAfterDaemonKill).
const crashHelperEnv = "OCI_TEST_CRASH_HELPER"

// crashHelper runs in the re-executed test binary: it creates a pool and a
// backend, creates one running and one created sandbox, prints
// "ready <pids...>" and blocks until it is killed.
func crashHelper() int {
	ctx := context.Background()
	fail := func(err error) int {
		fmt.Println("error", err)
		return 1
	}
	pool, err := netpool.New(ctx, netpool.Options{
		Size:   1,
		Prefix: os.Getenv("CRASH_PREFIX"),
		Subnet: netip.MustParsePrefix(os.Getenv("CRASH_SUBNET")),
	})
	if err != nil {
		return fail(err)
	}
	b, err := New(ctx, Config{
		Runtime: os.Getenv(crashHelperEnv),
		Binary:  os.Getenv("CRASH_BINARY"),
		Root:    os.Getenv("CRASH_ROOT"),
		NetPool: pool,
	})
	if err != nil {
		return fail(err)
	}
	var pids []string
	e := &env{b: b}
	testRootfs = os.Getenv("CRASH_ROOTFS")
	for i, id := range []string{"running", "created"} {
		sb, err := b.Create(ctx, e.spec(id))
		if err != nil {
			return fail(err)
		}
		if i == 0 {
			if err := sb.Start(ctx); err != nil {
				return fail(err)
			}
		}
		s := sb.(*Sandbox)
		for _, p := range append([]int{s.initPid}, s.extra...) {
			pids = append(pids, strconv.Itoa(p))
		}
	}
	fmt.Println("ready", strings.Join(pids, " "))
	select {}
}

// TestCleanupAfterDaemonKill kills a "daemon" process (SIGKILL) holding
// sandboxes and checks that a new daemon's start-up sequence —
// netpool.Cleanup, netpool.New, oci.New, Backend.Cleanup — leaves no
// container, process, mount, bundle, cgroup, netns or veth behind.
func TestCleanupAfterDaemonKill(t *testing.T) {
	testutil.RequiresRoot(t)
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			bin := testutil.RuncPath(t)
			if rt == RuntimeGVisor {
				bin = testutil.RunscPath(t)
			}
			r := rand.IntN(9000) + 1000
			prefix := fmt.Sprintf("vk%d", r)
			subnet := netip.MustParsePrefix(fmt.Sprintf("172.%d.%d.0/24", 26+r%6, r%250))
			root := t.TempDir()
			t.Cleanup(func() { _ = netpool.Cleanup(context.Background(), prefix) })

			cmd := exec.Command(os.Args[0], "-test.run=^$")
			cmd.Env = append(os.Environ(), crashHelperEnv+"="+rt, "CRASH_PREFIX="+prefix,
				"CRASH_SUBNET="+subnet.String(), "CRASH_BINARY="+bin, "CRASH_ROOT="+root, "CRASH_ROOTFS="+testRootfs)
			cmd.Stderr = os.Stderr
			out, err := cmd.StdoutPipe()
			if err != nil {
				t.Fatal(err)
			}
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			lines := make(chan string, 1)
			go func() {
				sc := bufio.NewScanner(out)
				for sc.Scan() {
					if l := sc.Text(); strings.HasPrefix(l, "ready") || strings.HasPrefix(l, "error") {
						lines <- l
						return
					}
				}
				lines <- "error: helper exited"
			}()
			var line string
			select {
			case line = <-lines:
			case <-time.After(60 * time.Second):
				line = "error: helper timed out"
			}
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			if !strings.HasPrefix(line, "ready") {
				t.Fatalf("helper: %s", line)
			}
			var pids []int
			for _, f := range strings.Fields(line)[1:] {
				p, _ := strconv.Atoi(f)
				pids = append(pids, p)
			}

			// The new daemon starts.
			ctx := context.Background()
			if err := netpool.Cleanup(ctx, prefix); err != nil {
				t.Fatal(err)
			}
			pool, err := netpool.New(ctx, netpool.Options{Size: 1, Prefix: prefix, Subnet: subnet})
			if err != nil {
				t.Fatal(err)
			}
			b, err := New(ctx, Config{Runtime: rt, Binary: bin, Root: root, NetPool: pool})
			if err != nil {
				t.Fatal(err)
			}
			if err := b.Cleanup(ctx); err != nil {
				t.Fatal(err)
			}
			if list, err := b.rt.List(ctx); err != nil || len(list) != 0 {
				t.Errorf("containers after Cleanup: %v, %v", list, err)
			}
			if ents, err := os.ReadDir(filepath.Join(root, "bundles")); err != nil || len(ents) != 0 {
				t.Errorf("bundles after Cleanup: %v, %v", ents, err)
			}
			if ms, _ := mountinfo.Under(filepath.Join(root, "bundles")); len(ms) > 0 {
				t.Errorf("mounts after Cleanup: %v", ms)
			}
			if cg := b.cgroupDirs(); len(cg) > 0 {
				t.Errorf("cgroup dirs after Cleanup: %v", cg)
			}
			for _, pid := range pids {
				done := make(chan struct{})
				// This test process is a subreaper, so the killed
				// helper's sandboxes may have become its children:
				// waitPid reaps them, or waits on a pidfd otherwise.
				go func() { waitPid(pid); close(done) }()
				select {
				case <-done:
				case <-time.After(10 * time.Second):
					t.Errorf("process %d still runs after Cleanup", pid)
				}
				if alive(pid) {
					t.Errorf("process %d is alive after Cleanup", pid)
				}
			}
			if err := pool.Close(ctx); err != nil {
				t.Fatal(err)
			}
			if left, _ := netpool.Leftovers(prefix); len(left) > 0 {
				t.Errorf("network leftovers: %v", left)
			}
			if err := b.Cleanup(ctx); err != nil {
				t.Errorf("second Cleanup: %v", err)
			}
		})
	}
}

// alive reports whether pid exists and is not a zombie (a process whose
// parent, here possibly PID 1, has not reaped it yet is dead).
func alive(pid int) bool {
	if err := unix.Kill(pid, 0); errors.Is(err, unix.ESRCH) {
		return false
	}
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	i := strings.LastIndexByte(string(data), ')')
	f := strings.Fields(string(data[i+1:]))
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}
