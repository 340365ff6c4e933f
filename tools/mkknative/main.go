// Command mkknative builds Knative Serving's components (controller,
// activator, autoscaler, webhook, queue), the Traefik ingress and CoreDNS
// into $VHIVE_CACHE/bin, each once per pinned version, and writes the
// manifest knative-tools.json there (see vhive.dev/vhive/internal/knative/build
// and docs/knative.md). Run from the repository root, as `make knative-tools`
// does:
//
//	go run ./tools/mkknative -cache /var/cache/vhive
//	go run ./tools/mkknative -only traefik -p 1
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"strings"
	"syscall"

	"vhive.dev/vhive/internal/knative/build"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "mkknative:", err)
		os.Exit(1)
	}
}

func run() error {
	cache := os.Getenv("VHIVE_CACHE")
	if cache == "" {
		cache = "/var/cache/vhive"
	}
	o := build.Options{Logger: slog.Default()}
	flag.StringVar(&o.Cache, "cache", cache, "vhive's cache directory (binaries go to its bin/)")
	flag.StringVar(&o.ToolsDir, "tools", "tools/knative", "the tools/knative module directory")
	flag.StringVar(&o.Go, "go", "go", "the go command")
	flag.IntVar(&o.Parallel, "p", 0, "go build -p (0: go's default)")
	only := flag.String("only", "", "comma-separated components to build (knative-serving, traefik, coredns); default all")
	flag.Parse()
	if *only != "" {
		o.Only = strings.Split(*only, ",")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	m, err := build.Run(ctx, o)
	if err != nil {
		return err
	}
	for _, c := range m.Components {
		fmt.Printf("%-16s %-8s %s\n", c.Name, c.Version, strings.Join(c.Binaries, " "))
	}
	for _, u := range m.Unavailable {
		fmt.Printf("%-16s not built: %s\n", u.Name, u.Reason)
	}
	fmt.Printf("manifest: %s/bin/%s\n", o.Cache, build.ManifestName)
	return nil
}
