package debimage

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"context"
	"errors"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/testutil"
)

func TestReadPackages(t *testing.T) {
	p := filepath.Join(t.TempDir(), "packages")
	os.WriteFile(p, []byte("# comment\npython3-pil  python3-numpy # trailing\n\npython3-pil\npython3-grpcio\n"), 0o644)
	got, err := ReadPackages(p)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{"python3-grpcio", "python3-minimal", "python3-numpy", "python3-pil", "python3-protobuf"}
	if !slices.Equal(got, want) {
		t.Errorf("ReadPackages = %q, want %q", got, want)
	}
	os.WriteFile(p, []byte("python3-pil\n--allow-unauthenticated\n"), 0o644)
	if _, err := ReadPackages(p); err == nil || !strings.Contains(err.Error(), ":2:") {
		t.Errorf("an option smuggled in as a package: err = %v, want a line-2 error", err)
	}
	if BaseKey("bookworm", want) == BaseKey("bookworm", want[1:]) || BaseKey("bookworm", want) != BaseKey("bookworm", slices.Clone(want)) {
		t.Error("BaseKey does not follow the package set")
	}
}

func TestFilesTarDeterministic(t *testing.T) {
	files := map[string][]byte{"opt/vhive/server.py": []byte("x"), "opt/vhive/function/handler.py": []byte("y"), "opt/vhive/function/d/model.pkl": []byte("z")}
	a, err := filesTar(files)
	if err != nil {
		t.Fatal(err)
	}
	for range 5 {
		if b, _ := filesTar(maps(files)); string(a) != string(b) {
			t.Fatal("filesTar differs between runs")
		}
	}
	var names []string
	tr := tar.NewReader(strings.NewReader(string(a)))
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.ModTime.Unix() != 0 || h.Uid != 0 {
			t.Errorf("%s: mtime %v uid %d", h.Name, h.ModTime, h.Uid)
		}
		names = append(names, h.Name)
	}
	want := []string{"opt/", "opt/vhive/", "opt/vhive/function/", "opt/vhive/function/d/", "opt/vhive/function/d/model.pkl", "opt/vhive/function/handler.py", "opt/vhive/server.py"}
	if !slices.Equal(names, want) {
		t.Errorf("entries %q, want %q", names, want)
	}
}

func maps(m map[string][]byte) map[string][]byte {
	out := map[string][]byte{}
	for k, v := range m {
		out[k] = v
	}
	return out
}

