// Package microvm is the sandbox backend that runs each function instance
// in its own Linux microVM: QEMU `-M microvm` (TCG by default; KVM as an
// option), a guest kernel per instance (Debian's cloud kernel), an
// initramfs whose /init is vhive's guest agent (internal/microvm/guestagent),
// and the image's rootfs as a read-only virtio-blk ext4 disk (one per image
// digest, internal/microvm/rootfs) under a tmpfs overlay inside the guest.
//
// On-disk layout under Config.Root:
//
//	instances/<id>/     one directory per instance
//	    console.log     the serial console (kernel, agent, the function's
//	                    stdout and stderr); its tail is in error messages
//	    qemu.log        QEMU's own stdout and stderr
//	    qemu.pid        for Cleanup after a daemon crash
//	sock/<hash of id>.qmp, .agent   QMP and agent sockets (short paths)
//
// A booted instance's guest RAM is a file (memory-backend-file, share=on,
// so that a snapshot can skip it in the migration stream and copy it) in
// Config.MemoryDir: <MemoryDir>/vhive-microvm-<hash of Root>-<hash of id>.mem,
// by default on /dev/shm so that guest writes never go to a disk. A
// restored instance maps the snapshot's RAM file privately instead.
//
// Network (net.go): every guest has the same address and MAC (172.16.0.2/30
// behind a tap at 172.16.0.1, Firecracker's network for clones), so clones
// of one snapshot need no change in the guest. Every instance takes a Net
// from the netpool; in its netns the veth eth0 keeps the Net's GuestIP, a
// tap device (whose fd QEMU gets, virtio-net) holds the guests' gateway, and
// an nftables table DNATs GuestIP to the guest and drops what the guest
// opens itself. The function is reached at GuestIP:Port as in gVisor and
// reaches nothing more than there. Stop removes the tap and the table and
// returns the Net as the pool made it.
//
// Agent channel: a virtio-serial port (no vhost-vsock on this host) speaking
// internal/microvm/agentproto. Start sends the function's configuration and
// waits until the agent reports that the function listens.
//
// Resources: Spec.MemoryLimit is the guest's RAM size (Config.MemoryMiB
// when 0, rounded up to whole MiB); Spec.CPULimit is the number of vCPUs,
// rounded up (1.5 cores → -smp 2; Config.CPUs when 0): a fractional limit is
// not a share of a host core, there is no cgroup around QEMU yet. A function
// that the guest kernel's OOM killer ends is reported as
// sandbox.ErrOutOfMemory (the agent sees it killed by SIGKILL while the
// guest's oom_kill counter rose). Stats are QEMU's RSS and PSS (guest RAM,
// TCG code cache and QEMU itself).
//
// Snapshots (see snapshot.go): QMP migrate with x-ignore-shared to a state
// file, the RAM file copied beside it (the source keeps running on its own
// file); restore starts a new QEMU with -incoming defer on a private mapping
// of the snapshot's RAM file, then hands the agent the clock and fresh
// entropy.
package microvm

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"math"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/microvm/rootfs"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// Name is the backend's name.
const Name = "microvm"

// Accelerators accepted in Config.Accel.
const (
	AccelTCG = "tcg"
	AccelKVM = "kvm"
)

