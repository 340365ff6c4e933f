package memory

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"sync"
	"time"
	"unsafe"

	"github.com/prometheus/client_golang/prometheus"
	"golang.org/x/sys/unix"
)

// Mode selects how a restore serves guest memory.
type Mode string

const (
	// ModeLazy serves each fault from the memory file.
	ModeLazy Mode = "lazy"
	// ModeRecord serves lazily and records the faulted pages; FinishRecord
	// (or Close) writes them as the working-set file.
	ModeRecord Mode = "record"
	// ModePrefetch installs the working-set file right after the
	// handshake, then serves the remaining faults lazily (REAP).
	ModePrefetch Mode = "prefetch"
)

// Config parameterises a Manager.
type Config struct {
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
	// Metrics, optional (see NewMetrics).
	Metrics *Metrics
}

// Manager serves guest memory for many restores at once, each with its own
// socket, memory file, mode and state. Use one per daemon.
type Manager struct {
	log     *slog.Logger
	metrics *Metrics

	bufs bufPool // WS file buffers

	// WS reads: block size and reads in flight (fetchBlock, fetchReaders;
	// benchmarks vary them).
	fetchBlock   uint64
	fetchReaders int

	mu       sync.Mutex
	restores map[string]*Restore
	fetches  map[fetchKey]*fetcher // WS reads in progress or being installed
	closed   bool
}

