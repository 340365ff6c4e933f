package crash

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/sandbox/microvm"
	"vhive.dev/vhive/internal/testutil"
)

const (
	mvmPrefix = "h13v"
	mvmSubnet = "10.187.5.0/24"
)

// TestMicroVMDaemonKilled kills the daemon (SIGKILL) while microVM
// instances run — one booted (its RAM a file in /dev/shm) and one restored
// from a snapshot (its RAM a private mapping of the snapshot's file) — and
// checks that the restarted daemon's cleanup kills their QEMU processes and
// removes their taps, network namespaces, veths, instance directories,
// sockets and RAM files, that the snapshot survives and restores, and that
// a clean shutdown then leaves nothing. Skipped when the microVM assets
// (make microvm) are not built.
func TestMicroVMDaemonKilled(t *testing.T) {
	testutil.RequiresRoot(t)
	if _, err := assets.Load(assets.Dir(testutil.CacheDir())); err != nil {
		t.Skipf("no microVM assets: %v", err)
	}
	work := t.TempDir()
	hello := shared.Helloworld(t)
	state, err := os.MkdirTemp("", "h13v")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	opts := nodetest.Options{StateDir: state, Sandboxes: "microvm", NetPrefix: mvmPrefix, Subnet: mvmSubnet,
		Log: filepath.Join(work, "daemon.log"), NoGateway: true, Args: []string{"--ready-timeout", "3m"}}
	d := nodetest.Start(t, shared.Bin(t), opts)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log tail:\n%s", d.LogTail(6000))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	c := d.Client
	if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: hello}); err != nil {
		t.Fatal(err)
	}
	invoke := func(c vhivepb.ControlClient, fn string) *vhivepb.InvokeResponse {
		t.Helper()
		t0 := time.Now()
		r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte("world")})
		if err != nil || string(r.Payload) != "Hello, world!" {
			t.Fatalf("invoke %s: %v, %v", fn, r, err)
		}
		t.Logf("invoke %s: start mode %q, cold %v, %v", fn, r.StartMode, r.ColdStart, time.Since(t0).Round(time.Millisecond))
		return r
	}
	for _, f := range []struct{ name, mode string }{{"mv-boot", "boot"}, {"mv-snap", "snapshot"}} {
		if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: f.name, Image: helloRef, Sandbox: "microvm", StartMode: f.mode}}); err != nil {
			t.Fatal(err)
		}
	}
	invoke(c, "mv-snap")
	waitSnapshots(t, c, "mv-snap")
	if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: "mv-snap"}); err != nil {
		t.Fatal(err)
	}
	if r := invoke(c, "mv-snap"); r.StartMode != "snapshot" {
		t.Fatalf("second cold start of mv-snap in mode %q, want a restore from its snapshot", r.StartMode)
	}
	invoke(c, "mv-boot")

	root := filepath.Join(state, "sandboxes", "microvm")
	running := microvm.Leftovers(root, "")
	t.Logf("microVM resources while two instances run: %v", running)
	qemus, mems := 0, 0
	for _, l := range running {
		if strings.HasPrefix(l, "QEMU pid") {
			qemus++
		}
		if strings.HasSuffix(l, ".mem") {
			mems++
		}
	}
	if qemus != 2 || mems != 1 {
		t.Fatalf("want 2 QEMU processes and 1 RAM file (the booted instance's) before the kill, got %v", running)
	}
	dead := nodetest.Snapshot(state, mvmPrefix)
	d.Kill(t)
	if l := microvm.Leftovers(root, ""); len(l) != len(running) {
		t.Logf("after the kill: %v", l) // QEMU outlives the daemon until the restart
	}

	old := d
	d = nodetest.Start(t, shared.Bin(t), opts)
	var procs []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if procs = old.TrackedProcs(); len(procs) == 0 || time.Now().After(deadline) {
			break
		}
	}
	if leaks := append(nodetest.Snapshot(state, mvmPrefix).LeakedFrom(dead, 1), procs...); len(leaks) > 0 {
		t.Errorf("the dead daemon's microVMs left %v", leaks)
	}
	if err := old.Stop(); err != nil {
		t.Error(err)
	}
	if r := invoke(d.Client, "mv-snap"); r.StartMode != "snapshot" || !r.ColdStart {
		t.Errorf("mv-snap after the restart: cold %v in mode %q, want a restore from the snapshot the dead daemon wrote", r.ColdStart, r.StartMode)
	}
	if _, err := d.Client.StopInstances(ctx, &vhivepb.StopInstancesRequest{}); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Error(err)
	}
	if l := nodetest.Snapshot(state, mvmPrefix); l.Count() != 0 {
		t.Errorf("after a clean shutdown: %+v", l)
	}
}
