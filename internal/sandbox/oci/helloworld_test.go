package oci

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/sandbox"
)

// sayHello calls helloworld.Greeter/SayHello at endpoint, retrying while
// the function comes up.
func sayHello(t *testing.T, endpoint, name string) string {
	t.Helper()
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	c := helloworld.NewGreeterClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	for {
		r, err := c.SayHello(ctx, &helloworld.HelloRequest{Name: name}, grpc.WaitForReady(true))
		if err == nil {
			return r.GetMessage()
		}
		if ctx.Err() != nil {
			t.Fatalf("SayHello at %s: %v", endpoint, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// TestHelloworldFunction runs the real helloworld function (built by
// functions/build) in both runtimes and calls it over gRPC, as the
// orchestrator does; for gVisor also after a snapshot/restore.
func TestHelloworldFunction(t *testing.T) {
	rootfs := t.TempDir()
	for _, d := range []string{"bin", "etc", "tmp"} {
		if err := os.MkdirAll(filepath.Join(rootfs, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := build.BuildBinary(context.Background(), build.Options{Function: "helloworld"}, build.TargetLinux, filepath.Join(rootfs, "bin/helloworld")); err != nil {
		t.Fatal(err)
	}
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			ctx := context.Background()
			spec := sandbox.Spec{
				ID: "hello-" + rt, Function: "helloworld", Rootfs: rootfs,
				Process: sandbox.Process{Args: []string{"/bin/helloworld"}}, Port: build.GuestPort,
			}
			sb := e.start(t, spec)
			if got := sayHello(t, sb.Endpoint(), "vhive"); got != "Hello, vhive!" {
				t.Fatalf("SayHello = %q", got)
			}
			if rt != RuntimeGVisor {
				return
			}
			dir := t.TempDir()
			if err := sb.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
				t.Fatal(err)
			}
			rspec := spec
			rspec.ID = "hello-restored"
			rs, err := e.b.Restore(ctx, rspec, dir, sandbox.RestoreOptions{Mode: sandbox.MemoryEager})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { _ = rs.Stop(context.Background()) })
			if got := sayHello(t, rs.Endpoint(), "restored"); got != "Hello, restored!" {
				t.Fatalf("SayHello after restore = %q", got)
			}
		})
	}
}
