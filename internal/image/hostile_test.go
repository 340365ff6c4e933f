package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strings"
	"testing"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
)

// From the temporary rootfs (<base>/images/tmp/unpack-*/rootfs) four ".."
// reach <base>, where the canary lives.
const up = "../../../.."

func TestHostileLayersRejected(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, func(o *Options) {
		o.MaxEntryBytes = 1 << 20
		o.MaxLayerBytes = 4 << 20
	})
	canaryAbs := e.canary
	big := strings.Repeat("z", 1<<20)

	// A good image pulled first must survive every failed unpack.
	good := buildImage(t, v1.Config{}, layer(t, file("ok", "good", 0o644)))
	goodImg, err := e.svc.Pull(ctx, push(t, host, "fn/good:v1", good))
	if err != nil {
		t.Fatal(err)
	}

	// Special files are skipped under dev/ (TestSpecialFilesUnderDevSkipped)
	// and refused everywhere else, including as dev itself.
	chr := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "etc/mem", Mode: 0o600, Devmajor: 1, Devminor: 1}}
	blk := entry{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "sda", Mode: 0o600, Devmajor: 8}}
	fifo := entry{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "run/pipe", Mode: 0o600}}
	devItself := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev", Mode: 0o600, Devmajor: 1, Devminor: 3}}
	devDotDot := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/../etc/null", Mode: 0o600, Devmajor: 1, Devminor: 3}}
	devAbs := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "/dev/null", Mode: 0o600, Devmajor: 1, Devminor: 3}}
	devEscape := entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: "dev/" + up + "/null", Mode: 0o600, Devmajor: 1, Devminor: 3}}

	cases := []struct {
		name    string
		entries []entry
		bad     string // the entry name the error must name
	}{
		{"dotdot", []entry{file(up+"/canary", "pwned", 0o644)}, up + "/canary"},
		{"dotdot-inside", []entry{file("a/../../canary", "pwned", 0o644)}, "a/../../canary"},
		{"absolute", []entry{file(canaryAbs, "pwned", 0o644)}, canaryAbs},
		{"absolute-etc", []entry{file("/etc/x", "pwned", 0o644)}, "/etc/x"},
		{"symlink-root-then-write", []entry{symlink("a", "/"), file("a"+canaryAbs, "pwned", 0o644)}, "a" + canaryAbs},
		{"symlink-dotdot-chain", []entry{
			symlink("b", ".."), symlink("c", "b/"+up[3:]), file("c/canary", "pwned", 0o644),
		}, "c/canary"},
		{"symlink-escape-dir", []entry{symlink("esc", up), file("esc/canary", "pwned", 0o644)}, "esc/canary"},
		{"symlink-escape-mkdir", []entry{symlink("esc", up), dir("esc/newdir/", 0o755)}, "esc/newdir/"},
		{"hardlink-dotdot", []entry{hardlink("h", up+"/canary")}, "h"},
		{"hardlink-absolute", []entry{hardlink("h", canaryAbs)}, "h"},
		{"hardlink-through-symlink", []entry{symlink("esc", up), hardlink("h", "esc/canary")}, "h"},
		{"whiteout-through-symlink", []entry{symlink("esc", up), file("esc/.wh.canary", "", 0o644)}, "esc/.wh.canary"},
		{"whiteout-dotdot", []entry{file(up+"/.wh.canary", "", 0o644)}, up + "/.wh.canary"},
		{"char-device-outside-dev", []entry{dir("etc/", 0o755), chr}, "etc/mem"},
		{"block-device-outside-dev", []entry{blk}, "sda"},
		{"fifo-outside-dev", []entry{fifo}, "run/pipe"},
		{"device-as-dev", []entry{devItself}, "dev"},
		{"device-dev-dotdot", []entry{dir("dev/", 0o755), devDotDot}, "dev/../etc/null"},
		{"device-absolute-dev", []entry{devAbs}, "/dev/null"},
		{"device-dev-escape", []entry{dir("dev/", 0o755), devEscape}, "dev/" + up + "/null"},
		{"oversized-entry", []entry{file("big", big+"x", 0o644)}, "big"},
		{"oversized-layer", []entry{
			file("b1", big, 0o644), file("b2", big, 0o644), file("b3", big, 0o644), file("b4", big, 0o644), file("b5", big, 0o644),
		}, "b4"},
	}
	for i, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			// A benign entry first, so a partial unpack exists when it fails.
			entries := append([]entry{file("first", "benign", 0o644)}, tc.entries...)
			bad := layer(t, entries...)
			img := buildImage(t, v1.Config{}, layer(t, file("base", "b", 0o644)), bad)
			ref := push(t, host, "fn/hostile:"+strings.ReplaceAll(tc.name, "_", "-")+"-"+string(rune('a'+i)), img)

			_, err := e.svc.Pull(ctx, ref)
			if !errors.Is(err, ErrUnsafeLayer) {
				t.Fatalf("Pull err = %v, want ErrUnsafeLayer", err)
			}
			var ue *UnsafeLayerError
			if !errors.As(err, &ue) {
				t.Fatalf("err %T is not an *UnsafeLayerError", err)
			}
			if ue.Layer != layerDigest(t, bad) {
				t.Errorf("error names layer %s, want %s", ue.Layer, layerDigest(t, bad))
			}
			if ue.Path != tc.bad {
				t.Errorf("error names entry %q, want %q", ue.Path, tc.bad)
			}
			if !strings.Contains(err.Error(), layerDigest(t, bad)) {
				t.Errorf("message %q lacks the layer digest", err)
			}
			t.Logf("rejected: %v", err)

			e.checkCanary(t)
			e.checkTmpEmpty(t)
			if _, err := os.Stat(filepath.Dir(e.svc.digestDir(imageDigest(t, img)))); err != nil {
				t.Fatal(err)
			}
			if _, err := os.Stat(e.svc.digestDir(imageDigest(t, img))); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("failed image left a digest dir: %v", err)
			}
			if _, err := e.svc.Get(ctx, ref); !errors.Is(err, ErrNotFound) {
				t.Errorf("failed image was recorded: %v", err)
			}
			if s := readFile(t, filepath.Join(goodImg.Rootfs, "ok")); s != "good" {
				t.Errorf("good image changed: %q", s)
			}
			if _, err := os.Stat("/etc/x"); err == nil && tc.name == "absolute-etc" {
				t.Errorf("/etc/x exists on the host")
			}
		})
	}
	if l, err := e.svc.List(ctx); err != nil || len(l) != 1 {
		t.Errorf("List after hostile pulls = %+v, %v; want only the good image", l, err)
	}
}

