// Package load holds the sustained-load tests of the reliability suite
// (docs/reliability.md §5): warm load through the gateway with `vhive
// invoker`, and a long run whose instances scale to zero and back again and
// again while the daemon's RSS, open files and goroutines are watched.
package load

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
)

var shared nodetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	shared.Cleanup()
	os.Exit(code)
}

func envOr(k, def string) string {
	if v := os.Getenv(k); v != "" {
		return v
	}
	return def
}

// report is what `vhive invoker` printed.
type report struct {
	issued, completed, cold int
	realRPS, issuedRPS      float64
	errors                  map[string]int
	p50, p99, max           time.Duration
	raw                     string
}

var (
	reIssued  = regexp.MustCompile(`Issued / completed requests:\s+(\d+) / (\d+)`)
	reRPS     = regexp.MustCompile(`Real / target RPS:\s+([\d.]+) / [\d.e+]+\s+\(issued at ([\d.]+) RPS\)`)
	reCold    = regexp.MustCompile(`Cold starts:\s+(\d+)`)
	reLatency = regexp.MustCompile(`Latency p50 / p90 / p99 / p99.9 / max:\s+(\S+) / (\S+) / (\S+) / (\S+) / (\S+)`)
	reErrors  = regexp.MustCompile(`Errors (\S+):\s+(\d+)`)
)

func parseReport(t *testing.T, out string) report {
	t.Helper()
	r := report{errors: map[string]int{}, raw: out}
	m := reIssued.FindStringSubmatch(out)
	if m == nil {
		t.Fatalf("no request counts in the invoker's report:\n%s", out)
	}
	r.issued, _ = strconv.Atoi(m[1])
	r.completed, _ = strconv.Atoi(m[2])
	if m := reRPS.FindStringSubmatch(out); m != nil {
		r.realRPS, _ = strconv.ParseFloat(m[1], 64)
		r.issuedRPS, _ = strconv.ParseFloat(m[2], 64)
	}
	if m := reCold.FindStringSubmatch(out); m != nil {
		r.cold, _ = strconv.Atoi(m[1])
	}
	if m := reLatency.FindStringSubmatch(out); m != nil {
		r.p50, _ = time.ParseDuration(m[1])
		r.p99, _ = time.ParseDuration(m[3])
		r.max, _ = time.ParseDuration(m[5])
	}
	for _, m := range reErrors.FindAllStringSubmatch(out, -1) {
		r.errors[m[1]], _ = strconv.Atoi(m[2])
	}
	return r
}

// invoker runs `vhive invoker` against the gateway in dir.
func invoker(t *testing.T, ctx context.Context, bin, dir, gateway string, rps float64, secs, warmup int) report {
	t.Helper()
	cmd := exec.CommandContext(ctx, bin, "invoker", "-endpointsFile", "endpoints.json", "-addr", gateway,
		"-rps", fmt.Sprint(rps), "-time", strconv.Itoa(secs), "-warmup", strconv.Itoa(warmup),
		"-latf", "lat.csv", "-reqf", "", "-grpcTimeout", "30", "-no-progress")
	cmd.Dir = dir
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("vhive invoker: %v\n%s", err, out)
	}
	return parseReport(t, string(out))
}

func loadavg() string {
	b, _ := os.ReadFile("/proc/loadavg")
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "?"
	}
	return strings.Join(f[:3], " ")
}

func setup(t *testing.T, prefix, subnet string, spec *vhivepb.FunctionSpec, args ...string) (*nodetest.Node, string) {
	t.Helper()
	bin := shared.Bin(t)
	n := nodetest.Start(t, bin, nodetest.Options{NetPrefix: prefix, Subnet: subnet,
		Metrics: nodetest.Port(t), Args: append([]string{"--log-level", "info"}, args...)})
	spec.Image = n.Import(t, shared.Helloworld(t))
	n.Deploy(t, spec)
	dir := t.TempDir()
	eps := fmt.Sprintf(`[{"hostname": %q, "eventing": false, "matchers": null}]`, spec.Name)
	if err := os.WriteFile(filepath.Join(dir, "endpoints.json"), []byte(eps), 0o644); err != nil {
		t.Fatal(err)
	}
	return n, dir
}

