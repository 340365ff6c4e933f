package image

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"os"
	"path"
	"path/filepath"
	"strings"
	"testing"
)

func TestCleanEntryPath(t *testing.T) {
	for _, tc := range []struct {
		in, want string
		err      error
	}{
		{"a/b", "a/b", nil},
		{"./a/b/", "a/b", nil},
		{"a//b/./c", "a/b/c", nil},
		{".", ".", nil},
		{"./", ".", nil},
		{".wh..wh..opq", ".wh..wh..opq", nil},
		{"a/..b/c..", "a/..b/c..", nil},
		{"", "", errEmptyName},
		{"/etc/passwd", "", errAbsolutePath},
		{"//x", "", errAbsolutePath},
		{"../x", "", errDotDot},
		{"a/../../x", "", errDotDot},
		{"a/..", "", errDotDot},
		{"a/../b", "", errDotDot}, // harmless but never produced by real tools
		{"a\x00b", "", errNULInName},
	} {
		got, err := cleanEntryPath(tc.in)
		if got != tc.want || !errors.Is(err, tc.err) {
			t.Errorf("cleanEntryPath(%q) = %q, %v; want %q, %v", tc.in, got, err, tc.want, tc.err)
		}
	}
}

// FuzzCleanEntryPath checks that an accepted name is clean, relative, stays
// under any root it is joined to, and is a fixed point.
func FuzzCleanEntryPath(f *testing.F) {
	for _, s := range []string{"a/b", "./a", "../x", "/etc/passwd", "a/../../b", ".", "a//b", ".wh.x", "a\x00", "....//..//", `a\..\b`} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, name string) {
		p, err := cleanEntryPath(name)
		if err != nil {
			if p != "" {
				t.Fatalf("error %v with a result %q", err, p)
			}
			return
		}
		if p == "" || strings.HasPrefix(p, "/") || strings.IndexByte(p, 0) >= 0 {
			t.Fatalf("cleanEntryPath(%q) = %q: empty, absolute or with NUL", name, p)
		}
		if path.Clean(p) != p {
			t.Fatalf("cleanEntryPath(%q) = %q is not clean (%q)", name, p, path.Clean(p))
		}
		for _, c := range strings.Split(p, "/") {
			if c == ".." || (c == "." && p != ".") || c == "" {
				t.Fatalf("cleanEntryPath(%q) = %q has component %q", name, p, c)
			}
		}
		const root = "/root/fs"
		if j := path.Join(root, p); j != root && !strings.HasPrefix(j, root+"/") {
			t.Fatalf("cleanEntryPath(%q) = %q escapes: %q", name, p, j)
		}
		if again, err := cleanEntryPath(p); err != nil || again != p {
			t.Fatalf("not a fixed point: %q → %q, %v", p, again, err)
		}
	})
}

// FuzzUnpackEntries applies a fuzzed three-entry layer to a real rootfs and
// checks that nothing outside it was created or changed, whatever the
// unpacker accepted or refused.
func FuzzUnpackEntries(f *testing.F) {
	f.Add("a", byte(tar.TypeSymlink), "../..", "a/canary", byte(tar.TypeReg), "", "b", byte(tar.TypeLink), "a/canary")
	f.Add("a", byte(tar.TypeSymlink), "/", "a/x/y", byte(tar.TypeDir), "", "c", byte(tar.TypeReg), "")
	f.Add("d/.wh..wh..opq", byte(tar.TypeReg), "", "../canary", byte(tar.TypeReg), "", "e", byte(tar.TypeSymlink), "..")
	f.Add("l", byte(tar.TypeSymlink), "..", "l/.wh.canary", byte(tar.TypeReg), "", "h", byte(tar.TypeLink), "l/canary")
	f.Fuzz(func(t *testing.T, n1 string, t1 byte, l1 string, n2 string, t2 byte, l2 string, n3 string, t3 byte, l3 string) {
		base := t.TempDir()
		canary := filepath.Join(base, "canary")
		if err := os.WriteFile(canary, []byte("c"), 0o644); err != nil {
			t.Fatal(err)
		}
		rootfs := filepath.Join(base, "rootfs")
		if err := os.Mkdir(rootfs, 0o755); err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, e := range []struct {
			n    string
			typ  byte
			link string
		}{{n1, t1, l1}, {n2, t2, l2}, {n3, t3, l3}} {
			h := &tar.Header{Name: e.n, Typeflag: e.typ, Linkname: e.link, Mode: 0o644}
			body := ""
			if e.typ == tar.TypeReg {
				body = "pwned"
				h.Size = int64(len(body))
			}
			if tw.WriteHeader(h) != nil {
				return // not encodable: no such layer can exist
			}
			tw.Write([]byte(body))
		}
		if tw.Close() != nil {
			return
		}
		root, err := os.OpenRoot(rootfs)
		if err != nil {
			t.Fatal(err)
		}
		defer root.Close()
		u := newUnpacker(root, 1<<20, 1<<20)
		_ = u.applyLayer(context.Background(), "sha256:fuzz", &buf)
		_ = u.finish()
		if b, err := os.ReadFile(canary); err != nil || string(b) != "c" {
			t.Fatalf("canary changed: %q %v", b, err)
		}
		ents, err := os.ReadDir(base)
		if err != nil {
			t.Fatal(err)
		}
		if len(ents) != 2 {
			t.Fatalf("entries outside the rootfs: %v", ents)
		}
		if fi, err := os.Lstat(rootfs); err != nil || !fi.IsDir() {
			t.Fatalf("rootfs replaced: %v %v", fi, err)
		}
	})
}
