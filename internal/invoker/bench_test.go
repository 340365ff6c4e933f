package invoker

import (
	"context"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	hwpb "vhive.dev/vhive/api/proto/helloworld"
)

func benchClient(b *testing.B) *grpc.ClientConn {
	b.Helper()
	addr := startGreeter(b, &greeter{})
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("hello.default"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return conn
}

// BenchmarkRawSayHello is the floor: a bare unary SayHello on 127.0.0.1.
func BenchmarkRawSayHello(b *testing.B) {
	c := hwpb.NewGreeterClient(benchClient(b))
	ctx := context.Background()
	for b.Loop() {
		if _, err := c.SayHello(ctx, &hwpb.HelloRequest{Name: DefaultPayload}); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInvokerCall is the invoker's per-request path over the same
// connection: timeout context, header and trailer capture, cold-start
// detection, record.
func BenchmarkInvokerCall(b *testing.B) {
	c := benchClient(b)
	cfg := Config{Timeout: 30 * time.Second, Payload: DefaultPayload}
	ctx := context.Background()
	i := 0
	for b.Loop() {
		if rec := call(ctx, c, cfg, i, "hello.default"); rec.Error != "" {
			b.Fatal(rec.Error)
		}
		i++
	}
}

// BenchmarkOpenLoopPacing runs the invoker at a high target rate for a
// fixed time and reports the achieved issue rate (issued/s) against the
// target, i.e. how far the ticker-driven open loop keeps up on this
// machine.
func BenchmarkOpenLoopPacing(b *testing.B) {
	addr := startGreeter(b, &greeter{})
	const target = 2000.0
	for b.Loop() {
		res, err := Run(context.Background(), Config{
			Endpoints: []Endpoint{{Hostname: "a"}, {Hostname: "b"}}, RPS: target, Duration: time.Second, Addr: addr,
		})
		if err != nil {
			b.Fatal(err)
		}
		s := res.Summarize()
		b.ReportMetric(s.IssuedRPS, "issued/s")
		b.ReportMetric(s.IssuedRPS/target*100, "%target")
		b.ReportMetric(s.Latency.P99, "p99-µs")
		b.ReportMetric(float64(s.MaxIssueLag.Microseconds()), "maxlag-µs")
	}
}
