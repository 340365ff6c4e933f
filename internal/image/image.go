package image

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	bolt "go.etcd.io/bbolt"
)

// Kinds of image.
const (
	KindLinux = "linux"
	KindWasm  = "wasm"
)

// Wasm conventions (see the package doc).
const (
	// MediaTypeWasmLayer is the layer media type runwasi uses for a module.
	MediaTypeWasmLayer = "application/vnd.wasm.content.layer.v1+wasm"
	// LabelWasmModule is the config label or manifest annotation naming the
	// module file inside a tar-layered image.
	LabelWasmModule = "dev.vhive.wasm.module"
	// WasmModuleFile is the file a wasm layer is stored as, in the digest dir.
	WasmModuleFile = "module.wasm"
)

// Default limits.
const (
	DefaultMaxLayerBytes int64 = 4 << 30
	DefaultMaxEntryBytes int64 = 1 << 30
)

// Options configure a Service.
type Options struct {
	// Root holds the database, the unpacked images and temporary files
	// (e.g. <state-dir>/images). Required; created if missing.
	Root string
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
	// InsecureRegistries are registry hosts (host or host:port) spoken to in
	// plain HTTP. localhost and 127.0.0.0/8 registries always are.
	InsecureRegistries []string
	// MaxLayerBytes limits a layer's uncompressed tar stream (and a wasm
	// layer's size); DefaultMaxLayerBytes when 0.
	MaxLayerBytes int64
	// MaxEntryBytes limits one file in a layer; DefaultMaxEntryBytes when 0.
	MaxEntryBytes int64
	// Keychain resolves registry credentials; authn.DefaultKeychain (the
	// docker config) when nil.
	Keychain authn.Keychain
	// InUse reports what uses the image with this manifest digest (the
	// deployed functions, the CRI's containers); Remove refuses to delete an
	// image whose Users are not empty, with an *InUseError naming them. Nil
	// means nothing is in use. Called without the Service's locks held; it
	// must be quick and must not call back into the Service.
	InUse func(digest string) Users
}

// Config is the part of the image config a sandbox needs.
type Config struct {
	Entrypoint   []string          `json:"entrypoint,omitempty"`
	Cmd          []string          `json:"cmd,omitempty"`
	Env          []string          `json:"env,omitempty"`
	WorkingDir   string            `json:"workingDir,omitempty"`
	User         string            `json:"user,omitempty"`
	ExposedPorts []string          `json:"exposedPorts,omitempty"` // sorted, e.g. "50051/tcp"
	Labels       map[string]string `json:"labels,omitempty"`       // config labels
	Annotations  map[string]string `json:"annotations,omitempty"`  // manifest annotations
}

// Image is one reference to an unpacked image.
type Image struct {
	Ref     string    // normalised reference, e.g. "127.0.0.1:5000/hello:v1"; empty when looked up by digest and unnamed
	Digest  string    // manifest digest, "sha256:<hex>"
	Size    int64     // sum of the compressed layer sizes plus the config size
	Created time.Time // from the image config; zero if absent
	Rootfs  string    // unpacked root filesystem (read-only by convention)
	Config  Config
	Kind    string // KindLinux or KindWasm
	// WasmModule is the path of the wasm module file (Kind == KindWasm).
	WasmModule string
}

// record is what the images bucket stores per digest.
type record struct {
	Digest   string    `json:"digest"`
	Size     int64     `json:"size"`
	Created  time.Time `json:"created"`
	Config   Config    `json:"config"`
	Kind     string    `json:"kind"`
	Module   string    `json:"module,omitempty"` // path relative to the digest dir
	Unpacked time.Time `json:"unpacked"`
}

// Service is the image store. Its methods are safe for concurrent use.
type Service struct {
	root     string
	log      *slog.Logger
	insecure map[string]bool
	maxLayer int64
	maxEntry int64
	keychain authn.Keychain
	inUse    func(string) Users
	db       *bolt.DB

	locks keyedMutex

	// unpacks counts completed unpacks (for tests and metrics).
	mu      sync.Mutex
	unpacks int
}

var digestRE = regexp.MustCompile(`^sha256:[a-f0-9]{64}$`)

