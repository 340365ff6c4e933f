package kvm

import (
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/memory"
)

// BenchmarkGuestRestore restores the toucher guest's snapshot with a real
// vCPU as the memory manager's peer, for data areas of 16, 64 and 256 MiB
// and each page pattern, five ways per iteration, interleaved so that noise
// from other load hits all alike:
//
//	lazy:   every page the vCPU touches faults and is served from the memory file
//	record: lazy, and the faulted pages are written as the working set
//	reap:   prefetch mode: the WS (recorded once before timing) is read,
//	        verified and installed before the vCPU runs (vHive's order:
//	        load, prefetch, then resume)
//	reap-fc: prefetch as Firecracker runs it: the vCPU resumes right
//	        after the handshake while the WS streams in
//	        (RestoreConfig.EarlyResume; a fault on a WS page not installed
//	        yet waits for its chunk)
//	floor:  the raw floor of reap (floorServe): one pread of the WS file
//	        (O_DIRECT when the cache is dropped), one UFFDIO_COPY per run,
//	        one wake, ack; nothing else
//	mmap:   no userfaultfd: slot 0 is a private mapping of the memory file
//
// Each time runs from "go" (VM already built, manager listening) to the
// guest's done exit: handshake, ack and guest run included, verification
// (every page's hash, after the run) not. cache=dropped evicts the memory
// file and the WS file from the page cache before each restore (vHive's
// method); cache=warm leaves them cached. populate-ms is the first touch of
// as many fresh anonymous pages as the WS has, measured in the same
// iteration: the allocation every install pays. Reported values are
// medians.
func BenchmarkGuestRestore(b *testing.B) {
	requiresKVM(b)
	b.Logf("/dev/kvm implementation: %q (pvm: shadow paging, ring 3 native)", Flavour())
	for _, mib := range []int{16, 64, 256} {
		b.Run(fmt.Sprintf("size=%dMiB", mib), func(b *testing.B) {
			dataPages := mib << 20 / PageSize
			fx := newFixture(b, dataPages)
			for _, pat := range Patterns {
				for _, drop := range []bool{true, false} {
					cache := "dropped"
					if !drop {
						cache = "warm"
					}
					b.Run(fmt.Sprintf("pattern=%s/cache=%s", pat, cache), func(b *testing.B) {
						benchRestore(b, fx, pat, drop)
					})
				}
			}
		})
	}
}

