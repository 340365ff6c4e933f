// Package build builds Knative Serving's components, the Traefik ingress and
// CoreDNS from their Go modules into vhive's cache ($VHIVE_CACHE/bin), the
// way scripts/k8s/build.sh builds Kubernetes and the Makefile builds runsc:
// versions pinned, each component built once and marked with a stamp file
// named after its version (.knative-serving-v0.50.0, like .runsc-<version>),
// and every binary written to a temporary name first and renamed, so an
// interrupted build leaves nothing that looks finished.
//
// Two ways to build, because the modules differ:
//
//   - knative.dev/serving is required by the tools/knative module (its
//     go.mod and go.sum pin it and knative.dev/networking and
//     knative.dev/caching, whose config the install YAML needs), and its
//     commands are built from there.
//   - Traefik's go.mod has replace directives, which only hold in a main
//     module, and CoreDNS's dependency graph would move serving's if both
//     were required by one module. Each is built from a copy of its own
//     module directory (`go mod download`, checked against the checksum
//     database like any module) with the go.mod and go.sum its authors
//     tested; the copy is kept under $VHIVE_CACHE/src so a rebuild reuses
//     the build cache.
//
// A manifest, $VHIVE_CACHE/bin/knative-tools.json, records what was built,
// from which module version and checksum, how long each build took, and what
// could not be built (kn: see Unavailable).
package build

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// ManifestName is the manifest's file name in the cache's bin directory.
const ManifestName = "knative-tools.json"

// ServingModule and the modules whose config completes serving's install
// YAML, all pinned by tools/knative/go.mod.
const (
	ServingModule    = "knative.dev/serving"
	NetworkingModule = "knative.dev/networking"
	CachingModule    = "knative.dev/caching"
)

// Component is one thing built into the cache.
type Component struct {
	// Name names the component in the manifest and its stamp file.
	Name string
	// Module is the Go module it is built from.
	Module string
	// Version is the module version; empty for a component of the tools
	// module, whose version is the one its go.mod requires.
	Version string
	// Binaries maps each binary's name in the cache to its package: an
	// import path for a component of the tools module, a directory
	// relative to the module root (./cmd/traefik) otherwise.
	Binaries map[string]string
	// LDFlags are extra -ldflags (-s -w are always given).
	LDFlags string
}

// fromToolsModule reports whether c is built from the tools module.
func (c Component) fromToolsModule() bool { return c.Version == "" }

// binaryNames is c's binary names, sorted.
func (c Component) binaryNames() []string {
	names := make([]string, 0, len(c.Binaries))
	for n := range c.Binaries {
		names = append(names, n)
	}
	slices.Sort(names)
	return names
}

// Versions of the components built from a copy of their module.
const (
	TraefikVersion = "v3.6.12"
	CoreDNSVersion = "v1.15.0"
)

// Components is what Run builds by default.
func Components() []Component {
	serving := map[string]string{}
	for _, c := range []string{"controller", "activator", "autoscaler", "webhook", "queue"} {
		serving["knative-"+c] = ServingModule + "/cmd/" + c
	}
	return []Component{
		{Name: "knative-serving", Module: ServingModule, Binaries: serving},
		{
			Name: "traefik", Module: "github.com/traefik/traefik/v3", Version: TraefikVersion,
			Binaries: map[string]string{"traefik": "./cmd/traefik"},
			LDFlags:  "-X github.com/traefik/traefik/v3/pkg/version.Version=" + TraefikVersion,
		},
		{
			Name: "coredns", Module: "github.com/coredns/coredns", Version: CoreDNSVersion,
			Binaries: map[string]string{"coredns": "."},
			LDFlags:  "-X github.com/coredns/coredns/coremain.GitCommit=" + CoreDNSVersion,
		},
	}
}

// Missing is something issue 19 asks for that cannot be built here.
type Missing struct {
	Name    string `json:"name"`
	Module  string `json:"module"`
	Version string `json:"version"`
	Reason  string `json:"reason"`
}

// Unavailable lists what cannot be built from the module proxy, with why.
func Unavailable() []Missing {
	return []Missing{{
		Name: "kn", Module: "knative.dev/client", Version: "v0.50.0",
		Reason: "knative.dev/client v0.50.0 is served, but its go.mod replaces knative.dev/client/pkg with ./pkg, " +
			"a nested module left out of the zip, and the proxy refuses knative.dev/client/pkg (v0.50.0, @latest and its version list: 403 \"not available\")",
	}}
}

