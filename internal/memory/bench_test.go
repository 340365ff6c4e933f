package memory

import (
	"context"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/iobuf"
	"vhive.dev/vhive/internal/testutil"
	"vhive.dev/vhive/internal/uffd"
)

const (
	benchPages = 65536 // 256 MiB of 4 KiB pages
	benchWS    = benchPages / 10
)

// benchWorkingSet picks ~10% of the pages as clustered runs of 1–64 pages,
// disjoint and not adjacent, returned as read ops in a shuffled order.
func benchWorkingSet() []op {
	r := rand.New(rand.NewPCG(42, 42))
	used := make([]bool, benchPages)
	var ops []op
	total := uint64(0)
	for total < benchWS {
		n := min(1+r.Uint64N(64), benchWS-total)
		p := r.Uint64N(benchPages - n - 1)
		free := p > 0 && !used[p-1] && !used[p+n]
		for i := p; free && i < p+n; i++ {
			free = !used[i]
		}
		if !free {
			continue
		}
		for i := p; i < p+n; i++ {
			used[i] = true
		}
		ops = append(ops, op{Kind: "read", Page: p, N: n})
		total += n
	}
	return ops
}

// benchChild starts a bench-mode child that waits for "go".
func benchChild(b *testing.B, sock, memFile string, ops []op) *child {
	c := startChild(b, childConfig{Socket: sock, MemFile: memFile, Size: benchPages * 4096, Ops: ops, Bench: true, WaitGo: true})
	if l := c.line(b); l != "READY" {
		b.Fatalf("child said %q; stderr: %s", l, c.stderr.String())
	}
	return c
}

func goAndWait(b *testing.B, c *child) childResult {
	if _, err := c.stdin.Write([]byte("go\n")); err != nil {
		b.Fatal(err)
	}
	return c.result(b)
}

