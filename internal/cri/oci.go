package cri

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/containerd/console"
	"golang.org/x/sys/unix"
)

// ociRuntime drives an OCI runtime CLI (runc, or runsc which takes the same
// commands) for the containers of vhive-handler pods. Each container is run
// with `<runtime> run` in the foreground as a child of the daemon, so its exit
// status is the container's and no subreaper is needed; the runtime deletes
// the container when its process exits.
type ociRuntime struct {
	bin  string
	args []string // global flags
	root string   // --root: the runtime's state directory, ours alone
	log  *slog.Logger
}

func (r *ociRuntime) command(ctx context.Context, args ...string) *exec.Cmd {
	all := append([]string{"--root", r.root}, r.args...)
	return exec.CommandContext(ctx, r.bin, append(all, args...)...)
}

// output runs a short runtime command and returns its stdout, or an error
// naming the command with its stderr.
func (r *ociRuntime) output(ctx context.Context, args ...string) ([]byte, error) {
	cmd := r.command(ctx, args...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return out, fmt.Errorf("%s %s: %w: %s", filepath.Base(r.bin), strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// forceDelete removes the runtime's container id if it exists (kills it).
func (r *ociRuntime) forceDelete(ctx context.Context, id string) error {
	if _, err := os.Stat(filepath.Join(r.root, id)); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if _, err := r.output(ctx, "delete", "--force", id); err != nil {
		if strings.Contains(err.Error(), "does not exist") || strings.Contains(err.Error(), "not exist") {
			return nil
		}
		return fmt.Errorf("cri: delete container %q: %w", id, err)
	}
	return nil
}

type ociState struct {
	Status string `json:"status"`
	Pid    int    `json:"pid"`
}

func (r *ociRuntime) state(ctx context.Context, id string) (ociState, error) {
	var st ociState
	out, err := r.output(ctx, "state", id)
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(out, &st); err != nil {
		return st, fmt.Errorf("decode state of %q: %w", id, err)
	}
	return st, nil
}

// ociProc is a running `<runtime> run`.
type ociProc struct {
	cmd   *exec.Cmd
	stdin io.WriteCloser // the container's stdin when its config asks for one
	done  chan struct{}  // closed after the process exited and its output was drained
	exit  int32
	err   error // why the runtime failed, when it did not run the process
	pid   int   // container init pid (host namespace), 0 if unknown
}

// start runs the bundle's container with its stdout/stderr copied into w. It
// returns once the container's process runs (or has already exited).
func (r *ociRuntime) start(ctx context.Context, id, bundle string, w *logWriter, stdin bool) (*ociProc, error) {
	var inR, inW *os.File
	if stdin {
		var err error
		if inR, inW, err = os.Pipe(); err != nil {
			return nil, fmt.Errorf("cri: stdin pipe for %q: %w", id, err)
		}
	}
	outR, outW, err := os.Pipe()
	if err != nil {
		return nil, fmt.Errorf("cri: stdout pipe for %q: %w", id, err)
	}
	errR, errW, err := os.Pipe()
	if err != nil {
		outR.Close()
		outW.Close()
		return nil, fmt.Errorf("cri: stderr pipe for %q: %w", id, err)
	}
	logFile := filepath.Join(bundle, "runtime.log")
	_ = os.Remove(logFile)
	// Not CommandContext: the container outlives the request.
	all := append([]string{"--root", r.root, "--log", logFile}, r.args...)
	cmd := exec.Command(r.bin, append(all, "run", "--bundle", bundle, id)...)
	cmd.Stdout = outW
	cmd.Stderr = errW
	if inR != nil {
		cmd.Stdin = inR
	}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		outR.Close()
		outW.Close()
		errR.Close()
		errW.Close()
		if inR != nil {
			inR.Close()
			inW.Close()
		}
		return nil, fmt.Errorf("cri: start %s run %q: %w", r.bin, id, err)
	}
	outW.Close()
	errW.Close()
	p := &ociProc{cmd: cmd, done: make(chan struct{})}
	if inR != nil {
		inR.Close()
		p.stdin = inW
	}
	copied := make(chan struct{}, 2)
	go func() { w.copyFrom("stdout", outR); outR.Close(); copied <- struct{}{} }()
	go func() { w.copyFrom("stderr", errR); errR.Close(); copied <- struct{}{} }()
	exited := make(chan struct{})
	go func() {
		err := cmd.Wait()
		var ee *exec.ExitError
		switch {
		case err == nil:
		case errors.As(err, &ee):
			if ws, ok := ee.Sys().(syscall.WaitStatus); ok && ws.Signaled() {
				p.exit = 128 + int32(ws.Signal())
			} else {
				p.exit = int32(ee.ExitCode())
			}
		default:
			p.exit = -1
			p.err = err
		}
		close(exited)
		<-copied
		<-copied
		if p.stdin != nil {
			p.stdin.Close()
		}
		close(p.done)
	}()
	// Wait until the runtime reports the container running, or the run ended.
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := r.state(ctx, id)
		if err == nil && st.Status == "running" && r.execed(st.Pid) {
			p.pid = st.Pid
			return p, nil
		}
		select {
		case <-exited:
			if p.exit != 0 || p.err != nil {
				if msg := runtimeError(logFile); msg != "" {
					p.err = errors.New(msg)
				}
			}
			if p.err != nil {
				return p, fmt.Errorf("cri: start container %q: %w", id, p.err)
			}
			return p, nil
		case <-ctx.Done():
			return p, fmt.Errorf("cri: start container %q: %w", id, ctx.Err())
		case <-tick.C:
		}
	}
}

// execed reports whether the container's init process has replaced the
// runtime (runc's "running" state is set just before the execve, which can
// still fail). runsc reports its sandbox process, which stays runsc.
func (r *ociRuntime) execed(pid int) bool {
	if pid <= 0 {
		return false
	}
	if filepath.Base(r.bin) != "runc" {
		return true
	}
	exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
	return err == nil && !strings.Contains(exe, "runc")
}

// runtimeError extracts the last error runc logged (JSON or text log).
func runtimeError(logFile string) string {
	b, err := os.ReadFile(logFile)
	if err != nil {
		return ""
	}
	var last string
	for _, line := range strings.Split(string(b), "\n") {
		var rec struct {
			Level string `json:"level"`
			Msg   string `json:"msg"`
		}
		if json.Unmarshal([]byte(line), &rec) == nil {
			if rec.Level == "error" || rec.Level == "fatal" {
				last = rec.Msg
			}
			continue
		}
		if strings.Contains(strings.ToLower(line), "error") {
			last = line
		}
	}
	return last
}

// kill signals the container's processes (all of them with all=true).
func (r *ociRuntime) kill(ctx context.Context, id string, sig unix.Signal, all bool) error {
	args := []string{"kill"}
	if all {
		args = append(args, "--all")
	}
	args = append(args, id, fmt.Sprint(int(sig)))
	_, err := r.output(ctx, args...)
	return err
}

// execSync runs args in container id with the container's process settings
// and returns its output and exit code. At the timeout the command's process
// is killed (not only the runtime) and a DeadlineExceeded error returned.
func (r *ociRuntime) execSync(ctx context.Context, id string, args []string, timeout time.Duration) (stdout, stderr []byte, exit int32, err error) {
	pidFile, err := os.CreateTemp("", "vhive-exec-*.pid")
	if err != nil {
		return nil, nil, -1, fmt.Errorf("exec in container %q: %w", id, err)
	}
	pidFile.Close()
	os.Remove(pidFile.Name()) // the runtime creates it
	defer os.Remove(pidFile.Name())
	all := append([]string{"--root", r.root}, r.args...)
	cmd := exec.Command(r.bin, append(append(all, "exec", "--pid-file", pidFile.Name(), id), args...)...)
	var o, e bytes.Buffer
	cmd.Stdout = &o
	cmd.Stderr = &e
	if err := cmd.Start(); err != nil {
		return nil, nil, -1, fmt.Errorf("exec in container %q: %w", id, err)
	}
	waited := make(chan error, 1)
	go func() { waited <- cmd.Wait() }()
	var expired <-chan time.Time
	if timeout > 0 {
		t := time.NewTimer(timeout)
		defer t.Stop()
		expired = t.C
	}
	var why error
	select {
	case err = <-waited:
	case <-expired:
		why = context.DeadlineExceeded
	case <-ctx.Done():
		why = ctx.Err()
	}
	if why != nil {
		if b, err := os.ReadFile(pidFile.Name()); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && pid > 0 {
				_ = unix.Kill(pid, unix.SIGKILL)
			}
		}
		select {
		case <-waited:
		case <-time.After(5 * time.Second):
			_ = cmd.Process.Kill()
			<-waited
		}
		return o.Bytes(), e.Bytes(), -1, fmt.Errorf("exec %v in container %q: timeout %v exceeded: %w", args, id, timeout, why)
	}
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return o.Bytes(), e.Bytes(), int32(ee.ExitCode()), nil
	}
	if err != nil {
		return nil, nil, -1, fmt.Errorf("exec in container %q: %w", id, err)
	}
	return o.Bytes(), e.Bytes(), 0, nil
}