// fetch returns a reader of the WS file at path: the one already in
// progress for the same file (same inode, size and mtime) if there is one,
// so that simultaneous restores from one snapshot read its WS once, else a
// new one. The buffer lives until the last restore using it has installed
// it (releaseFetch); a later restore reads the file again. shared reports
// whether it joined a fetch in progress.
func (m *Manager) fetch(path string, memSize uint64) (f *fetcher, shared bool, err error) {
	fd, key, err := openWorkingSet(path, memSize)
	if err != nil {
		return nil, false, err
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if f := m.fetches[key]; f != nil && !f.failed() {
		unix.Close(fd)
		f.refs++
		return f, true, nil
	}
	f, err = startFetch(path, fd, key, &m.bufs, m.fetchBlock, m.fetchReaders)
	if err != nil {
		return nil, false, err
	}
	f.refs = 1
	m.fetches[key] = f
	return f, false, nil
}

// releaseFetch drops one restore's use of f; the last one stops it and
// frees its buffer.
func (m *Manager) releaseFetch(f *fetcher) {
	m.mu.Lock()
	f.refs--
	last := f.refs == 0
	if last && m.fetches[f.key] == f {
		delete(m.fetches, f.key)
	}
	m.mu.Unlock()
	if last {
		f.close()
	}
}

// maxIdleBuffers bounds the memory kept for reuse as WS read buffers.
const maxIdleBuffers = 256 << 20

// NewManager returns a Manager.
func NewManager(cfg Config) (*Manager, error) {
	log := cfg.Logger
	if log == nil {
		log = slog.Default()
	}
	return &Manager{
		log: log.With("component", "memory"), metrics: cfg.Metrics,
		bufs: bufPool{maxIdle: maxIdleBuffers}, restores: map[string]*Restore{}, fetches: map[fetchKey]*fetcher{},
		fetchBlock: fetchBlock, fetchReaders: fetchReaders,
	}, nil
}

// RestoreConfig describes one restore.
type RestoreConfig struct {
	// ID names the restore in logs and errors; unique among the manager's
	// active restores.
	ID string
	// SocketPath is where the manager listens for the sandbox's handshake
	// (Firecracker's mem_backend.backend_path). A stale socket there is
	// replaced; any other file is an error.
	SocketPath string
	// MemoryFile is the guest memory snapshot. Holes of a sparse file are
	// served as zero pages.
	MemoryFile string
	Mode       Mode
	// WorkingSet is the WS file: written by record, read by prefetch.
	WorkingSet string
	// Trace (record, optional) receives the faulted pages in fault order as
	// CSV "seq,offset,length".
	Trace string
	// EarlyResume (prefetch): tell the sandbox memory is ready right after
	// the handshake instead of after the whole working set is installed,
	// so that the guest runs while the WS is still being read. A fault on a
	// WS page not installed yet waits for its chunk (no second read); one
	// outside the WS is served lazily at once. Default false: the WS is
	// installed before the ack, as REAP does.
	EarlyResume bool
	// ChunkPages is how many pages one fault installs: the aligned chunk of
	// ChunkPages pages around the faulting page (clipped to its region).
	// 0 or 1 is pure lazy serving.
	ChunkPages int
}

func (c RestoreConfig) validate() error {
	switch {
	case c.ID == "":
		return errors.New("restore ID is empty")
	case c.SocketPath == "":
		return errors.New("socket path is empty")
	case len(c.SocketPath) > 107:
		return fmt.Errorf("socket path %q longer than 107 bytes", c.SocketPath)
	case c.MemoryFile == "":
		return errors.New("memory file is empty")
	case c.ChunkPages < 0 || c.ChunkPages > 1<<16:
		return fmt.Errorf("chunk pages %d not in [0, 65536]", c.ChunkPages)
	}
	switch c.Mode {
	case ModeLazy:
	case ModeRecord, ModePrefetch:
		if c.WorkingSet == "" {
			return fmt.Errorf("mode %q needs a working-set file path", c.Mode)
		}
	default:
		return fmt.Errorf("unknown memory mode %q (want lazy, record or prefetch)", c.Mode)
	}
	if c.Mode == ModePrefetch {
		if _, err := os.Stat(c.WorkingSet); err != nil {
			return fmt.Errorf("working set: %w", err)
		}
	}
	return nil
}

// Start begins a restore: it maps the memory file, listens on the socket
// and serves in the background. The sandbox process may connect as soon as
// Start returns. ctx bounds only the setup. Always call Close.
func (m *Manager) Start(ctx context.Context, cfg RestoreConfig) (_ *Restore, retErr error) {
	if err := cfg.validate(); err != nil {
		return nil, fmt.Errorf("start restore %q: %w", cfg.ID, err)
	}
	if err := ctx.Err(); err != nil {
		return nil, fmt.Errorf("start restore %q: %w", cfg.ID, err)
	}
	r := &Restore{
		cfg:   cfg,
		log:   m.log.With("restore", cfg.ID, "mode", string(cfg.Mode)),
		mgr:   m,
		ready: make(chan struct{}),
		done:  make(chan struct{}),
		stop:  -1,
		chunk: uint64(max(cfg.ChunkPages, 1)),
	}
	r.recording = cfg.Mode == ModeRecord
	if err := m.admit(cfg.ID, nil); err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			r.release()
		}
	}()
	if err := r.openMemory(); err != nil {
		return nil, fmt.Errorf("start restore %q: %w", cfg.ID, err)
	}
	stop, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, fmt.Errorf("start restore %q: eventfd: %w", cfg.ID, err)
	}
	r.stop = stop
	if fi, err := os.Lstat(cfg.SocketPath); err == nil {
		if fi.Mode()&os.ModeSocket == 0 {
			return nil, fmt.Errorf("start restore %q: %s exists and is not a socket", cfg.ID, cfg.SocketPath)
		}
		os.Remove(cfg.SocketPath)
	}
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.SocketPath, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("start restore %q: %w", cfg.ID, err)
	}
	r.ln = ln
	if err := m.admit(cfg.ID, r); err != nil {
		return nil, err
	}
	if m.metrics != nil {
		mode := string(cfg.Mode)
		r.obs = &observers{
			faults:    m.metrics.faults.WithLabelValues(mode),
			dupFaults: m.metrics.dupFaults.WithLabelValues(mode),
			unique:    m.metrics.unique.WithLabelValues(mode),
			bytesRead: m.metrics.bytesRead.WithLabelValues(mode),
			faultTime: m.metrics.faultTime.WithLabelValues(mode),
			m:         m.metrics,
		}
		m.metrics.restores.WithLabelValues(mode).Inc()
		m.metrics.activeCount.Inc()
	}
	go r.run()
	return r, nil
}

// admit checks that the manager is open and id is free; with r != nil it
// also registers r under id.
func (m *Manager) admit(id string, r *Restore) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	switch {
	case m.closed:
		return fmt.Errorf("start restore %q: memory manager closed", id)
	case m.restores[id] != nil:
		return fmt.Errorf("start restore %q: a restore with this ID is active", id)
	}
	if r != nil {
		m.restores[id] = r
	}
	return nil
}

func (m *Manager) forget(r *Restore) {
	m.mu.Lock()
	if m.restores[r.cfg.ID] == r {
		delete(m.restores, r.cfg.ID)
	}
	m.mu.Unlock()
}

