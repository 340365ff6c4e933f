package image

import (
	"bytes"
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
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

func withPlatform(t *testing.T, img v1.Image, os, arch string) v1.Image {
	t.Helper()
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = os, arch
	out, err := mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return out
}

func TestPlatformSelection(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	native := buildImage(t, v1.Config{}, layer(t, file("arch", "native", 0o644)))
	foreign := withPlatform(t, buildImage(t, v1.Config{}, layer(t, file("arch", "foreign", 0o644))), "linux", "s390x")
	if runtime.GOARCH == "s390x" {
		t.Skip("the foreign architecture of this test is the native one")
	}
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: foreign, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}},
		mutate.IndexAddendum{Add: native, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: runtime.GOARCH}}},
	)
	r, err := name.ParseReference(host + "/fn/multi:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.WriteIndex(r, idx); err != nil {
		t.Fatal(err)
	}
	got, err := e.svc.Pull(ctx, r.String())
	if err != nil {
		t.Fatalf("Pull(index): %v", err)
	}
	if got.Digest != imageDigest(t, native) || readFile(t, filepath.Join(got.Rootfs, "arch")) != "native" {
		t.Errorf("Pull(index) chose %s", got.Digest)
	}

	// A single foreign-platform image, an index with nothing runnable, and a
	// wasi image without a module are refused.
	onlyForeign := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: foreign, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "s390x"}}})
	r2, _ := name.ParseReference(host + "/fn/multi:foreign")
	if err := remote.WriteIndex(r2, onlyForeign); err != nil {
		t.Fatal(err)
	}
	wasiNoModule := withPlatform(t, buildImage(t, v1.Config{}, layer(t, file("x", "x", 0o644))), "wasip1", "wasm")
	for _, ref := range []string{
		push(t, host, "fn/foreign:v1", foreign),
		r2.String(),
		push(t, host, "fn/wasinomodule:v1", wasiNoModule),
	} {
		if _, err := e.svc.Pull(ctx, ref); !errors.Is(err, ErrInvalid) {
			t.Errorf("Pull(%s) err = %v, want ErrInvalid", ref, err)
		} else {
			t.Logf("Pull(%s): %v", ref, err)
		}
	}
	e.checkTmpEmpty(t)
}

// hookRegistry serves the registry through hook, which may alter or stop a
// response for a layer blob.
func hookRegistry(t *testing.T, hook func(w http.ResponseWriter, r *http.Request, next http.Handler) bool) string {
	t.Helper()
	reg := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if hook(w, r, reg) {
			return
		}
		reg.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

func TestCorruptBlobFromRegistry(t *testing.T) {
	ctx := context.Background()
	l := layer(t, file("app", "genuine content", 0o755))
	lpath := "/blobs/" + layerDigest(t, l)
	host := hookRegistry(t, func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
		if r.Method != http.MethodGet || !strings.HasSuffix(r.URL.Path, lpath) {
			return false
		}
		// Serve the blob with one byte changed (same size, other digest).
		rc, _ := l.Compressed()
		b, _ := io.ReadAll(rc)
		b[len(b)/2] ^= 0xff
		w.Header().Set("Content-Length", strconv.Itoa(len(b)))
		w.WriteHeader(http.StatusOK)
		w.Write(b)
		return true
	})
	img := buildImage(t, v1.Config{}, l)
	ref := push(t, host, "fn/corrupt:v1", img)
	e := newEnv(t, nil)
	_, err := e.svc.Pull(ctx, ref)
	if !errors.Is(err, ErrInvalid) {
		t.Fatalf("Pull of a corrupt blob: err = %v, want ErrInvalid", err)
	}
	t.Logf("%v", err)
	if _, err := e.svc.Get(ctx, imageDigest(t, img)); !errors.Is(err, ErrNotFound) {
		t.Errorf("corrupt image was cached: %v", err)
	}
	e.checkTmpEmpty(t)
}

func TestPullCancelledMidUnpack(t *testing.T) {
	l := layer(t, file("a", strings.Repeat("x", 1<<16), 0o644))
	lpath := "/blobs/" + layerDigest(t, l)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	host := hookRegistry(t, func(w http.ResponseWriter, r *http.Request, next http.Handler) bool {
		if r.Method == http.MethodGet && strings.HasSuffix(r.URL.Path, lpath) {
			cancel() // the puller's context ends while it fetches the layer
		}
		return false
	})
	img := buildImage(t, v1.Config{}, layer(t, file("first", "1", 0o644)), l)
	ref := push(t, host, "fn/cancel:v1", img)
	e := newEnv(t, nil)
	_, err := e.svc.Pull(ctx, ref)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("Pull err = %v, want context.Canceled", err)
	}
	if _, err := e.svc.Get(context.Background(), ref); !errors.Is(err, ErrNotFound) {
		t.Errorf("cancelled pull was recorded: %v", err)
	}
	e.checkTmpEmpty(t)
	// The store still works afterwards.
	if _, err := e.svc.Pull(context.Background(), ref); err != nil {
		t.Errorf("Pull after a cancelled pull: %v", err)
	}
}
