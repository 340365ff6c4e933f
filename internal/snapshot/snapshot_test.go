package snapshot

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"vhive.dev/vhive/internal/orchestrator"
	"vhive.dev/vhive/internal/sandbox"
)

func newStore(t *testing.T, version string) *Store {
	t.Helper()
	s, err := New(Options{Root: filepath.Join(t.TempDir(), "snaps"), Backends: map[string]BackendInfo{
		"wasm": {RuntimeVersion: version, Modes: []string{"snapshot", "lazy", "reap"}, Restore: "lazy"},
	}})
	if err != nil {
		t.Fatal(err)
	}
	return s
}

var key = orchestrator.SnapshotKey{Function: "fn", ImageDigest: "sha256:aa", Backend: "wasm", Config: "c1"}

func writeFiles(ctx context.Context, dir string) error {
	if err := os.WriteFile(filepath.Join(dir, "memory"), make([]byte, 8192), 0o600); err != nil {
		return err
	}
	return os.WriteFile(filepath.Join(dir, "state.json"), []byte(`{"x":1}`), 0o600)
}

func TestConcurrentCreateWritesOnce(t *testing.T) {
	s := newStore(t, "v1")
	ctx := context.Background()
	var writes atomic.Int32
	var wg sync.WaitGroup
	ids := make([]string, 8)
	for i := range ids {
		wg.Add(1)
		go func() {
			defer wg.Done()
			snap, err := s.Create(ctx, key, func(ctx context.Context, dir string) error {
				writes.Add(1)
				return writeFiles(ctx, dir)
			})
			if err != nil {
				t.Error(err)
				return
			}
			ids[i] = snap.ID
		}()
	}
	wg.Wait()
	if n := writes.Load(); n != 1 {
		t.Fatalf("backend wrote %d snapshots for one key, want 1", n)
	}
	for _, id := range ids {
		if id != ids[0] {
			t.Fatalf("different snapshot ids returned: %v", ids)
		}
	}
	snap, err := s.Get(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	if snap.HasWorkingSet {
		t.Fatal("fresh snapshot claims a working set")
	}
	list, err := s.List(ctx, "fn")
	if err != nil || len(list) != 1 || list[0].DiskBytes < 8192 {
		t.Fatalf("List = %+v, %v", list, err)
	}
}

func TestCorruptAndIncompatibleSnapshotsAreRefused(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	snap, err := s.Create(ctx, key, writeFiles)
	if err != nil {
		t.Fatal(err)
	}
	// Another key (new image digest) never sees this snapshot.
	other := key
	other.ImageDigest = "sha256:bb"
	if _, err := s.Get(ctx, other); !errors.Is(err, orchestrator.ErrNotFound) {
		t.Fatalf("Get(other digest) = %v, want ErrNotFound", err)
	}
	// Flip a byte: same size, so only the checksum catches it. (Its
	// mtime is set a second later: on a kernel whose timestamps are one
	// tick coarse, a write within the tick of Create could keep the mtime
	// this process verified, see TestWriterTrustsItsOwnFiles.)
	flipped := filepath.Join(snap.Dir, "memory")
	if err := os.WriteFile(flipped, append(make([]byte, 8191), 1), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(flipped, time.Time{}, time.Now().Add(time.Second)); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, key); err == nil || errors.Is(err, orchestrator.ErrNotFound) {
		t.Fatalf("Get of corrupt snapshot = %v, want a corruption error", err)
	}
	if err := s.Invalidate(ctx, key, "test"); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, key); !errors.Is(err, orchestrator.ErrNotFound) {
		t.Fatalf("Get after Invalidate = %v, want ErrNotFound", err)
	}

	// A truncated file is refused.
	snap, err = s.Create(ctx, key, writeFiles)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(filepath.Join(snap.Dir, "memory"), 100); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, key); err == nil {
		t.Fatal("truncated snapshot accepted")
	}

	// A snapshot from another runtime version is refused.
	s2 := newStore(t, "v1")
	if _, err := s2.Create(ctx, key, writeFiles); err != nil {
		t.Fatal(err)
	}
	s3, err := New(Options{Root: s2.root, Backends: map[string]BackendInfo{"wasm": {RuntimeVersion: "v2"}}})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := s3.Get(ctx, key); err == nil {
		t.Fatal("snapshot of another runtime version accepted")
	}
}