// Root filesystems made by mmdebstrap, debootstrap or `docker export` carry
// device nodes and FIFOs under /dev. They are skipped (never created: every
// sandbox mounts its own /dev), the rest of the layer is unpacked, and the
// skip is logged. Even when dev is a symlink leaving the rootfs nothing is
// written through it.
func TestSpecialFilesUnderDevSkipped(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	var logs strings.Builder
	e.svc.log = slog.New(slog.NewTextHandler(&logs, nil))
	chr := func(name string, major, minor int64) entry {
		return entry{hdr: tar.Header{Typeflag: tar.TypeChar, Name: name, Mode: 0o666, Devmajor: major, Devminor: minor}}
	}
	img := buildImage(t, v1.Config{},
		layer(t, dir("./", 0o755), dir("./dev/", 0o755),
			chr("./dev/console", 5, 1), chr("./dev/null", 1, 3), chr("./dev/zero", 1, 5),
			entry{hdr: tar.Header{Typeflag: tar.TypeBlock, Name: "./dev/sda", Mode: 0o660, Devmajor: 8}},
			entry{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "./dev/initctl", Mode: 0o600}},
			dir("./dev/pts/", 0o755), symlink("./dev/fd", "/proc/self/fd"),
			dir("./etc/", 0o755), file("./etc/hostname", "debian\n", 0o644)),
		// A later layer that turns dev into an escaping symlink: a device
		// under it is still only skipped.
		layer(t, symlink("dev", up), chr("dev/canary", 1, 3)),
	)
	got, err := e.svc.Pull(ctx, push(t, host, "fn/rootfs:v1", img))
	if err != nil {
		t.Fatalf("Pull of a rootfs with /dev nodes: %v", err)
	}
	if s := readFile(t, filepath.Join(got.Rootfs, "etc/hostname")); s != "debian\n" {
		t.Errorf("etc/hostname = %q", s)
	}
	if l, err := os.Readlink(filepath.Join(got.Rootfs, "dev")); err != nil || l != up {
		t.Errorf("dev -> %q, %v; want the second layer's symlink", l, err)
	}
	e.checkCanary(t)
	// The first layer alone: /dev holds its directories and symlinks, no nodes.
	first := buildImage(t, v1.Config{}, layer(t, dir("dev/", 0o755),
		chr("dev/null", 1, 3), entry{hdr: tar.Header{Typeflag: tar.TypeFifo, Name: "dev/initctl", Mode: 0o600}},
		dir("dev/shm/", 0o1777), symlink("dev/stdin", "/proc/self/fd/0")))
	got, err = e.svc.Pull(ctx, push(t, host, "fn/rootfs:v2", first))
	if err != nil {
		t.Fatal(err)
	}
	ents, err := os.ReadDir(filepath.Join(got.Rootfs, "dev"))
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, d := range ents {
		names = append(names, d.Name())
	}
	if strings.Join(names, " ") != "shm stdin" {
		t.Errorf("dev holds %q, want only shm and stdin", names)
	}
	for _, want := range []string{"skipped device nodes and FIFOs under /dev", "count=5", "dev/console", "count=2"} {
		if !strings.Contains(logs.String(), want) {
			t.Errorf("log lacks %q:\n%s", want, logs.String())
		}
	}
	e.checkTmpEmpty(t)
}

