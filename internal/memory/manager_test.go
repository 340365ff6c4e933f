package memory

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
	"vhive.dev/vhive/internal/uffd"
)

const testPages = 4096 // 16 MiB memory file

// isHolePage: pages left as holes in the sparse test memory file.
func isHolePage(p uint64) bool { return p%16 == 5 || p%16 == 6 || p == testPages-1 }

// writeMemFile writes a memory file of pages pages: every data page holds
// bytes derived from its number; with holes, the pages isHolePage picks are
// never written (the file is sparse).
func writeMemFile(t testing.TB, dir string, pages uint64, holes bool) string {
	t.Helper()
	ps := uint64(os.Getpagesize())
	path := filepath.Join(dir, "mem")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(pages * ps)); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, ps)
	for p := range pages {
		if holes && isHolePage(p) {
			continue
		}
		x := p*0x9E3779B97F4A7C15 + 1
		for i := 0; i < len(buf); i += 8 {
			x ^= x << 13
			x ^= x >> 7
			x ^= x << 17
			binary.LittleEndian.PutUint64(buf[i:], x)
		}
		if _, err := f.WriteAt(buf, int64(p*ps)); err != nil {
			t.Fatal(err)
		}
	}
	return path
}

// Access patterns, as ops on page ranges.
func seqOps(first, n uint64) []op { return []op{{Kind: "read", Page: first, N: n}} }

func randomOps(seed uint64, n int) []op {
	r := rand.New(rand.NewPCG(seed, 1))
	var ops []op
	for range n {
		ops = append(ops, op{Kind: "read", Page: r.Uint64N(testPages), N: 1})
	}
	return ops
}

// clusteredOps: runs of 1–32 pages at random places, touched in random
// order of runs — the shape of a function's working set.
func clusteredOps(seed uint64, runs int) []op {
	r := rand.New(rand.NewPCG(seed, 2))
	var ops []op
	for range runs {
		n := 1 + r.Uint64N(32)
		ops = append(ops, op{Kind: "read", Page: r.Uint64N(testPages - n), N: n})
	}
	return ops
}

func writeOps() []op {
	return []op{
		{Kind: "read", Page: 100, N: 20},
		{Kind: "write", Page: 105, N: 5}, // writes after reads
		{Kind: "writefirst", Page: 200, N: 10},
		{Kind: "write", Page: 300, N: 3}, // write faults on missing pages
		{Kind: "read", Page: 100, N: 220},
	}
}

func removeOps() []op {
	return []op{
		{Kind: "read", Page: 0, N: 64},
		{Kind: "dontneed", Page: 8, N: 16},
		{Kind: "read", Page: 0, N: 64}, // 8..23 must read zero
		{Kind: "write", Page: 10, N: 3},
		{Kind: "dontneed", Page: 10, N: 1},
		{Kind: "read", Page: 0, N: 64},
		{Kind: "dontneed", Page: 1000, N: 4}, // never touched: zero too
		{Kind: "read", Page: 998, N: 8},
	}
}

// distinctPages counts the distinct pages the ops read or write.
func distinctPages(ops []op) int {
	seen := map[uint64]bool{}
	for _, o := range ops {
		if o.Kind == "dontneed" || o.Kind == "notify" || o.Kind == "waitstdin" {
			continue
		}
		for p := o.Page; p < o.Page+max(o.N, 1); p++ {
			seen[p] = true
		}
	}
	return len(seen)
}

// testLogger logs through the test, shown only on failure or with -v.
func testLogger(t testing.TB) *slog.Logger {
	return slog.New(slog.NewTextHandler(t.Output(), &slog.HandlerOptions{Level: slog.LevelDebug}))
}

type env struct {
	dir, memFile string
	mgr          *Manager
}

func newEnv(t *testing.T) *env {
	t.Helper()
	testutil.RequiresRoot(t) // userfaultfd for kernel-mode faults needs CAP_SYS_PTRACE
	e := &env{dir: t.TempDir()}
	e.memFile = writeMemFile(t, e.dir, testPages, true)
	var err error
	if e.mgr, err = NewManager(Config{Logger: testLogger(t)}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { e.mgr.Close() })
	return e
}

func (e *env) cfg(id string, mode Mode) RestoreConfig {
	return RestoreConfig{
		ID: id, Mode: mode, MemoryFile: e.memFile,
		SocketPath: filepath.Join(e.dir, id+".sock"),
		WorkingSet: filepath.Join(e.dir, "ws"),
	}
}

// run serves one restore for a child running ops and returns what both
// sides saw.
func (e *env) run(t *testing.T, cfg RestoreConfig, ops []op) (childResult, Stats) {
	t.Helper()
	return e.runChild(t, cfg, childConfig{Ops: ops})
}

