package image

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// writeLayout writes img to an OCI layout directory with annotations.
func writeLayout(t *testing.T, dir string, img v1.Image, ann map[string]string) {
	t.Helper()
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(ann)); err != nil {
		t.Fatal(err)
	}
}

// tarDir packs dir into a tar file (an OCI archive), gzip-compressed if asked.
func tarDir(t *testing.T, dir, dst string, gz bool) {
	t.Helper()
	f, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var w io.Writer = f
	var zw *gzip.Writer
	if gz {
		zw = gzip.NewWriter(f)
		w = zw
	}
	tw := tar.NewWriter(w)
	if err := tw.AddFS(os.DirFS(dir)); err != nil {
		t.Fatal(err)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	if zw != nil {
		if err := zw.Close(); err != nil {
			t.Fatal(err)
		}
	}
}

func TestImportOCILayoutAndArchive(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	img := buildImage(t, v1.Config{Cmd: []string{"/hello"}}, layer(t, file("hello", "from layout", 0o755)))

	named := filepath.Join(t.TempDir(), "named")
	writeLayout(t, named, img, map[string]string{annotationRefName: "registry.local/fn/hello:v1"})
	got, err := e.svc.Import(ctx, named, "")
	if err != nil {
		t.Fatalf("Import(layout): %v", err)
	}
	if got.Ref != "registry.local/fn/hello:v1" || got.Digest != imageDigest(t, img) {
		t.Errorf("Import(layout) = %s %s", got.Ref, got.Digest)
	}
	if s := readFile(t, filepath.Join(got.Rootfs, "hello")); s != "from layout" {
		t.Errorf("hello = %q", s)
	}

	// The same layout as a gzip OCI archive, under an explicit name: a cache hit.
	arch := filepath.Join(t.TempDir(), "hello.oci.tar.gz")
	tarDir(t, named, arch, true)
	got2, err := e.svc.Import(ctx, arch, "fn/hello:archive")
	if err != nil {
		t.Fatalf("Import(oci archive): %v", err)
	}
	if got2.Ref != "index.docker.io/fn/hello:archive" || got2.Digest != got.Digest {
		t.Errorf("Import(oci archive) = %s %s", got2.Ref, got2.Digest)
	}
	if n := e.svc.Unpacks(); n != 1 {
		t.Errorf("Unpacks = %d, want 1 (same digest)", n)
	}

	// A bare tag annotation names no repository: a ref is needed.
	bare := filepath.Join(t.TempDir(), "bare")
	writeLayout(t, bare, img, map[string]string{annotationRefName: "latest"})
	if _, err := e.svc.Import(ctx, bare, ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("Import(unnamed) err = %v, want ErrInvalid", err)
	}
	if got3, err := e.svc.Import(ctx, bare, "127.0.0.1:5000/fn/bare:v1"); err != nil || got3.Ref != "127.0.0.1:5000/fn/bare:v1" {
		t.Errorf("Import(unnamed, ref) = %+v, %v", got3, err)
	}

	// Two images: the ref chooses.
	other := buildImage(t, v1.Config{}, layer(t, file("other", "2", 0o644)))
	multi := filepath.Join(t.TempDir(), "multi")
	writeLayout(t, multi, img, map[string]string{annotationContainerdName: "docker.io/library/a:1"})
	p, _ := layout.FromPath(multi)
	if err := p.AppendImage(other, layout.WithAnnotations(map[string]string{annotationContainerdName: "docker.io/library/b:1"})); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Import(ctx, multi, ""); !errors.Is(err, ErrInvalid) {
		t.Errorf("Import(two images, no ref) err = %v, want ErrInvalid", err)
	}
	b, err := e.svc.Import(ctx, multi, "b:1")
	if err != nil || b.Digest != imageDigest(t, other) || b.Ref != "index.docker.io/library/b:1" {
		t.Errorf("Import(two images, b:1) = %+v, %v", b, err)
	}
	if _, err := e.svc.Import(ctx, multi, "c:1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Import(two images, c:1) err = %v, want ErrNotFound", err)
	}
	e.checkTmpEmpty(t)
}

