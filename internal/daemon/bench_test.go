package daemon

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"testing"
	"time"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"vhive.dev/vhive/api/proto/helloworld"
	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/netpool"
)

// Benchmarks of the whole daemon against the raw floor measured in the same
// run. Run with
//
//	go test -run '^$' -bench . -benchtime 10x ./internal/daemon/
//
// ColdStartVsBareRunsc: request in → reply out of a boot cold start through
// the daemon, against `runsc run` of the same bundle (the config.json the
// daemon generated, in a fresh netns of the same kind) until the function
// answers its first SayHello. WarmInvoke: a warm invocation through the
// control API and through the gateway, against calling the function's gRPC
// server directly.

func median(d []time.Duration) time.Duration {
	s := append([]time.Duration(nil), d...)
	sort.Slice(s, func(i, j int) bool { return s[i] < s[j] })
	return s[len(s)/2]
}

// sayHelloUntilReply polls a TCP connect (as the daemon's ConnectFuncClient
// does: gRPC's reconnect backoff would add a second) until the function
// listens, then calls SayHello.
func sayHelloUntilReply(ctx context.Context, addr string) error {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if ctx.Err() != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	c := helloworld.NewGreeterClient(conn)
	for {
		_, err := c.SayHello(ctx, &helloworld.HelloRequest{Name: "bench"}, grpc.WaitForReady(true))
		if err == nil {
			return nil
		}
		if ctx.Err() != nil {
			return err
		}
		time.Sleep(time.Millisecond)
	}
}

func BenchmarkColdStartVsBareRunsc(b *testing.B) {
	hello := shared.Helloworld(b)
	cfg := daemonConfig(b, b.TempDir())
	td := startDaemon(b, cfg)
	td.importImage(b, hello)
	ctx := context.Background()
	td.deploy(b, &vhivepb.FunctionSpec{Name: "hello", Image: "localhost/vhive/helloworld:latest", Sandbox: "gvisor"})
	first := td.invoke(b, "hello", "x")
	tmpl, err := os.ReadFile(filepath.Join(cfg.StateDir, "sandboxes", "gvisor", "bundles", first.InstanceId, "config.json"))
	if err != nil {
		b.Fatalf("read the daemon's bundle: %v", err)
	}

	if err := netpool.Cleanup(ctx, testNetPrefix("vtb")); err != nil {
		b.Fatal(err)
	}
	pool, err := netpool.New(ctx, netpool.Options{Size: 1, Prefix: testNetPrefix("vtb"), Subnet: netip.MustParsePrefix("10.99.0.0/24")})
	if err != nil {
		b.Fatal(err)
	}
	defer pool.Close(ctx)
	bareRoot := b.TempDir()
	img, err := td.d.Images().Get(ctx, "localhost/vhive/helloworld:latest")
	if err != nil {
		b.Fatal(err)
	}
	// The daemon's instance rootfs is an overlay of the image rootfs that
	// goes away with the instance: mount an equivalent one for the floor.
	rootfs := filepath.Join(bareRoot, "rootfs")
	for _, d := range []string{rootfs, filepath.Join(bareRoot, "upper"), filepath.Join(bareRoot, "work")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			b.Fatal(err)
		}
	}
	if err := unix.Mount("overlay", rootfs, "overlay", 0, fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", img.Rootfs, bareRoot, bareRoot)); err != nil {
		b.Fatal(err)
	}
	defer unix.Unmount(rootfs, unix.MNT_DETACH)
	defer func() {
		// runsc leaves a null-netns bind mount in its state dir.
		_ = unix.Unmount(filepath.Join(bareRoot, "state", "null-netns"), unix.MNT_DETACH)
	}()
	bare := func(i int) time.Duration {
		n, err := pool.Get(ctx)
		if err != nil {
			b.Fatal(err)
		}
		defer pool.Put(ctx, n)
		var s specs.Spec
		if err := json.Unmarshal(tmpl, &s); err != nil {
			b.Fatal(err)
		}
		for j, ns := range s.Linux.Namespaces {
			if ns.Type == specs.NetworkNamespace {
				s.Linux.Namespaces[j].Path = n.NsPath
			}
		}
		s.Root.Path = rootfs
		s.Linux.CgroupsPath = fmt.Sprintf("/vhive-bench/bare-%d", i)
		bundle := filepath.Join(bareRoot, fmt.Sprint(i))
		if err := os.MkdirAll(bundle, 0o700); err != nil {
			b.Fatal(err)
		}
		data, _ := json.Marshal(&s)
		if err := os.WriteFile(filepath.Join(bundle, "config.json"), data, 0o600); err != nil {
			b.Fatal(err)
		}
		id := fmt.Sprintf("bare-%d-%d", os.Getpid(), i)
		args := []string{"--root", filepath.Join(bareRoot, "state"), "--platform=systrap", "--network=sandbox", "--overlay2=root:memory"}
		t0 := time.Now()
		// The container inherits runsc's stdio: a file, not a pipe, or
		// waiting for the pipe to close would wait for the container.
		logf, err := os.Create(filepath.Join(bundle, "log"))
		if err != nil {
			b.Fatal(err)
		}
		run := exec.Command(cfg.RunscPath, append(args, "run", "--detach", "--bundle", bundle, id)...)
		run.Stdout, run.Stderr = logf, logf
		err = run.Run()
		logf.Close()
		if err != nil {
			out, _ := os.ReadFile(filepath.Join(bundle, "log"))
			b.Fatalf("runsc run: %v\n%s", err, out)
		}
		cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err = sayHelloUntilReply(cctx, n.GuestIP.String()+":50051")
		cancel()
		d := time.Since(t0)
		_ = exec.Command(cfg.RunscPath, append(args, "delete", "--force", id)...).Run()
		if err != nil {
			b.Fatalf("bare runsc: function did not answer: %v", err)
		}
		return d
	}

	var viaDaemon, viaBare []time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		td.stopInstances(b, "hello")
		b.StartTimer()
		t0 := time.Now()
		r := td.invoke(b, "hello", "x")
		viaDaemon = append(viaDaemon, time.Since(t0))
		if !r.ColdStart {
			b.Fatal("not a cold start")
		}
		viaBare = append(viaBare, bare(i))
	}
	b.StopTimer()
	md, mb := median(viaDaemon), median(viaBare)
	b.ReportMetric(float64(md.Microseconds())/1000, "daemon-ms")
	b.ReportMetric(float64(mb.Microseconds())/1000, "bare-runsc-ms")
	b.ReportMetric(float64(md)/float64(mb), "ratio")
}