func (e *env) runChild(t *testing.T, cfg RestoreConfig, cc childConfig) (childResult, Stats) {
	t.Helper()
	r, err := e.mgr.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	cc.Socket, cc.MemFile, cc.Size = cfg.SocketPath, e.memFile, testPages*uint64(os.Getpagesize())
	c := startChild(t, cc)
	res := c.result(t)
	select {
	case <-r.Done():
	case <-time.After(time.Minute):
		t.Fatal("restore still serving a minute after its peer exited")
	}
	if err := r.Err(); err != nil {
		t.Fatalf("restore: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("close: %v", err)
	}
	st := r.Stats()
	if res.Mismatches != 0 {
		t.Fatalf("%d of %d pages read wrong bytes; first: %s", res.Mismatches, res.Touched, res.First)
	}
	if res.Touched == 0 {
		t.Fatal("child touched nothing")
	}
	return res, st
}

func TestLazyPatterns(t *testing.T) {
	e := newEnv(t)
	for _, tc := range []struct {
		name string
		ops  []op
	}{
		{"sequential", seqOps(0, 600)},
		{"random", randomOps(1, 500)},
		{"clustered", clusteredOps(2, 60)},
		{"writes", writeOps()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, st := e.run(t, e.cfg("lazy-"+tc.name, ModeLazy), tc.ops)
			want := int64(distinctPages(tc.ops))
			if st.Unique != want || st.Faults != want {
				t.Errorf("Unique=%d Faults=%d (DupFaults=%d), want %d each (one fault per distinct page)", st.Unique, st.Faults, st.DupFaults, want)
			}
			if st.ZeroPages == 0 {
				t.Errorf("no zero pages served, though the pattern touches holes")
			}
			if len(st.FaultLatency) != int(st.Faults) || st.Percentile(50) <= 0 {
				t.Errorf("%d latency samples for %d faults, p50 %v", len(st.FaultLatency), st.Faults, st.Percentile(50))
			}
		})
	}
}

func TestLazyRemoveReadsZero(t *testing.T) {
	e := newEnv(t)
	_, st := e.run(t, e.cfg("remove", ModeLazy), removeOps())
	if st.Removes < 3 {
		t.Errorf("Removes=%d, want >= 3 (one per madvise)", st.Removes)
	}
	// 16 + 1 removed pages fault again and get zero pages, plus the 4
	// never-touched removed pages and the file's holes.
	if st.ZeroPages < 21 {
		t.Errorf("ZeroPages=%d, want >= 21", st.ZeroPages)
	}
}

func TestLazyChunks(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg("chunks", ModeLazy)
	cfg.ChunkPages = 16
	_, st := e.run(t, cfg, append(seqOps(0, 1024), removeOps()...))
	// 1024 sequential pages in aligned 16-page chunks: 64 faults, plus the
	// removed pages' re-faults.
	if st.Faults > 64+40 {
		t.Errorf("Faults=%d with 16-page chunks over 1024 sequential pages, want about 64", st.Faults)
	}
	if st.Unique < 1024 {
		t.Errorf("Unique=%d, want >= 1024 pages installed", st.Unique)
	}
}

func TestRecordThenPrefetch(t *testing.T) {
	e := newEnv(t)
	ops := clusteredOps(3, 80)
	ops = append(ops, writeOps()...)
	touched := int64(distinctPages(ops))

	rec := e.cfg("record", ModeRecord)
	rec.Trace = filepath.Join(e.dir, "trace.csv")
	_, rst := e.run(t, rec, ops) // Close writes the working set
	if rst.RecPages != touched || rst.RecRegions == 0 {
		t.Fatalf("record: RecPages=%d RecRegions=%d, want %d pages", rst.RecPages, rst.RecRegions, touched)
	}
	trace, err := os.ReadFile(rec.Trace)
	if err != nil {
		t.Fatal(err)
	}
	if lines := strings.Count(string(trace), "\n"); lines != int(touched)+1 {
		t.Errorf("trace has %d lines, want header + %d", lines, touched)
	}
	b, err := os.ReadFile(rec.WorkingSet)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := ParseWorkingSet(b)
	if err != nil {
		t.Fatal(err)
	}
	if ws.Pages() != touched || int64(len(ws.Runs)) != rst.RecRegions {
		t.Fatalf("WS holds %d pages in %d runs, want %d in %d", ws.Pages(), len(ws.Runs), touched, rst.RecRegions)
	}

	early := e.cfg("prefetch-early", ModePrefetch)
	early.EarlyResume = true
	if _, est := e.run(t, early, ops); est.PrefetchFallback || est.Unique != 0 || est.RecPages != touched {
		t.Errorf("early resume: fallback %v, Unique %d, RecPages %d (want %d)", est.PrefetchFallback, est.Unique, est.RecPages, touched)
	}
	pst := func() Stats { _, s := e.run(t, e.cfg("prefetch", ModePrefetch), ops); return s }()
	if pst.PrefetchFallback {
		t.Fatal("prefetch fell back to lazy")
	}
	fromWS := touched - pst.Unique
	if float64(fromWS) < 0.97*float64(touched) {
		t.Errorf("prefetch served %d of %d touched pages from the WS (Unique=%d), want >= 97%%", fromWS, touched, pst.Unique)
	}
	if pst.RecPages != touched || pst.FetchState <= 0 || pst.InstallWS <= 0 {
		t.Errorf("prefetch stats %+v", pst)
	}
}

func TestPrefetchBadWorkingSetFallsBack(t *testing.T) {
	e := newEnv(t)
	ops := clusteredOps(4, 30)
	e.run(t, e.cfg("record", ModeRecord), ops)
	good, err := os.ReadFile(e.cfg("", ModeRecord).WorkingSet)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := ParseWorkingSet(good)
	if err != nil {
		t.Fatal(err)
	}
	dataOff := len(good) - int(alignUp(uint64(len(ws.Data)), wsAlign))
	for _, tc := range []struct {
		name   string
		mangle func([]byte) []byte
	}{
		{"flipped data byte", func(b []byte) []byte { b[dataOff+100] ^= 0xFF; return b }},
		{"flipped run table", func(b []byte) []byte { b[wsHeaderSize] ^= 0x10; return b }},
		{"truncated", func(b []byte) []byte { return b[:len(b)/2] }},
		{"empty", func(b []byte) []byte { return nil }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := e.cfg("bad", ModePrefetch)
			cfg.WorkingSet = filepath.Join(e.dir, "bad-ws")
			if err := os.WriteFile(cfg.WorkingSet, tc.mangle(slices.Clone(good)), 0o600); err != nil {
				t.Fatal(err)
			}
			_, st := e.run(t, cfg, ops)
			if !st.PrefetchFallback || st.RecPages != 0 {
				t.Errorf("PrefetchFallback=%v RecPages=%d, want a lazy fallback", st.PrefetchFallback, st.RecPages)
			}
			if want := int64(distinctPages(ops)); st.Unique != want {
				t.Errorf("Unique=%d, want %d (all served lazily)", st.Unique, want)
			}
		})
	}
}

