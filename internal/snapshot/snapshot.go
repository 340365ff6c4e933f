// Package snapshot stores one snapshot per function revision on disk and
// decides whether a stored snapshot may be used.
//
// Layout under the root (<state-dir>/snapshots):
//
//	<id>/manifest.json   the Manifest below, written last
//	<id>/...             the backend's files (gVisor checkpoint image, wasm
//	                     memory + state files), written by the backend
//	<id>/ws              REAP working-set file (after the record phase)
//	.tmp-<id>-<random>/  a snapshot being written; removed at start-up
//	.trash-<id>-<random>/ a snapshot being removed; removed at start-up
//
// The id is "<function>-<hash of the key>", so a new image digest, backend
// or instance configuration gives a new id and never reuses an old snapshot.
// A snapshot becomes visible only by the atomic rename of its complete,
// fsynced temporary directory; the manifest records every file's size and
// SHA-256. Sizes are checked on every use; contents are hashed on the first
// use by this daemon process (and again whenever a file's mtime changes),
// unless this process wrote them: a snapshot it created, and a working set
// it recorded into a snapshot it had verified, were hashed as they were
// committed and are not read again before their first restore.
// A snapshot whose check fails is moved aside and removed; the caller boots
// and a fresh snapshot is taken.
//
// Crash recovery (New, at daemon start): temporary and trash directories are
// removed, and so is every file in a committed snapshot directory that its
// manifest does not list (a working set written but not yet recorded,
// manifest temporaries). The daemon then calls Prune with the deployed
// functions, removing the snapshots of a function whose removal a crash
// interrupted.
package snapshot

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"sync"
	"time"

	"vhive.dev/vhive/internal/orchestrator"
	"vhive.dev/vhive/internal/sandbox"
)

const (
	manifestName    = "manifest.json"
	manifestVersion = 1
	// WorkingSetName is the REAP working-set file inside a snapshot dir.
	WorkingSetName = "ws"
)

// FileSum is one file of a snapshot.
type FileSum struct {
	Name   string `json:"name"`
	Size   int64  `json:"size"`
	SHA256 string `json:"sha256"`
}

// Manifest describes a committed snapshot.
type Manifest struct {
	Version        int       `json:"version"`
	ID             string    `json:"id"`
	Function       string    `json:"function"`
	ImageDigest    string    `json:"image_digest"`
	Backend        string    `json:"backend"`
	Config         string    `json:"config"`
	RuntimeVersion string    `json:"runtime_version"`
	Created        time.Time `json:"created"`
	Files          []FileSum `json:"files"`
	WorkingSet     *FileSum  `json:"working_set,omitempty"`
	// Modes are the start modes this snapshot supports.
	Modes []string `json:"modes"`
	// Restore is "eager" when the backend reads every page before the
	// instance runs (gVisor), "lazy" when pages are served on demand.
	Restore string `json:"restore"`
}

// BackendInfo is what the store records about a backend's snapshots.
type BackendInfo struct {
	// RuntimeVersion (e.g. runsc's version, the wasm snapshot format):
	// a snapshot taken by another version is not used.
	RuntimeVersion string
	Modes          []string
	Restore        string
}

// Options configure a Store.
type Options struct {
	Root     string
	Backends map[string]BackendInfo
	Logger   *slog.Logger
}

// Store is the snapshot store. It implements orchestrator.SnapshotStore and
// the daemon API's snapshot administration.
type Store struct {
	root     string
	backends map[string]BackendInfo
	log      *slog.Logger

	mu       sync.Mutex
	creating map[string]*creation // by id
	verified map[string]string    // id → fingerprint of verified files
}

type creation struct {
	done chan struct{}
	snap orchestrator.Snapshot
	err  error
}

var _ orchestrator.SnapshotStore = (*Store)(nil)

// ErrNotFound is returned for an unknown snapshot id.
var ErrNotFound = errors.New("snapshot not found")

// Info describes a stored snapshot (vhive snapshots ls|inspect).
type Info struct {
	ID          string
	Function    string
	Backend     string
	ImageDigest string
	Created     time.Time
	DiskBytes   int64
	WorkingSet  bool
	Modes       []string
	Restore     string
	Details     map[string]string
	Path        string
}