// Options configures Run.
type Options struct {
	// Cache is vhive's cache directory ($VHIVE_CACHE); binaries go to
	// Cache/bin, module copies to Cache/src.
	Cache string
	// ToolsDir is the tools/knative module directory.
	ToolsDir string
	// Go is the go command (default "go").
	Go string
	// Parallel is go build's -p (0: go's default).
	Parallel int
	// Only, if set, names the components to build; the others are left
	// as they are.
	Only []string
	// Components overrides Components() (tests).
	Components []Component
	Logger     *slog.Logger
}

// Manifest is $VHIVE_CACHE/bin/knative-tools.json.
type Manifest struct {
	Go          string    `json:"go"`
	Components  []Built   `json:"components"`
	Config      []Module  `json:"config,omitempty"`
	Unavailable []Missing `json:"unavailable,omitempty"`
}

// Built is one component in the manifest.
type Built struct {
	Name     string   `json:"name"`
	Module   string   `json:"module"`
	Version  string   `json:"version"`
	Sum      string   `json:"sum,omitempty"`
	Binaries []string `json:"binaries"`
	// BuildSeconds is how long its last build took (0: not built by
	// this manifest's writer, e.g. stamped by an earlier version).
	BuildSeconds float64 `json:"buildSeconds,omitempty"`
	BuiltAt      string  `json:"builtAt,omitempty"`
}

// Module is a module's resolved version and where its source is.
type Module struct {
	Path    string `json:"path"`
	Version string `json:"version"`
	Sum     string `json:"sum,omitempty"`
	Dir     string `json:"dir,omitempty"`
}

func (o *Options) setDefaults() error {
	if o.Cache == "" {
		return errors.New("knative build: no cache directory")
	}
	if o.ToolsDir == "" {
		return errors.New("knative build: no tools module directory")
	}
	if o.Go == "" {
		o.Go = "go"
	}
	if o.Components == nil {
		o.Components = Components()
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	for _, n := range o.Only {
		if !slices.ContainsFunc(o.Components, func(c Component) bool { return c.Name == n }) {
			return fmt.Errorf("knative build: no component %q", n)
		}
	}
	return nil
}

// Run builds every component whose stamp or binaries are missing and writes
// the manifest. It returns the manifest written.
func Run(ctx context.Context, o Options) (*Manifest, error) {
	if err := o.setDefaults(); err != nil {
		return nil, err
	}
	bin := filepath.Join(o.Cache, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		return nil, fmt.Errorf("knative build: %w", err)
	}
	prev, err := ReadManifest(o.Cache)
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		o.Logger.Warn("knative build: previous manifest unreadable, rewriting it", "err", err)
	}
	goVersion, err := output(ctx, o.ToolsDir, o.Go, "env", "GOVERSION")
	if err != nil {
		return nil, fmt.Errorf("knative build: %w", err)
	}
	m := &Manifest{Go: strings.TrimSpace(string(goVersion)), Unavailable: Unavailable()}
	if m.Config, err = ConfigModules(ctx, o.ToolsDir, o.Go); err != nil {
		return nil, fmt.Errorf("knative build: %w", err)
	}
	for _, c := range o.Components {
		var b Built
		if len(o.Only) > 0 && !slices.Contains(o.Only, c.Name) {
			if p := prev.find(c.Name); p != nil {
				m.Components = append(m.Components, *p)
			}
			continue
		}
		if b, err = buildComponent(ctx, o, c, prev.find(c.Name)); err != nil {
			// Keep what was built so far in the manifest.
			if werr := writeManifest(o.Cache, m); werr != nil {
				o.Logger.Warn("knative build: manifest", "err", werr)
			}
			return nil, err
		}
		m.Components = append(m.Components, b)
	}
	if err := writeManifest(o.Cache, m); err != nil {
		return nil, err
	}
	return m, nil
}

func (m *Manifest) find(name string) *Built {
	if m == nil {
		return nil
	}
	for i := range m.Components {
		if m.Components[i].Name == name {
			return &m.Components[i]
		}
	}
	return nil
}

