package memory

import (
	"errors"
	"fmt"
	"net"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/uffd"
)

// errPeerGone: the sandbox's address space is gone (it exited).
var errPeerGone = errors.New("peer address space gone")

// region is a handshake region with the serving goroutine's page state.
type region struct {
	Region
	pages    uint64
	present  bitset // installed by us and not removed since
	removed  bitset // UFFD_EVENT_REMOVE seen: reads as zero on the next fault
	inWS     bitset // in the working set being installed (prefetch)
	recorded bitset // already in the record log
}

// server is the state owned by a restore's serving goroutine.
type server struct {
	r       *Restore
	uffd    *uffd.FD
	regions []*region
	pidfd   int
	pid     int
	msgs    []uffd.Msg
	pending []uffd.Msg // faults read while draining for EAGAIN
	fetch   *fetcher   // prefetch: the WS being read
	t0      time.Time  // prefetch: when the restore asked for the WS
	inst    *installer // prefetch: the install in progress
}

func (r *Restore) setReady(err error) {
	r.readyErr = err
	close(r.ready)
}

// run is the restore's serving goroutine: fetch the WS (prefetch), accept
// one peer, take its handshake, install the WS, ack, serve faults.
func (r *Restore) run() {
	s := &server{r: r, pidfd: -1, msgs: make([]uffd.Msg, 64)}
	readySet := false
	var notReady error
	defer func() {
		if !readySet {
			if notReady == nil {
				notReady = r.err
			}
			r.setReady(fmt.Errorf("restore %q: %w", r.cfg.ID, notReady))
		}
		if s.inst != nil {
			s.inst.f.unsubscribe(s.inst.progress)
			unix.Close(s.inst.progress)
		}
		if s.fetch != nil {
			r.mgr.releaseFetch(s.fetch)
		}
		if s.uffd != nil {
			s.uffd.Close()
		}
		if s.pidfd >= 0 {
			unix.Close(s.pidfd)
		}
		close(r.done)
	}()
	if r.cfg.Mode == ModePrefetch {
		s.startFetch()
	}
	conn, err := r.ln.AcceptUnix()
	if err != nil {
		if r.isClosing() {
			notReady = errors.New("closed before the sandbox connected")
		} else {
			r.err = fmt.Errorf("accept on %s: %w", r.cfg.SocketPath, err)
		}
		return
	}
	defer conn.Close()
	r.ln.Close() // one peer per restore
	r.mu.Lock()
	r.conn = conn
	closing := r.closing
	r.mu.Unlock()
	if closing {
		notReady = errors.New("closed before the handshake")
		return
	}
	conn.SetReadDeadline(time.Now().Add(10 * time.Second))
	h, err := recvHandshake(conn, r.memSize)
	conn.SetReadDeadline(time.Time{})
	if err != nil && r.isClosing() {
		notReady = errors.New("closed during the handshake")
		return
	}
	if err != nil {
		r.log.Warn("handshake rejected", "err", err)
		ack(conn, ackError+err.Error()+"\n")
		r.err = err
		return
	}
	s.uffd, s.pid = h.uffd, h.pid
	minPS := h.regions[0].PageSize
	for _, reg := range h.regions {
		n := reg.Size / reg.PageSize
		s.regions = append(s.regions, &region{Region: reg, pages: n,
			present: newBitset(n), removed: newBitset(n), inWS: newBitset(n), recorded: newBitset(n)})
		minPS = min(minPS, reg.PageSize)
	}
	s.pidfd = h.pidfd
	if s.pidfd < 0 && s.pid > 0 {
		// Older kernel: open it by pid (racy only if the peer already
		// exited and its pid was reused within this instant).
		if fd, err := unix.PidfdOpen(s.pid, 0); err == nil {
			s.pidfd = fd
		} else {
			r.log.Warn("pidfd_open failed: the peer's exit will not be noticed", "pid", s.pid, "err", err)
		}
	}
	r.mu.Lock()
	r.pid, r.pageSize = s.pid, minPS
	r.mu.Unlock()
	r.log.Debug("handshake", "pid", s.pid, "regions", len(s.regions), "peer_pidfd", h.pidfd >= 0)

	if s.fetch != nil {
		err := s.startInstall()
		if err == nil && !r.cfg.EarlyResume {
			err = s.installAll()
		}
		if errors.Is(err, errPeerGone) {
			notReady = fmt.Errorf("sandbox process %d exited during the working-set install", s.pid)
			return
		} else if errors.Is(err, errClosed) {
			notReady = errors.New("closed during the working-set install")
			s.killPeer() // it would hang on its next fault
			return
		} else if err != nil {
			r.err = fmt.Errorf("install working set: %w", err)
			ack(conn, ackError+r.err.Error()+"\n")
			s.killPeer()
			return
		}
	}
	ack(conn, ackOK)
	readySet = true
	r.setReady(nil)

	if err := s.loop(); err != nil {
		r.err = err
		r.log.Error("serving failed; killing the sandbox process", "pid", s.pid, "err", err)
	}
	s.killPeer()
}

