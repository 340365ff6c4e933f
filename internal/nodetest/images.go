package nodetest

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"

	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/standin"
)

// ProbeRef is the reference of the image Probe builds.
const ProbeRef = "localhost/vhive/probe:test"

// Function packages functions/<name> as an OCI layout for the linux target
// (ref localhost/vhive/<name>:latest) or, with wasm, the wasm one
// (localhost/vhive/<name>-wasm:latest), once per test binary.
func (s *Shared) Function(t testing.TB, name string, wasm bool) string {
	t.Helper()
	target := build.TargetLinux
	if wasm {
		target = build.TargetWasm
	}
	return s.image(t, build.Options{Function: name, Targets: []build.Target{target}})
}

// Helloworld packages functions/helloworld (ref
// localhost/vhive/helloworld:latest).
func (s *Shared) Helloworld(t testing.TB) string { return s.Function(t, "helloworld", false) }

// Probe packages the probe test function (testdata/probe: payload
// "sleep:<ms>" sleeps, "counter" counts per instance, PROBE_MODE=crash or
// nolisten misbehaves at start) with ref ProbeRef.
func (s *Shared) Probe(t testing.TB) string {
	t.Helper()
	return s.GoImage(t, "./internal/nodetest/testdata/probe")
}

// GoImage packages the Go main package pkg (a path relative to the module
// root, e.g. "./internal/reliability/isolation/testdata/netprobe") as a
// Linux function image named after its directory: ref
// localhost/vhive/<name>:test.
func (s *Shared) GoImage(t testing.TB, pkg string) string {
	t.Helper()
	return s.image(t, build.Options{Function: filepath.Base(pkg), Package: pkg, Tag: "test"})
}

// image builds o as an OCI layout under the shared directory, once.
func (s *Shared) image(t testing.TB, o build.Options) string {
	t.Helper()
	name := o.Function
	if len(o.Targets) > 0 && o.Targets[0] == build.TargetWasm {
		name += "-wasm"
	}
	return s.cached(t, "images/"+name, "index.json", func(want string) {
		o.OutDir, o.Formats = filepath.Dir(want), []build.Format{build.FormatLayout}
		imgs, err := build.BuildFunction(context.Background(), o)
		if err != nil {
			t.Fatalf("build %s image: %v", name, err)
		}
		if imgs[0].Layout != want {
			t.Fatalf("%s layout at %s, want %s", name, imgs[0].Layout, want)
		}
	})
}

// Variant writes, under out, an OCI layout of the image in base plus one
// layer holding /marker (the ref) and /filler (size pseudo-random bytes from
// seed), named ref: a new digest whose unpack takes a while. It returns out.
func Variant(t testing.TB, base, out, ref string, size int, seed uint64) string {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(base)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) == 0 {
		t.Fatalf("index of %s: %v", base, err)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	filler := make([]byte, size)
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	for i := 0; i+8 <= len(filler); i += 8 {
		v := r.Uint64()
		for j := 0; j < 8; j++ {
			filler[i+j] = byte(v >> (8 * j))
		}
	}
	layer, err := standin.Layer([]standin.File{{Path: "marker", Mode: 0o644, Body: ref}, {Path: "filler", Mode: 0o644, Body: string(filler)}})
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.AppendLayers(img, layer)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(out); err != nil {
		t.Fatal(err)
	}
	p, err := layout.Write(out, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{build.RefNameAnnotation: ref})); err != nil {
		t.Fatal(err)
	}
	return out
}
