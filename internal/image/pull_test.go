package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"syscall"
	"testing"

	"github.com/google/go-containerregistry/pkg/compression"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
)

// fsImage exercises every kind of entry the unpacker must get right.
func fsImage(t *testing.T) (v1.Image, v1.Config) {
	t.Helper()
	owned := file("owned", "owned by 1000:1001", 0o640)
	owned.hdr.Uid, owned.hdr.Gid = 1000, 1001
	l1 := layer(t,
		dir("./", 0o755),
		dir("bin/", 0o755),
		file("bin/tool", "#!/bin/sh\necho tool\n", 0o4755),
		file("bin/gone", "deleted by layer 2", 0o644),
		dir("etc/", 0o755),
		file("etc/config", "v1", 0o600),
		dir("opaque/", 0o755),
		file("opaque/old", "hidden by the opaque marker", 0o644),
		dir("opaque/olddir/", 0o755),
		file("opaque/olddir/x", "x", 0o644),
		owned,
		symlink("lib", "usr/lib"),
		dir("usr/", 0o755),
		dir("usr/lib/", 0o755),
		file("usr/lib/libc.so", "libc", 0o755),
		symlink("abs", "/etc/config"),
		dir("replaced/", 0o755),
		file("replaced/inner", "will become a file", 0o644),
	)
	xf := file("xattr", "has an xattr", 0o644)
	xf.hdr.PAXRecords = map[string]string{"SCHILY.xattr.user.vhive": "yes"}
	xf.hdr.Format = tar.FormatPAX
	l2 := layer(t,
		xf,
		file("bin/.wh.gone", "", 0o644),
		dir("opaque/", 0o755),
		file("opaque/.wh..wh..opq", "", 0o644),
		file("opaque/new", "added with the marker", 0o644),
		file("etc/config", "v2", 0o644),
		hardlink("etc/config.link", "etc/config"),
		file("replaced", "now a file", 0o644),
	)
	cfg := v1.Config{
		Entrypoint:   []string{"/bin/tool"},
		Cmd:          []string{"--serve"},
		Env:          []string{"PATH=/bin", "GUEST_PORT=50051"},
		WorkingDir:   "/srv",
		User:         "1000:1001",
		ExposedPorts: map[string]struct{}{"50051/tcp": {}, "8080/tcp": {}},
		Labels:       map[string]string{"org.example": "yes"},
	}
	return buildImage(t, cfg, l1, l2), cfg
}

func readFile(t *testing.T, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return string(b)
}