// New opens the store, removing temporary directories of snapshots that were
// being written when a previous daemon stopped.
func New(opts Options) (*Store, error) {
	if opts.Root == "" {
		return nil, errors.New("snapshot store: Root is required")
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	if err := os.MkdirAll(opts.Root, 0o700); err != nil {
		return nil, fmt.Errorf("snapshot store %q: %w", opts.Root, err)
	}
	ents, err := os.ReadDir(opts.Root)
	if err != nil {
		return nil, fmt.Errorf("snapshot store %q: %w", opts.Root, err)
	}
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".tmp-") || strings.HasPrefix(e.Name(), ".trash-") {
			opts.Logger.Info("removing incomplete snapshot left by a previous run", "dir", e.Name())
			if err := os.RemoveAll(filepath.Join(opts.Root, e.Name())); err != nil {
				return nil, fmt.Errorf("remove incomplete snapshot %q: %w", e.Name(), err)
			}
			continue
		}
		if e.IsDir() && !strings.HasPrefix(e.Name(), ".") {
			if err := removeUncommitted(filepath.Join(opts.Root, e.Name()), opts.Logger); err != nil {
				return nil, err
			}
		}
	}
	return &Store{root: opts.Root, backends: opts.Backends, log: opts.Logger,
		creating: map[string]*creation{}, verified: map[string]string{}}, nil
}

