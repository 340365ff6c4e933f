// Package daemon wires the vhive node daemon together: state store, image
// service, network pool, sandbox backends, memory manager, snapshot store,
// orchestrator and the gRPC servers (control socket, data-plane gateway,
// optional metrics endpoint). It owns the start-up and shutdown order.
package daemon

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	"google.golang.org/grpc"

	"vhive.dev/vhive/internal/api"
	"vhive.dev/vhive/internal/cri"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/orchestrator"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/snapshot"
	"vhive.dev/vhive/internal/store"
)

// Config configures the daemon. Zero values take the documented defaults.
type Config struct {
	// StateDir holds the state database, images, snapshots and sandbox
	// state. Default /var/lib/vhive.
	StateDir string
	// Socket is the control socket, created 0600. Default /run/vhive/vhive.sock.
	Socket string
	// ControlTCP optionally also serves the control API on a TCP address.
	// Off by default. Every call on it must carry the token of
	// ControlTokenFile (else Unauthenticated); without a token file the
	// daemon refuses to start unless ControlTCPInsecure is set.
	ControlTCP string
	// ControlTokenFile holds the control token for ControlTCP (mode 0600 or
	// stricter, at least 16 printable characters).
	ControlTokenFile string
	// ControlTCPInsecure allows ControlTCP without a token: anyone who can
	// reach the address drives the daemon (root on this node).
	ControlTCPInsecure bool
	// Gateway serves the data plane (FwdGreeter; any gRPC method or HTTP
	// request relayed to the function named by :authority / Host).
	// Default 127.0.0.1:3334 (vHive's FwdGreeter port). "off" disables it.
	Gateway string
	// Metrics serves Prometheus /metrics over HTTP; off when empty.
	Metrics string

	// Sandboxes to enable; default gvisor, runc, wasm, microvm (those whose tools
	// are present). The first is the default sandbox unless DefaultSandbox
	// is set.
	Sandboxes      []string
	DefaultSandbox string
	RunscPath      string // default $VHIVE_CACHE/bin/runsc, then PATH
	RuncPath       string // default from PATH
	// WasmWorker is the argv prefix that starts a wasm sandbox worker.
	// Default: this executable with "internal wasm-worker".
	WasmWorker []string
	// MicroVMAccel is the microvm sandbox's accelerator: auto (default: kvm
	// where /dev/kvm runs Linux guests, else tcg), kvm or tcg.
	MicroVMAccel string
	// WasmPoolSize is how many ready wasm workers are kept per module
	// (compiled module loaded, waiting for an instance). 0: none.
	WasmPoolSize int
	// WasmChunkPages is how many pages the memory manager installs per
	// fault in lazy and record restores (1: pure lazy).
	WasmChunkPages int
	// WasmWaitForWS makes REAP wasm restores install the whole working
	// set before the guest runs (vHive's order: load, prefetch, resume).
	// By default the guest resumes as soon as the memory manager has its
	// handshake and runs while the working set streams in
	// (wasm.Config.EarlyResume), faster here (docs/benchmarks/wasm.md).
	WasmWaitForWS bool
	// NetPoolSize is how many network namespaces are prepared ahead
	// (vHive's -netPoolSize). Default 4.
	NetPoolSize int
	// Subnet the instance addresses are carved from (inside the daemon's
	// own namespaces only). Default 10.168.0.0/16.
	Subnet netip.Prefix
	// NetPrefix names the daemon's network namespaces and veths
	// ("<prefix>-<n>"); leftovers with this prefix are removed at start.
	// Default "vh".
	NetPrefix string

	DefaultKeepalive    time.Duration
	DefaultMaxInstances int
	DefaultStartMode    string
	MaxPayload          int
	ReadyTimeout        time.Duration
	QueueTimeout        time.Duration

	// CRI enables the CRI server for kubelet (off by default).
	CRI CRIConfig

	Logger *slog.Logger
}

