package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// waitSnapshot waits until function has a committed snapshot.
func (td *testDaemon) waitSnapshot(t testing.TB, fn string) *vhivepb.SnapshotInfo {
	t.Helper()
	deadline := time.Now().Add(60 * time.Second)
	for {
		ls, err := td.client.ListSnapshots(context.Background(), &vhivepb.ListSnapshotsRequest{Function: fn})
		if err != nil {
			t.Fatal(err)
		}
		if len(ls.Snapshots) == 1 {
			return ls.Snapshots[0]
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot of %s after 60s", fn)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func (td *testDaemon) stopInstances(t testing.TB, fn string) {
	t.Helper()
	if _, err := td.client.StopInstances(context.Background(), &vhivepb.StopInstancesRequest{Function: fn}); err != nil {
		t.Fatal(err)
	}
}

func hasStage(r *vhivepb.InvokeResponse, name string) bool {
	for _, s := range r.Stages {
		if s.Name == name {
			return true
		}
	}
	return false
}

// stageMicros is the named stage's duration, -1 when absent.
func stageMicros(r *vhivepb.InvokeResponse, name string) int64 {
	for _, s := range r.Stages {
		if s.Name == name {
			return s.GetMicros()
		}
	}
	return -1
}

func TestGVisorSnapshotStartMode(t *testing.T) {
	counter := shared.Function(t, "counter", false)
	probe := shared.Probe(t)
	cfg := daemonConfig(t, t.TempDir())
	cfg.NetPoolSize = 2
	td := startDaemon(t, cfg)
	td.importImage(t, counter)
	td.importImage(t, probe)
	ctx := context.Background()

	td.deploy(t, &vhivepb.FunctionSpec{Name: "count", Image: "localhost/vhive/counter:latest", Sandbox: "gvisor", StartMode: "snapshot"})
	first := td.invoke(t, "count", "")
	if !first.ColdStart || first.StartMode != "boot" || !strings.HasPrefix(string(first.Payload), "count=1 ") {
		t.Fatalf("first invocation = %+v, want a boot cold start answering count=1", first)
	}
	snap := td.waitSnapshot(t, "count")
	if snap.Backend != "gvisor" || snap.Restore != "eager" || snap.DiskBytes <= 0 {
		t.Fatalf("snapshot = %+v", snap)
	}
	insp, err := td.client.InspectSnapshot(ctx, &vhivepb.InspectSnapshotRequest{Id: snap.Id})
	if err != nil || !strings.Contains(insp.Details["note"], "eager") {
		t.Fatalf("inspect = %+v, %v (want the eager-restore note)", insp, err)
	}

	// The instance kept running after the snapshot (leave-running).
	warm := td.invoke(t, "count", "")
	if warm.ColdStart || !strings.HasPrefix(string(warm.Payload), "count=2 ") {
		t.Fatalf("warm after snapshot = %+v", warm)
	}
	// A cold start now restores: the counter continues from the snapshot.
	td.stopInstances(t, "count")
	restored := td.invoke(t, "count", "")
	if !restored.ColdStart || restored.StartMode != "snapshot" || !hasStage(restored, "RestoreSandbox") || hasStage(restored, "CreateSandbox") {
		t.Fatalf("cold start after snapshot = %+v, want a restore", restored)
	}
	if !strings.HasPrefix(string(restored.Payload), "count=2 ") || strings.TrimPrefix(string(restored.Payload), "count=2 ") != strings.TrimPrefix(string(first.Payload), "count=1 ") {
		t.Fatalf("restored instance answered %q; want count=2 with the same table checksum as %q", restored.Payload, first.Payload)
	}

	// A corrupt snapshot is never used: the cold start boots and a fresh
	// snapshot is taken.
	td.stopInstances(t, "count")
	var victim string
	for k := range insp.Details {
		if f, ok := strings.CutPrefix(k, "file "); ok && (victim == "" || strings.Contains(f, "pages")) {
			victim = f
		}
	}
	p := filepath.Join(insp.Path, victim)
	data, err := os.ReadFile(p)
	if err != nil || len(data) == 0 {
		t.Fatalf("read snapshot file %s: %v", p, err)
	}
	data[len(data)/2] ^= 0xff
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	fb := td.invoke(t, "count", "")
	if !fb.ColdStart || fb.StartMode != "boot" || !strings.HasPrefix(string(fb.Payload), "count=1 ") {
		t.Fatalf("cold start with a corrupt snapshot = %+v, want a boot", fb)
	}
	td.waitSnapshot(t, "count")

	// Deleting the snapshot directory under the live daemon: boots again.
	td.stopInstances(t, "count")
	ls, _ := td.client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: "count"})
	if err := os.RemoveAll(ls.Snapshots[0].Path); err != nil {
		t.Fatal(err)
	}
	gone := td.invoke(t, "count", "")
	if gone.StartMode != "boot" {
		t.Fatalf("cold start after the snapshot dir was deleted: mode %q, want boot", gone.StartMode)
	}
	td.waitSnapshot(t, "count")

	// Eight concurrent cold starts restore from one snapshot.
	td.deploy(t, &vhivepb.FunctionSpec{Name: "fan", Image: "localhost/vhive/probe:test", Sandbox: "gvisor", StartMode: "snapshot", MaxInstances: 8})
	td.invoke(t, "fan", "warm-up")
	td.waitSnapshot(t, "fan")
	td.stopInstances(t, "fan")
	var wg sync.WaitGroup
	results := make(chan *vhivepb.InvokeResponse, 8)
	for range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "fan", Payload: []byte("sleep:1500")})
			if err != nil {
				t.Error(err)
				return
			}
			results <- r
		}()
	}
	wg.Wait()
	close(results)
	n := 0
	for r := range results {
		n++
		if string(r.Payload) != "slept 1500" || !r.ColdStart || r.StartMode != "snapshot" {
			t.Errorf("concurrent restore: %+v", r)
		}
	}
	if n != 8 {
		t.Fatalf("%d of 8 concurrent cold starts answered", n)
	}

	// Removing the function removes its snapshots.
	if _, err := td.client.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: "fan"}); err != nil {
		t.Fatal(err)
	}
	if ls, _ := td.client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: "fan"}); len(ls.Snapshots) != 0 {
		t.Fatalf("snapshots of a removed function remain: %+v", ls.Snapshots)
	}

	// Snapshots survive a daemon restart.
	td.stopInstances(t, "count")
	td.stop()
	td2 := startDaemon(t, cfg)
	again := td2.invoke(t, "count", "")
	if again.StartMode != "snapshot" || !strings.HasPrefix(string(again.Payload), "count=2 ") {
		t.Fatalf("after daemon restart: %+v, want a restore answering count=2", again)
	}
}