func ack(conn *net.UnixConn, msg string) {
	conn.SetWriteDeadline(time.Now().Add(time.Second))
	conn.Write([]byte(msg)) // a Firecracker peer never reads it: ignore errors
}

func (r *Restore) isClosing() bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.closing
}

// startFetch starts reading the WS file in the background (before the
// peer connects); if it cannot even be opened, the restore serves lazily.
func (s *server) startFetch() {
	r := s.r
	s.t0 = time.Now()
	f, shared, err := r.mgr.fetch(r.cfg.WorkingSet, r.memSize)
	if err != nil {
		s.fallback(err)
		return
	}
	s.fetch = f
	r.mu.Lock()
	r.stats.SharedFetch = shared
	r.mu.Unlock()
}

// fallback records that the WS could not be used (or not wholly) and why.
func (s *server) fallback(err error) {
	r := s.r
	r.mu.Lock()
	r.stats.PrefetchFallback = true
	r.mu.Unlock()
	r.log.Warn("working set unusable: serving the rest lazily", "path", r.cfg.WorkingSet, "err", err)
	if r.obs != nil {
		r.obs.m.fallbacks.Inc()
	}
}

// installer is the state of a prefetch's install, driven by the serving
// goroutine: step installs whatever the fetcher has verified since the last
// step.
type installer struct {
	f        *fetcher
	progress int // eventfd subscribed to f
	m        *wsMeta
	next     int    // next chunk to install
	ri       int    // current run
	inRun    uint64 // bytes of run ri installed
	at       uint64 // data bytes installed
	t0       time.Time
	busy     time.Duration // in the install ioctls
	pages    int64
	runs     int64
	deferred []uffd.Msg // faults on WS pages not installed yet (EarlyResume)
	requeue  bool       // re-sorting deferred faults: not new waits
}

// startInstall begins installing once the handshake is done.
func (s *server) startInstall() error {
	efd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return fmt.Errorf("eventfd: %w", err)
	}
	s.inst = &installer{f: s.fetch, progress: efd, t0: time.Now()}
	s.fetch.subscribe(efd)
	return nil
}

// installAll installs the whole WS before the peer is told memory is
// ready: step on every progress notification.
func (s *server) installAll() error {
	fds := []unix.PollFd{{Fd: int32(s.inst.progress), Events: unix.POLLIN}, {Fd: int32(s.pidfd), Events: unix.POLLIN},
		{Fd: int32(s.r.stop), Events: unix.POLLIN}}
	for s.inst != nil {
		if err := s.step(); err != nil {
			return err
		}
		if s.inst == nil {
			return nil
		}
		if _, err := unix.Poll(fds, -1); err != nil && !errors.Is(err, unix.EINTR) {
			return fmt.Errorf("poll: %w", err)
		}
		if fds[1].Revents != 0 {
			return errPeerGone
		}
		if fds[2].Revents != 0 {
			return errClosed
		}
	}
	return nil
}

// errClosed: Close was called during the install.
var errClosed = errors.New("restore closed")

