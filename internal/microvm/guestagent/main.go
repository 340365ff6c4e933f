//go:build linux

// Command guestagent is vhive's guest agent: PID 1 (/init) in the initramfs
// of a microVM. It loads the kernel modules listed in /lib/modules/order,
// mounts the image rootfs (/dev/vda, read-only ext4) under a tmpfs overlay
// that is discarded with the instance, configures eth0, and then follows the
// protocol of internal/microvm/agentproto on the virtio-serial port
// "vhive.agent": it starts the function chrooted into the overlay, reports
// ready (the function listens on GUEST_PORT), its exit, and handles resume
// after a snapshot restore (clock, RNG reseed; the guest keeps its address,
// which is the same in every guest).
//
// Everything it prints goes to the console (ttyS0), which the host keeps as
// a log; the function's stdout and stderr go there too.
package main

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
	"unsafe"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/microvm/agentproto"
)

const (
	modulesOrder = "/lib/modules/order"
	rootDev      = "/dev/vda"
	lowerDir     = "/run/lower"
	rwDir        = "/run/rw"
	newRoot      = "/run/root"
	stderrTail   = 2048
	defaultPath  = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

func main() {
	logf("vhive guest agent starting")
	port, err := boot()
	if err != nil {
		logf("boot failed: %v", err)
		halt()
	}
	a := &agent{port: port}
	if err := a.run(); err != nil {
		logf("agent: %v", err)
	}
	halt()
}

func logf(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "vhive-agent: "+format+"\n", args...)
}

// halt powers the VM off (QEMU runs with -no-reboot, so it exits).
func halt() {
	unix.Sync()
	_ = unix.Reboot(unix.LINUX_REBOOT_CMD_POWER_OFF)
	select {}
}

// boot mounts the pseudo file systems, loads the modules and opens the
// agent port.
func boot() (*os.File, error) {
	for _, m := range []struct{ src, dst, fs string }{
		{"proc", "/proc", "proc"},
		{"sysfs", "/sys", "sysfs"},
		{"devtmpfs", "/dev", "devtmpfs"},
		{"tmpfs", "/run", "tmpfs"},
	} {
		if err := os.MkdirAll(m.dst, 0o755); err != nil {
			return nil, err
		}
		if err := unix.Mount(m.src, m.dst, m.fs, 0, ""); err != nil && !errors.Is(err, unix.EBUSY) {
			return nil, fmt.Errorf("mount %s on %s: %w", m.fs, m.dst, err)
		}
	}
	if err := loadModules(); err != nil {
		return nil, err
	}
	logf("modules loaded")
	// Allocations always succeed and the OOM killer acts when the RAM runs
	// out, as under a container's memory cgroup: with the default
	// heuristic, one allocation larger than the guest's RAM fails instead
	// (a Go function then dies of "out of memory" with status 2, which
	// nobody can tell from a crash).
	if err := os.WriteFile("/proc/sys/vm/overcommit_memory", []byte("1"), 0); err != nil {
		return nil, fmt.Errorf("set vm.overcommit_memory: %w", err)
	}
	path, err := waitPort(10 * time.Second)
	if err != nil {
		return nil, err
	}
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	logf("agent port %s open", path)
	return f, nil
}

func loadModules() error {
	data, err := os.ReadFile(modulesOrder)
	if err != nil {
		return fmt.Errorf("read %s: %w", modulesOrder, err)
	}
	for _, name := range strings.Fields(string(data)) {
		f, err := os.Open(filepath.Join("/lib/modules", name))
		if err != nil {
			return fmt.Errorf("module %s: %w", name, err)
		}
		err = unix.FinitModule(int(f.Fd()), "", 0)
		f.Close()
		if err != nil && !errors.Is(err, unix.EEXIST) {
			return fmt.Errorf("load module %s: %w", name, err)
		}
	}
	return nil
}

