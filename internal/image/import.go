package image

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// Annotations naming an image in an OCI layout's index.json.
const (
	annotationRefName        = "org.opencontainers.image.ref.name"
	annotationContainerdName = "io.containerd.image.name"
)

// Import unpacks an image from a local file: an OCI layout directory, an OCI
// archive (a tar of such a directory) or a docker archive (`docker save`);
// tarballs may be gzip-compressed. ref names the image; when empty the name
// comes from the archive (io.containerd.image.name or a full
// org.opencontainers.image.ref.name annotation, or a docker archive's
// RepoTags — all of them) and it is an ErrInvalid error if there is none.
// When the archive holds several images, ref selects one by that name.
func (s *Service) Import(ctx context.Context, path, ref string) (Image, error) {
	fi, err := os.Stat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return Image{}, fmt.Errorf("image: import %q: no such file or directory: %w", path, ErrNotFound)
	}
	if err != nil {
		return Image{}, fmt.Errorf("image: import %q: %w", path, err)
	}
	var want string
	if ref != "" {
		r, err := s.parseRef(ref)
		if err != nil {
			return Image{}, err
		}
		want = r.Name()
	}
	if fi.IsDir() {
		return s.importLayout(ctx, path, want)
	}
	kind, err := sniffArchive(path)
	if err != nil {
		return Image{}, err
	}
	switch kind {
	case "oci":
		tmp, err := os.MkdirTemp(s.tmpDir(), "import-")
		if err != nil {
			return Image{}, fmt.Errorf("image: import %q: %w", path, err)
		}
		defer os.RemoveAll(tmp)
		if err := s.extractArchive(ctx, path, tmp); err != nil {
			return Image{}, err
		}
		return s.importLayout(ctx, tmp, want)
	default:
		return s.importDocker(ctx, path, want)
	}
}

// openMaybeGzip opens a file, decompressing it if it starts with gzip magic.
func openMaybeGzip(path string) (io.ReadCloser, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	br := bufio.NewReader(f)
	magic, _ := br.Peek(2)
	if len(magic) == 2 && magic[0] == 0x1f && magic[1] == 0x8b {
		zr, err := gzip.NewReader(br)
		if err != nil {
			f.Close()
			return nil, err
		}
		return struct {
			io.Reader
			io.Closer
		}{zr, f}, nil
	}
	return struct {
		io.Reader
		io.Closer
	}{br, f}, nil
}

// sniffArchive tells an OCI archive ("oci") from a docker archive ("docker").
func sniffArchive(path string) (string, error) {
	rc, err := openMaybeGzip(path)
	if err != nil {
		return "", fmt.Errorf("image: import %q: %w", path, err)
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	docker := false
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			break
		}
		if err != nil {
			return "", fmt.Errorf("image: import %q: not a readable tar archive: %v: %w", path, err, ErrInvalid)
		}
		switch strings.TrimPrefix(hdr.Name, "./") {
		case "oci-layout":
			return "oci", nil
		case "manifest.json":
			docker = true
		}
	}
	if docker {
		return "docker", nil
	}
	return "", fmt.Errorf("image: import %q: neither an OCI archive (no oci-layout) nor a docker archive (no manifest.json): %w", path, ErrInvalid)
}

