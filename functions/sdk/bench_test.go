//go:build !wasip1

package sdk

import (
	"context"
	"net"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "vhive.dev/vhive/api/proto/helloworld"
)

func hello(_ context.Context, p string) (string, error) { return "Hello, " + p + "!", nil }

// rawGreeter is the floor: the same Greeter written directly on grpc.
type rawGreeter struct{ pb.UnimplementedGreeterServer }

func (rawGreeter) SayHello(_ context.Context, r *pb.HelloRequest) (*pb.HelloReply, error) {
	return &pb.HelloReply{Message: "Hello, " + r.GetName() + "!"}, nil
}

func benchClient(b *testing.B, addr string) pb.GreeterClient {
	conn, err := grpc.NewClient(addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { conn.Close() })
	return pb.NewGreeterClient(conn)
}

func benchSayHello(b *testing.B, c pb.GreeterClient) {
	ctx := context.Background()
	req := &pb.HelloRequest{Name: "bench"}
	if _, err := c.SayHello(ctx, req, grpc.WaitForReady(true)); err != nil {
		b.Fatal(err)
	}
	b.ResetTimer()
	for b.Loop() {
		if _, err := c.SayHello(ctx, req); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSayHelloSDK is one loopback call to a function served by Serve.
func BenchmarkSayHelloSDK(b *testing.B) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Serve(ctx, lis, hello) }()
	b.Cleanup(func() { cancel(); <-done })
	benchSayHello(b, benchClient(b, lis.Addr().String()))
}

// BenchmarkSayHelloRawGRPC is the floor for BenchmarkSayHelloSDK.
func BenchmarkSayHelloRawGRPC(b *testing.B) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	srv := grpc.NewServer()
	pb.RegisterGreeterServer(srv, rawGreeter{})
	go srv.Serve(lis)
	b.Cleanup(srv.Stop)
	benchSayHello(b, benchClient(b, lis.Addr().String()))
}

// BenchmarkWasmInvoke is one full host-side invocation through the ABI:
// alloc, write, handle, status, read, free twice.
func BenchmarkWasmInvoke(b *testing.B) {
	r := newReactor(b)
	payload := []byte("bench")
	ctx := context.Background()
	alloc, handle := r.mod.ExportedFunction("vhive_alloc"), r.mod.ExportedFunction("vhive_handle")
	status, free := r.mod.ExportedFunction("vhive_status"), r.mod.ExportedFunction("vhive_free")
	mem := r.mod.Memory()
	for b.Loop() {
		res, err := alloc.Call(ctx, uint64(len(payload)))
		if err != nil {
			b.Fatal(err)
		}
		ptr := uint32(res[0])
		mem.Write(ptr, payload)
		res, err = handle.Call(ctx, uint64(ptr), uint64(len(payload)))
		if err != nil {
			b.Fatal(err)
		}
		rptr, rlen := uint32(res[0]>>32), uint32(res[0])
		if st, err := status.Call(ctx); err != nil || st[0] != 0 {
			b.Fatalf("status %v, %v", st, err)
		}
		if _, ok := mem.Read(rptr, rlen); !ok {
			b.Fatal("response out of range")
		}
		free.Call(ctx, uint64(rptr))
		free.Call(ctx, uint64(ptr))
	}
}

// BenchmarkWasmExportCallFloor is the floor: one call of the cheapest export.
func BenchmarkWasmExportCallFloor(b *testing.B) {
	r := newReactor(b)
	status := r.mod.ExportedFunction("vhive_status")
	ctx := context.Background()
	for b.Loop() {
		if _, err := status.Call(ctx); err != nil {
			b.Fatal(err)
		}
	}
}