// TestPrefetchDetectsLaterCorruption: a WS file that served a restore
// correctly and is then damaged (one data byte flipped in a late chunk) is
// caught by that chunk's checksum on the next restore before the chunk is
// installed: the chunks before it are installed (they were verified), the
// rest is served lazily, and every byte the peer reads is the memory file's.
// A damaged header or table is caught before anything is installed.
func TestPrefetchDetectsLaterCorruption(t *testing.T) {
	e := newEnv(t)
	ops := seqOps(0, 3000) // ≈ 11.7 MiB of data (the holes count): 12 chunks
	e.run(t, e.cfg("record", ModeRecord), ops)
	_, st := e.run(t, e.cfg("first", ModePrefetch), ops)
	if st.PrefetchFallback || st.Unique != 0 || st.RecPages != 3000 {
		t.Fatalf("first restore: fallback %v, Unique %d, RecPages %d; want 0 lazy pages and 3000 from the WS", st.PrefetchFallback, st.Unique, st.RecPages)
	}
	wsPath := e.cfg("", ModePrefetch).WorkingSet
	good, err := os.ReadFile(wsPath)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := ParseWorkingSet(good)
	if err != nil || ws.Version != wsVersion {
		t.Fatalf("recorded WS: version %d, %v; want version %d", ws.Version, err, wsVersion)
	}
	dataOff := len(good) - int(alignUp(uint64(len(ws.Data)), wsAlign))
	const flipChunk = 9
	for _, tc := range []struct {
		name      string
		at        int
		installed int64 // pages installed before the damage is found
		early     bool
	}{
		{"data byte in chunk 9", dataOff + flipChunk*wsChunk + 12345, flipChunk * wsChunk / 4096, false},
		{"run table", wsHeaderSize + 3, 0, false},
		// The guest already runs while the WS is read: its faults on pages
		// of the damaged chunk and after it are served lazily.
		{"data byte in chunk 9, early resume", dataOff + flipChunk*wsChunk + 12345, flipChunk * wsChunk / 4096, true},
		{"run table, early resume", wsHeaderSize + 3, 0, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := slices.Clone(good)
			b[tc.at] ^= 0x40
			// Rewrite in place, as a disk error or a stray write would.
			if err := os.WriteFile(wsPath, b, 0o600); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { os.WriteFile(wsPath, good, 0o600) })
			cfg := e.cfg("flipped", ModePrefetch)
			cfg.EarlyResume = tc.early
			_, st := e.run(t, cfg, ops) // fails on any wrong byte
			if !st.PrefetchFallback {
				t.Fatal("flipped byte not detected")
			}
			if st.RecPages != tc.installed || st.Unique != 3000-tc.installed {
				t.Errorf("RecPages=%d Unique=%d, want %d installed from verified chunks and the rest lazily", st.RecPages, st.Unique, tc.installed)
			}
		})
	}
}

// TestPrefetchVersion1: a version 1 WS file (one checksum for the whole
// file, written by earlier vhive) still prefetches; damaged, it is refused
// as a whole.
func TestPrefetchVersion1(t *testing.T) {
	e := newEnv(t)
	ops := clusteredOps(7, 40)
	e.run(t, e.cfg("record", ModeRecord), ops)
	cfg := e.cfg("v1", ModePrefetch)
	b, err := os.ReadFile(cfg.WorkingSet)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := ParseWorkingSet(b)
	if err != nil {
		t.Fatal(err)
	}
	v1 := encodeWorkingSetV1(ws.PageSize, ws.MemSize, ws.Runs, ws.Data)
	if err := os.WriteFile(cfg.WorkingSet, v1, 0o600); err != nil {
		t.Fatal(err)
	}
	_, st := e.run(t, cfg, ops)
	if st.PrefetchFallback || st.Unique != 0 || st.RecPages != ws.Pages() {
		t.Errorf("version 1: fallback %v, Unique %d, RecPages %d (want %d)", st.PrefetchFallback, st.Unique, st.RecPages, ws.Pages())
	}
	v1[len(v1)-4096-1] ^= 1
	if err := os.WriteFile(cfg.WorkingSet, v1, 0o600); err != nil {
		t.Fatal(err)
	}
	_, st = e.run(t, e.cfg("v1bad", ModePrefetch), ops)
	if !st.PrefetchFallback || st.RecPages != 0 {
		t.Errorf("damaged version 1: fallback %v, RecPages %d; want nothing installed", st.PrefetchFallback, st.RecPages)
	}
}

func countFDs(t testing.TB) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// settle waits up to 5 s for goroutines to drop to n (the runtime and the
// test's helpers end asynchronously).
func settle(n int) int {
	for range 100 {
		if g := runtime.NumGoroutine(); g <= n {
			return g
		}
		time.Sleep(50 * time.Millisecond)
	}
	return runtime.NumGoroutine()
}