// extractArchive unpacks an OCI archive's regular files and directories into
// dir, refusing any other entry and any name that would leave dir.
func (s *Service) extractArchive(ctx context.Context, path, dir string) error {
	rc, err := openMaybeGzip(path)
	if err != nil {
		return fmt.Errorf("image: import %q: %w", path, err)
	}
	defer rc.Close()
	root, err := os.OpenRoot(dir)
	if err != nil {
		return fmt.Errorf("image: import %q: %w", path, err)
	}
	defer root.Close()
	tr := tar.NewReader(rc)
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return fmt.Errorf("image: import %q: read tar: %v: %w", path, err, ErrInvalid)
		}
		p, err := cleanEntryPath(hdr.Name)
		if err != nil {
			return fmt.Errorf("image: import %q: entry %q: %v: %w", path, hdr.Name, err, ErrInvalid)
		}
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := root.MkdirAll(p, 0o700); err != nil {
				return fmt.Errorf("image: import %q: entry %q: %w", path, hdr.Name, err)
			}
		case tar.TypeReg, '\x00':
			if hdr.Size > s.maxLayer {
				return fmt.Errorf("image: import %q: entry %q: %d bytes exceed the limit of %d: %w", path, hdr.Name, hdr.Size, s.maxLayer, ErrInvalid)
			}
			if i := strings.LastIndexByte(p, '/'); i > 0 {
				if err := root.MkdirAll(p[:i], 0o700); err != nil {
					return fmt.Errorf("image: import %q: entry %q: %w", path, hdr.Name, err)
				}
			}
			f, err := root.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			if err != nil {
				return fmt.Errorf("image: import %q: entry %q: %v: %w", path, hdr.Name, err, ErrInvalid)
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return fmt.Errorf("image: import %q: entry %q: %w", path, hdr.Name, err)
			}
		case tar.TypeXGlobalHeader:
		case tar.TypeSymlink, tar.TypeLink:
			// `docker save` (Docker 25+) writes an OCI layout plus legacy
			// <id>/layer.tar links into blobs/; the layout needs only its
			// regular files, so links are skipped, never created.
		default:
			return fmt.Errorf("image: import %q: entry %q: unexpected entry type %q in an OCI archive: %w", path, hdr.Name, hdr.Typeflag, ErrInvalid)
		}
	}
}

// layoutName returns the full reference an index entry names, if any.
func layoutName(d v1.Descriptor) string {
	if n := d.Annotations[annotationContainerdName]; n != "" {
		return n
	}
	n := d.Annotations[annotationRefName]
	// A bare tag ("latest") names no repository; only a full reference counts.
	if strings.ContainsAny(n, "/:@") {
		return n
	}
	return ""
}

func (s *Service) importLayout(ctx context.Context, dir, want string) (Image, error) {
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return Image{}, fmt.Errorf("image: import %q: not an OCI layout: %v: %w", dir, err, ErrInvalid)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return Image{}, fmt.Errorf("image: import %q: bad index.json: %v: %w", dir, err, ErrInvalid)
	}
	if len(im.Manifests) == 0 {
		return Image{}, fmt.Errorf("image: import %q: index.json lists no image: %w", dir, ErrInvalid)
	}
	type cand struct {
		d    v1.Descriptor
		name string
	}
	var cands []cand
	var names []string
	for _, d := range im.Manifests {
		c := cand{d: d}
		if n := layoutName(d); n != "" {
			if r, err := s.parseRef(n); err == nil {
				c.name = r.Name()
				names = append(names, c.name)
			}
		}
		cands = append(cands, c)
	}
	var pick *cand
	switch {
	case want != "":
		for i := range cands {
			if cands[i].name == want {
				pick = &cands[i]
				break
			}
		}
		if pick == nil && len(cands) == 1 {
			pick = &cands[0]
		}
		if pick == nil {
			return Image{}, fmt.Errorf("image: import %q: no image named %q (names: %v): %w", dir, want, names, ErrNotFound)
		}
	case len(cands) == 1:
		pick = &cands[0]
		if pick.name == "" {
			return Image{}, fmt.Errorf("image: import %q: the archive names no image (no %s or full %s annotation); pass a reference: %w", dir, annotationContainerdName, annotationRefName, ErrInvalid)
		}
		want = pick.name
	default:
		return Image{}, fmt.Errorf("image: import %q: the archive holds %d images (names: %v); pass a reference: %w", dir, len(cands), names, ErrInvalid)
	}

	var img v1.Image
	switch {
	case pick.d.MediaType.IsIndex():
		child, err := idx.ImageIndex(pick.d.Digest)
		if err != nil {
			return Image{}, fmt.Errorf("image: import %q: index %s: %v: %w", dir, pick.d.Digest, err, ErrInvalid)
		}
		img, err = pickFromIndex(dir, child)
		if err != nil {
			return Image{}, err
		}
	case pick.d.MediaType.IsImage():
		img, err = idx.Image(pick.d.Digest)
		if err != nil {
			return Image{}, fmt.Errorf("image: import %q: manifest %s: %v: %w", dir, pick.d.Digest, err, ErrInvalid)
		}
	default:
		return Image{}, fmt.Errorf("image: import %q: unsupported media type %q of %s: %w", dir, pick.d.MediaType, pick.d.Digest, ErrInvalid)
	}
	return s.store(ctx, []string{want}, img)
}