// step installs the chunks verified since the last step: one UFFDIO_COPY
// (DONTWAKE) per run or part of a run within a chunk, then one UFFDIO_WAKE
// per region (threads waiting on those pages retry). When every chunk is
// installed — or the fetch failed: a chunk that fails its checksum or a
// read error stops the install, the chunks installed before it were
// verified, the rest is served lazily from the memory file — it finishes
// the install (s.inst becomes nil).
func (s *server) step() error {
	in := s.inst
	var one [8]byte
	unix.Read(in.progress, one[:]) // reset the eventfd; nothing to read is fine
	m, verified, ferr := in.f.progress()
	if m == nil {
		if ferr != nil {
			return s.endInstall(ferr)
		}
		return nil
	}
	if in.m == nil {
		for _, reg := range s.regions {
			if m.pageSize != reg.PageSize {
				return s.endInstall(fmt.Errorf("working set page size %d differs from the region's %d", m.pageSize, reg.PageSize))
			}
		}
		if m.version != wsVersion {
			s.r.log.Info("working set file is version 1: verified only once wholly read, installed after that; record it again for streamed verification",
				"path", s.r.cfg.WorkingSet)
		}
		in.m = m
		for _, run := range m.runs { // mark the WS pages: their faults wait for their chunk
			for _, reg := range s.regions {
				lo, hi := max(run.Offset, reg.Offset), min(run.Offset+run.Length, reg.Offset+reg.Size)
				for p := (lo - reg.Offset) / reg.PageSize; lo < hi && p < (hi-reg.Offset)/reg.PageSize; p++ {
					reg.inWS.set(p)
				}
			}
		}
		// Faults that came before the run table was known: those outside
		// the WS are served now, the others keep waiting for their chunk.
		early := in.deferred
		in.deferred, in.requeue = nil, true
		for _, m := range early {
			if err := s.fault(m); err != nil {
				return err
			}
		}
		in.requeue = false
	}
	if in.next < verified {
		t := time.Now()
		data := in.f.data()
		for ; in.next < verified; in.next++ {
			_, hi := m.chunkRange(in.next)
			if hi < m.dataLen {
				hi -= hi % m.pageSize // a page split across chunks goes with the later one
			}
			for in.at < hi {
				run := m.runs[in.ri]
				n := min(run.Length-in.inRun, hi-in.at)
				got, err := s.installRange(run.Offset+in.inRun, n, uintptr(unsafe.Pointer(&data[m.dataOff+in.at])))
				in.pages += got
				if err != nil {
					return err
				}
				in.at += n
				if in.inRun += n; in.inRun == run.Length {
					in.ri, in.inRun = in.ri+1, 0
					in.runs++
				}
			}
		}
		if err := s.wakeAll(); err != nil {
			return err
		}
		in.busy += time.Since(t)
	}
	if in.next == m.chunks() {
		return s.endInstall(nil)
	}
	if ferr != nil {
		return s.endInstall(ferr)
	}
	return nil
}

func (s *server) wakeAll() error {
	for _, reg := range s.regions {
		if err := s.uffd.Wake(uintptr(reg.BaseHostVirtAddr), reg.Size); err != nil {
			if errors.Is(err, unix.ESRCH) || errors.Is(err, unix.ENOENT) {
				return errPeerGone
			}
			return err
		}
	}
	return nil
}

// endInstall ends the install (fetchErr: why it stopped early), records
// its stats, releases the WS and serves the faults that waited for pages
// never installed.
func (s *server) endInstall(fetchErr error) error {
	in := s.inst
	r := s.r
	s.inst = nil
	if fetchErr != nil {
		s.fallback(fetchErr)
		for _, reg := range s.regions {
			clear(reg.inWS) // from now on every missing page is served lazily
		}
	}
	fetched, direct := in.f.result(s.t0)
	d := time.Since(in.t0)
	r.mu.Lock()
	r.stats.FetchState, r.stats.InstallWS, r.stats.InstallBusy = fetched, d, in.busy
	r.stats.PrefetchWS = time.Since(s.t0)
	r.stats.RecPages, r.stats.RecRegions, r.stats.DirectRead = in.pages, in.runs, direct
	shared := r.stats.SharedFetch
	if !shared {
		r.stats.BytesRead += int64(in.f.size)
	}
	r.mu.Unlock()
	if r.obs != nil {
		if !shared {
			r.obs.bytesRead.Add(float64(in.f.size))
		}
		r.obs.m.stageTime.WithLabelValues("FetchState").Observe(fetched.Seconds())
		r.obs.m.stageTime.WithLabelValues("InstallWS").Observe(d.Seconds())
	}
	in.f.unsubscribe(in.progress)
	unix.Close(in.progress)
	r.mgr.releaseFetch(in.f)
	s.fetch = nil
	if err := s.wakeAll(); err != nil {
		return err
	}
	// Faults that waited for pages the install did not bring in (it
	// stopped early, or the guest dropped them meanwhile): serve them.
	for _, m := range in.deferred {
		if reg := s.region(m.Address); reg != nil && reg.present.get((m.Address-reg.BaseHostVirtAddr)/reg.PageSize) {
			continue // installed: the wake above let the thread go on
		}
		if err := s.fault(m); err != nil {
			return err
		}
	}
	return nil
}

