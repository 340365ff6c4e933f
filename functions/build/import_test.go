package build

import (
	"bytes"
	"context"
	"io"
	"os"
	"testing"

	"vhive.dev/vhive/internal/image"
)

// TestImageServiceImports imports every output form with vhive's image
// service: both Linux forms give a linux image, both wasm forms a wasm image
// whose module file is the built module. Each form is recorded under the
// digest the build reported for it, and a Linux image has one identity: its
// layout and its docker-archive import under the same manifest digest.
func TestImageServiceImports(t *testing.T) {
	ctx := context.Background()
	out := t.TempDir()
	imgs, err := BuildFunction(ctx, Options{Function: "counter", Targets: []Target{TargetLinux, TargetWasm}, OutDir: out})
	if err != nil {
		t.Fatal(err)
	}
	// The module as packaged in the layout.
	layer := onlyLayer(t, layoutImage(t, imgs[1].Layout, imgs[1].Ref))
	rc, err := layer.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	module, err := io.ReadAll(rc)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}

	svc, err := image.New(ctx, image.Options{Root: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	for _, im := range imgs {
		for _, path := range []string{im.Layout, im.Tarball} {
			got, err := svc.Import(ctx, path, "")
			if err != nil {
				t.Errorf("import %s: %v", path, err)
				continue
			}
			want := im.Digest
			if path == im.Tarball {
				want = im.TarballDigest
			}
			if got.Digest != want {
				t.Errorf("import %s: digest %s, the build reported %s", path, got.Digest, want)
			}
			switch im.Target {
			case TargetLinux:
				if got.Kind != image.KindLinux {
					t.Errorf("%s imported as %q, want linux", path, got.Kind)
				}
			case TargetWasm:
				b, err := os.ReadFile(got.WasmModule)
				if got.Kind != image.KindWasm || err != nil || !bytes.Equal(b, module) {
					t.Errorf("%s imported as %q with module %q (%v): not the built module", path, got.Kind, got.WasmModule, err)
				}
			}
		}
		if im.Target == TargetLinux && im.TarballDigest != im.Digest {
			t.Errorf("%s: docker-archive digest %s differs from the layout's %s", im.Ref, im.TarballDigest, im.Digest)
		}
		// Every form leaves the one reference on the one digest recorded for it.
		if im.Target == TargetLinux {
			got, err := svc.Get(ctx, im.Ref)
			if err != nil || got.Digest != im.Digest {
				t.Errorf("Get(%s) after importing both forms = %s, %v; want the layout digest %s", im.Ref, got.Digest, err, im.Digest)
			}
		}
	}
}
