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

// Exec runs cmd in a vhive container with the stream's stdio (on a pty
// when tty is set).
func (ss *streamServer) Exec(ctx context.Context, id string, cmd []string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	c := ss.s.lookup(id)
	if c == nil || c.Kind != kindOCI {
		return fmt.Errorf("cri: container %q is not a vhive container that supports exec", id)
	}
	if tty {
		sizes := make(chan winsize)
		stop := make(chan struct{})
		defer close(stop)
		go func() { // ends when resize is closed or the exec returns
			for {
				select {
				case ts, ok := <-resize:
					if !ok {
						return
					}
					select {
					case sizes <- winsize{Width: ts.Width, Height: ts.Height}:
					case <-stop:
						return
					}
				case <-stop:
					return
				}
			}
		}()
		var w io.Writer = io.Discard
		if out != nil {
			w = out
		}
		code, err := ss.s.oci.execTTY(ctx, id, cmd, in, w, sizes)
		if err != nil {
			return err
		}
		if code != 0 {
			return utilexec.CodeExitError{Err: fmt.Errorf("command %v exited with %d", cmd, code), Code: code}
		}
		return nil
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

// Attach connects a client to a running vhive container's stdio (not on a
// tty): output from now on, and its stdin when the container has one.
func (ss *streamServer) Attach(ctx context.Context, id string, in io.Reader, out, errw io.WriteCloser, tty bool, resize <-chan remotecommandserver.TerminalSize) error {
	c := ss.s.lookup(id)
	if c == nil || c.Kind != kindOCI {
		return fmt.Errorf("cri: container %q is not a running vhive container", id)
	}
	ss.s.mu.Lock()
	proc, done, logs := c.proc, c.done, c.logs
	ss.s.mu.Unlock()
	if proc == nil || logs == nil {
		return fmt.Errorf("cri: container %q is not running", id)
	}
	a := &attachment{}
	if out != nil {
		a.stdout = out
	}
	if errw != nil {
		a.stderr = errw
	}
	detach := logs.attach(a)
	defer detach()
	if in != nil && proc.stdin != nil {
		go func() { // ends at the client's EOF or when stdin is closed
			_, _ = io.Copy(proc.stdin, in)
			if c.Config.GetStdinOnce() {
				proc.stdin.Close()
			}
		}()
	}
	select {
	case <-done:
	case <-ctx.Done():
	}
	return nil
}

func (ss *streamServer) PortForward(ctx context.Context, podID string, port int32, stream io.ReadWriteCloser) error {
	return fmt.Errorf("cri: port forwarding is served by containerd for pod %q", podID)
}

// Exec returns a streaming URL for vhive containers; others are proxied.
// A request with a tty gets a pty; stderr then goes to stdout.
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
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.Attach(ctx, req)
	}
	if c.Kind != kindOCI || s.stream == nil {
		return nil, status.Errorf(codes.Unimplemented, "cri: container %q runs in a function sandbox; attach is not supported there", c.ID)
	}
	if req.GetTty() {
		return nil, status.Errorf(codes.Unimplemented, "cri: attach with a tty to vhive container %q is not supported", c.ID)
	}
	s.mu.Lock()
	running := c.State == runtimeapi.ContainerState_CONTAINER_RUNNING
	s.mu.Unlock()
	if !running {
		return nil, status.Errorf(codes.FailedPrecondition, "cri: container %q is not running", c.ID)
	}
	return s.stream.srv.GetAttach(req)
}
