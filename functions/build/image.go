package build

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// epoch is every timestamp in an image, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

func newImage(function string, t Target, arch string, binary []byte) (v1.Image, error) {
	switch t {
	case TargetLinux:
		return linuxImage(function, arch, binary)
	case TargetWasm:
		return wasmImage(function, binary)
	}
	return nil, fmt.Errorf("target %q is unknown", t)
}

// baseImage is an empty OCI image with cfg as its config.
func baseImage(cfg *v1.ConfigFile) (v1.Image, error) {
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	return mutate.ConfigFile(img, cfg)
}

func linuxImage(function, arch string, binary []byte) (v1.Image, error) {
	entry := "/usr/local/bin/" + function
	port := strconv.Itoa(GuestPort) + "/tcp"
	img, err := baseImage(&v1.ConfigFile{
		Architecture: arch,
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint:   []string{entry},
			Env:          []string{"GUEST_PORT=" + strconv.Itoa(GuestPort), defaultPath},
			ExposedPorts: map[string]struct{}{port: {}},
			WorkingDir:   "/",
		},
	})
	if err != nil {
		return nil, err
	}
	layerTar, err := rootfsTar(entry, binary)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("layer: %w", err)
	}
	return mutate.Append(img, mutate.Addendum{
		Layer:     layer,
		MediaType: types.OCILayer,
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "vhive functions/build: " + entry,
		},
	})
}

// rootfsTar is the Linux image's only layer: mount points and the binary.
func rootfsTar(entry string, binary []byte) ([]byte, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	dir := func(name string, mode int64) *tar.Header {
		return &tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: mode, ModTime: epoch, Format: tar.FormatPAX}
	}
	hdrs := []*tar.Header{
		dir("dev/", 0o755), dir("etc/", 0o755), dir("proc/", 0o555), dir("sys/", 0o555),
		dir("tmp/", 0o1777), dir("usr/", 0o755), dir("usr/local/", 0o755), dir("usr/local/bin/", 0o755),
	}
	for _, h := range hdrs {
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
	}
	h := &tar.Header{
		Typeflag: tar.TypeReg, Name: entry[1:], Mode: 0o755, Size: int64(len(binary)),
		ModTime: epoch, Format: tar.FormatPAX,
	}
	if err := tw.WriteHeader(h); err != nil {
		return nil, err
	}
	if _, err := tw.Write(binary); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func wasmImage(function string, module []byte) (v1.Image, error) {
	img, err := baseImage(&v1.ConfigFile{
		Architecture: "wasm",
		OS:           "wasip1",
		Created:      v1.Time{Time: epoch},
	})
	if err != nil {
		return nil, err
	}
	layer := static.NewLayer(module, WasmLayerMediaType)
	img, err = mutate.Append(img, mutate.Addendum{
		Layer:       layer,
		MediaType:   WasmLayerMediaType,
		Annotations: map[string]string{"org.opencontainers.image.title": function + ".wasm"},
		History: v1.History{
			Created:   v1.Time{Time: epoch},
			CreatedBy: "vhive functions/build: " + function + ".wasm (wasip1 reactor)",
		},
	})
	if err != nil {
		return nil, err
	}
	d, err := layer.Digest()
	if err != nil {
		return nil, err
	}
	return mutate.Annotations(img, map[string]string{WasmModuleAnnotation: d.String()}).(v1.Image), nil
}

// writeLayout writes img as a fresh OCI layout at dir (replacing it).
func writeLayout(dir, ref string, img v1.Image) error {
	tmp, err := os.MkdirTemp(filepath.Dir(dir), "."+filepath.Base(dir)+"-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	p, err := layout.Write(tmp, empty.Index)
	if err != nil {
		return err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		RefNameAnnotation:          ref,
		"io.containerd.image.name": ref,
	})); err != nil {
		return err
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return err
	}
	if err := os.RemoveAll(dir); err != nil {
		return err
	}
	return os.Rename(tmp, dir)
}

// writeTarball writes img as a docker-archive at path (replacing it).
func writeTarball(path, ref string, img v1.Image) error {
	r, err := name.ParseReference(ref)
	if err != nil {
		return fmt.Errorf("reference %q: %w", ref, err)
	}
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	defer os.Remove(tmp)
	if err := tarball.Write(r, img, f); err != nil {
		f.Close()
		return err
	}
	if err := f.Chmod(0o644); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(tmp, path)
}