// A symlink whose target is outside is fine to create, and a later entry of
// the same name replaces the link instead of writing through it.
func TestReplacingEscapingSymlinkDoesNotFollowIt(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	img := buildImage(t, v1.Config{},
		layer(t, symlink("x", up+"/canary"), symlink("y", "/etc/passwd")),
		layer(t, file("x", "replaced", 0o644)),
	)
	got, err := e.svc.Pull(ctx, push(t, host, "fn/links:v1", img))
	if err != nil {
		t.Fatalf("Pull: %v", err)
	}
	if s := readFile(t, filepath.Join(got.Rootfs, "x")); s != "replaced" {
		t.Errorf("x = %q", s)
	}
	if fi, err := os.Lstat(filepath.Join(got.Rootfs, "x")); err != nil || !fi.Mode().IsRegular() {
		t.Errorf("x is not a regular file: %v %v", fi.Mode(), err)
	}
	if l, err := os.Readlink(filepath.Join(got.Rootfs, "y")); err != nil || l != "/etc/passwd" {
		t.Errorf("y -> %q, %v", l, err)
	}
	e.checkCanary(t)
}

// Layers that are merely broken (not hostile) fail with ErrInvalid naming
// the layer and entry.
func TestBrokenLayersInvalid(t *testing.T) {
	ctx := context.Background()
	host, _ := startRegistry(t)
	e := newEnv(t, nil)
	for i, entries := range [][]entry{
		{file("a", "file", 0o644), file("a/b", "under a file", 0o644)},
		{hardlink("h", "missing/target")},
		{symlink("loop1", "loop2"), symlink("loop2", "loop1"), file("loop1/x", "x", 0o644)},
	} {
		l := layer(t, entries...)
		ref := push(t, host, fmt.Sprintf("fn/broken:%d", i), buildImage(t, v1.Config{}, l))
		_, err := e.svc.Pull(ctx, ref)
		if !errors.Is(err, ErrInvalid) || !strings.Contains(err.Error(), layerDigest(t, l)) {
			t.Errorf("case %d: err = %v, want ErrInvalid naming layer %s", i, err, layerDigest(t, l))
			continue
		}
		t.Logf("case %d: %v", i, err)
	}
	e.checkTmpEmpty(t)
}

// A full disk is the node's problem, not the image's: the error is not
// classified as invalid or unavailable, and nothing is left behind.
func TestDiskFullIsNotInvalid(t *testing.T) {
	testutil.RequiresRoot(t)
	ctx := context.Background()
	host, _ := startRegistry(t)
	mnt := t.TempDir()
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=2m"); err != nil {
		t.Fatalf("mount a small tmpfs: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, unix.MNT_DETACH); err != nil {
			t.Errorf("unmount %s: %v", mnt, err)
		}
	})
	svc, err := New(ctx, Options{Root: filepath.Join(mnt, "images"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	defer svc.Close()
	l := layer(t, file("big", strings.Repeat("x", 3<<20), 0o644))
	_, err = svc.Pull(ctx, push(t, host, "fn/big:v1", buildImage(t, v1.Config{}, l)))
	if err == nil || errors.Is(err, ErrInvalid) || errors.Is(err, ErrUnavailable) || errors.Is(err, ErrUnsafeLayer) {
		t.Fatalf("Pull onto a full disk: err = %v, want an unclassified error", err)
	}
	if !errors.Is(err, unix.ENOSPC) || !strings.Contains(err.Error(), `"big"`) {
		t.Errorf("err = %v, want ENOSPC naming entry \"big\"", err)
	}
	t.Logf("%v", err)
	ents, _ := os.ReadDir(filepath.Join(mnt, "images", "tmp"))
	if len(ents) != 0 {
		t.Errorf("leftovers in tmp: %v", ents)
	}
}