// removeUncommitted deletes, from a committed snapshot directory, every file
// its manifest does not list: what a previous run was writing when it
// stopped (a working set not yet recorded, a manifest or working-set
// temporary). A directory without a readable manifest is left alone: Get
// reports it unusable and the orchestrator invalidates it.
func removeUncommitted(dir string, log *slog.Logger) error {
	m, err := readManifest(dir)
	if err != nil {
		return nil
	}
	keep := map[string]bool{manifestName: true}
	for _, f := range m.Files {
		keep[f.Name] = true
	}
	if m.WorkingSet != nil {
		keep[m.WorkingSet.Name] = true
	}
	var stray []string
	err = filepath.WalkDir(dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if rel, _ := filepath.Rel(dir, path); !keep[rel] {
			stray = append(stray, path)
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("snapshot %q: list files: %w", filepath.Base(dir), err)
	}
	for _, p := range stray {
		log.Info("removing uncommitted snapshot file left by a previous run", "file", p)
		if err := os.Remove(p); err != nil {
			return fmt.Errorf("snapshot %q: remove uncommitted %s: %w", filepath.Base(dir), p, err)
		}
	}
	return nil
}

// Prune removes every snapshot whose function keep rejects: at daemon start
// with the deployed functions, it removes the snapshots of a function whose
// removal was interrupted after the function record was deleted. It returns
// the ids removed.
func (s *Store) Prune(ctx context.Context, keep func(function string) bool) ([]string, error) {
	list, err := s.List(ctx, "")
	if err != nil {
		return nil, err
	}
	var removed []string
	var errs []error
	for _, si := range list {
		if keep(si.Function) {
			continue
		}
		s.log.Info("removing snapshot of a function that is not deployed", "id", si.ID, "function", si.Function)
		if err := s.trash(si.ID); err != nil {
			errs = append(errs, err)
			continue
		}
		removed = append(removed, si.ID)
	}
	return removed, errors.Join(errs...)
}

// ID returns the snapshot id of key.
func ID(key orchestrator.SnapshotKey) string {
	h := sha256.Sum256([]byte(key.Function + "\x00" + key.ImageDigest + "\x00" + key.Backend + "\x00" + key.Config))
	return key.Function + "-" + hex.EncodeToString(h[:])[:12]
}

func (s *Store) dir(id string) string { return filepath.Join(s.root, id) }

func (s *Store) toSnapshot(m *Manifest) orchestrator.Snapshot {
	dir := s.dir(m.ID)
	return orchestrator.Snapshot{ID: m.ID, Dir: dir, WorkingSet: filepath.Join(dir, WorkingSetName), HasWorkingSet: m.WorkingSet != nil}
}

func readManifest(dir string) (*Manifest, error) {
	data, err := os.ReadFile(filepath.Join(dir, manifestName))
	if err != nil {
		return nil, err
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("manifest %s: %w", filepath.Join(dir, manifestName), err)
	}
	if m.Version != manifestVersion {
		return nil, fmt.Errorf("manifest %s: version %d, want %d", filepath.Join(dir, manifestName), m.Version, manifestVersion)
	}
	return &m, nil
}

// Get returns the usable snapshot for key.
func (s *Store) Get(ctx context.Context, key orchestrator.SnapshotKey) (orchestrator.Snapshot, error) {
	id := ID(key)
	dir := s.dir(id)
	m, err := readManifest(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return orchestrator.Snapshot{}, fmt.Errorf("%w: no snapshot %q", orchestrator.ErrNotFound, id)
	}
	if err != nil {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q incomplete or corrupt: %w", id, err)
	}
	if err := s.check(m, key); err != nil {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q: %w", id, err)
	}
	return s.toSnapshot(m), nil
}

// check validates compatibility and file integrity.
func (s *Store) check(m *Manifest, key orchestrator.SnapshotKey) error {
	if m.ImageDigest != key.ImageDigest || m.Backend != key.Backend || m.Config != key.Config || m.Function != key.Function {
		return fmt.Errorf("incompatible: taken for %s/%s/%s, need %s/%s/%s", m.Backend, m.ImageDigest, m.Config, key.Backend, key.ImageDigest, key.Config)
	}
	if bi, ok := s.backends[m.Backend]; ok && bi.RuntimeVersion != m.RuntimeVersion {
		return fmt.Errorf("incompatible: taken by %s runtime %q, this daemon runs %q", m.Backend, m.RuntimeVersion, bi.RuntimeVersion)
	}
	files := m.files()
	fp, err := fingerprint(s.dir(m.ID), files)
	if err != nil {
		return err
	}
	s.mu.Lock()
	ok := s.verified[m.ID] == fp
	s.mu.Unlock()
	if ok {
		return nil
	}
	for _, f := range files {
		sum, _, err := hashFile(filepath.Join(s.dir(m.ID), f.Name))
		if err != nil {
			return fmt.Errorf("corrupt: %w", err)
		}
		if sum != f.SHA256 {
			return fmt.Errorf("corrupt: checksum of %s does not match its manifest", f.Name)
		}
	}
	s.mu.Lock()
	s.verified[m.ID] = fp
	s.mu.Unlock()
	return nil
}

// Verify re-reads every file of snap and checks its size and SHA-256 against
// the manifest, whatever this process verified before: the orchestrator
// asks after a restore failed for a reason the backend did not put on the
// snapshot's files. It returns nil when they are intact, an error wrapping
// sandbox.ErrBadSnapshot when the manifest or a file is missing, unreadable
// or does not match, and ctx's error if ctx ends first.
func (s *Store) Verify(ctx context.Context, snap orchestrator.Snapshot) error {
	dir := s.dir(snap.ID)
	bad := func(err error) error {
		s.mu.Lock()
		delete(s.verified, snap.ID) // its next Get hashes, and refuses, it
		s.mu.Unlock()
		return fmt.Errorf("snapshot %q: %w: %w", snap.ID, sandbox.ErrBadSnapshot, err)
	}
	m, err := readManifest(dir)
	if err != nil {
		return bad(err)
	}
	files := m.files()
	if _, err := fingerprint(dir, files); err != nil {
		return bad(err)
	}
	for _, f := range files {
		if err := ctx.Err(); err != nil {
			return fmt.Errorf("snapshot %q: verify: %w", snap.ID, err)
		}
		sum, _, err := hashFile(filepath.Join(dir, f.Name))
		if err != nil {
			return bad(fmt.Errorf("corrupt: %w", err))
		}
		if sum != f.SHA256 {
			return bad(fmt.Errorf("corrupt: checksum of %s does not match its manifest", f.Name))
		}
	}
	s.markVerified(m.ID, dir, files)
	return nil
}

// files lists the snapshot's files, the working set last.
func (m *Manifest) files() []FileSum {
	files := append([]FileSum(nil), m.Files...)
	if m.WorkingSet != nil {
		files = append(files, *m.WorkingSet)
	}
	return files
}

// fingerprint identifies the current version of files in dir by name,
// size and mtime; a size that differs from the manifest's is an error.
func fingerprint(dir string, files []FileSum) (string, error) {
	var fp strings.Builder
	for _, f := range files {
		fi, err := os.Stat(filepath.Join(dir, f.Name))
		if err != nil {
			return "", fmt.Errorf("incomplete: %w", err)
		}
		if fi.Size() != f.Size {
			return "", fmt.Errorf("corrupt: %s is %d bytes, manifest says %d", f.Name, fi.Size(), f.Size)
		}
		fmt.Fprintf(&fp, "%s:%d:%d;", f.Name, fi.Size(), fi.ModTime().UnixNano())
	}
	return fp.String(), nil
}

// markVerified records that the files of snapshot id, as they are now in
// dir, have just been hashed by this process (it wrote or checked them),
// so that its next use need not hash them again.
func (s *Store) markVerified(id, dir string, files []FileSum) {
	fp, err := fingerprint(dir, files)
	if err != nil {
		return // the next use checks, and reports, this
	}
	s.mu.Lock()
	s.verified[id] = fp
	s.mu.Unlock()
}

func hashFile(path string) (string, int64, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return "", 0, fmt.Errorf("read %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), n, nil
}

// Create writes a snapshot for key through write and commits it atomically.
// Concurrent Creates for one key run write once; the others wait and get the
// same result.
func (s *Store) Create(ctx context.Context, key orchestrator.SnapshotKey, write func(ctx context.Context, dir string) error) (orchestrator.Snapshot, error) {
	id := ID(key)
	s.mu.Lock()
	if c, ok := s.creating[id]; ok {
		s.mu.Unlock()
		select {
		case <-c.done:
			return c.snap, c.err
		case <-ctx.Done():
			return orchestrator.Snapshot{}, ctx.Err()
		}
	}
	c := &creation{done: make(chan struct{})}
	s.creating[id] = c
	s.mu.Unlock()
	c.snap, c.err = s.create(ctx, id, key, write)
	s.mu.Lock()
	delete(s.creating, id)
	s.mu.Unlock()
	close(c.done)
	return c.snap, c.err
}

func (s *Store) create(ctx context.Context, id string, key orchestrator.SnapshotKey, write func(ctx context.Context, dir string) error) (orchestrator.Snapshot, error) {
	if snap, err := s.Get(ctx, key); err == nil {
		return snap, nil
	}
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	tmp := filepath.Join(s.root, ".tmp-"+id+"-"+hex.EncodeToString(rnd[:]))
	if err := os.Mkdir(tmp, 0o700); err != nil {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q: %w", id, err)
	}
	committed := false
	defer func() {
		if !committed {
			os.RemoveAll(tmp)
		}
	}()
	if err := write(ctx, tmp); err != nil {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q: backend: %w", id, err)
	}
	bi := s.backends[key.Backend]
	m := &Manifest{Version: manifestVersion, ID: id, Function: key.Function, ImageDigest: key.ImageDigest, Backend: key.Backend,
		Config: key.Config, RuntimeVersion: bi.RuntimeVersion, Created: time.Now().UTC(), Modes: bi.Modes, Restore: bi.Restore}
	err := filepath.WalkDir(tmp, func(path string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if !d.Type().IsRegular() {
			return nil
		}
		rel, _ := filepath.Rel(tmp, path)
		sum, n, err := hashFile(path)
		if err != nil {
			return err
		}
		if err := fsyncPath(path); err != nil {
			return err
		}
		m.Files = append(m.Files, FileSum{Name: rel, Size: n, SHA256: sum})
		return nil
	})
	if err != nil {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q: checksum files: %w", id, err)
	}
	if len(m.Files) == 0 {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q: the backend wrote no files", id)
	}
	if err := writeManifest(tmp, m); err != nil {
		return orchestrator.Snapshot{}, err
	}
	final := s.dir(id)
	// A stale (unusable) snapshot under the same id is replaced.
	if _, err := os.Stat(final); err == nil {
		if err := s.trash(id); err != nil {
			return orchestrator.Snapshot{}, err
		}
	}
	if err := os.Rename(tmp, final); err != nil {
		return orchestrator.Snapshot{}, fmt.Errorf("snapshot %q: commit: %w", id, err)
	}
	committed = true
	if err := fsyncPath(s.root); err != nil {
		return orchestrator.Snapshot{}, err
	}
	// The files were hashed above, as written: their first restore by
	// this process need not read them all again.
	s.markVerified(id, final, m.files())
	s.log.Info("snapshot committed", "id", id, "function", key.Function, "files", len(m.Files))
	return s.toSnapshot(m), nil
}

func writeManifest(dir string, m *Manifest) error {
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return err
	}
	tmp := filepath.Join(dir, manifestName+".tmp")
	f, err := os.OpenFile(tmp, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, filepath.Join(dir, manifestName)); err != nil {
		return err
	}
	return fsyncPath(dir)
}

func fsyncPath(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", path, err)
	}
	return nil
}

