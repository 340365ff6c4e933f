package wasm

import (
	"context"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/experimental"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/sandbox"
)

// GuestTimeHeader is the response header in which a worker reports how
// many µs a SayHello spent in the guest (sandbox.GuestTimeHeader).
const GuestTimeHeader = sandbox.GuestTimeHeader

// WorkerReady is the line a worker writes to its stdout once its control
// socket listens and the preloaded modules are compiled.
const WorkerReady = "ready"

// WorkerOptions configure one worker process.
type WorkerOptions struct {
	// ControlSocket is where the worker serves its control service.
	ControlSocket string
	// ModuleDir is a directory written by PrepareCached.
	ModuleDir string
	// CompileCache is wazero's on-disk compilation cache ("" for none).
	CompileCache string
	// Preload compiles the boot and/or restore module before the worker
	// reports ready, so that a pooled worker starts without compiling.
	PreloadBoot, PreloadRestore bool
	// Logger defaults to a text logger on stderr.
	Logger *slog.Logger
}

// Args renders o as the argument list WorkerMain parses (after the command
// prefix, e.g. ["vhive","internal","wasm-worker"]).
func (o WorkerOptions) Args() []string {
	a := []string{"--control", o.ControlSocket, "--module-dir", o.ModuleDir}
	if o.CompileCache != "" {
		a = append(a, "--compile-cache", o.CompileCache)
	}
	var pre []string
	if o.PreloadBoot {
		pre = append(pre, "boot")
	}
	if o.PreloadRestore {
		pre = append(pre, "restore")
	}
	if len(pre) > 0 {
		a = append(a, "--preload", strings.Join(pre, ","))
	}
	return a
}

