package cluster

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// launch describes a process to start.
type launch struct {
	component string
	node      string // "" for the host
	netns     string // netns path to run in; "" for the host's
	cgroup    string // pids-hierarchy cgroup dir to run in; "" for the caller's
	args      []string
	env       []string // added to the environment
	log       string
}

// start runs l detached (own session, stdin /dev/null, output to l.log) and
// returns its record. The child is forked from a locked OS thread that has
// joined l.netns and l.cgroup, so it starts inside them before running any
// of its own code; the thread is discarded afterwards.
func start(l launch) (proc, error) {
	if err := os.MkdirAll(filepath.Dir(l.log), 0o755); err != nil {
		return proc{}, fmt.Errorf("cluster: %s: %w", l.component, err)
	}
	out, err := os.OpenFile(l.log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return proc{}, fmt.Errorf("cluster: %s log: %w", l.component, err)
	}
	defer out.Close()
	fmt.Fprintf(out, "=== %s %s\n", time.Now().UTC().Format(time.RFC3339), strings.Join(l.args, " "))
	cmd := exec.Command(l.args[0], l.args[1:]...)
	cmd.Stdout, cmd.Stderr = out, out
	cmd.Env = append(os.Environ(), l.env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		restore, err := enterThread(l.netns, l.cgroup)
		if err != nil {
			errc <- err
			if restore() {
				runtime.UnlockOSThread()
			}
			return
		}
		errc <- cmd.Start()
		// Unlocked only when the thread is back in its namespace and
		// cgroup; otherwise it exits (or, the main thread, wedges) locked.
		if restore() {
			runtime.UnlockOSThread()
		}
	}()
	if err := <-errc; err != nil {
		return proc{}, fmt.Errorf("cluster: start %s: %w", l.component, err)
	}
	p := proc{Component: l.component, Node: l.node, PID: cmd.Process.Pid, Args: l.args, Log: l.log}
	st, err := procStartTime(p.PID)
	if err != nil {
		// It already exited; Wait below reaps it and the caller's readiness
		// check reports the log.
		st = 0
	}
	p.StartTime = st
	// Reap it if it ends while this process lives (tests, a long Up).
	go cmd.Wait() //nolint:errcheck // the exit is seen through the process table and the log
	return p, nil
}

// enterThread moves the calling (locked) thread into the netns at nsPath
// and the v1 cgroup dir (through "tasks", which moves single threads; a
// fork inherits the forking thread's cgroup). restore moves it back and
// reports whether that worked.
func enterThread(nsPath, cgroup string) (restore func() bool, err error) {
	var undo []func() error
	restore = func() bool {
		ok := true
		for i := len(undo) - 1; i >= 0; i-- {
			if undo[i]() != nil {
				ok = false
			}
		}
		return ok
	}
	tid := strconv.Itoa(unix.Gettid())
	if cgroup != "" {
		orig, err := threadCgroup(filepath.Join(cgroupFS, "pids"), "pids")
		if err != nil {
			return restore, err
		}
		if err := os.WriteFile(filepath.Join(cgroup, "tasks"), []byte(tid), 0o644); err != nil {
			return restore, fmt.Errorf("join cgroup %s: %w", cgroup, err)
		}
		undo = append(undo, func() error { return os.WriteFile(filepath.Join(orig, "tasks"), []byte(tid), 0o644) })
	}
	if nsPath != "" {
		orig, err := unix.Open("/proc/thread-self/ns/net", unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			return restore, fmt.Errorf("open own netns: %w", err)
		}
		fd, err := unix.Open(nsPath, unix.O_RDONLY|unix.O_CLOEXEC, 0)
		if err != nil {
			unix.Close(orig)
			return restore, fmt.Errorf("open netns %s: %w", nsPath, err)
		}
		err = unix.Setns(fd, unix.CLONE_NEWNET)
		unix.Close(fd)
		if err != nil {
			unix.Close(orig)
			return restore, fmt.Errorf("join netns %s: %w", nsPath, err)
		}
		undo = append(undo, func() error {
			defer unix.Close(orig)
			return unix.Setns(orig, unix.CLONE_NEWNET)
		})
	}
	return restore, nil
}

