package oci

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// ErrStopped is what Err wraps when the sandbox ended because Stop was
// called.
var ErrStopped = errors.New("sandbox stopped")

// stderrTail is how much of the function's stderr Err includes.
const stderrTail = 2048

// Sandbox is one instance of an OCI backend. It implements sandbox.Sandbox
// and, for gVisor, sandbox.Snapshotter.
type Sandbox struct {
	b        *Backend
	id       string
	spec     sandbox.Spec
	bundle   string
	rootfs   string // the bundle's rootfs dir (mount point or copy)
	endpoint string

	// Set while creating; afterwards changed only by Stop (under stopMu).
	mounted bool
	net     *netpool.Net
	created bool // the runtime knows the container
	// Set while creating; read-only afterwards.
	initPid int

	done     chan struct{}
	watching bool
	exitErr  error // written before done is closed
	stopping atomic.Bool
	reapers  sync.WaitGroup
	extra    []int // other processes of the sandbox (runsc gofer)

	startMu sync.Mutex
	started bool

	stopMu  sync.Mutex
	stopped bool
}

// prepare validates spec and builds everything but the container: bundle
// directory, rootfs, network, config.json. On error it undoes its work.
func (b *Backend) prepare(ctx context.Context, spec sandbox.Spec) (_ *Sandbox, retErr error) {
	if err := validateSpec(spec); err != nil {
		return nil, err
	}
	s := &Sandbox{
		b:      b,
		id:     spec.ID,
		spec:   spec,
		bundle: filepath.Join(b.bundles, spec.ID),
		done:   make(chan struct{}),
	}
	s.rootfs = filepath.Join(s.bundle, "rootfs")
	if err := b.register(s); err != nil {
		return nil, err
	}
	if err := os.Mkdir(s.bundle, 0o700); err != nil {
		b.unregister(s)
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("oci: sandbox %q: bundle %q exists (left by a crashed daemon? run Cleanup): %w", spec.ID, s.bundle, err)
		}
		return nil, fmt.Errorf("oci: sandbox %q: create bundle: %w", spec.ID, err)
	}
	defer func() {
		if retErr != nil {
			b.rollback(ctx, s)
		}
	}()
	rootPath, readonly, err := s.setupRootfs(ctx)
	if err != nil {
		return nil, err
	}
	n, err := b.cfg.NetPool.Get(ctx)
	if err != nil {
		return nil, fmt.Errorf("oci: sandbox %q: network: %w", spec.ID, err)
	}
	s.net = n
	s.endpoint = net.JoinHostPort(n.GuestIP.String(), strconv.Itoa(spec.Port))
	cs, err := buildSpec(spec, rootPath, readonly, n.NsPath, s.cgroupsPath())
	if err != nil {
		return nil, err
	}
	data, err := json.MarshalIndent(cs, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("oci: sandbox %q: encode config.json: %w", spec.ID, err)
	}
	if err := os.WriteFile(filepath.Join(s.bundle, "config.json"), data, 0o600); err != nil {
		return nil, fmt.Errorf("oci: sandbox %q: write config.json: %w", spec.ID, err)
	}
	return s, nil
}

func (s *Sandbox) cgroupsPath() string {
	return s.b.cgroupParent + "/" + s.id
}