// deferFault reports whether the fault m is on a WS page not installed yet
// while the install runs; then it is kept until the page's chunk is
// installed (its wake lets the thread retry) or the install ends.
func (s *server) deferFault(m uffd.Msg) bool {
	if s.inst == nil {
		return false
	}
	reg := s.region(m.Address)
	if reg == nil {
		return false
	}
	p := (m.Address - reg.BaseHostVirtAddr) / reg.PageSize
	if reg.present.get(p) || reg.removed.get(p) {
		return false
	}
	// Before the run table is read nobody knows whether the page is in
	// the WS: wait for it (step sorts these faults out).
	if s.inst.m != nil && !reg.inWS.get(p) {
		return false
	}
	s.inst.deferred = append(s.inst.deferred, m)
	if !s.inst.requeue {
		s.r.mu.Lock()
		s.r.stats.WSWaits++
		s.r.mu.Unlock()
	}
	return true
}

// installRange installs memory-file bytes [off, off+n), whose contents are
// at src, into every region that maps them (DONTWAKE), and returns the
// pages installed.
func (s *server) installRange(off, n uint64, src uintptr) (int64, error) {
	var pages int64
	for _, reg := range s.regions {
		lo, hi := max(off, reg.Offset), min(off+n, reg.Offset+reg.Size)
		if lo >= hi {
			continue
		}
		first := (lo - reg.Offset) / reg.PageSize
		last := (hi - reg.Offset) / reg.PageSize
		_, _, err := s.fill(reg, first, last, src+uintptr(lo-off), false, uffd.ModeDontWake, func(p, n uint64) {})
		if err != nil {
			return pages, err
		}
		pages += int64(last - first)
	}
	return pages, nil
}

// fill installs the pages [first, last) of reg that are not present: pages
// removed since the restore began (and, with holes, pages in holes of the
// memory file) as zero pages, the others copied from src, the address of
// page first's bytes (the following pages' bytes follow it), with one ioctl
// per contiguous stretch of the same kind. done is called for each range
// installed. It returns the number of pages copied and zeroed.
//
// Removal is sticky: once the guest dropped a page, its content is never
// the memory file's again (anonymous memory reads as zero after
// MADV_DONTNEED), so such a page is always served as a zero page.
func (s *server) fill(reg *region, first, last uint64, src uintptr, holes bool, mode uint64, done func(p, n uint64)) (nCopied, nZero uint64, err error) {
	ps := reg.PageSize
	zero := func(p uint64) bool { return reg.removed.get(p) || (holes && s.isHole(reg, p)) }
	for p := first; p < last; {
		if reg.present.get(p) {
			p++
			continue
		}
		z := zero(p)
		q := p + 1
		for q < last && !reg.present.get(q) && zero(q) == z {
			q++
		}
		dst := uintptr(reg.BaseHostVirtAddr + p*ps)
		var got uint64
		if z {
			got, err = s.uffd.ZeroPage(dst, (q-p)*ps, mode)
		} else {
			got, err = s.uffd.Copy(dst, src+uintptr((p-first)*ps), (q-p)*ps, mode)
		}
		k := got / ps
		for i := p; i < p+k; i++ {
			reg.present.set(i)
		}
		if z {
			nZero += k
		} else {
			nCopied += k
		}
		if k > 0 {
			done(p, k)
		}
		p += k
		switch {
		case err == nil:
		case errors.Is(err, unix.EEXIST):
			// Page p is already there (an earlier chunk, or the
			// prefetch while this fault was queued): skip it.
			reg.present.set(p)
		case errors.Is(err, unix.EAGAIN):
			// k > 0: a partial copy, continue. k == 0: the mapping is
			// changing (a remove event is pending): read the events,
			// then recompute from page p.
			if k == 0 {
				if err := s.drain(); err != nil {
					return nCopied, nZero, err
				}
			}
		case errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOENT):
			return nCopied, nZero, errPeerGone
		default:
			return nCopied, nZero, fmt.Errorf("install [%#x, +%#x): %w", dst, (q-p)*ps, err)
		}
	}
	return nCopied, nZero, nil
}

