package oci

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

func TestSnapshotRestore(t *testing.T) {
	e := newEnv(t, RuntimeGVisor)
	ctx := context.Background()
	spec := e.spec("orig")
	sb := e.start(t, spec)
	for i := 1; i <= 3; i++ {
		if got := get(t, sb.Endpoint(), "/count"); got != fmt.Sprint(i) {
			t.Fatalf("/count = %q, want %d", got, i)
		}
	}
	dir := t.TempDir()
	start := time.Now()
	if err := sb.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("checkpoint --leave-running: %v", time.Since(start))
	if got := get(t, sb.Endpoint(), "/count"); got != "4" {
		t.Fatalf("original after checkpoint: /count = %q, want 4 (leave-running)", got)
	}
	ents, _ := os.ReadDir(dir)
	for _, en := range ents {
		fi, _ := en.Info()
		t.Logf("checkpoint file %s: %d bytes", en.Name(), fi.Size())
	}

	rspec := e.spec("restored")
	start = time.Now()
	rs, err := e.b.Restore(ctx, rspec, dir, sandbox.RestoreOptions{Mode: sandbox.MemoryEager})
	if err != nil {
		t.Fatal(err)
	}
	t.Logf("restore: %v", time.Since(start))
	t.Cleanup(func() { _ = rs.Stop(context.Background()) })
	if err := rs.Start(ctx); err != nil {
		t.Fatalf("Start of a restored sandbox: %v", err)
	}
	if rs.Endpoint() == sb.Endpoint() {
		t.Fatalf("restored sandbox shares the endpoint %s", rs.Endpoint())
	}
	if got := get(t, rs.Endpoint(), "/count"); got != "4" {
		t.Fatalf("restored: /count = %q, want 4 (state at the checkpoint was 3)", got)
	}
	if st, err := rs.Stats(ctx); err != nil || st.RSS == 0 {
		t.Errorf("restored stats %+v, %v", st, err)
	}
	// The original is independent of the clone.
	if got := get(t, sb.Endpoint(), "/count"); got != "5" {
		t.Fatalf("original: /count = %q, want 5", got)
	}
	if err := rs.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	e.assertClean(t, rspec.ID)

	// Eight concurrent restores of one checkpoint, each in its own netns.
	const n = 8
	var wg sync.WaitGroup
	errs := make([]error, n)
	sbs := make([]sandbox.Sandbox, n)
	start = time.Now()
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			sbs[i], errs[i] = e.b.Restore(ctx, e.spec(fmt.Sprintf("clone-%d", i)), dir, sandbox.RestoreOptions{})
		}()
	}
	wg.Wait()
	t.Logf("%d concurrent restores: %v", n, time.Since(start))
	for i := range n {
		if sbs[i] != nil {
			t.Cleanup(func() { _ = sbs[i].Stop(context.Background()) })
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for i, s := range sbs {
		if got := get(t, s.Endpoint(), "/count"); got != "4" {
			t.Errorf("clone %d: /count = %q, want 4", i, got)
		}
	}
	for i, s := range sbs {
		if err := s.Stop(ctx); err != nil {
			t.Errorf("stop clone %d: %v", i, err)
		}
		e.assertClean(t, s.ID())
	}
}

func TestRestoreUnsupported(t *testing.T) {
	ctx := context.Background()
	g := newEnv(t, RuntimeGVisor)
	dir := t.TempDir()
	for _, m := range []sandbox.MemoryMode{sandbox.MemoryLazy, sandbox.MemoryRecord, sandbox.MemoryPrefetch} {
		if _, err := g.b.Restore(ctx, g.spec("lazy"), dir, sandbox.RestoreOptions{Mode: m}); !errors.Is(err, sandbox.ErrNotSupported) {
			t.Errorf("gvisor restore mode %q: %v, want ErrNotSupported", m, err)
		}
	}
	if _, err := g.b.Restore(ctx, g.spec("empty"), dir, sandbox.RestoreOptions{}); err == nil {
		t.Error("restore from an empty directory succeeded")
	}
	if _, err := os.Stat(filepath.Join(g.root, "bundles", "empty")); !os.IsNotExist(err) {
		t.Errorf("failed restore left its bundle: %v", err)
	}
	r := newEnv(t, RuntimeRunc)
	if _, err := r.b.Restore(ctx, r.spec("x"), dir, sandbox.RestoreOptions{}); !errors.Is(err, sandbox.ErrNotSupported) {
		t.Errorf("runc restore: %v, want ErrNotSupported", err)
	}
	if r.b.Capabilities().Snapshot || !g.b.Capabilities().Snapshot || !g.b.Capabilities().EagerRestore {
		t.Errorf("capabilities runc %+v gvisor %+v", r.b.Capabilities(), g.b.Capabilities())
	}
}
