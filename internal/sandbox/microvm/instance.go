package microvm

import (
	"bytes"
	"context"
	"crypto/rand"
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
	"syscall"
	"time"

	"vhive.dev/vhive/internal/microvm/agentproto"
	"vhive.dev/vhive/internal/microvm/qmp"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// ErrStopped is what Err wraps when the sandbox ended because Stop was
// called.
var ErrStopped = errors.New("sandbox stopped")

// consoleTail is how much of the console log error messages include.
const consoleTail = 2048

// Sandbox is one microVM.
type Sandbox struct {
	b        *Backend
	id       string
	spec     sandbox.Spec
	dir      string
	qmpSock  string
	agentSck string
	disk     string // the image's ext4
	memMiB   int
	cpus     int
	start    agentproto.Start
	net      *netpool.Net
	tap      *os.File
	nat      *natSetup // the NAT to the guest, set up while QEMU starts
	endpoint string

	// restore: the snapshot to resume from (nil for a boot).
	restore *restoreParams

	done    chan struct{}
	errMu   sync.Mutex
	exitErr error // set before done is closed; or by the agent before

	mu      sync.Mutex // guards the fields below and serializes Start/Stop
	started bool
	stopped bool
	cmd     *exec.Cmd
	qmp     *qmp.Client
	agent   net.Conn
	ready   chan error  // the agent's answer to start/resume
	killed  atomic.Bool // kill sent QEMU its SIGKILL
	stages  map[string]time.Duration
	waited  chan struct{}
}

// Create prepares an instance: directory, rootfs disk (built on the image's
// first use), network with its tap. QEMU starts in Start.
func (b *Backend) Create(ctx context.Context, spec sandbox.Spec) (sandbox.Sandbox, error) {
	return b.prepare(ctx, spec, nil)
}

func (b *Backend) prepare(ctx context.Context, spec sandbox.Spec, rp *restoreParams) (_ *Sandbox, retErr error) {
	if err := validateSpec(spec); err != nil {
		return nil, err
	}
	base := b.sockBase(spec.ID)
	s := &Sandbox{
		b: b, id: spec.ID, spec: spec,
		dir:      b.InstanceDir(spec.ID),
		qmpSock:  base + ".qmp",
		agentSck: base + ".agent",
		memMiB:   b.memMiB(spec),
		cpus:     b.vcpus(spec),
		restore:  rp,
		done:     make(chan struct{}),
		ready:    make(chan error, 1),
	}
	if rp != nil {
		s.memMiB, s.cpus = rp.meta.MemoryMiB, rp.meta.CPUs
	}
	if err := b.register(s); err != nil {
		return nil, err
	}
	if err := os.Mkdir(s.dir, 0o700); err != nil {
		b.unregister(s)
		if errors.Is(err, os.ErrExist) {
			return nil, fmt.Errorf("microvm: sandbox %q: %q exists (left by a crashed daemon? run Cleanup): %w", spec.ID, s.dir, err)
		}
		return nil, fmt.Errorf("microvm: sandbox %q: %w", spec.ID, err)
	}
	defer func() {
		if retErr != nil {
			if err := s.Stop(context.WithoutCancel(ctx)); err != nil {
				b.log.Error("rollback of a failed create left something behind", "id", s.id, "err", err)
			}
		}
	}()
	if rp != nil {
		s.disk = rp.meta.Disk
	} else {
		disk, err := b.rootfs.Get(ctx, spec.ImageDigest, spec.Rootfs)
		if err != nil {
			return nil, fmt.Errorf("microvm: sandbox %q: rootfs disk: %w", spec.ID, err)
		}
		s.disk = disk
	}
	st, err := startConfig(spec)
	if err != nil {
		return nil, err
	}
	s.start = st
	n, err := b.cfg.NetPool.Get(ctx)
	if err != nil {
		return nil, fmt.Errorf("microvm: sandbox %q: network: %w", spec.ID, err)
	}
	s.net = n
	s.endpoint = net.JoinHostPort(n.GuestIP.String(), strconv.Itoa(spec.Port))
	s.start.Net = agentproto.Net{IP: guestIP.String(), Bits: guestPrefix.Bits(), Gateway: tapIP.String()}
	tap, err := plugTap(n)
	if err != nil {
		return nil, fmt.Errorf("microvm: sandbox %q: %w", spec.ID, err)
	}
	s.tap = tap
	s.nat = startNAT(ctx, n)
	return s, nil
}

// ID returns the instance id.
func (s *Sandbox) ID() string { return s.id }

// Endpoint is GuestIP:Port.
func (s *Sandbox) Endpoint() string { return s.endpoint }

// Done is closed when QEMU has exited.
func (s *Sandbox) Done() <-chan struct{} { return s.done }

// Err says why the instance ended; nil while it runs.
func (s *Sandbox) Err() error {
	select {
	case <-s.done:
	default:
		return nil
	}
	s.errMu.Lock()
	defer s.errMu.Unlock()
	return s.exitErr
}

// setExit records the first reason the instance ends.
func (s *Sandbox) setExit(err error) {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	if s.exitErr == nil {
		s.exitErr = err
	}
}

func (s *Sandbox) tail() string {
	return tailOf(filepath.Join(s.dir, "console.log"), consoleTail)
}

func tailOf(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return ""
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return ""
	}
	off := fi.Size() - n
	if off < 0 {
		off = 0
	}
	b := make([]byte, fi.Size()-off)
	_, _ = f.ReadAt(b, off)
	return strings.TrimSpace(string(bytes.ToValidUTF8(b, []byte("?"))))
}