func (c *Config) setDefaults() {
	if c.StateDir == "" {
		c.StateDir = "/var/lib/vhive"
	}
	if c.Socket == "" {
		c.Socket = "/run/vhive/vhive.sock"
	}
	if c.Gateway == "" {
		c.Gateway = "127.0.0.1:3334"
	}
	if c.NetPoolSize == 0 {
		c.NetPoolSize = 4
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
}

// Daemon is a running vhive node.
type Daemon struct {
	cfg      Config
	log      *slog.Logger
	store    *store.Store
	images   *image.Service
	net      *netpool.Pool
	backends map[string]sandbox.Backend
	// runtimeVersions by backend, recorded in snapshots.
	runtimeVersions map[string]string
	snaps           *snapshot.Store
	cri             *cri.Server
	orch            *orchestrator.Orchestrator
	registry        *prometheus.Registry
	api             *api.Server
	tcpAuth         *api.TokenAuth                // nil: TCP control API without a token
	closers         []func(context.Context) error // run in reverse order on shutdown
	closeOnce       sync.Once
}

// New builds a daemon: opens the state, cleans up what a previous run left
// behind, and prepares every component. Nothing listens until Serve. On
// error everything already opened is closed again.
func New(ctx context.Context, cfg Config) (_ *Daemon, retErr error) {
	cfg.setDefaults()
	d := &Daemon{cfg: cfg, log: cfg.Logger, backends: map[string]sandbox.Backend{}, runtimeVersions: map[string]string{}, registry: prometheus.NewRegistry()}
	defer func() {
		if retErr != nil {
			d.close(context.Background())
		}
	}()
	if err := d.setupControlAuth(); err != nil {
		return nil, err
	}
	d.registry.MustRegister(collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))

	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return nil, fmt.Errorf("state dir: %w", err)
	}
	st, err := store.Open(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	d.store = st
	d.closers = append(d.closers, func(context.Context) error { return st.Close() })

	var orchRef *orchestrator.Orchestrator
	imgs, err := image.New(ctx, image.Options{
		Root:   filepath.Join(cfg.StateDir, "images"),
		Logger: d.log.With("component", "image"),
		InUse: func(digest string) image.Users {
			if orchRef == nil {
				return image.Users{}
			}
			return image.Users{Functions: orchRef.FunctionsUsingImage(digest)}
		},
	})
	if err != nil {
		return nil, fmt.Errorf("image service: %w", err)
	}
	d.images = imgs
	d.closers = append(d.closers, func(context.Context) error { return imgs.Close() })

	if err := d.setupBackends(ctx); err != nil {
		return nil, err
	}
	if err := d.recover(ctx); err != nil {
		return nil, err
	}
	if err := d.setupSnapshots(); err != nil {
		return nil, err
	}
	if err := d.pruneSnapshots(ctx); err != nil {
		return nil, err
	}

	metrics, err := orchestrator.NewMetrics(d.registry)
	if err != nil {
		return nil, err
	}
	def := cfg.DefaultSandbox
	if def == "" {
		for _, n := range cfg.Sandboxes {
			if _, ok := d.backends[n]; ok {
				def = n
				break
			}
		}
	}
	orch, err := orchestrator.New(ctx, orchestrator.Config{
		Backends: d.backends, Images: imageResolver{imgs}, Store: st, Logger: d.log.With("component", "orchestrator"),
		Metrics: metrics, DefaultSandbox: def, DefaultKeepalive: cfg.DefaultKeepalive, DefaultMaxInstances: cfg.DefaultMaxInstances,
		DefaultStartMode: cfg.DefaultStartMode, MaxPayload: cfg.MaxPayload, ReadyTimeout: cfg.ReadyTimeout, QueueTimeout: cfg.QueueTimeout,
		Snapshots: d.snapshotStore(),
	})
	if err != nil {
		return nil, fmt.Errorf("orchestrator: %w", err)
	}
	orchRef = orch
	d.orch = orch
	d.closers = append(d.closers, orch.Close)

	if err := d.setupCRI(ctx); err != nil {
		return nil, err
	}
	srv, err := api.New(orch, imgs, d.snapshotAdmin(), d.log.With("component", "api"))
	if err != nil {
		return nil, err
	}
	d.api = srv
	return d, nil
}

