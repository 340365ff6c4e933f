package wasm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"google.golang.org/grpc"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
)

// WorkerProcess is a worker child process started by SpawnWorker.
type WorkerProcess struct {
	Client *WorkerClient

	cmd        *exec.Cmd
	conn       *grpc.ClientConn
	stderrPath string
	done       chan struct{}
	err        error // set before done is closed
	killOnce   sync.Once
}

// SpawnConfig says how to start a worker process.
type SpawnConfig struct {
	// Command is the argv prefix; WorkerOptions.Args are appended.
	Command []string
	// Env is added to this process's environment (K=V).
	Env []string
	// StderrPath receives the worker's stderr (appended).
	StderrPath string
	// Nice, if > 0, runs the worker (every thread: it gets its own process
	// group) at that nice value until SetNice — for pool workers started in
	// the background, so that they do not slow down cold starts in flight.
	Nice int
}

// SpawnWorker starts sc.Command+o.Args() as a child process in its own
// process group, waits until it reports ready or ctx ends, and connects to
// its control socket. The child gets SIGKILL if this process dies. On error
// nothing is left running.
func SpawnWorker(ctx context.Context, sc SpawnConfig, o WorkerOptions) (*WorkerProcess, error) {
	command, stderrPath, env := sc.Command, sc.StderrPath, sc.Env
	if len(command) == 0 {
		return nil, errors.New("wasm worker command is empty")
	}
	stderr, err := os.OpenFile(stderrPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return nil, fmt.Errorf("open worker stderr file: %w", err)
	}
	defer stderr.Close() // the child has its own descriptor
	cmd := exec.Command(command[0], append(append([]string{}, command[1:]...), o.Args()...)...)
	cmd.Env = append(os.Environ(), env...)
	cmd.Stderr = stderr
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL, Setpgid: true}
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		return nil, fmt.Errorf("worker stdout pipe: %w", err)
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start wasm worker %q: %w", command[0], err)
	}
	p := &WorkerProcess{cmd: cmd, stderrPath: stderrPath, done: make(chan struct{})}
	if sc.Nice > 0 {
		_ = p.SetNice(sc.Nice) // best effort: a slower cold start, not a failure
	}
	ready := make(chan error, 1)
	go func() {
		line, err := bufio.NewReader(stdout).ReadString('\n')
		if err == nil && strings.TrimSpace(line) != WorkerReady {
			err = fmt.Errorf("unexpected first line %q", line)
		}
		ready <- err
		_, _ = io.Copy(io.Discard, stdout) // until exit; Wait closes it
	}()
	go func() {
		werr := cmd.Wait()
		p.err = fmt.Errorf("wasm worker (pid %d) exited: %v; stderr: %s", cmd.Process.Pid, werr, p.StderrTail(2048))
		close(p.done)
	}()
	fail := func(err error) (*WorkerProcess, error) {
		p.Kill()
		return nil, err
	}
	select {
	case err := <-ready:
		if err != nil {
			<-p.done
			return fail(fmt.Errorf("wasm worker did not report ready: %w (%v)", err, p.err))
		}
	case <-p.done:
		return fail(p.err)
	case <-ctx.Done():
		return fail(fmt.Errorf("waiting for wasm worker to be ready: %w", ctx.Err()))
	}
	p.conn, err = grpc.NewClient("unix://"+o.ControlSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fail(fmt.Errorf("connect to wasm worker control socket: %w", err))
	}
	// Connect now, so that the first control call of a cold start does not
	// pay for the connection.
	p.conn.Connect()
	for st := p.conn.GetState(); st != connectivity.Ready; st = p.conn.GetState() {
		if !p.conn.WaitForStateChange(ctx, st) {
			return fail(fmt.Errorf("connect to wasm worker control socket: %w", ctx.Err()))
		}
	}
	p.Client = NewWorkerClient(p.conn)
	return p, nil
}

// SetNice sets the nice value of every thread of the worker (its process
// group, which only it is in).
func (p *WorkerProcess) SetNice(n int) error {
	if err := unix.Setpriority(unix.PRIO_PGRP, p.cmd.Process.Pid, n); err != nil {
		return fmt.Errorf("set nice %d of wasm worker %d: %w", n, p.cmd.Process.Pid, err)
	}
	return nil
}

// Pid is the worker's process ID.
func (p *WorkerProcess) Pid() int { return p.cmd.Process.Pid }

// Done is closed when the process has exited.
func (p *WorkerProcess) Done() <-chan struct{} { return p.done }

// Err describes the exit (status and stderr tail); nil while running.
func (p *WorkerProcess) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return nil
	}
}

// Kill sends SIGKILL (to this child only, by PID) and waits for the exit.
// Safe to call more than once.
func (p *WorkerProcess) Kill() {
	p.killOnce.Do(func() {
		select {
		case <-p.done:
		default:
			_ = p.cmd.Process.Kill()
		}
		<-p.done
		if p.conn != nil {
			_ = p.conn.Close()
		}
	})
}

// StderrTail returns up to n bytes from the end of the worker's stderr file.
func (p *WorkerProcess) StderrTail(n int64) string {
	f, err := os.Open(p.stderrPath)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := max(fi.Size()-n, 0)
	b, _ := io.ReadAll(io.NewSectionReader(f, off, fi.Size()-off))
	return strings.TrimSpace(string(b))
}