// Config configures a Backend.
type Config struct {
	// Root is the state directory (made absolute). Socket paths live under
	// it, so it must be at most maxRootLen bytes long.
	Root string
	// Assets are the QEMU binary, kernel and initramfs (assets.Load or
	// assets.Ensure). Required.
	Assets *assets.Manifest
	// RootfsDir caches the ext4 images by digest. Default:
	// <VHIVE_CACHE>/microvm/rootfs.
	RootfsDir string
	// NetPool provides the instances' network namespaces. Required.
	NetPool *netpool.Pool
	Logger  *slog.Logger
	// MemoryMiB is the guest RAM when the Spec sets no MemoryLimit.
	// Default 256.
	MemoryMiB int
	// CPUs is the number of vCPUs when the Spec sets no CPULimit (default
	// 1).
	CPUs int
	// Accel is AccelTCG (default) or AccelKVM.
	Accel string
	// TCGBufferMiB is the size of TCG's translation buffer (QEMU's
	// -accel tcg,tb-size=N, in MiB); 0 leaves QEMU's default. Ignored
	// under KVM.
	TCGBufferMiB int
	// TSCkHz is passed to the guest as tsc_early_khz (under TCG the guest
	// TSC ticks at the host's rate; without it a loaded host makes the
	// guest's TSC calibration hang). Default: the host's "cpu MHz".
	TSCkHz int
	// MemoryDir holds booted instances' RAM files. Default /dev/shm (when
	// it is a directory), else <Root>/mem.
	MemoryDir string
	// BootTimeout bounds Start (boot to the function listening) and a
	// restore's resume handshake. Default 2 minutes.
	BootTimeout time.Duration

	// kernelArgs are appended to the guest kernel's command line (tests
	// use it to make the guest panic).
	kernelArgs string
}

// maxCPUs bounds Config.CPUs and Spec.CPULimit.
const maxCPUs = 64

// vcpus is the number of vCPUs of an instance of spec: CPULimit rounded up
// (a fractional limit gets a whole vCPU), Config.CPUs when it is 0.
func (b *Backend) vcpus(spec sandbox.Spec) int {
	if spec.CPULimit > 0 {
		return max(1, int(math.Ceil(spec.CPULimit)))
	}
	return b.cfg.CPUs
}

// memMiB is the guest RAM of an instance of spec in MiB.
func (b *Backend) memMiB(spec sandbox.Spec) int {
	if spec.MemoryLimit > 0 {
		return int((spec.MemoryLimit + 1<<20 - 1) >> 20)
	}
	return b.cfg.MemoryMiB
}

// maxRootLen keeps <Root>/sock/<16 hex>.agent below the 107-byte limit of
// a unix socket path.
const maxRootLen = 80

// Backend implements sandbox.Backend and sandbox.Restorer.
type Backend struct {
	cfg       Config
	log       *slog.Logger
	instances string
	socks     string
	rootfs    *rootfs.Cache
	qemuMajor int
	qemuMinor int
	// kernelSHA256 and initramfsSHA256 are the digests of the files in
	// use, read once by New (a snapshot records them).
	kernelSHA256    string
	initramfsSHA256 string
	// reapPad is the window REAP prefetches widen runs to (prefetchPad;
	// benchmarks compare others).
	reapPad uint64

	mu  sync.Mutex
	all map[string]*Sandbox
}

var (
	_ sandbox.Backend     = (*Backend)(nil)
	_ sandbox.Restorer    = (*Backend)(nil)
	_ sandbox.Sandbox     = (*Sandbox)(nil)
	_ sandbox.Snapshotter = (*Sandbox)(nil)

	_ sandbox.RestoreReporter = (*Sandbox)(nil)
)

var qemuVerRE = regexp.MustCompile(`version (\d+)\.(\d+)`)

