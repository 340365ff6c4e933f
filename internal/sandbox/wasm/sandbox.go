package wasm

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc/status"

	"vhive.dev/vhive/internal/memory"
	"vhive.dev/vhive/internal/sandbox"
	wasmrt "vhive.dev/vhive/internal/wasm"
)

// Sandbox is one wasm instance: one worker process.
type Sandbox struct {
	b        *Backend
	id       string
	spec     sandbox.Spec
	mod      *module
	endpoint string

	w           *worker
	readyWorker bool

	done     chan struct{} // closed when the worker has exited
	stopOnce sync.Once
	startMu  sync.Mutex // serialises Start

	mu      sync.Mutex
	started bool
	stopped bool
	mem     *memory.Restore // lazy modes
	result  sandbox.RestoreResult
	exitErr error
}

// ID implements sandbox.Sandbox.
func (s *Sandbox) ID() string { return s.id }

// Endpoint implements sandbox.Sandbox: "unix:///<root>/w…/greeter.sock".
func (s *Sandbox) Endpoint() string { return s.endpoint }

// Done implements sandbox.Sandbox.
func (s *Sandbox) Done() <-chan struct{} { return s.done }

// Err implements sandbox.Sandbox.
func (s *Sandbox) Err() error {
	select {
	case <-s.done:
		s.mu.Lock()
		defer s.mu.Unlock()
		return s.exitErr
	default:
		return nil
	}
}

// ReadyWorker reports whether the cold start found a pre-spawned worker
// with its module already compiled.
func (s *Sandbox) ReadyWorker() bool { return s.readyWorker }

// Pid is the worker process's pid.
func (s *Sandbox) Pid() int { return s.w.proc.Pid() }

// watch closes done when the worker exits.
func (s *Sandbox) watch() {
	<-s.w.proc.Done()
	s.mu.Lock()
	switch {
	case s.stopped:
		s.exitErr = fmt.Errorf("wasm sandbox %q stopped", s.id)
	case s.mem != nil && isClosed(s.mem.Done()) && s.mem.Err() != nil:
		s.exitErr = fmt.Errorf("wasm sandbox %q: its memory server failed: %w; %w", s.id, s.mem.Err(), s.w.proc.Err())
	default:
		s.exitErr = fmt.Errorf("wasm sandbox %q: %w", s.id, s.w.proc.Err())
	}
	s.mu.Unlock()
	close(s.done)
}

func isClosed(c <-chan struct{}) bool {
	select {
	case <-c:
		return true
	default:
		return false
	}
}

func (s *Sandbox) startRequest() *wasmrt.StartRequest {
	req := &wasmrt.StartRequest{
		GreeterSocket: filepath.Join(s.w.dir, greeterSock),
		Env:           s.spec.Process.Env,
		Args:          s.spec.Process.Args,
	}
	if s.spec.MemoryLimit > 0 {
		req.MaxMemory = uint64(s.spec.MemoryLimit)
	}
	return req
}

// rpcErr turns a worker RPC error into a plain error with the worker's
// stderr tail when the worker died.
func (s *Sandbox) rpcErr(err error) error {
	msg := err.Error()
	if st, ok := status.FromError(err); ok {
		msg = st.Message()
	}
	select {
	case <-s.w.proc.Done():
		return fmt.Errorf("%s (%v)", msg, s.w.proc.Err())
	case <-time.After(50 * time.Millisecond): // an exit may be in flight
	}
	if tail := s.w.proc.StderrTail(1024); tail != "" {
		return fmt.Errorf("%s; worker stderr: %s", msg, tail)
	}
	return errors.New(msg)
}

// Start implements sandbox.Sandbox: it boots the instance (instantiate,
// _initialize) and returns once the function serves. On a restored sandbox
// it does nothing.
func (s *Sandbox) Start(ctx context.Context) error {
	s.startMu.Lock()
	defer s.startMu.Unlock()
	s.mu.Lock()
	stopped, started := s.stopped, s.started
	s.mu.Unlock()
	if stopped {
		return fmt.Errorf("wasm: start sandbox %q: it was stopped", s.id)
	}
	select {
	case <-s.done:
		return fmt.Errorf("wasm: start sandbox %q: it has ended: %w", s.id, s.Err())
	default:
	}
	if started {
		return nil
	}
	rep, err := s.w.proc.Client.Start(ctx, s.startRequest())
	if err != nil {
		return fmt.Errorf("wasm: start sandbox %q: %w", s.id, s.rpcErr(err))
	}
	s.mu.Lock()
	s.addWorkerStages(rep)
	s.started = true
	s.mu.Unlock()
	return nil
}

// addWorkerStages records the worker's timings; s.mu is held.
func (s *Sandbox) addWorkerStages(rep *wasmrt.StartReply) {
	for k, v := range rep.Stages {
		s.result.Stages[k] = time.Duration(v) * time.Microsecond
	}
}

