// Command mkknative builds Knative Serving's components (controller,
// activator, autoscaler, webhook, queue), the Traefik ingress and CoreDNS
// into $VHIVE_CACHE/bin, each once per pinned version, and writes the
// manifest knative-tools.json there (see vhive.dev/vhive/internal/knative/build
// and docs/knative.md). Run from the repository root, as `make knative-tools`
// does:
//
//	go run ./tools/mkknative -cache /var/cache/vhive
//	go run ./tools/mkknative -only traefik -p 1
//
// It also writes Serving's install YAML for a registry (generated from the
// pinned modules' config, internal/knative/install) and pushes the cached
// binaries' images to a registry (internal/knative/images):
//
//	go run ./tools/mkknative -yaml out/knative -registry 127.0.0.1:5000 -domain example.com
//	go run ./tools/mkknative -push 127.0.0.1:5000
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"

	"vhive.dev/vhive/internal/knative/build"
	"vhive.dev/vhive/internal/knative/images"
	"vhive.dev/vhive/internal/knative/install"
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
	yamlOut := flag.String("yaml", "", "write Serving's install YAML, serving-crds.yaml and serving-core.yaml, to this directory instead of building; needs -registry")
	registry := flag.String("registry", "", "with -yaml: the registry (host:port) the images are pulled from")
	domain := flag.String("domain", "example.com", "with -yaml: the cluster's domain")
	push := flag.String("push", "", "push the cached binaries' images to this registry (host:port) instead of building")
	flag.Parse()
	if *only != "" {
		o.Only = strings.Split(*only, ",")
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	switch {
	case *yamlOut != "":
		return writeYAML(ctx, o.ToolsDir, *yamlOut, *registry, *domain)
	case *push != "":
		pub, err := images.PublishAll(ctx, o.Cache, *push)
		for _, p := range pub {
			fmt.Printf("%s@%s\n", p.Ref, p.Digest)
		}
		return err
	}
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

func writeYAML(ctx context.Context, toolsDir, dir, registry, domain string) error {
	if registry == "" {
		return errors.New("-yaml needs -registry")
	}
	src, mods, err := install.SourcesFor(ctx, toolsDir)
	if err != nil {
		return err
	}
	crds, core, err := install.GenerateParts(install.Options{
		Sources: src, Registry: registry, Tag: mods[0].Version, Domain: domain, Version: install.Release,
	})
	if err != nil {
		return err
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	for _, f := range []struct {
		name string
		data []byte
	}{{"serving-crds.yaml", crds}, {"serving-core.yaml", core}} {
		if err := os.WriteFile(filepath.Join(dir, f.name), f.data, 0o644); err != nil {
			return err
		}
		fmt.Println(filepath.Join(dir, f.name))
	}
	return nil
}
