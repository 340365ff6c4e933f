// Package oci is the sandbox backend for OCI runtimes driven through their
// command line with github.com/containerd/go-runc: gVisor (runsc, systrap
// platform, --network=sandbox) and runc.
//
// On-disk layout under Config.Root (an absolute path; one Root per backend):
//
//	<Root>/state/              the runtime's --root (container state)
//	<Root>/bundles/<id>/       one OCI bundle per instance:
//	    config.json            generated from the Spec (runtime-spec types)
//	    rootfs/                overlay mount: image rootfs (lower, read-only)
//	                           + upper/ and work/ (per instance); or a copy
//	    stdout.log, stderr.log the function's output (Err shows stderr's tail)
//
// Rootfs: a kernel overlayfs mount is used for both runtimes; if the mount
// fails, the image rootfs is copied (RootfsCopy). For gVisor the sentry adds
// its own memory-backed overlay (--overlay2=root:memory) so that writes stay
// in the sandbox (and in its checkpoint); RootfsDirect skips the kernel
// overlay for gVisor and hands runsc the image rootfs itself, relying on that
// memory overlay to take every write (TestRootfsModes checks that the image
// stays unchanged in every mode).
//
// Exit detection: New marks the daemon process as a child subreaper
// (PR_SET_CHILD_SUBREAPER). When `runc create` / `runsc create` exits, the
// container's init process (runc) or the sandbox process (runsc, whose exit
// status is the root container's) is re-parented to the daemon, which waits
// for it through a pidfd (waitid P_PIDFD) and so gets its exit status. The
// runsc gofer is re-parented too and is reaped the same way. Other
// processes that a daemon's children orphan will also be re-parented to the
// daemon: code that spawns daemonizing grandchildren must reap them.
//
// Network: every instance takes a Net from a netpool.Pool; the container
// joins its namespace (OCI namespace path) and the function is reached at
// GuestIP:Port.
//
// Daemon start-up, so that a restart leaks nothing: netpool.Cleanup(prefix),
// netpool.New, oci.New (per runtime, each with its own Root), then
// Backend.Cleanup before the first Create.
//
// Snapshots (gVisor only): Sandbox.Snapshot runs `runsc checkpoint
// --leave-running` (checkpoint.img, pages_meta.img, pages.img in the
// directory); Backend.Restore runs `runsc restore --detach` into a fresh
// bundle and netns, so one checkpoint can be restored many times at once.
// Restores are eager (MemoryEager); other modes return ErrNotSupported.
//
// Cgroups (v1 and v2 hierarchies both work through the runtime): the spec's
// cgroupsPath is /vhive/<runtime>-<crc32 of Root>/<id>, with memory and CPU
// limits from the Spec; the runtime removes it on delete, Cleanup removes
// leftovers (only its own Root's).
package oci