// setupRootfs builds the instance's root filesystem and returns the path
// for the spec's root.path.
func (s *Sandbox) setupRootfs(ctx context.Context) (string, bool, error) {
	mode := s.b.cfg.Rootfs
	if mode == RootfsDirect {
		p, err := filepath.EvalSymlinks(s.spec.Rootfs)
		if err != nil {
			return "", false, fmt.Errorf("oci: sandbox %q: resolve Rootfs %q: %w", s.id, s.spec.Rootfs, err)
		}
		// Not read-only in the spec: runsc would then refuse writes
		// instead of sending them to its memory overlay.
		return p, false, nil
	}
	if err := os.Mkdir(s.rootfs, 0o755); err != nil {
		return "", false, fmt.Errorf("oci: sandbox %q: create rootfs dir: %w", s.id, err)
	}
	if mode == RootfsAuto || mode == RootfsOverlay {
		err := s.mountOverlay()
		if err == nil {
			return s.rootfs, false, nil
		}
		if mode == RootfsOverlay {
			return "", false, err
		}
		s.b.log.Warn("overlay rootfs failed, copying the image rootfs", "id", s.id, "err", err)
	}
	cmd := exec.CommandContext(ctx, "cp", "-a", "--", s.spec.Rootfs+"/.", s.rootfs+"/")
	if out, err := cmd.CombinedOutput(); err != nil {
		return "", false, fmt.Errorf("oci: sandbox %q: copy rootfs %q: %w: %s", s.id, s.spec.Rootfs, err, strings.TrimSpace(string(out)))
	}
	return s.rootfs, false, nil
}

func (s *Sandbox) mountOverlay() error {
	lower, err := filepath.EvalSymlinks(s.spec.Rootfs)
	if err != nil {
		return fmt.Errorf("oci: sandbox %q: resolve Rootfs %q: %w", s.id, s.spec.Rootfs, err)
	}
	if strings.ContainsAny(lower, ",:") {
		return fmt.Errorf("oci: sandbox %q: Rootfs %q contains ',' or ':' and cannot be an overlay lower dir", s.id, lower)
	}
	upper, work := filepath.Join(s.bundle, "upper"), filepath.Join(s.bundle, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return fmt.Errorf("oci: sandbox %q: create %q: %w", s.id, d, err)
		}
	}
	opts := "lowerdir=" + lower + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", s.rootfs, "overlay", 0, opts); err != nil {
		return fmt.Errorf("oci: sandbox %q: mount overlay rootfs on %q: %w", s.id, s.rootfs, err)
	}
	s.mounted = true
	return nil
}

// fileIO connects the runtime's (and so the container's) stdout and stderr
// to files; stdin is /dev/null.
type fileIO struct{ stdout, stderr *os.File }

func (f *fileIO) Close() error {
	return errors.Join(f.stdout.Close(), f.stderr.Close())
}
func (f *fileIO) Stdin() io.WriteCloser  { return nil }
func (f *fileIO) Stdout() io.ReadCloser  { return nil }
func (f *fileIO) Stderr() io.ReadCloser  { return nil }
func (f *fileIO) Set(cmd *exec.Cmd)      { cmd.Stdout, cmd.Stderr = f.stdout, f.stderr }
func (f *fileIO) CloseAfterStart() error { return f.Close() }