// CommitWorkingSet records the working-set file written by a REAP record
// phase in the snapshot's manifest.
func (s *Store) CommitWorkingSet(ctx context.Context, snap orchestrator.Snapshot) error {
	dir := s.dir(snap.ID)
	m, err := readManifest(dir)
	if err != nil {
		return fmt.Errorf("snapshot %q: %w", snap.ID, err)
	}
	sum, n, err := hashFile(filepath.Join(dir, WorkingSetName))
	if err != nil {
		return fmt.Errorf("snapshot %q: working set: %w", snap.ID, err)
	}
	// Whether the other files were verified is decided before the WS
	// joins the manifest: a snapshot this process had not checked yet is
	// still checked, whole, on its next use.
	s.mu.Lock()
	prev, had := s.verified[snap.ID]
	s.mu.Unlock()
	cur, ferr := fingerprint(dir, m.files())
	m.WorkingSet = &FileSum{Name: WorkingSetName, Size: n, SHA256: sum}
	if err := writeManifest(dir, m); err != nil {
		return err
	}
	if had && ferr == nil && prev == cur {
		s.markVerified(snap.ID, dir, m.files())
	}
	return nil
}

// Invalidate moves an unusable snapshot aside and removes it.
func (s *Store) Invalidate(ctx context.Context, key orchestrator.SnapshotKey, why string) error {
	id := ID(key)
	if _, err := os.Stat(s.dir(id)); errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	s.log.Warn("removing unusable snapshot", "id", id, "why", why)
	return s.trash(id)
}