type ociStats struct {
	CPUTotal     uint64 // ns
	MemoryUsage  uint64
	InactiveFile uint64
}

func (r *ociRuntime) stats(ctx context.Context, id string) (ociStats, error) {
	var st ociStats
	out, err := r.output(ctx, "events", "--stats", id)
	if err != nil {
		return st, err
	}
	var ev struct {
		Data struct {
			CPU struct {
				Usage struct {
					Total uint64 `json:"total"`
				} `json:"usage"`
			} `json:"cpu"`
			Memory struct {
				Usage struct {
					Usage uint64 `json:"usage"`
				} `json:"usage"`
				Raw map[string]uint64 `json:"raw"`
			} `json:"memory"`
		} `json:"data"`
	}
	if err := json.Unmarshal(out, &ev); err != nil {
		return st, fmt.Errorf("decode stats of %q: %w", id, err)
	}
	st.CPUTotal = ev.Data.CPU.Usage.Total
	st.MemoryUsage = ev.Data.Memory.Usage.Usage
	st.InactiveFile = ev.Data.Memory.Raw["total_inactive_file"]
	if st.InactiveFile == 0 {
		st.InactiveFile = ev.Data.Memory.Raw["inactive_file"]
	}
	return st, nil
}

// execTTY runs args in container id on a pseudo-terminal. The runtime in
// the foreground needs a controlling terminal of its own: it gets the slave
// of a pty whose master is ours (raw, so the container's terminal output
// passes unchanged), makes the container's pty and copies between the two.
// in is written to our master, the output read from it; resize events set
// its window size, which the runtime passes on (SIGWINCH).
func (r *ociRuntime) execTTY(ctx context.Context, id string, args []string, in io.Reader, out io.Writer, resize <-chan winsize) (int, error) {
	master, slavePath, err := console.NewPty()
	if err != nil {
		return -1, fmt.Errorf("exec in container %q: pty: %w", id, err)
	}
	defer master.Close()
	if err := master.SetRaw(); err != nil {
		return -1, fmt.Errorf("exec in container %q: raw pty: %w", id, err)
	}
	slave, err := os.OpenFile(slavePath, os.O_RDWR|unix.O_NOCTTY, 0)
	if err != nil {
		return -1, fmt.Errorf("exec in container %q: open %s: %w", id, slavePath, err)
	}
	cmd := r.command(ctx, append([]string{"exec", "--tty", id}, args...)...)
	cmd.Stdin, cmd.Stdout, cmd.Stderr = slave, slave, slave
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true, Setctty: true, Ctty: 0}
	err = cmd.Start()
	slave.Close()
	if err != nil {
		return -1, fmt.Errorf("exec in container %q: %w", id, err)
	}
	stop := make(chan struct{})
	defer close(stop)
	go func() { // ends with the exec
		for {
			select {
			case ws, ok := <-resize:
				if !ok {
					return
				}
				_ = master.Resize(console.WinSize{Height: ws.Height, Width: ws.Width})
			case <-stop:
				return
			}
		}
	}()
	if in != nil {
		go func() { _, _ = io.Copy(master, in) }() // ends when master is closed
	}
	var tail bytes.Buffer                                                            // the runtime's own errors arrive on the pty too
	_, _ = io.Copy(io.MultiWriter(out, &limitedBuffer{b: &tail, max: 4096}), master) // EIO once the slave side is closed
	err = cmd.Wait()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		if strings.Contains(tail.String(), "level=error") {
			return -1, fmt.Errorf("exec in container %q: %s", id, strings.TrimSpace(tail.String()))
		}
		return ee.ExitCode(), nil
	}
	if err != nil {
		return -1, fmt.Errorf("exec in container %q: %w", id, err)
	}
	return 0, nil
}