// drain reads pending events: removes are applied now, faults queued.
func (s *server) drain() error {
	for {
		n, err := s.uffd.Read(s.msgs)
		if err != nil {
			return err
		}
		if n == 0 {
			return nil
		}
		for _, m := range s.msgs[:n] {
			if m.Event == uffd.EventPagefault {
				s.pending = append(s.pending, m)
			} else {
				s.event(m)
			}
		}
	}
}

// loop serves events until the peer exits, Close is called or serving
// fails.
func (s *server) loop() error {
	fds := []unix.PollFd{
		{Fd: int32(s.r.stop), Events: unix.POLLIN},
		{Fd: int32(s.uffd.Int()), Events: unix.POLLIN},
		{Fd: int32(s.pidfd), Events: unix.POLLIN}, // -1 is ignored by poll
		{Fd: -1, Events: unix.POLLIN},             // an install in progress (EarlyResume)
	}
	for {
		fds[3].Fd = -1
		if s.inst != nil {
			if err := s.step(); err != nil {
				return s.faultErr(err)
			}
			if s.inst != nil {
				fds[3].Fd = int32(s.inst.progress)
			}
		}
		for len(s.pending) > 0 {
			m := s.pending[0]
			s.pending = s.pending[1:]
			if err := s.fault(m); err != nil {
				return s.faultErr(err)
			}
		}
		if _, err := unix.Poll(fds, -1); err != nil {
			if errors.Is(err, unix.EINTR) {
				continue
			}
			return fmt.Errorf("poll: %w", err)
		}
		if fds[0].Revents != 0 {
			return nil // Close
		}
		if ev := fds[1].Revents; ev&unix.POLLIN != 0 {
			n, err := s.uffd.Read(s.msgs)
			if err != nil {
				return err
			}
			// Removes first: a fault read together with a remove of
			// its page must see the page as removed (the madvise may
			// zap it any moment after its event was read).
			for _, m := range s.msgs[:n] {
				if m.Event != uffd.EventPagefault {
					s.event(m)
				}
			}
			for _, m := range s.msgs[:n] {
				if m.Event == uffd.EventPagefault {
					if err := s.fault(m); err != nil {
						return s.faultErr(err)
					}
				}
			}
		} else if ev&(unix.POLLERR|unix.POLLHUP|unix.POLLNVAL) != 0 {
			return fmt.Errorf("userfaultfd poll events %#x", ev)
		}
		if fds[2].Revents != 0 {
			s.r.log.Debug("peer exited", "pid", s.pid)
			return nil
		}
	}
}

func (s *server) faultErr(err error) error {
	if errors.Is(err, errPeerGone) {
		return nil
	}
	return err
}

func (s *server) region(addr uint64) *region {
	for _, reg := range s.regions {
		if addr >= reg.BaseHostVirtAddr && addr < reg.end() {
			return reg
		}
	}
	return nil
}

// event applies a non-fault event.
func (s *server) event(m uffd.Msg) {
	switch m.Event {
	case uffd.EventRemove, uffd.EventUnmap:
		for _, reg := range s.regions {
			lo, hi := max(m.Start, reg.BaseHostVirtAddr), min(m.End, reg.end())
			if lo >= hi {
				continue
			}
			// Pages partly removed are treated as removed: the kernel
			// zaps whole pages.
			for p := (lo - reg.BaseHostVirtAddr) / reg.PageSize; p*reg.PageSize+reg.BaseHostVirtAddr < hi; p++ {
				reg.removed.set(p)
				reg.present.clear(p)
			}
		}
		s.r.mu.Lock()
		s.r.stats.Removes++
		s.r.mu.Unlock()
	default:
		s.r.log.Debug("ignoring userfaultfd event", "event", m.Event)
	}
}