// dockerManifest is one entry of a docker archive's manifest.json.
type dockerManifest struct {
	Config   string   `json:"Config"`
	RepoTags []string `json:"RepoTags"`
	Layers   []string `json:"Layers"`
}

func readDockerManifest(path string) ([]dockerManifest, error) {
	rc, err := openMaybeGzip(path)
	if err != nil {
		return nil, err
	}
	defer rc.Close()
	tr := tar.NewReader(rc)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil, errors.New("no manifest.json")
		}
		if err != nil {
			return nil, err
		}
		if strings.TrimPrefix(hdr.Name, "./") != "manifest.json" {
			continue
		}
		var m []dockerManifest
		if err := json.NewDecoder(io.LimitReader(tr, 16<<20)).Decode(&m); err != nil {
			return nil, fmt.Errorf("manifest.json: %w", err)
		}
		return m, nil
	}
}

func (s *Service) importDocker(ctx context.Context, path, want string) (Image, error) {
	ms, err := readDockerManifest(path)
	if err != nil {
		return Image{}, fmt.Errorf("image: import %q: docker archive: %v: %w", path, err, ErrInvalid)
	}
	if len(ms) == 0 {
		return Image{}, fmt.Errorf("image: import %q: manifest.json lists no image: %w", path, ErrInvalid)
	}
	// Pick the entry and the references to record.
	pick := -1
	var refs []string
	var all []string
	for i, m := range ms {
		for _, t := range m.RepoTags {
			r, err := s.parseRef(t)
			if err != nil {
				continue
			}
			all = append(all, r.Name())
			if want != "" && r.Name() == want {
				pick = i
			}
			if want == "" && len(ms) == 1 {
				refs = append(refs, r.Name())
			}
		}
	}
	switch {
	case want != "":
		if pick < 0 && len(ms) == 1 {
			pick = 0
		}
		if pick < 0 {
			return Image{}, fmt.Errorf("image: import %q: no image tagged %q (tags: %v): %w", path, want, all, ErrNotFound)
		}
		refs = []string{want}
	case len(ms) > 1:
		return Image{}, fmt.Errorf("image: import %q: the archive holds %d images (tags: %v); pass a reference: %w", path, len(ms), all, ErrInvalid)
	default:
		pick = 0
		if len(refs) == 0 {
			return Image{}, fmt.Errorf("image: import %q: the archive has no RepoTags; pass a reference: %w", path, ErrInvalid)
		}
	}
	// tarball.Image selects by tag among several images; with one image
	// (or an untagged pick) nil selects it.
	var tag *name.Tag
	if len(ms) > 1 {
		t, err := name.NewTag(ms[pick].RepoTags[0])
		if err != nil {
			return Image{}, fmt.Errorf("image: import %q: tag %q: %v: %w", path, ms[pick].RepoTags[0], err, ErrInvalid)
		}
		tag = &t
	}
	dimg, err := tarball.Image(func() (io.ReadCloser, error) { return openMaybeGzip(path) }, tag)
	if err != nil {
		return Image{}, fmt.Errorf("image: import %q: docker archive: %v: %w", path, err, ErrInvalid)
	}
	img, err := FromDockerArchive(dimg)
	if err != nil {
		return Image{}, fmt.Errorf("image: import %q: docker archive: %v: %w", path, err, ErrInvalid)
	}
	return s.store(ctx, refs, img)
}