import (
	"context"
	"errors"
	"fmt"
	"hash/crc32"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"

	runc "github.com/containerd/go-runc"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// Runtime names accepted in Config.Runtime.
const (
	RuntimeGVisor = "gvisor"
	RuntimeRunc   = "runc"
)

// RootfsMode selects how an instance's writable root filesystem is built.
type RootfsMode string

const (
	// RootfsAuto uses RootfsOverlay and falls back to RootfsCopy when the
	// overlay mount fails.
	RootfsAuto RootfsMode = ""
	// RootfsOverlay: kernel overlayfs, image rootfs as the read-only lower.
	RootfsOverlay RootfsMode = "overlay"
	// RootfsCopy: a per-instance copy of the image rootfs (slow; for file
	// systems that cannot be an overlay lower).
	RootfsCopy RootfsMode = "copy"
	// RootfsDirect (gVisor only): the image rootfs itself; runsc's
	// --overlay2=root:memory keeps every write in the sandbox's memory.
	RootfsDirect RootfsMode = "direct"
)

// Config configures a Backend.
type Config struct {
	// Runtime is RuntimeGVisor or RuntimeRunc.
	Runtime string
	// Binary is the path of runsc or runc.
	Binary string
	// Root is the state directory (bundles and the runtime's --root). It is
	// made absolute; runsc needs absolute bundle paths.
	Root string
	// NetPool provides the instances' network namespaces. Required.
	NetPool *netpool.Pool
	Logger  *slog.Logger
	// Platform is runsc's --platform (default "systrap"). gVisor only.
	Platform string
	// RunscFlags are extra global runsc flags, appended after the defaults
	// (--platform, --network=sandbox, --overlay2=root:memory). gVisor only.
	RunscFlags []string
	// Rootfs selects how instance root filesystems are built.
	Rootfs RootfsMode
	// SeparateCreate runs the runtime's `create` in Create and `start` in
	// Start: two runtime invocations per boot. Otherwise Create only
	// prepares the bundle, rootfs and network, and Start runs `run
	// --detach`: one invocation. gVisor always separates them: after a
	// detached `runsc run`, the sandbox process outlives a function that
	// exits, so a crash at start would only be noticed at the ready
	// timeout.
	SeparateCreate bool
}

// CgroupParent is the cgroup (relative to each hierarchy's root) below which
// a backend of runtime with the absolute state directory root puts its
// instances: /vhive/<runtime>-<crc32 of root>. Tools that clean up after a
// crashed daemon (internal/cluster) find its cgroups there.
func CgroupParent(runtime, root string) string {
	return fmt.Sprintf("/vhive/%s-%08x", runtime, crc32.ChecksumIEEE([]byte(root)))
}

// Backend implements sandbox.Backend (and, for gVisor, sandbox.Restorer).
type Backend struct {
	cfg     Config
	log     *slog.Logger
	rt      *runc.Runc
	bundles string
	// cgroupParent is /vhive/<runtime>-<hash of Root>: backends with
	// different Roots (a daemon and a test) never touch each other's
	// cgroups.
	cgroupParent string

	mu        sync.Mutex
	instances map[string]*Sandbox

	verMu sync.Mutex
	ver   versionCache
}

var (
	_ sandbox.Backend     = (*Backend)(nil)
	_ sandbox.Restorer    = (*Backend)(nil)
	_ sandbox.Sandbox     = (*Sandbox)(nil)
	_ sandbox.Snapshotter = (*Sandbox)(nil)
)

// New validates cfg, creates the state directories and marks the process as
// a child subreaper (see the package documentation).
func New(ctx context.Context, cfg Config) (*Backend, error) {
	switch cfg.Runtime {
	case RuntimeGVisor, RuntimeRunc:
	default:
		return nil, fmt.Errorf("oci: Runtime %q is not %q or %q", cfg.Runtime, RuntimeGVisor, RuntimeRunc)
	}
	if cfg.Binary == "" {
		return nil, fmt.Errorf("oci: Binary (path of the %s runtime) is empty", cfg.Runtime)
	}
	if _, err := os.Stat(cfg.Binary); err != nil {
		return nil, fmt.Errorf("oci: runtime binary %q: %w", cfg.Binary, err)
	}
	if cfg.Root == "" {
		return nil, errors.New("oci: Root (state directory) is empty")
	}
	root, err := filepath.Abs(cfg.Root)
	if err != nil {
		return nil, fmt.Errorf("oci: Root %q: %w", cfg.Root, err)
	}
	cfg.Root = root
	if cfg.NetPool == nil {
		return nil, errors.New("oci: NetPool is nil")
	}
	switch cfg.Rootfs {
	case RootfsAuto, RootfsOverlay, RootfsCopy:
	case RootfsDirect:
		if cfg.Runtime != RuntimeGVisor {
			return nil, fmt.Errorf("oci: Rootfs %q needs runtime %q", cfg.Rootfs, RuntimeGVisor)
		}
		// Only runsc's memory overlay keeps the image rootfs unwritten.
		for _, f := range cfg.RunscFlags {
			if v, ok := strings.CutPrefix(strings.TrimLeft(f, "-"), "overlay2="); ok && !strings.HasSuffix(v, ":memory") {
				return nil, fmt.Errorf("oci: Rootfs %q needs runsc --overlay2=root:memory, RunscFlags has %q", cfg.Rootfs, f)
			}
		}
	default:
		return nil, fmt.Errorf("oci: Rootfs mode %q is unknown", cfg.Rootfs)
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.Platform == "" {
		cfg.Platform = "systrap"
	}
	if cfg.Runtime == RuntimeGVisor {
		cfg.SeparateCreate = true
	}
	b := &Backend{
		cfg:          cfg,
		log:          cfg.Logger.With("component", "sandbox", "backend", cfg.Runtime),
		bundles:      filepath.Join(root, "bundles"),
		cgroupParent: CgroupParent(cfg.Runtime, root),
		instances:    map[string]*Sandbox{},
	}
	state := filepath.Join(root, "state")
	for _, d := range []string{state, b.bundles} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("oci: create %q: %w", d, err)
		}
	}
	b.rt = &runc.Runc{Command: cfg.Binary, Root: state}
	if cfg.Runtime == RuntimeGVisor {
		b.rt.ExtraArgs = append([]string{
			"--platform=" + cfg.Platform,
			"--network=sandbox",
			"--overlay2=root:memory",
		}, cfg.RunscFlags...)
	}
	if err := unix.Prctl(unix.PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0); err != nil {
		return nil, fmt.Errorf("oci: become child subreaper: %w", err)
	}
	return b, nil
}

