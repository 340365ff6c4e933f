package wasm

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	wasmrt "vhive.dev/vhive/internal/wasm"
)

const (
	pidFile     = "worker.pid"
	controlSock = "control.sock"
	greeterSock = "greeter.sock"
	memorySock  = "memory.sock"
	stderrFile  = "stderr.log"
)

// backgroundNice is the nice value of pool workers until they are taken:
// refills run while cold starts are measured on few cores.
const backgroundNice = 15

// worker is a spawned worker process and its directory.
type worker struct {
	dir  string
	proc *wasmrt.WorkerProcess
}

// kill ends the worker (by its PID, our child) and removes its directory.
func (w *worker) kill() error {
	w.proc.Kill()
	if err := os.RemoveAll(w.dir); err != nil {
		return fmt.Errorf("remove worker directory: %w", err)
	}
	return nil
}

// spawn starts a worker for mod in a new directory under Root.
func (b *Backend) spawn(ctx context.Context, mod *module, preloadBoot, preloadRestore, background bool) (_ *worker, retErr error) {
	dir, err := os.MkdirTemp(b.cfg.Root, "w")
	if err != nil {
		return nil, fmt.Errorf("create worker directory: %w", err)
	}
	b.mu.Lock()
	b.owned[dir] = true
	b.mu.Unlock()
	defer func() {
		if retErr != nil {
			b.mu.Lock()
			delete(b.owned, dir)
			b.mu.Unlock()
			os.RemoveAll(dir)
		}
	}()
	ctx, cancel := context.WithTimeout(ctx, b.cfg.StartTimeout)
	defer cancel()
	o := wasmrt.WorkerOptions{
		ControlSocket:  filepath.Join(dir, controlSock),
		ModuleDir:      mod.dir,
		CompileCache:   b.cfg.CompileCacheDir,
		PreloadBoot:    preloadBoot,
		PreloadRestore: preloadRestore,
	}
	sc := wasmrt.SpawnConfig{Command: b.cfg.WorkerCommand, Env: b.cfg.WorkerEnv, StderrPath: filepath.Join(dir, stderrFile)}
	if background {
		sc.Nice = backgroundNice
	}
	p, err := wasmrt.SpawnWorker(ctx, sc, o)
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(filepath.Join(dir, pidFile), []byte(strconv.Itoa(p.Pid())+"\n"), 0o600); err != nil {
		p.Kill()
		return nil, fmt.Errorf("write worker pid file: %w", err)
	}
	return &worker{dir: dir, proc: p}, nil
}

// pool keeps ready workers of one module, both modules compiled.
type pool struct {
	mod      *module
	ready    []*worker
	spawning int
}

// takeWorker returns a ready worker from the module's pool if there is one
// (true), else spawns one now compiling only what this start needs. The
// caller tops the pool up (refill) once its instance runs, so that the
// refill's process start does not compete with the cold start.
func (b *Backend) takeWorker(ctx context.Context, mod *module, restore bool) (*worker, bool, error) {
	var w *worker
	if b.cfg.PoolSize > 0 {
		b.mu.Lock()
		p := b.pools[mod.info.Digest]
		if p == nil {
			p = &pool{mod: mod}
			b.pools[mod.info.Digest] = p
		}
		for len(p.ready) > 0 && w == nil {
			w = p.ready[len(p.ready)-1]
			p.ready = p.ready[:len(p.ready)-1]
			if w.proc.Err() != nil { // died while idle
				b.log.Warn("discarding dead pooled wasm worker", "err", w.proc.Err())
				delete(b.owned, w.dir)
				go w.kill()
				w = nil
			}
		}
		b.mu.Unlock()
	}
	if w != nil {
		if err := w.proc.SetNice(0); err != nil {
			b.log.Warn("pooled wasm worker keeps its background priority", "err", err)
		}
		return w, true, nil
	}
	w, err := b.spawn(ctx, mod, !restore, restore, false)
	if err != nil {
		return nil, false, err
	}
	return w, false, nil
}

// refill tops up the module's pool in the background, after
// Config.RefillDelay.
func (b *Backend) refill(mod *module) {
	if b.cfg.PoolSize == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	p := b.pools[mod.info.Digest]
	if p == nil || b.closed {
		return
	}
	if b.cfg.RefillDelay < 0 {
		b.refillLocked(p)
		return
	}
	b.wg.Add(1)
	go func() {
		defer b.wg.Done()
		select {
		case <-b.ctx.Done():
			return
		case <-time.After(b.cfg.RefillDelay):
		}
		b.mu.Lock()
		defer b.mu.Unlock()
		b.refillLocked(p)
	}()
}

// maxRefillSpawns bounds the background spawns of one pool at a time: a
// worker start loads (or, the first time, compiles) the module, ≈ 0.1–1 s
// of CPU, and a pool of 16 filled all at once would starve the cold starts
// it is meant to speed up on a small machine.
const maxRefillSpawns = 2

// refillLocked starts background spawns until ready+spawning reaches
// PoolSize, at most maxRefillSpawns at a time (each finished spawn starts
// the next). b.mu is held.
func (b *Backend) refillLocked(p *pool) {
	if b.closed {
		return
	}
	for len(p.ready)+p.spawning < b.cfg.PoolSize && p.spawning < maxRefillSpawns {
		p.spawning++
		b.wg.Add(1)
		go func() {
			defer b.wg.Done()
			w, err := b.spawn(b.ctx, p.mod, true, true, true)
			b.mu.Lock()
			defer b.mu.Unlock()
			p.spawning--
			if err != nil {
				if b.ctx.Err() == nil { // not a shutdown
					b.log.Warn("pre-spawning a wasm worker failed", "module", p.mod.info.Digest, "err", err)
				}
				return
			}
			if b.closed || b.pools[p.mod.info.Digest] != p {
				delete(b.owned, w.dir)
				go w.kill()
				return
			}
			p.ready = append(p.ready, w)
			b.refillLocked(p)
		}()
	}
}

// Warm creates the pool of the module at modulePath (if PoolSize > 0) so that
// the first cold start finds a ready worker, and waits until it is full or
// ctx ends.
func (b *Backend) Warm(ctx context.Context, modulePath string) error {
	mod, err := b.module(modulePath)
	if err != nil {
		return fmt.Errorf("wasm: warm %s: %w", modulePath, err)
	}
	if b.cfg.PoolSize == 0 {
		return nil
	}
	for {
		b.mu.Lock()
		p := b.pools[mod.info.Digest]
		if p == nil {
			p = &pool{mod: mod}
			b.pools[mod.info.Digest] = p
		}
		b.refillLocked(p)
		full := len(p.ready) >= b.cfg.PoolSize
		b.mu.Unlock()
		if full {
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wasm: warm %s: %w", modulePath, ctx.Err())
		case <-b.ctx.Done():
			return fmt.Errorf("wasm: warm %s: backend closed", modulePath)
		case <-time.After(10 * time.Millisecond):
		}
	}
}

// drain kills the pool's idle workers.
func (p *pool) drain(b *Backend) {
	b.mu.Lock()
	ready := p.ready
	p.ready = nil
	for _, w := range ready {
		delete(b.owned, w.dir)
	}
	b.mu.Unlock()
	for _, w := range ready {
		_ = w.kill()
	}
}
