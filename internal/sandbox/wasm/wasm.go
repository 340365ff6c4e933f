// Package wasm is the sandbox backend "wasm": every instance is its own OS
// process (a worker, internal/wasm) running one WebAssembly module under
// wazero and serving helloworld.Greeter on a unix socket.
//
// Cold starts:
//
//	boot:     Create (take a worker) → Start (instantiate, _initialize)
//	restore:  Restore (take a worker → its memory from the snapshot: copied
//	          (eager) or served by the memory manager over userfaultfd (lazy,
//	          record, prefetch) → instantiate without data → set globals)
//
// Workers are spawned with Config.WorkerCommand (the hidden command
// `vhive internal wasm-worker`). Loading a compiled module costs ~100 ms per
// process even from wazero's on-disk cache, so with Config.PoolSize > 0 the
// backend keeps that many ready workers per module digest, modules compiled;
// RestoreStats reports Pages["ReadyWorker"] = 1 when a cold start found one.
//
// Layout under Config.Root, one directory per worker (it becomes the
// instance's directory):
//
//	<root>/w<random>/worker.pid    the worker's pid (Cleanup)
//	                 control.sock  the worker's control service
//	                 greeter.sock  the function (Endpoint)
//	                 memory.sock   the memory manager's socket (lazy modes)
//	                 stderr.log    the worker's stderr (Err's tail)
//
// Under Config.CacheDir: modules/<digest>/ (prepared modules) and compiled/
// (wazero's compilation cache).
package wasm

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"vhive.dev/vhive/internal/memory"
	"vhive.dev/vhive/internal/sandbox"
	wasmrt "vhive.dev/vhive/internal/wasm"
)

// Name is the backend's name.
const Name = "wasm"

// Config parameterises the backend.
type Config struct {
	// WorkerCommand is the argv prefix that starts a worker, e.g.
	// ["/proc/self/exe", "internal", "wasm-worker"]. Required.
	WorkerCommand []string
	// WorkerEnv is added to the workers' environment (K=V).
	WorkerEnv []string
	// Root holds the instances' directories. Keep it short: unix socket
	// paths under it must fit in 108 bytes. Required.
	Root string
	// CacheDir holds prepared modules and wazero's compilation cache.
	// Required.
	CacheDir string
	// CompileCacheDir is wazero's compilation cache (default
	// CacheDir/compiled).
	CompileCacheDir string
	// Memory is the daemon's memory manager. Nil disables the lazy, record
	// and prefetch restore modes (Capabilities.LazyMemory and REAP false).
	Memory *memory.Manager
	// ChunkPages is passed to the memory manager for lazy and record
	// restores: pages installed per fault (0 or 1: one page).
	ChunkPages int
	// EarlyResume makes prefetch (REAP) restores resume the guest as soon
	// as the memory manager has the handshake, while the working set is
	// still being read and installed (memory.RestoreConfig.EarlyResume: a
	// fault on a page not installed yet waits for its chunk). The daemon
	// turns it on (--wasm-early-resume): since the WS is read into huge
	// pages the read is short and the guest's run hides the install
	// (docs/benchmarks/wasm.md); false is vHive's order (install, then run).
	EarlyResume bool
	// EagerMmap makes MemoryEager restores map the memory file privately
	// (copy-on-write, pages read by the kernel on first touch: Firecracker's
	// vanilla snapshot load) instead of copying it before the guest runs.
	EagerMmap bool
	// PoolSize is the number of ready workers kept per module digest
	// (0: no pool, every cold start spawns and compiles).
	PoolSize int
	// RefillDelay is how long after a cold start took a pooled worker the
	// pool is topped up (default 250 ms; negative: at once), so that the
	// refill's process start does not compete with the new instance's first
	// requests on few cores.
	RefillDelay time.Duration
	// StartTimeout bounds spawning a worker until it is ready. Default 60s.
	StartTimeout time.Duration
	// Logger defaults to slog.Default().
	Logger *slog.Logger
}

// Backend is the wasm sandbox backend. Call Close when done with it.
type Backend struct {
	cfg Config
	log *slog.Logger

	// ctx lives until Close and bounds pool refills.
	ctx    context.Context
	cancel context.CancelFunc
	wg     sync.WaitGroup

	mu        sync.Mutex
	closed    bool
	instances map[string]*Sandbox // by sandbox ID
	owned     map[string]bool     // worker directories in use (pool or instance)
	pools     map[string]*pool    // by module digest
	modules   map[moduleKey]*module
	verified  map[string]string // snapshot dir → state checksum verified
}

