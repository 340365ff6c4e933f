package microvm

import (
	"bufio"
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

// vmFlags returns the VmFlags of pid's mapping of path (/proc/PID/smaps).
func vmFlags(t *testing.T, pid int, path string) []string {
	t.Helper()
	f, err := os.Open("/proc/" + strconv.Itoa(pid) + "/smaps")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	in := false
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) >= 6 && strings.Contains(fs[0], "-") && !strings.HasSuffix(fs[0], ":") {
			in = fs[5] == path
			continue
		}
		if in && len(fs) > 0 && fs[0] == "VmFlags:" {
			return fs[1:]
		}
	}
	t.Fatalf("pid %d: no mapping of %s in smaps", pid, path)
	return nil
}

func qemuPid(sb sandbox.Sandbox) int {
	s := sb.(*Sandbox)
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.cmd.Process.Pid
}

// reapInputs are the two requests every restore must answer as the booted
// source did after the snapshot.
var reapInputs = []string{"/count", "/alloc?mb=3"}

// TestReapRecordPrefetch: snapshot a booted testfn; restore it in record
// mode from an evicted memory file (QEMU runs without the hugepage advice
// on guest RAM, which maps the record device), answer, FinishRecord — the
// WS file is written and parses; then a prefetch restore (evicted again)
// reads exactly the WS into the page cache and answers both inputs as the
// boot did; and WS files with a flipped byte in the header or in the run
// table are refused: the restore falls back to lazy, says why, and still
// answers right. The memory file never changes.
func TestReapRecordPrefetch(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src := e.start(t, e.spec("src"))
	if got := get(t, src.Endpoint(), "/count"); got != "1" {
		t.Fatalf("/count = %q", got)
	}
	dir := t.TempDir()
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatal(err)
	}
	var want []string
	for _, in := range reapInputs {
		want = append(want, get(t, src.Endpoint(), in))
	}
	if err := src.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	// The restores may get the source's address back from the netpool: a
	// kept-alive connection to it would now reach a guest that holds the
	// snapshot's TCP state.
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	mem := filepath.Join(dir, SnapshotMemory)
	memSum := fileSum(t, mem)
	ws := filepath.Join(dir, "ws")

	// Record.
	if err := evict(mem); err != nil {
		t.Fatal(err)
	}
	rs, err := e.b.Restore(ctx, e.spec("rec"), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryRecord, WorkingSet: ws})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = rs.Stop(context.Background()) })
	dev := rs.(*Sandbox).restore.reap.dev.path
	for _, fl := range vmFlags(t, qemuPid(rs), dev) {
		if fl == "hg" {
			t.Errorf("record restore: guest RAM mapping of %s has the hugepage advice (VmFlags hg): the launcher's filter did not apply", dev)
		}
	}
	if got := get(t, rs.Endpoint(), reapInputs[0]); got != want[0] {
		t.Errorf("record restore %s = %q, want %q", reapInputs[0], got, want[0])
	}
	if _, err := os.Stat(ws); !os.IsNotExist(err) {
		t.Fatalf("WS file exists before FinishRecord: %v", err)
	}
	if err := rs.(sandbox.Recorder).FinishRecord(ctx); err != nil {
		t.Fatal(err)
	}
	w, err := readWS(ws, mem)
	if err != nil {
		t.Fatalf("recorded WS: %v", err)
	}
	st := rs.(sandbox.RestoreReporter).RestoreStats()
	t.Logf("recorded WS: %d pages (%.1f MiB) in %d runs; record device cache %d pages; stats %v", w.Pages(), float64(w.Bytes())/(1<<20), len(w.Runs), st.Pages["RecDevicePages"], st.Pages)
	if w.Pages() == 0 || st.Pages["RecPages"] != w.Pages() || st.Pages["RecRegions"] != int64(len(w.Runs)) {
		t.Errorf("WS %d pages in %d runs, stats %v", w.Pages(), len(w.Runs), st.Pages)
	}
	if err := rs.(sandbox.Recorder).FinishRecord(ctx); err == nil {
		t.Error("a second FinishRecord succeeded")
	}
	// Still serving after the record.
	if got := get(t, rs.Endpoint(), reapInputs[1]); got != want[1] {
		t.Errorf("record restore %s = %q, want %q", reapInputs[1], got, want[1])
	}
	if err := rs.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()

	// A record instance stopped before FinishRecord (the bench stops
	// instances right after their first reply, while the orchestrator's
	// FinishRecord is on its way) still yields its working set.
	ws2 := filepath.Join(t.TempDir(), "ws-after-stop")
	rs2, err := e.b.Restore(ctx, e.spec("rec2"), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryRecord, WorkingSet: ws2})
	if err != nil {
		t.Fatal(err)
	}
	if got := get(t, rs2.Endpoint(), reapInputs[0]); got != want[0] {
		t.Errorf("second record restore %s = %q, want %q", reapInputs[0], got, want[0])
	}
	if err := rs2.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	if err := rs2.(sandbox.Recorder).FinishRecord(ctx); err != nil {
		t.Fatalf("FinishRecord after Stop: %v", err)
	}
	if w2, err := readWS(ws2, mem); err != nil || w2.Pages() == 0 {
		t.Errorf("WS recorded before Stop: %v, err %v", w2, err)
	}

	restore := func(id, wsPath string) (sandbox.Sandbox, sandbox.RestoreResult) {
		t.Helper()
		if err := evict(mem); err != nil {
			t.Fatal(err)
		}
		t0 := time.Now()
		sb, err := e.b.Restore(ctx, e.spec(id), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryPrefetch, WorkingSet: wsPath})
		if err != nil {
			t.Fatalf("%s: %v", id, err)
		}
		defer func() {
			_ = sb.Stop(ctx)
			http.DefaultTransport.(*http.Transport).CloseIdleConnections()
		}()
		for i, in := range reapInputs {
			if got := get(t, sb.Endpoint(), in); got != want[i] {
				t.Errorf("%s: %s = %q, want %q (as the booted source answered)", id, in, got, want[i])
			}
		}
		st := sb.(sandbox.RestoreReporter).RestoreStats()
		t.Logf("%s: restore → replies %s; stages %v; pages %v", id, time.Since(t0).Round(time.Millisecond), st.Stages, st.Pages)
		return sb, st
	}

	sb, st := restore("pf", ws)
	var padded int64
	for _, r := range padRuns(w.Runs, prefetchPad, w.MemSize) {
		padded += int64(r.Len)
	}
	if st.Pages["PrefetchFallback"] != 0 || st.Pages["BytesRead"] != padded || st.Pages["RecPages"] != w.Pages() {
		t.Errorf("prefetch: pages %v, want no fallback and %d bytes read (the WS's %d widened to %d KiB windows)", st.Pages, padded, w.Bytes(), prefetchPad>>10)
	}
	if r := sb.(*Sandbox).restore.reap.fallback; r != "" {
		t.Errorf("prefetch fell back: %s", r)
	}

	img, err := os.ReadFile(ws)
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name string
		at   int
	}{{"header", 17}, {"run table", wsfHeaderSize + wsfRunSize*(len(w.Runs)/2) + 5}} {
		bad := append([]byte(nil), img...)
		bad[c.at] ^= 0x01
		p := filepath.Join(t.TempDir(), "ws")
		if err := os.WriteFile(p, bad, 0o600); err != nil {
			t.Fatal(err)
		}
		sb, st := restore("pf-bad-"+strings.ReplaceAll(c.name, " ", ""), p)
		reason := sb.(*Sandbox).restore.reap.fallback
		if st.Pages["PrefetchFallback"] != 1 || !strings.Contains(reason, "checksum") {
			t.Errorf("WS with a flipped %s byte: PrefetchFallback %d, reason %q; want a lazy fallback naming the checksum", c.name, st.Pages["PrefetchFallback"], reason)
		}
		if _, ok := st.Pages["BytesRead"]; ok {
			t.Errorf("WS with a flipped %s byte: something was prefetched: %v", c.name, st.Pages)
		}
	}
	if fileSum(t, mem) != memSum {
		t.Error("the snapshot's memory file changed")
	}
}