// waitPort finds the /dev node of the agent's virtio-serial port (there is
// no udev to make /dev/virtio-ports/<name>).
func waitPort(timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for {
		ents, _ := os.ReadDir("/sys/class/virtio-ports")
		for _, e := range ents {
			name, err := os.ReadFile(filepath.Join("/sys/class/virtio-ports", e.Name(), "name"))
			if err == nil && strings.TrimSpace(string(name)) == agentproto.PortName {
				dev := "/dev/" + e.Name()
				if _, err := os.Stat(dev); err == nil {
					return dev, nil
				}
			}
		}
		if time.Now().After(deadline) {
			return "", fmt.Errorf("no virtio-serial port named %q after %s", agentproto.PortName, timeout)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

type agent struct {
	port *os.File
	wmu  sync.Mutex
}

func (a *agent) send(m agentproto.Message) {
	a.wmu.Lock()
	defer a.wmu.Unlock()
	if err := agentproto.Write(a.port, m); err != nil {
		logf("%v", err)
	}
}

func (a *agent) run() error {
	r := agentproto.NewReader(a.port)
	for {
		m, err := r.Read()
		if err != nil {
			return err
		}
		switch m.Type {
		case agentproto.TypeStart:
			logf("start received")
			if m.Start == nil {
				a.send(agentproto.Message{Type: agentproto.TypeError, Error: "start without a configuration"})
				continue
			}
			if err := a.start(m.Start); err != nil {
				logf("start: %v", err)
				a.send(agentproto.Message{Type: agentproto.TypeError, Error: err.Error()})
			}
		case agentproto.TypeResume:
			if m.Resume == nil {
				a.send(agentproto.Message{Type: agentproto.TypeError, Error: "resume without parameters"})
				continue
			}
			if err := resume(m.Resume); err != nil {
				logf("resume: %v", err)
				a.send(agentproto.Message{Type: agentproto.TypeResumed, Error: err.Error()})
				continue
			}
			a.send(agentproto.Message{Type: agentproto.TypeResumed})
		default:
			logf("unknown message type %q ignored", m.Type)
		}
	}
}

func resume(r *agentproto.Resume) error {
	if err := setClock(r.TimeUnixNano); err != nil {
		return err
	}
	return reseed(r.Entropy)
}

func setClock(ns int64) error {
	if ns <= 0 {
		return fmt.Errorf("time %d is not a valid clock", ns)
	}
	tv := unix.NsecToTimeval(ns)
	if err := unix.Settimeofday(&tv); err != nil {
		return fmt.Errorf("set clock: %w", err)
	}
	return nil
}

// reseed credits the host's entropy to the kernel's pool (RNDADDENTROPY) and
// forces the CRNG to rekey (RNDRESEEDCRNG), so that clones of one snapshot
// draw different random numbers.
func reseed(entropy []byte) error {
	if len(entropy) < 32 {
		return fmt.Errorf("entropy of %d bytes, want at least 32", len(entropy))
	}
	f, err := os.OpenFile("/dev/urandom", os.O_WRONLY, 0)
	if err != nil {
		return fmt.Errorf("open /dev/urandom: %w", err)
	}
	defer f.Close()
	// struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
	buf := make([]byte, 8+len(entropy))
	*(*int32)(unsafe.Pointer(&buf[0])) = int32(len(entropy) * 8)
	*(*int32)(unsafe.Pointer(&buf[4])) = int32(len(entropy))
	copy(buf[8:], entropy)
	const (
		rndAddEntropy = 0x40085203 // _IOW('R', 0x03, int[2])
		rndReseedCRNG = 0x5207     // _IO('R', 0x07)
	)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndAddEntropy, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		return fmt.Errorf("RNDADDENTROPY: %w", e)
	}
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), rndReseedCRNG, 0); e != 0 {
		return fmt.Errorf("RNDRESEEDCRNG: %w", e)
	}
	return nil
}

func setupNet(n agentproto.Net) error {
	ip := net.ParseIP(n.IP).To4()
	gw := net.ParseIP(n.Gateway).To4()
	if ip == nil || gw == nil || n.Bits <= 0 || n.Bits > 32 {
		return fmt.Errorf("bad network configuration %+v", n)
	}
	lo, err := netlink.LinkByName("lo")
	if err != nil {
		return fmt.Errorf("find lo: %w", err)
	}
	if err := netlink.LinkSetUp(lo); err != nil {
		return fmt.Errorf("set lo up: %w", err)
	}
	eth, err := netlink.LinkByName("eth0")
	if err != nil {
		return fmt.Errorf("find eth0: %w", err)
	}
	addrs, err := netlink.AddrList(eth, netlink.FAMILY_V4)
	if err != nil {
		return fmt.Errorf("list eth0 addresses: %w", err)
	}
	want := &net.IPNet{IP: ip, Mask: net.CIDRMask(n.Bits, 32)}
	for _, a := range addrs {
		if !a.IPNet.IP.Equal(ip) {
			if err := netlink.AddrDel(eth, &a); err != nil {
				return fmt.Errorf("remove %s from eth0: %w", a.IPNet, err)
			}
		}
	}
	if err := netlink.AddrReplace(eth, &netlink.Addr{IPNet: want}); err != nil {
		return fmt.Errorf("address %s on eth0: %w", want, err)
	}
	if err := netlink.LinkSetUp(eth); err != nil {
		return fmt.Errorf("set eth0 up: %w", err)
	}
	route := &netlink.Route{LinkIndex: eth.Attrs().Index, Dst: &net.IPNet{IP: net.IPv4zero.To4(), Mask: net.CIDRMask(0, 32)}, Gw: gw}
	if err := netlink.RouteReplace(route); err != nil {
		return fmt.Errorf("default route via %s: %w", gw, err)
	}
	return nil
}

