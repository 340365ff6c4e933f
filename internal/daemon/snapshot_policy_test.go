package daemon

import (
	"context"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// TestSnapshotAfterFirstSuccess: with --start-mode snapshot, a first call
// that fails with the function's own error takes no snapshot; the next
// successful one does, and later cold starts restore from it.
func TestSnapshotAfterFirstSuccess(t *testing.T) {
	probe := shared.Probe(t)
	td := startDaemon(t, daemonConfig(t, t.TempDir()))
	td.importImage(t, probe)
	ctx := context.Background()
	td.deploy(t, &vhivepb.FunctionSpec{Name: "flaky", Image: "localhost/vhive/probe:test", Sandbox: "gvisor", StartMode: "snapshot"})

	_, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "flaky", Payload: []byte("fail-first")})
	if status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("first call: %v, want the function's FailedPrecondition", err)
	}
	ls, err := td.client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: "flaky"})
	if err != nil || len(ls.Snapshots) != 0 {
		t.Fatalf("after a failed first call: snapshots %v, %v; want none", ls.GetSnapshots(), err)
	}
	ok := td.invoke(t, "flaky", "fail-first")
	if ok.ColdStart || string(ok.Payload) != "ok after a failure" {
		t.Fatalf("second call = %+v, want a warm success", ok)
	}
	td.waitSnapshot(t, "flaky")
	td.stopInstances(t, "flaky")
	restored := td.invoke(t, "flaky", "x")
	if !restored.ColdStart || restored.StartMode != "snapshot" {
		t.Fatalf("after the snapshot: cold=%v mode %q, want a snapshot restore", restored.ColdStart, restored.StartMode)
	}
}

// TestRequestWaitsForSnapshot: a request that arrives while the only
// instance is being snapshotted waits for it (the snapshot takes less than
// a boot) instead of booting a second instance.
func TestRequestWaitsForSnapshot(t *testing.T) {
	probe := shared.Probe(t)
	td := startDaemon(t, daemonConfig(t, t.TempDir()))
	td.importImage(t, probe)
	td.deploy(t, &vhivepb.FunctionSpec{Name: "snap", Image: "localhost/vhive/probe:test", Sandbox: "gvisor", StartMode: "snapshot"})

	first := td.invoke(t, "snap", "x")
	if !first.ColdStart || first.StartMode != "boot" {
		t.Fatalf("first = %+v, want a boot", first)
	}
	// The snapshot starts as the first reply leaves; this request comes
	// while it is taken.
	second := td.invoke(t, "snap", "y")
	if second.ColdStart || second.InstanceId != first.InstanceId {
		t.Fatalf("request during the snapshot: cold=%v on %s, want warm on %s (it waits for the snapshot)", second.ColdStart, second.InstanceId, first.InstanceId)
	}
	td.waitSnapshot(t, "snap")
	in, err := td.client.ListInstances(context.Background(), &vhivepb.ListInstancesRequest{Function: "snap"})
	if err != nil || len(in.Instances) != 1 {
		t.Fatalf("instances %v, %v; want 1", in.GetInstances(), err)
	}
}
