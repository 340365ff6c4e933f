package build

import (
	"archive/tar"
	"bytes"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/static"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"

	"vhive.dev/vhive/internal/image"
)

// epoch is every timestamp in an image, for reproducible digests.
var epoch = time.Unix(0, 0).UTC()

const defaultPath = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

// newImage packages binary for t; for TargetWasm, asTar selects the
// tar-layer variant written into docker-archives (see the package doc).
func newImage(function string, t Target, arch string, binary []byte, asTar bool) (v1.Image, error) {
	switch {
	case t == TargetLinux:
		return linuxImage(function, arch, binary)
	case t == TargetWasm && asTar:
		return wasmTarImage(function, binary)
	case t == TargetWasm:
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
	env := []string{"GUEST_PORT=" + strconv.Itoa(GuestPort), defaultPath}
	var labels map[string]string
	if sc, ok := serverFunctions[function]; ok {
		// The deploy defaults of a function serving its own protocol
		// (the orchestrator's Label* names).
		port = strconv.Itoa(sc.port) + "/tcp"
		labels = map[string]string{"dev.vhive.protocol": sc.protocol, "dev.vhive.port": strconv.Itoa(sc.port)}
		if sc.readinessPath != "" {
			labels["dev.vhive.readiness-path"] = sc.readinessPath
		}
		if sc.protocol == "http" {
			env = []string{"PORT=" + strconv.Itoa(sc.port), defaultPath}
		}
	}
	img, err := baseImage(&v1.ConfigFile{
		Architecture: arch,
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint:   []string{entry},
			Env:          env,
			ExposedPorts: map[string]struct{}{port: {}},
			WorkingDir:   "/",
			Labels:       labels,
		},
	})
	if err != nil {
		return nil, err
	}
	return appendTarLayer(img, entry, binary, 0o755)
}

// appendTarLayer adds the layer holding mount points and the file at path.
func appendTarLayer(img v1.Image, path string, data []byte, mode int64) (v1.Image, error) {
	layerTar, err := rootfsTar(path, data, mode)
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
			CreatedBy: "vhive functions/build: " + path,
		},
	})
}

// rootfsTar is a tar layer of mount points and one file at path.
func rootfsTar(path string, data []byte, mode int64) ([]byte, error) {
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
		Typeflag: tar.TypeReg, Name: strings.TrimPrefix(path, "/"), Mode: mode, Size: int64(len(data)),
		ModTime: epoch, Format: tar.FormatPAX,
	}
	if err := tw.WriteHeader(h); err != nil {
		return nil, err
	}
	if _, err := tw.Write(data); err != nil {
		return nil, err
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func wasmImage(function string, module []byte) (v1.Image, error) {
	img, err := baseImage(wasmConfig(function))
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
	return mutate.Annotations(img, map[string]string{WasmModuleAnnotation: wasmPath(function)}).(v1.Image), nil
}

func wasmPath(function string) string { return "/" + function + ".wasm" }

// wasmConfig is the config of both wasm image variants.
func wasmConfig(function string) *v1.ConfigFile {
	return &v1.ConfigFile{
		Architecture: "wasm",
		OS:           "wasip1",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Labels: map[string]string{WasmModuleAnnotation: wasmPath(function)},
		},
	}
}

// wasmTarImage is the docker-archive variant of a wasm image: a docker-archive
// keeps no layer media types (nor annotations), so the module is a file in an
// ordinary tar layer, named by the config label.
func wasmTarImage(function string, module []byte) (v1.Image, error) {
	img, err := baseImage(wasmConfig(function))
	if err != nil {
		return nil, err
	}
	// No manifest annotation: a docker-archive keeps none, and an image
	// written there exactly as its import rebuilds it has one digest.
	return appendTarLayer(img, wasmPath(function), module, 0o644)
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

// formatDigest is the manifest digest vhive's image service records for img
// imported from format f: its own for a layout; for a docker-archive, which
// keeps no manifest, that of the manifest the importer builds
// (image.FromDockerArchive), equal to img's own when img has OCI media types
// and no annotations.
func formatDigest(img v1.Image, f Format) (string, error) {
	if f == FormatTar {
		var err error
		if img, err = image.FromDockerArchive(img); err != nil {
			return "", err
		}
	}
	d, err := img.Digest()
	if err != nil {
		return "", err
	}
	return d.String(), nil
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

// WriteImage writes img, referenced as ref, under outDir as name/ (an OCI
// layout) and name.tar (a docker-archive) for the formats asked (default
// both), replacing earlier outputs. It is how images built elsewhere (the
// Debian-based Python functions, internal/debimage) land beside these.
func WriteImage(img v1.Image, outDir, name, ref string, formats []Format) (Image, error) {
	if len(formats) == 0 {
		formats = []Format{FormatLayout, FormatTar}
	}
	res := Image{Function: name, Target: TargetLinux, Ref: ref}
	for _, f := range formats {
		var (
			d   string
			err error
		)
		switch f {
		case FormatLayout:
			if d, err = formatDigest(img, f); err == nil {
				res.Digest, res.Layout = d, filepath.Join(outDir, name)
				err = writeLayout(res.Layout, ref, img)
			}
		case FormatTar:
			if d, err = formatDigest(img, f); err == nil {
				res.TarballDigest, res.Tarball = d, filepath.Join(outDir, name+".tar")
				err = writeTarball(res.Tarball, ref, img)
			}
		default:
			err = fmt.Errorf("format %q is unknown", f)
		}
		if err != nil {
			return Image{}, fmt.Errorf("%s: write %s: %w", ref, f, err)
		}
	}
	return res, nil
}