var (
	_ sandbox.Backend         = (*Backend)(nil)
	_ sandbox.Restorer        = (*Backend)(nil)
	_ sandbox.Snapshotter     = (*Sandbox)(nil)
	_ sandbox.RestoreReporter = (*Sandbox)(nil)
	_ sandbox.Recorder        = (*Sandbox)(nil)
)

// New validates cfg and creates the directories.
func New(ctx context.Context, cfg Config) (*Backend, error) {
	if len(cfg.WorkerCommand) == 0 || cfg.WorkerCommand[0] == "" {
		return nil, errors.New("wasm backend: WorkerCommand is empty")
	}
	if cfg.Root == "" || !filepath.IsAbs(cfg.Root) {
		return nil, fmt.Errorf("wasm backend: Root %q must be an absolute path", cfg.Root)
	}
	// <root>/w<10 chars>/control.sock
	if n := len(cfg.Root) + len("/w0123456789/control.sock"); n > 107 {
		return nil, fmt.Errorf("wasm backend: Root %q is too long for unix socket paths (%d > 107 bytes)", cfg.Root, n)
	}
	if cfg.CacheDir == "" || !filepath.IsAbs(cfg.CacheDir) {
		return nil, fmt.Errorf("wasm backend: CacheDir %q must be an absolute path", cfg.CacheDir)
	}
	if cfg.PoolSize < 0 || cfg.PoolSize > 64 {
		return nil, fmt.Errorf("wasm backend: PoolSize %d not in [0, 64]", cfg.PoolSize)
	}
	if cfg.ChunkPages < 0 {
		return nil, fmt.Errorf("wasm backend: ChunkPages %d is negative", cfg.ChunkPages)
	}
	for _, kv := range cfg.WorkerEnv {
		if !strings.Contains(kv, "=") {
			return nil, fmt.Errorf("wasm backend: WorkerEnv entry %q is not K=V", kv)
		}
	}
	if cfg.CompileCacheDir == "" {
		cfg.CompileCacheDir = filepath.Join(cfg.CacheDir, "compiled")
	}
	if cfg.RefillDelay == 0 {
		cfg.RefillDelay = 250 * time.Millisecond
	}
	if cfg.StartTimeout <= 0 {
		cfg.StartTimeout = time.Minute
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	for _, d := range []string{cfg.Root, cfg.CacheDir, cfg.CompileCacheDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("wasm backend: %w", err)
		}
	}
	bctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	return &Backend{
		cfg: cfg, log: cfg.Logger.With("backend", Name),
		ctx: bctx, cancel: cancel,
		instances: map[string]*Sandbox{}, owned: map[string]bool{},
		pools: map[string]*pool{}, modules: map[moduleKey]*module{}, verified: map[string]string{},
	}, nil
}

// Name implements sandbox.Backend.
func (b *Backend) Name() string { return Name }

// Capabilities implements sandbox.Backend.
func (b *Backend) Capabilities() sandbox.Capabilities {
	lazy := b.cfg.Memory != nil
	return sandbox.Capabilities{Snapshot: true, LazyMemory: lazy, REAP: lazy}
}

// Close stops the pools' idle workers and waits for refills in flight.
// Running instances are left to their owners' Stop.
func (b *Backend) Close() error {
	b.mu.Lock()
	b.closed = true
	pools := b.pools
	b.pools = map[string]*pool{}
	b.mu.Unlock()
	b.cancel()
	b.wg.Wait()
	for _, p := range pools {
		p.drain(b)
	}
	return nil
}

// moduleKey identifies a module file version without reading it.
type moduleKey struct {
	path  string
	size  int64
	mtime time.Time
}

type module struct {
	dir  string
	info *wasmrt.ModuleInfo
}

// module prepares (or finds) the module at path.
func (b *Backend) module(path string) (*module, error) {
	if path == "" {
		return nil, errors.New("spec has no WasmModule")
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, fmt.Errorf("wasm module: %w", err)
	}
	key := moduleKey{path, fi.Size(), fi.ModTime()}
	b.mu.Lock()
	m := b.modules[key]
	b.mu.Unlock()
	if m != nil {
		return m, nil
	}
	dir, info, err := wasmrt.PrepareCached(b.cfg.CacheDir, path)
	if err != nil {
		return nil, err
	}
	m = &module{dir: dir, info: info}
	b.mu.Lock()
	b.modules[key] = m
	b.mu.Unlock()
	return m, nil
}