func TestPullUnpacksAndCaches(t *testing.T) {
	testutil.RequiresRoot(t) // ownership is only kept as root
	ctx := context.Background()
	host, _ := startRegistry(t)
	img, cfg := fsImage(t)
	ref := push(t, host, "fn/hello:v1", img)
	e := newEnv(t, nil)

	got, err := e.svc.Pull(ctx, ref)
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if got.Digest != imageDigest(t, img) {
		t.Errorf("Digest = %s, want %s", got.Digest, imageDigest(t, img))
	}
	if got.Ref != ref || got.Kind != KindLinux || got.WasmModule != "" {
		t.Errorf("Ref/Kind/WasmModule = %q/%q/%q", got.Ref, got.Kind, got.WasmModule)
	}
	if !got.Created.Equal(testTime) {
		t.Errorf("Created = %v, want %v", got.Created, testTime)
	}
	if got.Size <= 0 {
		t.Errorf("Size = %d", got.Size)
	}
	want := Config{
		Entrypoint: cfg.Entrypoint, Cmd: cfg.Cmd, Env: cfg.Env, WorkingDir: cfg.WorkingDir, User: cfg.User,
		ExposedPorts: []string{"50051/tcp", "8080/tcp"}, Labels: cfg.Labels,
	}
	if !reflect.DeepEqual(got.Config, want) {
		t.Errorf("Config = %+v\nwant %+v", got.Config, want)
	}

	rf := got.Rootfs
	if s := readFile(t, filepath.Join(rf, "bin/tool")); s != "#!/bin/sh\necho tool\n" {
		t.Errorf("bin/tool = %q", s)
	}
	if fi, err := os.Stat(filepath.Join(rf, "bin/tool")); err != nil || fi.Mode() != 0o755|os.ModeSetuid {
		t.Errorf("bin/tool mode = %v, %v; want setuid 0755", fi.Mode(), err)
	}
	if _, err := os.Lstat(filepath.Join(rf, "bin/gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("whiteout: bin/gone still there (%v)", err)
	}
	if _, err := os.Lstat(filepath.Join(rf, "bin/.wh.gone")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("whiteout marker was written (%v)", err)
	}
	ents, err := os.ReadDir(filepath.Join(rf, "opaque"))
	if err != nil || len(ents) != 1 || ents[0].Name() != "new" {
		t.Errorf("opaque dir holds %v (%v), want only \"new\"", ents, err)
	}
	if s := readFile(t, filepath.Join(rf, "etc/config")); s != "v2" {
		t.Errorf("etc/config = %q, want the upper layer's", s)
	}
	fa, _ := os.Stat(filepath.Join(rf, "etc/config"))
	fb, err := os.Stat(filepath.Join(rf, "etc/config.link"))
	if err != nil || !os.SameFile(fa, fb) {
		t.Errorf("etc/config.link is not a hard link of etc/config (%v)", err)
	}
	if fa.Mode() != 0o644 {
		t.Errorf("etc/config mode = %v", fa.Mode())
	}
	if l, err := os.Readlink(filepath.Join(rf, "lib")); err != nil || l != "usr/lib" {
		t.Errorf("lib -> %q, %v", l, err)
	}
	if l, err := os.Readlink(filepath.Join(rf, "abs")); err != nil || l != "/etc/config" {
		t.Errorf("abs -> %q, %v (absolute symlinks are kept as they are)", l, err)
	}
	if s := readFile(t, filepath.Join(rf, "replaced")); s != "now a file" {
		t.Errorf("replaced = %q", s)
	}
	fi, err := os.Stat(filepath.Join(rf, "owned"))
	if err != nil {
		t.Fatal(err)
	}
	st := fi.Sys().(*syscall.Stat_t)
	if st.Uid != 1000 || st.Gid != 1001 || fi.Mode() != 0o640 {
		t.Errorf("owned: uid %d gid %d mode %v, want 1000 1001 0640", st.Uid, st.Gid, fi.Mode())
	}
	for _, p := range []string{"owned", "usr/lib", "bin"} {
		fi, err := os.Lstat(filepath.Join(rf, p))
		if err != nil || !fi.ModTime().Equal(testTime) {
			t.Errorf("%s mtime = %v, want %v (%v)", p, fi.ModTime(), testTime, err)
		}
	}

	xb := make([]byte, 16)
	if n, err := unix.Getxattr(filepath.Join(rf, "xattr"), "user.vhive", xb); errors.Is(err, unix.ENOTSUP) {
		t.Logf("filesystem of %s has no user xattrs; xattr not checked", rf)
	} else if err != nil || string(xb[:n]) != "yes" {
		t.Errorf("xattr user.vhive = %q, %v; want \"yes\"", xb[:max(n, 0)], err)
	}

	// Cache hit: same digest, no second unpack, same directory.
	before, _ := os.Stat(rf)
	again, err := e.svc.Pull(ctx, ref)
	if err != nil {
		t.Fatalf("second Pull: %v", err)
	}
	after, _ := os.Stat(again.Rootfs)
	if n := e.svc.Unpacks(); n != 1 {
		t.Errorf("Unpacks = %d after two pulls, want 1", n)
	}
	if again.Digest != got.Digest || !os.SameFile(before, after) {
		t.Errorf("second pull gave %s at another directory", again.Digest)
	}

	// Get by ref and digest, List.
	byRef, err := e.svc.Get(ctx, ref)
	if err != nil || byRef.Digest != got.Digest {
		t.Errorf("Get(ref) = %+v, %v", byRef, err)
	}
	byDigest, err := e.svc.Get(ctx, got.Digest)
	if err != nil || byDigest.Ref != ref || byDigest.Rootfs != got.Rootfs {
		t.Errorf("Get(digest) = %+v, %v", byDigest, err)
	}
	list, err := e.svc.List(ctx)
	if err != nil || len(list) != 1 || list[0].Ref != ref {
		t.Errorf("List = %+v, %v", list, err)
	}
	if _, err := e.svc.Get(ctx, host+"/fn/other:v1"); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(unknown) err = %v, want ErrNotFound", err)
	}

	// A new Service on the same root sees the image.
	e.svc.Close()
	svc2, err := New(ctx, Options{Root: e.svc.Root()})
	if err != nil {
		t.Fatal(err)
	}
	defer svc2.Close()
	if g, err := svc2.Get(ctx, ref); err != nil || g.Digest != got.Digest {
		t.Errorf("after reopen Get = %+v, %v", g, err)
	}
	if _, err := os.Stat(filepath.Join(rf, "bin/tool")); err != nil {
		t.Errorf("reopen removed a recorded image: %v", err)
	}
	e.checkCanary(t)
}

