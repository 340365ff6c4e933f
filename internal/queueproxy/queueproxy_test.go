package queueproxy

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	hwpb "vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/testutil"
)

// greeter is a function: "slow" sleeps until released.
type greeter struct {
	hwpb.UnimplementedGreeterServer
	release chan struct{}
	entered chan struct{}
}

func (g *greeter) SayHello(ctx context.Context, r *hwpb.HelloRequest) (*hwpb.HelloReply, error) {
	if r.GetName() == "slow" {
		g.entered <- struct{}{}
		select {
		case <-g.release:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	if r.GetName() == "fail" {
		return nil, status.Error(codes.FailedPrecondition, "asked to fail")
	}
	return &hwpb.HelloReply{Message: "Hello, " + r.GetName() + "!"}, nil
}

// function serves a real gRPC Greeter on a loopback listener (the
// function's side of GUEST_ADDR:GUEST_PORT).
func function(t *testing.T, lis net.Listener) (*greeter, *grpc.Server) {
	g := &greeter{release: make(chan struct{}), entered: make(chan struct{}, 4)}
	s := grpc.NewServer()
	hwpb.RegisterGreeterServer(s, g)
	go s.Serve(lis)
	t.Cleanup(s.Stop)
	return g, s
}

func listen(t *testing.T) net.Listener {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func probe(t *testing.T, addr string) int {
	t.Helper()
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/", nil)
	req.Header.Set(ProbeHeader, ProbeValue)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatalf("probe: %v", err)
	}
	io.Copy(io.Discard, res.Body)
	res.Body.Close()
	return res.StatusCode
}

type running struct {
	p      *Proxy
	addr   string
	maddr  string
	cancel context.CancelFunc
	done   chan error
}

func start(t *testing.T, cfg Config) *running {
	t.Helper()
	p, err := New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	lis, ml := listen(t), listen(t)
	ctx, cancel := context.WithCancel(context.Background())
	r := &running{p: p, addr: lis.Addr().String(), maddr: ml.Addr().String(), cancel: cancel, done: make(chan error, 1)}
	go func() { r.done <- p.Run(ctx, lis, ml) }()
	t.Cleanup(func() {
		cancel()
		select {
		case <-r.done:
		case <-time.After(30 * time.Second):
			t.Error("proxy did not stop")
		}
	})
	return r
}

func client(t *testing.T, addr string) hwpb.GreeterClient {
	t.Helper()
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return hwpb.NewGreeterClient(conn)
}

func TestRelayProbeAndCount(t *testing.T) {
	// Reserve the function's address but serve nothing yet: the pod is not
	// ready until the function answers.
	upstream := testutil.Port(t)
	r := start(t, Config{Upstream: upstream})
	if c := probe(t, r.addr); c != http.StatusServiceUnavailable {
		t.Fatalf("probe before the function listens: %d, want 503", c)
	}
	// A gRPC request now fails as UNAVAILABLE, and is counted so.
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c := client(t, r.addr)
	if _, err := c.SayHello(ctx, &hwpb.HelloRequest{Name: "early"}); status.Code(err) != codes.Unavailable {
		t.Fatalf("call before the function listens: %v, want Unavailable", err)
	}

	fl, err := net.Listen("tcp", upstream)
	if err != nil {
		t.Fatalf("re-listen on %s: %v", upstream, err)
	}
	function(t, fl)
	if c := probe(t, r.addr); c != http.StatusOK {
		t.Fatalf("probe with the function up: %d, want 200", c)
	}
	for i := range 20 {
		rep, err := c.SayHello(ctx, &hwpb.HelloRequest{Name: "w" + string(rune('a'+i))})
		if err != nil {
			t.Fatalf("call %d: %v", i, err)
		}
		if want := "Hello, w" + string(rune('a'+i)) + "!"; rep.GetMessage() != want {
			t.Fatalf("call %d: %q, want %q", i, rep.GetMessage(), want)
		}
	}
	if _, err := c.SayHello(ctx, &hwpb.HelloRequest{Name: "fail"}); status.Code(err) != codes.FailedPrecondition {
		t.Fatalf("failing call: %v, want the function's FailedPrecondition relayed", err)
	}
	m := r.p.requests
	if got := counter(t, m.WithLabelValues("OK")); got != 20 {
		t.Errorf("requests_total{code=OK} = %v, want 20", got)
	}
	if got := counter(t, m.WithLabelValues("Unavailable")); got != 1 {
		t.Errorf("requests_total{code=Unavailable} = %v, want 1", got)
	}
	if got := counter(t, m.WithLabelValues("FailedPrecondition")); got != 1 {
		t.Errorf("requests_total{code=FailedPrecondition} = %v, want 1", got)
	}
	if got := counter(t, r.p.probes.WithLabelValues("unreachable")); got != 1 {
		t.Errorf("probes_total{result=unreachable} = %v, want 1", got)
	}
	// The same figures are served on the metrics listener.
	res, err := http.Get("http://" + r.maddr + "/metrics")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(res.Body)
	res.Body.Close()
	if !strings.Contains(string(body), `vhive_queue_proxy_requests_total{code="OK"} 20`) {
		t.Errorf("/metrics lacks the OK count:\n%s", body)
	}
}

func TestDrainOnShutdown(t *testing.T) {
	fl := listen(t)
	g, _ := function(t, fl)
	r := start(t, Config{Upstream: fl.Addr().String(), DrainWait: 300 * time.Millisecond})
	c := client(t, r.addr)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var wg sync.WaitGroup
	var slowErr error
	var slowRep *hwpb.HelloReply
	wg.Go(func() { slowRep, slowErr = c.SayHello(ctx, &hwpb.HelloRequest{Name: "slow"}) })
	<-g.entered // the slow request is in the function

	r.cancel() // SIGTERM
	deadline := time.Now().Add(5 * time.Second)
	for probeCode(r.addr) != http.StatusServiceUnavailable {
		if time.Now().After(deadline) {
			t.Fatal("probes still succeed after shutdown began")
		}
		time.Sleep(10 * time.Millisecond)
	}
	select {
	case err := <-r.done:
		t.Fatalf("proxy stopped with a request in flight: %v", err)
	default:
	}
	close(g.release)
	wg.Wait()
	if slowErr != nil || slowRep.GetMessage() != "Hello, slow!" {
		t.Fatalf("request in flight at shutdown: %v, %q", slowErr, slowRep.GetMessage())
	}
	select {
	case err := <-r.done:
		if err != nil {
			t.Fatalf("Run after drain: %v", err)
		}
		r.done <- nil // for the cleanup
	case <-time.After(10 * time.Second):
		t.Fatal("proxy did not stop after draining")
	}
	if _, err := net.DialTimeout("tcp", r.addr, time.Second); err == nil {
		t.Error("proxy still accepts connections after it stopped")
	}
}

// probeCode is probe without failing on a refused connection (0).
func probeCode(addr string) int {
	req, _ := http.NewRequest(http.MethodGet, "http://"+addr+"/", nil)
	req.Header.Set(ProbeHeader, ProbeValue)
	res, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0
	}
	res.Body.Close()
	return res.StatusCode
}

func TestNewRefusesBadUpstream(t *testing.T) {
	for _, up := range []string{"", ":50051", "10.0.0.1", "10.0.0.1:0", "10.0.0.1:x", "10.0.0.1:70000"} {
		if _, err := New(Config{Upstream: up}); err == nil || !strings.Contains(err.Error(), "upstream") {
			t.Errorf("New(upstream %q) = %v, want an error naming the upstream", up, err)
		}
	}
}

func counter(t *testing.T, c prometheus.Counter) float64 {
	t.Helper()
	var m dto.Metric
	if err := c.Write(&m); err != nil {
		t.Fatal(err)
	}
	return m.GetCounter().GetValue()
}
