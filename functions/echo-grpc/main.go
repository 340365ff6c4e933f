// Command echo-grpc is an example function with its own gRPC service
// (echo.v1.Echo: unary Say, server-streaming Count, Fail returning any
// status), serving gRPC server reflection and the standard health service,
// on $GUEST_PORT (default 50051). Deploy it with the default protocol, grpc:
//
//	vhive deploy echo --image localhost/vhive/echo-grpc:latest
//	vhive invoke echo --method echo.v1.Echo/Say --data '{"text":"hi"}'
package main

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"sync/atomic"
	"syscall"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/reflection"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/functions/echo-grpc/echopb"
)

type echo struct {
	echopb.UnimplementedEchoServer
	served atomic.Int64
}

func (e *echo) Say(_ context.Context, req *echopb.SayRequest) (*echopb.SayReply, error) {
	return &echopb.SayReply{Text: req.GetText(), Served: e.served.Add(1)}, nil
}

func (e *echo) Count(req *echopb.CountRequest, stream grpc.ServerStreamingServer[echopb.CountReply]) error {
	if req.GetTo() < 0 || req.GetTo() > 1<<20 {
		return status.Errorf(codes.InvalidArgument, "to %d: want 0 to %d", req.GetTo(), 1<<20)
	}
	for n := int32(1); n <= req.GetTo(); n++ {
		if err := stream.Send(&echopb.CountReply{N: n}); err != nil {
			return err
		}
	}
	return nil
}

func (e *echo) Fail(_ context.Context, req *echopb.FailRequest) (*echopb.SayReply, error) {
	return nil, status.Error(codes.Code(req.GetCode()), req.GetMessage())
}

func run() error {
	port := os.Getenv("GUEST_PORT")
	if port == "" {
		port = "50051"
	}
	if _, err := strconv.ParseUint(port, 10, 16); err != nil {
		return fmt.Errorf("GUEST_PORT=%q: not a port", port)
	}
	lis, err := net.Listen("tcp", ":"+port)
	if err != nil {
		return err
	}
	s := grpc.NewServer()
	echopb.RegisterEchoServer(s, &echo{})
	hs := health.NewServer()
	hs.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(s, hs)
	reflection.Register(s)
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	go func() {
		<-ctx.Done()
		s.GracefulStop()
	}()
	return s.Serve(lis)
}

func main() {
	if err := run(); err != nil {
		slog.Error("echo-grpc", "err", err)
		os.Exit(1)
	}
}