// TestWarmLoad: helloworld warm through the gateway at VHIVE_LOAD_RPS
// (default 1000) for 10 s (fast) or 60 s (full) with `vhive invoker`: every
// request must succeed, none may be a cold start, and the generator must
// have issued at the target rate (else the figure would not be one at that
// rate).
func TestWarmLoad(t *testing.T) {
	rps, err := strconv.ParseFloat(envOr("VHIVE_LOAD_RPS", "1000"), 64)
	if err != nil {
		t.Fatal(err)
	}
	secs := 10
	if nodetest.Full() {
		secs = 60
	}
	sb := envOr("VHIVE_LOAD_SANDBOX", "gvisor")
	// One instance serves every request at once: warm means no cold start
	// after the warm-up.
	n, dir := setup(t, "h3bl", "10.188.4.0/24",
		&vhivepb.FunctionSpec{Name: "hello", Sandbox: sb, Concurrency: 1024, MaxInstances: 1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(secs+120)*time.Second)
	defer cancel()
	if _, err := n.Client.Invoke(ctx, &vhivepb.InvokeRequest{Function: "hello", Payload: []byte("warm")}); err != nil {
		t.Fatal(err)
	}
	before, _ := n.Usage()
	load0 := loadavg()
	r := invoker(t, ctx, n.Bin, dir, n.Gateway, rps, secs, 2)
	after, _ := n.Usage()
	t.Logf("%s, %.0f RPS target for %d s (+2 s warm-up), %s: issued %d (%.1f RPS), completed %d (%.1f RPS), cold %d, errors %v; latency p50 %v p99 %v max %v; load average %s -> %s; daemon %v -> %v",
		time.Now().UTC().Format(time.RFC3339), rps, secs, sb, r.issued, r.issuedRPS, r.completed, r.realRPS, r.cold, r.errors,
		r.p50, r.p99, r.max, load0, loadavg(), before, after)
	if r.completed != r.issued || len(r.errors) != 0 {
		t.Errorf("%d of %d requests failed: %v\n%s", r.issued-r.completed, r.issued, r.errors, r.raw)
	}
	if r.cold != 0 {
		t.Errorf("%d cold starts in the measured phase of a warm run", r.cold)
	}
	if min := 0.95 * rps * float64(secs); float64(r.issued) < min {
		t.Errorf("the invoker issued %d requests, fewer than 95%% of %.0f RPS × %d s: the machine (load average %s) could not generate the load, so this run does not show %.0f RPS held", r.issued, rps, secs, loadavg(), rps)
	}
}

// TestScaleToZeroSoak (full suite only): 10 minutes of 200 RPS bursts with
// a 1 s keepalive and a pause after each burst, so that the function scales
// to zero and back every cycle. Every request must succeed; the daemon's
// open files and goroutines at the end (at zero instances) must be what they
// were after the first cycle (at zero instances), within a tolerance a leak
// per instance or per request would exceed; RSS likewise.
func TestScaleToZeroSoak(t *testing.T) {
	if !nodetest.Full() && os.Getenv("VHIVE_SOAK") == "" {
		t.Skip("full suite only (VHIVE_RELIABILITY=full, `make reliability`)")
	}
	total, err := time.ParseDuration(envOr("VHIVE_SOAK_TIME", "10m"))
	if err != nil {
		t.Fatal(err)
	}
	sb := envOr("VHIVE_LOAD_SANDBOX", "gvisor")
	const rps, burst, pause = 200, 8, 5 // seconds of load, seconds idle
	n, dir := setup(t, "h3bk", "10.188.7.0/24",
		&vhivepb.FunctionSpec{Name: "soak", Sandbox: sb, Concurrency: 64, MaxInstances: 8, KeepaliveMs: 1000})
	ctx, cancel := context.WithTimeout(context.Background(), total+5*time.Minute)
	defer cancel()

	atZero := func() {
		t.Helper()
		deadline := time.Now().Add(time.Duration(pause) * time.Second * 3)
		for {
			ls, err := n.Client.ListInstances(ctx, &vhivepb.ListInstancesRequest{Function: "soak"})
			if err == nil && len(ls.Instances) == 0 {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("the function did not scale to zero within %ds of idling (keepalive 1 s): %v, %v", 3*pause, ls.GetInstances(), err)
			}
			time.Sleep(200 * time.Millisecond)
		}
	}
	var first, last nodetest.Usage
	start := time.Now()
	cycles, issued, failed, cold := 0, 0, 0, 0
	for cycles == 0 || time.Since(start) < total {
		r := invoker(t, ctx, n.Bin, dir, n.Gateway, rps, burst, 0)
		cycles++
		issued += r.issued
		failed += r.issued - r.completed
		cold += r.cold
		if r.completed != r.issued {
			t.Errorf("cycle %d: %d of %d requests failed: %v", cycles, r.issued-r.completed, r.issued, r.errors)
		}
		time.Sleep(time.Duration(pause) * time.Second)
		atZero()
		u, err := n.Usage()
		if err != nil {
			t.Fatal(err)
		}
		if cycles == 1 {
			first = u
		}
		last = u
		if cycles%10 == 0 {
			t.Logf("cycle %d (%s): %v", cycles, time.Since(start).Round(time.Second), u)
		}
	}
	st, err := n.Client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	started := st.Functions[0].ColdStarts
	stopped := strings.Count(n.LogAll(), `why="keepalive expired"`)
	t.Logf("%s, %s, %s: %d cycles of %d s at %d RPS + %d s idle; %d requests, %d failed, %d cold; instances started %d, stopped idle %d; load average %s; daemon after cycle 1: %v; at the end: %v",
		time.Now().UTC().Format(time.RFC3339), total, sb, cycles, burst, rps, pause, issued, failed, cold, started, stopped, loadavg(), first, last)
	if cycles < 3 || started < uint64(cycles) {
		t.Errorf("%d cycles with %d instances started: the function did not scale to zero and back every cycle", cycles, started)
	}
	if d := last.FDs - first.FDs; d > 16 {
		t.Errorf("open fds grew by %d (%d -> %d) over %d scale-to-zero cycles: a leak", d, first.FDs, last.FDs, cycles)
	}
	if d := last.Goroutines - first.Goroutines; first.Goroutines < 0 || d > 32 {
		t.Errorf("goroutines grew by %d (%d -> %d) over %d cycles: a leak", d, first.Goroutines, last.Goroutines, cycles)
	}
	if last.RSS > 2*first.RSS+(32<<20) {
		t.Errorf("RSS grew from %d to %d bytes over %d cycles: a leak", first.RSS, last.RSS, cycles)
	}
}
