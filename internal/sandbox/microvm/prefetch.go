package microvm

import (
	"context"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"golang.org/x/sys/unix"
)

// prefetchMethod is how a WS is read into the page cache of the memory
// file. BenchmarkPrefetchMethods compares them with the floor (one pread
// of every run into a buffer, in order); restores use prefetchDefault.
type prefetchMethod string

const (
	prefetchPread     prefetchMethod = "pread"     // pread of each run, in order, into a buffer (the floor)
	prefetchParallel  prefetchMethod = "parallel"  // the same preads on prefetchWorkers goroutines
	prefetchReadahead prefetchMethod = "readahead" // readahead(2) per run, then wait for the pages
	prefetchFadvise   prefetchMethod = "fadvise"   // posix_fadvise(WILLNEED) per run, then wait
)

// prefetchDefault is the method restores use (the fastest measured; see
// docs/benchmarks/reap-microvm.md).
const prefetchDefault = prefetchReadahead

// prefetchWorkers is the parallel method's number of reads in flight.
const prefetchWorkers = 8

// prefetchChunk bounds one read: a long run is read in pieces so that
// every worker's buffer stays small.
const prefetchChunk = 1 << 20

// prefetch reads runs of mem (opened for it alone) into the page cache
// with method m and returns the bytes read. The readahead and fadvise methods only start the reads;
// they then pread every run again (served from the cache once the pages
// are in, waiting for those still being read), so that each method ends
// with the whole set cached.
func prefetch(ctx context.Context, mem *os.File, runs []wsRun, m prefetchMethod, workers int) (int64, error) {
	fd := int(mem.Fd())
	// No read-ahead for this file descriptor's reads: they read exactly
	// the runs (readahead(2) and WILLNEED are not affected).
	if err := unix.Fadvise(fd, 0, 0, unix.FADV_RANDOM); err != nil {
		return 0, fmt.Errorf("fadvise %s: %w", mem.Name(), err)
	}
	switch m {
	case prefetchPread:
		return preadRuns(ctx, mem, runs, 1)
	case prefetchParallel:
		return preadRuns(ctx, mem, runs, workers)
	case prefetchReadahead:
		for _, r := range runs {
			if _, _, errno := unix.Syscall(unix.SYS_READAHEAD, uintptr(fd), uintptr(r.Off), uintptr(r.Len)); errno != 0 {
				return 0, fmt.Errorf("readahead %s: %w", mem.Name(), errno)
			}
		}
		return preadRuns(ctx, mem, runs, 1)
	case prefetchFadvise:
		for _, r := range runs {
			if err := unix.Fadvise(fd, int64(r.Off), int64(r.Len), unix.FADV_WILLNEED); err != nil {
				return 0, fmt.Errorf("fadvise %s: %w", mem.Name(), err)
			}
		}
		return preadRuns(ctx, mem, runs, 1)
	}
	return 0, fmt.Errorf("unknown prefetch method %q", m)
}

// preadRuns reads every run (in prefetchChunk pieces) on n goroutines,
// each with its own buffer, taking pieces in offset order.
func preadRuns(ctx context.Context, mem *os.File, runs []wsRun, n int) (int64, error) {
	type piece struct{ off, len uint64 }
	var pieces []piece
	for _, r := range runs {
		for o := uint64(0); o < r.Len; o += prefetchChunk {
			pieces = append(pieces, piece{r.Off + o, min(prefetchChunk, r.Len-o)})
		}
	}
	n = max(1, min(n, len(pieces)))
	var (
		next  atomic.Int64
		total atomic.Int64
		wg    sync.WaitGroup
		errMu sync.Mutex
		first error
	)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := make([]byte, prefetchChunk)
			for {
				i := int(next.Add(1) - 1)
				if i >= len(pieces) || ctx.Err() != nil {
					return
				}
				p := pieces[i]
				k, err := mem.ReadAt(buf[:p.len], int64(p.off))
				total.Add(int64(k))
				if err != nil {
					errMu.Lock()
					if first == nil {
						first = fmt.Errorf("read %s at %#x: %w", mem.Name(), p.off, err)
					}
					errMu.Unlock()
					return
				}
			}
		}()
	}
	wg.Wait()
	if first != nil {
		return total.Load(), first
	}
	return total.Load(), ctx.Err()
}

// evict drops path's clean pages from the page cache
// (POSIX_FADV_DONTNEED on this file only; pages mapped by a running
// process stay).
func evict(path string) error {
	f, err := os.Open(path)
	if err != nil {
		return err
	}
	defer f.Close()
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

// cachedPages returns how many of fd's first size bytes' pages are in the
// page cache (cachestat(2), Linux 6.5+).
func cachedPages(f *os.File, size int64) (int64, error) {
	var st unix.Cachestat_t
	if err := unix.Cachestat(uint(f.Fd()), &unix.CachestatRange{Len: uint64(size)}, &st, 0); err != nil {
		return 0, err
	}
	return int64(st.Cache), nil
}
