package memory

import (
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"
)

// Defaults for reading a WS file: blocks of fetchBlock bytes with
// fetchReaders reads in flight. A single large O_DIRECT read keeps the
// disk's queue full but cannot be consumed before it ends; several
// block-sized reads in flight keep it about as full and let each block be
// verified and installed while the next ones are read.
const (
	fetchBlock   = 1 << 20
	fetchReaders = 4
	verifiers    = 2 // goroutines checking chunk checksums
)

// fetcher reads one WS file into a page-aligned buffer with several reads
// in flight — O_DIRECT unless the file is wholly in the page cache
// (cachestat(2)) or the filesystem refuses O_DIRECT (tmpfs) — and verifies
// it as the blocks arrive: the header and tables once they are read, then
// each data chunk's CRC-32C (version 2; a version 1 file has one checksum
// for the whole file, checked once it is all read). The installer takes
// chunks as they are verified (wait), so a prefetch costs about the larger
// of reading and installing rather than their sum, and no byte is
// installed before its checksum matched.
type fetcher struct {
	path    string
	memSize uint64 // the memory file's size: the WS must have been recorded against it
	size    uint64 // the WS file's size
	buf     *wsBuffer
	fd, dfd int // buffered and O_DIRECT descriptors (dfd -1 when not used)
	block   uint64
	nBlocks uint64
	next    atomic.Uint64 // next block to read
	stop    atomic.Bool
	wg      sync.WaitGroup
	t0      time.Time
	key     fetchKey
	refs    int // restores using it; guarded by the Manager's mu

	mu        sync.Mutex
	cond      *sync.Cond
	done      []bool // per block
	read      uint64 // bytes [0, read) are read
	meta      *wsMeta
	verified  int       // data chunks verified
	err       error     // first read or verification error: nothing after it is valid
	subs      []int     // eventfds written on progress (a chunk verified, the metadata parsed, an error)
	fetchedAt time.Time // when the last chunk was verified or the fetch failed
	direct    bool      // some block was read with O_DIRECT
}

// fetchKey identifies one version of a WS file: restores that prefetch
// the same file at the same time share one read (Manager.fetch).
type fetchKey struct {
	dev, ino      uint64
	size, mtimeNS int64
	memSize       uint64
}

// openWorkingSet opens path for reading and returns its identity.
func openWorkingSet(path string, memSize uint64) (int, fetchKey, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fetchKey{}, fmt.Errorf("open working set %s: %w", path, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, fetchKey{}, fmt.Errorf("stat working set %s: %w", path, err)
	}
	if st.Size < wsHeaderSize {
		unix.Close(fd)
		return -1, fetchKey{}, fmt.Errorf("%w: %s has %d bytes, shorter than the %d-byte header", ErrBadWorkingSet, path, st.Size, wsHeaderSize)
	}
	return fd, fetchKey{dev: st.Dev, ino: st.Ino, size: st.Size, mtimeNS: st.Mtim.Nano(), memSize: memSize}, nil
}

// startFetch starts reading the file open at fd (path) in the background.
func startFetch(path string, fd int, key fetchKey, pool *bufPool, block uint64, readers int) (*fetcher, error) {
	f := &fetcher{path: path, memSize: key.memSize, size: uint64(key.size), fd: fd, dfd: -1, block: block, t0: time.Now(), key: key}
	f.cond = sync.NewCond(&f.mu)
	if !cached(fd, int(key.size)) {
		if dfd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_DIRECT, 0); err == nil {
			f.dfd = dfd
		}
	}
	n := alignUp(f.size, wsAlign)
	m, err := pool.get(int(n))
	if err != nil {
		f.closeFDs()
		return nil, fmt.Errorf("allocate %d bytes for working set %s: %w", n, path, err)
	}
	f.buf = &wsBuffer{mapped: m, b: m[:f.size], pool: pool}
	f.nBlocks = (n + block - 1) / block
	f.done = make([]bool, f.nBlocks)
	for range min(readers, int(f.nBlocks)) {
		f.wg.Add(1)
		go f.reader()
	}
	f.wg.Add(1)
	go f.verify()
	return f, nil
}

// notifyLocked tells every subscriber that something changed; f.mu is held.
func (f *fetcher) notifyLocked() {
	f.cond.Broadcast()
	var one [8]byte
	one[0] = 1
	for _, fd := range f.subs {
		unix.Write(fd, one[:]) // an eventfd: never blocks (counter), never short
	}
}