// mountRoot builds /run/root: the image (read-only) under a tmpfs upper.
func mountRoot() error {
	for _, d := range []string{lowerDir, rwDir, newRoot} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return err
		}
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(rootDev); err == nil {
			break
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no %s (virtio-blk) after 10s", rootDev)
		}
		time.Sleep(10 * time.Millisecond)
	}
	if err := unix.Mount(rootDev, lowerDir, "ext4", unix.MS_RDONLY, ""); err != nil {
		return fmt.Errorf("mount the image disk %s (ext4, read-only): %w", rootDev, err)
	}
	if err := unix.Mount("tmpfs", rwDir, "tmpfs", 0, "mode=0755"); err != nil {
		return fmt.Errorf("mount tmpfs for the overlay: %w", err)
	}
	upper, work := filepath.Join(rwDir, "upper"), filepath.Join(rwDir, "work")
	for _, d := range []string{upper, work} {
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
	}
	opts := "lowerdir=" + lowerDir + ",upperdir=" + upper + ",workdir=" + work
	if err := unix.Mount("overlay", newRoot, "overlay", 0, opts); err != nil {
		return fmt.Errorf("mount overlay root: %w", err)
	}
	for _, m := range []struct{ src, dst, fs, opts string }{
		{"proc", "proc", "proc", ""},
		{"sysfs", "sys", "sysfs", ""},
		{"devtmpfs", "dev", "devtmpfs", ""},
		{"tmpfs", "tmp", "tmpfs", "mode=1777"},
		{"tmpfs", "dev/shm", "tmpfs", "mode=1777"},
	} {
		dst := filepath.Join(newRoot, m.dst)
		if err := os.MkdirAll(dst, 0o755); err != nil {
			return err
		}
		if err := unix.Mount(m.src, dst, m.fs, 0, m.opts); err != nil {
			return fmt.Errorf("mount %s on %s: %w", m.fs, dst, err)
		}
	}
	return nil
}

// lookPath resolves args[0] inside the new root with the function's PATH.
func lookPath(arg0 string, env []string) (string, error) {
	if strings.Contains(arg0, "/") {
		return arg0, nil
	}
	path := defaultPath
	for _, kv := range env {
		if v, ok := strings.CutPrefix(kv, "PATH="); ok {
			path = v
		}
	}
	for _, dir := range filepath.SplitList(path) {
		p := filepath.Join(dir, arg0)
		if fi, err := os.Stat(filepath.Join(newRoot, p)); err == nil && fi.Mode().IsRegular() && fi.Mode()&0o111 != 0 {
			return p, nil
		}
	}
	return "", fmt.Errorf("%q not found in PATH %q of the image", arg0, path)
}