// ParseWorkerArgs is the inverse of WorkerOptions.Args.
func ParseWorkerArgs(args []string) (WorkerOptions, error) {
	var o WorkerOptions
	fs := flag.NewFlagSet("wasm-worker", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	fs.StringVar(&o.ControlSocket, "control", "", "control socket path")
	fs.StringVar(&o.ModuleDir, "module-dir", "", "prepared module directory")
	fs.StringVar(&o.CompileCache, "compile-cache", "", "wazero compilation cache directory")
	preload := fs.String("preload", "", "modules to compile before reporting ready: boot,restore")
	if err := fs.Parse(args); err != nil {
		return o, fmt.Errorf("wasm worker arguments: %w", err)
	}
	if fs.NArg() > 0 {
		return o, fmt.Errorf("wasm worker arguments: unexpected %q", fs.Args())
	}
	for _, p := range strings.Split(*preload, ",") {
		switch p {
		case "":
		case "boot":
			o.PreloadBoot = true
		case "restore":
			o.PreloadRestore = true
		default:
			return o, fmt.Errorf("wasm worker arguments: --preload %q: want boot and/or restore", p)
		}
	}
	if o.ControlSocket == "" || o.ModuleDir == "" {
		return o, errors.New("wasm worker arguments: --control and --module-dir are required")
	}
	return o, nil
}

// WorkerMain is the entry point of a worker process (the hidden command
// `vhive internal wasm-worker`): it parses args (see WorkerOptions.Args),
// serves until ctx is done, and returns an error when the guest fails
// fatally (trap, exit, lost memory server) — the process should then exit
// non-zero with the error on stderr.
func WorkerMain(ctx context.Context, args []string) error {
	o, err := ParseWorkerArgs(args)
	if err != nil {
		return err
	}
	return RunWorker(ctx, o, os.Stdout)
}

// worker serves one instance. mu serialises everything that touches the
// guest: it is single-threaded.
type worker struct {
	opts  WorkerOptions
	log   *slog.Logger
	rt    wazero.Runtime
	info  *ModuleInfo
	fatal chan error // first fatal error; buffered 1

	mu       sync.Mutex
	compiled map[string]wazero.CompiledModule
	inst     *instance
	greeter  *grpc.Server
}

type instance struct {
	mod    api.Module
	region *region
	clock  *clock
	uffd   io.Closer // registration with the memory manager, if any

	alloc, free, handle, status api.Function
}

// clock is the guest's monotonic clock: base + time since start. A restored
// instance's base is the snapshot's clock value, so guest time never goes
// back (Go's runtime aborts if it does).
type clock struct {
	base  int64
	start time.Time
}

func (c *clock) nanotime() int64 { return c.base + int64(time.Since(c.start)) }

// RunWorker runs a worker with typed options; ready receives WorkerReady
// once the control socket listens.
func RunWorker(ctx context.Context, o WorkerOptions, ready io.Writer) error {
	log := o.Logger
	if log == nil {
		log = slog.New(slog.NewTextHandler(os.Stderr, nil))
	}
	log = log.With("pid", os.Getpid())
	info, err := LoadModuleInfo(o.ModuleDir)
	if err != nil {
		return err
	}
	cfg := wazero.NewRuntimeConfigCompiler()
	if o.CompileCache != "" {
		cache, err := wazero.NewCompilationCacheWithDir(o.CompileCache)
		if err != nil {
			return fmt.Errorf("wazero compilation cache %s: %w", o.CompileCache, err)
		}
		cfg = cfg.WithCompilationCache(cache)
	}
	rt := wazero.NewRuntimeWithConfig(ctx, cfg)
	defer rt.Close(context.Background())
	if _, err := wasi_snapshot_preview1.Instantiate(ctx, rt); err != nil {
		return fmt.Errorf("instantiate WASI: %w", err)
	}
	w := &worker{opts: o, log: log, rt: rt, info: info, fatal: make(chan error, 1), compiled: map[string]wazero.CompiledModule{}}
	for _, p := range []struct {
		on   bool
		file string
	}{{o.PreloadBoot, BootModuleFile}, {o.PreloadRestore, RestoreModuleFile}} {
		if p.on {
			if _, _, err := w.module(ctx, p.file); err != nil {
				return err
			}
		}
	}

	_ = os.Remove(o.ControlSocket)
	ln, err := net.Listen("unix", o.ControlSocket)
	if err != nil {
		return fmt.Errorf("listen on control socket: %w", err)
	}
	ctl := grpc.NewServer()
	ctl.RegisterService(&controlDesc, w)
	serveErr := make(chan error, 1)
	go func() { serveErr <- ctl.Serve(ln) }()
	defer func() {
		ctl.Stop()
		// A guest call still running (e.g. stuck on a fault) holds mu:
		// then leave the rest to the process exit.
		if w.mu.TryLock() {
			if w.greeter != nil {
				w.greeter.Stop()
			}
			if w.inst != nil {
				w.inst.close()
			}
			w.mu.Unlock()
		}
	}()
	if _, err := fmt.Fprintln(ready, WorkerReady); err != nil {
		return fmt.Errorf("report ready: %w", err)
	}
	log.Debug("wasm worker ready", "module", info.Digest)
	select {
	case <-ctx.Done():
		return nil
	case err := <-w.fatal:
		return err
	case err := <-serveErr:
		return fmt.Errorf("control server: %w", err)
	}
}

func (in *instance) close() {
	_ = in.mod.Close(context.Background())
	if in.uffd != nil {
		_ = in.uffd.Close()
	}
	in.region.release()
}

// module compiles (or loads from the cache) one of the prepared modules.
// Callers hold w.mu or run before serving.
func (w *worker) module(ctx context.Context, file string) (wazero.CompiledModule, bool, error) {
	if m, ok := w.compiled[file]; ok {
		return m, true, nil
	}
	b, err := os.ReadFile(filepath.Join(w.opts.ModuleDir, file))
	if err != nil {
		return nil, false, fmt.Errorf("read prepared module: %w", err)
	}
	m, err := w.rt.CompileModule(ctx, b)
	if err != nil {
		return nil, false, fmt.Errorf("compile %s of %s: %w", file, w.info.Digest, err)
	}
	w.compiled[file] = m
	return m, false, nil
}

func (w *worker) die(err error) {
	select {
	case w.fatal <- err:
	default:
	}
}

func since(t time.Time) int64 { return time.Since(t).Microseconds() }

func (w *worker) start(ctx context.Context, req *StartRequest) (_ *StartReply, err error) {
	t0 := time.Now()
	w.mu.Lock()
	defer w.mu.Unlock()
	if w.inst != nil {
		return nil, status.Error(codes.FailedPrecondition, "wasm worker already runs an instance")
	}
	if req.GreeterSocket == "" {
		return nil, status.Error(codes.InvalidArgument, "greeter_socket is required")
	}
	rep := &StartReply{Stages: map[string]int64{}}
	defer func() { rep.Stages["Worker"] = since(t0) }()
	file := BootModuleFile
	if req.Restore != nil {
		file = RestoreModuleFile
	}
	t := time.Now()
	compiled, preloaded, err := w.module(ctx, file)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	rep.Preloaded = preloaded
	rep.Stages["Compile"] = since(t)

	var inst *instance
	if req.Restore == nil {
		inst, err = w.boot(ctx, compiled, req, rep)
	} else {
		inst, err = w.restore(ctx, compiled, req, rep)
	}
	if err != nil {
		code := codes.Internal
		if errors.Is(err, ErrDigestMismatch) || errors.Is(err, ErrCorruptSnapshot) {
			code = codes.FailedPrecondition
		}
		return nil, status.Error(code, err.Error())
	}
	_ = os.Remove(req.GreeterSocket)
	ln, err := net.Listen("unix", req.GreeterSocket)
	if err != nil {
		inst.close()
		return nil, status.Errorf(codes.Internal, "listen on greeter socket: %v", err)
	}
	w.inst = inst
	w.greeter = grpc.NewServer()
	helloworld.RegisterGreeterServer(w.greeter, &greeter{w: w})
	go func() {
		if err := w.greeter.Serve(ln); err != nil {
			w.die(fmt.Errorf("greeter server: %w", err))
		}
	}()
	return rep, nil
}

func (w *worker) moduleConfig(c *clock) wazero.ModuleConfig {
	return wazero.NewModuleConfig().
		WithName("").
		WithStdout(os.Stderr).
		WithStderr(os.Stderr).
		WithSysWalltime().
		WithNanotime(c.nanotime, 1).
		WithSysNanosleep().
		WithRandSource(crand.Reader)
}

func (w *worker) boot(ctx context.Context, compiled wazero.CompiledModule, req *StartRequest, rep *StartReply) (*instance, error) {
	reg, err := newRegion(req.MaxMemory)
	if err != nil {
		return nil, err
	}
	c := &clock{start: time.Now()}
	cfg := w.moduleConfig(c)
	for _, kv := range req.Env {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			reg.release()
			return nil, fmt.Errorf("environment entry %q is not K=V", kv)
		}
		cfg = cfg.WithEnv(k, v)
	}
	if len(req.Args) > 0 {
		cfg = cfg.WithArgs(req.Args...)
	}
	start := []string{}
	if _, ok := compiled.ExportedFunctions()["_initialize"]; ok {
		start = append(start, "_initialize")
	}
	t := time.Now()
	mod, err := w.rt.InstantiateModule(experimental.WithMemoryAllocator(ctx, reg), compiled, cfg.WithStartFunctions(start...))
	if err != nil {
		reg.release()
		return nil, fmt.Errorf("boot %s: %w", w.info.Digest, err)
	}
	rep.Stages["Initialize"] = since(t)
	inst := &instance{mod: mod, region: reg, clock: c}
	if err := inst.bindABI(); err != nil {
		inst.close()
		return nil, err
	}
	return inst, nil
}

