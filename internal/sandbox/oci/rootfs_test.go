package oci

import (
	"context"
	"os"
	"path/filepath"
	"testing"
)

// TestRootfsModes boots in every rootfs mode, writes a file inside the
// sandbox and checks that the image rootfs did not change.
func TestRootfsModes(t *testing.T) {
	for _, c := range []struct {
		rt   string
		mode RootfsMode
	}{
		{RuntimeRunc, RootfsOverlay}, {RuntimeRunc, RootfsCopy},
		{RuntimeGVisor, RootfsOverlay}, {RuntimeGVisor, RootfsCopy}, {RuntimeGVisor, RootfsDirect},
	} {
		t.Run(c.rt+"-"+string(c.mode), func(t *testing.T) {
			e := newEnv(t, c.rt, func(cfg *Config) { cfg.Rootfs = c.mode })
			ctx := context.Background()
			spec := e.spec("rootfs-" + string(c.mode))
			sb := e.start(t, spec)
			if got := get(t, sb.Endpoint(), "/write?path=/etc/written"); got != "ok" {
				t.Fatalf("/write = %q", got)
			}
			if _, err := os.Stat(filepath.Join(testRootfs, "etc/written")); !os.IsNotExist(err) {
				t.Fatalf("the sandbox wrote into the image rootfs (%v)", err)
			}
			if err := sb.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			e.assertClean(t, spec.ID)
		})
	}
	if _, err := New(context.Background(), Config{Runtime: RuntimeRunc, Binary: "/bin/true", Root: t.TempDir(), NetPool: newEnv(t, RuntimeRunc).pool, Rootfs: RootfsDirect}); err == nil {
		t.Error("RootfsDirect with runc accepted")
	}
	if _, err := New(context.Background(), Config{Runtime: RuntimeGVisor, Binary: "/bin/true", Root: t.TempDir(), NetPool: newEnv(t, RuntimeRunc).pool, Rootfs: RootfsDirect, RunscFlags: []string{"--overlay2=none"}}); err == nil {
		t.Error("RootfsDirect with --overlay2=none accepted")
	}
}
