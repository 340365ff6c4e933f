package daemon

import (
	"context"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// TestMicroVMReap runs helloworld in a microVM in start mode reap through
// the daemon: a boot and its snapshot, a record restore whose working set
// the orchestrator commits to the snapshot, then prefetch restores that
// report the working set's pages, read it without falling back, and
// answer as the boot did.
func TestMicroVMReap(t *testing.T) {
	cfg := baseConfig(t, t.TempDir())
	cfg.Sandboxes = []string{"microvm"}
	cfg.QueueTimeout = 3 * time.Minute // a TCG boot takes 5–40 s on a loaded host
	td := startDaemon(t, cfg)
	im := td.importImage(t, shared.Helloworld(t))
	ctx := context.Background()
	td.deploy(t, &vhivepb.FunctionSpec{Name: "hm", Image: im.Ref, Sandbox: "microvm", StartMode: "reap"})
	first := td.invoke(t, "hm", "reap")
	if !first.ColdStart || first.StartMode != "boot" {
		t.Fatalf("first = %+v", first)
	}
	td.waitSnapshot(t, "hm")
	for i, want := range []string{"reap-record", "reap-prefetch", "reap-prefetch"} {
		td.stopInstances(t, "hm")
		r := td.invoke(t, "hm", "reap")
		if !r.ColdStart || r.StartMode != want || !hasStage(r, "RestoreSandbox") {
			t.Fatalf("restore %d = %+v, want a %s cold start", i+1, r, want)
		}
		if string(r.Payload) != string(first.Payload) {
			t.Fatalf("restore %d answered %q, the boot %q", i+1, r.Payload, first.Payload)
		}
		t.Logf("restore %d (%s): memory stats %v", i+1, want, r.MemoryStats)
		switch want {
		case "reap-record":
			deadline := time.Now().Add(60 * time.Second)
			for {
				ls, err := td.client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: "hm"})
				if err != nil {
					t.Fatal(err)
				}
				if len(ls.Snapshots) == 1 && ls.Snapshots[0].WorkingSet {
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("working set not recorded 60 s after the record run")
				}
				time.Sleep(100 * time.Millisecond)
			}
		case "reap-prefetch":
			if r.MemoryStats["RecPages"] <= 0 || r.MemoryStats["BytesRead"] <= 0 || r.MemoryStats["PrefetchFallback"] != 0 {
				t.Fatalf("prefetch restore %d: memory stats %v, want WS pages read and no fallback", i+1, r.MemoryStats)
			}
		}
	}
}