// restore loads the snapshot into the worker.
func (s *Sandbox) restore(ctx context.Context, dir string, st *wasmrt.State, opts sandbox.RestoreOptions) error {
	req := s.startRequest()
	req.Restore = &wasmrt.RestoreRequest{Dir: dir, Mode: wasmrt.RestoreCopy}
	if s.b.cfg.EagerMmap {
		req.Restore.Mode = wasmrt.RestoreMmap
	}
	if opts.Mode != sandbox.MemoryEager {
		rc := memory.RestoreConfig{
			ID:         s.id,
			SocketPath: filepath.Join(s.w.dir, memorySock),
			MemoryFile: filepath.Join(dir, wasmrt.MemoryFile),
			Mode:       memory.Mode(opts.Mode),
			WorkingSet: opts.WorkingSet,
			ChunkPages: s.b.cfg.ChunkPages,
		}
		if opts.Mode == sandbox.MemoryPrefetch {
			rc.ChunkPages = 0 // faults outside the WS are "unique": one page each
			rc.EarlyResume = s.b.cfg.EarlyResume
		}
		t := time.Now()
		m, err := s.b.cfg.Memory.Start(ctx, rc)
		if err != nil {
			return err
		}
		s.mu.Lock()
		s.mem = m
		s.result.Stages["MemoryStart"] = time.Since(t)
		s.mu.Unlock()
		req.Restore.Mode = wasmrt.RestoreUffd
		req.Restore.UffdSocket = rc.SocketPath
	}
	t := time.Now()
	rep, err := s.w.proc.Client.Start(ctx, req)
	if err != nil {
		return s.rpcErr(err)
	}
	s.mu.Lock()
	s.result.Stages["WorkerStart"] = time.Since(t)
	s.addWorkerStages(rep)
	s.started = true
	s.mu.Unlock()
	return nil
}

// Snapshot implements sandbox.Snapshotter: between two calls into the guest
// it writes linear memory (sparse) and the state into dir; the instance
// keeps running.
func (s *Sandbox) Snapshot(ctx context.Context, dir string) error {
	s.mu.Lock()
	started, stopped := s.started, s.stopped
	s.mu.Unlock()
	if !started || stopped {
		return fmt.Errorf("wasm: snapshot sandbox %q: not running", s.id)
	}
	if _, err := s.w.proc.Client.Snapshot(ctx, dir); err != nil {
		return fmt.Errorf("wasm: snapshot sandbox %q: %w", s.id, s.rpcErr(err))
	}
	return nil
}

// RestoreStats implements sandbox.RestoreReporter: the memory manager's
// FetchState, InstallWS, ServeUnique and page counts (lazy modes), the
// worker's stages (TakeWorker, Compile, LoadMemory, Instantiate, SetState or
// Initialize) and Pages["ReadyWorker"].
func (s *Sandbox) RestoreStats() sandbox.RestoreResult {
	s.mu.Lock()
	defer s.mu.Unlock()
	r := sandbox.RestoreResult{Stages: maps.Clone(s.result.Stages), Pages: maps.Clone(s.result.Pages)}
	if s.mem != nil {
		st := s.mem.Stats()
		maps.Copy(r.Stages, st.Stages())
		maps.Copy(r.Pages, st.Pages())
	}
	return r
}

// FinishRecord implements sandbox.Recorder: the memory manager writes the
// working-set file; the instance keeps running with lazy faults.
func (s *Sandbox) FinishRecord(ctx context.Context) error {
	s.mu.Lock()
	m := s.mem
	s.mu.Unlock()
	if m == nil {
		return fmt.Errorf("wasm: finish record of %q: not restored in record mode", s.id)
	}
	if err := m.FinishRecord(ctx); err != nil {
		return fmt.Errorf("wasm: finish record of %q: %w", s.id, err)
	}
	return nil
}

// Stats implements sandbox.Sandbox from /proc/<pid>/smaps_rollup.
func (s *Sandbox) Stats(ctx context.Context) (sandbox.Stats, error) {
	select {
	case <-s.done:
		return sandbox.Stats{}, fmt.Errorf("wasm: stats of %q: it has ended", s.id)
	default:
	}
	st, err := smapsRollup(s.w.proc.Pid())
	if err != nil {
		return sandbox.Stats{}, fmt.Errorf("wasm: stats of %q: %w", s.id, err)
	}
	return st, nil
}

func smapsRollup(pid int) (sandbox.Stats, error) {
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps_rollup")
	if err != nil {
		return sandbox.Stats{}, err
	}
	defer f.Close()
	var st sandbox.Stats
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		kb, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			continue
		}
		switch fields[0] {
		case "Rss:":
			st.RSS = kb << 10
		case "Pss:":
			st.PSS = kb << 10
		}
	}
	if err := sc.Err(); err != nil {
		return st, err
	}
	if st.RSS == 0 {
		return st, fmt.Errorf("no Rss in /proc/%d/smaps_rollup", pid)
	}
	return st, nil
}

// Stop implements sandbox.Sandbox: it kills the worker (its PID, our child),
// ends the memory manager's restore and removes the directory.
func (s *Sandbox) Stop(ctx context.Context) error {
	s.mu.Lock()
	s.stopped = true
	s.mu.Unlock()
	var err error
	s.stopOnce.Do(func() { err = s.teardown() })
	return err
}

func (s *Sandbox) teardown() error {
	s.mu.Lock()
	s.stopped = true
	m := s.mem
	s.mu.Unlock()
	var errs []error
	if s.w != nil {
		errs = append(errs, s.w.kill())
	} else {
		close(s.done) // never had a worker: nothing to watch
		s.mu.Lock()
		s.exitErr = fmt.Errorf("wasm sandbox %q stopped", s.id)
		s.mu.Unlock()
	}
	if m != nil {
		if err := m.Close(); err != nil && !errors.Is(err, context.Canceled) {
			errs = append(errs, fmt.Errorf("memory restore: %w", err))
		}
	}
	if s.w != nil {
		<-s.done
	}
	s.b.release(s)
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("wasm: stop sandbox %q: %w", s.id, err)
	}
	return nil
}