func (w *worker) restore(ctx context.Context, compiled wazero.CompiledModule, req *StartRequest, rep *StartReply) (_ *instance, err error) {
	r := req.Restore
	st, err := ReadState(r.Dir)
	if err != nil {
		return nil, err
	}
	if err := st.CheckModule(w.info); err != nil {
		return nil, err
	}
	if req.MaxMemory != 0 && uint64(st.MemorySize) > req.MaxMemory {
		return nil, fmt.Errorf("snapshot memory %d bytes exceeds the limit %d", st.MemorySize, req.MaxMemory)
	}
	reg, err := newRegion(req.MaxMemory)
	if err != nil {
		return nil, err
	}
	inst := &instance{region: reg}
	defer func() {
		if err != nil {
			if inst.uffd != nil {
				_ = inst.uffd.Close()
			}
			reg.release()
		}
	}()

	t := time.Now()
	memPath := filepath.Join(r.Dir, MemoryFile)
	switch r.Mode {
	case RestoreCopy:
		err = copyMemory(memPath, reg.mem[:st.MemorySize])
	case RestoreMmap:
		var f *os.File
		if f, err = os.Open(memPath); err == nil {
			err = reg.mapFile(f, st.MemorySize)
			f.Close()
		}
	case RestoreUffd:
		inst.uffd, err = registerUffd(ctx, reg.mem[:st.MemorySize], r.UffdSocket)
	default:
		err = fmt.Errorf("unknown restore mode %q (want %s, %s or %s)", r.Mode, RestoreCopy, RestoreMmap, RestoreUffd)
	}
	if err != nil {
		return nil, err
	}
	if r.VerifyMemory {
		sum := sha256.Sum256(reg.mem[:st.MemorySize])
		if got := hex.EncodeToString(sum[:]); got != st.MemorySHA256 {
			return nil, fmt.Errorf("%w: memory file %s: checksum mismatch (state %s, content %s)", ErrCorruptSnapshot, memPath, st.MemorySHA256, got)
		}
	}
	rep.Stages["LoadMemory"] = since(t)

	t = time.Now()
	inst.clock = &clock{base: st.Nanotime, start: time.Now()}
	inst.mod, err = w.rt.InstantiateModule(experimental.WithMemoryAllocator(ctx, reg), compiled,
		w.moduleConfig(inst.clock).WithStartFunctions())
	if err != nil {
		return nil, fmt.Errorf("instantiate restore module of %s: %w", w.info.Digest, err)
	}
	rep.Stages["Instantiate"] = since(t)
	t = time.Now()
	if err := inst.setState(st); err != nil {
		_ = inst.mod.Close(ctx)
		return nil, err
	}
	if err := inst.bindABI(); err != nil {
		_ = inst.mod.Close(ctx)
		return nil, err
	}
	rep.Stages["SetState"] = since(t)
	return inst, nil
}

