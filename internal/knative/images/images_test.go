package images

import (
	"archive/tar"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"vhive.dev/vhive/internal/knative/build"
)

// newRegistry is go-containerregistry's registry (the one the cluster's
// vhive-critest-registry serves) on a loopback port; it returns host:port.
func newRegistry(t *testing.T) string {
	t.Helper()
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://")
}

// pull fetches ref back from the registry.
func pull(t *testing.T, ref string) v1.Image {
	t.Helper()
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	img, err := remote.Image(r)
	if err != nil {
		t.Fatalf("pull %s: %v", ref, err)
	}
	return img
}

// files reads the image's single layer: each file's header and content.
func files(t *testing.T, img v1.Image) (map[string]*tar.Header, map[string][]byte) {
	t.Helper()
	layers, err := img.Layers()
	if err != nil || len(layers) != 1 {
		t.Fatalf("layers: %d, %v", len(layers), err)
	}
	rc, err := layers[0].Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	hdrs, data := map[string]*tar.Header{}, map[string][]byte{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return hdrs, data
		}
		if err != nil {
			t.Fatal(err)
		}
		b, err := io.ReadAll(tr)
		if err != nil {
			t.Fatal(err)
		}
		hdrs[h.Name], data[h.Name] = h, b
	}
}

// TestBuildPushPull packages a real binary (this test's own), pushes it to
// a registry on 127.0.0.1 and pulls it back: the digest is the one built,
// the config runs /ko-app/<name> as 65532 with KO_DATA_PATH, and the layer
// holds the binary byte for byte, executable, with the nonroot user in
// /etc/passwd and a sticky /tmp. Building twice gives the same digest.
func TestBuildPushPull(t *testing.T) {
	reg := newRegistry(t)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	img, err := Build(Spec{Name: "controller", Binary: self})
	if err != nil {
		t.Fatal(err)
	}
	again, err := Build(Spec{Name: "controller", Binary: self})
	if err != nil {
		t.Fatal(err)
	}
	d1, _ := img.Digest()
	d2, _ := again.Digest()
	if d1 != d2 {
		t.Errorf("two builds of one binary: %s and %s", d1, d2)
	}
	ref := reg + "/knative/controller:v0.50.0"
	if err := Push(context.Background(), img, ref); err != nil {
		t.Fatal(err)
	}
	got := pull(t, ref)
	if d, err := got.Digest(); err != nil || d != d1 {
		t.Fatalf("pulled digest %s (%v), pushed %s", d, err, d1)
	}
	cfg, err := got.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(cfg.Config.Entrypoint, []string{"/ko-app/controller"}) || cfg.Config.User != NonRoot ||
		!slices.Contains(cfg.Config.Env, "KO_DATA_PATH="+KoDataPath) || cfg.OS != "linux" {
		t.Errorf("config: %+v", cfg.Config)
	}
	hdrs, data := files(t, got)
	want, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if h := hdrs["ko-app/controller"]; h == nil || h.Mode != 0o755 || !bytes.Equal(data["ko-app/controller"], want) {
		t.Fatalf("ko-app/controller: %+v, %d bytes (want %d)", h, len(data["ko-app/controller"]), len(want))
	}
	if !strings.Contains(string(data["etc/passwd"]), "nonroot:x:65532:65532:") {
		t.Errorf("/etc/passwd: %q", data["etc/passwd"])
	}
	if h := hdrs["tmp/"]; h == nil || h.Mode != 0o1777 {
		t.Errorf("tmp/: %+v", h)
	}
	if h := hdrs["home/nonroot/"]; h == nil || h.Uid != 65532 {
		t.Errorf("home/nonroot/: %+v", h)
	}
	if hdrs["var/run/ko/"] == nil {
		t.Errorf("no %s", KoDataPath)
	}
}

// TestPublishAll publishes a cache laid out as make knative-tools leaves
// it (binaries and manifest) and finds each image under its reference, the
// one the install YAML names for serving's commands.
func TestPublishAll(t *testing.T) {
	reg := newRegistry(t)
	cache := t.TempDir()
	bin := filepath.Join(cache, "bin")
	if err := os.MkdirAll(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	m := build.Manifest{Components: []build.Built{
		{Name: "knative-serving", Version: "v0.50.0", Binaries: []string{"knative-activator", "knative-queue"}},
		{Name: "traefik", Version: "v3.6.12", Binaries: []string{"traefik"}},
	}}
	for _, c := range m.Components {
		for _, b := range c.Binaries {
			if err := os.WriteFile(filepath.Join(bin, b), []byte("#!/bin/true "+b+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	mj, _ := json.Marshal(m)
	if err := os.WriteFile(filepath.Join(bin, build.ManifestName), mj, 0o644); err != nil {
		t.Fatal(err)
	}
	pub, err := PublishAll(context.Background(), cache, reg)
	if err != nil {
		t.Fatal(err)
	}
	wantRefs := map[string]string{
		reg + "/knative/activator:v0.50.0": "activator", reg + "/knative/queue:v0.50.0": "queue",
		reg + "/knative/traefik:v3.6.12": "traefik",
	}
	if len(pub) != len(wantRefs) {
		t.Fatalf("published %+v", pub)
	}
	for _, p := range pub {
		entry, ok := wantRefs[p.Ref]
		if !ok {
			t.Fatalf("unexpected reference %s", p.Ref)
		}
		img := pull(t, p.Ref)
		if d, _ := img.Digest(); d != p.Digest {
			t.Errorf("%s: digest %s, published %s", p.Ref, d, p.Digest)
		}
		cfg, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if cfg.Config.Entrypoint[0] != "/ko-app/"+entry {
			t.Errorf("%s: entrypoint %v", p.Ref, cfg.Config.Entrypoint)
		}
	}
}

// TestPublishAllNoManifest names the missing step.
func TestPublishAllNoManifest(t *testing.T) {
	_, err := PublishAll(context.Background(), t.TempDir(), "127.0.0.1:1")
	if err == nil || !strings.Contains(err.Error(), "make knative-tools") {
		t.Fatalf("err %v", err)
	}
}
