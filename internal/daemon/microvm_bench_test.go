package daemon

import (
	"testing"
	"time"

	"vhive.dev/vhive/internal/microvm/assets"
)

// BenchmarkMicroVMWarmInvoke: a warm SayHello of helloworld in a microVM
// (booted once, then kept warm), each iteration made three ways on the same
// instance, one after the other:
//
//   - direct: the benchmark's own gRPC connection (kept open) to the
//     instance's endpoint (the guest's address in its netns, through the
//     bridge and tap to QEMU's virtio-net): the floor.
//   - gateway: the benchmark's gRPC connection (kept open) to the daemon's
//     gateway, routed by :authority to the function; the daemon forwards it
//     on its own connection to the same endpoint (vSwarm's invoker path).
//   - control: the control API's Invoke (unix socket) with a payload; the
//     daemon calls SayHello on the instance and returns its reply (the
//     CLI's `vhive invoke` path).
//
// Reported: the medians of each and the median per-iteration differences
// (gateway-added, control-added), in µs. Issue 17's target: ≤ 300 µs added.
//
//	go test -run '^$' -bench MicroVMWarmInvoke -benchtime 200x ./internal/daemon/
func BenchmarkMicroVMWarmInvoke(b *testing.B) {
	if _, err := assets.Load(assets.Dir(cacheDir())); err != nil {
		b.Skipf("microVM guest assets: %v (run `make microvm`)", err)
	}
	hello := shared.Helloworld(b)
	cfg := baseConfig(b, b.TempDir())
	cfg.Sandboxes = []string{"microvm"}
	cfg.ReadyTimeout = 5 * time.Minute
	cfg.QueueTimeout = 5 * time.Minute
	td := startDaemon(b, cfg)
	td.importImage(b, hello)
	// More warm-up calls than gVisor's: TCG translates the guest's code on
	// first use.
	benchWarmPaths(b, td, "microvm", 50)
}