// StampPath is the stamp file of component name at version.
func StampPath(cache, name, version string) string {
	return filepath.Join(cache, "bin", "."+name+"-"+version)
}

// buildComponent builds c unless its stamp and binaries are there.
func buildComponent(ctx context.Context, o Options, c Component, prev *Built) (Built, error) {
	b := Built{Name: c.Name, Module: c.Module, Version: c.Version, Binaries: c.binaryNames()}
	var modDir string
	if c.fromToolsModule() {
		mod, err := listModule(ctx, o.ToolsDir, o.Go, c.Module)
		if err != nil {
			return b, fmt.Errorf("knative build %s: %w", c.Name, err)
		}
		b.Version, b.Sum = mod.Version, mod.Sum
	}
	stamp := StampPath(o.Cache, c.Name, b.Version)
	if complete(o.Cache, stamp, b.Binaries) {
		o.Logger.Info("knative build: up to date", "component", c.Name, "version", b.Version)
		if prev != nil && prev.Version == b.Version {
			b.Sum, b.BuildSeconds, b.BuiltAt = firstNonEmpty(b.Sum, prev.Sum), prev.BuildSeconds, prev.BuiltAt
		}
		return b, nil
	}
	start := time.Now()
	if !c.fromToolsModule() {
		mod, err := downloadModule(ctx, o.Go, c.Module, c.Version)
		if err != nil {
			return b, fmt.Errorf("knative build %s: %w", c.Name, err)
		}
		b.Sum = mod.Sum
		modDir = filepath.Join(o.Cache, "src", c.Name+"-"+c.Version)
		if err := copyTree(mod.Dir, modDir); err != nil {
			return b, fmt.Errorf("knative build %s: copy module: %w", c.Name, err)
		}
	}
	o.Logger.Info("knative build: building", "component", c.Name, "version", b.Version, "binaries", b.Binaries)
	if err := goBuild(ctx, o, c, modDir); err != nil {
		return b, fmt.Errorf("knative build %s %s: %w", c.Name, b.Version, err)
	}
	if err := os.WriteFile(stamp, nil, 0o644); err != nil {
		return b, fmt.Errorf("knative build %s: stamp: %w", c.Name, err)
	}
	b.BuildSeconds = time.Since(start).Round(100 * time.Millisecond).Seconds()
	b.BuiltAt = time.Now().UTC().Format(time.RFC3339)
	o.Logger.Info("knative build: built", "component", c.Name, "version", b.Version, "seconds", b.BuildSeconds)
	return b, nil
}

func firstNonEmpty(a, b string) string {
	if a != "" {
		return a
	}
	return b
}

// complete reports whether stamp and every binary exist.
func complete(cache, stamp string, binaries []string) bool {
	if _, err := os.Stat(stamp); err != nil {
		return false
	}
	for _, n := range binaries {
		if fi, err := os.Stat(filepath.Join(cache, "bin", n)); err != nil || !fi.Mode().IsRegular() {
			return false
		}
	}
	return true
}