// copyMemory reads the data extents of the sparse memory file into mem;
// holes stay untouched (zero, not resident).
func copyMemory(path string, mem []byte) error {
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("open memory file: %w", err)
	}
	defer f.Close()
	return forEachExtent(f, int64(len(mem)), func(off, end int64) error {
		if _, err := io.ReadFull(io.NewSectionReader(f, off, end-off), mem[off:end]); err != nil {
			return fmt.Errorf("read memory file %s at %d: %w", path, off, err)
		}
		return nil
	})
}

func (in *instance) setState(st *State) error {
	mem := in.mod.Memory()
	if mem == nil {
		return errors.New("restore module has no memory")
	}
	if cur := mem.Size() / WasmPageSize; cur < st.MemoryPages {
		if _, ok := mem.Grow(st.MemoryPages - cur); !ok {
			return fmt.Errorf("grow memory to %d pages failed", st.MemoryPages)
		}
	} else if cur > st.MemoryPages {
		return fmt.Errorf("module starts with %d memory pages, the snapshot has only %d", cur, st.MemoryPages)
	}
	for _, g := range st.Globals {
		gl := in.mod.ExportedGlobal(g.Export)
		if gl == nil {
			return fmt.Errorf("restore module does not export global %q", g.Export)
		}
		if mg, ok := gl.(api.MutableGlobal); ok {
			mg.Set(g.Value)
		} else if gl.Get() != g.Value {
			return fmt.Errorf("immutable global %q is %d, the snapshot says %d", g.Export, gl.Get(), g.Value)
		}
	}
	return nil
}

// bindABI looks up the guest ABI exports (functions/sdk).
func (in *instance) bindABI() error {
	for _, f := range []struct {
		name string
		fn   *api.Function
	}{{"vhive_alloc", &in.alloc}, {"vhive_free", &in.free}, {"vhive_handle", &in.handle}, {"vhive_status", &in.status}} {
		if *f.fn = in.mod.ExportedFunction(f.name); *f.fn == nil {
			return fmt.Errorf("wasm module does not export %s (not built with the vhive guest SDK?)", f.name)
		}
	}
	return nil
}