// Start boots the VM and the function and returns once the function
// listens on its port (as the agent reports), or with the function's exit
// (status and stderr) or the console's tail if it never gets there. For a
// restored sandbox it does nothing: Restore returns it running.
func (s *Sandbox) Start(ctx context.Context) error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		return fmt.Errorf("microvm: start of sandbox %q: %w", s.id, ErrStopped)
	}
	if s.started {
		s.mu.Unlock()
		if s.restore != nil {
			return nil
		}
		return fmt.Errorf("microvm: sandbox %q already started", s.id)
	}
	s.started = true
	err := s.launch(ctx)
	s.mu.Unlock()
	if err == nil {
		st := s.start
		st.TimeUnixNano = time.Now().UnixNano()
		if st.Entropy, err = entropy(); err == nil {
			err = s.handshake(ctx, agentproto.Message{Type: agentproto.TypeStart, Start: &st})
		}
	}
	if err != nil {
		s.setExit(err)
		_ = s.kill()
		return err
	}
	return nil
}

// qemuArgs builds QEMU's command line. mem is the memory-backend-file
// property list.
func (s *Sandbox) qemuArgs(mem string, kernel, initrd string, incoming bool) []string {
	b := s.b
	cmdline := "console=ttyS0 panic=-1 reboot=t quiet tsc=reliable no_timer_check"
	if b.cfg.TSCkHz > 0 {
		cmdline += " tsc_early_khz=" + strconv.Itoa(b.cfg.TSCkHz)
	}
	if b.cfg.kernelArgs != "" {
		cmdline += " " + b.cfg.kernelArgs
	}
	accel := b.cfg.Accel
	if accel == AccelTCG && b.cfg.TCGBufferMiB > 0 {
		accel += ",tb-size=" + strconv.Itoa(b.cfg.TCGBufferMiB)
	}
	args := []string{
		"-name", "vhive-" + s.id,
		"-accel", accel,
		"-M", "microvm,memory-backend=mem",
		"-m", strconv.Itoa(s.memMiB) + "M",
		"-smp", strconv.Itoa(s.cpus),
		"-nodefaults", "-no-user-config", "-display", "none", "-no-reboot",
		"-object", "memory-backend-file,id=mem,size=" + strconv.Itoa(s.memMiB) + "M," + mem,
		"-kernel", kernel, "-initrd", initrd, "-append", cmdline,
		"-serial", "file:" + filepath.Join(s.dir, "console.log"),
		"-drive", "id=root,file=" + s.disk + ",format=raw,if=none,readonly=on",
		"-device", "virtio-blk-device,drive=root",
		"-netdev", "tap,id=n0,fd=3",
		"-device", "virtio-net-device,netdev=n0,mac=" + guestMAC,
		"-device", "virtio-serial-device",
		"-chardev", "socket,id=agent,path=" + s.agentSck + ",server=on,wait=off",
		"-device", "virtserialport,chardev=agent,name=" + agentproto.PortName,
		"-chardev", "socket,id=qmp,path=" + s.qmpSock + ",server=on,wait=off",
		"-mon", "chardev=qmp,mode=control",
	}
	if b.cfg.Accel == AccelKVM {
		args = append(args, "-cpu", "host")
	}
	if incoming {
		args = append(args, "-incoming", "defer")
	}
	return args
}

