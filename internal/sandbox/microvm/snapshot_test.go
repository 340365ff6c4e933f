package microvm

import (
	"context"
	"crypto/sha256"
	"os"
	"path/filepath"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestSnapshotRestore snapshots a running testfn, checks the source keeps
// serving, restores it eagerly and lazily (each continuing the counter from
// the snapshot), and then restores two clones at once: they must draw
// different random numbers (the RNG reseeded) and tell the current time
// (the clock handed over), though the snapshot is older. The snapshot's RAM
// file is unchanged by the restores.
func TestSnapshotRestore(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src := e.start(t, e.spec("src"))
	for want := 1; want <= 3; want++ {
		if got := get(t, src.Endpoint(), "/count"); got != strconv.Itoa(want) {
			t.Fatalf("/count = %q, want %d", got, want)
		}
	}
	dir := t.TempDir()
	t0 := time.Now()
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatal(err)
	}
	t.Logf("snapshot (stop, migrate, copy RAM, cont): %s", time.Since(t0).Round(time.Millisecond))
	if got := get(t, src.Endpoint(), "/count"); got != "4" {
		t.Fatalf("source /count after the snapshot = %q, want 4", got)
	}
	memSum := fileSum(t, filepath.Join(dir, SnapshotMemory))
	for _, f := range []string{SnapshotState, SnapshotMemory} {
		var st syscall.Stat_t
		if err := syscall.Stat(filepath.Join(dir, f), &st); err != nil {
			t.Fatal(err)
		}
		t.Logf("snapshot file %s: %d bytes, %d allocated", f, st.Size, st.Blocks*512)
	}
	// Let the snapshot's clock fall behind: a clone that kept it would
	// answer a time before the restore.
	time.Sleep(3 * time.Second)

	for _, mode := range []sandbox.MemoryMode{sandbox.MemoryEager, sandbox.MemoryLazy} {
		spec := e.spec("restored-" + string(mode))
		t0 := time.Now()
		rs, err := e.b.Restore(ctx, spec, dir, sandbox.RestoreOptions{Mode: mode})
		if err != nil {
			t.Fatalf("Restore(%s): %v", mode, err)
		}
		t.Logf("restore %s: to resumed %s, stages %v", mode, time.Since(t0).Round(time.Millisecond), rs.(sandbox.RestoreReporter).RestoreStats().Stages)
		if st := rs.(sandbox.RestoreReporter).RestoreStats().Stages; st["LoadState"] <= 0 || st["ResumeAgent"] <= 0 || (mode == sandbox.MemoryEager) != (st["ReadMemory"] > 0) {
			t.Errorf("restore %s: stages %v, want LoadState, ResumeAgent and ReadMemory only when eager", mode, st)
		}
		got := get(t, rs.Endpoint(), "/count")
		t.Logf("restore %s: to first reply %s", mode, time.Since(t0).Round(time.Millisecond))
		if got != "4" {
			t.Errorf("restored (%s) /count = %q, want 4 (the state at the snapshot)", mode, got)
		}
		if rs.Endpoint() == src.Endpoint() {
			t.Errorf("restored sandbox shares the source's endpoint %s", rs.Endpoint())
		}
		if err := rs.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}

	const n = 2
	clones := make([]sandbox.Sandbox, n)
	errs := make([]error, n)
	before := time.Now()
	var wg sync.WaitGroup
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			clones[i], errs[i] = e.b.Restore(ctx, e.spec("clone-"+strconv.Itoa(i)), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("clone %d: %v", i, errs[i])
		}
		t.Cleanup(func() { _ = clones[i].Stop(context.Background()) })
	}
	rnd := map[string]int{}
	for i, c := range clones {
		r := get(t, c.Endpoint(), "/random")
		if len(r) != 32 {
			t.Fatalf("clone %d /random = %q", i, r)
		}
		if j, dup := rnd[r]; dup {
			t.Errorf("clones %d and %d drew the same random bytes %s: the guest RNG was not reseeded", j, i, r)
		}
		rnd[r] = i
		ns, err := strconv.ParseInt(get(t, c.Endpoint(), "/clock"), 10, 64)
		if err != nil {
			t.Fatal(err)
		}
		clock, after := time.Unix(0, ns), time.Now()
		if clock.Before(before) || clock.After(after.Add(5*time.Second)) {
			t.Errorf("clone %d clock %s, want between the restore (%s) and now (%s)", i, clock.Format(time.RFC3339Nano), before.Format(time.RFC3339Nano), after.Format(time.RFC3339Nano))
		}
		if got := get(t, c.Endpoint(), "/count"); got != "4" {
			t.Errorf("clone %d /count = %q, want 4", i, got)
		}
	}
	// The clones diverge independently.
	if got := get(t, clones[0].Endpoint(), "/count"); got != "5" {
		t.Errorf("clone 0 second /count = %q, want 5", got)
	}
	if got := get(t, clones[1].Endpoint(), "/count"); got != "5" {
		t.Errorf("clone 1 second /count = %q, want 5", got)
	}
	for _, c := range clones {
		if err := c.Stop(ctx); err != nil {
			t.Fatal(err)
		}
	}
	if fileSum(t, filepath.Join(dir, SnapshotMemory)) != memSum {
		t.Error("the snapshot's RAM file changed during the restores")
	}
}
