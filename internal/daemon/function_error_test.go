package daemon

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/testutil"
)

// runcConfig is daemonConfig with runc only: these tests are about the
// daemon's error path, which is the same for every sandbox.
func runcConfig(t testing.TB, stateDir string) Config {
	cfg := baseConfig(t, stateDir)
	cfg.Sandboxes = []string{"runc"}
	return cfg
}

// TestFunctionErrorPassesThrough: a status the function returns reaches the
// caller with its own code and message, whatever the code (Unavailable
// included), and its instance stays in the pool: the next call is warm on
// it. Function errors are counted apart from instance failures.
func TestFunctionErrorPassesThrough(t *testing.T) {
	probe := shared.Probe(t)
	cfg := runcConfig(t, t.TempDir())
	cfg.Metrics = freePort(t)
	td := startDaemon(t, cfg)
	td.importImage(t, probe)
	ctx := context.Background()
	td.deploy(t, &vhivepb.FunctionSpec{Name: "fails", Image: "localhost/vhive/probe:test", Sandbox: "runc"})
	first := td.invoke(t, "fails", "warm-up")

	for _, c := range []codes.Code{codes.Unimplemented, codes.NotFound, codes.InvalidArgument, codes.Unavailable, codes.Internal, codes.Unknown, codes.DeadlineExceeded} {
		msg := fmt.Sprintf("the function says no (%s)", c)
		_, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "fails", Payload: []byte(fmt.Sprintf("status:%d:%s", c, msg))})
		st, _ := status.FromError(err)
		if st.Code() != c || st.Message() != msg {
			t.Errorf("function returned %s %q; caller got %s %q", c, msg, st.Code(), st.Message())
		}
	}
	again := td.invoke(t, "fails", "after")
	if again.ColdStart || again.InstanceId != first.InstanceId {
		t.Fatalf("after function errors: cold=%v instance %s, want warm on %s", again.ColdStart, again.InstanceId, first.InstanceId)
	}

	resp, err := http.Get("http://" + cfg.Metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	for _, want := range []string{
		`vhive_invocations_total{function="fails",kind="function_error"} 7`,
		`vhive_invocations_total{function="fails",kind="warm"} 1`,
	} {
		if !strings.Contains(string(body), want) {
			t.Errorf("/metrics lacks %s", want)
		}
	}
	if strings.Contains(string(body), `function="fails",kind="instance_failure"`) {
		t.Errorf("/metrics counts a function error as an instance failure")
	}

	// An instance that dies is still the instance's failure: Unavailable.
	td.deploy(t, &vhivepb.FunctionSpec{Name: "crashes", Image: "localhost/vhive/probe:test", Sandbox: "runc", Env: map[string]string{"PROBE_MODE": "crash"}})
	_, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "crashes"})
	if status.Code(err) != codes.Unavailable {
		t.Fatalf("crashing instance: %v, want Unavailable", err)
	}
	resp, err = http.Get("http://" + cfg.Metrics + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ = io.ReadAll(resp.Body)
	resp.Body.Close()
	if want := `vhive_invocations_total{function="crashes",kind="instance_failure"} 1`; !strings.Contains(string(body), want) {
		t.Errorf("/metrics lacks %s", want)
	}
}

// BenchmarkFunctionErrorVsSuccess: a warm invocation whose function answers
// with an error costs what one that succeeds does (no wait for the sandbox
// to die before the error is classified). Compare the ns/op of the two:
//
//	go test -run '^$' -bench FunctionErrorVsSuccess -benchtime 200x ./internal/daemon/
func BenchmarkFunctionErrorVsSuccess(b *testing.B) {
	testutil.RequiresRoot(b)
	probe := shared.Probe(b)
	td := startDaemon(b, runcConfig(b, b.TempDir()))
	td.importImage(b, probe)
	td.deploy(b, &vhivepb.FunctionSpec{Name: "bench", Image: "localhost/vhive/probe:test", Sandbox: "runc"})
	td.invoke(b, "bench", "warm-up")
	ctx := context.Background()
	for _, bc := range []struct {
		name    string
		payload string
		want    codes.Code
	}{
		{"success", "x", codes.OK},
		{"function-error", "status:3:bad request", codes.InvalidArgument},
	} {
		b.Run(bc.name, func(b *testing.B) {
			req := &vhivepb.InvokeRequest{Function: "bench", Payload: []byte(bc.payload)}
			for b.Loop() {
				_, err := td.client.Invoke(ctx, req)
				if status.Code(err) != bc.want {
					b.Fatalf("invoke %q: %v, want %s", bc.payload, err, bc.want)
				}
			}
		})
	}
}
