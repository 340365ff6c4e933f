package cri

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"os/exec"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	"k8s.io/cri-streaming/pkg/streaming"
	remotecommandserver "k8s.io/cri-streaming/pkg/streaming/remotecommand"
	utilexec "k8s.io/utils/exec"
)

// streamServer serves the CRI streaming endpoints (kubectl exec, crictl
// exec) for vhive's containers with k8s.io/cri-streaming; containerd serves
// its own containers' and every pod's port forwarding.
type streamServer struct {
	s    *Server
	srv  streaming.Server
	http *http.Server
	l    net.Listener
	done chan struct{}
}

func newStreamServer(s *Server, addr string) (*streamServer, error) {
	l, err := net.Listen("tcp", addr)
	if err != nil {
		return nil, fmt.Errorf("cri: stream server listen on %q: %w", addr, err)
	}
	cfg := streaming.DefaultConfig
	cfg.Addr = l.Addr().String()
	cfg.BaseURL = &url.URL{Scheme: "http", Host: l.Addr().String()}
	ss := &streamServer{s: s, l: l, done: make(chan struct{})}
	srv, err := streaming.NewServer(cfg, ss)
	if err != nil {
		l.Close()
		return nil, fmt.Errorf("cri: stream server: %w", err)
	}
	ss.srv = srv
	ss.http = &http.Server{Handler: srv, ReadHeaderTimeout: 30 * time.Second}
	go func() { // owned by streamServer; ends in close
		defer close(ss.done)
		_ = ss.http.Serve(l)
	}()
	return ss, nil
}

func (ss *streamServer) close(ctx context.Context) error {
	err := ss.http.Shutdown(ctx)
	if err != nil {
		err = ss.http.Close()
	}
	<-ss.done
	return err
}

// Exec runs cmd in a vhive container with the stream's stdio. tty is not
// supported (the OCI runtime would need a console socket).
func (ss *streamServer) Exec(ctx context.Context, id string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	c := ss.s.lookup(id)
	if c == nil || c.Kind != kindOCI {
		return fmt.Errorf("cri: container %q is not a vhive container that supports exec", id)
	}
	if tty {
		return fmt.Errorf("cri: exec with a tty into vhive container %q is not supported", id)
	}
	command := ss.s.oci.command(ctx, append([]string{"exec", id}, cmd...)...)
	if in != nil {
		command.Stdin = in
	}
	if out != nil {
		command.Stdout = out
	}
	if errw != nil {
		command.Stderr = errw
	}
	err := command.Run()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return utilexec.CodeExitError{Err: err, Code: ee.ExitCode()}
	}
	return err
}

func (ss *streamServer) Attach(ctx context.Context, id string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	return fmt.Errorf("cri: attach to vhive container %q is not supported; read its log", id)
}

func (ss *streamServer) PortForward(ctx context.Context, podID string, port int32, stream io.ReadWriteCloser) error {
	return fmt.Errorf("cri: port forwarding is served by containerd for pod %q", podID)
}

// Exec returns a streaming URL for vhive containers; others are proxied.
func (s *Server) Exec(ctx context.Context, req *runtimeapi.ExecRequest) (*runtimeapi.ExecResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.Exec(ctx, req)
	}
	if c.Kind != kindOCI || s.stream == nil {
		return nil, status.Errorf(codes.Unimplemented, "cri: container %q runs in a function sandbox; exec is not supported there", c.ID)
	}
	if len(req.GetCmd()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "cri: Exec: cmd is empty")
	}
	if req.GetTty() {
		return nil, status.Errorf(codes.Unimplemented, "cri: exec with a tty into vhive container %q is not supported", c.ID)
	}
	if !req.GetStdout() && !req.GetStderr() && !req.GetStdin() {
		return nil, status.Error(codes.InvalidArgument, "cri: Exec: one of stdin, stdout or stderr must be set")
	}
	s.mu.Lock()
	running := c.State == runtimeapi.ContainerState_CONTAINER_RUNNING
	s.mu.Unlock()
	if !running {
		return nil, status.Errorf(codes.FailedPrecondition, "cri: container %q is not running", c.ID)
	}
	return s.stream.srv.GetExec(req)
}

func (s *Server) Attach(ctx context.Context, req *runtimeapi.AttachRequest) (*runtimeapi.AttachResponse, error) {
	if c := s.lookup(req.GetContainerId()); c != nil {
		return nil, status.Errorf(codes.Unimplemented, "cri: attach to vhive container %q is not implemented; read its log", c.ID)
	}
	return s.rt.Attach(ctx, req)
}
