package microvm

import (
	"context"
	crand "crypto/rand"
	"maps"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"testing"
)

// benchWS returns a memory file and WS runs for BenchmarkPrefetchMethods:
// VHIVE_REAP_MEM and VHIVE_REAP_WS (a snapshot's mem and a recorded WS
// file, e.g. kept by BenchmarkReapRestore with VHIVE_REAP_KEEP=<dir>; the
// runs widened as a restore reads them) if set, else a 256 MiB file of random bytes with ≈2,000 pages in
// ≈1,000 runs scattered over it (the shape of the recorded WS of a Python
// gRPC guest, see docs/benchmarks/reap-microvm.md).
func benchWS(b *testing.B) (string, map[string][]wsRun) {
	if mem, ws := os.Getenv("VHIVE_REAP_MEM"), os.Getenv("VHIVE_REAP_WS"); mem != "" && ws != "" {
		w, err := readWS(ws, mem)
		if err != nil {
			b.Fatal(err)
		}
		return mem, map[string][]wsRun{"exact": w.Runs, "padded": padRuns(w.Runs, prefetchPad, w.MemSize)}
	}
	const size = 256 << 20
	mem := filepath.Join(b.TempDir(), "mem")
	data := make([]byte, size)
	_, _ = crand.Read(data)
	if err := os.WriteFile(mem, data, 0o600); err != nil {
		b.Fatal(err)
	}
	f, err := os.Open(mem)
	if err != nil {
		b.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		b.Fatal(err)
	}
	f.Close()
	r := rand.New(rand.NewPCG(1, 2))
	var pages []uint64
	for len(pages) < 2000 {
		p := r.Uint64N(size / wsfPage)
		for k := range 1 + r.IntN(3) {
			pages = append(pages, min(p+uint64(k), size/wsfPage-1))
		}
	}
	slices.Sort(pages)
	return mem, map[string][]wsRun{"synthetic": runsOfPages(slices.Compact(pages))}
}

// BenchmarkPrefetchMethods reads the same WS from an evicted memory file
// with each method; "pread" (one read per run, in order) is the floor.
// Each iteration evicts the file first (fadvise DONTNEED on it, not
// drop_caches) and checks that nothing of it stayed cached.
func BenchmarkPrefetchMethods(b *testing.B) {
	mem, sets := benchWS(b)
	for _, name := range slices.Sorted(maps.Keys(sets)) {
		b.Run(name, func(b *testing.B) { benchPrefetch(b, mem, sets[name]) })
	}
}

func benchPrefetch(b *testing.B, mem string, runs []wsRun) {
	var bytes int64
	for _, r := range runs {
		bytes += int64(r.Len)
	}
	b.Logf("WS: %d runs, %d KiB", len(runs), bytes>>10)
	type variant struct {
		name    string
		m       prefetchMethod
		workers int
	}
	vs := []variant{{"pread", prefetchPread, 1}, {"readahead", prefetchReadahead, 1}, {"fadvise", prefetchFadvise, 1}}
	for _, w := range []int{2, 4, 8, 16} {
		vs = append(vs, variant{"parallel-" + strconv.Itoa(w), prefetchParallel, w})
	}
	for _, v := range vs {
		b.Run(v.name, func(b *testing.B) {
			f, err := os.Open(mem)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			fi, _ := f.Stat()
			b.SetBytes(bytes)
			for b.Loop() {
				b.StopTimer()
				if err := evict(mem); err != nil {
					b.Fatal(err)
				}
				if n, err := cachedPages(f, fi.Size()); err != nil || n != 0 {
					b.Fatalf("after eviction %d pages cached (%v)", n, err)
				}
				b.StartTimer()
				if _, err := prefetch(context.Background(), f, runs, v.m, v.workers); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