// launch starts QEMU (s.mu held) and connects QMP and the agent channel.
func (s *Sandbox) launch(ctx context.Context) error {
	a := s.b.cfg.Assets
	var args []string
	if s.restore == nil {
		args = s.qemuArgs("mem-path="+s.b.MemoryFile(s.id)+",share=on", a.Vmlinuz, a.Initramfs, false)
	} else {
		// readMeta checked that the snapshot's kernel and initramfs have
		// the digests of these.
		args = s.qemuArgs(s.restore.memProps(s.b), a.Vmlinuz, a.Initramfs, true)
	}
	logf, err := os.OpenFile(filepath.Join(s.dir, "qemu.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		return fmt.Errorf("microvm: sandbox %q: %w", s.id, err)
	}
	defer logf.Close()
	cmd := s.qemuCommand(a.QEMU, args)
	cmd.Dir = s.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{s.tap}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return fmt.Errorf("microvm: sandbox %q: start QEMU: %w", s.id, err)
	}
	s.cmd = cmd
	s.waited = make(chan struct{})
	_ = os.WriteFile(filepath.Join(s.dir, "qemu.pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600)
	// QEMU holds the tap now; ours would keep the device alive after it.
	s.tap.Close()
	s.tap = nil
	go s.wait()
	dctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	c, err := qmp.Dial(s.whileRunning(dctx), s.qmpSock)
	if err != nil {
		return s.failure("connect to QMP", err)
	}
	s.qmp = c
	var d net.Dialer
	for {
		conn, err := d.DialContext(s.whileRunning(dctx), "unix", s.agentSck)
		if err == nil {
			s.agent = conn
			break
		}
		if dctx.Err() != nil || s.exited() {
			return s.failure("connect to the agent channel", err)
		}
		time.Sleep(5 * time.Millisecond)
	}
	go s.readAgent(s.agent)
	if s.nat != nil {
		if err := s.nat.wait(); err != nil {
			return fmt.Errorf("microvm: sandbox %q: %w", s.id, err)
		}
	}
	return nil
}

// whileRunning returns a context that ends with ctx or when QEMU exits.
func (s *Sandbox) whileRunning(ctx context.Context) context.Context {
	c, cancel := context.WithCancel(ctx)
	go func() {
		select {
		case <-s.waited:
		case <-c.Done():
		}
		cancel()
	}()
	return c
}

// endsWithin reports whether QEMU has exited or exits within d.
func (s *Sandbox) endsWithin(d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-s.waited:
		return true
	case <-t.C:
		return false
	}
}

func (s *Sandbox) exited() bool {
	select {
	case <-s.waited:
		return true
	default:
		return false
	}
}

// failure wraps err with what the instance printed: the function's exit if
// the agent reported one, else the console's tail.
func (s *Sandbox) failure(what string, err error) error {
	if s.exited() {
		s.errMu.Lock()
		ex := s.exitErr
		s.errMu.Unlock()
		if ex != nil {
			return fmt.Errorf("microvm: sandbox %q: %s: %w", s.id, what, ex)
		}
	}
	return fmt.Errorf("microvm: sandbox %q: %s: %w; console: %s; qemu: %s", s.id, what, err, s.tail(), tailOf(filepath.Join(s.dir, "qemu.log"), 512))
}

// wait reaps QEMU and closes done.
func (s *Sandbox) wait() {
	err := s.cmd.Wait()
	s.setExit(fmt.Errorf("microvm: sandbox %q: %w", s.id, s.endCause(s.cmd.Process.Pid, s.cmd.ProcessState, err)))
	close(s.waited)
	s.closeDone()
}

// guestDisk is the image disk's device in the guest.
const guestDisk = "/dev/vda"

// ErrGuestPanic is what Err wraps when the guest kernel panicked.
var ErrGuestPanic = errors.New("the guest kernel panicked")

// ErrQEMUDied is what Err wraps when QEMU ended on its own (a signal or an
// error exit) rather than because the guest powered off or Stop killed it.
var ErrQEMUDied = errors.New("QEMU died")

// endCause says why QEMU ended, from its exit status and what the guest
// and QEMU printed: the guest kernel panicked (QEMU exits with status 0:
// panic=-1 reboots and -no-reboot turns that into an exit), the guest
// powered off (the agent halts when it cannot boot), QEMU was killed by a
// signal or exited with an error.
func (s *Sandbox) endCause(pid int, ps *os.ProcessState, werr error) error {
	console := s.tail()
	qlog := tailOf(filepath.Join(s.dir, "qemu.log"), 512)
	if ps == nil {
		return fmt.Errorf("%w: wait for QEMU pid %d: %w; console: %s", ErrQEMUDied, pid, werr, console)
	}
	ws, _ := ps.Sys().(syscall.WaitStatus)
	switch {
	case ws.Signaled() && s.killed.Load():
		return fmt.Errorf("QEMU pid %d stopped by vhive; console: %s", pid, console)
	case ws.Signaled():
		return fmt.Errorf("%w: QEMU pid %d was killed by signal %d (%s); console: %s; qemu: %s", ErrQEMUDied, pid, int(ws.Signal()), ws.Signal(), console, qlog)
	case ps.ExitCode() != 0:
		return fmt.Errorf("%w: QEMU pid %d exited with status %d; qemu: %s; console: %s", ErrQEMUDied, pid, ps.ExitCode(), qlog, console)
	}
	if line := panicLine(console); line != "" {
		return fmt.Errorf("%w (%s); console: %s", ErrGuestPanic, line, console)
	}
	switch {
	case console == "":
		return fmt.Errorf("the guest reset or powered off before it printed anything: the kernel did not start (is %s a kernel?); qemu: %s", s.kernelPath(), qlog)
	case strings.Contains(console, "boot failed"):
		return fmt.Errorf("the guest agent could not boot and powered the VM off; console: %s", console)
	}
	return fmt.Errorf("the guest shut down or reset (QEMU exited with status 0); console: %s", console)
}

// kernelPath is the kernel QEMU was given.
func (s *Sandbox) kernelPath() string { return s.b.cfg.Assets.Vmlinuz }

// panicLine returns the guest kernel's "Kernel panic - not syncing: …"
// line from a console tail, or "".
func panicLine(console string) string {
	i := strings.LastIndex(console, "Kernel panic - not syncing")
	if i < 0 {
		return ""
	}
	line, _, _ := strings.Cut(console[i:], "\n")
	return strings.TrimSpace(strings.TrimRight(line, "\r -"))
}

// handshake sends m to the agent and waits for its answer (ready or
// resumed), the VM's end, the boot timeout or ctx.
//
// While it waits it asks QMP for the VM's status every nudgeEvery: a guest
// that panicked or shut down ends the wait at once, and each command makes
// QEMU's main loop run, which re-checks whether the agent port takes input
// (QEMU stops reading the socket while the guest has not opened the port).
// One boot at load ~40 hung with the agent's last console line "guest
// agent starting" until the boot timeout; whether input stuck in the socket
// was the cause is not confirmed (12 boots at load ~10 without the polling
// did not reproduce it), the agent now logs each boot step to tell.
func (s *Sandbox) handshake(ctx context.Context, m agentproto.Message) error {
	if err := agentproto.Write(s.agent, m); err != nil {
		s.endsWithin(5 * time.Second)
		return s.failure("send "+m.Type, err)
	}
	t := time.NewTimer(s.b.cfg.BootTimeout)
	defer t.Stop()
	nudge := time.NewTicker(nudgeEvery)
	defer nudge.Stop()
	for {
		select {
		case err := <-s.ready:
			if err != nil {
				return s.failure("agent", err)
			}
			return nil
		case <-s.waited:
			return s.failure("wait for the agent", errors.New("the VM ended"))
		case <-t.C:
			return s.failure("wait for the agent", fmt.Errorf("no answer after %s", s.b.cfg.BootTimeout))
		case <-ctx.Done():
			return s.failure("wait for the agent", ctx.Err())
		case <-nudge.C:
			if err := s.checkStatus(ctx); err != nil {
				return s.failure("wait for the agent", err)
			}
		}
	}
}

// nudgeEvery is how often handshake polls the VM's status.
const nudgeEvery = 250 * time.Millisecond

// checkStatus fails when the VM is no longer running (guest panic,
// shutdown, internal error).
func (s *Sandbox) checkStatus(ctx context.Context) error {
	qctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	raw, err := s.qmp.Execute(qctx, "query-status", nil)
	if err != nil {
		// A broken QMP connection most often means that QEMU is exiting
		// (a guest panic): let its exit status tell.
		if s.endsWithin(5 * time.Second) {
			return errors.New("the VM ended")
		}
		return err
	}
	var st struct {
		Status string `json:"status"`
	}
	if err := json.Unmarshal(raw, &st); err != nil {
		return fmt.Errorf("query-status: %w", err)
	}
	switch st.Status {
	case "running", "inmigrate", "postmigrate", "prelaunch", "finish-migrate", "paused", "suspended", "save-vm", "restore-vm", "colo":
		return nil
	}
	return fmt.Errorf("VM status %q", st.Status)
}

// readAgent handles the agent's messages until the channel closes.
func (s *Sandbox) readAgent(conn net.Conn) {
	r := agentproto.NewReader(conn)
	for {
		m, err := r.Read()
		if err != nil {
			if !errors.Is(err, io.EOF) && !errors.Is(err, net.ErrClosed) {
				s.b.log.Debug("agent channel", "id", s.id, "err", err)
			}
			return
		}
		switch m.Type {
		case agentproto.TypeReady, agentproto.TypeResumed:
			var err error
			if m.Error != "" {
				err = errors.New(m.Error)
			}
			select {
			case s.ready <- err:
			default:
			}
		case agentproto.TypeError:
			err := fmt.Errorf("guest agent: %s", m.Error)
			if strings.Contains(m.Error, guestDisk) {
				err = fmt.Errorf("%w (%s is the host's %s)", err, guestDisk, s.disk)
			}
			s.setExit(fmt.Errorf("microvm: sandbox %q: %w", s.id, err))
			select {
			case s.ready <- err:
			default:
			}
			_ = s.kill()
		case agentproto.TypeExit:
			e := m.Exit
			if e == nil {
				e = &agentproto.Exit{Status: -1}
			}
			how := "exit status " + strconv.Itoa(e.Status)
			if e.Signal != "" {
				how = "killed by " + e.Signal
			}
			if e.OOMKilled {
				s.setExit(fmt.Errorf("microvm: sandbox %q: %w: the guest kernel's OOM killer killed the function in a guest of %d MiB RAM; stderr: %s",
					s.id, sandbox.ErrOutOfMemory, s.memMiB, strings.TrimSpace(e.Stderr)))
			} else {
				s.setExit(fmt.Errorf("microvm: sandbox %q: function ended: %s; stderr: %s", s.id, how, strings.TrimSpace(e.Stderr)))
			}
			_ = s.kill()
		}
	}
}

// kill ends QEMU (if running) and waits for it.
func (s *Sandbox) kill() error {
	s.mu.Lock()
	cmd, waited := s.cmd, s.waited
	s.mu.Unlock()
	if cmd == nil {
		return nil
	}
	s.killed.Store(true)
	_ = cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-waited:
		return nil
	case <-time.After(30 * time.Second):
		return fmt.Errorf("microvm: sandbox %q: QEMU pid %d does not exit", s.id, cmd.Process.Pid)
	}
}