func TestPeerDiesMidRun(t *testing.T) {
	e := newEnv(t)
	fds, gs := countFDs(t), runtime.NumGoroutine()
	cfg := e.cfg("dies", ModeRecord)
	r, err := e.mgr.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := startChild(t, childConfig{Socket: cfg.SocketPath, MemFile: e.memFile, Size: testPages * 4096,
		Ops: append(seqOps(0, 200), op{Kind: "exit"})})
	if st := c.wait(t); st.ExitCode() != 3 {
		t.Fatalf("child: %v; stderr: %s", st, c.stderr.String())
	}
	select {
	case <-r.Done():
	case <-time.After(time.Minute):
		t.Fatal("restore still serving a minute after its peer died")
	}
	if err := r.Err(); err != nil {
		t.Errorf("Err after the peer died: %v", err)
	}
	if err := r.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	if st := r.Stats(); st.RecPages != 200 {
		t.Errorf("RecPages=%d after the peer died, want 200 (recorded so far)", st.RecPages)
	}
	if n := countFDs(t); n > fds {
		t.Errorf("%d fds open after the restore, %d before", n, fds)
	}
	if g := settle(gs); g > gs {
		t.Errorf("%d goroutines after the restore, %d before", g, gs)
	}
}

// TestRestoreCloseKillsFaultingPeer: Close while the peer is in the middle
// of faulting pages in; it must be killed, not left blocked on a fault
// nobody serves.
func TestRestoreCloseKillsFaultingPeer(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg("stop-faulting", ModeLazy)
	r, err := e.mgr.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := startChild(t, childConfig{Socket: cfg.SocketPath, MemFile: e.memFile, Size: testPages * 4096,
		Ops: []op{{Kind: "notify"}, {Kind: "read", N: testPages}, {Kind: "read", N: testPages}}})
	if l := c.line(t); l != "NOTIFY" {
		t.Fatalf("child said %q; stderr: %s", l, c.stderr.String())
	}
	for deadline := time.Now().Add(time.Minute); r.Stats().Faults < 100; time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("child made %d faults in a minute", r.Stats().Faults)
		}
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	st := c.wait(t)
	if !killedBySIGKILL(st) {
		t.Fatalf("child ended with %v, want killed by SIGKILL", st)
	}
	if s := r.Stats(); s.Faults >= 2*testPages {
		t.Errorf("Faults=%d: the child was not mid-run", s.Faults)
	}
}

func TestManagerCloseKillsPeer(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg("stop", ModeLazy)
	r, err := e.mgr.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := startChild(t, childConfig{Socket: cfg.SocketPath, MemFile: e.memFile, Size: testPages * 4096,
		Ops: []op{{Kind: "read", N: 50}, {Kind: "notify"}, {Kind: "waitstdin"}, {Kind: "read", Page: 50, N: 50}}})
	if l := c.line(t); l != "NOTIFY" {
		t.Fatalf("child said %q; stderr: %s", l, c.stderr.String())
	}
	pid := r.PeerPID()
	if pid != c.cmd.Process.Pid {
		t.Fatalf("PeerPID=%d, child is %d", pid, c.cmd.Process.Pid)
	}
	if err := e.mgr.Close(); err != nil {
		t.Fatal(err)
	}
	st := c.wait(t)
	if !killedBySIGKILL(st) {
		t.Fatalf("child ended with %v, want killed by SIGKILL", st)
	}
	if _, err := e.mgr.Start(context.Background(), e.cfg("after", ModeLazy)); err == nil {
		t.Error("Start after Close succeeded")
	}
}

// TestHandshakeRejected connects like a sandbox process and sends bad
// handshakes; each must be refused with a reason naming the problem.
func TestHandshakeRejected(t *testing.T) {
	e := newEnv(t)
	u, err := uffd.New(uffd.FeatureEventRemove)
	if err != nil {
		t.Fatal(err)
	}
	defer u.Close()
	const size = testPages * 4096
	for _, tc := range []struct {
		name, payload string
		noFD          bool
		want          string
	}{
		{"malformed JSON", `[{"base_host_virt_addr":`, false, "not a JSON array"},
		{"not an array", `{"size":4096}`, false, "not a JSON array"},
		{"no regions", `[]`, false, "no regions"},
		{"overlap", `[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]`, false, "overlap"},
		{"unaligned base", `[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]`, false, "not aligned"},
		{"unaligned size", `[{"base_host_virt_addr":4096,"size":100,"offset":0,"page_size":4096}]`, false, "multiple of page size"},
		{"beyond file", `[{"base_host_virt_addr":4096,"size":8192,"offset":16773120,"page_size":4096}]`, false, "beyond the memory file"},
		{"no page size", `[{"base_host_virt_addr":4096,"size":4096,"offset":0}]`, false, "no page_size"},
		{"bad page size", `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":3000}]`, false, "power of two"},
		{"no fd", `[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096}]`, true, "exactly 1 fd"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := e.cfg("bad", ModeLazy)
			r, err := e.mgr.Start(context.Background(), cfg)
			if err != nil {
				t.Fatal(err)
			}
			defer r.Close()
			conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: cfg.SocketPath, Net: "unix"})
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			var oob []byte
			if !tc.noFD {
				oob = unix.UnixRights(u.Int())
			}
			if _, _, err := conn.WriteMsgUnix([]byte(tc.payload), oob, nil); err != nil {
				t.Fatal(err)
			}
			// Firecracker keeps the connection open: a bad message must be
			// refused without waiting for the peer to close its side.
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			err = WaitReady(ctx, conn)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("client saw %v, want an error containing %q", err, tc.want)
			}
			if err := r.ReadyErr(); !errors.Is(err, ErrBadHandshake) || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("ReadyErr = %v, want ErrBadHandshake containing %q", err, tc.want)
			}
		})
	}
	_ = size

	// A peer that connects and hangs up without a word.
	cfg := e.cfg("silent", ModeLazy)
	r, err := e.mgr.Start(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	conn, err := net.Dial("unix", cfg.SocketPath)
	if err != nil {
		t.Fatal(err)
	}
	conn.Close()
	if err := r.ReadyErr(); !errors.Is(err, ErrBadHandshake) || !strings.Contains(err.Error(), "sent nothing") {
		t.Errorf("silent peer: ReadyErr = %v", err)
	}
}

