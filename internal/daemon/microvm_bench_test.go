package daemon

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"vhive.dev/vhive/api/proto/helloworld"
	vhivepb "vhive.dev/vhive/api/proto/vhive"
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
	ctx := context.Background()
	td.deploy(b, &vhivepb.FunctionSpec{Name: "hello", Image: "localhost/vhive/helloworld:latest", Sandbox: "microvm"})
	td.invoke(b, "hello", "x")
	insts, err := td.client.ListInstances(ctx, &vhivepb.ListInstancesRequest{Function: "hello"})
	if err != nil || len(insts.Instances) != 1 {
		b.Fatalf("instances: %v %v", insts, err)
	}
	direct, err := grpc.NewClient("passthrough:///"+insts.Instances[0].Endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	defer direct.Close()
	gw, err := grpc.NewClient("passthrough:///"+td.gateway, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("hello"))
	if err != nil {
		b.Fatal(err)
	}
	defer gw.Close()
	dc, gc := helloworld.NewGreeterClient(direct), helloworld.NewGreeterClient(gw)
	req := &helloworld.HelloRequest{Name: "x"}
	// Warm all three paths (TCG translates the guest's code on first use).
	for range 50 {
		if _, err := dc.SayHello(ctx, req); err != nil {
			b.Fatal(err)
		}
		if _, err := gc.SayHello(ctx, req); err != nil {
			b.Fatal(err)
		}
		td.invoke(b, "hello", "x")
	}
	var tDirect, tGateway, tControl []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		t0 := time.Now()
		if _, err := dc.SayHello(ctx, req); err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		if _, err := gc.SayHello(ctx, req); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		if r := td.invoke(b, "hello", "x"); r.ColdStart {
			b.Fatal("cold start during the warm benchmark")
		}
		t3 := time.Now()
		tDirect, tGateway, tControl = append(tDirect, t1.Sub(t0)), append(tGateway, t2.Sub(t1)), append(tControl, t3.Sub(t2))
	}
	b.StopTimer()
	b.ReportMetric(float64(median(tDirect).Microseconds()), "direct-p50-µs")
	b.ReportMetric(float64(median(tGateway).Microseconds()), "gateway-p50-µs")
	b.ReportMetric(float64(median(tControl).Microseconds()), "control-p50-µs")
	addG, addC := make([]time.Duration, len(tDirect)), make([]time.Duration, len(tDirect))
	for i := range tDirect {
		addG[i], addC[i] = tGateway[i]-tDirect[i], tControl[i]-tDirect[i]
	}
	b.ReportMetric(float64(median(addG).Microseconds()), "gateway-added-µs")
	b.ReportMetric(float64(median(addC).Microseconds()), "control-added-µs")
}