// Name returns the runtime name ("gvisor" or "runc").
func (b *Backend) Name() string { return b.cfg.Runtime }

// Capabilities: gVisor snapshots (eager restore only); runc none (criu does
// not work on this kernel).
func (b *Backend) Capabilities() sandbox.Capabilities {
	if b.cfg.Runtime == RuntimeGVisor {
		return sandbox.Capabilities{Snapshot: true, EagerRestore: true}
	}
	return sandbox.Capabilities{}
}

var validID = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

func validateSpec(spec sandbox.Spec) error {
	if !validID.MatchString(spec.ID) {
		return fmt.Errorf("oci: sandbox ID %q must be 1-64 characters of [A-Za-z0-9_.-], not starting with '.', '_' or '-'", spec.ID)
	}
	if !filepath.IsAbs(spec.Rootfs) {
		return fmt.Errorf("oci: sandbox %q: Rootfs %q is not an absolute path", spec.ID, spec.Rootfs)
	}
	if fi, err := os.Stat(spec.Rootfs); err != nil {
		return fmt.Errorf("oci: sandbox %q: Rootfs: %w", spec.ID, err)
	} else if !fi.IsDir() {
		return fmt.Errorf("oci: sandbox %q: Rootfs %q is not a directory", spec.ID, spec.Rootfs)
	}
	if len(spec.Process.Args) == 0 || spec.Process.Args[0] == "" {
		return fmt.Errorf("oci: sandbox %q: Process.Args is empty", spec.ID)
	}
	if spec.Port <= 0 || spec.Port > 65535 {
		return fmt.Errorf("oci: sandbox %q: Port %d is not in 1-65535", spec.ID, spec.Port)
	}
	if spec.MemoryLimit < 0 {
		return fmt.Errorf("oci: sandbox %q: MemoryLimit %d is negative", spec.ID, spec.MemoryLimit)
	}
	if spec.CPULimit < 0 {
		return fmt.Errorf("oci: sandbox %q: CPULimit %g is negative", spec.ID, spec.CPULimit)
	}
	return nil
}

// Create prepares the bundle, rootfs and network of an instance (and, with
// Config.SeparateCreate, runs the runtime's create). On error everything
// done so far is undone.
func (b *Backend) Create(ctx context.Context, spec sandbox.Spec) (sandbox.Sandbox, error) {
	s, err := b.prepare(ctx, spec)
	if err != nil {
		return nil, err
	}
	if !b.cfg.SeparateCreate {
		return s, nil
	}
	if err := s.create(ctx); err != nil {
		b.rollback(ctx, s)
		return nil, err
	}
	return s, nil
}

// Restore creates a new instance from a checkpoint taken by Sandbox.Snapshot
// (gVisor only, MemoryEager only): fresh bundle and network namespace (with
// its address and route in place, which runsc restore needs), then `runsc
// restore`. The returned sandbox is running; Start is a no-op.
func (b *Backend) Restore(ctx context.Context, spec sandbox.Spec, dir string, opts sandbox.RestoreOptions) (sandbox.Sandbox, error) {
	if b.cfg.Runtime != RuntimeGVisor {
		return nil, fmt.Errorf("oci: restore with runtime %q: %w", b.cfg.Runtime, sandbox.ErrNotSupported)
	}
	if opts.Mode != sandbox.MemoryEager && opts.Mode != "" {
		return nil, fmt.Errorf("oci: restore of %q in memory mode %q (gVisor restores eagerly): %w", spec.ID, opts.Mode, sandbox.ErrNotSupported)
	}
	if fi, err := os.Stat(filepath.Join(dir, checkpointFile)); err != nil || fi.IsDir() {
		return nil, fmt.Errorf("oci: restore of %q: %q holds no gVisor checkpoint (%s): %v", spec.ID, dir, checkpointFile, err)
	}
	s, err := b.prepare(ctx, spec)
	if err != nil {
		return nil, err
	}
	if err := s.restore(ctx, dir); err != nil {
		b.rollback(ctx, s)
		return nil, err
	}
	return s, nil
}

func (b *Backend) rollback(ctx context.Context, s *Sandbox) {
	if err := s.Stop(context.WithoutCancel(ctx)); err != nil {
		b.log.Error("rollback of a failed create left something behind", "id", s.id, "err", err)
	}
}

func (b *Backend) register(s *Sandbox) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.instances[s.id]; ok {
		return fmt.Errorf("oci: sandbox %q already exists", s.id)
	}
	b.instances[s.id] = s
	return nil
}

func (b *Backend) unregister(s *Sandbox) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.instances[s.id] == s {
		delete(b.instances, s.id)
	}
}