// New validates cfg and creates the state directories.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	if cfg.Assets == nil {
		return nil, errors.New("microvm: Assets is nil (assets.Load or assets.Ensure)")
	}
	if cfg.NetPool == nil {
		return nil, errors.New("microvm: NetPool is nil")
	}
	if cfg.Root == "" {
		return nil, errors.New("microvm: Root (state directory) is empty")
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("microvm: Root %q: %w", cfg.Root, err)
	}
	if len(root) > maxRootLen {
		return nil, fmt.Errorf("microvm: Root %q is longer than %d bytes (unix socket paths live under it)", root, maxRootLen)
	}
	cfg.Root = root
	switch cfg.Accel {
	case "":
		cfg.Accel = AccelTCG
	case AccelTCG, AccelKVM:
	default:
		return nil, fmt.Errorf("microvm: Accel %q is not %q or %q", cfg.Accel, AccelTCG, AccelKVM)
	}
	if cfg.TCGBufferMiB < 0 {
		return nil, fmt.Errorf("microvm: TCGBufferMiB %d is negative", cfg.TCGBufferMiB)
	}
	if cfg.MemoryMiB == 0 {
		cfg.MemoryMiB = 256
	}
	if cfg.MemoryMiB < 64 {
		return nil, fmt.Errorf("microvm: MemoryMiB %d is below 64", cfg.MemoryMiB)
	}
	if cfg.CPUs == 0 {
		cfg.CPUs = 1
	}
	if cfg.CPUs < 0 || cfg.CPUs > maxCPUs {
		return nil, fmt.Errorf("microvm: CPUs %d is not in 1-%d", cfg.CPUs, maxCPUs)
	}
	if cfg.TSCkHz == 0 {
		cfg.TSCkHz = hostTSCkHz()
	}
	if cfg.BootTimeout == 0 {
		cfg.BootTimeout = 2 * time.Minute
	}
	if cfg.RootfsDir == "" {
		cfg.RootfsDir = filepath.Join(assets.Dir(assets.CacheDir()), "rootfs")
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.MemoryDir == "" {
		cfg.MemoryDir = filepath.Join(root, "mem")
		if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
			cfg.MemoryDir = "/dev/shm"
		}
	}
	if strings.ContainsAny(cfg.MemoryDir, ",") {
		return nil, fmt.Errorf("microvm: MemoryDir %q contains ',' (QEMU option syntax)", cfg.MemoryDir)
	}
	if _, err := os.Stat(cfg.Assets.QEMU); err != nil {
		return nil, fmt.Errorf("microvm: QEMU: %w", err)
	}
	kernelSum, err := checkAsset("kernel", cfg.Assets.Vmlinuz, cfg.Assets.VmlinuzSHA256)
	if err != nil {
		return nil, err
	}
	initrdSum, err := checkAsset("initramfs", cfg.Assets.Initramfs, cfg.Assets.InitramfsSHA256)
	if err != nil {
		return nil, err
	}
	mm := qemuVerRE.FindStringSubmatch(cfg.Assets.QEMUVersion)
	if mm == nil {
		return nil, fmt.Errorf("microvm: cannot read QEMU's version from %q", cfg.Assets.QEMUVersion)
	}
	rc, err := rootfs.New(cfg.RootfsDir)
	if err != nil {
		return nil, err
	}
	b := &Backend{
		cfg:       cfg,
		log:       cfg.Logger.With("component", "sandbox", "backend", Name),
		instances: filepath.Join(root, "instances"),
		socks:     filepath.Join(root, "sock"),
		rootfs:    rc,
		all:       map[string]*Sandbox{},

		kernelSHA256:    kernelSum,
		initramfsSHA256: initrdSum,
		reapPad:         prefetchPad,
	}
	b.qemuMajor, _ = strconv.Atoi(mm[1])
	b.qemuMinor, _ = strconv.Atoi(mm[2])
	for _, d := range []string{b.instances, b.socks, cfg.MemoryDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("microvm: create %q: %w", d, err)
		}
	}
	return b, nil
}

// checkAsset hashes the kernel or initramfs at path and compares the digest
// with the one the manifest recorded (when it has one): a missing, truncated
// or altered file is refused here rather than by a guest that does not boot.
func checkAsset(what, path, want string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("microvm: %s: %w (rebuild the assets: make microvm)", what, err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", fmt.Errorf("microvm: %s %s: %w", what, path, err)
	}
	sum := hex.EncodeToString(h.Sum(nil))
	if want != "" && sum != want {
		return "", fmt.Errorf("microvm: %s %s is corrupt: %d bytes with sha256 %s, the assets manifest says %s (rebuild the assets: make microvm)", what, path, n, sum, want)
	}
	return sum, nil
}

// hostTSCkHz reads the host's clock rate from /proc/cpuinfo (0 if unknown:
// the guest then calibrates).
func hostTSCkHz() int {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if ok && strings.TrimSpace(k) == "cpu MHz" {
			mhz, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil && mhz > 0 {
				return int(mhz * 1000)
			}
		}
	}
	return 0
}

