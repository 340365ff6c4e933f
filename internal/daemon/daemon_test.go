package daemon

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/api/proto/helloworld"
	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/wasm/wasmtest"
)

func TestMain(m *testing.M) {
	// Re-exec'd as a wasm sandbox worker by the wasm backend.
	wasmtest.RunWorkerIfRequested()
	code := m.Run()
	shared.Cleanup()
	os.Exit(code)
}

var wantStages = []string{"GetImage", "CreateSandbox", "StartSandbox", "ConnectFuncClient", "FuncInvocation", "Total"}

func TestDeployInvokeColdWarm(t *testing.T) {
	hello := shared.Helloworld(t)
	cfg := daemonConfig(t, t.TempDir())
	cfg.Metrics = freePort(t)
	td := startDaemon(t, cfg)
	if fi, err := os.Stat(cfg.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("control socket mode = %v, %v; want 0600", fi.Mode(), err)
	}
	im := td.importImage(t, hello)
	if im.Ref != "localhost/vhive/helloworld:latest" || !strings.HasPrefix(im.Digest, "sha256:") {
		t.Fatalf("imported image = %+v", im)
	}
	for _, sb := range []string{"gvisor", "runc"} {
		t.Run(sb, func(t *testing.T) {
			name := "hello-" + sb
			td.deploy(t, &vhivepb.FunctionSpec{Name: name, Image: im.Ref, Sandbox: sb})
			cold := td.invoke(t, name, "world")
			if got := string(cold.Payload); got != "Hello, world!" {
				t.Fatalf("reply %q", got)
			}
			if !cold.ColdStart || cold.StartMode != "boot" {
				t.Fatalf("first invocation cold=%v mode=%q, want a boot cold start", cold.ColdStart, cold.StartMode)
			}
			var names []string
			var sum int64
			for _, st := range cold.Stages {
				names = append(names, st.Name)
				if st.Micros <= 0 {
					t.Errorf("stage %s took %d µs", st.Name, st.Micros)
				}
				if st.Name != "Total" {
					sum += st.Micros
				}
			}
			if strings.Join(names, ",") != strings.Join(wantStages, ",") {
				t.Fatalf("stages %v, want %v", names, wantStages)
			}
			if total := cold.Stages[len(cold.Stages)-1].Micros; total < sum {
				t.Fatalf("Total %d µs is less than the sum of the stages %d µs", total, sum)
			}
			warm := td.invoke(t, name, "again")
			if warm.ColdStart || warm.InstanceId != cold.InstanceId || len(warm.Stages) != 0 || string(warm.Payload) != "Hello, again!" {
				t.Fatalf("second invocation = %+v, want warm on instance %s", warm, cold.InstanceId)
			}
			ls, err := td.client.ListFunctions(context.Background(), &vhivepb.ListFunctionsRequest{})
			if err != nil {
				t.Fatal(err)
			}
			found := false
			for _, f := range ls.Functions {
				if f.Spec.Name == name {
					found = true
					if f.Instances != 1 || f.ColdStarts != 1 || f.WarmInvocations != 1 || f.Spec.Sandbox != sb {
						t.Fatalf("ls %s = %+v", name, f)
					}
				}
			}
			if !found {
				t.Fatalf("%s missing from ls", name)
			}
			insts, err := td.client.ListInstances(context.Background(), &vhivepb.ListInstancesRequest{Function: name, Stats: true})
			if err != nil || len(insts.Instances) != 1 || insts.Instances[0].RssBytes <= 0 || insts.Instances[0].PssBytes <= 0 {
				t.Fatalf("instances = %+v, %v", insts, err)
			}
		})
	}

	// vHive's data plane: FwdGreeter, and Greeter routed by :authority.
	conn, err := grpc.NewClient("passthrough:///"+td.gateway, grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithAuthority("hello-runc.default.example.com"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	fwd, err := helloworld.NewFwdGreeterClient(conn).FwdHello(context.Background(), &helloworld.FwdHelloReq{Id: "hello-runc", Payload: "fwd"})
	if err != nil || fwd.Payload != "Hello, fwd!" || fwd.IsColdStart {
		t.Fatalf("FwdHello = %+v, %v", fwd, err)
	}
	var hdr metadata.MD
	rep, err := helloworld.NewGreeterClient(conn).SayHello(context.Background(), &helloworld.HelloRequest{Name: "gw"}, grpc.Header(&hdr))
	if err != nil || rep.Message != "Hello, gw!" {
		t.Fatalf("gateway SayHello = %+v, %v", rep, err)
	}
	if v := hdr.Get("x-vhive-cold-start"); len(v) != 1 || v[0] != "false" {
		t.Fatalf("cold-start header = %v", v)
	}

	// Prometheus: stage histograms, cold/warm counts, live instances.
	resp, err := http.Get("http://" + cfg.Metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`vhive_coldstart_stage_seconds_count{function="hello-gvisor",mode="boot",stage="CreateSandbox"} 1`,
		`vhive_coldstart_stage_seconds_count{function="hello-runc",mode="boot",stage="Total"} 1`,
		`vhive_invocations_total{function="hello-runc",kind="cold"} 1`,
		`vhive_invocations_total{function="hello-runc",kind="warm"} 3`,
		`vhive_instances{function="hello-gvisor"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
}

func TestConcurrencyKeepaliveAndScaleToZero(t *testing.T) {
	probe := shared.Probe(t)
	td := startDaemon(t, daemonConfig(t, t.TempDir()))
	td.importImage(t, probe)
	ctx := context.Background()

	// concurrency 1, max 2 instances, 4 simultaneous slow requests: exactly
	// two instances start and every request is served.
	td.deploy(t, &vhivepb.FunctionSpec{Name: "capped", Image: "localhost/vhive/probe:test", Sandbox: "runc", MaxInstances: 2, Concurrency: 1})
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "capped", Payload: []byte("sleep:300")})
			if err == nil && string(resp.Payload) != "slept 300" {
				err = fmt.Errorf("reply %q", resp.Payload)
			}
			errs <- err
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Fatal(err)
		}
	}
	fs, err := td.client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range fs.Functions {
		if f.Spec.Name == "capped" && (f.Instances != 2 || f.ColdStarts != 2 || f.WarmInvocations != 2) {
			t.Fatalf("capped: %d instances, %d cold, %d warm; want 2, 2, 2", f.Instances, f.ColdStarts, f.WarmInvocations)
		}
	}

	// concurrency 4: four simultaneous requests share one instance.
	td.deploy(t, &vhivepb.FunctionSpec{Name: "shared", Image: "localhost/vhive/probe:test", Sandbox: "runc", Concurrency: 4})
	ids := make(chan string, 4)
	for range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			resp, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "shared", Payload: []byte("sleep:200")})
			if err != nil {
				t.Error(err)
				return
			}
			ids <- resp.InstanceId
		}()
	}
	wg.Wait()
	close(ids)
	seen := map[string]bool{}
	for id := range ids {
		seen[id] = true
	}
	if len(seen) != 1 {
		t.Fatalf("4 requests at concurrency 4 used %d instances, want 1", len(seen))
	}

	// keepalive 1s: the instance stops by itself; the next call is cold.
	td.deploy(t, &vhivepb.FunctionSpec{Name: "brief", Image: "localhost/vhive/probe:test", Sandbox: "runc", KeepaliveMs: 1000})
	first := td.invoke(t, "brief", "counter")
	if !first.ColdStart || string(first.Payload) != "1" {
		t.Fatalf("first = %+v", first)
	}
	deadline := time.Now().Add(20 * time.Second)
	for {
		in, err := td.client.ListInstances(ctx, &vhivepb.ListInstancesRequest{Function: "brief"})
		if err != nil {
			t.Fatal(err)
		}
		if len(in.Instances) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("instance of brief still running 20s after a 1s keepalive")
		}
		time.Sleep(200 * time.Millisecond)
	}
	again := td.invoke(t, "brief", "counter")
	if !again.ColdStart || string(again.Payload) != "1" || again.InstanceId == first.InstanceId {
		t.Fatalf("after scale to zero: %+v, want a cold start on a fresh instance", again)
	}

	// StopInstances scales to zero on demand.
	st, err := td.client.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: "shared"})
	if err != nil || st.Stopped != 1 {
		t.Fatalf("StopInstances = %+v, %v", st, err)
	}
}

func TestErrors(t *testing.T) {
	probe := shared.Probe(t)
	cfg := daemonConfig(t, t.TempDir())
	// Long enough for a gVisor sandbox to start and report its crash on a
	// loaded machine; the never-listening function waits this long.
	cfg.ReadyTimeout = 12 * time.Second
	cfg.MaxPayload = 1024
	td := startDaemon(t, cfg)
	td.importImage(t, probe)
	ctx := context.Background()
	code := func(err error) codes.Code { return status.Code(err) }

	_, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "nope"})
	if code(err) != codes.NotFound || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("unknown function: %v", err)
	}
	_, err = td.client.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "ghost", Image: "localhost/vhive/does-not-exist:1", Sandbox: "runc"}})
	if err == nil || !strings.Contains(err.Error(), "does-not-exist") {
		t.Fatalf("missing image: %v", err)
	}
	_, err = td.client.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "Bad_Name", Image: "localhost/vhive/probe:test"}})
	if code(err) != codes.InvalidArgument {
		t.Fatalf("bad name: %v", err)
	}
	_, err = td.client.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "lazyrunc", Image: "localhost/vhive/probe:test", Sandbox: "runc", StartMode: "reap"}})
	if code(err) != codes.Unimplemented {
		t.Fatalf("reap on runc: %v", err)
	}

	td.deploy(t, &vhivepb.FunctionSpec{Name: "ok", Image: "localhost/vhive/probe:test", Sandbox: "runc"})
	_, err = td.client.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "ok", Image: "localhost/vhive/probe:test"}})
	if code(err) != codes.AlreadyExists {
		t.Fatalf("duplicate deploy: %v", err)
	}
	_, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "ok", Payload: make([]byte, 2048)})
	if code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "2048") {
		t.Fatalf("oversize payload: %v", err)
	}

	for _, sb := range []string{"runc", "gvisor"} {
		name := "crash-" + sb
		td.deploy(t, &vhivepb.FunctionSpec{Name: name, Image: "localhost/vhive/probe:test", Sandbox: sb, Env: map[string]string{"PROBE_MODE": "crash"}})
		_, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: name})
		if code(err) != codes.Unavailable || !strings.Contains(err.Error(), "boom") {
			t.Fatalf("%s: crashing function: %v (want Unavailable with its stderr)", sb, err)
		}
	}

	td.deploy(t, &vhivepb.FunctionSpec{Name: "mute", Image: "localhost/vhive/probe:test", Sandbox: "runc", Env: map[string]string{"PROBE_MODE": "nolisten"}})
	_, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "mute"})
	if code(err) != codes.Unavailable || !strings.Contains(err.Error(), "never listened") {
		t.Fatalf("never-listening function: %v", err)
	}
	in, err := td.client.ListInstances(ctx, &vhivepb.ListInstancesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, i := range in.Instances {
		if i.Function != "ok" {
			t.Fatalf("failed start left instance %+v", i)
		}
	}

	// rm while a request is in flight: the request finishes, then the
	// function is gone.
	td.invoke(t, "ok", "warm-up")
	res := make(chan error, 1)
	go func() {
		r, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "ok", Payload: []byte("sleep:1500")})
		if err == nil && string(r.Payload) != "slept 1500" {
			err = fmt.Errorf("reply %q", r.Payload)
		}
		res <- err
	}()
	time.Sleep(300 * time.Millisecond)
	if _, err := td.client.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: "ok"}); err != nil {
		t.Fatal(err)
	}
	if err := <-res; err != nil {
		t.Fatalf("in-flight request during rm: %v", err)
	}
	if _, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "ok"}); code(err) != codes.NotFound {
		t.Fatalf("invoke after rm: %v", err)
	}
	// Other functions are untouched.
	fs, _ := td.client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if len(fs.Functions) != 3 {
		t.Fatalf("functions after rm: %d, want 3 (crash-runc, crash-gvisor, mute)", len(fs.Functions))
	}
}

func TestRestartCleansUp(t *testing.T) {
	probe := shared.Probe(t)
	state := t.TempDir()
	cfg := daemonConfig(t, state)
	cfg.NetPrefix = testNetPrefix("vtr")

	// A vhive daemon process on this state, killed with instances running.
	n := nodetest.Start(t, shared.Bin(t), nodetest.Options{StateDir: state, NetPrefix: cfg.NetPrefix, Subnet: cfg.Subnet.String(), NoGateway: true})
	c := n.Client
	ctx := context.Background()
	if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: probe}); err != nil {
		t.Fatal(err)
	}
	for _, sb := range []string{"runc", "gvisor"} {
		if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "p-" + sb, Image: "localhost/vhive/probe:test", Sandbox: sb}}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: "p-" + sb, Payload: []byte("counter")}); err != nil {
			t.Fatal(err)
		}
	}
	n.Kill(t)
	dead := nodetest.Snapshot(state, cfg.NetPrefix)
	if len(dead.Netns)+len(dead.Mounts) <= 1 {
		t.Fatalf("expected the killed daemon to leave instances behind, found only %+v", dead)
	}

	// A new daemon on the same state: functions are still there, every
	// leftover is gone (only its fresh pool namespace exists).
	td := startDaemon(t, cfg)
	fs, err := td.client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if err != nil || len(fs.Functions) != 2 {
		t.Fatalf("functions after restart: %+v, %v", fs, err)
	}
	if l := nodetest.Snapshot(state, cfg.NetPrefix).LeakedFrom(dead, 1); len(l) > 0 {
		t.Fatalf("after restart: %v; want only the new pool's one namespace and veth", l)
	}
	for _, rt := range []struct{ bin, root string }{{cfg.RuncPath, state + "/sandboxes/runc/state"}, {cfg.RunscPath, state + "/sandboxes/gvisor/state"}} {
		out, _ := exec.Command(rt.bin, "--root", rt.root, "list", "-q").Output()
		if s := strings.TrimSpace(string(out)); s != "" {
			t.Errorf("%s still lists containers after restart: %s", rt.bin, s)
		}
	}
	r := td.invoke(t, "p-runc", "counter")
	if !r.ColdStart || string(r.Payload) != "1" {
		t.Fatalf("invoke after restart = %+v", r)
	}
	td.stop()
	if l := nodetest.Snapshot(state, cfg.NetPrefix); l.Count() != 0 {
		t.Fatalf("after clean shutdown: %v", l)
	}
}