// Close stops every active restore (killing peers that are still running,
// since they would hang on their next fault) and refuses new ones.
func (m *Manager) Close() error {
	m.mu.Lock()
	m.closed = true
	rs := make([]*Restore, 0, len(m.restores))
	for _, r := range m.restores {
		rs = append(rs, r)
	}
	m.mu.Unlock()
	var errs []error
	for _, r := range rs {
		errs = append(errs, r.Close())
	}
	m.bufs.close()
	return errors.Join(errs...)
}

type observers struct {
	faults, dupFaults, unique, bytesRead prometheus.Counter
	faultTime                            prometheus.Observer
	m                                    *Metrics
}

// Restore is one restore served by the Manager.
type Restore struct {
	cfg   RestoreConfig
	log   *slog.Logger
	mgr   *Manager
	obs   *observers
	chunk uint64

	// Set up by Start, released by Close after the serving goroutine ends.
	memFile *os.File
	mem     []byte // the memory file, mapped read-only
	memSize uint64
	holes   bitset // 4 KiB pages of the memory file that are holes
	ln      *net.UnixListener
	stop    int // eventfd: Close asks the serving goroutine to stop

	ready    chan struct{} // closed when memory is ready or the restore failed
	done     chan struct{} // closed when the serving goroutine has ended
	readyErr error         // written before ready is closed
	err      error         // written before done is closed

	closeOnce sync.Once
	closeErr  error

	// recMu is held while the WS file is written, so that Close does not
	// release the memory file under a running FinishRecord.
	recMu sync.Mutex

	// mu guards the fields below: written by the serving goroutine, read
	// by Stats, FinishRecord and Close.
	mu        sync.Mutex
	stats     Stats
	pid       int
	pageSize  uint64 // smallest region page size
	recording bool
	spans     []span
	closing   bool
	conn      *net.UnixConn // the peer's connection, once accepted
}

// Ready is closed once the handshake is done and (prefetch) the working set
// is installed — the moment the sandbox may resume — or once the restore
// failed; then ReadyErr says why.
func (r *Restore) Ready() <-chan struct{} { return r.ready }

// ReadyErr is nil after a successful handshake; valid once Ready is closed.
func (r *Restore) ReadyErr() error {
	<-r.ready
	return r.readyErr
}

// Done is closed when serving has ended: the peer exited, Close was
// called, or serving failed.
func (r *Restore) Done() <-chan struct{} { return r.done }

// Err says why serving ended abnormally (nil after a normal peer exit or
// Close); valid once Done is closed.
func (r *Restore) Err() error {
	<-r.done
	return r.err
}

// PeerPID is the sandbox process's pid (SO_PEERCRED), 0 before the
// handshake.
func (r *Restore) PeerPID() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.pid
}

// Stats returns a copy of what the restore measured so far.
func (r *Restore) Stats() Stats {
	r.mu.Lock()
	defer r.mu.Unlock()
	s := r.stats
	s.FaultLatency = append([]time.Duration(nil), r.stats.FaultLatency...)
	return s
}

// FinishRecord stops recording and writes the working-set file (and the
// trace, if configured) atomically; later faults are still served, lazily.
// It fails outside record mode, before the handshake, or when called twice.
func (r *Restore) FinishRecord(ctx context.Context) error {
	if err := ctx.Err(); err != nil {
		return fmt.Errorf("finish recording %q: %w", r.cfg.ID, err)
	}
	r.recMu.Lock()
	defer r.recMu.Unlock()
	r.mu.Lock()
	if !r.recording {
		r.mu.Unlock()
		return fmt.Errorf("finish recording %q: not recording (mode %q)", r.cfg.ID, r.cfg.Mode)
	}
	if r.pageSize == 0 {
		r.mu.Unlock()
		return fmt.Errorf("finish recording %q: no handshake yet", r.cfg.ID)
	}
	r.recording = false
	spans, ps := r.spans, r.pageSize
	r.spans = nil
	r.mu.Unlock()

	runs, zeros, err := writeWorkingSet(r.cfg.WorkingSet, r.memFile, ps, r.memSize, spans)
	if err != nil {
		return fmt.Errorf("finish recording %q: %w", r.cfg.ID, err)
	}
	if r.cfg.Trace != "" {
		if err := writeTrace(r.cfg.Trace, spans); err != nil {
			return fmt.Errorf("finish recording %q: %w", r.cfg.ID, err)
		}
	}
	var pages int64
	for _, x := range runs {
		pages += int64(x.Length / ps)
	}
	r.mu.Lock()
	r.stats.RecPages, r.stats.RecRegions = pages, int64(len(runs))
	r.mu.Unlock()
	r.log.Info("working set recorded", "path", r.cfg.WorkingSet, "pages", pages, "runs", len(runs), "zero_pages", zeros)
	return nil
}