func (s *Sandbox) closeDone() {
	s.errMu.Lock()
	defer s.errMu.Unlock()
	select {
	case <-s.done:
	default:
		close(s.done)
	}
}

// Stop ends the instance and releases its network, directory and sockets.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.mu.Lock()
	if s.stopped {
		s.mu.Unlock()
		<-s.done
		return nil
	}
	s.stopped = true
	cmd := s.cmd
	s.mu.Unlock()
	if rp := s.restore; rp != nil && rp.reap.dev != nil {
		// A record instance stopped before FinishRecord: keep what it
		// touched (FinishRecord may still come and write it).
		if _, err := s.captureRecord(rp, cmd); err != nil {
			s.b.log.Warn("REAP record: working set not captured before stop", "id", s.id, "err", err)
		}
	}
	s.setExit(fmt.Errorf("microvm: sandbox %q: %w", s.id, ErrStopped))
	var errs []error
	if err := s.kill(); err != nil {
		errs = append(errs, err)
	}
	if s.restore != nil {
		s.restore.reap.release()
	}
	s.mu.Lock()
	if s.qmp != nil {
		s.qmp.Close()
	}
	if s.agent != nil {
		s.agent.Close()
	}
	if s.tap != nil {
		s.tap.Close()
		s.tap = nil
	}
	n := s.net
	s.net = nil
	s.mu.Unlock()
	if n != nil {
		fwd := ""
		if s.nat != nil {
			_ = s.nat.wait() // unplugTap removes whatever it did
			fwd = s.nat.fwdBefore
		}
		if err := unplugTap(ctx, n, fwd); err != nil {
			errs = append(errs, fmt.Errorf("microvm: sandbox %q: %w", s.id, err))
		}
		if err := s.b.cfg.NetPool.Put(ctx, n); err != nil {
			errs = append(errs, fmt.Errorf("microvm: sandbox %q: %w", s.id, err))
		}
	}
	for _, p := range []string{s.qmpSock, s.agentSck, s.b.MemoryFile(s.id)} {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	if err := os.RemoveAll(s.dir); err != nil {
		errs = append(errs, fmt.Errorf("microvm: sandbox %q: %w", s.id, err))
	}
	s.closeDone()
	s.b.unregister(s)
	return errors.Join(errs...)
}

// Stats reads QEMU's memory from /proc/<pid>/smaps_rollup: the guest RAM
// mapping and QEMU's own (TCG code cache included).
func (s *Sandbox) Stats(ctx context.Context) (sandbox.Stats, error) {
	s.mu.Lock()
	cmd := s.cmd
	s.mu.Unlock()
	if cmd == nil || s.exited() {
		return sandbox.Stats{}, fmt.Errorf("microvm: stats of sandbox %q: not running", s.id)
	}
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", cmd.Process.Pid))
	if err != nil {
		return sandbox.Stats{}, fmt.Errorf("microvm: stats of sandbox %q: %w", s.id, err)
	}
	var st sandbox.Stats
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		v, err := strconv.ParseInt(f[1], 10, 64)
		if err != nil {
			continue
		}
		switch f[0] {
		case "Rss:":
			st.RSS = v << 10
		case "Pss:":
			st.PSS = v << 10
		}
	}
	return st, nil
}

// entropy returns fresh random bytes for the guest's RNG.
func entropy() ([]byte, error) {
	b := make([]byte, 64)
	if _, err := rand.Read(b); err != nil {
		return nil, err
	}
	return b, nil
}