// Name returns "microvm".
func (b *Backend) Name() string { return Name }

// Capabilities: snapshots, restored eagerly (the memory file read before the
// guest resumes) or lazily (pages faulted in from the privately mapped file
// by the host kernel), and REAP (record and prefetch of the working set
// through the page cache, reap.go).
func (b *Backend) Capabilities() sandbox.Capabilities {
	return sandbox.Capabilities{Snapshot: true, LazyMemory: true, REAP: true}
}

// RuntimeVersion names everything a snapshot depends on: QEMU's version,
// the kernel, the initramfs and the guests' address. A snapshot taken with
// another is not used.
func (b *Backend) RuntimeVersion() string {
	a := b.cfg.Assets
	return fmt.Sprintf("%s; kernel %s %s; initramfs %.16s; %s; %s", a.QEMUVersion, a.KernelPackage, a.KernelVersion, a.InitramfsSHA256, b.cfg.Accel, guestNetDesc())
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func validateSpec(spec sandbox.Spec) error {
	if !validID.MatchString(spec.ID) {
		return fmt.Errorf("microvm: sandbox ID %q must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.', '_' or '-'", spec.ID)
	}
	if !filepath.IsAbs(spec.Rootfs) {
		return fmt.Errorf("microvm: sandbox %q: Rootfs %q is not an absolute path", spec.ID, spec.Rootfs)
	}
	if fi, err := os.Stat(spec.Rootfs); err != nil {
		return fmt.Errorf("microvm: sandbox %q: Rootfs: %w", spec.ID, err)
	} else if !fi.IsDir() {
		return fmt.Errorf("microvm: sandbox %q: Rootfs %q is not a directory", spec.ID, spec.Rootfs)
	}
	if spec.ImageDigest == "" {
		return fmt.Errorf("microvm: sandbox %q: ImageDigest is empty (the rootfs disk is cached by digest)", spec.ID)
	}
	if len(spec.Process.Args) == 0 || spec.Process.Args[0] == "" {
		return fmt.Errorf("microvm: sandbox %q: Process.Args is empty", spec.ID)
	}
	if spec.Port <= 0 || spec.Port > 65535 {
		return fmt.Errorf("microvm: sandbox %q: Port %d is not in 1-65535", spec.ID, spec.Port)
	}
	if spec.MemoryLimit < 0 {
		return fmt.Errorf("microvm: sandbox %q: MemoryLimit %d is negative", spec.ID, spec.MemoryLimit)
	}
	if spec.MemoryLimit > 0 && spec.MemoryLimit < 64<<20 {
		return fmt.Errorf("microvm: sandbox %q: MemoryLimit %d is below the 64 MiB a guest needs", spec.ID, spec.MemoryLimit)
	}
	if spec.CPULimit < 0 {
		return fmt.Errorf("microvm: sandbox %q: CPULimit %g is negative", spec.ID, spec.CPULimit)
	}
	if spec.CPULimit > maxCPUs {
		return fmt.Errorf("microvm: sandbox %q: CPULimit %g is above %d vCPUs", spec.ID, spec.CPULimit, maxCPUs)
	}
	return nil
}

func (b *Backend) register(s *Sandbox) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.all[s.id]; ok {
		return fmt.Errorf("microvm: sandbox %q already exists", s.id)
	}
	b.all[s.id] = s
	return nil
}

func (b *Backend) unregister(s *Sandbox) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.all[s.id] == s {
		delete(b.all, s.id)
	}
}

func (b *Backend) sockBase(id string) string {
	sum := sha256.Sum256([]byte(b.cfg.Root + "\x00" + id))
	return filepath.Join(b.socks, hex.EncodeToString(sum[:8]))
}

// memPrefix names the RAM files of this backend's instances in MemoryDir.
func (b *Backend) memPrefix() string { return memPrefix(b.cfg.Root) }

