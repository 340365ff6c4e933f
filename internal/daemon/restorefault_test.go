package daemon

import (
	"bytes"
	"context"
	"encoding/json"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	wasmsb "vhive.dev/vhive/internal/sandbox/wasm"
	wasmrt "vhive.dev/vhive/internal/wasm"
)

// logBuffer collects the daemon's JSON log records.
type logBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *logBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// records returns the records whose msg contains msg.
func (b *logBuffer) records(t testing.TB, msg string) []map[string]any {
	t.Helper()
	b.mu.Lock()
	defer b.mu.Unlock()
	var out []map[string]any
	for _, line := range strings.Split(b.buf.String(), "\n") {
		if line == "" {
			continue
		}
		var r map[string]any
		if err := json.Unmarshal([]byte(line), &r); err != nil {
			t.Fatalf("log line %q: %v", line, err)
		}
		if m, _ := r["msg"].(string); strings.Contains(m, msg) {
			out = append(out, r)
		}
	}
	return out
}

// fallbacks is vhive_snapshot_fallbacks_total of fn for reason.
func (td *testDaemon) fallbacks(t testing.TB, fn, reason string) float64 {
	t.Helper()
	mfs, err := td.d.registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != "vhive_snapshot_fallbacks_total" {
			continue
		}
		for _, m := range mf.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["function"] == fn && labels["reason"] == reason {
				return m.GetCounter().GetValue()
			}
		}
	}
	return 0
}

func (td *testDaemon) snapshots(t testing.TB, fn string) []*vhivepb.SnapshotInfo {
	t.Helper()
	ls, err := td.client.ListSnapshots(context.Background(), &vhivepb.ListSnapshotsRequest{Function: fn})
	if err != nil {
		t.Fatal(err)
	}
	return ls.Snapshots
}

// invokeKillingWorkerInRestore invokes fn (a wasm function in lazy mode with
// a snapshot and no instance) and kills the wasm worker its restore took
// while the restore waits for that worker: the pool's ready worker is
// stopped (SIGSTOP) before the request, so the restore cannot finish before
// the kill, and killed (SIGKILL) once the memory manager serves its memory
// socket, the step before the worker is asked to restore.
func (td *testDaemon) invokeKillingWorkerInRestore(t *testing.T, fn, module string) *vhivepb.InvokeResponse {
	t.Helper()
	ctx := context.Background()
	be := td.d.backends["wasm"].(*wasmsb.Backend)
	if err := be.Warm(ctx, module); err != nil {
		t.Fatal(err)
	}
	root := filepath.Join(td.cfg.StateDir, "w")
	ents, err := os.ReadDir(root)
	if err != nil {
		t.Fatal(err)
	}
	// No instance runs: every worker directory is a ready pool worker's.
	stopped := map[string]int{}
	for _, e := range ents {
		b, err := os.ReadFile(filepath.Join(root, e.Name(), "worker.pid"))
		if err != nil {
			continue
		}
		pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
		if err != nil || pid <= 1 {
			t.Fatalf("worker pid file of %s: %q", e.Name(), b)
		}
		if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
			t.Fatalf("stop pool worker %d: %v", pid, err)
		}
		stopped[e.Name()] = pid
	}
	if len(stopped) == 0 {
		t.Fatal("the warmed pool has no worker")
	}
	t.Cleanup(func() {
		for _, pid := range stopped {
			_ = syscall.Kill(pid, syscall.SIGCONT) // gone already, or the backend's to end
		}
	})
	type result struct {
		r   *vhivepb.InvokeResponse
		err error
	}
	res := make(chan result, 1)
	go func() {
		r, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte("x")})
		res <- result{r, err}
	}()
	killed := 0
	for deadline := time.Now().Add(60 * time.Second); killed == 0; time.Sleep(time.Millisecond) {
		for dir, pid := range stopped {
			if _, err := os.Stat(filepath.Join(root, dir, "memory.sock")); err == nil {
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatalf("kill worker %d: %v", pid, err)
				}
				killed = pid
				t.Logf("killed wasm worker %d in the restore of %s", pid, fn)
			}
		}
		select {
		case r := <-res:
			t.Fatalf("the invocation ended (%v, %v) before its restore reached the stopped worker", r.r, r.err)
		default:
		}
		if killed == 0 && time.Now().After(deadline) {
			t.Fatal("no restore took a stopped pool worker within 60s")
		}
	}
	r := <-res
	if r.err != nil {
		t.Fatalf("invoke %s with its restoring worker killed: %v; want a boot instead", fn, r.err)
	}
	return r.r
}

