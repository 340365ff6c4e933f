package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	bolt "go.etcd.io/bbolt"
	"golang.org/x/sys/unix"
)

// Pull fetches ref from its registry (plain HTTP for localhost, 127.0.0.0/8
// and Options.InsecureRegistries), unpacks it unless its manifest digest is
// already in the store, and points ref at it. For a multi-platform index the
// linux/GOARCH manifest is chosen, else a wasi/wasm one.
func (s *Service) Pull(ctx context.Context, ref string) (Image, error) {
	r, err := s.parseRef(ref)
	if err != nil {
		return Image{}, err
	}
	// A digest reference already in the store needs no registry.
	if d, ok := r.(name.Digest); ok {
		if img, err := s.addRef(ctx, r.Name(), d.DigestStr()); err == nil {
			return img, nil
		}
	}
	desc, err := remote.Get(r, remote.WithContext(ctx), remote.WithAuthFromKeychain(s.keychain), remote.WithUserAgent("vhive"))
	if err != nil {
		return Image{}, classifyRemote(r.Name(), err)
	}
	var img v1.Image
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return Image{}, classifyRemote(r.Name(), err)
		}
		img, err = pickFromIndex(r.Name(), idx)
		if err != nil {
			return Image{}, err
		}
	case desc.MediaType.IsImage():
		img, err = desc.Image()
		if err != nil {
			return Image{}, classifyRemote(r.Name(), err)
		}
	default:
		return Image{}, fmt.Errorf("image: %q: unsupported manifest media type %q: %w", r.Name(), desc.MediaType, ErrInvalid)
	}
	out, err := s.store(ctx, []string{r.Name()}, img)
	if err != nil {
		return Image{}, classifyRemote(r.Name(), err)
	}
	return out, nil
}

// addRef points ref at a digest already in the store.
func (s *Service) addRef(ctx context.Context, ref, dgst string) (Image, error) {
	unlock, err := s.locks.lock(ctx, dgst)
	if err != nil {
		return Image{}, err
	}
	defer unlock()
	var rec *record
	err = s.db.Update(func(tx *bolt.Tx) error {
		r, err := getRecord(tx, dgst)
		if err != nil {
			return err
		}
		rec = r
		return refsB(tx).Put([]byte(ref), []byte(dgst))
	})
	if err != nil {
		return Image{}, err
	}
	return s.toImage(ref, rec), nil
}

// classifyRemote wraps a registry error with its class. Errors that already
// carry a class are returned as they are.
func classifyRemote(ref string, err error) error {
	for _, c := range []error{ErrNotFound, ErrInvalid, ErrUnsafeLayer, ErrInUse, ErrUnavailable, context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, c) {
			return err
		}
	}
	var te *transport.Error
	if errors.As(err, &te) {
		for _, d := range te.Errors {
			switch d.Code {
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("image: pull %q: %v: %w", ref, err, ErrNotFound)
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return fmt.Errorf("image: pull %q: repository does not exist or needs credentials: %v: %w", ref, err, ErrNotFound)
			}
		}
		switch {
		case te.StatusCode == 404:
			return fmt.Errorf("image: pull %q: %v: %w", ref, err, ErrNotFound)
		case te.StatusCode >= 500 || te.StatusCode == 429:
			return fmt.Errorf("image: pull %q: %v: %w", ref, err, ErrUnavailable)
		}
		return fmt.Errorf("image: pull %q: %v: %w", ref, err, ErrInvalid)
	}
	if isNetError(err) {
		return fmt.Errorf("image: pull %q: %v: %w", ref, err, ErrUnavailable)
	}
	return fmt.Errorf("image: pull %q: %w", ref, err)
}