// Close stops serving and releases everything the restore holds. A peer
// that is still running is killed (by pidfd, so only that process): it
// would otherwise hang on its next fault. In record mode a working set not
// yet written by FinishRecord is written now. Safe to call more than once.
func (r *Restore) Close() error {
	r.closeOnce.Do(func() {
		r.mu.Lock()
		r.closing = true
		if r.conn != nil {
			r.conn.SetReadDeadline(time.Unix(1, 0)) // end a handshake in progress
		}
		r.mu.Unlock()
		var one [8]byte
		*(*uint64)(unsafe.Pointer(&one[0])) = 1
		unix.Write(r.stop, one[:])
		r.ln.Close()
		<-r.done
		r.mu.Lock()
		rec := r.recording && r.pageSize != 0
		r.mu.Unlock()
		if rec {
			r.closeErr = r.FinishRecord(context.Background())
		}
		r.recMu.Lock() // wait for a FinishRecord still writing
		r.release()
		r.recMu.Unlock()
		r.mgr.forget(r)
		if r.obs != nil {
			r.obs.m.activeCount.Dec()
		}
	})
	return r.closeErr
}

func (r *Restore) release() {
	if r.mem != nil {
		unix.Munmap(r.mem)
		r.mem = nil
	}
	if r.memFile != nil {
		r.memFile.Close()
		r.memFile = nil
	}
	if r.stop >= 0 {
		unix.Close(r.stop)
		r.stop = -1
	}
	if r.ln != nil {
		r.ln.Close()
	}
}

// openMemory maps the memory file and finds its holes.
func (r *Restore) openMemory() error {
	f, err := os.Open(r.cfg.MemoryFile)
	if err != nil {
		return fmt.Errorf("memory file: %w", err)
	}
	r.memFile = f
	fi, err := f.Stat()
	if err != nil {
		return fmt.Errorf("memory file: %w", err)
	}
	if !fi.Mode().IsRegular() || fi.Size() == 0 {
		return fmt.Errorf("memory file %s: not a non-empty regular file", r.cfg.MemoryFile)
	}
	r.memSize = uint64(fi.Size())
	r.mem, err = unix.Mmap(int(f.Fd()), 0, int(fi.Size()), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		return fmt.Errorf("map memory file %s: %w", r.cfg.MemoryFile, err)
	}
	r.holes, err = findHoles(int(f.Fd()), r.memSize)
	if err != nil {
		return fmt.Errorf("memory file %s: %w", r.cfg.MemoryFile, err)
	}
	return nil
}

// findHoles marks the 4 KiB pages of the file that lie wholly in a hole
// (SEEK_DATA/SEEK_HOLE; a filesystem without hole support reports none).
func findHoles(fd int, size uint64) (bitset, error) {
	const ps = 4096
	holes := newBitset((size + ps - 1) / ps)
	mark := func(a, b uint64) {
		for p := (a + ps - 1) / ps; (p+1)*ps <= b; p++ {
			holes.set(p)
		}
	}
	var off uint64
	for off < size {
		data, err := unix.Seek(fd, int64(off), unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) {
			mark(off, size)
			break
		}
		if err != nil {
			return nil, fmt.Errorf("SEEK_DATA: %w", err)
		}
		mark(off, uint64(data))
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return nil, fmt.Errorf("SEEK_HOLE: %w", err)
		}
		off = uint64(hole)
	}
	return holes, nil
}

type bitset []uint64

func newBitset(n uint64) bitset    { return make(bitset, (n+63)/64) }
func (b bitset) get(i uint64) bool { return b[i/64]&(1<<(i%64)) != 0 }
func (b bitset) set(i uint64)      { b[i/64] |= 1 << (i % 64) }
func (b bitset) clear(i uint64)    { b[i/64] &^= 1 << (i % 64) }
