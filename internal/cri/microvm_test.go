package cri

import (
	"context"
	"log/slog"
	"os"
	"path/filepath"
	"testing"

	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox/microvm"
)

// microvmFunctions is a functionsFactory for the microvm backend (QEMU with
// TCG), from the guest assets `make microvm` cached under $VHIVE_CACHE. It
// skips where they are missing, except in CI (make test builds them).
func microvmFunctions(t testing.TB, pool *netpool.Pool, dir string) FunctionBackend {
	t.Helper()
	cache := os.Getenv("VHIVE_CACHE")
	if cache == "" {
		cache = "/var/cache/vhive"
	}
	m, err := assets.Load(assets.Dir(cache))
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("microVM guest assets: %v (make test runs make microvm first)", err)
		}
		t.Skipf("microVM guest assets: %v (run make microvm)", err)
	}
	be, err := microvm.New(context.Background(), microvm.Config{Root: filepath.Join(dir, "microvm"), Assets: m,
		NetPool: pool, Accel: microvm.AccelTCG, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = be.Cleanup(context.Background()) })
	return be
}

// TestKnativeRoutingMicroVM: a Knative user-container runs in a microVM
// (vHive's isolation model) behind the same CRI flow as with runc: the
// queue-proxy gets GUEST_ADDR/GUEST_PORT of the guest, which answers there;
// the pod's removal ends QEMU and returns the netns.
func TestKnativeRoutingMicroVM(t *testing.T) {
	knativeRouting(t, newEnvWith(t, microvmFunctions))
}
