package memory

import (
	"bufio"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"sync"

	"golang.org/x/sys/unix"
)

// Working-set (WS) file layout, little-endian; see doc.go.
const (
	wsMagic      = "VHIVEWS\x00"
	wsVersion    = 1
	wsHeaderSize = 64
	wsRunSize    = 16
	wsAlign      = 4096 // data offset and file length alignment (O_DIRECT)
	wsCRCOffset  = 48
)

var crcTable = crc32.MakeTable(crc32.Castagnoli)

// ErrBadWorkingSet classifies a WS file that is corrupt, truncated or does
// not fit the memory file.
var ErrBadWorkingSet = errors.New("bad working-set file")

// Run is one contiguous range of the memory file held in a WS file.
type Run struct {
	Offset uint64 // in the memory file
	Length uint64
}

// WorkingSet is a parsed WS file. Data holds the runs' bytes concatenated
// in run order and aliases the buffer it was parsed from.
type WorkingSet struct {
	PageSize uint64
	MemSize  uint64 // size of the memory file it was recorded against
	Runs     []Run
	Data     []byte
}

// Pages returns the number of pageSize pages in the set.
func (w *WorkingSet) Pages() int64 { return int64(len(w.Data)) / int64(w.PageSize) }

// ParseWorkingSet validates and decodes a whole WS file. It checks the
// magic, version, page size, run table bounds, run order and alignment,
// that every run lies within MemSize, that the run lengths add up to the
// data length, and the CRC-32C over the file.
func ParseWorkingSet(b []byte) (*WorkingSet, error) {
	if len(b) < wsHeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrBadWorkingSet, len(b), wsHeaderSize)
	}
	if string(b[:8]) != wsMagic {
		return nil, fmt.Errorf("%w: bad magic %q", ErrBadWorkingSet, b[:8])
	}
	le := binary.LittleEndian
	if v := le.Uint32(b[8:]); v != wsVersion {
		return nil, fmt.Errorf("%w: version %d (want %d)", ErrBadWorkingSet, v, wsVersion)
	}
	ws := &WorkingSet{PageSize: uint64(le.Uint32(b[12:])), MemSize: le.Uint64(b[24:])}
	nRuns, dataOff, dataLen := le.Uint64(b[16:]), le.Uint64(b[32:]), le.Uint64(b[40:])
	ps := ws.PageSize
	if ps < 4096 || ps&(ps-1) != 0 {
		return nil, fmt.Errorf("%w: page size %d", ErrBadWorkingSet, ps)
	}
	size := uint64(len(b))
	if nRuns > (size-wsHeaderSize)/wsRunSize {
		return nil, fmt.Errorf("%w: %d runs do not fit in %d bytes", ErrBadWorkingSet, nRuns, size)
	}
	tableEnd := wsHeaderSize + nRuns*wsRunSize
	if dataOff < tableEnd || dataOff > size || dataLen > size-dataOff {
		return nil, fmt.Errorf("%w: data [%d, +%d) outside file of %d bytes (table ends at %d): truncated?", ErrBadWorkingSet, dataOff, dataLen, size, tableEnd)
	}
	ws.Runs = make([]Run, nRuns)
	var total, prevEnd uint64
	for i := range ws.Runs {
		o := wsHeaderSize + uint64(i)*wsRunSize
		r := Run{Offset: le.Uint64(b[o:]), Length: le.Uint64(b[o+8:])}
		switch {
		case r.Length == 0 || r.Length%ps != 0 || r.Offset%ps != 0:
			return nil, fmt.Errorf("%w: run %d [%#x, +%#x) empty or not page aligned", ErrBadWorkingSet, i, r.Offset, r.Length)
		case i > 0 && r.Offset < prevEnd:
			return nil, fmt.Errorf("%w: run %d at %#x overlaps or precedes the previous run", ErrBadWorkingSet, i, r.Offset)
		case r.Offset+r.Length < r.Offset || r.Offset+r.Length > ws.MemSize:
			return nil, fmt.Errorf("%w: run %d [%#x, +%#x) beyond the memory size %d", ErrBadWorkingSet, i, r.Offset, r.Length, ws.MemSize)
		}
		prevEnd = r.Offset + r.Length
		total += r.Length
		if total > dataLen {
			return nil, fmt.Errorf("%w: runs exceed the data length %d", ErrBadWorkingSet, dataLen)
		}
		ws.Runs[i] = r
	}
	if total != dataLen {
		return nil, fmt.Errorf("%w: runs hold %d bytes, data length is %d", ErrBadWorkingSet, total, dataLen)
	}
	if want, got := le.Uint32(b[wsCRCOffset:]), wsChecksum(b[:dataOff+dataLen]); want != got {
		return nil, fmt.Errorf("%w: checksum %#x, header says %#x", ErrBadWorkingSet, got, want)
	}
	ws.Data = b[dataOff : dataOff+dataLen]
	return ws, nil
}