// dropCache evicts path from the page cache (only that file), as vHive's
// method drops the page cache before each cold start.
func dropCache(b *testing.B, path string) {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkREAP restores the same 10% working set of a 256 MiB memory file
// three ways per iteration, interleaved so that noise from other load hits
// all three alike:
//
//	lazy:  every page faulted and served on demand (1 page per fault)
//	reap:  prefetch mode: WS file read (O_DIRECT, 4 × 1 MiB in flight),
//	       each 1 MiB chunk verified and installed as it arrives
//	floor: a minimal serial loop: one pread of the WS file + one UFFDIO_COPY
//	       per run (read + install, no checksum)
//	reap-early: the same with RestoreConfig.EarlyResume (the child touches
//	       pages while the WS streams in)
//	read:  one O_DIRECT pread of the WS file alone (what FetchState — read
//	       and verify — is compared with: fetch/read)
//
// Each time runs from "go" to the child having touched every WS page (one
// byte per page), the handshake included. cache=dropped evicts the memory
// and WS files from the page cache before each restore (vHive's method);
// cache=warm leaves them cached.
func BenchmarkREAP(b *testing.B) {
	testutil.RequiresRoot(b)
	dir := b.TempDir()
	memFile := writeMemFile(b, dir, benchPages, false)
	ops := benchWorkingSet()
	for _, drop := range []bool{true, false} {
		name := "cache=dropped"
		if !drop {
			name = "cache=warm"
		}
		b.Run(name, func(b *testing.B) { benchREAP(b, dir, memFile, ops, drop) })
	}
}

// benchFetchGeometry applies VHIVE_BENCH_FETCH=<block KiB>x<reads in
// flight>, for read geometry experiments.
func benchFetchGeometry(b *testing.B, m *Manager) {
	v := os.Getenv("VHIVE_BENCH_FETCH")
	if v == "" {
		return
	}
	var kib, n int
	if _, err := fmt.Sscanf(v, "%dx%d", &kib, &n); err != nil || kib < 4 || kib%4 != 0 || n < 1 {
		b.Fatalf("VHIVE_BENCH_FETCH=%q: want <block KiB, multiple of 4>x<reads>", v)
	}
	m.fetchBlock, m.fetchReaders = uint64(kib)<<10, n
}

func benchREAP(b *testing.B, dir, memFile string, ops []op, drop bool) {
	m, err := NewManager(Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	benchFetchGeometry(b, m)
	wsPath := filepath.Join(dir, "ws")
	// The floor reads into the same kind of buffer as the manager's pool.
	floorBuf, err := iobuf.Alloc(32 << 20)
	if err != nil {
		b.Fatal(err)
	}
	defer iobuf.Free(floorBuf)
	cfg := func(id string, mode Mode) RestoreConfig {
		return RestoreConfig{ID: id, Mode: mode, MemoryFile: memFile, SocketPath: filepath.Join(dir, id+".sock"), WorkingSet: filepath.Join(dir, "ws")}
	}
	restore := func(rc RestoreConfig) (childResult, Stats) {
		c := benchChild(b, rc.SocketPath, memFile, ops)
		if drop {
			dropCache(b, memFile)
			if rc.Mode == ModePrefetch {
				dropCache(b, wsPath)
			}
		}
		b.StartTimer()
		r, err := m.Start(context.Background(), rc)
		if err != nil {
			b.Fatal(err)
		}
		res := goAndWait(b, c)
		b.StopTimer()
		<-r.Done()
		if err := r.Close(); err != nil {
			b.Fatal(err)
		}
		return res, r.Stats()
	}

	b.StopTimer()
	if _, st := restore(cfg("record", ModeRecord)); st.RecPages != benchWS {
		b.Fatalf("recorded %d pages, want %d (%+v)", st.RecPages, benchWS, st)
	}
	// One untimed prefetch fills the manager's buffer pool, as any earlier
	// prefetch on a running daemon would (the floor's buffer, too, is
	// allocated before timing).
	restore(cfg("warmup", ModePrefetch))

	// Medians over the iterations: the machine is shared, and a mean is
	// dragged by whichever restore another process happened to stall.
	var earlyT, waits []float64
	var lazyT, reapT, floorT, install, fetch, lazyReap, reapFloor, lazyFloor, rawRead, fetchRead, wait []float64
	var lat []time.Duration
	ms := func(r childResult) float64 { return float64(r.AttachNS+r.TouchNS) / 1e6 }
	for i := 0; i < b.N; i++ {
		res, st := restore(cfg("lazy", ModeLazy))
		lazyT = append(lazyT, ms(res))
		lat = append(lat, st.FaultLatency...)
		if st.Unique != benchWS {
			b.Fatalf("lazy served %d pages, want %d", st.Unique, benchWS)
		}

		res, st = restore(cfg("reap", ModePrefetch))
		reapT = append(reapT, ms(res))
		install = append(install, float64(st.InstallWS)/1e6)
		fetch = append(fetch, float64(st.FetchState)/1e6)
		wait = append(wait, float64(st.InstallWS-st.InstallBusy)/1e6)
		if st.PrefetchFallback || st.Unique != 0 {
			b.Fatalf("prefetch: fallback %v, %d unique faults", st.PrefetchFallback, st.Unique)
		}

		ec := cfg("reap-early", ModePrefetch)
		ec.EarlyResume = true
		res, st = restore(ec)
		earlyT = append(earlyT, ms(res))
		if st.PrefetchFallback || st.Unique != 0 {
			b.Fatalf("prefetch, early resume: fallback %v, %d unique faults", st.PrefetchFallback, st.Unique)
		}
		waits = append(waits, float64(st.WSWaits))

		if drop {
			dropCache(b, wsPath)
		}
		floorT = append(floorT, float64(floorRestore(b, filepath.Join(dir, "floor.sock"), wsPath, memFile, ops, floorBuf, drop))/1e6)
		if drop {
			dropCache(b, wsPath)
		}
		rawRead = append(rawRead, float64(readFloor(b, wsPath, floorBuf, drop))/1e6)
		fetchRead = append(fetchRead, fetch[i]/rawRead[i])
		lazyReap = append(lazyReap, lazyT[i]/reapT[i])
		reapFloor = append(reapFloor, reapT[i]/floorT[i])
		lazyFloor = append(lazyFloor, lazyT[i]/floorT[i])
	}
	wsMB := float64(benchWS*4096) / 1e6
	b.ReportMetric(median(lazyT), "lazy-ms")
	b.ReportMetric(median(reapT), "reap-ms")
	b.ReportMetric(median(floorT), "floor-ms")
	b.ReportMetric(median(reapFloor), "reap/floor")
	b.ReportMetric(median(lazyReap), "lazy/reap")
	b.ReportMetric(median(lazyFloor), "lazy/floor") // the best lazy/reap could be
	b.ReportMetric(median(fetch), "fetch-ms")
	b.ReportMetric(median(rawRead), "read-ms")
	b.ReportMetric(median(fetchRead), "fetch/read")
	b.ReportMetric(median(wait), "install-wait-ms")
	b.ReportMetric(median(install), "install-ms")
	busy := make([]float64, len(install))
	for i := range install {
		busy[i] = install[i] - wait[i]
	}
	b.ReportMetric(median(busy), "install-busy-ms")
	b.ReportMetric(wsMB/median(busy)*1e3, "install-MB/s")
	reapRead := make([]float64, len(reapT))
	for i := range reapT {
		reapRead[i] = reapT[i] / rawRead[i]
	}
	b.ReportMetric(median(reapRead), "reap/read")
	b.ReportMetric(median(earlyT), "reap-early-ms")
	b.ReportMetric(median(waits), "early-ws-waits")
	b.ReportMetric(median(lazyT)*1e3/benchWS, "lazy-µs/page")
	s := Stats{FaultLatency: lat}
	b.ReportMetric(float64(s.Percentile(50))/1e3, "fault-p50-µs")
	b.ReportMetric(float64(s.Percentile(99))/1e3, "fault-p99-µs")
}

func median(x []float64) float64 {
	s := slices.Clone(x)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// readFloor is one pread of the whole WS file into a buffer allocated
// beforehand, O_DIRECT when the cache was dropped: what FetchState (read +
// verify) is compared with.
func readFloor(b *testing.B, wsPath string, buf []byte, direct bool) time.Duration {
	flags := unix.O_RDONLY | unix.O_CLOEXEC
	if direct {
		flags |= unix.O_DIRECT
	}
	t0 := time.Now()
	fd, err := unix.Open(wsPath, flags, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	unix.Fstat(fd, &st)
	if n, err := unix.Pread(fd, buf[:st.Size], 0); err != nil || int64(n) != st.Size {
		b.Fatalf("pread: %d, %v", n, err)
	}
	return time.Since(t0)
}

// floorRestore is the raw floor: accept the handshake, one pread of the WS
// file into a buffer allocated beforehand (O_DIRECT when the cache was
// dropped, buffered from the page cache when warm), one UFFDIO_COPY
// (DONTWAKE) per run, one UFFDIO_WAKE, ack. No checksum, no bookkeeping.
func floorRestore(b *testing.B, sock, wsPath, memFile string, ops []op, buf []byte, direct bool) time.Duration {
	os.Remove(sock)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	c := benchChild(b, sock, memFile, ops)
	b.StartTimer()
	if _, err := c.stdin.Write([]byte("go\n")); err != nil {
		b.Fatal(err)
	}
	conn, err := ln.AcceptUnix()
	if err != nil {
		b.Fatal(err)
	}
	defer conn.Close()
	h, err := recvHandshake(conn, benchPages*4096)
	if err != nil {
		b.Fatal(err)
	}
	defer h.uffd.Close()
	flags := unix.O_RDONLY | unix.O_CLOEXEC
	if direct {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(wsPath, flags, 0)
	if err != nil {
		b.Fatal(err)
	}
	var st unix.Stat_t
	unix.Fstat(fd, &st)
	buf = buf[:st.Size]
	if n, err := unix.Pread(fd, buf, 0); err != nil || int64(n) != st.Size {
		b.Fatalf("pread: %d, %v", n, err)
	}
	unix.Close(fd)
	nRuns := *(*uint64)(unsafe.Pointer(&buf[16]))
	src := *(*uint64)(unsafe.Pointer(&buf[32])) // data offset (version 2: after the chunk checksums)
	reg := h.regions[0]
	for i := range nRuns {
		off := *(*uint64)(unsafe.Pointer(&buf[wsHeaderSize+i*wsRunSize]))
		n := *(*uint64)(unsafe.Pointer(&buf[wsHeaderSize+i*wsRunSize+8]))
		if _, err := h.uffd.Copy(uintptr(reg.BaseHostVirtAddr+off-reg.Offset), uintptr(unsafe.Pointer(&buf[src])), n, uffd.ModeDontWake); err != nil {
			b.Fatal(err)
		}
		src += n
	}
	if err := h.uffd.Wake(uintptr(reg.BaseHostVirtAddr), reg.Size); err != nil {
		b.Fatal(err)
	}
	conn.Write([]byte(ackOK))
	res := c.result(b)
	b.StopTimer()
	return time.Duration(res.AttachNS + res.TouchNS)
}

// BenchmarkFetchState isolates FetchState — reading a WS file and checking
// every chunk's CRC-32C as it arrives — from the rest of a restore, and
// compares it with the raw floor: one O_DIRECT pread of the same file into
// a buffer allocated beforehand, no checksum. The disk of a shared VM
// changes speed from one moment to the next (the same 26 MiB read takes
// 14–56 ms here), so both are measured back to back in every iteration,
// their order alternating, each after evicting the file from the page
// cache, and the ratio is taken per iteration (fetch/read: its median;
// fetch/read-p25 and -p75 give its spread).
func BenchmarkFetchState(b *testing.B) {
	testutil.RequiresRoot(b)
	dir := b.TempDir()
	const memSize = benchPages * 4096
	var runs []Run
	for _, o := range benchWorkingSet() {
		runs = append(runs, Run{Offset: o.Page * 4096, Length: o.N * 4096})
	}
	slices.SortFunc(runs, func(a, b Run) int { return int(a.Offset>>12) - int(b.Offset>>12) })
	data := make([]byte, benchWS*4096)
	rand.NewChaCha8([32]byte{7}).Read(data)
	wsPath := filepath.Join(dir, "ws")
	if err := os.WriteFile(wsPath, EncodeWorkingSet(4096, memSize, runs, data), 0o600); err != nil {
		b.Fatal(err)
	}
	fi, err := os.Stat(wsPath)
	if err != nil {
		b.Fatal(err)
	}
	m, err := NewManager(Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	defer m.Close()
	benchFetchGeometry(b, m)
	fetch := func() time.Duration {
		dropCache(b, wsPath)
		t0 := time.Now()
		f, _, err := m.fetch(wsPath, memSize)
		if err != nil {
			b.Fatal(err)
		}
		defer m.releaseFetch(f)
		f.mu.Lock()
		for f.fetchedAt.IsZero() {
			f.cond.Wait()
		}
		d, ferr, verified, chunks := f.fetchedAt.Sub(t0), f.err, f.verified, f.meta.chunks()
		f.mu.Unlock()
		if ferr != nil || verified != chunks {
			b.Fatalf("fetch: %d of %d chunks verified, %v", verified, chunks, ferr)
		}
		return d
	}
	// The raw read goes into the very buffer the fetches use (the
	// manager's pool holds one after the first fetch): in this nested VM
	// how fast a read lands depends on the host's backing of the
	// destination pages as much as on the disk, and two buffers of the same
	// size can differ by 4× for the length of a run.
	raw := func() time.Duration {
		dropCache(b, wsPath)
		buf, err := m.bufs.get(int(alignUp(uint64(fi.Size()), wsAlign)))
		if err != nil {
			b.Fatal(err)
		}
		defer m.bufs.put(buf)
		return readFloor(b, wsPath, buf, true)
	}
	fetch() // fills the manager's buffer pool, as on a running daemon
	var fetchT, readT, ratio []float64
	for i := 0; b.Loop(); i++ {
		var f, r time.Duration
		if i%2 == 0 {
			f, r = fetch(), raw()
		} else {
			r, f = raw(), fetch()
		}
		fetchT = append(fetchT, float64(f)/1e6)
		readT = append(readT, float64(r)/1e6)
		ratio = append(ratio, float64(f)/float64(r))
	}
	slices.Sort(ratio)
	b.ReportMetric(median(fetchT), "fetch-ms")
	b.ReportMetric(median(readT), "read-ms")
	b.ReportMetric(median(ratio), "fetch/read")
	b.ReportMetric(ratio[len(ratio)/4], "fetch/read-p25")
	b.ReportMetric(ratio[len(ratio)*3/4], "fetch/read-p75")
	b.ReportMetric(median(fetchT)/median(readT), "fetch/read-of-medians")
	b.ReportMetric(float64(fi.Size())/1e6/median(readT)*1e3, "read-MB/s")
}