func validateSpec(spec sandbox.Spec) error {
	switch {
	case spec.ID == "":
		return errors.New("spec ID is empty")
	case strings.ContainsAny(spec.ID, "/\x00") || spec.ID == "." || spec.ID == "..":
		return fmt.Errorf("spec ID %q contains a path separator", spec.ID)
	case spec.MemoryLimit < 0:
		return fmt.Errorf("spec %q: negative memory limit %d", spec.ID, spec.MemoryLimit)
	case spec.CPULimit < 0:
		return fmt.Errorf("spec %q: negative CPU limit %g", spec.ID, spec.CPULimit)
	}
	for _, kv := range spec.Process.Env {
		if !strings.Contains(kv, "=") {
			return fmt.Errorf("spec %q: environment entry %q is not K=V", spec.ID, kv)
		}
	}
	return nil
}

// claim reserves spec.ID.
func (b *Backend) claim(s *Sandbox) error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.closed {
		return errors.New("wasm backend is closed")
	}
	if _, dup := b.instances[s.id]; dup {
		return fmt.Errorf("sandbox %q already exists", s.id)
	}
	b.instances[s.id] = s
	return nil
}

func (b *Backend) release(s *Sandbox) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.instances[s.id] == s {
		delete(b.instances, s.id)
	}
	if s.w != nil {
		delete(b.owned, s.w.dir)
	}
}

// Create implements sandbox.Backend: it takes a ready worker (or spawns one)
// for the module; Start boots it.
func (b *Backend) Create(ctx context.Context, spec sandbox.Spec) (sandbox.Sandbox, error) {
	s, err := b.create(ctx, spec, nil, sandbox.RestoreOptions{})
	if err != nil {
		return nil, err // not a typed nil in the interface
	}
	return s, nil
}

// Restore implements sandbox.Restorer. The returned sandbox is running
// (Start is a no-op).
func (b *Backend) Restore(ctx context.Context, spec sandbox.Spec, dir string, opts sandbox.RestoreOptions) (sandbox.Sandbox, error) {
	switch opts.Mode {
	case sandbox.MemoryEager:
	case sandbox.MemoryLazy, sandbox.MemoryRecord, sandbox.MemoryPrefetch:
		if b.cfg.Memory == nil {
			return nil, fmt.Errorf("wasm: restore %q in mode %s: no memory manager configured: %w", spec.ID, opts.Mode, sandbox.ErrNotSupported)
		}
		if opts.Mode != sandbox.MemoryLazy && opts.WorkingSet == "" {
			return nil, fmt.Errorf("wasm: restore %q in mode %s needs a working-set path", spec.ID, opts.Mode)
		}
	default:
		return nil, fmt.Errorf("wasm: restore %q: unknown memory mode %q", spec.ID, opts.Mode)
	}
	s, err := b.create(ctx, spec, &dir, opts)
	if err != nil {
		return nil, err
	}
	return s, nil
}

