//go:build !wasip1

package sdk

import (
	"context"
	"errors"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	pb "vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/testutil"
)

// startServe runs Serve on a loopback port and returns a client; the server
// is stopped and Serve's result checked when the test ends.
// Serve's error is readable after done is closed.
func startServe(t *testing.T, h Handler) (testClient, context.CancelFunc, *served) {
	t.Helper()
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := &served{done: make(chan struct{})}
	go func() {
		done.err = Serve(ctx, lis, h)
		close(done.done)
	}()
	conn, err := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		conn.Close()
		cancel()
		select {
		case <-done.done:
		case <-time.After(30 * time.Second):
			t.Error("Serve did not return after cancel")
		}
	})
	return testClient{pb.NewGreeterClient(conn), conn}, cancel, done
}

type testClient struct {
	pb.GreeterClient
	conn *grpc.ClientConn
}

type served struct {
	done chan struct{}
	err  error
}

func TestServeReplies(t *testing.T) {
	client, _, _ := startServe(t, func(_ context.Context, p string) (string, error) {
		switch p {
		case "fail":
			return "", errors.New("asked to fail")
		case "panic":
			panic("asked to panic")
		}
		return "got " + p, nil
	})
	ctx := context.Background()

	r, err := client.SayHello(ctx, &pb.HelloRequest{Name: "record", VHiveMetadata: []byte{1}})
	if err != nil {
		t.Fatalf("SayHello: %v", err)
	}
	if r.GetMessage() != "got record" {
		t.Errorf("message = %q, want %q", r.GetMessage(), "got record")
	}

	_, err = client.SayHello(ctx, &pb.HelloRequest{Name: "fail"})
	if s := status.Convert(err); s.Code() != codes.Unknown || s.Message() != "asked to fail" {
		t.Errorf("handler error: got %v, want Unknown \"asked to fail\"", err)
	}

	_, err = client.SayHello(ctx, &pb.HelloRequest{Name: "panic"})
	if s := status.Convert(err); s.Code() != codes.Internal || !strings.Contains(s.Message(), "asked to panic") {
		t.Errorf("handler panic: got %v, want Internal naming the panic", err)
	}
	hc := healthpb.NewHealthClient(client.conn)
	for _, svc := range []string{"", "helloworld.Greeter"} {
		hr, err := hc.Check(ctx, &healthpb.HealthCheckRequest{Service: svc})
		if err != nil || hr.GetStatus() != healthpb.HealthCheckResponse_SERVING {
			t.Errorf("health of %q: %v, %v", svc, hr, err)
		}
	}
	ws, err := hc.Watch(ctx, &healthpb.HealthCheckRequest{})
	if err == nil {
		_, err = ws.Recv()
	}
	if status.Code(err) != codes.Unimplemented {
		t.Errorf("health Watch: %v, want Unimplemented", err)
	}
	// The server survives a panicking call.
	if _, err := client.SayHello(ctx, &pb.HelloRequest{Name: "x"}); err != nil {
		t.Errorf("call after panic: %v", err)
	}
}

func TestServeGracefulStop(t *testing.T) {
	entered := make(chan struct{})
	release := make(chan struct{})
	client, cancel, done := startServe(t, func(_ context.Context, p string) (string, error) {
		close(entered)
		<-release
		return "finished " + p, nil
	})
	type result struct {
		r   *pb.HelloReply
		err error
	}
	res := make(chan result, 1)
	go func() {
		r, err := client.SayHello(context.Background(), &pb.HelloRequest{Name: "slow"})
		res <- result{r, err}
	}()
	<-entered
	cancel()
	// Serve must wait for the in-flight call.
	select {
	case <-done.done:
		t.Fatalf("Serve returned (%v) while a call was in flight", done.err)
	case <-time.After(200 * time.Millisecond):
	}
	close(release)
	got := <-res
	if got.err != nil || got.r.GetMessage() != "finished slow" {
		t.Fatalf("in-flight call: %v, %v", got.r, got.err)
	}
	<-done.done
	if done.err != nil {
		t.Fatalf("Serve: %v", done.err)
	}
}

func TestServeNilHandler(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	if err := Serve(context.Background(), lis, nil); err == nil {
		t.Fatal("Serve with a nil handler succeeded")
	}
}

func TestGuestPort(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int
		ok   bool
	}{
		{"", DefaultPort, true}, {"8080", 8080, true}, {"0", 0, false},
		{"65536", 0, false}, {"http", 0, false}, {"-1", 0, false},
	} {
		got, err := guestPort(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("guestPort(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "GUEST_PORT") {
			t.Errorf("guestPort(%q) error %q does not name GUEST_PORT", tc.in, err)
		}
	}
}

// goTool returns the go command (go test puts GOROOT/bin first in PATH).
func goTool(t testing.TB) string {
	t.Helper()
	p, err := exec.LookPath("go")
	if err != nil {
		t.Fatalf("go command not found: %v", err)
	}
	return p
}

// buildEcho builds testdata/echo for goos/goarch into a temp dir.
func buildEcho(t testing.TB, goos, goarch string, extra ...string) string {
	t.Helper()
	out := filepath.Join(t.TempDir(), "echo")
	args := append([]string{"build", "-o", out}, extra...)
	args = append(args, "./testdata/echo")
	cmd := exec.Command(goTool(t), args...)
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS="+goos, "GOARCH="+goarch)
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build echo for %s/%s: %v\n%s", goos, goarch, err, b)
	}
	return out
}

// TestRunProcess runs a real function process: it must answer on
// $GUEST_PORT, and exit 0 on SIGTERM.
func TestRunProcess(t *testing.T) {
	bin := buildEcho(t, "linux", "amd64")
	_, port, err := net.SplitHostPort(testutil.Port(t))
	if err != nil {
		t.Fatal(err)
	}

	var stderr strings.Builder
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "GUEST_PORT="+port)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			<-exited
		}
	})

	conn, err := grpc.NewClient(net.JoinHostPort("127.0.0.1", port),
		grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	// WaitForReady rides out the process start-up.
	r, err := pb.NewGreeterClient(conn).SayHello(ctx, &pb.HelloRequest{Name: "hi"}, grpc.WaitForReady(true))
	if err != nil {
		t.Fatalf("SayHello: %v (stderr: %s)", err, stderr.String())
	}
	if r.GetMessage() != "echo:HI" {
		t.Errorf("message = %q, want %q", r.GetMessage(), "echo:HI")
	}
	if err := cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-exited:
		if err != nil {
			t.Fatalf("function exited with %v after SIGTERM (stderr: %s)", err, stderr.String())
		}
	case <-time.After(30 * time.Second):
		t.Fatal("function did not exit after SIGTERM")
	}
	if !strings.Contains(stderr.String(), "function listening") {
		t.Errorf("stderr has no start-up log: %q", stderr.String())
	}
}

func TestRunBadPort(t *testing.T) {
	bin := buildEcho(t, "linux", "amd64")
	cmd := exec.Command(bin)
	cmd.Env = append(os.Environ(), "GUEST_PORT=nope")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.ExitCode() != 1 {
		t.Fatalf("exit = %v, want status 1", err)
	}
	if !strings.Contains(string(out), `GUEST_PORT \"nope\"`) && !strings.Contains(string(out), `GUEST_PORT "nope"`) {
		t.Errorf("output does not name the bad GUEST_PORT: %s", out)
	}
}