// TestWriteDirLayer: a directory with a hard link, a symlink, a device node
// and a FIFO becomes a sorted layer that keeps them, twice the same.
func TestWriteDirLayer(t *testing.T) {
	testutil.RequiresRoot(t)
	root := t.TempDir()
	os.MkdirAll(filepath.Join(root, "usr/bin"), 0o755)
	os.MkdirAll(filepath.Join(root, "dev"), 0o755)
	os.WriteFile(filepath.Join(root, "usr/bin/a"), []byte("binary"), 0o755)
	os.Link(filepath.Join(root, "usr/bin/a"), filepath.Join(root, "usr/bin/b"))
	os.Symlink("a", filepath.Join(root, "usr/bin/c"))
	if err := unix.Mknod(filepath.Join(root, "dev/null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mkfifo(filepath.Join(root, "dev/initctl"), 0o600); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	d1, err := writeDirLayer(root, filepath.Join(out, "1.tar.gz"))
	if err != nil {
		t.Fatal(err)
	}
	d2, err := writeDirLayer(root, filepath.Join(out, "2.tar.gz"))
	if err != nil || d1 != d2 {
		t.Fatalf("digests %s, %s (%v): want equal", d1, d2, err)
	}
	hdrs := readLayer(t, filepath.Join(out, "1.tar.gz"))
	if h := hdrs["usr/bin/b"]; h == nil || h.Typeflag != tar.TypeLink || h.Linkname != "usr/bin/a" {
		t.Errorf("usr/bin/b = %+v, want a hard link to usr/bin/a", h)
	}
	if h := hdrs["usr/bin/c"]; h == nil || h.Typeflag != tar.TypeSymlink || h.Linkname != "a" {
		t.Errorf("usr/bin/c = %+v", h)
	}
	if h := hdrs["dev/null"]; h == nil || h.Typeflag != tar.TypeChar || h.Devmajor != 1 || h.Devminor != 3 {
		t.Errorf("dev/null = %+v", h)
	}
	if h := hdrs["dev/initctl"]; h == nil || h.Typeflag != tar.TypeFifo {
		t.Errorf("dev/initctl = %+v", h)
	}
}

func readLayer(t *testing.T, path string) map[string]*tar.Header {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zr, err := gzip.NewReader(f)
	if err != nil {
		t.Fatal(err)
	}
	tr := tar.NewReader(zr)
	out := map[string]*tar.Header{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return out
		}
		if err != nil {
			t.Fatal(err)
		}
		out[h.Name] = h
	}
}

// TestDebianImage builds functions/python/helloworld with mmdebstrap (the
// base is cached under $VHIVE_CACHE/debimage), checks that a second build
// gives the same digests from the cache, that the base layer carries the
// device nodes mmdebstrap makes under /dev, and that the image service
// imports it — skipping those nodes — into a rootfs with the interpreter.
func TestDebianImage(t *testing.T) {
	testutil.RequiresRoot(t)
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("mmdebstrap not found (make deps installs it): %v", err)
		}
		t.Skipf("mmdebstrap not found: %v", err)
	}
	ctx := context.Background()
	dir := filepath.Join("..", "..", "functions", "python", "helloworld")
	out1, out2 := t.TempDir(), t.TempDir()
	img, err := Build(ctx, Options{Dir: dir, OutDir: out1})
	if err != nil {
		t.Fatal(err)
	}
	again, err := Build(ctx, Options{Dir: dir, OutDir: out2, Formats: []build.Format{build.FormatLayout}})
	if err != nil {
		t.Fatal(err)
	}
	if !again.BaseCached || again.Digest != img.Digest || again.BaseDigest != img.BaseDigest {
		t.Errorf("second build: cached=%v digest %s base %s; first %s base %s", again.BaseCached, again.Digest, again.BaseDigest, img.Digest, img.BaseDigest)
	}
	if img.Ref != "localhost/vhive/py-helloworld:latest" || img.Tarball == "" || img.Layout == "" {
		t.Errorf("image = %+v", img)
	}
	base := Options{Cache: filepath.Join(testutil.CacheDir(), "debimage")}
	hdrs := readLayer(t, filepath.Join(base.Cache, "base", img.BaseKey, "layer.tar.gz"))
	var devs []string
	for n, h := range hdrs {
		if h.Typeflag == tar.TypeChar && strings.HasPrefix(n, "dev/") {
			devs = append(devs, n)
		}
	}
	if !slices.Contains(devs, "dev/null") || !slices.Contains(devs, "dev/console") {
		t.Errorf("base layer's device nodes: %q; want mmdebstrap's dev/null, dev/console, …", devs)
	}

	svc, err := image.New(ctx, image.Options{Root: t.TempDir(), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	for _, src := range []string{img.Layout, img.Tarball} {
		got, err := svc.Import(ctx, src, "")
		if err != nil {
			t.Fatalf("import %s: %v", src, err)
		}
		for _, p := range []string{"usr/bin/python3", "opt/vhive/server.py", "opt/vhive/function/handler.py", "usr/lib/python3/dist-packages/grpc/__init__.py"} {
			if _, err := os.Stat(filepath.Join(got.Rootfs, p)); err != nil {
				t.Errorf("%s: %v", p, err)
			}
		}
		err = filepath.WalkDir(filepath.Join(got.Rootfs, "dev"), func(p string, d fs.DirEntry, err error) error {
			if err == nil && d.Type()&(fs.ModeDevice|fs.ModeCharDevice|fs.ModeNamedPipe) != 0 {
				return errors.New("special file " + p + " was created")
			}
			return err
		})
		if err != nil {
			t.Error(err)
		}
	}
}

// TestFunctionFilesSharedLinks: a symlink to another function's file ships
// as a copy of it, so the layer is the one a copy in place would give; a
// link out of the suite or to a directory is refused, naming it.
func TestFunctionFilesSharedLinks(t *testing.T) {
	suite := t.TempDir()
	write := func(p, data string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(p, []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(target, p string) {
		t.Helper()
		if err := os.Symlink(target, p); err != nil {
			t.Fatal(err)
		}
	}
	write(filepath.Join(suite, "a", "handler.py"), "def handle(name, input_set): return 'a'\n")
	write(filepath.Join(suite, "a", "lib.py"), "X = 1\n")
	write(filepath.Join(suite, "b", "handler.py"), "def handle(name, input_set): return 'a'\n")
	link("../a/lib.py", filepath.Join(suite, "b", "lib.py"))
	write(filepath.Join(suite, "c", "handler.py"), "def handle(name, input_set): return 'a'\n")
	write(filepath.Join(suite, "c", "lib.py"), "X = 1\n")

	wd, err := os.Getwd()
	if err != nil {
		t.Fatal(err)
	}
	layer := func(dir string) []byte {
		t.Helper()
		// A relative directory, as tools/mkimage gives.
		rel, err := filepath.Rel(wd, filepath.Join(suite, dir))
		if err != nil {
			t.Fatal(err)
		}
		files, err := Options{Dir: rel, Name: dir}.functionFiles(context.Background(), baseInfo{})
		if err != nil {
			t.Fatal(err)
		}
		if string(files["opt/vhive/function/lib.py"]) != "X = 1\n" {
			t.Fatalf("%s: lib.py = %q", dir, files["opt/vhive/function/lib.py"])
		}
		b, err := filesTar(files)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if b, c := layer("b"), layer("c"); !bytes.Equal(b, c) {
		t.Error("the layer of a function sharing lib.py by a link differs from the one with a copy")
	}

	outside := filepath.Join(t.TempDir(), "secret.py")
	write(outside, "KEY = 2\n")
	write(filepath.Join(suite, "d", "handler.py"), "")
	link(outside, filepath.Join(suite, "d", "secret.py"))
	write(filepath.Join(suite, "e", "handler.py"), "")
	link("../a", filepath.Join(suite, "e", "a"))
	for dir, want := range map[string]string{"d": "outside the suite", "e": "not a regular file"} {
		_, err := Options{Dir: filepath.Join(suite, dir), Name: dir}.functionFiles(context.Background(), baseInfo{})
		if err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("function %s: %v, want an error saying %q", dir, err, want)
		}
	}
}
