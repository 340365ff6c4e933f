package python

import (
	"context"
	"path/filepath"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/build"
)

// goTwins are the Go functions that do the Python suite's work (pyaes ↔
// aes) and so run on wasm too.
var goTwins = []string{"image-rotate", "chameleon", "lr-serving", "json-serdes", "aes"}

// TestGoTwinsAcrossRestores: each Go twin answers both input sets the same
// after a wasm lazy restore, a REAP record restore and a REAP prefetch
// restore that serves the other input set first, after a gVisor snapshot
// restore, on runc, and after a microvm boot and snapshot restore, as
// after a wasm boot.
func TestGoTwinsAcrossRestores(t *testing.T) {
	out := t.TempDir()
	mvm, mvmMissing := microvmSandbox()
	td := startDaemon(t, 23, append([]string{"gvisor", "runc", "wasm"}, mvm...)...)
	ctx := context.Background()
	for _, fn := range goTwins {
		t.Run(fn, func(t *testing.T) {
			imgs, err := build.BuildFunction(ctx, build.Options{Function: fn, OutDir: out,
				Targets: []build.Target{build.TargetLinux, build.TargetWasm}, Formats: []build.Format{build.FormatLayout}})
			if err != nil {
				t.Fatal(err)
			}
			refs := map[build.Target]string{}
			for _, img := range imgs {
				if _, err := td.client.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: img.Layout}); err != nil {
					t.Fatalf("import %s: %v", filepath.Base(img.Layout), err)
				}
				refs[img.Target] = img.Ref
			}
			sets := []string{"record", "replay"}
			booted := map[string]string{}
			check := func(t *testing.T, where, fnName string, first string, wantMode string) {
				t.Helper()
				resp := td.invoke(t, fnName, first)
				if wantMode != "" && (!resp.ColdStart || resp.StartMode != wantMode) {
					t.Fatalf("%s: cold=%v mode=%q, want a %s cold start", where, resp.ColdStart, resp.StartMode, wantMode)
				}
				got := map[string]string{first: string(resp.Payload)}
				for _, p := range sets {
					if p != first {
						got[p] = string(td.invoke(t, fnName, p).Payload)
					}
				}
				for _, p := range sets {
					if got[p] != booted[p] {
						t.Errorf("%s: %q answers %q; a wasm boot %q", where, p, got[p], booted[p])
					}
				}
				t.Logf("%s: %v total", where, stage(resp, "Total"))
			}

			// wasm boot → the reference answers; then lazy restores.
			wl := fn + "-wl"
			td.deploy(t, &vhivepb.FunctionSpec{Name: wl, Image: refs[build.TargetWasm], Sandbox: "wasm", StartMode: "lazy"})
			for _, p := range sets {
				booted[p] = string(td.invoke(t, wl, p).Payload)
			}
			if booted["record"] == booted["replay"] {
				t.Fatalf("both input sets answer %q", booted["record"])
			}
			td.waitSnapshot(t, wl)
			td.stopInstances(t, wl)
			check(t, "wasm lazy restore", wl, "record", "lazy")

			// REAP: the first restore records the working set of "record";
			// the next prefetches it and serves "replay" first, then
			// "record" again.
			wr := fn + "-wr"
			td.deploy(t, &vhivepb.FunctionSpec{Name: wr, Image: refs[build.TargetWasm], Sandbox: "wasm", StartMode: "reap"})
			check(t, "wasm boot (reap function)", wr, "record", "boot")
			td.waitSnapshot(t, wr)
			td.stopInstances(t, wr)
			check(t, "wasm reap record restore", wr, "record", "reap-record")
			waitWorkingSet(t, td, wr)
			td.stopInstances(t, wr)
			check(t, "wasm reap prefetch restore", wr, "replay", "reap-prefetch")

			// The Linux build on gVisor (boot, then a snapshot restore) and runc.
			g := fn + "-g"
			td.deploy(t, &vhivepb.FunctionSpec{Name: g, Image: refs[build.TargetLinux], Sandbox: "gvisor", StartMode: "snapshot"})
			check(t, "gvisor boot", g, "record", "boot")
			td.waitSnapshot(t, g)
			td.stopInstances(t, g)
			check(t, "gvisor snapshot restore", g, "replay", "snapshot")
			r := fn + "-r"
			td.deploy(t, &vhivepb.FunctionSpec{Name: r, Image: refs[build.TargetLinux], Sandbox: "runc"})
			check(t, "runc boot", r, "record", "boot")
			t.Run("microvm", func(t *testing.T) {
				requiresMicroVM(t, mvmMissing)
				m := fn + "-m"
				td.deploy(t, &vhivepb.FunctionSpec{Name: m, Image: refs[build.TargetLinux], Sandbox: "microvm", StartMode: "snapshot"})
				defer func() {
					if _, err := td.client.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: m}); err != nil {
						t.Errorf("rm %s: %v", m, err)
					}
				}()
				check(t, "microvm boot", m, "record", "boot")
				td.waitSnapshot(t, m)
				td.stopInstances(t, m)
				check(t, "microvm snapshot restore", m, "replay", "snapshot")
			})
			for _, f := range []string{wl, wr, g, r} {
				if _, err := td.client.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: f}); err != nil {
					t.Errorf("rm %s: %v", f, err)
				}
			}
		})
	}
}

// waitWorkingSet waits until fn's snapshot has a committed REAP working set.
func waitWorkingSet(t *testing.T, td *testDaemon, fn string) {
	t.Helper()
	deadline := time.Now().Add(time.Minute)
	for {
		ls, err := td.client.ListSnapshots(context.Background(), &vhivepb.ListSnapshotsRequest{Function: fn})
		if err != nil {
			t.Fatal(err)
		}
		if len(ls.Snapshots) == 1 && ls.Snapshots[0].WorkingSet {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: no working set a minute after the record run", fn)
		}
		time.Sleep(100 * time.Millisecond)
	}
}
