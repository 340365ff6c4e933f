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

	"vhive.dev/vhive/internal/iobuf"
)

// Working-set (WS) file layout, little-endian; see doc.go.
const (
	wsMagic      = "VHIVEWS\x00"
	wsVersion1   = 1 // one CRC-32C over the whole file: verified after the whole read
	wsVersion    = 2 // per-chunk CRC-32C: verified chunk by chunk as it is read
	wsHeaderSize = 64
	wsRunSize    = 16
	wsAlign      = 4096 // data offset and file length alignment (O_DIRECT)
	wsCRCOffset  = 48
	// wsChunk is the data chunk size of version 2 files: each chunk of the
	// data has its own CRC-32C, so that a prefetch can install a chunk as
	// soon as it has been read and verified.
	wsChunk = 1 << 20
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
	// Version of the file format (1 or 2).
	Version int
}

// Pages returns the number of pageSize pages in the set.
func (w *WorkingSet) Pages() int64 { return int64(len(w.Data)) / int64(w.PageSize) }

// wsMeta is the part of a WS file before its data: header, run table and
// (version 2) the chunk checksums.
type wsMeta struct {
	version          int
	pageSize         uint64
	memSize          uint64
	runs             []Run
	dataOff, dataLen uint64
	chunk            uint64   // version 2: data chunk size; version 1: dataLen
	crcs             []uint32 // version 2: CRC-32C of each data chunk
	fileCRC          uint32   // version 1: CRC-32C of [0, dataOff+dataLen)
}

// metaLen returns how many leading bytes of the file parseMeta needs (the
// data offset), from the header alone (b holds at least wsHeaderSize bytes), or an error if
// the header is malformed. size is the file's size.
func metaLen(b []byte, size uint64) (uint64, error) {
	if len(b) < wsHeaderSize || size < wsHeaderSize {
		return 0, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", ErrBadWorkingSet, size, wsHeaderSize)
	}
	if string(b[:8]) != wsMagic {
		return 0, fmt.Errorf("%w: bad magic %q", ErrBadWorkingSet, b[:8])
	}
	le := binary.LittleEndian
	switch v := le.Uint32(b[8:]); v {
	case wsVersion1, wsVersion:
	default:
		return 0, fmt.Errorf("%w: version %d (this vhive reads versions %d and %d)", ErrBadWorkingSet, v, wsVersion1, wsVersion)
	}
	dataOff := le.Uint64(b[32:])
	if dataOff < wsHeaderSize || dataOff > size {
		return 0, fmt.Errorf("%w: data offset %d outside file of %d bytes: truncated?", ErrBadWorkingSet, dataOff, size)
	}
	return dataOff, nil
}