func (a *agent) start(s *agentproto.Start) error {
	if len(s.Args) == 0 {
		return errors.New("no args")
	}
	if err := setClock(s.TimeUnixNano); err != nil {
		return err
	}
	if err := reseed(s.Entropy); err != nil {
		return err
	}
	if err := mountRoot(); err != nil {
		return err
	}
	if err := setupNet(s.Net); err != nil {
		return err
	}
	prog, err := lookPath(s.Args[0], s.Env)
	if err != nil {
		return err
	}
	cwd := s.Cwd
	if cwd == "" {
		cwd = "/"
	}
	pr, pw, err := os.Pipe()
	if err != nil {
		return err
	}
	console := os.Stderr
	null, err := os.Open("/dev/null")
	if err != nil {
		pr.Close()
		pw.Close()
		return err
	}
	defer null.Close()
	oom0, err := oomKills()
	if err != nil {
		return err
	}
	groups := make([]uint32, len(s.Groups))
	copy(groups, s.Groups)
	proc, err := os.StartProcess(prog, s.Args, &os.ProcAttr{
		Dir:   cwd,
		Env:   s.Env,
		Files: []*os.File{null, console, pw},
		Sys: &syscall.SysProcAttr{
			Chroot:     newRoot,
			Setsid:     true,
			Credential: &syscall.Credential{Uid: s.UID, Gid: s.GID, Groups: groups},
		},
	})
	pw.Close()
	if err != nil {
		pr.Close()
		return fmt.Errorf("start %q: %w", prog, err)
	}
	logf("function started: pid %d, %q", proc.Pid, s.Args)
	tail := &tailBuffer{max: stderrTail}
	copied := make(chan struct{})
	go func() {
		defer close(copied)
		_, _ = io.Copy(io.MultiWriter(console, tail), pr)
		pr.Close()
	}()
	exited := make(chan agentproto.Exit, 1)
	go func() {
		e := reap(proc.Pid)
		if e.Signal == unix.SIGKILL.String() {
			// Only the kernel sends SIGKILL inside the guest (the agent
			// never does): an OOM kill if the counter rose.
			if n, err := oomKills(); err == nil && n > oom0 {
				e.OOMKilled = true
			}
		}
		exited <- e
	}()
	go a.watch(s.Port, exited, copied, tail)
	return nil
}

// oomKills reads the kernel's count of OOM kills ("oom_kill" in
// /proc/vmstat).
func oomKills() (int64, error) {
	data, err := os.ReadFile("/proc/vmstat")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(data), "\n") {
		if v, ok := strings.CutPrefix(line, "oom_kill "); ok {
			return strconv.ParseInt(strings.TrimSpace(v), 10, 64)
		}
	}
	return 0, errors.New("no oom_kill in /proc/vmstat")
}

// reap waits for pid as PID 1 must: every orphan is re-parented to the
// agent and reaped here too.
func reap(pid int) agentproto.Exit {
	for {
		var ws unix.WaitStatus
		got, err := unix.Wait4(-1, &ws, 0, nil)
		if err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return agentproto.Exit{Status: -1, Signal: "wait: " + err.Error()}
		}
		if got != pid {
			continue
		}
		if ws.Signaled() {
			return agentproto.Exit{Status: -1, Signal: ws.Signal().String()}
		}
		return agentproto.Exit{Status: ws.ExitStatus()}
	}
}

// watch reports ready once the function listens on port, then its exit.
func (a *agent) watch(port int, exited <-chan agentproto.Exit, copied <-chan struct{}, tail *tailBuffer) {
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	listening := make(chan struct{})
	go func() {
		addr := net.JoinHostPort("127.0.0.1", strconv.Itoa(port))
		d := net.Dialer{Timeout: time.Second}
		for ctx.Err() == nil {
			c, err := d.DialContext(ctx, "tcp", addr)
			if err == nil {
				c.Close()
				close(listening)
				return
			}
			time.Sleep(5 * time.Millisecond)
		}
	}()
	select {
	case <-listening:
		logf("function listens on port %d", port)
		a.send(agentproto.Message{Type: agentproto.TypeReady})
	case e := <-exited:
		a.reportExit(e, copied, tail)
		return
	}
	a.reportExit(<-exited, copied, tail)
}

func (a *agent) reportExit(e agentproto.Exit, copied <-chan struct{}, tail *tailBuffer) {
	select {
	case <-copied: // stderr closed: the tail is complete
	case <-time.After(time.Second): // a grandchild keeps it open
	}
	e.Stderr = tail.String()
	logf("function exited: status %d %s (OOM kill: %v)", e.Status, e.Signal, e.OOMKilled)
	a.send(agentproto.Message{Type: agentproto.TypeExit, Exit: &e})
}

// tailBuffer keeps the last max bytes written to it.
type tailBuffer struct {
	mu  sync.Mutex
	max int
	buf []byte
}

func (t *tailBuffer) Write(p []byte) (int, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	t.buf = append(t.buf, p...)
	if len(t.buf) > t.max {
		t.buf = append([]byte(nil), t.buf[len(t.buf)-t.max:]...)
	}
	return len(p), nil
}

func (t *tailBuffer) String() string {
	t.mu.Lock()
	defer t.mu.Unlock()
	return string(bytes.ToValidUTF8(t.buf, []byte("?")))
}