func (s *Store) trash(id string) error {
	var rnd [4]byte
	_, _ = rand.Read(rnd[:])
	t := filepath.Join(s.root, ".trash-"+id+"-"+hex.EncodeToString(rnd[:]))
	if err := os.Rename(s.dir(id), t); err != nil {
		return fmt.Errorf("snapshot %q: move aside: %w", id, err)
	}
	s.mu.Lock()
	delete(s.verified, id)
	s.mu.Unlock()
	return os.RemoveAll(t)
}

// RemoveFunction removes every snapshot of function.
func (s *Store) RemoveFunction(ctx context.Context, function string) error {
	list, err := s.List(ctx, function)
	if err != nil {
		return err
	}
	var errs []error
	for _, si := range list {
		errs = append(errs, s.trash(si.ID))
	}
	return errors.Join(errs...)
}

// List describes every snapshot (of function, if not empty).
func (s *Store) List(ctx context.Context, function string) ([]Info, error) {
	ents, err := os.ReadDir(s.root)
	if err != nil {
		return nil, err
	}
	var out []Info
	for _, e := range ents {
		if !e.IsDir() || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		si, err := s.Inspect(ctx, e.Name())
		if err != nil {
			s.log.Warn("unreadable snapshot", "dir", e.Name(), "err", err)
			continue
		}
		if function == "" || si.Function == function {
			out = append(out, si)
		}
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Inspect describes one snapshot.
func (s *Store) Inspect(ctx context.Context, id string) (Info, error) {
	if id == "" || len(id) > 200 || strings.ContainsAny(id, "/\\\x00") || strings.HasPrefix(id, ".") {
		return Info{}, fmt.Errorf("%w: snapshot %.80q", ErrNotFound, id)
	}
	dir := s.dir(id)
	m, err := readManifest(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return Info{}, fmt.Errorf("%w: %q", ErrNotFound, id)
	}
	if err != nil {
		return Info{}, err
	}
	var du int64
	_ = filepath.WalkDir(dir, func(_ string, d fs.DirEntry, err error) error {
		if err == nil && !d.IsDir() {
			if fi, err := d.Info(); err == nil {
				du += fi.Size()
			}
		}
		return nil
	})
	details := map[string]string{"runtime_version": m.RuntimeVersion, "config": m.Config}
	for _, f := range m.Files {
		details["file "+f.Name] = fmt.Sprintf("%d bytes sha256:%s", f.Size, f.SHA256)
	}
	if m.WorkingSet != nil {
		details["working_set_bytes"] = fmt.Sprint(m.WorkingSet.Size)
	}
	if m.Restore == "eager" {
		details["note"] = "restore is eager: the whole memory image is read before the instance runs, so lazy and REAP modes do not apply"
	}
	return Info{ID: m.ID, Function: m.Function, Backend: m.Backend, ImageDigest: m.ImageDigest, Created: m.Created,
		DiskBytes: du, WorkingSet: m.WorkingSet != nil, Modes: m.Modes, Restore: m.Restore, Details: details, Path: dir}, nil
}

// Remove deletes one snapshot.
func (s *Store) Remove(ctx context.Context, id string) error {
	if _, err := s.Inspect(ctx, id); err != nil {
		return err
	}
	return s.trash(id)
}