// setupControlAuth checks the control API options and reads the token.
func (d *Daemon) setupControlAuth() error {
	if strings.Contains(d.cfg.Socket, "://") {
		return fmt.Errorf("control socket %q: the daemon's --socket is a unix socket path (serve TCP with --control-tcp)", d.cfg.Socket)
	}
	if d.cfg.ControlTokenFile != "" {
		if d.cfg.ControlTCP == "" {
			return fmt.Errorf("control token file %s given without --control-tcp (the unix socket is guarded by its 0600 mode)", d.cfg.ControlTokenFile)
		}
		tok, err := api.ReadTokenFile(d.cfg.ControlTokenFile)
		if err != nil {
			return err
		}
		if d.tcpAuth, err = api.NewTokenAuth(tok); err != nil {
			return err
		}
		return nil
	}
	if d.cfg.ControlTCP != "" && !d.cfg.ControlTCPInsecure {
		return fmt.Errorf("control API on TCP %s needs a token: pass --control-token-file (or --control-tcp-insecure to serve it to anyone who can connect)", d.cfg.ControlTCP)
	}
	return nil
}

// recover removes instances a previous daemon run left behind: every
// backend cleans up by its own naming, the netpool by prefix, and the
// instance records are reported and forgotten.
func (d *Daemon) recover(ctx context.Context) error {
	recs, err := d.store.Instances()
	if err != nil {
		return err
	}
	for _, r := range recs {
		d.log.Warn("cleaning up instance left by a previous daemon run", "instance", r.ID, "function", r.Function, "sandbox", r.Sandbox)
		if err := d.store.DeleteInstance(r.ID); err != nil {
			return err
		}
	}
	return nil
}

// pruneSnapshots removes the snapshots of functions that are not deployed:
// a removal interrupted by a crash deletes the function record first.
func (d *Daemon) pruneSnapshots(ctx context.Context) error {
	if d.snaps == nil {
		return nil
	}
	fns, err := d.store.Functions()
	if err != nil {
		return err
	}
	deployed := map[string]bool{}
	for _, f := range fns {
		deployed[f.Name] = true
	}
	removed, err := d.snaps.Prune(ctx, func(fn string) bool { return deployed[fn] })
	if len(removed) > 0 {
		d.log.Warn("removed snapshots of functions that are not deployed (an interrupted removal)", "snapshots", removed)
	}
	if err != nil {
		return fmt.Errorf("prune snapshots: %w", err)
	}
	return nil
}

// Orchestrator exposes the orchestrator (for the CRI server and tests).
func (d *Daemon) Orchestrator() *orchestrator.Orchestrator { return d.orch }

// Images exposes the image service.
func (d *Daemon) Images() *image.Service { return d.images }