func TestImportDockerArchive(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	img := buildImage(t, v1.Config{Entrypoint: []string{"/server"}}, layer(t, file("server", "docker", 0o755)))
	tag, err := name.NewTag("example.com/fn/server:v2")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "server.tar")
	if err := tarball.WriteToFile(path, tag, img); err != nil {
		t.Fatal(err)
	}
	got, err := e.svc.Import(ctx, path, "")
	if err != nil {
		t.Fatalf("Import(docker archive): %v", err)
	}
	if got.Ref != "example.com/fn/server:v2" || got.Digest == "" || got.Config.Entrypoint[0] != "/server" {
		t.Errorf("Import = %+v", got)
	}
	if s := readFile(t, filepath.Join(got.Rootfs, "server")); s != "docker" {
		t.Errorf("server = %q", s)
	}
	// Reimporting under another name shares the unpack.
	got2, err := e.svc.Import(ctx, path, "example.com/fn/server:alias")
	if err != nil || got2.Digest != got.Digest {
		t.Errorf("reimport = %+v, %v", got2, err)
	}
	if n := e.svc.Unpacks(); n != 1 {
		t.Errorf("Unpacks = %d, want 1", n)
	}
}

// TestImportDockerArchiveOneDigest: an OCI image (gzip layers, no
// annotations) imported from its docker archive is recorded under its own
// manifest digest — the one its OCI layout and a registry give — not under a
// second one the archive's Docker reading would make; all three forms share
// one unpack.
func TestImportDockerArchiveOneDigest(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	img := buildImage(t, v1.Config{Entrypoint: []string{"/server"}},
		layer(t, file("server", "one", 0o755)), layer(t, file("etc/conf", "two", 0o644)))
	want := imageDigest(t, img)

	tag, err := name.NewTag("example.com/fn/one:v1")
	if err != nil {
		t.Fatal(err)
	}
	archive := filepath.Join(t.TempDir(), "one.tar")
	if err := tarball.WriteToFile(archive, tag, img); err != nil {
		t.Fatal(err)
	}
	fromArchive, err := e.svc.Import(ctx, archive, "")
	if err != nil {
		t.Fatalf("Import(docker archive): %v", err)
	}
	if fromArchive.Digest != want {
		t.Errorf("docker archive imported as %s, the image's manifest digest is %s", fromArchive.Digest, want)
	}

	dir := filepath.Join(t.TempDir(), "layout")
	writeLayout(t, dir, img, map[string]string{annotationRefName: "example.com/fn/one:layout"})
	fromLayout, err := e.svc.Import(ctx, dir, "")
	if err != nil {
		t.Fatalf("Import(layout): %v", err)
	}
	pulled, err := e.svc.Pull(ctx, push(t, host, "fn/one:v1", img))
	if err != nil {
		t.Fatal(err)
	}
	if fromLayout.Digest != fromArchive.Digest || pulled.Digest != fromArchive.Digest {
		t.Errorf("digests: archive %s, layout %s, registry %s; want one", fromArchive.Digest, fromLayout.Digest, pulled.Digest)
	}
	if n := e.svc.Unpacks(); n != 1 {
		t.Errorf("Unpacks = %d, want 1 (one image)", n)
	}
	if s := readFile(t, filepath.Join(fromArchive.Rootfs, "etc/conf")); s != "two" {
		t.Errorf("etc/conf = %q", s)
	}
}

func TestImportBadInput(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	dir := t.TempDir()
	notTar := filepath.Join(dir, "junk.tar")
	if err := os.WriteFile(notTar, []byte("this is not a tar archive at all, not even close...."), 0o644); err != nil {
		t.Fatal(err)
	}
	emptyTar := filepath.Join(dir, "empty.tar")
	tarDir(t, t.TempDir(), emptyTar, false)
	// An OCI archive with an entry escaping the extraction dir.
	evil := filepath.Join(dir, "evil.tar")
	f, _ := os.Create(evil)
	tw := tar.NewWriter(f)
	for _, en := range []entry{file("oci-layout", `{"imageLayoutVersion":"1.0.0"}`, 0o644), file("../escape", "x", 0o644)} {
		h := en.hdr
		tw.WriteHeader(&h)
		io.WriteString(tw, en.body)
	}
	tw.Close()
	f.Close()

	for _, tc := range []struct {
		path string
		want error
	}{
		{filepath.Join(dir, "missing"), ErrNotFound},
		{notTar, ErrInvalid},
		{emptyTar, ErrInvalid},
		{t.TempDir(), ErrInvalid}, // an empty directory is no layout
		{evil, ErrInvalid},
	} {
		if _, err := e.svc.Import(ctx, tc.path, ""); !errors.Is(err, tc.want) {
			t.Errorf("Import(%s) err = %v, want %v", tc.path, err, tc.want)
		} else {
			t.Logf("Import(%s): %v", filepath.Base(tc.path), err)
		}
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(e.svc.Root()), "escape")); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("evil archive wrote outside: %v", err)
	}
	e.checkCanary(t)
	e.checkTmpEmpty(t)
}

