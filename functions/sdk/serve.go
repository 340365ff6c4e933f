//go:build !wasip1

package sdk

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"strconv"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	pb "vhive.dev/vhive/api/proto/helloworld"
)

// DefaultPort is the vHive function port, used when $GUEST_PORT is unset.
const DefaultPort = 50051

// stopGrace bounds a graceful stop; calls still running after it are cut.
const stopGrace = 10 * time.Second

// Run serves h on all interfaces at $GUEST_PORT (default 50051) until SIGTERM
// or SIGINT, then stops gracefully. It is meant to be the whole of main: on a
// bad $GUEST_PORT or a failed listen it logs the error and exits with status 1.
func Run(h Handler) {
	log := slog.Default() // writes to stderr
	if err := run(h, log); err != nil {
		log.Error("function failed", "err", err)
		os.Exit(1)
	}
}

func run(h Handler, log *slog.Logger) error {
	port, err := guestPort(os.Getenv("GUEST_PORT"))
	if err != nil {
		return err
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	lis, err := net.Listen("tcp", net.JoinHostPort("", strconv.Itoa(port)))
	if err != nil {
		return fmt.Errorf("listen on port %d: %w", port, err)
	}
	log.Info("function listening", "addr", lis.Addr().String(), "pid", os.Getpid())
	if err := serve(ctx, lis, h, log); err != nil {
		return err
	}
	log.Info("function stopped")
	return nil
}

// guestPort parses $GUEST_PORT; empty means DefaultPort.
func guestPort(v string) (int, error) {
	if v == "" {
		return DefaultPort, nil
	}
	p, err := strconv.Atoi(v)
	if err != nil || p < 1 || p > 65535 {
		return 0, fmt.Errorf("GUEST_PORT %q is not a port number (1-65535)", v)
	}
	return p, nil
}

// Serve serves h as helloworld.Greeter on lis until ctx is done, then stops
// gracefully (at most ten seconds) and returns nil. It closes lis. It logs
// through slog.Default.
func Serve(ctx context.Context, lis net.Listener, h Handler) error {
	return serve(ctx, lis, h, slog.Default())
}

func serve(ctx context.Context, lis net.Listener, h Handler, log *slog.Logger) error {
	if h == nil {
		lis.Close()
		return errors.New("sdk: nil handler")
	}
	srv := grpc.NewServer()
	pb.RegisterGreeterServer(srv, &greeter{h: h, log: log})
	hs := health.NewServer() // "" is SERVING
	hs.SetServingStatus(pb.Greeter_ServiceDesc.ServiceName, healthpb.HealthCheckResponse_SERVING)
	healthpb.RegisterHealthServer(srv, noWatch{hs})

	served := make(chan error, 1)
	go func() { served <- srv.Serve(lis) }()

	select {
	case err := <-served:
		// Serve returns early only when the listener fails.
		srv.Stop()
		return fmt.Errorf("serve on %s: %w", lis.Addr(), err)
	case <-ctx.Done():
	}
	stopped := make(chan struct{})
	go func() {
		srv.GracefulStop()
		close(stopped)
	}()
	timer := time.NewTimer(stopGrace)
	defer timer.Stop()
	select {
	case <-stopped:
	case <-timer.C:
		log.Warn("graceful stop timed out, closing remaining calls", "grace", stopGrace)
		srv.Stop()
		<-stopped
	}
	if err := <-served; err != nil && !errors.Is(err, grpc.ErrServerStopped) {
		return fmt.Errorf("serve on %s: %w", lis.Addr(), err)
	}
	return nil
}

// noWatch is the health service without Watch: a Watch stream never ends by
// itself, so it would hold a graceful stop for the whole grace period.
type noWatch struct {
	*health.Server
}

func (noWatch) Watch(*healthpb.HealthCheckRequest, healthpb.Health_WatchServer) error {
	return status.Error(codes.Unimplemented, "health Watch is not served: use Check")
}

type greeter struct {
	pb.UnimplementedGreeterServer
	h   Handler
	log *slog.Logger
}

func (g *greeter) SayHello(ctx context.Context, req *pb.HelloRequest) (reply *pb.HelloReply, err error) {
	defer func() {
		if r := recover(); r != nil {
			g.log.Error("handler panicked", "panic", r)
			reply, err = nil, status.Errorf(codes.Internal, "handler panicked: %v", r)
		}
	}()
	out, err := g.h(ctx, req.GetName())
	if err != nil {
		if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
			return nil, status.FromContextError(err).Err()
		}
		if st, ok := status.FromError(err); ok {
			return nil, st.Err() // a status the handler chose, as it is
		}
		return nil, status.Error(codes.Unknown, err.Error())
	}
	return &pb.HelloReply{Message: out}, nil
}