type winsize struct{ Width, Height uint16 }

// limitedBuffer keeps the last max bytes written.
type limitedBuffer struct {
	b   *bytes.Buffer
	max int
}

func (l *limitedBuffer) Write(p []byte) (int, error) {
	l.b.Write(p)
	if l.b.Len() > l.max {
		l.b.Next(l.b.Len() - l.max)
	}
	return len(p), nil
}

// oomWatch follows `<runtime> events` of a running container and records
// whether the kernel OOM-killed one of its processes.
type oomWatch struct {
	cmd  *exec.Cmd
	done chan struct{}
	oom  atomic.Bool
}

func (r *ociRuntime) watchOOM(id string) (*oomWatch, error) {
	cmd := exec.Command(r.bin, append(append([]string{"--root", r.root}, r.args...), "events", "--interval", "1h", id)...)
	out, err := cmd.StdoutPipe()
	if err != nil {
		return nil, err
	}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("watch events of %q: %w", id, err)
	}
	w := &oomWatch{cmd: cmd, done: make(chan struct{})}
	go func() { // ends when the runtime stops reporting (container gone) or stop kills it
		defer close(w.done)
		dec := json.NewDecoder(out)
		for {
			var ev struct {
				Type string `json:"type"`
			}
			if err := dec.Decode(&ev); err != nil {
				break
			}
			if ev.Type == "oom" {
				w.oom.Store(true)
			}
		}
		_ = cmd.Wait()
	}()
	return w, nil
}

// stop ends the watch (after the container exited, its last events read).
func (w *oomWatch) stop() bool {
	select {
	case <-w.done:
	case <-time.After(time.Second):
		_ = w.cmd.Process.Kill()
		<-w.done
	}
	return w.oom.Load()
}
