package daemon

import (
	"context"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

func wasmConfig(t testing.TB) Config {
	cfg := daemonConfig(t, t.TempDir())
	cfg.Sandboxes = []string{"wasm"}
	return cfg
}

// TestWasmStartModes runs the counter function in the wasm sandbox in every
// start mode: its count and its table checksum continue across snapshot and
// restore, and REAP records on the first restore and prefetches after.
func TestWasmStartModes(t *testing.T) {
	counter := shared.Function(t, "counter", true)
	td := startDaemon(t, wasmConfig(t))
	im := td.importImage(t, counter)
	if im.Kind != "wasm" {
		t.Fatalf("imported %+v, want a wasm image", im)
	}
	ctx := context.Background()

	for _, mode := range []string{"boot", "snapshot", "lazy", "reap"} {
		t.Run(mode, func(t *testing.T) {
			name := "count-" + mode
			td.deploy(t, &vhivepb.FunctionSpec{Name: name, Image: im.Ref, Sandbox: "wasm", StartMode: mode})
			first := td.invoke(t, name, "")
			if !first.ColdStart || first.StartMode != "boot" || !strings.HasPrefix(string(first.Payload), "count=1 ") {
				t.Fatalf("first = %+v", first)
			}
			checksum := strings.TrimPrefix(string(first.Payload), "count=1 ")
			if mode == "boot" {
				td.stopInstances(t, name)
				again := td.invoke(t, name, "")
				if again.StartMode != "boot" || string(again.Payload) != string(first.Payload) {
					t.Fatalf("boot mode after stop = %+v", again)
				}
				return
			}
			td.waitSnapshot(t, name)
			wantModes := map[string][]string{"snapshot": {"snapshot", "snapshot"}, "lazy": {"lazy", "lazy"}, "reap": {"reap-record", "reap-prefetch", "reap-prefetch"}}[mode]
			for i, want := range wantModes {
				td.stopInstances(t, name)
				r := td.invoke(t, name, "")
				if !r.ColdStart || r.StartMode != want || !hasStage(r, "RestoreSandbox") {
					t.Fatalf("restore %d = %+v, want a %s cold start", i+1, r, want)
				}
				if got := string(r.Payload); got != "count=2 "+checksum {
					t.Fatalf("restore %d answered %q, want %q: state did not continue", i+1, got, "count=2 "+checksum)
				}
				// The restored instance keeps its state across calls.
				if w := td.invoke(t, name, ""); w.ColdStart || !strings.HasPrefix(string(w.Payload), "count=3 ") {
					t.Fatalf("warm after restore %d = %+v", i+1, w)
				}
				// The wasm worker reports the function's own time; it is
				// part of FuncInvocation.
				if g, ok := r.MemoryStats["GuestTimeUs"]; !ok || g <= 0 || g > stageMicros(r, "FuncInvocation") {
					t.Fatalf("restore %d: GuestTimeUs %d (reported %v) not within FuncInvocation %d µs", i+1, g, ok, stageMicros(r, "FuncInvocation"))
				}
				if want == "reap-prefetch" && r.MemoryStats["RecPages"] <= 0 {
					t.Fatalf("prefetch restore reported no working-set pages: %v", r.MemoryStats)
				}
				if want == "reap-record" {
					// Wait for the working set to be committed.
					deadline := time.Now().Add(30 * time.Second)
					for {
						ls, err := td.client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: name})
						if err != nil {
							t.Fatal(err)
						}
						if len(ls.Snapshots) == 1 && ls.Snapshots[0].WorkingSet {
							break
						}
						if time.Now().After(deadline) {
							t.Fatal("working set not recorded 30s after the record run")
						}
						time.Sleep(100 * time.Millisecond)
					}
				}
			}
		})
	}

	// gVisor-only snapshot details do not leak: wasm restores are lazy.
	ls, err := td.client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: "count-reap"})
	if err != nil || len(ls.Snapshots) != 1 || ls.Snapshots[0].Restore != "lazy" || !ls.Snapshots[0].WorkingSet {
		t.Fatalf("reap snapshot = %+v, %v", ls, err)
	}
}

// TestWasmCorruptSnapshotBoots: a corrupt memory file is detected and the
// cold start boots instead, then a fresh snapshot is taken.
func TestWasmCorruptSnapshotBoots(t *testing.T) {
	counter := shared.Function(t, "counter", true)
	td := startDaemon(t, wasmConfig(t))
	im := td.importImage(t, counter)
	td.deploy(t, &vhivepb.FunctionSpec{Name: "c", Image: im.Ref, Sandbox: "wasm", StartMode: "lazy"})
	td.invoke(t, "c", "")
	snap := td.waitSnapshot(t, "c")
	var files []string
	_ = filepath.WalkDir(snap.Path, func(p string, d os.DirEntry, err error) error {
		if err == nil && !d.IsDir() && filepath.Base(p) != "manifest.json" {
			files = append(files, p)
		}
		return nil
	})
	if len(files) == 0 {
		t.Fatal("snapshot has no files")
	}
	for _, p := range files {
		data, err := os.ReadFile(p)
		if err != nil || len(data) == 0 {
			continue
		}
		data[len(data)/3] ^= 0x5a
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	td.stopInstances(t, "c")
	r := td.invoke(t, "c", "")
	if r.StartMode != "boot" || !strings.HasPrefix(string(r.Payload), "count=1 ") {
		t.Fatalf("cold start with a corrupt snapshot = %+v, want a boot", r)
	}
	td.waitSnapshot(t, "c")
	td.stopInstances(t, "c")
	if r := td.invoke(t, "c", ""); r.StartMode != "lazy" || !strings.HasPrefix(string(r.Payload), "count=2 ") {
		t.Fatalf("after the fresh snapshot = %+v", r)
	}
}