// parseMeta validates and decodes the header and tables (b holds at least
// metaLen bytes; size is the whole file's size). For version 2 it checks
// the metadata checksum; data chunks are checked by checkChunk.
func parseMeta(b []byte, size uint64) (*wsMeta, error) {
	if _, err := metaLen(b, size); err != nil {
		return nil, err
	}
	le := binary.LittleEndian
	m := &wsMeta{version: int(le.Uint32(b[8:])), pageSize: uint64(le.Uint32(b[12:])), memSize: le.Uint64(b[24:])}
	nRuns, dataOff, dataLen := le.Uint64(b[16:]), le.Uint64(b[32:]), le.Uint64(b[40:])
	ps := m.pageSize
	if m.version == wsVersion {
		// Everything below depends on the metadata: check it first.
		if dataOff > uint64(len(b)) {
			return nil, fmt.Errorf("%w: data offset %d beyond the %d bytes given", ErrBadWorkingSet, dataOff, len(b))
		}
		if want, got := le.Uint32(b[wsCRCOffset:]), wsChecksum(b[:dataOff]); want != got {
			return nil, fmt.Errorf("%w: header and tables checksum %#x, header says %#x", ErrBadWorkingSet, got, want)
		}
	}
	if ps < 4096 || ps&(ps-1) != 0 || ps > 1<<30 {
		return nil, fmt.Errorf("%w: page size %d", ErrBadWorkingSet, ps)
	}
	if nRuns > (size-wsHeaderSize)/wsRunSize {
		return nil, fmt.Errorf("%w: %d runs do not fit in %d bytes", ErrBadWorkingSet, nRuns, size)
	}
	tableEnd := wsHeaderSize + nRuns*wsRunSize
	if m.version == wsVersion {
		m.chunk = uint64(le.Uint32(b[52:]))
		nChunks := uint64(le.Uint32(b[56:]))
		if m.chunk == 0 || m.chunk%4096 != 0 {
			return nil, fmt.Errorf("%w: chunk size %d is not a positive multiple of 4096", ErrBadWorkingSet, m.chunk)
		}
		if want := (dataLen + m.chunk - 1) / m.chunk; nChunks != want {
			return nil, fmt.Errorf("%w: %d chunk checksums for %d data bytes in %d-byte chunks (want %d)", ErrBadWorkingSet, nChunks, dataLen, m.chunk, want)
		}
		if nChunks > (size-tableEnd)/4 {
			return nil, fmt.Errorf("%w: %d chunk checksums do not fit in %d bytes", ErrBadWorkingSet, nChunks, size)
		}
		tableEnd += 4 * nChunks
		if dataOff < tableEnd {
			return nil, fmt.Errorf("%w: data offset %d inside the tables (end %d)", ErrBadWorkingSet, dataOff, tableEnd)
		}
		m.crcs = make([]uint32, nChunks)
		for i := range m.crcs {
			m.crcs[i] = le.Uint32(b[wsHeaderSize+nRuns*wsRunSize+uint64(i)*4:])
		}
	} else {
		m.chunk = dataLen
		m.fileCRC = le.Uint32(b[wsCRCOffset:])
	}
	if dataOff < tableEnd || dataOff > size || dataLen > size-dataOff {
		return nil, fmt.Errorf("%w: data [%d, +%d) outside file of %d bytes (table ends at %d): truncated?", ErrBadWorkingSet, dataOff, dataLen, size, tableEnd)
	}
	m.dataOff, m.dataLen = dataOff, dataLen
	m.runs = make([]Run, nRuns)
	var total, prevEnd uint64
	for i := range m.runs {
		o := wsHeaderSize + uint64(i)*wsRunSize
		r := Run{Offset: le.Uint64(b[o:]), Length: le.Uint64(b[o+8:])}
		switch {
		case r.Length == 0 || r.Length%ps != 0 || r.Offset%ps != 0:
			return nil, fmt.Errorf("%w: run %d [%#x, +%#x) empty or not page aligned", ErrBadWorkingSet, i, r.Offset, r.Length)
		case i > 0 && r.Offset < prevEnd:
			return nil, fmt.Errorf("%w: run %d at %#x overlaps or precedes the previous run", ErrBadWorkingSet, i, r.Offset)
		case r.Offset+r.Length < r.Offset || r.Offset+r.Length > m.memSize:
			return nil, fmt.Errorf("%w: run %d [%#x, +%#x) beyond the memory size %d", ErrBadWorkingSet, i, r.Offset, r.Length, m.memSize)
		}
		prevEnd = r.Offset + r.Length
		total += r.Length
		if total > dataLen {
			return nil, fmt.Errorf("%w: runs exceed the data length %d", ErrBadWorkingSet, dataLen)
		}
		m.runs[i] = r
	}
	if total != dataLen {
		return nil, fmt.Errorf("%w: runs hold %d bytes, data length is %d", ErrBadWorkingSet, total, dataLen)
	}
	return m, nil
}

// chunks returns the number of data chunks, each verified on its own.
func (m *wsMeta) chunks() int {
	if m.version == wsVersion {
		return len(m.crcs)
	}
	return 1
}

// chunkRange returns chunk k's range in the data: [lo, hi).
func (m *wsMeta) chunkRange(k int) (lo, hi uint64) {
	lo = uint64(k) * m.chunk
	return lo, min(lo+m.chunk, m.dataLen)
}

// checkChunk verifies chunk k; file holds the file's first
// dataOff + chunk k's end bytes (version 1: the whole covered range).
func (m *wsMeta) checkChunk(file []byte, k int) error {
	if m.version != wsVersion {
		if want, got := m.fileCRC, wsChecksum(file[:m.dataOff+m.dataLen]); want != got {
			return fmt.Errorf("%w: checksum %#x, header says %#x", ErrBadWorkingSet, got, want)
		}
		return nil
	}
	lo, hi := m.chunkRange(k)
	if got := crc32.Checksum(file[m.dataOff+lo:m.dataOff+hi], crcTable); got != m.crcs[k] {
		return fmt.Errorf("%w: chunk %d (data bytes [%d, %d)) checksum %#x, table says %#x", ErrBadWorkingSet, k, lo, hi, got, m.crcs[k])
	}
	return nil
}