// wsChecksum is CRC-32C over b with the 4 checksum bytes taken as zero.
func wsChecksum(b []byte) uint32 {
	var zero [4]byte
	c := crc32.Update(0, crcTable, b[:wsCRCOffset])
	c = crc32.Update(c, crcTable, zero[:])
	return crc32.Update(c, crcTable, b[wsCRCOffset+4:])
}

// span is a recorded range of the memory file (one page or one huge page).
type span struct{ off, len uint64 }

// mergeSpans sorts spans by offset and merges touching or overlapping ones.
func mergeSpans(spans []span) []Run {
	s := slices.Clone(spans)
	slices.SortFunc(s, func(a, b span) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	var runs []Run
	for _, x := range s {
		if n := len(runs); n > 0 && x.off <= runs[n-1].Offset+runs[n-1].Length {
			if end := x.off + x.len; end > runs[n-1].Offset+runs[n-1].Length {
				runs[n-1].Length = end - runs[n-1].Offset
			}
			continue
		}
		runs = append(runs, Run{Offset: x.off, Length: x.len})
	}
	return runs
}

// EncodeWorkingSet builds a WS file image for runs (sorted, merged, page
// aligned) whose bytes are data (concatenated in run order).
func EncodeWorkingSet(pageSize, memSize uint64, runs []Run, data []byte) []byte {
	le := binary.LittleEndian
	dataOff := alignUp(wsHeaderSize+uint64(len(runs))*wsRunSize, wsAlign)
	end := dataOff + uint64(len(data))
	b := make([]byte, alignUp(end, wsAlign))
	copy(b, wsMagic)
	le.PutUint32(b[8:], wsVersion)
	le.PutUint32(b[12:], uint32(pageSize))
	le.PutUint64(b[16:], uint64(len(runs)))
	le.PutUint64(b[24:], memSize)
	le.PutUint64(b[32:], dataOff)
	le.PutUint64(b[40:], uint64(len(data)))
	for i, r := range runs {
		o := wsHeaderSize + i*wsRunSize
		le.PutUint64(b[o:], r.Offset)
		le.PutUint64(b[o+8:], r.Length)
	}
	copy(b[dataOff:], data)
	le.PutUint32(b[wsCRCOffset:], wsChecksum(b[:end]))
	return b
}

func alignUp(n, a uint64) uint64 { return (n + a - 1) / a * a }

// writeWorkingSet writes the WS file for the recorded spans to path: it
// reads the runs' bytes from mem, then writes a temporary file next to path,
// fsyncs it, renames it over path and fsyncs the directory. It returns the
// runs written.
func writeWorkingSet(path string, mem *os.File, pageSize, memSize uint64, spans []span) ([]Run, error) {
	runs := mergeSpans(spans)
	var total uint64
	for _, r := range runs {
		total += r.Length
	}
	data := make([]byte, total)
	var at uint64
	for _, r := range runs {
		if _, err := mem.ReadAt(data[at:at+r.Length], int64(r.Offset)); err != nil {
			return nil, fmt.Errorf("read run [%#x, +%#x) of %s: %w", r.Offset, r.Length, mem.Name(), err)
		}
		at += r.Length
	}
	img := EncodeWorkingSet(pageSize, memSize, runs, data)
	if err := writeFileAtomic(path, func(w io.Writer) error { _, err := w.Write(img); return err }); err != nil {
		return nil, fmt.Errorf("write working set: %w", err)
	}
	return runs, nil
}

// writeTrace writes the fault-order trace CSV: "seq,offset,length".
func writeTrace(path string, spans []span) error {
	err := writeFileAtomic(path, func(w io.Writer) error {
		bw := bufio.NewWriter(w)
		bw.WriteString("seq,offset,length\n")
		var line []byte
		for i, s := range spans {
			line = strconv.AppendInt(line[:0], int64(i), 10)
			line = append(line, ',')
			line = strconv.AppendUint(line, s.off, 10)
			line = append(line, ',')
			line = strconv.AppendUint(line, s.len, 10)
			line = append(line, '\n')
			bw.Write(line)
		}
		return bw.Flush()
	})
	if err != nil {
		return fmt.Errorf("write fault trace: %w", err)
	}
	return nil
}

func writeFileAtomic(path string, fill func(io.Writer) error) (retErr error) {
	dir := filepath.Dir(path)
	f, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if retErr != nil {
			f.Close()
			os.Remove(f.Name())
		}
	}()
	if err := fill(f); err != nil {
		return fmt.Errorf("write %s: %w", f.Name(), err)
	}
	if err := f.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", f.Name(), err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", f.Name(), err)
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync %s: %w", dir, err)
	}
	return nil
}