// fault serves one page fault: the aligned chunk around the faulting page,
// pages in holes or removed as zero pages, the rest copied from the memory
// file.
func (s *server) fault(m uffd.Msg) error {
	if s.deferFault(m) {
		return nil
	}
	t0 := time.Now()
	reg := s.region(m.Address)
	if reg == nil {
		s.r.log.Warn("fault outside every region", "addr", fmt.Sprintf("%#x", m.Address))
		return nil
	}
	ps := reg.PageSize
	page := (m.Address - reg.BaseHostVirtAddr) / ps
	cs := s.r.chunk
	first, last := page/cs*cs, min(page/cs*cs+cs, reg.pages)
	wasPresent := reg.present.get(page)

	var rec []span
	recording := s.r.cfg.Mode == ModeRecord
	src := uintptr(unsafe.Pointer(&s.r.mem[reg.Offset+first*ps]))
	copied, zeros, err := s.fill(reg, first, last, src, true, 0, func(p, n uint64) {
		if !recording {
			return
		}
		for i := p; i < p+n; i++ {
			// Holes are memory-file content (zeros) and belong to the
			// working set; pages zeroed because the guest removed them
			// do not.
			if !reg.recorded.get(i) && !reg.removed.get(i) {
				reg.recorded.set(i)
				rec = append(rec, span{off: reg.Offset + i*ps, len: ps})
			}
		}
	})
	if err != nil {
		return err
	}
	dup := false
	if wasPresent {
		// Either installed before this event was handled — then make sure
		// the thread runs — or dropped by a peer that did not ask for
		// remove events: then it must read as zero, and without this the
		// thread would fault forever.
		addr := uintptr(reg.BaseHostVirtAddr + page*ps)
		got, err := s.uffd.ZeroPage(addr, ps, 0)
		switch {
		case got == ps:
			reg.removed.set(page)
			zeros++
		case errors.Is(err, unix.ESRCH), errors.Is(err, unix.ENOENT):
			return errPeerGone
		default: // EEXIST: really there; EAGAIN: a remove is pending, the thread will fault again
			dup = true
			if err := s.uffd.Wake(addr, ps); err != nil {
				return err
			}
		}
	}
	// An event for a page already installed (dup) is not a fault of its
	// own: the kernel queues one event per faulting thread and per wait,
	// so a second thread faulting on the page, or a thread whose wait a
	// signal interrupted and that faulted again, leaves one more event
	// for the page. It is counted apart; whatever its chunk installed
	// (neighbours removed meanwhile) still counts as pages served.
	unique := copied + zeros
	d := time.Since(t0)
	r := s.r
	r.mu.Lock()
	if dup {
		r.stats.DupFaults++
	} else {
		r.stats.Faults++
		if len(r.stats.FaultLatency) < maxLatencySamples {
			r.stats.FaultLatency = append(r.stats.FaultLatency, d)
		}
	}
	r.stats.Unique += int64(unique)
	r.stats.ZeroPages += int64(zeros)
	r.stats.BytesRead += int64(copied * ps)
	if unique > 0 {
		r.stats.ServeUnique += d
	}
	if r.recording && len(rec) > 0 {
		r.spans = append(r.spans, rec...)
	}
	r.mu.Unlock()
	if o := r.obs; o != nil {
		if dup {
			o.dupFaults.Inc()
		} else {
			o.faults.Inc()
			o.faultTime.Observe(d.Seconds())
		}
		o.unique.Add(float64(unique))
		o.bytesRead.Add(float64(copied * ps))
	}
	return nil
}

// isHole: page p of reg lies wholly in holes of the memory file.
func (s *server) isHole(reg *region, p uint64) bool {
	off := reg.Offset + p*reg.PageSize
	for o := off; o < off+reg.PageSize; o += 4096 {
		if !s.r.holes.get(o / 4096) {
			return false
		}
	}
	return true
}

// killPeer sends SIGKILL to the peer if it is still running: without its
// page server it would hang on its next fault. Only the pidfd's process can
// be hit, never a recycled pid.
func (s *server) killPeer() {
	if s.pidfd < 0 || s.pid == os.Getpid() {
		return // never this process (a peer in our own process is a caller bug)
	}
	fds := []unix.PollFd{{Fd: int32(s.pidfd), Events: unix.POLLIN}}
	if n, _ := unix.Poll(fds, 0); n > 0 {
		return // already exited
	}
	if err := unix.PidfdSendSignal(s.pidfd, unix.SIGKILL, nil, 0); err != nil && !errors.Is(err, unix.ESRCH) {
		s.r.log.Warn("kill sandbox process", "pid", s.pid, "err", err)
		return
	}
	s.r.log.Warn("killed sandbox process: its memory is no longer served", "pid", s.pid)
}