// classifyContent marks an error met while reading a blob as ErrInvalid
// when it is about the content (digest or size mismatch, corrupt gzip or
// tar): not already classified, not the context, not the network or the
// registry, and not a local filesystem error (disk full stays Internal).
func classifyContent(err error) error {
	for _, c := range []error{ErrNotFound, ErrInvalid, ErrUnsafeLayer, ErrInUse, ErrUnavailable, context.Canceled, context.DeadlineExceeded} {
		if errors.Is(err, c) {
			return err
		}
	}
	var (
		te *transport.Error
		pe *fs.PathError
		le *os.LinkError
		en syscall.Errno
	)
	if errors.As(err, &te) || isNetError(err) || errors.As(err, &pe) || errors.As(err, &le) || errors.As(err, &en) {
		return err
	}
	return fmt.Errorf("%w: %w", ErrInvalid, err)
}

// isNetError reports a failure to talk to a registry. (The net.Error
// interface is not used: syscall.Errno satisfies it, so a local disk error
// would pass for a network one.)
func isNetError(err error) bool {
	var (
		oe *net.OpError
		de *net.DNSError
		ue *url.Error
	)
	return errors.As(err, &oe) || errors.As(err, &de) || errors.As(err, &ue)
}

// platformRank orders the platforms vhive can run; lower is better.
func platformRank(p *v1.Platform) int {
	if p == nil {
		return 3
	}
	switch {
	case p.OS == "linux" && p.Architecture == runtime.GOARCH:
		return 0
	case (p.OS == "wasi" || p.OS == "wasip1" || p.OS == "wasip2") && p.Architecture == "wasm":
		return 1
	}
	return -1
}

// pickFromIndex chooses the image of an index vhive can run.
func pickFromIndex(what string, idx v1.ImageIndex) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("image: %q: bad index: %v: %w", what, err, ErrInvalid)
	}
	best, bestRank := -1, 99
	var seen []string
	for i, m := range im.Manifests {
		if !m.MediaType.IsImage() {
			continue
		}
		if m.Platform != nil {
			seen = append(seen, m.Platform.String())
		}
		if r := platformRank(m.Platform); r >= 0 && r < bestRank {
			best, bestRank = i, r
		}
	}
	if best < 0 {
		return nil, fmt.Errorf("image: %q: no manifest for linux/%s or wasi/wasm (has %v): %w", what, runtime.GOARCH, seen, ErrInvalid)
	}
	img, err := idx.Image(im.Manifests[best].Digest)
	if err != nil {
		return nil, fmt.Errorf("image: %q: manifest %s: %w", what, im.Manifests[best].Digest, err)
	}
	return img, nil
}

// store makes sure img is unpacked and points refs at it.
func (s *Service) store(ctx context.Context, refs []string, img v1.Image) (Image, error) {
	what := strings.Join(refs, ", ")
	dg, err := img.Digest()
	if err != nil {
		return Image{}, fmt.Errorf("image: %q: manifest: %v: %w", what, err, ErrInvalid)
	}
	dgst := dg.String()
	if !digestRE.MatchString(dgst) {
		return Image{}, fmt.Errorf("image: %q: unsupported digest %q: %w", what, dgst, ErrInvalid)
	}

	unlock, err := s.locks.lock(ctx, dgst)
	if err != nil {
		return Image{}, fmt.Errorf("image: %q: wait for %s: %w", what, dgst, err)
	}
	var rec *record
	_ = s.db.View(func(tx *bolt.Tx) error {
		rec, _ = getRecord(tx, dgst)
		return nil
	})
	if rec != nil {
		if _, err := os.Stat(filepath.Join(s.digestDir(dgst), "rootfs")); err != nil {
			s.log.WarnContext(ctx, "recorded image directory is missing; unpacking again", "digest", dgst, "err", err)
			rec = nil
		}
	}
	if rec == nil {
		rec, err = s.unpack(ctx, dgst, img)
		if err != nil {
			unlock()
			s.log.WarnContext(ctx, "image unpack failed", "refs", what, "digest", dgst, "err", err)
			return Image{}, err
		}
	}
	var replaced []string
	err = s.db.Update(func(tx *bolt.Tx) error {
		if err := putRecord(tx, rec); err != nil {
			return err
		}
		for _, r := range refs {
			if old := refsB(tx).Get([]byte(r)); old != nil && string(old) != dgst {
				replaced = append(replaced, string(old))
			}
			if err := refsB(tx).Put([]byte(r), []byte(dgst)); err != nil {
				return err
			}
		}
		return nil
	})
	unlock()
	if err != nil {
		return Image{}, fmt.Errorf("image: record %q → %s: %w", what, dgst, err)
	}
	for _, old := range replaced {
		s.dropIfUnreferenced(ctx, old)
	}
	return s.toImage(refs[0], rec), nil
}