// FromDockerArchive returns img, an image read from a docker archive, as the
// store records it. A docker archive (manifest.json, the config, the layer
// blobs) carries no image manifest, so one is built here, always the same
// way: an OCI image manifest (application/vnd.oci.image.manifest.v1+json)
// whose config is the archive's config bytes (application/vnd.oci.image.
// config.v1+json) and whose layers are the archive's layer blobs in order,
// gzip ones as application/vnd.oci.image.layer.v1.tar+gzip, with no
// annotations. An image built with OCI media types and no manifest or layer
// annotations — every Linux image of functions/build — therefore has one
// digest however it arrives: from its OCI layout, from a registry, or from
// its docker archive. (go-containerregistry's own reading would call it a
// Docker schema 2 manifest, a second identity for the same bytes.)
//
// A layer stored uncompressed in the archive (`docker save`) keeps the
// digest go-containerregistry gives it, that of its gzip compression.
func FromDockerArchive(img v1.Image) (v1.Image, error) {
	m, err := img.Manifest()
	if err != nil {
		return nil, err
	}
	out := &v1.Manifest{
		SchemaVersion: 2,
		MediaType:     types.OCIManifestSchema1,
		Config: v1.Descriptor{
			MediaType: types.OCIConfigJSON,
			Size:      m.Config.Size,
			Digest:    m.Config.Digest,
		},
	}
	for _, l := range m.Layers {
		l.MediaType = ociLayerType(l.MediaType)
		l.Annotations = nil
		out.Layers = append(out.Layers, l)
	}
	raw, err := json.Marshal(out)
	if err != nil {
		return nil, err
	}
	return &ociDockerImage{Image: img, manifest: out, raw: raw}, nil
}

// ociLayerType is the OCI name of a Docker layer media type.
func ociLayerType(mt types.MediaType) types.MediaType {
	switch mt {
	case types.DockerLayer:
		return types.OCILayer
	case types.DockerUncompressedLayer:
		return types.OCIUncompressedLayer
	case types.DockerForeignLayer:
		return types.OCIRestrictedLayer
	}
	return mt
}

// ociDockerImage is a docker archive's image under its OCI manifest; config
// and layer content come from the archive.
type ociDockerImage struct {
	v1.Image
	manifest *v1.Manifest
	raw      []byte
}

func (o *ociDockerImage) MediaType() (types.MediaType, error) { return o.manifest.MediaType, nil }
func (o *ociDockerImage) Manifest() (*v1.Manifest, error)     { return o.manifest.DeepCopy(), nil }
func (o *ociDockerImage) RawManifest() ([]byte, error)        { return o.raw, nil }
func (o *ociDockerImage) Size() (int64, error)                { return int64(len(o.raw)), nil }

func (o *ociDockerImage) Digest() (v1.Hash, error) {
	h, _, err := v1.SHA256(bytes.NewReader(o.raw))
	return h, err
}

func (o *ociDockerImage) Layers() ([]v1.Layer, error) {
	ls, err := o.Image.Layers()
	if err != nil {
		return nil, err
	}
	out := make([]v1.Layer, len(ls))
	for i, l := range ls {
		out[i] = ociLayer{l}
	}
	return out, nil
}

func (o *ociDockerImage) LayerByDigest(h v1.Hash) (v1.Layer, error) {
	l, err := o.Image.LayerByDigest(h)
	if err != nil {
		return nil, err
	}
	return ociLayer{l}, nil
}

func (o *ociDockerImage) LayerByDiffID(h v1.Hash) (v1.Layer, error) {
	l, err := o.Image.LayerByDiffID(h)
	if err != nil {
		return nil, err
	}
	return ociLayer{l}, nil
}

// ociLayer reports a docker archive's layer under its OCI media type.
type ociLayer struct{ v1.Layer }

func (l ociLayer) MediaType() (types.MediaType, error) {
	mt, err := l.Layer.MediaType()
	return ociLayerType(mt), err
}