// New opens (creating if needed) the store under opts.Root.
func New(ctx context.Context, opts Options) (*Service, error) {
	if opts.Root == "" {
		return nil, fmt.Errorf("image: Options.Root is empty")
	}
	if opts.MaxLayerBytes < 0 || opts.MaxEntryBytes < 0 {
		return nil, fmt.Errorf("image: negative size limit (MaxLayerBytes %d, MaxEntryBytes %d)", opts.MaxLayerBytes, opts.MaxEntryBytes)
	}
	root, err := filepath.Abs(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("image: root %q: %w", opts.Root, err)
	}
	s := &Service{
		root:     root,
		log:      opts.Logger,
		insecure: map[string]bool{},
		maxLayer: opts.MaxLayerBytes,
		maxEntry: opts.MaxEntryBytes,
		keychain: opts.Keychain,
		inUse:    opts.InUse,
	}
	if s.log == nil {
		s.log = slog.Default()
	}
	if s.maxLayer == 0 {
		s.maxLayer = DefaultMaxLayerBytes
	}
	if s.maxEntry == 0 {
		s.maxEntry = DefaultMaxEntryBytes
	}
	if s.keychain == nil {
		s.keychain = authn.DefaultKeychain
	}
	for _, r := range opts.InsecureRegistries {
		if r == "" || strings.ContainsAny(r, "/ ") {
			return nil, fmt.Errorf("image: insecure registry %q: want host or host:port", r)
		}
		s.insecure[r] = true
	}
	for _, d := range []string{root, s.tmpDir(), filepath.Join(root, "digests")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("image: create %q: %w", d, err)
		}
	}
	db, err := bolt.Open(filepath.Join(root, "meta.db"), 0o600, &bolt.Options{Timeout: 5 * time.Second})
	if err != nil {
		return nil, fmt.Errorf("image: open database in %q: %w", root, err)
	}
	s.db = db
	if err := db.Update(func(tx *bolt.Tx) error {
		b, err := tx.CreateBucketIfNotExists(bucketV1)
		if err != nil {
			return err
		}
		if _, err := b.CreateBucketIfNotExists(bucketRefs); err != nil {
			return err
		}
		_, err = b.CreateBucketIfNotExists(bucketImages)
		return err
	}); err != nil {
		db.Close()
		return nil, fmt.Errorf("image: initialise database: %w", err)
	}
	if err := s.cleanup(ctx); err != nil {
		db.Close()
		return nil, err
	}
	return s, nil
}

// Close closes the database. In-flight calls must have returned.
func (s *Service) Close() error {
	return s.db.Close()
}

// Root returns the store's root directory.
func (s *Service) Root() string { return s.root }

// Unpacks returns how many digests this Service has unpacked so far.
func (s *Service) Unpacks() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.unpacks
}

func (s *Service) tmpDir() string { return filepath.Join(s.root, "tmp") }

// digestDir is <root>/digests/<algo>/<hex>; dgst must match digestRE.
func (s *Service) digestDir(dgst string) string {
	algo, hex, _ := strings.Cut(dgst, ":")
	return filepath.Join(s.root, "digests", algo, hex)
}

// cleanup removes leftovers of interrupted unpacks and unrecorded digests.
func (s *Service) cleanup(ctx context.Context) error {
	entries, err := os.ReadDir(s.tmpDir())
	if err != nil {
		return fmt.Errorf("image: read %q: %w", s.tmpDir(), err)
	}
	for _, e := range entries {
		p := filepath.Join(s.tmpDir(), e.Name())
		s.log.InfoContext(ctx, "removing leftover temporary image data", "path", p)
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("image: remove leftover %q: %w", p, err)
		}
	}
	known := map[string]bool{}
	if err := s.db.View(func(tx *bolt.Tx) error {
		return images(tx).ForEach(func(k, _ []byte) error {
			known[string(k)] = true
			return nil
		})
	}); err != nil {
		return fmt.Errorf("image: read database: %w", err)
	}
	algoDir := filepath.Join(s.root, "digests", "sha256")
	hexes, err := os.ReadDir(algoDir)
	if errors.Is(err, os.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("image: read %q: %w", algoDir, err)
	}
	for _, h := range hexes {
		if known["sha256:"+h.Name()] {
			continue
		}
		p := filepath.Join(algoDir, h.Name())
		s.log.InfoContext(ctx, "removing unrecorded image directory", "path", p)
		if err := os.RemoveAll(p); err != nil {
			return fmt.Errorf("image: remove unrecorded %q: %w", p, err)
		}
	}
	return nil
}

// parseRef parses a reference, applying the insecure-registry list.
func (s *Service) parseRef(ref string) (name.Reference, error) {
	if ref == "" {
		return nil, fmt.Errorf("image: empty reference: %w", ErrInvalid)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("image: reference %q: %v: %w", ref, err, ErrInvalid)
	}
	if s.insecure[r.Context().RegistryStr()] {
		r, err = name.ParseReference(ref, name.Insecure)
		if err != nil {
			return nil, fmt.Errorf("image: reference %q: %v: %w", ref, err, ErrInvalid)
		}
	}
	return r, nil
}

// normDigest returns the digest if s is "sha256:<hex>" or a bare 64-hex.
func normDigest(s string) (string, bool) {
	if digestRE.MatchString(s) {
		return s, true
	}
	if len(s) == 64 && digestRE.MatchString("sha256:"+s) {
		return "sha256:" + s, true
	}
	return "", false
}

func (s *Service) toImage(ref string, r *record) Image {
	img := Image{
		Ref:     ref,
		Digest:  r.Digest,
		Size:    r.Size,
		Created: r.Created,
		Rootfs:  filepath.Join(s.digestDir(r.Digest), "rootfs"),
		Config:  r.Config,
		Kind:    r.Kind,
	}
	if r.Module != "" {
		img.WasmModule = filepath.Join(s.digestDir(r.Digest), r.Module)
	}
	return img
}