func benchRestore(b *testing.B, fx *fixture, pat Pattern, drop bool) {
	cfg := vmmConfig{Pattern: pat, Seed: 1, Output: OutputHash}
	recWS := filepath.Join(fx.dir, "ws.rec")
	check := func(what string, res vmmResult) vmmResult {
		if res.Verify.Mismatches != 0 || res.Verify.Pages != res.Touched {
			b.Fatalf("%s: %d of %d pages verified, %d mismatches; first: %s", what, res.Verify.Pages, res.Touched, res.Verify.Mismatches, res.Verify.First)
		}
		return res
	}
	restore := func(mode memory.Mode) (vmmResult, memory.Stats) {
		c := cfg
		ws := fx.wsPath()
		if mode == memory.ModeRecord {
			ws = recWS
		}
		if drop {
			dropCache(b, fx.image)
			dropCache(b, fx.wsPath())
		}
		res, st := fx.restoreWS(b, mode, ws, c)
		return check(string(mode), res), st
	}
	var floorBuf []byte
	floor := func() vmmResult {
		if drop {
			dropCache(b, fx.wsPath())
		}
		return check("floor", fx.floor(b, cfg, floorBuf, drop))
	}
	mapped := func() vmmResult {
		if drop {
			dropCache(b, fx.image)
		}
		return check("mmap", fx.mapped(b, cfg))
	}

	// The working set the prefetches install, recorded before timing; one
	// untimed prefetch fills the manager's buffer pool, as any earlier
	// prefetch on a running daemon would.
	_, st := fx.restoreWS(b, memory.ModeRecord, fx.wsPath(), cfg)
	wsPages := st.RecPages
	restore(memory.ModePrefetch)
	floorBuf = fx.floorBuffer(b)

	var lazyT, recT, reapT, floorT, lazyReap, reapFloor, fetch, install, reapRun, floorRun []float64
	var fcT, lazyFC, fcWaits []float64
	var lazyFaults, reapFaults, mmapT, lazyPF, reapPF, populate []float64
	ms := func(r vmmResult) float64 { return float64(r.AttachNS+r.RunNS) / 1e6 }
	touched := 0
	for b.Loop() {
		res, st := restore(memory.ModeLazy)
		touched = res.Touched
		lazyT = append(lazyT, ms(res))
		lazyFaults = append(lazyFaults, float64(st.Faults))
		lazyPF = append(lazyPF, float64(res.GuestPF))

		res, st = restore(memory.ModeRecord)
		recT = append(recT, ms(res))
		if st.RecPages != wsPages {
			b.Fatalf("record: %d pages, the first record had %d", st.RecPages, wsPages)
		}

		res, st = restore(memory.ModePrefetch)
		if st.PrefetchFallback {
			b.Fatal("prefetch fell back to lazy serving")
		}
		reapT = append(reapT, ms(res))
		reapRun = append(reapRun, float64(res.RunNS)/1e6)
		reapFaults = append(reapFaults, float64(st.Faults))
		reapPF = append(reapPF, float64(res.GuestPF))
		fetch = append(fetch, float64(st.FetchState)/1e6)
		install = append(install, float64(st.InstallWS)/1e6)

		if drop {
			dropCache(b, fx.image)
			dropCache(b, fx.wsPath())
		}
		res, st = fx.restoreAsFirecracker(b, cfg)
		check("reap-fc", res)
		if st.PrefetchFallback || st.Unique != 0 {
			b.Fatalf("prefetch with early resume: fallback %v, %d pages served lazily", st.PrefetchFallback, st.Unique)
		}
		fcT = append(fcT, ms(res))
		fcWaits = append(fcWaits, float64(st.WSWaits))

		res = floor()
		floorT = append(floorT, ms(res))
		floorRun = append(floorRun, float64(res.RunNS)/1e6)

		res = mapped()
		mmapT = append(mmapT, ms(res))

		populate = append(populate, float64(firstTouch(b, int(wsPages)))/1e6)

		i := len(lazyT) - 1
		lazyReap = append(lazyReap, lazyT[i]/reapT[i])
		reapFloor = append(reapFloor, reapT[i]/floorT[i])
		lazyFC = append(lazyFC, lazyT[i]/fcT[i])
	}
	b.ReportMetric(float64(touched*PageSize)/(1<<20), "touched-MiB")
	b.ReportMetric(median(lazyT), "lazy-ms")
	b.ReportMetric(median(recT), "record-ms")
	b.ReportMetric(median(reapT), "reap-ms")
	b.ReportMetric(median(floorT), "floor-ms")
	b.ReportMetric(median(mmapT), "mmap-ms")
	b.ReportMetric(median(lazyReap), "lazy/reap")
	b.ReportMetric(median(reapFloor), "reap/floor")
	b.ReportMetric(median(fcT), "reap-fc-ms")
	b.ReportMetric(median(lazyFC), "lazy/reap-fc")
	b.ReportMetric(median(fcWaits), "reap-fc-ws-waits")
	b.ReportMetric(median(fetch), "fetch-ms")
	b.ReportMetric(median(install), "install-ms")
	b.ReportMetric(median(populate), "populate-ms")
	b.ReportMetric(median(reapRun), "reap-run-ms")
	b.ReportMetric(median(floorRun), "floor-run-ms")
	b.ReportMetric(median(lazyFaults), "lazy-faults")
	b.ReportMetric(median(reapFaults), "reap-faults")
	b.ReportMetric(100*(1-median(reapFaults)/median(lazyFaults)), "faults-removed-%")
	b.ReportMetric(median(lazyT)*1e3/float64(touched), "lazy-µs/page")
	b.ReportMetric(median(lazyPF), "lazy-guest-pf")
	b.ReportMetric(median(reapPF), "reap-guest-pf")
}

// firstTouch is the cost of populating pages of fresh anonymous memory,
// with no data and no userfaultfd: map, write one byte per page, unmap.
// Every restore pays it for the pages it installs (UFFDIO_COPY allocates
// them too); on this machine kind it is far from free (see kvm.md).
func firstTouch(b *testing.B, pages int) time.Duration {
	m, err := unix.Mmap(-1, 0, pages*PageSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Munmap(m)
	t0 := time.Now()
	for p := 0; p < len(m); p += PageSize {
		m[p] = 1
	}
	return time.Since(t0)
}

func median(x []float64) float64 {
	s := slices.Clone(x)
	slices.Sort(s)
	if len(s) == 0 {
		return 0
	}
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// dropCache evicts path from the page cache (that file only).
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
