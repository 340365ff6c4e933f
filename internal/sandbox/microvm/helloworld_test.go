package microvm

import (
	"context"
	"log/slog"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/sandbox"
)

// sayHello calls helloworld.Greeter/SayHello at endpoint once (the sandbox
// already listens when Start or Restore returns).
func sayHello(t *testing.T, endpoint, name string) string {
	t.Helper()
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r, err := helloworld.NewGreeterClient(conn).SayHello(ctx, &helloworld.HelloRequest{Name: name})
	if err != nil {
		t.Fatalf("SayHello at %s: %v", endpoint, err)
	}
	return r.GetMessage()
}

// TestHelloworldImage runs the helloworld function image as the daemon
// would: built by functions/build (as tools/mkimage does), imported and
// unpacked by internal/image, its config turned into the Process; then
// snapshot → restore → SayHello.
func TestHelloworldImage(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	out := t.TempDir()
	imgs, err := build.BuildFunction(ctx, build.Options{Function: "helloworld", Targets: []build.Target{build.TargetLinux},
		Formats: []build.Format{build.FormatLayout}, OutDir: out})
	if err != nil {
		t.Fatal(err)
	}
	svc, err := image.New(ctx, image.Options{Root: filepath.Join(out, "store"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { svc.Close() })
	img, err := svc.Import(ctx, imgs[0].Layout, imgs[0].Ref)
	if err != nil {
		t.Fatal(err)
	}
	spec := sandbox.Spec{
		ID: "hello", Function: "helloworld", ImageDigest: img.Digest, Rootfs: img.Rootfs,
		Process: sandbox.Process{
			Args: append(append([]string(nil), img.Config.Entrypoint...), img.Config.Cmd...),
			Env:  img.Config.Env, Cwd: img.Config.WorkingDir, User: img.Config.User,
		},
		Port: build.GuestPort,
	}
	sb := e.start(t, spec)
	if got := sayHello(t, sb.Endpoint(), "vhive"); got != "Hello, vhive!" {
		t.Fatalf("SayHello = %q", got)
	}
	dir := t.TempDir()
	if err := sb.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatal(err)
	}
	rspec := spec
	rspec.ID = "hello-restored"
	t0 := time.Now()
	rs, err := e.b.Restore(ctx, rspec, dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rs.Stop(context.Background()) })
	if got := sayHello(t, rs.Endpoint(), "restored"); got != "Hello, restored!" {
		t.Fatalf("SayHello after restore = %q", got)
	}
	t.Logf("restore (lazy) to first SayHello reply: %s", time.Since(t0).Round(time.Millisecond))
}
