// Package images packages the binaries internal/knative/build puts in the
// cache as OCI images and pushes them to the cluster's registry, the way ko
// packages Knative's releases: one static binary at /ko-app/<name>, its
// entrypoint, on a minimal root (the distroless static layout Knative's
// images use: /etc/passwd and /etc/group naming the nonroot user 65532,
// /tmp, /home/nonroot, an empty KO_DATA_PATH directory), run as 65532.
// Digests are reproducible: every timestamp is the epoch.
package images

import (
	"archive/tar"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"vhive.dev/vhive/internal/knative/build"
)

// NonRoot is the user and group the images run as (distroless' nonroot).
const NonRoot = "65532:65532"

// KoDataPath is where ko puts a command's kodata; Knative reads
// $KO_DATA_PATH.
const KoDataPath = "/var/run/ko"

// Spec is one image.
type Spec struct {
	// Name is the binary's name in the image: /ko-app/<Name>.
	Name string
	// Binary is the binary's path on the host.
	Binary string
	// Env is added to the image's environment.
	Env []string
	// User is the image's user (default NonRoot).
	User string
	// Arch is the image's architecture (default runtime.GOARCH).
	Arch string
}

var epoch = time.Unix(0, 0).UTC()

// Build packages s.
func Build(s Spec) (v1.Image, error) {
	if s.Name == "" || strings.Contains(s.Name, "/") {
		return nil, fmt.Errorf("image of %q: a binary name without slashes is required", s.Name)
	}
	bin, err := os.ReadFile(s.Binary)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	if s.User == "" {
		s.User = NonRoot
	}
	if s.Arch == "" {
		s.Arch = runtime.GOARCH
	}
	entry := "/ko-app/" + s.Name
	cfg := &v1.ConfigFile{
		Architecture: s.Arch,
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint: []string{entry},
			Env: append([]string{
				"PATH=/usr/local/bin:/usr/bin:/bin:/ko-app",
				"SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt",
				"KO_DATA_PATH=" + KoDataPath,
			}, s.Env...),
			User:       s.User,
			WorkingDir: "/home/nonroot",
		},
	}
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	if img, err = mutate.ConfigFile(img, cfg); err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	layerTar, err := rootfs(entry, bin)
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("image %s: layer: %w", s.Name, err)
	}
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History:   v1.History{Created: v1.Time{Time: epoch}, CreatedBy: "vhive internal/knative/images: " + entry},
	})
	if err != nil {
		return nil, fmt.Errorf("image %s: %w", s.Name, err)
	}
	return img, nil
}

// rootfs is the image's single layer: the minimal root and the binary.
func rootfs(entry string, bin []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	type file struct {
		name     string
		mode     int64
		data     []byte
		uid, gid int
	}
	dir := func(name string, mode int64) file { return file{name: name, mode: mode} }
	files := []file{
		dir("etc/", 0o755), dir("etc/ssl/", 0o755), dir("etc/ssl/certs/", 0o755),
		{name: "etc/passwd", mode: 0o644, data: []byte("root:x:0:0:root:/root:/sbin/nologin\n" +
			"nobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n" +
			"nonroot:x:65532:65532:nonroot:/home/nonroot:/sbin/nologin\n")},
		{name: "etc/group", mode: 0o644, data: []byte("root:x:0:\nnobody:x:65534:\nnonroot:x:65532:\n")},
		dir("home/", 0o755), {name: "home/nonroot/", mode: 0o700, uid: 65532, gid: 65532},
		dir("ko-app/", 0o755), {name: strings.TrimPrefix(entry, "/"), mode: 0o755, data: bin},
		dir("tmp/", 0o1777), dir("var/", 0o755), dir("var/run/", 0o755), dir("var/run/ko/", 0o755),
	}
	if certs, err := os.ReadFile("/etc/ssl/certs/ca-certificates.crt"); err == nil {
		// The host's CA bundle (Debian's ca-certificates), as distroless
		// ships one; nothing here reaches outside the machine, but
		// Knative's clients load it.
		files = append(files, file{name: "etc/ssl/certs/ca-certificates.crt", mode: 0o644, data: certs})
	}
	for _, f := range files {
		h := &tar.Header{Name: f.name, Mode: f.mode, Uid: f.uid, Gid: f.gid, ModTime: epoch, Format: tar.FormatPAX}
		if strings.HasSuffix(f.name, "/") {
			h.Typeflag = tar.TypeDir
		} else {
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.data))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if _, err := tw.Write(f.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Push pushes img to ref over plain HTTP (the cluster's registry listens on
// loopback or a private address without TLS).
func Push(ctx context.Context, img v1.Image, ref string) error {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	return nil
}

// Ref is the reference of the image of a cached binary in registry: the
// binary's name without its knative- prefix under knative/, tagged with its
// component's version (install.Options.ImageFor names the serving ones the
// same way).
func Ref(registry, binary, version string) string {
	return registry + "/knative/" + strings.TrimPrefix(binary, "knative-") + ":" + version
}

// Published is one pushed image.
type Published struct {
	Binary string
	Ref    string
	Digest v1.Hash
}

// PublishAll packages every binary of the cache's manifest
// (cache/bin/knative-tools.json) and pushes it to registry under Ref.
func PublishAll(ctx context.Context, cache, registry string) ([]Published, error) {
	m, err := build.ReadManifest(cache)
	if err != nil {
		return nil, fmt.Errorf("publish: %w (run make knative-tools)", err)
	}
	if len(m.Components) == 0 {
		return nil, errors.New("publish: the manifest lists no component")
	}
	var out []Published
	for _, c := range m.Components {
		for _, b := range c.Binaries {
			img, err := Build(Spec{Name: strings.TrimPrefix(b, "knative-"), Binary: filepath.Join(cache, "bin", b)})
			if err != nil {
				return out, fmt.Errorf("publish: %w", err)
			}
			ref := Ref(registry, b, c.Version)
			if err := Push(ctx, img, ref); err != nil {
				return out, fmt.Errorf("publish: %w", err)
			}
			d, err := img.Digest()
			if err != nil {
				return out, fmt.Errorf("publish %s: %w", ref, err)
			}
			out = append(out, Published{Binary: b, Ref: ref, Digest: d})
		}
	}
	return out, nil
}