// subscribe makes fd (an eventfd) readable on every change; unsubscribe
// stops that.
func (f *fetcher) subscribe(fd int) {
	f.mu.Lock()
	f.subs = append(f.subs, fd)
	f.notifyLocked() // whatever happened before counts as news
	f.mu.Unlock()
}

func (f *fetcher) unsubscribe(fd int) {
	f.mu.Lock()
	f.subs = slices.DeleteFunc(f.subs, func(x int) bool { return x == fd })
	f.mu.Unlock()
}

// progress returns what is known now: the metadata (nil until parsed), the
// number of chunks verified, and the error that stopped the fetch.
func (f *fetcher) progress() (*wsMeta, int, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.meta, f.verified, f.err
}

// failed reports whether reading or verification failed.
func (f *fetcher) failed() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.err != nil
}

func (f *fetcher) closeFDs() {
	unix.Close(f.fd)
	if f.dfd >= 0 {
		unix.Close(f.dfd)
	}
}

// reader reads blocks until none is left, an error occurs or stop is set.
func (f *fetcher) reader() {
	defer f.wg.Done()
	n := uint64(len(f.buf.mapped))
	for !f.stop.Load() {
		j := f.next.Add(1) - 1
		if j >= f.nBlocks {
			return
		}
		lo := j * f.block
		hi := min(lo+f.block, n, alignUp(f.size, wsAlign))
		want := min(hi, f.size) - lo
		direct, err := f.readBlock(f.buf.mapped[lo:hi], lo, want)
		f.mu.Lock()
		if err != nil {
			if f.err == nil {
				f.err = fmt.Errorf("read working set %s at %d: %w", f.path, lo, err)
			}
		} else {
			f.direct = f.direct || direct
			f.done[j] = true
			for k := f.read / f.block; k < f.nBlocks && f.done[k]; k++ {
				f.read = min((k+1)*f.block, f.size)
			}
		}
		if err != nil {
			f.notifyLocked()
		} else {
			f.cond.Broadcast() // the verifier; subscribers hear of verified chunks
		}
		f.mu.Unlock()
		if err != nil {
			return
		}
	}
}

// readBlock fills b (at file offset off) with want bytes: with O_DIRECT
// when available, buffered if the filesystem refuses it.
func (f *fetcher) readBlock(b []byte, off, want uint64) (direct bool, err error) {
	if f.dfd >= 0 {
		got, err := preadFull(f.dfd, b, off)
		if err == nil {
			return true, checkLen(got, want)
		}
		if !errors.Is(err, unix.EINVAL) {
			return false, err
		}
	}
	got, err := preadFull(f.fd, b, off)
	if err != nil {
		return false, err
	}
	return false, checkLen(got, want)
}

func checkLen(got, want uint64) error {
	if got < want {
		return fmt.Errorf("%w: read %d of %d bytes: truncated while reading?", ErrBadWorkingSet, got, want)
	}
	return nil
}

// preadFull reads from fd at off until b is full or EOF.
func preadFull(fd int, b []byte, off uint64) (uint64, error) {
	var got uint64
	for got < uint64(len(b)) {
		n, err := unix.Pread(fd, b[got:], int64(off+got))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return got, err
		}
		if n == 0 {
			break
		}
		got += uint64(n)
	}
	return got, nil
}

// waitRead waits until bytes [0, n) are read; false if reading failed.
// f.mu is held.
func (f *fetcher) waitRead(n uint64) bool {
	for f.read < n && f.err == nil && !f.stop.Load() {
		f.cond.Wait()
	}
	return f.read >= n && f.err == nil
}