// ParseWorkingSet validates and decodes a whole WS file (version 1 or 2).
// It checks the magic, version, page size, run table bounds, run order and
// alignment, that every run lies within MemSize, that the run lengths add
// up to the data length, and the CRC-32C checksums (version 2: of the
// metadata and of every data chunk; version 1: of the whole file).
func ParseWorkingSet(b []byte) (*WorkingSet, error) {
	size := uint64(len(b))
	n, err := metaLen(b, size)
	if err != nil {
		return nil, err
	}
	if n > size {
		return nil, fmt.Errorf("%w: metadata of %d bytes, file has %d: truncated?", ErrBadWorkingSet, n, size)
	}
	m, err := parseMeta(b, size)
	if err != nil {
		return nil, err
	}
	for k := range m.chunks() {
		if err := m.checkChunk(b, k); err != nil {
			return nil, err
		}
	}
	return &WorkingSet{PageSize: m.pageSize, MemSize: m.memSize, Runs: m.runs, Data: b[m.dataOff : m.dataOff+m.dataLen], Version: m.version}, nil
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

// EncodeWorkingSet builds a version 2 WS file image for runs (sorted,
// merged, page aligned) whose bytes are data (concatenated in run order).
func EncodeWorkingSet(pageSize, memSize uint64, runs []Run, data []byte) []byte {
	return encodeWorkingSet(pageSize, memSize, runs, data, wsChunk)
}

func encodeWorkingSet(pageSize, memSize uint64, runs []Run, data []byte, chunk uint64) []byte {
	le := binary.LittleEndian
	nChunks := (uint64(len(data)) + chunk - 1) / chunk
	crcAt := wsHeaderSize + uint64(len(runs))*wsRunSize
	dataOff := alignUp(crcAt+4*nChunks, wsAlign)
	end := dataOff + uint64(len(data))
	b := make([]byte, alignUp(end, wsAlign))
	copy(b, wsMagic)
	le.PutUint32(b[8:], wsVersion)
	le.PutUint32(b[12:], uint32(pageSize))
	le.PutUint64(b[16:], uint64(len(runs)))
	le.PutUint64(b[24:], memSize)
	le.PutUint64(b[32:], dataOff)
	le.PutUint64(b[40:], uint64(len(data)))
	le.PutUint32(b[52:], uint32(chunk))
	le.PutUint32(b[56:], uint32(nChunks))
	for i, r := range runs {
		o := wsHeaderSize + i*wsRunSize
		le.PutUint64(b[o:], r.Offset)
		le.PutUint64(b[o+8:], r.Length)
	}
	for k := range nChunks {
		lo := k * chunk
		hi := min(lo+chunk, uint64(len(data)))
		le.PutUint32(b[crcAt+4*k:], crc32.Checksum(data[lo:hi], crcTable))
	}
	copy(b[dataOff:], data)
	le.PutUint32(b[wsCRCOffset:], wsChecksum(b[:dataOff]))
	return b
}

func alignUp(n, a uint64) uint64 { return (n + a - 1) / a * a }

// writeWorkingSet writes the WS file for the recorded spans to path: it
// reads the runs' bytes from mem, then writes a temporary file next to path,
// fsyncs it, renames it over path and fsyncs the directory. It returns the
// runs written.
func writeWorkingSet(path string, mem *os.File, pageSize, memSize uint64, spans []span) ([]Run, int, error) {
	runs := mergeSpans(spans)
	var total uint64
	for _, r := range runs {
		total += r.Length
	}
	data := make([]byte, total)
	var at uint64
	for _, r := range runs {
		if _, err := mem.ReadAt(data[at:at+r.Length], int64(r.Offset)); err != nil {
			return nil, 0, fmt.Errorf("read run [%#x, +%#x) of %s: %w", r.Offset, r.Length, mem.Name(), err)
		}
		at += r.Length
	}
	zeros := 0
	for p := 0; p+int(pageSize) <= len(data); p += int(pageSize) {
		if allZero(data[p : p+int(pageSize)]) {
			zeros++
		}
	}
	img := EncodeWorkingSet(pageSize, memSize, runs, data)
	if err := writeFileAtomic(path, func(w io.Writer) error { _, err := w.Write(img); return err }); err != nil {
		return nil, 0, fmt.Errorf("write working set: %w", err)
	}
	return runs, zeros, nil
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
	pool   *bufPool
}

func (w *wsBuffer) release() {
	if w.mapped != nil {
		w.pool.put(w.mapped)
		w.mapped = nil
	}
}

// bufPool keeps already populated, huge-page backed buffers for WS files
// (iobuf), so that a prefetch neither pays for faulting in a fresh buffer
// (≈12 µs per page in a nested VM) on every restore nor reads into 4 KiB
// pages (5× slower O_DIRECT here). It holds at most maxIdle bytes.
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
		if cap(b) >= n && (best < 0 || cap(b) < cap(p.free[best])) {
			best = i
		}
	}
	if best >= 0 {
		b := p.free[best]
		p.free = slices.Delete(p.free, best, best+1)
		p.idle -= cap(b)
		p.mu.Unlock()
		return b[:n], nil
	}
	p.mu.Unlock()
	return iobuf.Alloc(n)
}

func (p *bufPool) put(b []byte) {
	p.mu.Lock()
	if p.idle+cap(b) <= p.maxIdle {
		p.free = append(p.free, b)
		p.idle += cap(b)
		b = nil
	}
	p.mu.Unlock()
	if b != nil {
		iobuf.Free(b)
	}
}

// close unmaps the idle buffers.
func (p *bufPool) close() {
	p.mu.Lock()
	free := p.free
	p.free, p.idle = nil, 0
	p.mu.Unlock()
	for _, b := range free {
		iobuf.Free(b)
	}
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

func allZero(b []byte) bool {
	for _, x := range b {
		if x != 0 {
			return false
		}
	}
	return true
}