func TestStartRejectsBadConfig(t *testing.T) {
	e := newEnv(t)
	notSock := filepath.Join(e.dir, "file")
	os.WriteFile(notSock, []byte("x"), 0o600)
	empty := filepath.Join(e.dir, "empty")
	os.WriteFile(empty, nil, 0o600)
	for _, tc := range []struct {
		name   string
		mangle func(*RestoreConfig)
		want   string
	}{
		{"no id", func(c *RestoreConfig) { c.ID = "" }, "ID is empty"},
		{"bad mode", func(c *RestoreConfig) { c.Mode = "eager" }, `unknown memory mode "eager"`},
		{"record without ws", func(c *RestoreConfig) { c.Mode, c.WorkingSet = ModeRecord, "" }, "needs a working-set"},
		{"prefetch missing ws", func(c *RestoreConfig) { c.Mode = ModePrefetch }, "no such file"},
		{"missing memory file", func(c *RestoreConfig) { c.MemoryFile += ".nope" }, "no such file"},
		{"empty memory file", func(c *RestoreConfig) { c.MemoryFile = empty }, "not a non-empty regular file"},
		{"socket path is a file", func(c *RestoreConfig) { c.SocketPath = notSock }, "not a socket"},
		{"chunk", func(c *RestoreConfig) { c.ChunkPages = -1 }, "chunk pages"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			cfg := e.cfg("cfg", ModeLazy)
			tc.mangle(&cfg)
			_, err := e.mgr.Start(context.Background(), cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Start = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	// A failed Start leaves the ID free.
	r, err := e.mgr.Start(context.Background(), e.cfg("cfg", ModeLazy))
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.mgr.Start(context.Background(), e.cfg("cfg", ModeLazy)); err == nil || !strings.Contains(err.Error(), "is active") {
		t.Errorf("duplicate ID: %v", err)
	}
	r.Close()
	if err := r.ReadyErr(); err == nil || !strings.Contains(err.Error(), "closed before the sandbox connected") {
		t.Errorf("ReadyErr after Close without a peer: %v", err)
	}
}

func TestMetricsRegistered(t *testing.T) {
	testutil.RequiresRoot(t)
	e := &env{dir: t.TempDir()}
	e.memFile = writeMemFile(t, e.dir, testPages, true)
	reg := prometheus.NewRegistry()
	met, err := NewMetrics(reg)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := NewMetrics(reg); err == nil {
		t.Error("registering the collectors twice succeeded")
	}
	if e.mgr, err = NewManager(Config{Logger: testLogger(t), Metrics: met}); err != nil {
		t.Fatal(err)
	}
	defer e.mgr.Close()
	e.run(t, e.cfg("m", ModeLazy), seqOps(0, 100))
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, m := range mf.GetMetric() {
			switch {
			case m.GetCounter() != nil:
				got[mf.GetName()] += m.GetCounter().GetValue()
			case m.GetHistogram() != nil:
				got[mf.GetName()] += float64(m.GetHistogram().GetSampleCount())
			}
		}
	}
	for name, want := range map[string]float64{
		"vhive_memory_faults_total": 100, "vhive_memory_unique_pages_total": 100,
		"vhive_memory_fault_service_seconds": 100, "vhive_memory_restores_total": 1,
	} {
		if got[name] != want {
			t.Errorf("%s = %v, want %v", name, got[name], want)
		}
	}
}

// TestFirecrackerStylePeer: a peer that registers two regions mapped to the
// file out of order, sends only the deprecated page_size_kib and never
// waits for the ack — served lazily, then from a WS recorded by a
// different (vhive-style) peer, which works because the WS is in memory-file
// offsets.
func TestFirecrackerStylePeer(t *testing.T) {
	e := newEnv(t)
	_, st := e.runChild(t, e.cfg("fc-lazy", ModeLazy), childConfig{Firecracker: true, Ops: append(clusteredOps(5, 40), removeOps()...)})
	if st.Faults == 0 || st.Removes == 0 {
		t.Fatalf("Faults=%d Removes=%d", st.Faults, st.Removes)
	}

	filePages := clusteredOps(6, 40)
	e.run(t, e.cfg("record", ModeRecord), filePages)
	// The same file pages, as pages of the swapped mapping.
	var ops []op
	const half = testPages / 2
	for _, o := range filePages {
		for p := o.Page; p < o.Page+o.N; p++ {
			ops = append(ops, op{Kind: "read", Page: (p + half) % testPages, N: 1})
		}
	}
	_, st = e.runChild(t, e.cfg("fc-prefetch", ModePrefetch), childConfig{Firecracker: true, Ops: ops})
	touched := int64(distinctPages(filePages))
	if st.PrefetchFallback || st.RecPages != touched || float64(touched-st.Unique) < 0.97*float64(touched) {
		t.Errorf("prefetch: fallback %v, RecPages %d, Unique %d of %d touched", st.PrefetchFallback, st.RecPages, st.Unique, touched)
	}
}

// TestServeOne runs the standalone page server for one restore until its
// peer exits.
func TestServeOne(t *testing.T) {
	e := newEnv(t)
	cfg := e.cfg("one", ModeRecord)
	type out struct {
		st  Stats
		err error
	}
	ch := make(chan out, 1)
	go func() {
		st, err := ServeOne(context.Background(), cfg, testLogger(t))
		ch <- out{st, err}
	}()
	// ServeOne listens asynchronously: wait for its socket.
	for range 200 {
		if _, err := os.Stat(cfg.SocketPath); err == nil {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	c := startChild(t, childConfig{Socket: cfg.SocketPath, MemFile: e.memFile, Size: testPages * 4096, Ops: seqOps(0, 100)})
	if res := c.result(t); res.Mismatches != 0 {
		t.Fatalf("mismatches: %s", res.First)
	}
	select {
	case o := <-ch:
		if o.err != nil || o.st.Unique != 100 || o.st.RecPages != 100 {
			t.Fatalf("ServeOne = %v, Unique %d, RecPages %d", o.err, o.st.Unique, o.st.RecPages)
		}
	case <-time.After(time.Minute):
		t.Fatal("ServeOne still running a minute after its peer exited")
	}
	if _, err := os.Stat(cfg.WorkingSet); err != nil {
		t.Fatalf("working set not written: %v", err)
	}
}

// TestConcurrentRestoresIsolated: one Manager serves a lazy, a record and a
// prefetch restore at the same time; each one's pages and stats are its own.
func TestConcurrentRestoresIsolated(t *testing.T) {
	e := newEnv(t)
	recorded := clusteredOps(7, 30)
	e.run(t, e.cfg("rec0", ModeRecord), recorded)

	lazyOps, recOps := randomOps(8, 300), clusteredOps(9, 30)
	t.Run("group", func(t *testing.T) {
		t.Run("lazy", func(t *testing.T) {
			t.Parallel()
			_, st := e.run(t, e.cfg("c-lazy", ModeLazy), lazyOps)
			if want := int64(distinctPages(lazyOps)); st.Unique != want {
				t.Errorf("Unique=%d, want %d", st.Unique, want)
			}
		})
		t.Run("record", func(t *testing.T) {
			t.Parallel()
			cfg := e.cfg("c-rec", ModeRecord)
			cfg.WorkingSet = filepath.Join(e.dir, "ws-concurrent")
			_, st := e.run(t, cfg, recOps)
			if want := int64(distinctPages(recOps)); st.RecPages != want {
				t.Errorf("RecPages=%d, want %d", st.RecPages, want)
			}
		})
		t.Run("prefetch", func(t *testing.T) {
			t.Parallel()
			_, st := e.run(t, e.cfg("c-pre", ModePrefetch), recorded)
			if st.PrefetchFallback || st.Unique != 0 || st.RecPages != int64(distinctPages(recorded)) {
				t.Errorf("fallback %v, Unique %d, RecPages %d", st.PrefetchFallback, st.Unique, st.RecPages)
			}
		})
	})
}

// TestSimultaneousPrefetchesShareOneRead: restores of one snapshot started
// together read its WS file once; each gets every byte right, and a later
// restore reads the file again.
func TestSimultaneousPrefetchesShareOneRead(t *testing.T) {
	e := newEnv(t)
	ops := seqOps(100, 2000)
	e.run(t, e.cfg("rec", ModeRecord), ops)
	const n = 4
	var rs []*Restore
	for i := range n {
		cfg := e.cfg(fmt.Sprintf("shared%d", i), ModePrefetch)
		cfg.EarlyResume = i%2 == 1
		r, err := e.mgr.Start(context.Background(), cfg)
		if err != nil {
			t.Fatal(err)
		}
		defer r.Close()
		rs = append(rs, r)
	}
	var cs []*child
	for _, r := range rs {
		cs = append(cs, startChild(t, childConfig{Socket: r.cfg.SocketPath, MemFile: e.memFile, Size: testPages * 4096, Ops: ops}))
	}
	shared := 0
	var read int64
	for i, c := range cs {
		res := c.result(t)
		<-rs[i].Done()
		if res.Mismatches != 0 {
			t.Fatalf("restore %d: %d wrong pages; first: %s", i, res.Mismatches, res.First)
		}
		st := rs[i].Stats()
		if st.PrefetchFallback || st.Unique != 0 || st.RecPages != 2000 {
			t.Errorf("restore %d: fallback %v, Unique %d, RecPages %d", i, st.PrefetchFallback, st.Unique, st.RecPages)
		}
		if st.SharedFetch {
			shared++
		}
		read += st.BytesRead
	}
	fi, err := os.Stat(e.cfg("", ModePrefetch).WorkingSet)
	if err != nil {
		t.Fatal(err)
	}
	if shared != n-1 || read != fi.Size() {
		t.Errorf("%d of %d restores shared a read, %d bytes read in all; want %d and one file of %d bytes", shared, n, read, n-1, fi.Size())
	}
	if _, st := e.run(t, e.cfg("later", ModePrefetch), ops); st.SharedFetch || st.BytesRead != fi.Size() {
		t.Errorf("a later restore: shared %v, read %d bytes; want its own read", st.SharedFetch, st.BytesRead)
	}
}

// TestHammerFaultsAndRemoves: concurrent faults from 4 threads while a 5th
// drops random ranges (UFFD_EVENT_REMOVE, EAGAIN on copies), pure lazy and
// with chunks. No wrong byte, no hang.
func TestHammerFaultsAndRemoves(t *testing.T) {
	e := newEnv(t)
	for _, chunk := range []int{1, 16} {
		t.Run(fmt.Sprintf("chunk=%d", chunk), func(t *testing.T) {
			cfg := e.cfg(fmt.Sprintf("hammer%d", chunk), ModeLazy)
			cfg.ChunkPages = chunk
			_, st := e.run(t, cfg, []op{{Kind: "hammer", N: 20000}})
			if st.Removes == 0 || st.Faults == 0 {
				t.Errorf("Removes=%d Faults=%d: the hammer did not hammer", st.Removes, st.Faults)
			}
			t.Logf("faults %d, removes %d, zero pages %d", st.Faults, st.Removes, st.ZeroPages)
		})
	}
}

func TestAttachRejectsBadMapping(t *testing.T) {
	ctx := context.Background()
	mem, err := unix.Mmap(-1, 0, 3*4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(mem)
	for _, tc := range []struct {
		name string
		mem  []byte
		off  uint64
		want string
	}{
		{"empty", nil, 0, "empty mapping"},
		{"unaligned start", mem[1:4097], 0, "not aligned"},
		{"unaligned length", mem[:100], 0, "not aligned"},
		{"unaligned offset", mem[:4096], 10, "not aligned"},
	} {
		if _, err := Attach(ctx, "/nonexistent.sock", tc.mem, tc.off); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: Attach = %v, want an error containing %q", tc.name, err, tc.want)
		}
	}
	// No manager listening: a clear dial error, and nothing leaked.
	testutil.RequiresRoot(t)
	fds := countFDs(t)
	if _, err := Attach(ctx, filepath.Join(t.TempDir(), "none.sock"), mem, 0); err == nil || !strings.Contains(err.Error(), "dial memory manager") {
		t.Errorf("Attach without a manager = %v", err)
	}
	if n := countFDs(t); n != fds {
		t.Errorf("%d fds after a failed Attach, %d before", n, fds)
	}
}

// TestPeerWithoutRemoveEvents: a peer whose userfaultfd lacks
// UFFD_FEATURE_EVENT_REMOVE drops pages the manager believes present; their
// next fault must get a zero page, not loop forever.
func TestPeerWithoutRemoveEvents(t *testing.T) {
	e := newEnv(t)
	ops := []op{
		{Kind: "read", Page: 0, N: 64},
		{Kind: "dontneed", Page: 8, N: 16},
		{Kind: "read", Page: 0, N: 64},
		{Kind: "write", Page: 10, N: 3},
		{Kind: "dontneed", Page: 10, N: 1},
		{Kind: "read", Page: 0, N: 64},
	}
	_, st := e.runChild(t, e.cfg("noremove", ModeLazy), childConfig{Firecracker: true, NoRemoveEvents: true, Ops: ops})
	if st.Removes != 0 {
		t.Errorf("Removes=%d from a peer without remove events", st.Removes)
	}
	if st.ZeroPages < 17 {
		t.Errorf("ZeroPages=%d, want >= 17 (the dropped pages)", st.ZeroPages)
	}
}

// TestManagerProcessDies: the page server's process is killed while the
// sandbox process runs; the sandbox learns it from Client.ManagerGone
// instead of finding out by hanging on its next fault.
func TestManagerProcessDies(t *testing.T) {
	testutil.RequiresRoot(t)
	dir := t.TempDir()
	memFile := writeMemFile(t, dir, testPages, true)
	rc := RestoreConfig{ID: "crash", Mode: ModeLazy, MemoryFile: memFile, SocketPath: filepath.Join(dir, "crash.sock")}
	b, err := json.Marshal(rc)
	if err != nil {
		t.Fatal(err)
	}
	srv := exec.Command(os.Args[0], "-test.run=^$")
	srv.Env = append(os.Environ(), serverEnv+"="+string(b))
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		srv.Process.Kill() // only the process this test started
		srv.Wait()
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(rc.SocketPath); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("page server did not listen within a minute")
		}
	}
	c := startChild(t, childConfig{Socket: rc.SocketPath, MemFile: memFile, Size: testPages * 4096,
		Ops: []op{{Kind: "read", N: 50}, {Kind: "notify"}, {Kind: "waitgone"}}})
	if l := c.line(t); l != "NOTIFY" {
		t.Fatalf("child said %q; stderr: %s", l, c.stderr.String())
	}
	srv.Process.Kill()
	srv.Wait()
	if l := c.line(t); l != "GONE" {
		t.Fatalf("child said %q after the page server died, want GONE", l)
	}
	if r := c.result(t); r.Mismatches != 0 || r.Touched != 50 {
		t.Fatalf("child: %+v", r)
	}
}

// TestConcurrentFaultsOnOnePageCountedOnce: two threads of the peer fault
// on the same page at once, so the kernel queues two events for the page.
// The page server process is stopped (SIGSTOP) until both threads are
// blocked in the fault, so that it reads both events every round; then the
// page must be counted once as a fault, the second event as a DupFaults,
// and recorded once into the working set and the trace. (Counting every
// event as a fault gave TestLazyPatterns one fault too many under -race:
// a thread whose fault wait a preemption signal ended faults again.)
func TestConcurrentFaultsOnOnePageCountedOnce(t *testing.T) {
	testutil.RequiresRoot(t)
	dir := t.TempDir()
	memFile := writeMemFile(t, dir, testPages, true)
	rc := RestoreConfig{ID: "together", Mode: ModeRecord, MemoryFile: memFile,
		SocketPath: filepath.Join(dir, "together.sock"), WorkingSet: filepath.Join(dir, "ws"),
		Trace: filepath.Join(dir, "trace.csv")}
	b, err := json.Marshal(rc)
	if err != nil {
		t.Fatal(err)
	}
	srv := exec.Command(os.Args[0], "-test.run=^$")
	srv.Env = append(os.Environ(), serverEnv+"="+string(b))
	var srvErr strings.Builder
	srv.Stderr = &srvErr
	srvOut, err := srv.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if srv.ProcessState == nil {
			srv.Process.Kill() // only the process this test started
			srv.Wait()
		}
	})
	for deadline := time.Now().Add(time.Minute); ; time.Sleep(5 * time.Millisecond) {
		if _, err := os.Stat(rc.SocketPath); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("page server did not listen within a minute")
		}
	}
	const first, rounds = 1000, 8 // data pages, no holes among them
	// After the rounds, one fault of one thread on the next page: the
	// server handles events in order, so once it is served the last
	// round's second event has been handled too (the child exiting
	// earlier would leave that event to a server that finds the peer gone).
	const pages = rounds + 1
	c := startChild(t, childConfig{Socket: rc.SocketPath, MemFile: memFile, Size: testPages * 4096,
		Ops: []op{{Kind: "together", Page: first, N: rounds}, {Kind: "read", Page: first + rounds, N: 1}}})
	var tids [2]int
	if l := c.line(t); !scanTIDs(l, &tids) {
		t.Fatalf("child said %q, want its thread ids; stderr: %s", l, c.stderr.String())
	}
	pid := c.cmd.Process.Pid
	for i := range rounds {
		// Stopped, the page server reads no event: both threads' events
		// for the page are queued before it reads either.
		if err := srv.Process.Signal(unix.SIGSTOP); err != nil {
			t.Fatal(err)
		}
		waitStopped(t, srv.Process.Pid)
		for _, tid := range tids { // the two threads fault, one after the other
			if _, err := fmt.Fprintln(c.stdin, "go"); err != nil {
				t.Fatal(err)
			}
			waitInUserfault(t, pid, tid, c)
		}
		if err := srv.Process.Signal(unix.SIGCONT); err != nil {
			t.Fatal(err)
		}
		if l := c.line(t); l != "DONE" {
			t.Fatalf("round %d: child said %q; stderr: %s", i, l, c.stderr.String())
		}
	}
	if r := c.result(t); r.Mismatches != 0 || r.Touched != pages {
		t.Fatalf("child: %+v", r)
	}
	var st Stats
	if err := json.NewDecoder(srvOut).Decode(&st); err != nil {
		t.Fatalf("page server stats: %v; stderr: %s", err, srvErr.String())
	}
	if err := srv.Wait(); err != nil {
		t.Fatalf("page server: %v; stderr: %s", err, srvErr.String())
	}
	t.Logf("stats: %v", st)
	if st.Faults != pages || st.Unique != pages || st.DupFaults != rounds {
		t.Errorf("Faults=%d Unique=%d DupFaults=%d, want %d, %d, %d: one fault per page, the second thread's event on each page a duplicate",
			st.Faults, st.Unique, st.DupFaults, pages, pages, rounds)
	}
	if len(st.FaultLatency) != int(st.Faults) {
		t.Errorf("%d latency samples for %d faults", len(st.FaultLatency), st.Faults)
	}
	if st.RecPages != pages || st.RecRegions != 1 {
		t.Errorf("RecPages=%d RecRegions=%d, want %d pages in one run", st.RecPages, st.RecRegions, pages)
	}
	trace, err := os.ReadFile(rc.Trace)
	if err != nil {
		t.Fatal(err)
	}
	want := "seq,offset,length\n"
	for i := range uint64(pages) {
		want += fmt.Sprintf("%d,%d,4096\n", i, (first+i)*4096)
	}
	if string(trace) != want {
		t.Errorf("trace:\n%s\nwant each page once:\n%s", trace, want)
	}
	raw, err := os.ReadFile(rc.WorkingSet)
	if err != nil {
		t.Fatal(err)
	}
	ws, err := ParseWorkingSet(raw)
	if err != nil {
		t.Fatal(err)
	}
	if ws.Pages() != pages || len(ws.Runs) != 1 || ws.Runs[0] != (Run{Offset: first * 4096, Length: pages * 4096}) {
		t.Errorf("working set: %d pages in runs %+v, want the %d pages from %d in one run", ws.Pages(), ws.Runs, pages, first)
	}
}