func BenchmarkWarmInvoke(b *testing.B) {
	hello := shared.Helloworld(b)
	td := startDaemon(b, daemonConfig(b, b.TempDir()))
	td.importImage(b, hello)
	benchWarmPaths(b, td, "gvisor", 20)
}

// benchWarmPaths deploys helloworld on sandbox in td, makes it warm, then
// times each iteration's SayHello three ways on that one instance: direct
// to its endpoint, through the gateway (by :authority) and through the
// control API's Invoke. It reports each path's median and the medians of
// the per-iteration differences to direct (gateway-added, control-added):
// each iteration's three calls see the same machine load. warmups calls on
// every path come first.
func benchWarmPaths(b *testing.B, td *testDaemon, sandbox string, warmups int) {
	ctx := context.Background()
	td.deploy(b, &vhivepb.FunctionSpec{Name: "hello", Image: "localhost/vhive/helloworld:latest", Sandbox: sandbox})
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
	for range warmups {
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

// BenchmarkGVisorBootVsRestore: cold start (request in → reply out) of a
// function in gVisor booted, against restored from its snapshot, for
// helloworld and for heavyinit (≈160 MiB heap built at start-up) — where
// snapshots win and where they do not.
func BenchmarkGVisorBootVsRestore(b *testing.B) {
	for _, fn := range []string{"helloworld", "heavyinit"} {
		b.Run(fn, func(b *testing.B) {
			dir := shared.Function(b, fn, false)
			cfg := daemonConfig(b, b.TempDir())
			cfg.NetPoolSize = 2
			td := startDaemon(b, cfg)
			im := td.importImage(b, dir)
			for _, mode := range []string{"boot", "snapshot"} {
				td.deploy(b, &vhivepb.FunctionSpec{Name: "f-" + mode, Image: im.Ref, Sandbox: "gvisor", StartMode: mode, MemoryLimitMib: 768})
			}
			td.invoke(b, "f-snapshot", "x")
			td.waitSnapshot(b, "f-snapshot")
			var boot, restore []time.Duration
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for _, mode := range []string{"boot", "snapshot"} {
					b.StopTimer()
					td.stopInstances(b, "f-"+mode)
					b.StartTimer()
					t0 := time.Now()
					r := td.invoke(b, "f-"+mode, "x")
					d := time.Since(t0)
					if r.StartMode != mode {
						b.Fatalf("f-%s started as %s", mode, r.StartMode)
					}
					if mode == "boot" {
						boot = append(boot, d)
					} else {
						restore = append(restore, d)
					}
				}
			}
			b.StopTimer()
			mb, mr := median(boot), median(restore)
			b.ReportMetric(float64(mb.Microseconds())/1000, "boot-ms")
			b.ReportMetric(float64(mr.Microseconds())/1000, "restore-ms")
			b.ReportMetric(float64(mb)/float64(mr), "boot/restore")
		})
	}
}
