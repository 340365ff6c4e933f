package standin

import (
	"archive/tar"
	"context"
	"io"
	"log"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

var files = []File{{Path: "bin/", Mode: 0o755}, {Path: "bin/busybox", Mode: 0o755, Body: "#!/bin/sh\n"},
	{Path: "bin/sh", Link: "busybox"}, {Path: "home/u/", Mode: 0o700, UID: 1000, GID: 1000}}

// TestLayer: entries in order with their types, owners and the epoch as
// time; the same files give the same digest; an empty path is refused.
func TestLayer(t *testing.T) {
	l, err := Layer(files)
	if err != nil {
		t.Fatal(err)
	}
	again, _ := Layer(slices.Clone(files))
	d1, _ := l.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("digests %s and %s of the same files", d1, d2)
	}
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	var got []string
	for {
		h, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		if h.ModTime.Unix() != 0 {
			t.Errorf("%s: mtime %v", h.Name, h.ModTime)
		}
		got = append(got, string(h.Typeflag)+" "+h.Name+" "+h.Linkname+" "+strings.Repeat("u", h.Uid/1000))
	}
	want := []string{"5 bin/  ", "0 bin/busybox  ", "2 bin/sh busybox ", "5 home/u/  u"}
	if !slices.Equal(got, want) {
		t.Errorf("entries %q, want %q", got, want)
	}
	if _, err := Layer([]File{{Mode: 0o644}}); err == nil || !strings.Contains(err.Error(), "empty path") {
		t.Errorf("empty path: %v", err)
	}
}

// TestPush: every name of an image is pushed with its config and layers.
func TestPush(t *testing.T) {
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	addr := strings.TrimPrefix(srv.URL, "http://")
	base, err := Layer(files)
	if err != nil {
		t.Fatal(err)
	}
	imgs := []Image{
		{Repos: []string{"a/x:1", "b/x:latest"}, Cmd: []string{"sh"}, Env: []string{"PATH=/bin"}},
		{Repos: []string{"c:2"}, Files: []File{{Path: "www/", Mode: 0o755}}, Entrypoint: []string{"/bin/sh"}, User: "1000", Ports: []string{"80/tcp"}},
	}
	if err := Push(context.Background(), addr, base, imgs); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		ref    string
		layers int
		check  func(cmd, entry []string, user string, ports map[string]struct{}) bool
	}{
		{"a/x:1", 1, func(cmd, entry []string, user string, _ map[string]struct{}) bool {
			return slices.Equal(cmd, []string{"sh"}) && entry == nil
		}},
		{"b/x:latest", 1, func(cmd, _ []string, _ string, _ map[string]struct{}) bool { return slices.Equal(cmd, []string{"sh"}) }},
		{"c:2", 2, func(_, entry []string, user string, ports map[string]struct{}) bool {
			_, ok := ports["80/tcp"]
			return slices.Equal(entry, []string{"/bin/sh"}) && user == "1000" && ok
		}},
	} {
		ref, err := name.ParseReference(addr+"/"+c.ref, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		img, err := remote.Image(ref)
		if err != nil {
			t.Fatalf("pull %s: %v", c.ref, err)
		}
		ls, _ := img.Layers()
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if len(ls) != c.layers || cf.OS != "linux" || cf.Architecture != "amd64" || !c.check(cf.Config.Cmd, cf.Config.Entrypoint, cf.Config.User, cf.Config.ExposedPorts) {
			t.Errorf("%s: %d layers, config %+v", c.ref, len(ls), cf.Config)
		}
	}
	if err := Push(context.Background(), addr, base, []Image{{Cmd: []string{"sh"}}}); err == nil {
		t.Error("an image without a name was pushed")
	}
}