func (w *worker) snapshot(ctx context.Context, req *SnapshotRequest) (*SnapshotReply, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	in := w.inst
	if in == nil {
		return nil, status.Error(codes.FailedPrecondition, "wasm worker has no running instance")
	}
	if fi, err := os.Stat(req.Dir); err != nil || !fi.IsDir() {
		return nil, status.Errorf(codes.InvalidArgument, "snapshot directory %q: not a directory (%v)", req.Dir, err)
	}
	mem := in.mod.Memory()
	buf, ok := mem.Read(0, mem.Size())
	if !ok {
		return nil, status.Error(codes.Internal, "read linear memory")
	}
	st := &State{
		ModuleDigest: w.info.Digest,
		MemoryPages:  mem.Size() / WasmPageSize,
		MemorySize:   int64(mem.Size()),
		Nanotime:     in.clock.nanotime(),
		Created:      time.Now().UTC(),
	}
	for _, g := range w.info.Globals {
		gl := in.mod.ExportedGlobal(g.Export)
		if gl == nil {
			return nil, status.Errorf(codes.Internal, "module does not export global %q", g.Export)
		}
		st.Globals = append(st.Globals, GlobalValue{Export: g.Export, Type: g.Type, Value: gl.Get()})
	}
	sum, pages, err := WriteMemoryFile(filepath.Join(req.Dir, MemoryFile), buf)
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	st.MemorySHA256, st.DataPages = sum, pages
	if err := WriteState(req.Dir, st); err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	return &SnapshotReply{MemoryPages: st.MemoryPages, DataPages: pages, MemorySize: st.MemorySize}, nil
}

// invoke runs one request through the guest ABI. A trap or exit is fatal for
// the instance (and the worker).
func (w *worker) invoke(ctx context.Context, req []byte) ([]byte, bool, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	in := w.inst
	if in == nil {
		return nil, false, errors.New("no instance")
	}
	resp, failed, err := in.call(context.WithoutCancel(ctx), req)
	if err != nil {
		err = fmt.Errorf("guest %s failed: %w", w.info.Digest, err)
		w.die(err)
		return nil, false, err
	}
	return resp, failed, nil
}

func (in *instance) call(ctx context.Context, req []byte) ([]byte, bool, error) {
	r, err := in.alloc.Call(ctx, uint64(len(req)))
	if err != nil {
		return nil, false, fmt.Errorf("vhive_alloc: %w", err)
	}
	ptr := uint32(r[0])
	if ptr == 0 {
		return nil, false, fmt.Errorf("vhive_alloc(%d) returned 0", len(req))
	}
	mem := in.mod.Memory()
	if !mem.Write(ptr, req) {
		return nil, false, fmt.Errorf("vhive_alloc returned %#x, outside memory", ptr)
	}
	r, err = in.handle.Call(ctx, uint64(ptr), uint64(len(req)))
	if err != nil {
		return nil, false, fmt.Errorf("vhive_handle: %w", err)
	}
	rptr, rlen := uint32(r[0]>>32), uint32(r[0])
	s, err := in.status.Call(ctx)
	if err != nil {
		return nil, false, fmt.Errorf("vhive_status: %w", err)
	}
	b, ok := mem.Read(rptr, rlen)
	if !ok {
		return nil, false, fmt.Errorf("response %#x+%d outside memory", rptr, rlen)
	}
	resp := append([]byte(nil), b...)
	if _, err := in.free.Call(ctx, uint64(rptr)); err != nil {
		return nil, false, fmt.Errorf("vhive_free: %w", err)
	}
	if _, err := in.free.Call(ctx, uint64(ptr)); err != nil {
		return nil, false, fmt.Errorf("vhive_free: %w", err)
	}
	return resp, uint32(s[0]) != 0, nil
}

type greeter struct {
	helloworld.UnimplementedGreeterServer
	w *worker
}

// SayHello passes the request's name to the guest and its reply back as the
// message. A guest error status becomes codes.Unknown with the guest's
// message; a guest crash becomes codes.Internal (and ends the worker).
func (g *greeter) SayHello(ctx context.Context, req *helloworld.HelloRequest) (*helloworld.HelloReply, error) {
	t := time.Now()
	resp, failed, err := g.w.invoke(ctx, []byte(req.GetName()))
	// How long the guest ran (and waited for the instance), for benchmarks
	// that split a call's latency into guest and transport time.
	_ = grpc.SetHeader(ctx, metadata.Pairs(GuestTimeHeader, strconv.FormatInt(time.Since(t).Microseconds(), 10)))
	if err != nil {
		return nil, status.Error(codes.Internal, err.Error())
	}
	if failed {
		return nil, status.Error(codes.Unknown, string(resp))
	}
	return &helloworld.HelloReply{Message: string(resp)}, nil
}