// threadCgroup returns the calling thread's cgroup dir in the v1 hierarchy
// controller mounted at root/controller.
func threadCgroup(root, controller string) (string, error) {
	b, err := os.ReadFile("/proc/thread-self/cgroup")
	if err != nil {
		return "", fmt.Errorf("read own cgroup: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.SplitN(line, ":", 3)
		if len(f) == 3 && slices.Contains(strings.Split(f[1], ","), controller) {
			return filepath.Join(root, f[2]), nil
		}
	}
	return "", fmt.Errorf("own %s cgroup not found", controller)
}

// procStat returns the state letter and start time of pid.
func procStat(pid int) (byte, uint64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, 0, err
	}
	// comm may hold spaces and parentheses: fields follow the last ')'.
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return 0, 0, fmt.Errorf("cluster: /proc/%d/stat: malformed", pid)
	}
	f := strings.Fields(string(b[i+1:]))
	if len(f) < 20 {
		return 0, 0, fmt.Errorf("cluster: /proc/%d/stat: malformed", pid)
	}
	t, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return 0, 0, fmt.Errorf("cluster: /proc/%d/stat start time: %w", pid, err)
	}
	return f[0][0], t, nil
}

func procStartTime(pid int) (uint64, error) {
	_, t, err := procStat(pid)
	return t, err
}

// alive reports whether p is still the process Up started (not a zombie,
// not a new process with a reused pid). A multi-threaded process whose
// main thread has exited shows as a zombie while its other threads still
// run and hold its files and sockets (they do after a SIGKILL, for the
// moment it takes them to exit, or for good when the main thread alone
// called exit): it is alive until the last of them is gone.
func (p proc) alive() bool {
	s, t, err := procStat(p.PID)
	if err != nil || (p.StartTime != 0 && t != p.StartTime) {
		return false
	}
	if s == 'Z' || s == 'X' {
		return otherThreads(p.PID)
	}
	return true
}

// otherThreads reports whether a thread other than the main one of pid is
// still listed.
func otherThreads(pid int) bool {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return false
	}
	for _, e := range ents {
		if e.Name() != strconv.Itoa(pid) {
			return true
		}
	}
	return false
}

// stop signals p with SIGTERM, then SIGKILL after grace; it returns when p
// is gone or ctx ends.
func (p proc) stop(ctx context.Context, grace time.Duration) error {
	if !p.alive() {
		return nil
	}
	if grace > 0 {
		_ = syscall.Kill(p.PID, syscall.SIGTERM)
		if waitGone(ctx, p, grace) {
			return nil
		}
	}
	return p.kill(ctx)
}

// kill sends SIGKILL and waits for p to be gone.
func (p proc) kill(ctx context.Context) error {
	if !p.alive() {
		return nil
	}
	if err := syscall.Kill(p.PID, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("cluster: kill %s (pid %d): %w", p.key(), p.PID, err)
	}
	if !waitGone(ctx, p, 10*time.Second) {
		return fmt.Errorf("cluster: %s (pid %d) still running after SIGKILL", p.key(), p.PID)
	}
	return nil
}

func waitGone(ctx context.Context, p proc, d time.Duration) bool {
	deadline := time.Now().Add(d)
	for p.alive() {
		if time.Now().After(deadline) || ctx.Err() != nil {
			return false
		}
		time.Sleep(50 * time.Millisecond)
	}
	return true
}

// ownProgram reports whether argv0 is a program the cluster runs (directly
// or through containerd and vhive): a process of another name that merely
// mentions Dir (a user's tail of a log) is never ours to kill.
func ownProgram(argv0 string) bool {
	b := filepath.Base(argv0)
	for _, p := range []string{"containerd", "runc", "runsc", "kube", "vhive", "exe"} {
		if strings.HasPrefix(b, p) {
			return true
		}
	}
	return false
}

// pidsWithCmdline returns every process of an ownProgram whose command line
// contains sub.
func pidsWithCmdline(sub string) []int {
	ents, _ := os.ReadDir("/proc")
	self := os.Getpid()
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		b, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil || len(b) == 0 {
			continue
		}
		argv0, _, _ := bytes.Cut(b, []byte{0})
		if bytes.Contains(b, []byte(sub)) && ownProgram(string(argv0)) {
			if s, _, err := procStat(pid); err == nil && s != 'Z' {
				out = append(out, pid)
			}
		}
	}
	return out
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
}