func (b *Backend) create(ctx context.Context, spec sandbox.Spec, snapDir *string, opts sandbox.RestoreOptions) (_ *Sandbox, retErr error) {
	op := "create"
	if snapDir != nil {
		op = "restore"
	}
	wrap := func(err error) error { return fmt.Errorf("wasm: %s sandbox %q: %w", op, spec.ID, err) }
	if err := validateSpec(spec); err != nil {
		return nil, wrap(err)
	}
	mod, err := b.module(spec.WasmModule)
	if err != nil {
		return nil, wrap(err)
	}
	var st *wasmrt.State
	var checkTime time.Duration
	if snapDir != nil {
		abs, err := filepath.Abs(*snapDir)
		if err != nil {
			return nil, wrap(fmt.Errorf("snapshot directory: %w", err))
		}
		snapDir = &abs
		// Refuse a bad snapshot before taking a worker.
		t := time.Now()
		if st, err = b.checkSnapshot(*snapDir, mod); err != nil {
			if errors.Is(err, wasmrt.ErrCorruptSnapshot) || errors.Is(err, wasmrt.ErrDigestMismatch) {
				err = fmt.Errorf("%w: %w", sandbox.ErrBadSnapshot, err)
			}
			return nil, wrap(err)
		}
		checkTime = time.Since(t)
	}
	s := &Sandbox{b: b, id: spec.ID, spec: spec, mod: mod, done: make(chan struct{}),
		result: sandbox.RestoreResult{Stages: map[string]time.Duration{}, Pages: map[string]int64{}}}
	if err := b.claim(s); err != nil {
		return nil, wrap(err)
	}
	defer func() {
		if retErr != nil {
			s.teardown()
		}
	}()
	t := time.Now()
	s.w, s.readyWorker, err = b.takeWorker(ctx, mod, snapDir != nil)
	defer b.refill(mod)
	if err != nil {
		return nil, wrap(err)
	}
	s.result.Stages["TakeWorker"] = time.Since(t)
	if snapDir != nil {
		s.result.Stages["CheckSnapshot"] = checkTime
	}
	s.endpoint = "unix://" + filepath.Join(s.w.dir, "greeter.sock")
	if s.readyWorker {
		s.result.Pages["ReadyWorker"] = 1
	} else {
		s.result.Pages["ReadyWorker"] = 0
	}
	go s.watch()
	if snapDir == nil {
		return s, nil
	}
	if err := s.restore(ctx, *snapDir, st, opts); err != nil {
		return nil, wrap(err)
	}
	return s, nil
}

// checkSnapshot validates dir's state against the module, and hashes the
// memory file the first time this backend sees that snapshot (later restores
// trust it: hashing reads every page, which a lazy restore must not).
func (b *Backend) checkSnapshot(dir string, mod *module) (*wasmrt.State, error) {
	st, err := wasmrt.ReadState(dir)
	if err != nil {
		return nil, err
	}
	if err := st.CheckModule(mod.info); err != nil {
		return nil, err
	}
	abs, err := filepath.Abs(dir)
	if err != nil {
		return nil, fmt.Errorf("snapshot directory: %w", err)
	}
	b.mu.Lock()
	ok := b.verified[abs] == st.MemorySHA256
	b.mu.Unlock()
	if !ok {
		if err := wasmrt.VerifyMemory(dir, st); err != nil {
			return nil, err
		}
		b.mu.Lock()
		b.verified[abs] = st.MemorySHA256
		b.mu.Unlock()
	}
	return st, nil
}

// Cleanup implements sandbox.Backend: it kills the workers a previous run
// left (found by their pid files, and only if /proc/<pid>/cmdline still names
// that worker's control socket, so a recycled pid is never hit) and removes
// their directories. Directories of this Backend's live workers are kept.
func (b *Backend) Cleanup(ctx context.Context) error {
	entries, err := os.ReadDir(b.cfg.Root)
	if err != nil {
		return fmt.Errorf("wasm: cleanup: %w", err)
	}
	var errs []error
	for _, e := range entries {
		dir := filepath.Join(b.cfg.Root, e.Name())
		if !e.IsDir() || !strings.HasPrefix(e.Name(), "w") {
			continue
		}
		b.mu.Lock()
		live := b.owned[dir]
		b.mu.Unlock()
		if live {
			continue
		}
		if err := killLeftover(ctx, dir); err != nil {
			errs = append(errs, err)
			continue
		}
		if err := os.RemoveAll(dir); err != nil {
			errs = append(errs, fmt.Errorf("wasm: cleanup: %w", err))
		}
	}
	return errors.Join(errs...)
}

func killLeftover(ctx context.Context, dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, pidFile))
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("wasm: cleanup %s: %w", dir, err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		return nil // not ours to interpret: the directory is removed
	}
	ours := func() bool {
		cmd, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		return err == nil && strings.Contains(string(cmd), "\x00"+filepath.Join(dir, controlSock)+"\x00")
	}
	if !ours() {
		return nil
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return fmt.Errorf("wasm: cleanup: kill leftover worker %d: %w", pid, err)
	}
	for ours() { // a zombie keeps its cmdline until reaped; its parent is gone
		select {
		case <-ctx.Done():
			return fmt.Errorf("wasm: cleanup: waiting for worker %d to exit: %w", pid, ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && strings.Contains(string(st), ") Z ") {
			break
		}
	}
	return nil
}
