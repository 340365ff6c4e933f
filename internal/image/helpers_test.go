package image

import (
	"archive/tar"
	"bytes"
	"context"
	"io"
	"log"
	"log/slog"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// entry is one tar entry of a test layer.
type entry struct {
	hdr  tar.Header
	body string
}

var testTime = time.Date(2024, 3, 1, 12, 0, 0, 0, time.UTC)

func file(name, body string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeReg, Name: name, Mode: mode, Size: int64(len(body)), ModTime: testTime}, body: body}
}

func dir(name string, mode int64) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: testTime}}
}

func symlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: name, Linkname: target, Mode: 0o777, ModTime: testTime}}
}

func hardlink(name, target string) entry {
	return entry{hdr: tar.Header{Typeflag: tar.TypeLink, Name: name, Linkname: target, Mode: 0o644, ModTime: testTime}}
}

func tarBytes(t testing.TB, entries ...entry) []byte {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, e := range entries {
		h := e.hdr
		if err := tw.WriteHeader(&h); err != nil {
			t.Fatalf("tar header %q: %v", h.Name, err)
		}
		if _, err := io.WriteString(tw, e.body); err != nil {
			t.Fatalf("tar body %q: %v", h.Name, err)
		}
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	return buf.Bytes()
}

// layer builds a gzip-compressed OCI tar layer.
func layer(t testing.TB, entries ...entry) v1.Layer {
	t.Helper()
	return layerFromBytes(t, tarBytes(t, entries...))
}

// layerFromBytes makes a gzip-compressed OCI layer of an uncompressed tar.
func layerFromBytes(t testing.TB, b []byte) v1.Layer {
	t.Helper()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(b)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

func layerDigest(t testing.TB, l v1.Layer) string {
	t.Helper()
	d, err := l.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// buildImage makes an OCI image of layers with a config.
func buildImage(t testing.TB, cfg v1.Config, layers ...v1.Layer) v1.Image {
	t.Helper()
	base := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	base = mutate.ConfigMediaType(base, types.OCIConfigJSON)
	img, err := mutate.AppendLayers(base, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.Config = cfg
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	cf.Created = v1.Time{Time: testTime}
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func imageDigest(t testing.TB, img v1.Image) string {
	t.Helper()
	d, err := img.Digest()
	if err != nil {
		t.Fatal(err)
	}
	return d.String()
}

// startRegistry serves go-containerregistry's registry on 127.0.0.1.
func startRegistry(t testing.TB) (host string, srv *httptest.Server) {
	t.Helper()
	srv = httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), srv
}

// push writes img to host/repo and returns the reference.
func push(t testing.TB, host, repo string, img v1.Image) string {
	t.Helper()
	ref := host + "/" + repo
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(r, img); err != nil {
		t.Fatalf("push %s: %v", ref, err)
	}
	return ref
}

// testEnv is a Service under base/images, with a canary file in base that
// hostile layers aim at.
type testEnv struct {
	base   string
	canary string
	svc    *Service
}

const canaryContent = "canary: untouched\n"

func newEnv(t testing.TB, mod func(*Options)) *testEnv {
	t.Helper()
	base := t.TempDir()
	e := &testEnv{base: base, canary: filepath.Join(base, "canary")}
	if err := os.WriteFile(e.canary, []byte(canaryContent), 0o644); err != nil {
		t.Fatal(err)
	}
	opts := Options{
		Root:   filepath.Join(base, "images"),
		Logger: slog.New(slog.DiscardHandler),
	}
	if mod != nil {
		mod(&opts)
	}
	svc, err := New(context.Background(), opts)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { svc.Close() })
	e.svc = svc
	return e
}

// checkCanary fails if anything outside Root changed.
func (e *testEnv) checkCanary(t testing.TB) {
	t.Helper()
	b, err := os.ReadFile(e.canary)
	if err != nil || string(b) != canaryContent {
		t.Fatalf("canary %s changed: %q, %v", e.canary, b, err)
	}
	ents, err := os.ReadDir(e.base)
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ents {
		if d.Name() != "canary" && d.Name() != "images" {
			t.Errorf("unexpected file %q written next to the store", d.Name())
		}
	}
}

// checkTmpEmpty fails if an unpack left something in Root/tmp.
func (e *testEnv) checkTmpEmpty(t testing.TB) {
	t.Helper()
	ents, err := os.ReadDir(filepath.Join(e.svc.Root(), "tmp"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range ents {
		t.Errorf("leftover in tmp: %s", d.Name())
	}
}
