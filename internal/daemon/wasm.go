package daemon

import (
	"context"
	"fmt"
	"os"
	"path/filepath"

	"vhive.dev/vhive/internal/memory"
	wasmsb "vhive.dev/vhive/internal/sandbox/wasm"
	"vhive.dev/vhive/internal/wasm"
)

// setupWasm creates the memory manager and the wasm backend it serves.
func (d *Daemon) setupWasm(ctx context.Context) error {
	worker := d.cfg.WasmWorker
	if len(worker) == 0 {
		exe, err := os.Executable()
		if err != nil {
			return fmt.Errorf("find the vhive executable for wasm workers: %w", err)
		}
		worker = []string{exe, "internal", "wasm-worker"}
	}
	mm, err := memory.NewMetrics(d.registry)
	if err != nil {
		return err
	}
	mgr, err := memory.NewManager(memory.Config{Logger: d.log.With("component", "memory"), Metrics: mm})
	if err != nil {
		return err
	}
	d.closers = append(d.closers, func(context.Context) error { return mgr.Close() })
	be, err := wasmsb.New(ctx, wasmsb.Config{
		WorkerCommand: worker,
		Root:          filepath.Join(d.cfg.StateDir, "w"),
		CacheDir:      filepath.Join(d.cfg.StateDir, "wasm-cache"),
		Memory:        mgr,
		ChunkPages:    d.cfg.WasmChunkPages,
		EarlyResume:   !d.cfg.WasmWaitForWS,
		PoolSize:      d.cfg.WasmPoolSize,
		Logger:        d.log.With("component", "wasm"),
	})
	if err != nil {
		return err
	}
	if err := be.Cleanup(ctx); err != nil {
		be.Close()
		return fmt.Errorf("clean up wasm sandboxes of a previous run: %w", err)
	}
	d.closers = append(d.closers, func(context.Context) error { return be.Close() })
	d.backends["wasm"] = be
	d.runtimeVersions["wasm"] = wasm.RuntimeVersion()
	return nil
}