// A forged OCI layout — content that does not match the digests its manifest
// names — must not be stored: a later pull of the genuine digest would be
// served from the cache.
func TestImportForgedLayoutRejected(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	l := layer(t, file("app", "genuine", 0o755))
	img := buildImage(t, v1.Config{Cmd: []string{"/app"}}, l)
	evil := layerFromBytes(t, tarBytes(t, file("app", "forged!", 0o755)))
	evilBlob, _ := evil.Compressed()
	evilBytes, _ := io.ReadAll(evilBlob)
	cfgName, _ := img.ConfigName()
	rawCfg, _ := img.RawConfigFile()

	for _, tc := range []struct {
		name   string
		forge  func(dir string)
		digest string
	}{
		{"layer", func(dir string) {
			if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256", strings.TrimPrefix(layerDigest(t, l), "sha256:")), evilBytes, 0o644); err != nil {
				t.Fatal(err)
			}
		}, layerDigest(t, l)},
		{"config", func(dir string) {
			forged := bytes.Replace(rawCfg, []byte(`"/app"`), []byte(`"/sh"`), 1)
			if err := os.WriteFile(filepath.Join(dir, "blobs", "sha256", cfgName.Hex), forged, 0o644); err != nil {
				t.Fatal(err)
			}
		}, cfgName.String()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := filepath.Join(t.TempDir(), "layout")
			writeLayout(t, dir, img, map[string]string{annotationRefName: "example.com/forged:v1"})
			tc.forge(dir)
			_, err := e.svc.Import(ctx, dir, "")
			if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), tc.digest) {
				t.Fatalf("Import(forged %s) err = %v, want ErrInvalid naming %s", tc.name, err, tc.digest)
			}
			t.Logf("%v", err)
			if _, err := e.svc.Get(ctx, imageDigest(t, img)); !errors.Is(err, ErrNotFound) {
				t.Errorf("forged image was cached: %v", err)
			}
			e.checkTmpEmpty(t)
		})
	}
}

// Docker 25+ `docker save` archives are an OCI layout plus a legacy
// manifest.json and <id>/layer.tar symlinks into blobs/.
func TestImportDockerSaveOCIArchive(t *testing.T) {
	ctx := context.Background()
	e := newEnv(t, nil)
	img := buildImage(t, v1.Config{Cmd: []string{"/app"}}, layer(t, file("app", "docker25", 0o755)))
	dir := filepath.Join(t.TempDir(), "save")
	writeLayout(t, dir, img, map[string]string{annotationContainerdName: "docker.io/library/app:latest", annotationRefName: "latest"})
	ld := strings.TrimPrefix(layerDigest(t, img2layer(t, img)), "sha256:")
	if err := os.MkdirAll(filepath.Join(dir, "legacy"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("../blobs/sha256/"+ld, filepath.Join(dir, "legacy", "layer.tar")); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "manifest.json"), []byte(`[{"Config":"blobs/sha256/x","RepoTags":["app:latest"],"Layers":["legacy/layer.tar"]}]`), 0o644); err != nil {
		t.Fatal(err)
	}
	arch := filepath.Join(t.TempDir(), "save.tar")
	tarDir(t, dir, arch, false)
	got, err := e.svc.Import(ctx, arch, "")
	if err != nil {
		t.Fatalf("Import(docker save archive): %v", err)
	}
	if got.Ref != "index.docker.io/library/app:latest" || got.Digest != imageDigest(t, img) {
		t.Errorf("Import = %s %s", got.Ref, got.Digest)
	}
	if s := readFile(t, filepath.Join(got.Rootfs, "app")); s != "docker25" {
		t.Errorf("app = %q", s)
	}
	e.checkTmpEmpty(t)
}

func img2layer(t *testing.T, img v1.Image) v1.Layer {
	t.Helper()
	ls, err := img.Layers()
	if err != nil || len(ls) == 0 {
		t.Fatalf("layers: %v", err)
	}
	return ls[0]
}
