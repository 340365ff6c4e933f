package build

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// toolsDir is the tools/knative module from this package's directory.
const toolsDir = "../../../tools/knative"

// s2c is a small real command built the way Traefik and CoreDNS are: from a
// copy of its module directory (klauspost/compress, already a dependency of
// vhive, so in the module cache).
func s2c() Component {
	return Component{
		Name: "s2c", Module: "github.com/klauspost/compress", Version: "v1.20.1",
		Binaries: map[string]string{"s2c": "./s2/cmd/s2c"},
	}
}

func options(t *testing.T, cache string) Options {
	return Options{Cache: cache, ToolsDir: toolsDir, Parallel: 1, Components: []Component{s2c()}}
}

// TestRunBuildsOnceAndRecords: a component is built from a copy of its
// module into cache/bin with its stamp and recorded in the manifest with the
// module's checksum and the unavailable kn; a second run builds nothing (the
// binary is the same file, untouched); with the binary gone, the next run
// builds it again.
func TestRunBuildsOnceAndRecords(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	cache := t.TempDir()
	m, err := Run(ctx, options(t, cache))
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(cache, "bin", "s2c")
	if out, err := exec.CommandContext(ctx, bin, "-help").CombinedOutput(); !strings.Contains(string(out), "Usage") {
		t.Fatalf("built s2c -help: %v\n%s", err, out)
	}
	if _, err := os.Stat(StampPath(cache, "s2c", "v1.20.1")); err != nil {
		t.Fatalf("stamp: %v", err)
	}
	if len(m.Components) != 1 || m.Components[0].Sum == "" || m.Components[0].BuildSeconds == 0 ||
		!slices.Equal(m.Components[0].Binaries, []string{"s2c"}) {
		t.Fatalf("manifest components %+v", m.Components)
	}
	if len(m.Unavailable) == 0 || m.Unavailable[0].Name != "kn" {
		t.Errorf("manifest unavailable %+v", m.Unavailable)
	}
	if len(m.Config) != 3 || m.Config[0].Path != ServingModule || m.Config[0].Version != "v0.50.0" {
		t.Errorf("manifest config modules %+v", m.Config)
	}
	onDisk, err := ReadManifest(cache)
	if err != nil || onDisk.Components[0].Sum != m.Components[0].Sum {
		t.Fatalf("manifest on disk %+v, %v", onDisk, err)
	}
	for _, e := range mustReadDir(t, filepath.Join(cache, "bin")) {
		if strings.HasPrefix(e, ".build-") || strings.HasSuffix(e, ".tmp") {
			t.Errorf("left in bin: %s", e)
		}
	}

	before, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	m2, err := Run(ctx, options(t, cache))
	if err != nil {
		t.Fatal(err)
	}
	after, err := os.Stat(bin)
	if err != nil {
		t.Fatal(err)
	}
	if !os.SameFile(before, after) || !after.ModTime().Equal(before.ModTime()) {
		t.Errorf("second run replaced the binary")
	}
	if m2.Components[0].BuildSeconds != m.Components[0].BuildSeconds {
		t.Errorf("second run lost the build time: %+v", m2.Components[0])
	}

	if err := os.Remove(bin); err != nil {
		t.Fatal(err)
	}
	if _, err := Run(ctx, options(t, cache)); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(bin); err != nil {
		t.Fatalf("not rebuilt: %v", err)
	}
}

func mustReadDir(t *testing.T, dir string) []string {
	t.Helper()
	es, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range es {
		names = append(names, e.Name())
	}
	return names
}

// TestRunFailureLeavesNoStamp: a package that does not exist fails the
// build with go's message, and no stamp or binary is left to look finished.
func TestRunFailureLeavesNoStamp(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	cache := t.TempDir()
	c := s2c()
	c.Binaries = map[string]string{"s2c": "./s2/cmd/nosuchcommand"}
	o := options(t, cache)
	o.Components = []Component{c}
	_, err := Run(ctx, o)
	if err == nil || !strings.Contains(err.Error(), "nosuchcommand") {
		t.Fatalf("err %v", err)
	}
	if _, err := os.Stat(StampPath(cache, "s2c", "v1.20.1")); err == nil {
		t.Error("stamp written for a failed build")
	}
	if _, err := os.Stat(filepath.Join(cache, "bin", "s2c")); err == nil {
		t.Error("binary written for a failed build")
	}
}

// TestComponents: the pinned set, with unique binary names.
func TestComponents(t *testing.T) {
	seen := map[string]bool{}
	var names []string
	for _, c := range Components() {
		names = append(names, c.Name)
		for _, b := range c.binaryNames() {
			if seen[b] {
				t.Errorf("binary %s twice", b)
			}
			seen[b] = true
		}
	}
	if !slices.Equal(names, []string{"knative-serving", "traefik", "coredns"}) {
		t.Errorf("components %v", names)
	}
	for _, b := range []string{"knative-controller", "knative-activator", "knative-autoscaler", "knative-webhook", "knative-queue", "traefik", "coredns"} {
		if !seen[b] {
			t.Errorf("no binary %s", b)
		}
	}
	if _, err := Run(context.Background(), Options{Cache: t.TempDir(), ToolsDir: toolsDir, Only: []string{"kn"}}); err == nil {
		t.Error("-only kn accepted")
	}
}
