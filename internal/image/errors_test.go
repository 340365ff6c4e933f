package image

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// A minimal valid wasm module: magic and version.
var wasmBytes = []byte("\x00asm\x01\x00\x00\x00")

func TestWasmLayerImage(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	wl := static.NewLayer(wasmBytes, MediaTypeWasmLayer)
	img := buildImage(t, v1.Config{Entrypoint: []string{"/module.wasm"}}, wl)
	cf, _ := img.ConfigFile()
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "wasi", "wasm"
	img, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	got, err := e.svc.Pull(ctx, push(t, host, "fn/wasm:v1", img))
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if got.Kind != KindWasm || got.WasmModule != filepath.Join(e.svc.digestDir(got.Digest), WasmModuleFile) {
		t.Errorf("Kind %q WasmModule %q", got.Kind, got.WasmModule)
	}
	if b, err := os.ReadFile(got.WasmModule); err != nil || !bytes.Equal(b, wasmBytes) {
		t.Errorf("module = %q, %v", b, err)
	}
	// Get returns the same.
	if g, err := e.svc.Get(ctx, got.Digest); err != nil || g.WasmModule != got.WasmModule || g.Kind != KindWasm {
		t.Errorf("Get = %+v, %v", g, err)
	}

	// Two wasm layers are refused.
	two := buildImage(t, v1.Config{}, wl, static.NewLayer(append(wasmBytes, 0), MediaTypeWasmLayer))
	if _, err := e.svc.Pull(ctx, push(t, host, "fn/wasm:two", two)); !errors.Is(err, ErrInvalid) {
		t.Errorf("two wasm layers: err = %v, want ErrInvalid", err)
	}
	e.checkTmpEmpty(t)
}

func TestWasmLabelImage(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	l := layer(t, file("module.wasm", string(wasmBytes), 0o644))
	img := buildImage(t, v1.Config{Labels: map[string]string{LabelWasmModule: "/module.wasm"}}, l)
	got, err := e.svc.Pull(ctx, push(t, host, "fn/wasmlabel:v1", img))
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if got.Kind != KindWasm || got.WasmModule != filepath.Join(got.Rootfs, "module.wasm") {
		t.Errorf("Kind %q WasmModule %q", got.Kind, got.WasmModule)
	}

	// The annotation form, naming a file that is missing: refused.
	ann := mutate.Annotations(buildImage(t, v1.Config{}, l), map[string]string{LabelWasmModule: "/missing.wasm"}).(v1.Image)
	if _, err := e.svc.Pull(ctx, push(t, host, "fn/wasmlabel:missing", ann)); !errors.Is(err, ErrInvalid) {
		t.Errorf("missing module: err = %v, want ErrInvalid", err)
	}
	// A module path through an escaping symlink: refused.
	esc := buildImage(t, v1.Config{Labels: map[string]string{LabelWasmModule: "/esc/canary"}}, layer(t, symlink("esc", up)))
	if _, err := e.svc.Pull(ctx, push(t, host, "fn/wasmlabel:esc", esc)); !errors.Is(err, ErrInvalid) {
		t.Errorf("escaping module path: err = %v, want ErrInvalid", err)
	}
	e.checkCanary(t)
	e.checkTmpEmpty(t)
}

// rawManifest is a Taggable with arbitrary manifest bytes.
type rawManifest struct {
	b  []byte
	mt types.MediaType
}

func (r rawManifest) RawManifest() ([]byte, error)        { return r.b, nil }
func (r rawManifest) MediaType() (types.MediaType, error) { return r.mt, nil }

func TestMalformedImages(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	repo, err := name.NewRepository(host + "/fn/bad")
	if err != nil {
		t.Fatal(err)
	}
	// Blobs the manifests below refer to.
	badConfig := static.NewLayer([]byte("{not json"), types.OCIConfigJSON)
	goodConfig := static.NewLayer([]byte(`{"architecture":"amd64","os":"linux","rootfs":{"type":"layers"}}`), types.OCIConfigJSON)
	goodLayer := layer(t, file("f", "x", 0o644))
	for _, l := range []v1.Layer{badConfig, goodConfig, goodLayer} {
		if err := remote.WriteLayer(repo, l); err != nil {
			t.Fatal(err)
		}
	}
	cd, _ := badConfig.Digest()
	gcd, _ := goodConfig.Digest()
	gcs, _ := goodConfig.Size()
	ld, _ := goodLayer.Digest()
	ls, _ := goodLayer.Size()
	manifest := func(configDigest string, configSize int64, layerMT string) []byte {
		return []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json",` +
			`"config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"` + configDigest + `","size":` + strconv.FormatInt(configSize, 10) + `},` +
			`"layers":[{"mediaType":"` + layerMT + `","digest":"` + ld.String() + `","size":` + strconv.FormatInt(ls, 10) + `}]}`)
	}
	put := func(tag string, b []byte) string {
		ref := repo.Tag(tag)
		if err := remote.Put(ref, rawManifest{b, types.OCIManifestSchema1}); err != nil {
			t.Fatalf("put %s: %v", tag, err)
		}
		return ref.String()
	}
	cases := []struct {
		ref  string
		want error
	}{
		{put("badconfig", manifest(cd.String(), 9, string(types.OCILayer))), ErrInvalid},
		{put("wrongshape", []byte(`{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"md5:zz","size":1},"layers":[]}`)), ErrInvalid},
		{put("badlayertype", manifest(gcd.String(), gcs, "application/x-unknown")), ErrInvalid},
		{put("missingconfig", manifest("sha256:"+sixtyfour('0'), 9, string(types.OCILayer))), ErrNotFound},
		{host + "/fn/bad:nosuchtag", ErrNotFound},
		{host + "/fn/nosuchrepo:v1", ErrNotFound},
		{"UPPER/case::bad", ErrInvalid},
		{"", ErrInvalid},
	}
	for _, tc := range cases {
		_, err := e.svc.Pull(ctx, tc.ref)
		if !errors.Is(err, tc.want) {
			t.Errorf("Pull(%q) err = %v, want %v", tc.ref, err, tc.want)
			continue
		}
		t.Logf("Pull(%q): %v", tc.ref, err)
	}
	if l, _ := e.svc.List(ctx); len(l) != 0 {
		t.Errorf("List = %+v after failed pulls", l)
	}
	e.checkTmpEmpty(t)
}

func TestRegistryDown(t *testing.T) {
	ctx := context.Background()
	host, srv := startRegistry(t)
	srv.Close()
	e := newEnv(t, nil)
	_, err := e.svc.Pull(ctx, host+"/fn/hello:v1")
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Pull from a closed registry: err = %v, want ErrUnavailable", err)
	}
	t.Logf("%v", err)
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := e.svc.Pull(cctx, host+"/fn/hello:v1"); !errors.Is(err, context.Canceled) {
		t.Errorf("Pull with a cancelled context: err = %v, want context.Canceled", err)
	}
}

func sixtyfour(c byte) string { return string(bytes.Repeat([]byte{c}, 64)) }