func TestConcurrentPullsUnpackOnce(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	img := buildImage(t, v1.Config{Cmd: []string{"/hello"}}, layer(t, file("hello", "hi", 0o755)))
	refA := push(t, host, "fn/a:v1", img)
	refB := push(t, host, "fn/b:v1", img)
	e := newEnv(t, nil)

	const n = 8
	var wg sync.WaitGroup
	res := make([]Image, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			ref := refA
			if i%2 == 1 {
				ref = refB
			}
			res[i], errs[i] = e.svc.Pull(ctx, ref)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("pull %d: %v", i, errs[i])
		}
		if res[i].Digest != res[0].Digest || res[i].Rootfs != res[0].Rootfs {
			t.Errorf("pull %d: %s at %s, pull 0: %s at %s", i, res[i].Digest, res[i].Rootfs, res[0].Digest, res[0].Rootfs)
		}
	}
	if u := e.svc.Unpacks(); u != 1 {
		t.Errorf("Unpacks = %d after %d concurrent pulls of one digest, want 1", u, n)
	}
	list, err := e.svc.List(ctx)
	if err != nil || len(list) != 2 {
		t.Errorf("List = %+v, %v; want two refs", list, err)
	}
	e.checkTmpEmpty(t)
}

func TestRetagDropsOldDigest(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	v1img := buildImage(t, v1.Config{}, layer(t, file("v", "1", 0o644)))
	ref := push(t, host, "fn/x:latest", v1img)
	old, err := e.svc.Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	push(t, host, "fn/x:latest", buildImage(t, v1.Config{}, layer(t, file("v", "2", 0o644))))
	cur, err := e.svc.Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}
	if cur.Digest == old.Digest || readFile(t, filepath.Join(cur.Rootfs, "v")) != "2" {
		t.Fatalf("re-pull did not move %s to the new image", ref)
	}
	if _, err := os.Stat(old.Rootfs); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("unreferenced old digest dir still there: %v", err)
	}
	if _, err := e.svc.Get(ctx, old.Digest); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(old digest) err = %v, want ErrNotFound", err)
	}
}

func TestRemove(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	inUse := map[string]Users{}
	var mu sync.Mutex
	e := newEnv(t, func(o *Options) {
		o.InUse = func(d string) Users { mu.Lock(); defer mu.Unlock(); return inUse[d] }
	})
	img := buildImage(t, v1.Config{}, layer(t, file("f", "x", 0o644)))
	refA := push(t, host, "fn/a:v1", img)
	refB := push(t, host, "fn/b:v1", img)
	a, err := e.svc.Pull(ctx, refA)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Pull(ctx, refB); err != nil {
		t.Fatal(err)
	}

	if err := e.svc.Remove(ctx, refA); err != nil {
		t.Fatalf("Remove(%s): %v", refA, err)
	}
	if _, err := e.svc.Get(ctx, refA); !errors.Is(err, ErrNotFound) {
		t.Errorf("Get(removed ref) err = %v", err)
	}
	if _, err := os.Stat(a.Rootfs); err != nil {
		t.Errorf("rootfs removed while %s still points at it: %v", refB, err)
	}

	mu.Lock()
	inUse[a.Digest] = Users{Functions: []string{"fa", "fb"}}
	mu.Unlock()
	// The refusal names the image and every function using it.
	err = e.svc.Remove(ctx, refB)
	var iu *InUseError
	if !errors.Is(err, ErrInUse) || !errors.As(err, &iu) || iu.Digest != a.Digest {
		t.Fatalf("Remove(in use) err = %v, want an *InUseError for %s", err, a.Digest)
	}
	want := fmt.Sprintf(`image %q (%s) is used by functions "fa", "fb": remove them first (vhive rm)`, refB, a.Digest)
	if err.Error() != want {
		t.Errorf("Remove(in use) err = %q, want %q", err, want)
	}
	mu.Lock()
	inUse[a.Digest] = Users{Functions: []string{"fa"}, CRI: []string{"c1"}}
	mu.Unlock()
	err = e.svc.Remove(ctx, a.Digest)
	want = fmt.Sprintf(`image %s is used by function "fa" and CRI container "c1": remove them first (vhive rm; delete their pods)`, a.Digest)
	if !errors.Is(err, ErrInUse) || err.Error() != want {
		t.Fatalf("Remove(digest in use) err = %v, want %q", err, want)
	}
	if g, err := e.svc.Get(ctx, refB); err != nil || g.Digest != a.Digest {
		t.Errorf("refused Remove changed %s: %+v, %v", refB, g, err)
	}
	mu.Lock()
	inUse[a.Digest] = Users{}
	mu.Unlock()

	if err := e.svc.Remove(ctx, a.Digest); err != nil {
		t.Fatalf("Remove(digest): %v", err)
	}
	if _, err := os.Stat(filepath.Dir(a.Rootfs)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("digest dir still there after its last ref was removed: %v", err)
	}
	if l, _ := e.svc.List(ctx); len(l) != 0 {
		t.Errorf("List after Remove = %+v", l)
	}
	if err := e.svc.Remove(ctx, refB); !errors.Is(err, ErrNotFound) {
		t.Errorf("Remove(unknown) err = %v, want ErrNotFound", err)
	}
	if err := e.svc.Remove(ctx, "Bad Ref!!"); !errors.Is(err, ErrInvalid) {
		t.Errorf("Remove(bad ref) err = %v, want ErrInvalid", err)
	}
}