// Get returns the image a reference or a manifest digest ("sha256:<hex>")
// names. Looked up by digest, Ref is the first reference to it (sorted).
func (s *Service) Get(ctx context.Context, refOrDigest string) (Image, error) {
	var out Image
	err := s.db.View(func(tx *bolt.Tx) error {
		if d, ok := normDigest(refOrDigest); ok {
			r, err := getRecord(tx, d)
			if err != nil {
				return err
			}
			refs := refsTo(tx, d)
			ref := ""
			if len(refs) > 0 {
				ref = refs[0]
			}
			out = s.toImage(ref, r)
			return nil
		}
		nr, err := s.parseRef(refOrDigest)
		if err != nil {
			return err
		}
		d := refsB(tx).Get([]byte(nr.Name()))
		if d == nil {
			return fmt.Errorf("image: reference %q: %w", nr.Name(), ErrNotFound)
		}
		r, err := getRecord(tx, string(d))
		if err != nil {
			return err
		}
		out = s.toImage(nr.Name(), r)
		return nil
	})
	return out, err
}

// List returns one Image per reference, sorted by reference.
func (s *Service) List(ctx context.Context) ([]Image, error) {
	var out []Image
	err := s.db.View(func(tx *bolt.Tx) error {
		return refsB(tx).ForEach(func(k, v []byte) error {
			r, err := getRecord(tx, string(v))
			if err != nil {
				return fmt.Errorf("reference %q: %w", k, err)
			}
			out = append(out, s.toImage(string(k), r))
			return nil
		})
	})
	if err != nil {
		return nil, fmt.Errorf("image: list: %w", err)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Ref < out[j].Ref })
	return out, nil
}

// Remove deletes a reference, or every reference to a digest. When no
// reference to the digest remains, its record and unpacked directory are
// removed too — unless Options.InUse reports users: then nothing is
// changed and the error is an *InUseError (wrapping ErrInUse) naming them.
func (s *Service) Remove(ctx context.Context, refOrDigest string) error {
	var dgst, refName string
	if d, ok := normDigest(refOrDigest); ok {
		dgst = d
	} else {
		nr, err := s.parseRef(refOrDigest)
		if err != nil {
			return err
		}
		refName = nr.Name()
		if err := s.db.View(func(tx *bolt.Tx) error {
			v := refsB(tx).Get([]byte(refName))
			if v == nil {
				return fmt.Errorf("image: reference %q: %w", refName, ErrNotFound)
			}
			dgst = string(v)
			return nil
		}); err != nil {
			return err
		}
	}
	unlock, err := s.locks.lock(ctx, dgst)
	if err != nil {
		return fmt.Errorf("image: remove %q: %w", refOrDigest, err)
	}
	defer unlock()

	// Asked outside the transaction: the hook may take its own locks.
	var users Users
	if s.inUse != nil {
		users = s.inUse(dgst)
	}
	removeDir := false
	err = s.db.Update(func(tx *bolt.Tx) error {
		if _, err := getRecord(tx, dgst); err != nil {
			return err
		}
		refs := refsTo(tx, dgst)
		drop := refs
		if refName != "" {
			if string(refsB(tx).Get([]byte(refName))) != dgst {
				return fmt.Errorf("image: reference %q: %w", refName, ErrNotFound)
			}
			drop = []string{refName}
		}
		last := len(drop) == len(refs)
		if last && !users.Empty() {
			return &InUseError{Ref: refName, Digest: dgst, Users: users}
		}
		for _, r := range drop {
			if err := refsB(tx).Delete([]byte(r)); err != nil {
				return err
			}
		}
		if last {
			removeDir = true
			return images(tx).Delete([]byte(dgst))
		}
		return nil
	})
	if err != nil {
		return err
	}
	if removeDir {
		if err := os.RemoveAll(s.digestDir(dgst)); err != nil {
			return fmt.Errorf("image: remove directory of %s: %w", dgst, err)
		}
		s.log.InfoContext(ctx, "image removed", "digest", dgst)
	}
	return nil
}

// keyedMutex is a set of locks created on demand, one per key. Waiting for
// a lock can be abandoned through the context (a cancelled pull does not
// wait for another pull's unpack).
type keyedMutex struct {
	mu    sync.Mutex
	locks map[string]*keyedEntry
}

type keyedEntry struct {
	ch   chan struct{} // holds a token while locked
	refs int
}

func (k *keyedMutex) lock(ctx context.Context, key string) (unlock func(), err error) {
	k.mu.Lock()
	if k.locks == nil {
		k.locks = map[string]*keyedEntry{}
	}
	e := k.locks[key]
	if e == nil {
		e = &keyedEntry{ch: make(chan struct{}, 1)}
		k.locks[key] = e
	}
	e.refs++
	k.mu.Unlock()
	release := func() {
		k.mu.Lock()
		e.refs--
		if e.refs == 0 {
			delete(k.locks, key)
		}
		k.mu.Unlock()
	}
	select {
	case e.ch <- struct{}{}:
	case <-ctx.Done():
		release()
		return nil, ctx.Err()
	}
	return func() {
		<-e.ch
		release()
	}, nil
}