func memPrefix(root string) string {
	sum := sha256.Sum256([]byte(root))
	return "vhive-microvm-" + hex.EncodeToString(sum[:4]) + "-"
}

// MemoryFile is the RAM file of booted instance id.
func (b *Backend) MemoryFile(id string) string {
	sum := sha256.Sum256([]byte(id))
	return filepath.Join(b.cfg.MemoryDir, b.memPrefix()+hex.EncodeToString(sum[:8])+".mem")
}

// InstanceDir is the directory of instance id (tests check it is gone).
func (b *Backend) InstanceDir(id string) string { return filepath.Join(b.instances, id) }

// Cleanup kills the QEMU processes of instances a previous run left behind
// and removes their directories and sockets. Their Nets belong to the
// netpool (netpool.Cleanup).
func (b *Backend) Cleanup(ctx context.Context) error {
	b.mu.Lock()
	live := make([]*Sandbox, 0, len(b.all))
	for _, s := range b.all {
		live = append(live, s)
	}
	b.mu.Unlock()
	var errs []error
	for _, s := range live {
		if err := s.Stop(ctx); err != nil {
			errs = append(errs, err)
		}
	}
	ents, err := os.ReadDir(b.instances)
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("microvm: cleanup: %w", err)
	}
	for _, e := range ents {
		dir := filepath.Join(b.instances, e.Name())
		if data, err := os.ReadFile(filepath.Join(dir, "qemu.pid")); err == nil {
			if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil && pid > 1 {
				killStale(pid, dir)
			}
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("microvm: cleanup: %w", err))
		}
	}
	socks, _ := os.ReadDir(b.socks)
	for _, e := range socks {
		_ = os.Remove(filepath.Join(b.socks, e.Name()))
	}
	mems, _ := os.ReadDir(b.cfg.MemoryDir)
	for _, e := range mems {
		if strings.HasPrefix(e.Name(), b.memPrefix()) && strings.HasSuffix(e.Name(), ".mem") {
			if err := os.Remove(filepath.Join(b.cfg.MemoryDir, e.Name())); err != nil && !errors.Is(err, os.ErrNotExist) {
				errs = append(errs, fmt.Errorf("microvm: cleanup: %w", err))
			}
		}
	}
	return errors.Join(errs...)
}

// Leftovers lists what the instances of a backend with state directory
// root (its Config.Root) hold on the machine: QEMU processes, instance
// directories, sockets and RAM files in memDir ("" for the default). It is
// empty once every instance is stopped or Cleanup ran; leak checks of tests
// use it.
func Leftovers(root, memDir string) []string {
	root, err := filepath.Abs(root)
	if err != nil {
		return []string{err.Error()}
	}
	if memDir == "" {
		memDir = filepath.Join(root, "mem")
		if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
			memDir = "/dev/shm"
		}
	}
	var out []string
	procs, _ := os.ReadDir("/proc")
	for _, e := range procs {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || !strings.Contains(string(cmd), filepath.Join(root, "instances")+"/") {
			continue
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err != nil || strings.Contains(string(st), ") Z ") {
			continue // gone, or exited and waiting to be reaped
		}
		out = append(out, fmt.Sprintf("QEMU pid %d", pid))
	}
	for _, d := range []string{"instances", "sock"} {
		ents, _ := os.ReadDir(filepath.Join(root, d))
		for _, e := range ents {
			out = append(out, filepath.Join(root, d, e.Name()))
		}
	}
	prefix := memPrefix(root)
	mems, _ := os.ReadDir(memDir)
	for _, e := range mems {
		if strings.HasPrefix(e.Name(), prefix) {
			out = append(out, filepath.Join(memDir, e.Name()))
		}
	}
	return out
}

// killStale kills pid if it is still a QEMU of instance dir.
func killStale(pid int, dir string) {
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil || !strings.Contains(string(cmdline), dir+"/") {
		return
	}
	_ = syscall.Kill(pid, syscall.SIGKILL)
	for range 100 {
		if _, err := os.Stat(fmt.Sprintf("/proc/%d", pid)); err != nil {
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
}