// goBuild builds c's binaries into a temporary directory next to the cache's
// bin, in one go build, then renames each into place.
func goBuild(ctx context.Context, o Options, c Component, modDir string) error {
	bin := filepath.Join(o.Cache, "bin")
	tmp, err := os.MkdirTemp(bin, ".build-"+c.Name+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	args := []string{"build", "-trimpath", "-ldflags", strings.TrimSpace("-s -w " + c.LDFlags)}
	if o.Parallel > 0 {
		args = append(args, fmt.Sprintf("-p=%d", o.Parallel))
	}
	dir := o.ToolsDir
	if modDir != "" {
		dir = modDir
	}
	names := c.binaryNames()
	// Where go build writes each binary: with one package, the name
	// given; with several, -o DIR/ names each after its package's last
	// path element.
	built := map[string]string{}
	if len(names) == 1 {
		built[names[0]] = filepath.Join(tmp, names[0])
		args = append(args, "-o", built[names[0]], c.Binaries[names[0]])
	} else {
		args = append(args, "-o", tmp+string(filepath.Separator))
		seen := map[string]bool{}
		for _, n := range names {
			base := filepath.Base(c.Binaries[n])
			if seen[base] || base == "." {
				return fmt.Errorf("packages of %s: %q is not a unique package name", c.Name, base)
			}
			seen[base] = true
			built[n] = filepath.Join(tmp, base)
			args = append(args, c.Binaries[n])
		}
	}
	if err := run(ctx, dir, o, args...); err != nil {
		return err
	}
	for _, n := range names {
		if err := os.Rename(built[n], filepath.Join(bin, n)); err != nil {
			return fmt.Errorf("install %s: %w", n, err)
		}
	}
	return nil
}

// run runs the go command in dir for a static build, its output logged.
func run(ctx context.Context, dir string, o Options, args ...string) error {
	cmd := exec.CommandContext(ctx, o.Go, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOWORK=off")
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("%s %s (in %s): %w\n%s", o.Go, strings.Join(args, " "), dir, err, tail(out.String(), 4000))
	}
	return nil
}

func tail(s string, n int) string {
	if len(s) > n {
		return "…" + s[len(s)-n:]
	}
	return s
}

func output(ctx context.Context, dir, goCmd string, args ...string) ([]byte, error) {
	cmd := exec.CommandContext(ctx, goCmd, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOWORK=off")
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("%s %s: %w: %s", goCmd, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out, nil
}

// listModule resolves path as the module in dir requires it.
func listModule(ctx context.Context, dir, goCmd, path string) (Module, error) {
	out, err := output(ctx, dir, goCmd, "mod", "download", "-json", path)
	if err != nil {
		return Module{}, err
	}
	return decodeModule(out)
}

// downloadModule fetches path@version into the module cache.
func downloadModule(ctx context.Context, goCmd, path, version string) (Module, error) {
	out, err := output(ctx, os.TempDir(), goCmd, "mod", "download", "-json", path+"@"+version)
	if err != nil {
		return Module{}, err
	}
	return decodeModule(out)
}

func decodeModule(out []byte) (Module, error) {
	var j struct {
		Path, Version, Sum, Dir, Error string
	}
	if err := json.Unmarshal(out, &j); err != nil {
		return Module{}, fmt.Errorf("go mod download: %w", err)
	}
	if j.Error != "" {
		return Module{}, fmt.Errorf("go mod download %s: %s", j.Path, j.Error)
	}
	if j.Dir == "" {
		return Module{}, fmt.Errorf("go mod download %s: no directory", j.Path)
	}
	return Module{Path: j.Path, Version: j.Version, Sum: j.Sum, Dir: j.Dir}, nil
}

// ConfigModules resolves the serving, networking and caching modules the
// tools module in toolsDir requires, downloading them if needed, with their
// directories in the module cache: the install YAML is generated from their
// config (vhive.dev/vhive/internal/knative/install).
func ConfigModules(ctx context.Context, toolsDir, goCmd string) ([]Module, error) {
	if goCmd == "" {
		goCmd = "go"
	}
	var mods []Module
	for _, p := range []string{ServingModule, NetworkingModule, CachingModule} {
		m, err := listModule(ctx, toolsDir, goCmd, p)
		if err != nil {
			return nil, err
		}
		mods = append(mods, m)
	}
	return mods, nil
}

// ReadManifest reads cache/bin/knative-tools.json.
func ReadManifest(cache string) (*Manifest, error) {
	data, err := os.ReadFile(filepath.Join(cache, "bin", ManifestName))
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("%s: %w", ManifestName, err)
	}
	return &m, nil
}

func writeManifest(cache string, m *Manifest) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	path := filepath.Join(cache, "bin", ManifestName)
	if err := os.WriteFile(path+".tmp", append(data, '\n'), 0o644); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	if err := os.Rename(path+".tmp", path); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	return nil
}

// copyTree copies the module directory src (read-only in the module cache)
// to dst, writable, replacing what dst held.
func copyTree(src, dst string) error {
	if err := os.RemoveAll(dst); err != nil {
		return err
	}
	return filepath.WalkDir(src, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(src, path)
		if err != nil {
			return err
		}
		target := filepath.Join(dst, rel)
		switch {
		case d.IsDir():
			return os.MkdirAll(target, 0o755)
		case d.Type().IsRegular():
			info, err := d.Info()
			if err != nil {
				return err
			}
			data, err := os.ReadFile(path)
			if err != nil {
				return err
			}
			return os.WriteFile(target, data, info.Mode().Perm()|0o200)
		default:
			return nil // module zips hold regular files only
		}
	})
}