// dropIfUnreferenced removes a digest that lost its last reference to a newer
// pull, unless it is in use (then Remove(digest) removes it later).
func (s *Service) dropIfUnreferenced(ctx context.Context, dgst string) {
	unlock, err := s.locks.lock(context.WithoutCancel(ctx), dgst)
	if err != nil {
		return
	}
	defer unlock()
	if s.inUse != nil && !s.inUse(dgst).Empty() {
		return // kept; Remove(digest) deletes it once unused
	}
	drop := false
	err = s.db.Update(func(tx *bolt.Tx) error {
		if len(refsTo(tx, dgst)) > 0 {
			return nil
		}
		drop = true
		return images(tx).Delete([]byte(dgst))
	})
	if err == nil && drop {
		err = os.RemoveAll(s.digestDir(dgst))
	}
	if err != nil {
		s.log.WarnContext(ctx, "removing replaced image failed", "digest", dgst, "err", err)
	}
}

// unpack builds the digest directory of img in a temporary directory and
// renames it into place. The caller holds the digest lock.
func (s *Service) unpack(ctx context.Context, dgst string, img v1.Image) (_ *record, retErr error) {
	start := time.Now()
	mt, err := img.MediaType()
	if err != nil {
		return nil, fmt.Errorf("image: %s: manifest media type: %v: %w", dgst, err, ErrInvalid)
	}
	if !mt.IsImage() {
		return nil, fmt.Errorf("image: %s: unsupported manifest media type %q: %w", dgst, mt, ErrInvalid)
	}
	rawManifest, err := img.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("image: %s: read manifest: %w", dgst, err)
	}
	want, err := v1.NewHash(dgst)
	if err != nil {
		return nil, fmt.Errorf("image: %s: %v: %w", dgst, err, ErrInvalid)
	}
	if err := checkDigest("manifest", rawManifest, want); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	m, err := img.Manifest()
	if err != nil {
		return nil, fmt.Errorf("image: %s: malformed manifest: %v: %w", dgst, err, ErrInvalid)
	}
	rawConfig, err := img.RawConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %s: read config %s: %w", dgst, m.Config.Digest, err)
	}
	if err := checkDigest("config "+m.Config.Digest.String(), rawConfig, m.Config.Digest); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		return nil, fmt.Errorf("image: %s: malformed config %s: %v: %w", dgst, m.Config.Digest, err, ErrInvalid)
	}
	wasi := cfg.OS == "wasi" || cfg.OS == "wasip1" || cfg.OS == "wasip2"
	if !wasi && ((cfg.OS != "" && cfg.OS != "linux") || (cfg.Architecture != "" && cfg.Architecture != runtime.GOARCH)) {
		return nil, fmt.Errorf("image: %s: built for %s/%s, this node runs linux/%s: %w", dgst, cfg.OS, cfg.Architecture, runtime.GOARCH, ErrInvalid)
	}
	layers, err := img.Layers()
	if err != nil {
		return nil, fmt.Errorf("image: %s: layers: %v: %w", dgst, err, ErrInvalid)
	}

	tmp, err := os.MkdirTemp(s.tmpDir(), "unpack-")
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	defer func() {
		if retErr != nil {
			if err := os.RemoveAll(tmp); err != nil {
				s.log.ErrorContext(ctx, "cannot remove failed unpack", "path", tmp, "err", err)
			}
		}
	}()
	rootfs := filepath.Join(tmp, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	root, err := os.OpenRoot(rootfs)
	if err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	defer root.Close()

	rec := &record{
		Digest: dgst,
		Size:   m.Config.Size,
		Config: toConfig(cfg, m),
		Kind:   KindLinux,
	}
	if cfg.Created.Time.Unix() > 0 {
		rec.Created = cfg.Created.Time.UTC()
	}
	u := newUnpacker(root, s.maxEntry, s.maxLayer)
	for i, l := range layers {
		ldg, err := l.Digest()
		if err != nil {
			return nil, fmt.Errorf("image: %s: layer %d digest: %v: %w", dgst, i, err, ErrInvalid)
		}
		lmt, err := l.MediaType()
		if err != nil {
			return nil, fmt.Errorf("image: %s: layer %s media type: %v: %w", dgst, ldg, err, ErrInvalid)
		}
		if i < len(m.Layers) {
			rec.Size += m.Layers[i].Size
		}
		if string(lmt) == MediaTypeWasmLayer {
			if rec.Module != "" {
				return nil, fmt.Errorf("image: %s: more than one wasm layer (second: %s): %w", dgst, ldg, ErrInvalid)
			}
			if err := s.writeModule(ctx, filepath.Join(tmp, WasmModuleFile), ldg, l); err != nil {
				return nil, fmt.Errorf("image: %s: %w", dgst, classifyContent(err))
			}
			rec.Module, rec.Kind = WasmModuleFile, KindWasm
			continue
		}
		if !lmt.IsLayer() {
			return nil, fmt.Errorf("image: %s: layer %s has unsupported media type %q: %w", dgst, ldg, lmt, ErrInvalid)
		}
		lr, err := openLayer(l, ldg)
		if err != nil {
			return nil, fmt.Errorf("image: %s: open layer %s: %w", dgst, ldg, classifyContent(err))
		}
		err = u.applyLayer(ctx, ldg.String(), lr)
		if err == nil {
			if verr := lr.verify(); verr != nil {
				err = fmt.Errorf("layer %s: %w", ldg, verr)
			}
		}
		if cerr := lr.Close(); err == nil && cerr != nil {
			err = fmt.Errorf("layer %s: %w", ldg, cerr)
		}
		if err != nil {
			return nil, fmt.Errorf("image: %s: %w", dgst, classifyContent(err))
		}
		if n := len(u.skipped); n > 0 {
			s.log.InfoContext(ctx, "image: skipped device nodes and FIFOs under /dev (every sandbox mounts its own /dev)",
				"image", dgst, "layer", ldg.String(), "count", n, "entries", strings.Join(u.skipped[:min(n, 8)], " "))
		}
	}
	if err := u.finish(); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	if rec.Kind == KindLinux {
		mod := rec.Config.Labels[LabelWasmModule]
		if mod == "" {
			mod = rec.Config.Annotations[LabelWasmModule]
		}
		if mod != "" {
			p, err := cleanEntryPath(strings.TrimPrefix(mod, "/"))
			if err == nil && p == "." {
				err = errors.New("names the rootfs")
			}
			if err != nil {
				return nil, fmt.Errorf("image: %s: %s %q: %v: %w", dgst, LabelWasmModule, mod, err, ErrInvalid)
			}
			fi, err := root.Lstat(p)
			if err != nil || !fi.Mode().IsRegular() {
				return nil, fmt.Errorf("image: %s: %s %q is not a regular file in the image: %v: %w", dgst, LabelWasmModule, mod, err, ErrInvalid)
			}
			rec.Module, rec.Kind = filepath.Join("rootfs", p), KindWasm
		}
	}
	if wasi && rec.Kind != KindWasm {
		return nil, fmt.Errorf("image: %s: %s image without a wasm module (no %s layer, no %s label): %w", dgst, cfg.OS, MediaTypeWasmLayer, LabelWasmModule, ErrInvalid)
	}
	if err := os.WriteFile(filepath.Join(tmp, "manifest.json"), rawManifest, 0o644); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "config.json"), rawConfig, 0o644); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	final := s.digestDir(dgst)
	if err := os.MkdirAll(filepath.Dir(final), 0o755); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	if err := os.RemoveAll(final); err != nil { // an unrecorded leftover
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	// Durable before visible: the unpacked files reach the disk before the
	// directory is renamed into place and the record names it, so that a
	// power loss never leaves a record pointing at empty files.
	if err := syncFilesystem(tmp); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	if err := os.Rename(tmp, final); err != nil {
		return nil, fmt.Errorf("image: %s: move unpacked image into place: %w", dgst, err)
	}
	if err := syncDir(filepath.Dir(final)); err != nil {
		return nil, fmt.Errorf("image: %s: %w", dgst, err)
	}
	rec.Unpacked = time.Now().UTC()
	s.mu.Lock()
	s.unpacks++
	s.mu.Unlock()
	s.log.InfoContext(ctx, "image unpacked", "digest", dgst, "layers", len(layers), "kind", rec.Kind, "duration", time.Since(start))
	return rec, nil
}