func scanTIDs(l string, tids *[2]int) bool {
	_, err := fmt.Sscanf(l, "TIDS %d %d", &tids[0], &tids[1])
	return err == nil
}

// waitStopped waits until process pid, a child of the test, is stopped
// (all its threads), failing the test if it exits instead.
func waitStopped(t *testing.T, pid int) {
	t.Helper()
	const cldStopped = 5 // CLD_STOPPED, <asm-generic/siginfo.h>
	for {
		// WNOWAIT: the report is left in place; SIGCONT ends the stop,
		// and an exit stays for exec.Cmd.Wait.
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WSTOPPED|unix.WEXITED|unix.WNOWAIT, nil)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			t.Fatalf("wait for process %d to stop: %v", pid, err)
		}
		if info.Code != cldStopped {
			t.Fatalf("process %d did not stop but exited (si_code %d)", pid, info.Code)
		}
		return
	}
}

// waitInUserfault waits until thread tid of process pid sleeps in a
// userfaultfd fault (its wchan), failing the test if it does not within a
// minute (hung, or not faulting).
func waitInUserfault(t *testing.T, pid, tid int, c *child) {
	t.Helper()
	path := fmt.Sprintf("/proc/%d/task/%d/wchan", pid, tid)
	var last string
	for deadline := time.Now().Add(time.Minute); time.Now().Before(deadline); time.Sleep(time.Millisecond) {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatalf("thread %d of the child: %v", tid, err)
		}
		if last = string(b); last == "handle_userfault" {
			return
		}
	}
	var all []string
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	for _, e := range ents {
		w, _ := os.ReadFile(fmt.Sprintf("/proc/%d/task/%s/wchan", pid, e.Name()))
		all = append(all, e.Name()+":"+string(w))
	}
	t.Fatalf("thread %d of the child not blocked in a userfault within a minute (wchan %q); the child's threads: %v; stderr: %s", tid, last, all, c.stderr.String())
}