// wsBuffer is a WS file read into page-aligned anonymous memory.
type wsBuffer struct {
	b      []byte // file contents
	mapped []byte // the whole buffer, given back to pool on release
	direct bool   // read with O_DIRECT
	pool   *bufPool
}

func (w *wsBuffer) release() {
	if w.mapped != nil {
		w.pool.put(w.mapped)
		w.mapped = nil
	}
}

// bufPool keeps page-aligned, already populated buffers for WS files, so
// that a prefetch does not pay for faulting in a fresh buffer (≈12 µs per
// page in a nested VM) on every restore. It holds at most maxIdle bytes.
type bufPool struct {
	mu      sync.Mutex
	free    [][]byte
	idle    int
	maxIdle int
}

func (p *bufPool) get(n int) ([]byte, error) {
	p.mu.Lock()
	best := -1
	for i, b := range p.free {
		if len(b) >= n && (best < 0 || len(b) < len(p.free[best])) {
			best = i
		}
	}
	if best >= 0 {
		b := p.free[best]
		p.free = slices.Delete(p.free, best, best+1)
		p.idle -= len(b)
		p.mu.Unlock()
		return b, nil
	}
	p.mu.Unlock()
	return unix.Mmap(-1, 0, n, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_POPULATE)
}

func (p *bufPool) put(b []byte) {
	p.mu.Lock()
	if p.idle+len(b) <= p.maxIdle {
		p.free = append(p.free, b)
		p.idle += len(b)
		b = nil
	}
	p.mu.Unlock()
	if b != nil {
		unix.Munmap(b)
	}
}

// close unmaps the idle buffers.
func (p *bufPool) close() {
	p.mu.Lock()
	free := p.free
	p.free, p.idle = nil, 0
	p.mu.Unlock()
	for _, b := range free {
		unix.Munmap(b)
	}
}

// readWorkingSetFile reads the whole file at path in one read into a
// page-aligned buffer from pool. If the file is wholly in the page cache
// (cachestat(2)), it is read buffered. Otherwise it reads with O_DIRECT, bypassing the page cache as REAP does
// (a cached copy would only duplicate the installed pages), or buffered
// where the filesystem refuses O_DIRECT (tmpfs).
func readWorkingSetFile(path string, pool *bufPool) (*wsBuffer, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("open working set %s: %w", path, err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return nil, fmt.Errorf("stat working set %s: %w", path, err)
	}
	if st.Size < wsHeaderSize {
		return nil, fmt.Errorf("%w: %s has %d bytes", ErrBadWorkingSet, path, st.Size)
	}
	size := int(st.Size)
	n := int(alignUp(uint64(size), wsAlign))
	m, err := pool.get(n)
	if err != nil {
		return nil, fmt.Errorf("allocate %d bytes for working set %s: %w", n, path, err)
	}
	w := &wsBuffer{mapped: m, pool: pool}
	var got int
	if cached(fd, size) {
		got, err = readFull(fd, m[:n])
	} else {
		got = -1
		if dfd, derr := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_DIRECT, 0); derr == nil {
			got, err = readFull(dfd, m[:n])
			unix.Close(dfd)
			w.direct = err == nil
		}
		if got < 0 || errors.Is(err, unix.EINVAL) {
			got, err = readFull(fd, m[:n])
		}
	}
	if err != nil {
		w.release()
		return nil, fmt.Errorf("read working set %s: %w", path, err)
	}
	if got != size {
		w.release()
		return nil, fmt.Errorf("%w: %s: read %d of %d bytes", ErrBadWorkingSet, path, got, size)
	}
	w.b = m[:size]
	return w, nil
}

// cached reports whether the first size bytes of fd are all in the page
// cache; false if the kernel cannot tell (cachestat needs Linux 6.5).
func cached(fd, size int) bool {
	var st unix.Cachestat_t
	if err := unix.Cachestat(uint(fd), &unix.CachestatRange{Len: uint64(size)}, &st, 0); err != nil {
		return false
	}
	return st.Cache*uint64(os.Getpagesize()) >= uint64(size)
}

// readFull reads from fd at offset 0 until buf is full or EOF; for a
// regular file the first pread normally returns everything.
func readFull(fd int, buf []byte) (int, error) {
	var got int
	for got < len(buf) {
		n, err := unix.Pread(fd, buf[got:], int64(got))
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if err != nil {
			return got, err
		}
		if n == 0 {
			break
		}
		got += n
	}
	return got, nil
}
