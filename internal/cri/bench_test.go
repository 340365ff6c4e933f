package cri

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/testutil"
)

// BenchmarkContainerRun measures one container of a vhive-handler pod
// through the CRI — CreateContainer, StartContainer, its process (`true`)
// exiting, RemoveContainer — against the floor measured in the same run:
// `runc run` of a prepared bundle running the same `true`.
func BenchmarkContainerRun(b *testing.B) {
	b.Run("cri", func(b *testing.B) {
		e := newEnv(b)
		ctx := context.Background()
		podID, pc := runVhivePod(b, e, "bench")
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			cc := busybox(fmt.Sprintf("c%d", i), "true")
			cc.LogPath = ""
			cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: cc, SandboxConfig: pc})
			if err != nil {
				b.Fatal(err)
			}
			if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
				b.Fatal(err)
			}
			<-e.srv.lookup(cr.GetContainerId()).done
			if _, err := e.rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("runc-floor", func(b *testing.B) {
		e := newEnv(b)
		ctx := context.Background()
		// One bundle made by the server (same spec and overlay rootfs).
		podID, pc2 := runVhivePod(b, e, "floor2")
		cc := busybox("floor", "true")
		cc.LogPath = ""
		cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: cc, SandboxConfig: pc2})
		if err != nil {
			b.Fatal(err)
		}
		dir := filepath.Join(e.state, "containers", cr.GetContainerId())
		root := b.TempDir()
		runc := testutil.RuncPath(b)
		b.ResetTimer()
		for i := 0; i < b.N; i++ {
			cmd := exec.Command(runc, "--root", root, "run", "--bundle", dir, fmt.Sprintf("floor-%d", i))
			if out, err := cmd.CombinedOutput(); err != nil {
				b.Fatalf("runc run: %v: %s", err, out)
			}
		}
		b.StopTimer()
		if _, err := e.rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
			b.Fatal(err)
		}
		_ = os.RemoveAll(root)
	})
}
