// Command vhive-cri serves vhive's CRI (internal/cri) on its own, for critest
// and the kubelet end-to-end test, until the daemon (cmd/vhive --cri-socket)
// wires the same server. It builds the real components: the image service,
// a netpool and the oci sandbox backend for Knative user-containers, and
// runc (or runsc) for the containers of `vhive` runtime-handler pods.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net/netip"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"vhive.dev/vhive/internal/cri"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox/oci"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vhive-cri:", err)
		os.Exit(1)
	}
}

func run() error {
	socket := flag.String("socket", "/run/vhive/cri.sock", "CRI socket to serve")
	containerd := flag.String("containerd", "/run/vhive-critest/containerd/containerd.sock", "stock containerd CRI socket")
	state := flag.String("state", "/var/lib/vhive-cri", "state directory")
	handler := flag.String("handler", cri.DefaultHandler, "runtime handler whose pods run in vhive")
	ociRuntime := flag.String("oci-runtime", "runc", "runtime for vhive-handler pods (runc or a runsc path)")
	ociArgs := flag.String("oci-runtime-args", "", "comma-separated global flags for -oci-runtime")
	fnRuntime := flag.String("function-runtime", "gvisor", "sandbox backend for user-container functions: gvisor, runc or none")
	runsc := flag.String("runsc", "/var/cache/vhive/bin/runsc", "runsc binary for -function-runtime gvisor")
	mirrors := flag.String("mirrors", "", "registry mirrors host=mirror,... (\"*\" matches all) for images vhive pulls itself")
	insecure := flag.String("insecure-registries", "", "comma-separated plain-HTTP registries")
	netPrefix := flag.String("net-prefix", "vhcri", "netpool name prefix for function sandboxes")
	netSubnet := flag.String("net-subnet", "10.169.0.0/16", "netpool subnet for function sandboxes")
	flag.Parse()

	log := slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelInfo}))
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()

	imgs, err := image.New(ctx, image.Options{Root: filepath.Join(*state, "images"), Logger: log, InsecureRegistries: split(*insecure)})
	if err != nil {
		return err
	}
	defer imgs.Close()
	cfg := cri.Config{
		StateDir:           filepath.Join(*state, "cri"),
		ContainerdEndpoint: *containerd,
		RuntimeHandler:     *handler,
		Images:             imgs,
		OCIRuntime:         *ociRuntime,
		OCIRuntimeArgs:     split(*ociArgs),
		RegistryMirrors:    map[string]string{},
		Logger:             log,
	}
	for _, kv := range split(*mirrors) {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return fmt.Errorf("-mirrors entry %q: want host=mirror", kv)
		}
		cfg.RegistryMirrors[k] = v
	}
	if *fnRuntime != "none" {
		if err := netpool.Cleanup(ctx, *netPrefix); err != nil {
			return err
		}
		subnet, err := netip.ParsePrefix(*netSubnet)
		if err != nil {
			return fmt.Errorf("-net-subnet: %w", err)
		}
		pool, err := netpool.New(ctx, netpool.Options{Size: 2, Prefix: *netPrefix, Subnet: subnet, Logger: log})
		if err != nil {
			return err
		}
		defer pool.Close(context.Background())
		bin := *runsc
		if *fnRuntime == oci.RuntimeRunc {
			bin = "/usr/sbin/runc"
		}
		be, err := oci.New(ctx, oci.Config{Runtime: *fnRuntime, Binary: bin, Root: filepath.Join(*state, "oci"), NetPool: pool, Logger: log})
		if err != nil {
			return err
		}
		if err := be.Cleanup(ctx); err != nil {
			return err
		}
		cfg.Functions = be
	}
	srv, err := cri.New(ctx, cfg)
	if err != nil {
		return err
	}
	l, err := cri.Listen(*socket)
	if err != nil {
		return err
	}
	log.Info("serving CRI", "socket", *socket, "containerd", *containerd, "handler", *handler)
	serveErr := srv.Serve(ctx, l)
	cctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if err := srv.Close(cctx); err != nil {
		log.Warn("close", "err", err)
	}
	return serveErr
}

func split(s string) []string {
	if s == "" {
		return nil
	}
	return strings.Split(s, ",")
}