func TestFailedWriteLeavesNothing(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	_, err := s.Create(ctx, key, func(ctx context.Context, dir string) error {
		_ = writeFiles(ctx, dir)
		return errors.New("checkpoint failed")
	})
	if err == nil {
		t.Fatal("Create succeeded although the backend failed")
	}
	ents, _ := os.ReadDir(s.root)
	if len(ents) != 0 {
		t.Fatalf("failed snapshot left %d entries in the store", len(ents))
	}
}

// createWithWS creates key's snapshot in s and commits a working set to it.
func createWithWS(t *testing.T, s *Store) orchestrator.Snapshot {
	t.Helper()
	ctx := context.Background()
	snap, err := s.Create(ctx, key, writeFiles)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(snap.WorkingSet, []byte("ws-bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := s.CommitWorkingSet(ctx, snap); err != nil {
		t.Fatal(err)
	}
	return snap
}

// rewriteKeepingMtime replaces path's bytes and restores its mtime, as
// bit rot (or a careless tool) would leave it.
func rewriteKeepingMtime(t *testing.T, path string, data []byte) {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(path, time.Time{}, fi.ModTime()); err != nil {
		t.Fatal(err)
	}
}

func TestWorkingSetAndRemoveFunction(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	snap := createWithWS(t, s)
	got, err := s.Get(ctx, key)
	if err != nil || !got.HasWorkingSet {
		t.Fatalf("Get after CommitWorkingSet = %+v, %v", got, err)
	}
	// The snapshot directory deleted under a live store: treated as absent.
	if err := os.RemoveAll(snap.Dir); err != nil {
		t.Fatal(err)
	}
	if _, err := s.Get(ctx, key); !errors.Is(err, orchestrator.ErrNotFound) {
		t.Fatalf("Get after external delete = %v", err)
	}
	if _, err := s.Create(ctx, key, writeFiles); err != nil {
		t.Fatal(err)
	}
	if err := s.RemoveFunction(ctx, "fn"); err != nil {
		t.Fatal(err)
	}
	if list, _ := s.List(ctx, ""); len(list) != 0 {
		t.Fatalf("snapshots left after RemoveFunction: %+v", list)
	}
	if _, err := s.Inspect(ctx, "../etc"); !errors.Is(err, ErrNotFound) {
		t.Fatalf("Inspect(../etc) = %v", err)
	}
}

// TestRestartRemovesUncommittedFiles: what a daemon killed mid-record or
// mid-manifest-update left in a committed snapshot (a working set not yet
// in the manifest, temporaries) is removed when the store is opened again;
// the committed files stay and the snapshot is still usable.
func TestRestartRemovesUncommittedFiles(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	snap, err := s.Create(ctx, key, writeFiles)
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{WorkingSetName, ".ws.tmp123", manifestName + ".tmp"} {
		if err := os.WriteFile(filepath.Join(snap.Dir, f), []byte("half"), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	s2, err := New(Options{Root: s.root, Backends: s.backends})
	if err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(snap.Dir)
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) != 3 { // manifest.json, memory, state.json
		t.Fatalf("snapshot dir after reopen holds %v, want only the manifest and its files", names)
	}
	got, err := s2.Get(ctx, key)
	if err != nil || got.HasWorkingSet {
		t.Fatalf("Get after reopen = %+v, %v; want the snapshot without a working set", got, err)
	}
}

// TestPruneRemovesSnapshotsOfRemovedFunctions: a removal interrupted after
// the function record was deleted leaves its snapshots; Prune with the
// deployed functions removes exactly those.
func TestPruneRemovesSnapshotsOfRemovedFunctions(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	other := key
	other.Function = "kept"
	for _, k := range []orchestrator.SnapshotKey{key, other} {
		if _, err := s.Create(ctx, k, writeFiles); err != nil {
			t.Fatal(err)
		}
	}
	removed, err := s.Prune(ctx, func(fn string) bool { return fn == "kept" })
	if err != nil || len(removed) != 1 || removed[0] != ID(key) {
		t.Fatalf("Prune = %v, %v; want [%s]", removed, err, ID(key))
	}
	list, _ := s.List(ctx, "")
	if len(list) != 1 || list[0].Function != "kept" {
		t.Fatalf("after Prune: %+v", list)
	}
	if ents, _ := os.ReadDir(s.root); len(ents) != 1 {
		t.Fatalf("snapshot root holds %d entries after Prune, want 1", len(ents))
	}
}

// TestWriterTrustsItsOwnFiles: the files of a snapshot this process
// created, and a working set it committed into a snapshot it had verified,
// were hashed as they were written, so their first restore does not hash
// them again: bytes changed behind the store's back with size and mtime
// kept are noticed only by another process (a daemon restart), which hashes
// everything on first use. A file whose mtime changed is hashed again.
func TestWriterTrustsItsOwnFiles(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	snap := createWithWS(t, s)
	// Rewrite both with other bytes of the same size, keeping the mtimes.
	rewriteKeepingMtime(t, filepath.Join(snap.Dir, "memory"), append(make([]byte, 8191), 1))
	rewriteKeepingMtime(t, snap.WorkingSet, []byte("WS-BYTES"))
	if got, err := s.Get(ctx, key); err != nil || !got.HasWorkingSet {
		t.Fatalf("the writer's own Get = %+v, %v; want its snapshot, not hashed again", got, err)
	}
	restarted, err := New(Options{Root: s.root, Backends: s.backends})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := restarted.Get(ctx, key); err == nil || errors.Is(err, orchestrator.ErrNotFound) {
		t.Fatalf("Get after a restart = %v, want a corruption error", err)
	}

	// A working set committed into a snapshot this process never checked
	// leaves the whole snapshot to be hashed on its next use.
	s2 := newStore(t, "v1")
	snap2, err := s2.Create(ctx, key, writeFiles)
	if err != nil {
		t.Fatal(err)
	}
	rewriteKeepingMtime(t, filepath.Join(snap2.Dir, "memory"), append(make([]byte, 8191), 2))
	other, err := New(Options{Root: s2.root, Backends: s2.backends})
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(snap2.WorkingSet, []byte("ws-bytes"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := other.CommitWorkingSet(ctx, snap2); err != nil {
		t.Fatal(err)
	}
	if _, err := other.Get(ctx, key); err == nil || errors.Is(err, orchestrator.ErrNotFound) {
		t.Fatalf("Get after another process committed the WS = %v, want a corruption error", err)
	}
}

// TestVerifyRehashesEveryFile: Verify reads the files again even when this
// process verified them (or wrote them) and nothing about them looks
// changed, tells bad files (sandbox.ErrBadSnapshot) from an ended context,
// and leaves the snapshot in place either way.
func TestVerifyRehashesEveryFile(t *testing.T) {
	ctx := context.Background()
	s := newStore(t, "v1")
	snap := createWithWS(t, s)
	if err := s.Verify(ctx, snap); err != nil {
		t.Fatalf("Verify of an intact snapshot: %v", err)
	}
	done, cancel := context.WithCancel(ctx)
	cancel()
	if err := s.Verify(done, snap); !errors.Is(err, context.Canceled) || errors.Is(err, sandbox.ErrBadSnapshot) {
		t.Fatalf("Verify with an ended context = %v, want context.Canceled and not ErrBadSnapshot", err)
	}

	// Same size and mtime: Get trusts its earlier check, Verify does not.
	rewriteKeepingMtime(t, filepath.Join(snap.Dir, "memory"), append(make([]byte, 8191), 1))
	if _, err := s.Get(ctx, key); err != nil {
		t.Fatalf("Get after an in-place change: %v (it trusts the files it checked)", err)
	}
	err := s.Verify(ctx, snap)
	if !errors.Is(err, sandbox.ErrBadSnapshot) || !strings.Contains(err.Error(), "checksum of memory") {
		t.Fatalf("Verify of a changed memory file = %v, want ErrBadSnapshot naming its checksum", err)
	}
	// The verdict is remembered: Get now refuses it too.
	if _, err := s.Get(ctx, key); err == nil {
		t.Fatal("Get after Verify found the memory file corrupt succeeded")
	}
	if _, err := os.Stat(snap.Dir); err != nil {
		t.Fatalf("Verify removed the snapshot (only Invalidate may): %v", err)
	}

	// A missing working set, and a missing manifest, are bad files too.
	s2 := newStore(t, "v1")
	snap = createWithWS(t, s2)
	if err := os.Remove(snap.WorkingSet); err != nil {
		t.Fatal(err)
	}
	if err := s2.Verify(ctx, snap); !errors.Is(err, sandbox.ErrBadSnapshot) {
		t.Fatalf("Verify without the working set = %v, want ErrBadSnapshot", err)
	}
	if err := os.Remove(filepath.Join(snap.Dir, manifestName)); err != nil {
		t.Fatal(err)
	}
	if err := s2.Verify(ctx, snap); !errors.Is(err, sandbox.ErrBadSnapshot) {
		t.Fatalf("Verify without the manifest = %v, want ErrBadSnapshot", err)
	}
}