// verify parses the metadata as soon as it is read, then checks each data
// chunk as soon as it is read.
func (f *fetcher) verify() {
	defer f.wg.Done()
	fail := func(err error) {
		f.stop.Store(true) // nothing more to read
		f.mu.Lock()
		if f.err == nil {
			f.err = err
		}
		f.fetchedAt = time.Now()
		f.notifyLocked()
		f.mu.Unlock()
	}
	b := f.buf.b
	f.mu.Lock()
	ok := f.waitRead(wsHeaderSize)
	f.mu.Unlock()
	if !ok {
		fail(nil)
		return
	}
	n, err := metaLen(b, f.size)
	if err != nil {
		fail(err)
		return
	}
	f.mu.Lock()
	ok = f.waitRead(n)
	f.mu.Unlock()
	if !ok {
		fail(nil)
		return
	}
	m, err := parseMeta(b[:n], f.size)
	if err == nil && m.memSize != f.memSize {
		err = fmt.Errorf("%w: recorded against a %d-byte memory file, this one has %d", ErrBadWorkingSet, m.memSize, f.memSize)
	}
	if err != nil {
		fail(err)
		return
	}
	f.mu.Lock()
	f.meta = m
	f.notifyLocked()
	f.mu.Unlock()
	// Chunks are checked by several goroutines, each taking the next
	// chunk whose blocks have all arrived: a checksum reads every byte once
	// from memory, and one core does that about as fast as the disk
	// delivers into huge pages, so one verifier fell behind the reads.
	// verified still advances in order (the installer takes a prefix), and
	// a chunk that fails its checksum ends the fetch only once every chunk
	// before it is settled, so that all the good chunks before a bad one
	// are installed, as with one verifier.
	chunks := m.chunks()
	checked := make([]bool, chunks)
	firstBad, badErr := chunks, error(nil) // guarded by f.mu
	var next atomic.Int64
	var vwg sync.WaitGroup
	for range min(verifiers, chunks) {
		vwg.Add(1)
		go func() {
			defer vwg.Done()
			for {
				k := int(next.Add(1) - 1)
				if k >= chunks {
					return
				}
				lo, hi := m.chunkRange(k)
				lo, hi = m.dataOff+lo, m.dataOff+hi
				if m.version != wsVersion {
					lo, hi = 0, m.dataOff+m.dataLen // one checksum over the whole file
				}
				f.mu.Lock()
				ready := k < firstBad && f.waitRange(lo, hi, func() bool { return k >= firstBad })
				f.mu.Unlock()
				if !ready || f.stop.Load() {
					if f.stop.Load() || f.failed() {
						fail(nil)
					}
					return // past a bad chunk: nothing more to check
				}
				err := m.checkChunk(b, k)
				f.mu.Lock()
				if err != nil {
					if k < firstBad {
						firstBad, badErr = k, err
						f.cond.Broadcast() // verifiers waiting past it give up
					}
				} else {
					checked[k] = true
				}
				advanced := false
				for f.verified < firstBad && checked[f.verified] && f.err == nil {
					f.verified++
					advanced = true
				}
				switch {
				case f.verified == chunks && f.fetchedAt.IsZero():
					f.fetchedAt = time.Now()
				case firstBad < chunks && f.verified == firstBad && f.err == nil:
					// Every chunk before the bad one is verified: the
					// fetch ends with its error.
					f.stop.Store(true)
					f.err, f.fetchedAt = badErr, time.Now()
					advanced = true
				}
				if advanced {
					f.notifyLocked()
				}
				f.mu.Unlock()
				if err != nil {
					return
				}
			}
		}()
	}
	vwg.Wait()
}

// waitRange waits until bytes [lo, hi) are read (their blocks may arrive
// out of order); false if reading failed or stopped first, or giveUp
// (called with f.mu held) says the bytes are no longer wanted. f.mu is
// held.
func (f *fetcher) waitRange(lo, hi uint64, giveUp func() bool) bool {
	for f.err == nil && !f.stop.Load() && !giveUp() {
		if f.read >= hi {
			return true
		}
		all := true
		for j := max(lo/f.block, f.read/f.block); j*f.block < hi && j < f.nBlocks; j++ {
			if !f.done[j] {
				all = false
				break
			}
		}
		if all {
			return true
		}
		f.cond.Wait()
	}
	return false
}

func (f *fetcher) errLocked() error {
	if f.err == nil {
		return errors.New("working set fetch stopped")
	}
	return f.err
}

// data returns the file's bytes; valid up to what wait/waitMeta confirmed.
func (f *fetcher) data() []byte { return f.buf.b }

// result returns how long reading and verifying took from since (a
// restore's start; a restore that joined a fetch in progress waited only
// for its rest) until the last chunk was verified or the fetch failed (0
// while it runs), and whether O_DIRECT was used.
func (f *fetcher) result(since time.Time) (time.Duration, bool) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.fetchedAt.IsZero() {
		return 0, f.direct
	}
	if since.Before(f.t0) {
		since = f.t0
	}
	return max(f.fetchedAt.Sub(since), 0), f.direct
}

// close stops the readers, waits for them and releases the buffer.
func (f *fetcher) close() {
	f.stop.Store(true)
	f.mu.Lock()
	f.cond.Broadcast() // a verifier waiting for blocks that will not come
	f.mu.Unlock()
	f.wg.Wait()
	f.buf.release()
	f.closeFDs()
}