func TestNewCleansLeftovers(t *testing.T) {
	ctx := context.Background()
	root := filepath.Join(t.TempDir(), "images")
	svc, err := New(ctx, Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	svc.Close()
	stray := filepath.Join(root, "tmp", "unpack-123", "rootfs", "x")
	orphan := filepath.Join(root, "digests", "sha256", "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "rootfs")
	for _, d := range []string{filepath.Dir(stray), orphan} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(stray, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	svc, err = New(ctx, Options{Root: root})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	for _, p := range []string{filepath.Join(root, "tmp", "unpack-123"), filepath.Dir(orphan)} {
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("leftover %s not removed: %v", p, err)
		}
	}
}

func TestNewValidates(t *testing.T) {
	ctx := context.Background()
	for _, o := range []Options{
		{},
		{Root: t.TempDir(), MaxLayerBytes: -1},
		{Root: t.TempDir(), InsecureRegistries: []string{"http://x"}},
	} {
		if s, err := New(ctx, o); err == nil {
			s.Close()
			t.Errorf("New(%+v) succeeded", o)
		}
	}
}

func TestPullByDigestFromCacheAndRepair(t *testing.T) {
	ctx := context.Background()
	host, srv := startRegistry(t)
	e := newEnv(t, nil)
	img := buildImage(t, v1.Config{}, layer(t, file("f", "content", 0o644)))
	ref := push(t, host, "fn/d:v1", img)
	got, err := e.svc.Pull(ctx, ref)
	if err != nil {
		t.Fatal(err)
	}

	// A missing directory behind a record is unpacked again.
	if err := os.RemoveAll(got.Rootfs); err != nil {
		t.Fatal(err)
	}
	if _, err := e.svc.Pull(ctx, ref); err != nil {
		t.Fatal(err)
	}
	if n := e.svc.Unpacks(); n != 2 || readFile(t, filepath.Join(got.Rootfs, "f")) != "content" {
		t.Errorf("Unpacks = %d after the rootfs vanished; want a second unpack", n)
	}

	// With the registry gone, a digest reference is served from the store.
	srv.Close()
	dref := host + "/fn/d@" + got.Digest
	byDigest, err := e.svc.Pull(ctx, dref)
	if err != nil {
		t.Fatalf("Pull(%s) with the registry down: %v", dref, err)
	}
	if byDigest.Ref != dref || byDigest.Digest != got.Digest {
		t.Errorf("Pull(digest ref) = %s %s", byDigest.Ref, byDigest.Digest)
	}
	// A tag still needs the registry.
	if _, err := e.svc.Pull(ctx, ref); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Pull(tag) with the registry down: err = %v, want ErrUnavailable", err)
	}
}

func TestLayerCompressions(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	zb := tarBytes(t, file("z", "zstd layer", 0o644))
	zl, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(zb)), nil },
		tarball.WithCompression(compression.ZStd), tarball.WithMediaType(types.OCILayerZStd))
	if err != nil {
		t.Fatal(err)
	}
	plain := static.NewLayer(tarBytes(t, file("p", "plain tar layer", 0o644)), types.OCIUncompressedLayer)
	gz := layer(t, file("g", "gzip layer", 0o644))
	got, err := e.svc.Pull(ctx, push(t, host, "fn/comp:v1", buildImage(t, v1.Config{}, zl, plain, gz)))
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	for f, want := range map[string]string{"z": "zstd layer", "p": "plain tar layer", "g": "gzip layer"} {
		if s := readFile(t, filepath.Join(got.Rootfs, f)); s != want {
			t.Errorf("%s = %q, want %q", f, s, want)
		}
	}
}
