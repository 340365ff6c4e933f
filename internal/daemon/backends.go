package daemon

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"vhive.dev/vhive/internal/api"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/orchestrator"
	"vhive.dev/vhive/internal/sandbox/oci"
	"vhive.dev/vhive/internal/snapshot"
)

// defaultSandboxes are enabled when Config.Sandboxes is empty, in order of
// preference for the default.
func defaultSandboxes() []string { return []string{"gvisor", "runc", "wasm", "microvm"} }

func cacheDir() string {
	if d := os.Getenv("VHIVE_CACHE"); d != "" {
		return d
	}
	return "/var/cache/vhive"
}

// findRunsc returns the runsc to use: the configured path, the one built by
// `make runsc`, then PATH (which on Debian is too old to restore).
func findRunsc(configured string) (string, error) {
	if configured != "" {
		if _, err := os.Stat(configured); err != nil {
			return "", fmt.Errorf("runsc %q: %w", configured, err)
		}
		return configured, nil
	}
	p := filepath.Join(cacheDir(), "bin", "runsc")
	if _, err := os.Stat(p); err == nil {
		return p, nil
	}
	return exec.LookPath("runsc")
}

func findRunc(configured string) (string, error) {
	if configured != "" {
		if _, err := os.Stat(configured); err != nil {
			return "", fmt.Errorf("runc %q: %w", configured, err)
		}
		return configured, nil
	}
	return exec.LookPath("runc")
}

// setupBackends creates the sandbox backends that are enabled and whose
// tools exist, cleaning up what a previous daemon run left behind. A backend
// named explicitly in Config.Sandboxes that cannot start is an error; a
// default one is skipped with a warning.
func (d *Daemon) setupBackends(ctx context.Context) error {
	names := d.cfg.Sandboxes
	explicit := len(names) > 0
	if !explicit {
		names = defaultSandboxes()
	}
	d.cfg.Sandboxes = names
	want := map[string]bool{}
	for _, n := range names {
		switch n {
		case "gvisor", "runc", "wasm", "microvm":
			want[n] = true
		default:
			return fmt.Errorf("unknown sandbox %q (gvisor, runc, wasm, microvm)", n)
		}
	}
	skip := func(name string, err error) error {
		if explicit {
			return fmt.Errorf("sandbox %s: %w", name, err)
		}
		d.log.Warn("sandbox backend not available", "sandbox", name, "err", err)
		return nil
	}

	if want["gvisor"] || want["runc"] || want["microvm"] {
		prefix := d.cfg.NetPrefix
		if err := netpool.Cleanup(ctx, prefix); err != nil {
			return fmt.Errorf("clean up network namespaces of a previous run: %w", err)
		}
		opts := netpool.Options{Size: d.cfg.NetPoolSize, Prefix: prefix, Subnet: d.cfg.Subnet, Logger: d.log.With("component", "netpool"),
			// With the CRI on, pods' queue-proxies dial the functions.
			AllowForward: d.cfg.CRI.Socket != ""}
		pool, err := netpool.New(ctx, opts)
		if err != nil {
			return fmt.Errorf("network pool: %w", err)
		}
		d.net = pool
		d.closers = append(d.closers, pool.Close)
	}
	for _, rt := range []string{"gvisor", "runc"} {
		if !want[rt] {
			continue
		}
		var bin string
		var err error
		if rt == "gvisor" {
			bin, err = findRunsc(d.cfg.RunscPath)
		} else {
			bin, err = findRunc(d.cfg.RuncPath)
		}
		if err != nil {
			if err := skip(rt, err); err != nil {
				return err
			}
			continue
		}
		be, err := oci.New(ctx, oci.Config{Runtime: rt, Binary: bin, Root: filepath.Join(d.cfg.StateDir, "sandboxes", rt),
			NetPool: d.net, Logger: d.log.With("component", rt)})
		if err != nil {
			if err := skip(rt, err); err != nil {
				return err
			}
			continue
		}
		if err := be.Cleanup(ctx); err != nil {
			return fmt.Errorf("clean up %s sandboxes of a previous run: %w", rt, err)
		}
		d.backends[rt] = be
		d.runtimeVersions[rt] = toolVersion(ctx, bin)
		d.closers = append(d.closers, be.Cleanup)
	}
	if want["wasm"] {
		if err := d.setupWasm(ctx); err != nil {
			if err := skip("wasm", err); err != nil {
				return err
			}
		}
	}
	if want["microvm"] {
		if err := d.setupMicroVM(ctx); err != nil {
			if err := skip("microvm", err); err != nil {
				return err
			}
		}
	}
	if len(d.backends) == 0 {
		return errors.New("no sandbox backend is available (install runc, run `make runsc`, or enable wasm)")
	}
	return nil
}

// toolVersion returns the first line of `bin --version`.
func toolVersion(ctx context.Context, bin string) string {
	out, err := exec.CommandContext(ctx, bin, "--version").Output()
	if err != nil {
		return "unknown"
	}
	line, _, _ := strings.Cut(string(out), "\n")
	return strings.TrimSpace(line)
}

func (d *Daemon) setupSnapshots() error {
	infos := map[string]snapshot.BackendInfo{}
	for name, be := range d.backends {
		caps := be.Capabilities()
		if !caps.Snapshot {
			continue
		}
		bi := snapshot.BackendInfo{RuntimeVersion: d.runtimeVersions[name], Modes: []string{orchestrator.ModeSnapshot}, Restore: "lazy"}
		if caps.EagerRestore {
			bi.Restore = "eager"
		}
		if caps.LazyMemory {
			bi.Modes = append(bi.Modes, orchestrator.ModeLazy)
		}
		if caps.REAP {
			bi.Modes = append(bi.Modes, orchestrator.ModeReap)
		}
		infos[name] = bi
	}
	if len(infos) == 0 {
		return nil
	}
	st, err := snapshot.New(snapshot.Options{Root: filepath.Join(d.cfg.StateDir, "snapshots"), Backends: infos, Logger: d.log.With("component", "snapshot")})
	if err != nil {
		return err
	}
	d.snaps = st
	return nil
}

func (d *Daemon) snapshotStore() orchestrator.SnapshotStore {
	if d.snaps == nil {
		return nil
	}
	return d.snaps
}

func (d *Daemon) snapshotAdmin() api.Snapshots {
	if d.snaps == nil {
		return nil
	}
	return d.snaps
}