// TestWasmWorkerKilledInRestoreKeepsSnapshot: a wasm worker killed while it
// restores a lazy snapshot is a fault of that worker, not of the snapshot:
// the cold start boots (logged at WARN, counted as a restore-failed
// fallback), the snapshot stays as it was, and the next cold start restores
// from it. A snapshot whose files no longer match their checksums is still
// removed when a restore from it fails.
func TestWasmWorkerKilledInRestoreKeepsSnapshot(t *testing.T) {
	counter := shared.Function(t, "counter", true)
	cfg := wasmConfig(t)
	cfg.WasmPoolSize = 1
	var logs logBuffer
	cfg.Logger = slog.New(slog.NewJSONHandler(&logs, nil))
	td := startDaemon(t, cfg)
	im := td.importImage(t, counter)
	ctx := context.Background()
	img, err := td.d.images.Get(ctx, im.Ref)
	if err != nil {
		t.Fatal(err)
	}
	const fn = "kr"
	td.deploy(t, &vhivepb.FunctionSpec{Name: fn, Image: im.Ref, Sandbox: "wasm", StartMode: "lazy"})
	first := td.invoke(t, fn, "")
	if first.StartMode != "boot" || !strings.HasPrefix(string(first.Payload), "count=1 ") {
		t.Fatalf("first = %+v", first)
	}
	checksum := strings.TrimPrefix(string(first.Payload), "count=1 ")
	snap := td.waitSnapshot(t, fn)
	td.stopInstances(t, fn)

	r := td.invokeKillingWorkerInRestore(t, fn, img.WasmModule)
	if !r.ColdStart || r.StartMode != "boot" || string(r.Payload) != "count=1 "+checksum {
		t.Fatalf("cold start whose restoring worker was killed = %+v, want a boot answering count=1", r)
	}
	// Checked as soon as the reply is here: a snapshot removed by the
	// failed restore would be missing now, or retaken after this boot.
	if ls := td.snapshots(t, fn); len(ls) != 1 || ls[0].Id != snap.Id || ls[0].CreatedUnixMs != snap.CreatedUnixMs {
		t.Fatalf("after the worker was killed in its restore the snapshots are %+v; want %s created at %d, kept", ls, snap.Id, snap.CreatedUnixMs)
	}
	if n := td.fallbacks(t, fn, "restore-failed"); n != 1 {
		t.Errorf("vhive_snapshot_fallbacks_total{reason=restore-failed} = %v, want 1", n)
	}
	warns := logs.records(t, "snapshot kept")
	if len(warns) != 1 || warns[0]["level"] != "WARN" || warns[0]["function"] != fn || warns[0]["reason"] != "restore-failed" || warns[0]["err"] == "" {
		t.Errorf("log records of the kept snapshot: %v; want one WARN naming %s, the reason and the error", warns, fn)
	}
	if rm := logs.records(t, "removing unusable snapshot"); len(rm) != 0 {
		t.Errorf("the snapshot was removed: %v", rm)
	}

	// The next cold start restores from the kept snapshot.
	td.stopInstances(t, fn)
	r = td.invoke(t, fn, "")
	if !r.ColdStart || r.StartMode != "lazy" || string(r.Payload) != "count=2 "+checksum {
		t.Fatalf("cold start after the kept snapshot = %+v, want a lazy restore answering count=2", r)
	}

	// A corrupt snapshot is still removed. The memory file changes in place
	// with its size and mtime kept, so that neither the store nor the
	// backend hashes it again before the restore (both verified it before
	// the restore above); the restore's worker is killed, and the check the
	// failure triggers finds the corruption.
	td.stopInstances(t, fn)
	mem := filepath.Join(snap.Path, wasmrt.MemoryFile)
	fi, err := os.Stat(mem)
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(mem)
	if err != nil || len(data) == 0 {
		t.Fatalf("read %s: %d bytes, %v", mem, len(data), err)
	}
	data[len(data)/2] ^= 0xff
	if err := os.WriteFile(mem, data, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chtimes(mem, fi.ModTime(), fi.ModTime()); err != nil {
		t.Fatal(err)
	}
	r = td.invokeKillingWorkerInRestore(t, fn, img.WasmModule)
	if !r.ColdStart || r.StartMode != "boot" || string(r.Payload) != "count=1 "+checksum {
		t.Fatalf("cold start from the corrupt snapshot = %+v, want a boot answering count=1", r)
	}
	rm := logs.records(t, "removing unusable snapshot")
	if len(rm) != 1 || !strings.Contains(rm[0]["why"].(string), "checksum of "+wasmrt.MemoryFile) {
		t.Fatalf("log records of removed snapshots: %v; want one naming the memory file's checksum", rm)
	}
	if n := td.fallbacks(t, fn, "restore-failed"); n != 2 {
		t.Errorf("vhive_snapshot_fallbacks_total{reason=restore-failed} = %v, want 2", n)
	}
	// A fresh snapshot replaces it, and restores.
	fresh := td.waitSnapshot(t, fn)
	if fresh.CreatedUnixMs == snap.CreatedUnixMs {
		t.Fatalf("snapshot after the corrupt one was removed: %+v, still the old one", fresh)
	}
	td.stopInstances(t, fn)
	if r := td.invoke(t, fn, ""); r.StartMode != "lazy" || string(r.Payload) != "count=2 "+checksum {
		t.Fatalf("cold start from the fresh snapshot = %+v", r)
	}
}