func (s *Sandbox) openIO() (*fileIO, error) {
	open := func(name string) (*os.File, error) {
		return os.OpenFile(filepath.Join(s.bundle, name), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	}
	out, err := open("stdout.log")
	if err != nil {
		return nil, fmt.Errorf("oci: sandbox %q: open stdout log: %w", s.id, err)
	}
	errf, err := open("stderr.log")
	if err != nil {
		out.Close()
		return nil, fmt.Errorf("oci: sandbox %q: open stderr log: %w", s.id, err)
	}
	return &fileIO{stdout: out, stderr: errf}, nil
}

// create runs the runtime's create and starts watching the container.
func (s *Sandbox) create(ctx context.Context) error {
	fio, err := s.openIO()
	if err != nil {
		return err
	}
	pidFile := filepath.Join(s.bundle, "init.pid")
	// The container may exist after a failed create; Stop deletes it.
	s.created = true
	err = s.b.rt.Create(ctx, s.id, s.bundle, &runc.CreateOpts{IO: fio, PidFile: pidFile})
	fio.Close()
	if err != nil {
		return fmt.Errorf("oci: sandbox %q: %s create: %w: %s", s.id, s.b.cfg.Runtime, ctxErr(ctx, err), s.tail())
	}
	return s.watch(pidFile)
}

// run runs the runtime's `run --detach` and starts watching the container.
func (s *Sandbox) run(ctx context.Context) error {
	fio, err := s.openIO()
	if err != nil {
		return err
	}
	pidFile := filepath.Join(s.bundle, "init.pid")
	s.created = true
	_, err = s.b.rt.Run(ctx, s.id, s.bundle, &runc.CreateOpts{IO: fio, PidFile: pidFile, Detach: true})
	fio.Close()
	if err != nil {
		return fmt.Errorf("oci: start sandbox %q: %s run: %w: %s", s.id, s.b.cfg.Runtime, ctxErr(ctx, err), s.tail())
	}
	return s.watch(pidFile)
}

// restore runs `runsc restore --detach` from a checkpoint directory.
func (s *Sandbox) restore(ctx context.Context, dir string) error {
	fio, err := s.openIO()
	if err != nil {
		return err
	}
	pidFile := filepath.Join(s.bundle, "init.pid")
	s.created = true
	_, err = s.b.rt.Restore(ctx, s.id, s.bundle, &runc.RestoreOpts{
		CheckpointOpts: runc.CheckpointOpts{ImagePath: dir},
		IO:             fio,
		Detach:         true,
		PidFile:        pidFile,
	})
	fio.Close()
	if err != nil {
		return fmt.Errorf("oci: sandbox %q: runsc restore from %q: %w: %s", s.id, dir, ctxErr(ctx, err), s.tail())
	}
	s.startMu.Lock()
	s.started = true
	s.startMu.Unlock()
	return s.watch(pidFile)
}

// watch waits, in a goroutine, for the container's init (runc) or sandbox
// (runsc) process, which the subreaper setting made a child of this process,
// and reaps the other processes the runtime left as our children.
func (s *Sandbox) watch(pidFile string) error {
	data, err := os.ReadFile(pidFile)
	if err != nil {
		return fmt.Errorf("oci: sandbox %q: read pid file: %w", s.id, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil || pid <= 0 {
		return fmt.Errorf("oci: sandbox %q: pid file %q holds %q", s.id, pidFile, data)
	}
	s.initPid = pid
	s.watching = true
	go s.waitInit(pid)
	for _, p := range childrenWithBundle(s.bundle, pid) {
		s.extra = append(s.extra, p)
		s.reapers.Add(1)
		go func() {
			defer s.reapers.Done()
			waitPid(p)
		}()
	}
	return nil
}

func (s *Sandbox) waitInit(pid int) {
	status, known := waitPid(pid)
	var err error
	switch {
	case s.stopping.Load():
		err = fmt.Errorf("oci: sandbox %q: %w", s.id, ErrStopped)
	case !known:
		err = fmt.Errorf("oci: sandbox %q: process %d exited (status unknown: not a child of the daemon); stderr: %s", s.id, pid, s.tail())
	case status.Signaled() && status.Signal() == unix.SIGKILL && oomKilled(s.b.CgroupDirs(s.id)):
		// Read before Stop deletes the container and with it the cgroup.
		err = fmt.Errorf("oci: sandbox %q: %w: the kernel's OOM killer ended the function at its memory limit of %d MiB; stderr: %s",
			s.id, sandbox.ErrOutOfMemory, s.spec.MemoryLimit>>20, s.tail())
	default:
		err = fmt.Errorf("oci: sandbox %q: function %s; stderr: %s", s.id, describeStatus(status), s.tail())
	}
	s.exitErr = err
	close(s.done)
}

// oomKilled reports whether the memory cgroup among dirs counted an OOM
// kill: "oom_kill N" in memory.oom_control (v1) or memory.events (v2).
func oomKilled(dirs []string) bool {
	for _, d := range dirs {
		for _, f := range []string{"memory.oom_control", "memory.events"} {
			b, err := os.ReadFile(filepath.Join(d, f))
			if err != nil {
				continue
			}
			for _, line := range strings.Split(string(b), "\n") {
				if k, v, ok := strings.Cut(line, " "); ok && k == "oom_kill" {
					if n, _ := strconv.Atoi(strings.TrimSpace(v)); n > 0 {
						return true
					}
				}
			}
		}
	}
	return false
}

func describeStatus(ws unix.WaitStatus) string {
	switch {
	case ws.Exited():
		return fmt.Sprintf("exited with status %d", ws.ExitStatus())
	case ws.Signaled():
		return fmt.Sprintf("killed by signal %v", ws.Signal())
	default:
		return fmt.Sprintf("ended (wait status %#x)", uint32(ws))
	}
}

// waitPid waits for pid to exit. If pid is a child it is reaped and its
// status returned; otherwise waitPid waits on a pidfd and the status is
// unknown.
func waitPid(pid int) (unix.WaitStatus, bool) {
	var ws unix.WaitStatus
	for {
		_, err := unix.Wait4(pid, &ws, 0, nil)
		if err == nil {
			return ws, true
		}
		if errors.Is(err, unix.EINTR) {
			continue
		}
		break
	}
	fd, err := unix.PidfdOpen(pid, 0)
	if err != nil {
		return 0, false // already gone
	}
	defer unix.Close(fd)
	for {
		fds := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
		n, err := unix.Poll(fds, -1)
		if err == nil && n > 0 {
			return 0, false
		}
		if err != nil && !errors.Is(err, unix.EINTR) {
			return 0, false
		}
	}
}

// childrenWithBundle lists this process's children (other than skip) whose
// command line names bundle: the runsc gofer and sandbox, re-parented here.
func childrenWithBundle(bundle string, skip int) []int {
	self := os.Getpid()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var out []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == skip {
			continue
		}
		if ppid, ok := parentOf(pid); !ok || ppid != self {
			continue
		}
		cmdline, err := os.ReadFile(filepath.Join("/proc", e.Name(), "cmdline"))
		if err != nil {
			continue
		}
		for _, arg := range strings.Split(string(cmdline), "\x00") {
			if arg == bundle || arg == "--bundle="+bundle {
				out = append(out, pid)
				break
			}
		}
	}
	return out
}

// parentOf reads the parent pid from /proc/<pid>/stat.
func parentOf(pid int) (int, bool) {
	data, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return 0, false
	}
	// The command name is in parentheses and may contain anything.
	i := strings.LastIndexByte(string(data), ')')
	if i < 0 {
		return 0, false
	}
	f := strings.Fields(string(data[i+1:]))
	if len(f) < 2 {
		return 0, false
	}
	ppid, err := strconv.Atoi(f[1])
	return ppid, err == nil
}

// tail returns the end of the function's stderr, for error messages.
func (s *Sandbox) tail() string {
	f, err := os.Open(filepath.Join(s.bundle, "stderr.log"))
	if err != nil {
		return "(no stderr log)"
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return "(no stderr log)"
	}
	off := max(fi.Size()-stderrTail, 0)
	buf := make([]byte, fi.Size()-off)
	n, _ := f.ReadAt(buf, off)
	t := strings.TrimSpace(string(buf[:n]))
	if t == "" {
		return "(empty)"
	}
	return strconv.Quote(t)
}

// ID returns the instance ID (also the container ID).
func (s *Sandbox) ID() string { return s.id }

// Start runs the function process (`start`). A restored sandbox is already
// running and Start returns nil.
func (s *Sandbox) Start(ctx context.Context) error {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	select {
	case <-s.done:
		return fmt.Errorf("oci: start sandbox %q: it has ended: %w", s.id, s.Err())
	default:
	}
	if s.started {
		return nil
	}
	if !s.created {
		// Create only prepared the bundle: one `run --detach` creates
		// and starts the container.
		if err := s.run(ctx); err != nil {
			return err
		}
		s.started = true
		return nil
	}
	if err := s.b.rt.Start(ctx, s.id); err != nil {
		return fmt.Errorf("oci: start sandbox %q: %w", s.id, ctxErr(ctx, err))
	}
	s.started = true
	return nil
}

// Endpoint is GuestIP:Port.
func (s *Sandbox) Endpoint() string { return s.endpoint }

// Done is closed when the container's process has exited.
func (s *Sandbox) Done() <-chan struct{} { return s.done }

// Err says why the sandbox ended: the exit status and the tail of stderr, or
// ErrStopped. Nil while it runs.
func (s *Sandbox) Err() error {
	select {
	case <-s.done:
		return s.exitErr
	default:
		return nil
	}
}

// Stop kills and deletes the container, unmounts the rootfs, returns the
// network to the pool and removes the bundle. It is idempotent, works on a
// half-created sandbox, and may be retried after an error.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.stopMu.Lock()
	defer s.stopMu.Unlock()
	if s.stopped {
		return nil
	}
	s.stopping.Store(true)
	var errs []error
	if s.created {
		if err := s.b.rt.Delete(ctx, s.id, &runc.DeleteOpts{Force: true}); err != nil && !s.b.gone(ctx, s.id) {
			errs = append(errs, fmt.Errorf("oci: delete sandbox %q: %w", s.id, err))
		} else {
			s.created = false
		}
	}
	if s.watching && !s.created {
		if err := waitCtx(ctx, s.done, 10*time.Second); err != nil {
			errs = append(errs, fmt.Errorf("oci: sandbox %q: process %d did not exit: %w", s.id, s.initPid, err))
		} else {
			reaped := make(chan struct{})
			go func() { s.reapers.Wait(); close(reaped) }()
			if err := waitCtx(ctx, reaped, 10*time.Second); err != nil {
				errs = append(errs, fmt.Errorf("oci: sandbox %q: processes %v did not exit: %w", s.id, s.extra, err))
			}
		}
	}
	if !s.created {
		// A runtime killed mid-create (cancelled context) leaves the
		// cgroup without a container that delete would remove.
		if err := s.b.removeCgroups(ctx, s.id); err != nil {
			errs = append(errs, err)
		}
	}
	if s.mounted {
		if err := unix.Unmount(s.rootfs, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
			errs = append(errs, fmt.Errorf("oci: sandbox %q: unmount rootfs: %w", s.id, err))
		} else {
			s.mounted = false
		}
	}
	if s.net != nil && !s.created {
		if err := s.b.cfg.NetPool.Put(ctx, s.net); err != nil {
			errs = append(errs, fmt.Errorf("oci: sandbox %q: %w", s.id, err))
		}
		// The pool destroyed a net it could not reset; either way it
		// is no longer ours.
		s.net = nil
	}
	if len(errs) == 0 {
		if err := os.RemoveAll(s.bundle); err != nil {
			errs = append(errs, fmt.Errorf("oci: sandbox %q: remove bundle: %w", s.id, err))
		}
	}
	if len(errs) > 0 {
		return errors.Join(errs...)
	}
	if !s.watching {
		s.exitErr = fmt.Errorf("oci: sandbox %q: %w before it ran", s.id, ErrStopped)
		close(s.done)
	}
	s.b.unregister(s)
	s.stopped = true
	return nil
}

// ctxErr makes a runtime command killed by ctx report the context's error
// (errors.Is(err, context.DeadlineExceeded)) instead of "exit status -1".
func ctxErr(ctx context.Context, err error) error {
	if cerr := ctx.Err(); cerr != nil && !errors.Is(err, cerr) {
		return fmt.Errorf("%w (runtime command killed: %v)", cerr, err)
	}
	return err
}

func waitCtx(ctx context.Context, ch <-chan struct{}, limit time.Duration) error {
	t := time.NewTimer(limit)
	defer t.Stop()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-t.C:
		return fmt.Errorf("timed out after %v", limit)
	}
}

// gone reports whether the runtime no longer knows container id.
func (b *Backend) gone(ctx context.Context, id string) bool {
	_, err := b.rt.State(ctx, id)
	return err != nil && (strings.Contains(err.Error(), "does not exist") || strings.Contains(err.Error(), "not exist") || strings.Contains(err.Error(), "cannot load container"))
}
