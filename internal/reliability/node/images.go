package node

import (
	"archive/tar"
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"

	"vhive.dev/vhive/functions/build"
)

// Function builds functions/<name> as an OCI layout under dir (once: an
// existing layout is reused) for the linux or wasm target.
func Function(t testing.TB, dir, name string, wasm bool) string {
	t.Helper()
	target, sub := build.TargetLinux, name
	if wasm {
		target, sub = build.TargetWasm, name+"-wasm"
	}
	if _, err := os.Stat(filepath.Join(dir, sub, "index.json")); err == nil {
		return filepath.Join(dir, sub)
	}
	imgs, err := build.BuildFunction(context.Background(), build.Options{Function: name, OutDir: dir,
		Targets: []build.Target{target}, Formats: []build.Format{build.FormatLayout}})
	if err != nil {
		t.Fatalf("build %s image: %v", sub, err)
	}
	return imgs[0].Layout
}

// Variant writes, under out, an OCI layout of the image in base plus one
// layer holding /marker (the ref) and /filler (size pseudo-random bytes from
// seed), named ref: a new digest whose unpack takes a while. It returns the
// layout path and the marker's content.
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
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range []struct {
		name string
		data []byte
	}{{"marker", []byte(ref)}, {"filler", filler}} {
		if err := tw.WriteHeader(&tar.Header{Name: f.name, Typeflag: tar.TypeReg, Mode: 0o644, Size: int64(len(f.data))}); err != nil {
			t.Fatal(err)
		}
		if _, err := tw.Write(f.data); err != nil {
			t.Fatal(err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	layer, err := tarball.LayerFromReader(bytes.NewReader(buf.Bytes()))
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
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref})); err != nil {
		t.Fatal(err)
	}
	return out
}

// Probe writes an OCI layout (ref localhost/h13/probe:test) of a Linux
// function built from the Go package pkgDir (a main package using
// functions/sdk), compiled statically.
func Probe(t testing.TB, pkgDir, out string) string {
	t.Helper()
	if _, err := os.Stat(filepath.Join(out, "index.json")); err == nil {
		return out
	}
	bin := out + ".bin"
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, ".")
	cmd.Dir = pkgDir
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build probe %s: %v\n%s", pkgDir, err, b)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Name: "probe", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(data))})
	_, _ = tw.Write(data)
	_ = tw.Close()
	layer, err := tarball.LayerFromReader(bytes.NewReader(buf.Bytes()))
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64", Config: v1.Config{
		Entrypoint: []string{"/probe"}, Env: []string{"GUEST_PORT=50051"}, WorkingDir: "/"}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := layout.Write(out, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ProbeRef})); err != nil {
		t.Fatal(err)
	}
	return out
}

// ProbeRef is the reference Probe names its image.
const ProbeRef = "localhost/h13/probe:test"
