package invoker

import (
	"bufio"
	"context"
	"encoding/csv"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	hwpb "vhive.dev/vhive/api/proto/helloworld"
)

// greeter is a real gRPC helloworld.Greeter on 127.0.0.1. It can hold every
// reply until released, fail requests for one authority, and mark the
// first request per authority as a cold start the way the vhive gateway
// does.
type greeter struct {
	hwpb.UnimplementedGreeterServer
	received atomic.Int64
	release  chan struct{}
	failHost string

	mu          sync.Mutex
	authorities []string
	seen        map[string]bool
}

func (g *greeter) SayHello(ctx context.Context, req *hwpb.HelloRequest) (*hwpb.HelloReply, error) {
	g.received.Add(1)
	md, _ := metadata.FromIncomingContext(ctx)
	auth := ""
	if a := md.Get(":authority"); len(a) > 0 {
		auth = a[0]
	}
	g.mu.Lock()
	g.authorities = append(g.authorities, auth)
	cold := !g.seen[auth]
	g.seen[auth] = true
	g.mu.Unlock()
	if g.release != nil {
		select {
		case <-g.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if auth == g.failHost {
		return nil, status.Error(codes.Unavailable, "no instance")
	}
	if cold {
		if err := grpc.SetHeader(ctx, metadata.Pairs(ColdStartHeader, "true")); err != nil {
			return nil, err
		}
	}
	return &hwpb.HelloReply{Message: "Hello, " + req.GetName() + "!"}, nil
}

func startGreeter(t testing.TB, g *greeter) string {
	t.Helper()
	g.seen = map[string]bool{}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	hwpb.RegisterGreeterServer(s, g)
	done := make(chan struct{})
	go func() {
		defer close(done)
		_ = s.Serve(lis)
	}()
	t.Cleanup(func() {
		s.Stop()
		<-done
	})
	return lis.Addr().String()
}

// The invoker keeps issuing at the target rate while the server holds every
// reply: the issued count matches rps*time although nothing has completed.
func TestOpenLoopDoesNotWaitForReplies(t *testing.T) {
	g := &greeter{release: make(chan struct{})}
	addr := startGreeter(t, g)
	const rps, dur = 40.0, 1500 * time.Millisecond
	var issued atomic.Int64
	type out struct {
		res *Result
		err error
	}
	done := make(chan out, 1)
	go func() {
		res, err := Run(context.Background(), Config{
			Endpoints: []Endpoint{{Hostname: "helloworld"}},
			RPS:       rps, Duration: dur, Addr: addr, Timeout: time.Minute,
			OnIssue: func() { issued.Add(1) },
		})
		done <- out{res, err}
	}()
	// Wait until issuing must be over, then check nothing has completed
	// while the count kept growing.
	want := int64(rps * dur.Seconds()) // 60
	deadline := time.Now().Add(dur + 10*time.Second)
	for issued.Load() < want && time.Now().Before(deadline) {
		time.Sleep(20 * time.Millisecond)
	}
	time.Sleep(300 * time.Millisecond) // issuing is over
	n := issued.Load()
	if n < want*85/100 || n > want*115/100+1 {
		t.Errorf("issued %d requests with every reply held, want %d ± 15%%", n, want)
	}
	// Every issued request reaches the server although none was answered.
	for deadline := time.Now().Add(10 * time.Second); g.received.Load() < n && time.Now().Before(deadline); {
		time.Sleep(20 * time.Millisecond)
	}
	if got := g.received.Load(); got != n {
		t.Errorf("server received %d requests, invoker issued %d", got, n)
	}
	select {
	case o := <-done:
		t.Fatalf("Run returned before replies were released: %+v", o.err)
	default:
	}
	close(g.release)
	o := <-done
	if o.err != nil {
		t.Fatal(o.err)
	}
	s := o.res.Summarize()
	if int64(s.Issued) != n || s.Completed != s.Issued || s.Failed != 0 {
		t.Errorf("summary issued/completed/failed = %d/%d/%d, want %d/%d/0", s.Issued, s.Completed, s.Failed, n, n)
	}
	// Every held request waited at least until release, so latencies span
	// the run: the first request is the slowest.
	if s.Latency.Max < float64((dur / 2).Microseconds()) {
		t.Errorf("max latency %vµs: replies were not held", s.Latency.Max)
	}
	if s.IssuedRPS < rps*0.8 || s.IssuedRPS > rps*1.2 {
		t.Errorf("issued RPS %.2f, target %v", s.IssuedRPS, rps)
	}
}

func TestRoundRobinAuthorityColdAndErrors(t *testing.T) {
	g := &greeter{failHost: "broken.default.example.com"}
	addr := startGreeter(t, g)
	eps := []Endpoint{{Hostname: "a.default.example.com"}, {Hostname: "b.default.example.com"}, {Hostname: "broken.default.example.com"}}
	res, err := Run(context.Background(), Config{
		Endpoints: eps, RPS: 60, Duration: time.Second, Warmup: 500 * time.Millisecond, Addr: addr,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Records) < 60 {
		t.Fatalf("only %d records", len(res.Records))
	}
	for i, rec := range res.Records {
		if rec.Seq != i {
			t.Fatalf("record %d has seq %d: not ordered", i, rec.Seq)
		}
		if want := eps[i%3].Hostname; rec.Endpoint != want {
			t.Errorf("request %d went to %q, want %q (round-robin)", i, rec.Endpoint, want)
		}
	}
	g.mu.Lock()
	counts := map[string]int{}
	for _, a := range g.authorities {
		counts[a]++
	}
	g.mu.Unlock()
	for _, ep := range eps {
		if counts[ep.Hostname] == 0 {
			t.Errorf("server never saw :authority %q (saw %v)", ep.Hostname, counts)
		}
	}
	s := res.Summarize()
	if s.Warmup == 0 {
		t.Error("no request was marked warm-up")
	}
	// Cold starts (first request per authority) fall in the warm-up.
	if s.ColdStart != 0 {
		t.Errorf("cold starts in the measured phase = %d, want 0", s.ColdStart)
	}
	cold := 0
	for _, rec := range res.Records {
		if rec.Cold {
			cold++
		}
	}
	if cold != 2 {
		t.Errorf("cold starts overall = %d, want 2 (a and b; broken fails)", cold)
	}
	if s.Errors[codes.Unavailable.String()] != s.Failed || s.Failed == 0 {
		t.Errorf("errors %v, failed %d: want all Unavailable", s.Errors, s.Failed)
	}
	if s.Failed+s.Completed != s.Issued {
		t.Errorf("failed %d + completed %d != issued %d", s.Failed, s.Completed, s.Issued)
	}
	// Roughly a third fail.
	if s.Failed < s.Issued/4 || s.Failed > s.Issued/2 {
		t.Errorf("failed %d of %d, want about a third", s.Failed, s.Issued)
	}
}

func TestTimeoutIsDeadlineExceeded(t *testing.T) {
	g := &greeter{release: make(chan struct{})}
	addr := startGreeter(t, g)
	defer close(g.release)
	res, err := Run(context.Background(), Config{
		Endpoints: []Endpoint{{Hostname: "slow"}}, RPS: 10, Duration: 300 * time.Millisecond, Addr: addr,
		Timeout: 100 * time.Millisecond,
	})
	if err != nil {
		t.Fatal(err)
	}
	s := res.Summarize()
	if s.Completed != 0 || s.Errors[codes.DeadlineExceeded.String()] != s.Issued || s.Issued == 0 {
		t.Errorf("summary %+v: want every request DeadlineExceeded", s)
	}
}

func TestLatencyFileFormat(t *testing.T) {
	addr := startGreeter(t, &greeter{})
	res, err := Run(context.Background(), Config{
		Endpoints: []Endpoint{{Hostname: "x"}}, RPS: 50, Duration: 400 * time.Millisecond, Addr: addr,
	})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	s := res.Summarize()
	name := LatencyFileName(filepath.Join(dir, "lat.csv"), s.RealRPS)
	if filepath.Dir(name) != dir || filepath.Base(name) != "rps"+strconv.FormatFloat(s.RealRPS, 'f', 2, 64)+"_lat.csv" {
		t.Errorf("latency file name %q", name)
	}
	if err := res.WriteLatencyFile(name); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(name)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	n := 0
	for sc.Scan() {
		v, err := strconv.ParseInt(sc.Text(), 10, 64)
		if err != nil || v <= 0 {
			t.Fatalf("line %d %q: want a positive integer of µs", n+1, sc.Text())
		}
		if want := res.Records[n].Latency.Microseconds(); v != want {
			t.Errorf("line %d = %d, want %d", n+1, v, want)
		}
		n++
	}
	if n != s.Completed || n == 0 {
		t.Errorf("%d lines, %d completed requests", n, s.Completed)
	}

	csvPath := filepath.Join(dir, "requests.csv")
	if err := res.WriteRecordsCSV(csvPath); err != nil {
		t.Fatal(err)
	}
	cf, err := os.Open(csvPath)
	if err != nil {
		t.Fatal(err)
	}
	defer cf.Close()
	rows, err := csv.NewReader(cf).ReadAll()
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != len(res.Records)+1 || rows[0][0] != "Seq" || rows[0][2] != "StartUnixNano" {
		t.Fatalf("records CSV: %d rows, header %v", len(rows), rows[0])
	}
	prev := int64(0)
	for _, r := range rows[1:] {
		// Scheduled times increase with Seq; each request starts at or
		// after its scheduled time (goroutines may start out of order).
		start, err1 := strconv.ParseInt(r[2], 10, 64)
		sched, err2 := strconv.ParseInt(r[7], 10, 64)
		if err1 != nil || err2 != nil || sched <= prev || start < sched {
			t.Fatalf("row %v: want scheduled times increasing and start >= scheduled", r)
		}
		prev = sched
		if r[4] != "OK" {
			t.Errorf("code %q", r[4])
		}
	}
}

func TestConfigValidation(t *testing.T) {
	ep := []Endpoint{{Hostname: "x"}}
	bad := []Config{
		{RPS: 1, Duration: time.Second, Port: 80},
		{Endpoints: ep, RPS: 0, Duration: time.Second, Port: 80},
		{Endpoints: ep, RPS: 1, Duration: 0, Port: 80},
		{Endpoints: ep, RPS: 1, Duration: time.Second, Port: 0},
		{Endpoints: ep, RPS: 1, Duration: time.Second, Addr: "nocolon"},
		{Endpoints: ep, RPS: 1, Duration: time.Second, Port: 80, Warmup: -time.Second},
	}
	for i, c := range bad {
		if _, err := Run(context.Background(), c); err == nil {
			t.Errorf("config %d: want error", i)
		}
	}
}

func TestReadEndpoints(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "endpoints.json")
	want := []Endpoint{{Hostname: "helloworld-0.default.127.0.0.1.nip.io"}, {Hostname: "aes-0"}}
	if err := WriteEndpoints(p, want); err != nil {
		t.Fatal(err)
	}
	raw, _ := os.ReadFile(p)
	// vSwarm's shape, matchers null.
	if !containsAll(string(raw), `"hostname": "aes-0"`, `"eventing": false`, `"matchers": null`) {
		t.Errorf("endpoints.json:\n%s", raw)
	}
	got, err := ReadEndpoints(p)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != 2 || got[0].Hostname != want[0].Hostname || got[1].Hostname != "aes-0" {
		t.Errorf("round trip: %+v", got)
	}
	for name, body := range map[string]string{
		"empty":    `[]`,
		"nohost":   `[{"hostname": ""}]`,
		"eventing": `[{"hostname": "x", "eventing": true}]`,
		"garbage":  `{"hostname": "x"}`,
	} {
		q := filepath.Join(dir, name+".json")
		if err := os.WriteFile(q, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadEndpoints(q); err == nil {
			t.Errorf("%s: want error", name)
		}
	}
}

func containsAll(s string, subs ...string) bool {
	for _, x := range subs {
		if !strings.Contains(s, x) {
			return false
		}
	}
	return true
}

// countingListener counts the connections it accepts.
type countingListener struct {
	net.Listener
	n atomic.Int64
}

func (l *countingListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		l.n.Add(1)
	}
	return c, err
}

// Endpoints with their own address (a Service's ClusterIP) are dialled
// there with the hostname as :authority; ConnPerRequest gives every request
// its own connection, so a per-connection balancer sees each one.
func TestEndpointAddressAndConnPerRequest(t *testing.T) {
	var lis [2]*countingListener
	var gs [2]*greeter
	for i := range lis {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		lis[i] = &countingListener{Listener: l}
		gs[i] = &greeter{seen: map[string]bool{}}
		s := grpc.NewServer()
		hwpb.RegisterGreeterServer(s, gs[i])
		go s.Serve(lis[i])
		t.Cleanup(s.Stop)
	}
	eps := []Endpoint{
		{Hostname: "f-0.default.svc.cluster.local", Address: lis[0].Addr().String()},
		{Hostname: "g-0.default.svc.cluster.local", Address: lis[1].Addr().String()},
	}
	for _, perRequest := range []bool{false, true} {
		before := [2]int64{lis[0].n.Load(), lis[1].n.Load()}
		res, err := Run(context.Background(), Config{Endpoints: eps, RPS: 40, Duration: 500 * time.Millisecond, ConnPerRequest: perRequest})
		if err != nil {
			t.Fatal(err)
		}
		s := res.Summarize()
		if s.Failed != 0 || s.Completed != s.Issued {
			t.Fatalf("perRequest=%v: %+v", perRequest, s)
		}
		for i, ep := range eps {
			sub := res.ForEndpoint(ep.Hostname)
			reqs := int64(len(sub.Records))
			conns := lis[i].n.Load() - before[i]
			if perRequest && conns != reqs {
				t.Errorf("per request: %s got %d connections for %d requests", ep.Hostname, conns, reqs)
			}
			if !perRequest && conns != 1 {
				t.Errorf("shared: %s got %d connections, want 1", ep.Hostname, conns)
			}
			if sub.Summarize().Completed != int(reqs) || reqs < 8 {
				t.Errorf("%s: %d requests, summary %+v", ep.Hostname, reqs, sub.Summarize())
			}
			gs[i].mu.Lock()
			for _, a := range gs[i].authorities {
				if a != ep.Hostname {
					t.Errorf("server %d saw :authority %q, want %q", i, a, ep.Hostname)
					break
				}
			}
			gs[i].mu.Unlock()
		}
		if got := res.Endpoints(); len(got) != 2 || got[0] != eps[0].Hostname {
			t.Errorf("Endpoints() = %v", got)
		}
	}
	// A bad address in the endpoints file is refused, naming it.
	_, err := ParseEndpoints("e.json", []byte(`[{"hostname":"f","address":"10.0.0.1"}]`))
	if err == nil || !strings.Contains(err.Error(), "10.0.0.1") {
		t.Errorf("bad address: %v", err)
	}
}
