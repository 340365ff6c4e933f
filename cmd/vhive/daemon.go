package main

import (
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"strings"
	"time"

	"github.com/spf13/cobra"

	"vhive.dev/vhive/internal/daemon"
)

func newDaemonCmd(g *globalOpts) *cobra.Command {
	var (
		cfg       daemon.Config
		sandboxes string
		logLevel  string
		logJSON   bool
		subnet    string
		criArgs   string
		mirrors   []string
		wasmEarly bool
	)
	cmd := &cobra.Command{
		Use:   "daemon",
		Short: "Run the vhive node daemon",
		Long: `Run the vhive node daemon: it keeps deployed functions in --state-dir, starts
sandboxes for them on demand, and serves the control API on --socket (0600) and
the data plane (vHive's FwdGreeter and a Greeter gateway routed by :authority)
on --gateway. Stop it with SIGINT or SIGTERM: instances are stopped and
everything they held is released; deployed functions remain.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			var lvl slog.Level
			if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
				return fmt.Errorf("--log-level %q: %w", logLevel, err)
			}
			opts := &slog.HandlerOptions{Level: lvl}
			var h slog.Handler = slog.NewTextHandler(os.Stderr, opts)
			if logJSON {
				h = slog.NewJSONHandler(os.Stderr, opts)
			}
			cfg.Logger = slog.New(h)
			cfg.Socket = g.socket
			if subnet != "" {
				p, err := netip.ParsePrefix(subnet)
				if err != nil {
					return fmt.Errorf("--subnet %q: %w", subnet, err)
				}
				cfg.Subnet = p
			}
			if criArgs != "" {
				cfg.CRI.OCIRuntimeArgs = strings.Split(criArgs, ",")
			}
			for _, kv := range mirrors {
				host, mirror, ok := strings.Cut(kv, "=")
				if !ok || host == "" || mirror == "" {
					return fmt.Errorf("--cri-mirror %q: want HOST=MIRROR", kv)
				}
				if cfg.CRI.Mirrors == nil {
					cfg.CRI.Mirrors = map[string]string{}
				}
				cfg.CRI.Mirrors[host] = mirror
			}
			if sandboxes != "" {
				cfg.Sandboxes = strings.Split(sandboxes, ",")
			}
			cfg.WasmWaitForWS = !wasmEarly
			d, err := daemon.New(cmd.Context(), cfg)
			if err != nil {
				return err
			}
			return d.Serve(cmd.Context())
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.StateDir, "state-dir", "/var/lib/vhive", "directory for functions, images, snapshots and sandbox state")
	f.StringVar(&cfg.ControlTCP, "control-tcp", "", "also serve the control API on this TCP address, e.g. 127.0.0.1:3335 (off by default; needs --control-token-file)")
	f.StringVar(&cfg.ControlTokenFile, "control-token-file", "", "file (mode 0600, at least 16 printable characters) holding the token every --control-tcp call must carry")
	f.BoolVar(&cfg.ControlTCPInsecure, "control-tcp-insecure", false, "serve --control-tcp without a token: anyone who can connect controls the daemon")
	f.StringVar(&cfg.Gateway, "gateway", "127.0.0.1:3334", `data-plane address (FwdGreeter + Greeter by :authority); "off" disables`)
	f.StringVar(&cfg.Metrics, "metrics", "", "serve Prometheus /metrics on this address (off by default), e.g. 127.0.0.1:9090")
	f.StringVar(&sandboxes, "sandboxes", "", "comma-separated sandboxes to enable (default gvisor,runc,wasm,microvm: those whose tools are present; microvm needs `make microvm`)")
	f.StringVar(&cfg.DefaultSandbox, "default-sandbox", "", "sandbox for functions deployed without --sandbox (default: first enabled)")
	f.StringVar(&cfg.RunscPath, "runsc", "", "runsc binary (default $VHIVE_CACHE/bin/runsc, built by `make runsc`)")
	f.StringVar(&cfg.RuncPath, "runc", "", "runc binary (default from PATH)")
	f.IntVar(&cfg.NetPoolSize, "net-pool-size", 4, "network namespaces prepared ahead (vHive's -netPoolSize)")
	f.StringVar(&subnet, "subnet", "10.168.0.0/16", "IPv4 subnet for instance addresses (used only inside the daemon's own network namespaces)")
	f.StringVar(&cfg.NetPrefix, "net-prefix", "vh", "name prefix of the daemon's network namespaces and veths (at most 8 characters)")
	f.DurationVar(&cfg.DefaultKeepalive, "keepalive", 10*time.Minute, "default idle time before an instance stops")
	f.IntVar(&cfg.DefaultMaxInstances, "max-instances", 16, "default cap on instances per function")
	f.StringVar(&cfg.DefaultStartMode, "start-mode", "boot", "default start mode: boot, snapshot, lazy, reap")
	f.IntVar(&cfg.MaxPayload, "max-payload", 1<<20, "largest accepted invocation payload in bytes")
	f.DurationVar(&cfg.ReadyTimeout, "ready-timeout", 30*time.Second, "how long a new instance may take to listen")
	f.DurationVar(&cfg.QueueTimeout, "queue-timeout", 60*time.Second, "how long a request waits for an instance at max-instances")
	f.StringVar(&cfg.MicroVMAccel, "microvm-accel", "auto", "microvm accelerator: auto (kvm where /dev/kvm runs Linux guests, else tcg; the choice and its reason are logged), kvm or tcg")
	f.IntVar(&cfg.WasmPoolSize, "wasm-pool", 1, "ready wasm workers kept per module (0: every cold start spawns and loads the module)")
	f.IntVar(&cfg.WasmChunkPages, "wasm-chunk-pages", 1, "pages installed per fault in lazy/record wasm restores (1: pure lazy, as REAP's baseline)")
	f.BoolVar(&wasmEarly, "wasm-early-resume", true, "REAP wasm restores: run the guest while its working set streams in (a fault on a page not installed yet waits for its chunk); false: install the whole set first, vHive's order")
	f.StringVar(&cfg.CRI.Socket, "cri-socket", "", "serve the Kubernetes CRI on this unix socket (off by default), e.g. /run/vhive/cri.sock")
	f.StringVar(&cfg.CRI.Containerd, "cri-containerd", "/run/containerd/containerd.sock", "stock containerd CRI socket for everything vhive does not run")
	f.StringVar(&cfg.CRI.Handler, "cri-handler", "vhive", "runtime handler (RuntimeClass) whose pods run every container in vhive")
	f.StringVar(&cfg.CRI.OCIRuntime, "cri-oci-runtime", "runc", `OCI runtime for the containers of --cri-handler pods (runc or a runsc path; "none" disables the handler)`)
	f.StringVar(&criArgs, "cri-oci-runtime-args", "", "comma-separated global flags for --cri-oci-runtime (e.g. --network=host,--platform=systrap for runsc)")
	f.StringVar(&cfg.CRI.FunctionSandbox, "cri-function-sandbox", "gvisor", `sandbox for Knative user-containers (GUEST_IMAGE): gvisor, runc, microvm (enabled in --sandboxes), or "none" to proxy them to containerd`)
	f.StringArrayVar(&mirrors, "cri-mirror", nil, `registry mirror HOST=MIRROR for images vhive pulls for the CRI ("*" matches every host; repeatable)`)
	f.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	f.BoolVar(&logJSON, "log-json", false, "log as JSON")
	return cmd
}