// Serve listens on the control socket, the gateway and the metrics address,
// and serves until ctx is cancelled; then it shuts everything down in
// reverse order of start-up.
func (d *Daemon) Serve(ctx context.Context) error {
	defer d.close(context.Background())
	ctrl := grpc.NewServer()
	d.api.RegisterControl(ctrl)
	gw := d.api.NewGateway()

	if err := os.MkdirAll(filepath.Dir(d.cfg.Socket), 0o755); err != nil {
		return fmt.Errorf("control socket dir: %w", err)
	}
	if err := removeStaleSocket(d.cfg.Socket); err != nil {
		return err
	}
	// The socket is created 0600: only root may drive the daemon.
	old := umask(0o177)
	lis, err := net.Listen("unix", d.cfg.Socket)
	umask(old)
	if err != nil {
		return fmt.Errorf("listen on control socket %s: %w", d.cfg.Socket, err)
	}
	if err := os.Chmod(d.cfg.Socket, 0o600); err != nil {
		lis.Close()
		return err
	}

	errc := make(chan error, 4)
	var wg sync.WaitGroup
	serve := func(name string, fn func() error) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := fn(); err != nil && !errors.Is(err, grpc.ErrServerStopped) && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("%s: %w", name, err)
			}
		}()
	}
	serve("control socket", func() error { return ctrl.Serve(lis) })
	d.log.Info("control API listening", "socket", d.cfg.Socket)

	// The TCP control API is a server of its own: its calls pass the token
	// check, the unix socket's do not need to.
	var ctrlTCP *grpc.Server
	if d.cfg.ControlTCP != "" {
		tcpLis, err := net.Listen("tcp", d.cfg.ControlTCP)
		if err != nil {
			ctrl.Stop()
			return fmt.Errorf("listen on control TCP %s: %w", d.cfg.ControlTCP, err)
		}
		var opts []grpc.ServerOption
		if d.tcpAuth != nil {
			opts = d.tcpAuth.ServerOptions()
		}
		ctrlTCP = grpc.NewServer(opts...)
		d.api.RegisterControl(ctrlTCP)
		serve("control TCP", func() error { return ctrlTCP.Serve(tcpLis) })
		if d.tcpAuth != nil {
			d.log.Info("control API also listening on TCP (token required)", "addr", tcpLis.Addr().String())
		} else {
			d.log.Warn("control API also listening on TCP WITHOUT authentication (--control-tcp-insecure)", "addr", tcpLis.Addr().String())
		}
	}
	stopAll := func() {
		ctrl.Stop()
		if ctrlTCP != nil {
			ctrlTCP.Stop()
		}
	}
	if d.cfg.Gateway != "off" {
		gl, err := net.Listen("tcp", d.cfg.Gateway)
		if err != nil {
			stopAll()
			return fmt.Errorf("listen on gateway %s: %w", d.cfg.Gateway, err)
		}
		serve("gateway", func() error { return gw.Serve(gl) })
		d.log.Info("data plane listening (FwdGreeter; any gRPC method or HTTP request relayed by :authority/Host)", "addr", gl.Addr().String())
	}
	if d.cri != nil {
		cl, err := cri.Listen(d.cfg.CRI.Socket)
		if err != nil {
			stopAll()
			gw.Stop()
			return fmt.Errorf("listen on CRI socket %s: %w", d.cfg.CRI.Socket, err)
		}
		serve("CRI", func() error { return d.cri.Serve(ctx, cl) })
		d.log.Info("CRI listening", "socket", d.cfg.CRI.Socket, "containerd", d.cfg.CRI.Containerd)
	}
	var hs *http.Server
	if d.cfg.Metrics != "" {
		ml, err := net.Listen("tcp", d.cfg.Metrics)
		if err != nil {
			stopAll()
			gw.Stop()
			return fmt.Errorf("listen on metrics %s: %w", d.cfg.Metrics, err)
		}
		mux := http.NewServeMux()
		mux.Handle("/metrics", promhttp.HandlerFor(d.registry, promhttp.HandlerOpts{Registry: d.registry}))
		hs = &http.Server{Handler: mux, ReadHeaderTimeout: 5 * time.Second}
		serve("metrics", func() error { return hs.Serve(ml) })
		d.log.Info("metrics listening", "addr", ml.Addr().String()+"/metrics")
	}

	var runErr error
	select {
	case <-ctx.Done():
		d.log.Info("shutting down")
	case runErr = <-errc:
		d.log.Error("server failed; shutting down", "err", runErr)
	}
	stopped := make(chan struct{})
	go func() {
		gw.GracefulStop()
		ctrl.GracefulStop()
		if ctrlTCP != nil {
			ctrlTCP.GracefulStop()
		}
		close(stopped)
	}()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		gw.Stop()
		stopAll()
	}
	if hs != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		_ = hs.Shutdown(sctx)
		cancel()
	}
	wg.Wait()
	os.Remove(d.cfg.Socket)
	return runErr
}

// close releases every component in reverse order of creation.
func (d *Daemon) close(ctx context.Context) {
	d.closeOnce.Do(func() {
		for _, c := range slices.Backward(d.closers) {
			if err := c(ctx); err != nil {
				d.log.Warn("shutdown", "err", err)
			}
		}
	})
}

func removeStaleSocket(path string) error {
	if _, err := os.Stat(path); errors.Is(err, os.ErrNotExist) {
		return nil
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("control socket %s is in use: another vhive daemon is running", path)
	}
	return os.Remove(path)
}

// imageResolver adapts the image service to the orchestrator.
type imageResolver struct{ s *image.Service }

func (r imageResolver) Resolve(ctx context.Context, ref string) (orchestrator.Image, error) {
	img, err := r.s.Get(ctx, ref)
	if errors.Is(err, image.ErrNotFound) {
		img, err = r.s.Pull(ctx, ref)
	}
	if err != nil {
		return orchestrator.Image{}, err
	}
	return orchestrator.Image{Ref: img.Ref, Digest: img.Digest, Rootfs: img.Rootfs, Kind: img.Kind, WasmModule: img.WasmModule,
		Entrypoint: img.Config.Entrypoint, Cmd: img.Config.Cmd, Env: img.Config.Env, WorkingDir: img.Config.WorkingDir, User: img.Config.User,
		Labels: img.Config.Labels}, nil
}