// writeModule stores a wasm layer blob as a file, within the layer limit.
func (s *Service) writeModule(ctx context.Context, dst string, ldg v1.Hash, l v1.Layer) error {
	layer := ldg.String()
	if ldg.Algorithm != "sha256" {
		return fmt.Errorf("wasm layer %s: unsupported digest algorithm: %w", layer, ErrInvalid)
	}
	if sz, err := l.Size(); err == nil && sz > s.maxLayer {
		return &UnsafeLayerError{Layer: layer, Path: WasmModuleFile, Reason: fmt.Sprintf("wasm layer of %d bytes exceeds the limit of %d", sz, s.maxLayer)}
	}
	rc, err := l.Compressed() // a wasm layer is stored as is
	if err != nil {
		return fmt.Errorf("open wasm layer %s: %w", layer, err)
	}
	defer rc.Close()
	f, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
	if err != nil {
		return err
	}
	hr := &hashReader{r: rc, h: sha256.New()}
	_, err = io.Copy(f, &limitReader{r: hr, n: s.maxLayer})
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		if got := hex.EncodeToString(hr.h.Sum(nil)); got != ldg.Hex {
			err = fmt.Errorf("content has digest sha256:%s: %w", got, ErrInvalid)
		}
	}
	if errors.Is(err, errLayerTooLarge) {
		return &UnsafeLayerError{Layer: layer, Path: WasmModuleFile, Reason: fmt.Sprintf("wasm layer exceeds the limit of %d bytes", s.maxLayer)}
	}
	if err != nil {
		return fmt.Errorf("write wasm layer %s: %w", layer, err)
	}
	return nil
}

func toConfig(cf *v1.ConfigFile, m *v1.Manifest) Config {
	c := Config{
		Entrypoint:  cf.Config.Entrypoint,
		Cmd:         cf.Config.Cmd,
		Env:         cf.Config.Env,
		WorkingDir:  cf.Config.WorkingDir,
		User:        cf.Config.User,
		Labels:      cf.Config.Labels,
		Annotations: m.Annotations,
	}
	for p := range cf.Config.ExposedPorts {
		c.ExposedPorts = append(c.ExposedPorts, p)
	}
	sort.Strings(c.ExposedPorts)
	return c
}

// syncFilesystem flushes the file system holding dir (syncfs(2)): one call
// instead of an fsync per unpacked file.
func syncFilesystem(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := unix.Syncfs(int(f.Fd())); err != nil {
		return fmt.Errorf("syncfs %s: %w", dir, err)
	}
	return nil
}

// syncDir fsyncs a directory, making a rename into it durable.
func syncDir(dir string) error {
	f, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}
