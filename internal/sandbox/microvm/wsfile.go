package microvm

import (
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"os"
	"path/filepath"
)

// Working-set (WS) file of a microVM snapshot: the REAP record phase's list
// of the memory file's pages the guest touched, as runs. Unlike the wasm
// memory manager's WS file (internal/memory), it holds no page contents:
// the snapshot's memory file stays the only source of guest memory, and a
// prefetch only reads the runs into the host page cache. A WS file that is
// wrong can therefore cost time, never correctness.
//
// Layout (version 1, little-endian):
//
//	offset size field
//	0      8    magic "VHMVMWS\x00"
//	8      4    version = 1
//	12     4    page size (4096)
//	16     8    size of the memory file it was recorded against
//	24     8    number of runs n
//	32     4    reserved, zero
//	36     4    CRC-32C (Castagnoli) of the whole file with this field zero
//	40     16n  runs: n × {offset u64, length u64}, page aligned, sorted,
//	            non-overlapping, non-empty, within the memory size
//
// The file is exactly 40 + 16n bytes.
const (
	wsfMagic      = "VHMVMWS\x00"
	wsfVersion    = 1
	wsfHeaderSize = 40
	wsfRunSize    = 16
	wsfCRCOffset  = 36
	wsfPage       = 4096
	// wsfMaxRuns bounds the run table (a 1 GiB guest has 262144 pages).
	wsfMaxRuns = 1 << 22
)

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// errBadWS classifies a WS file that is corrupt, truncated, or does not fit
// the snapshot's memory file.
var errBadWS = errors.New("bad working-set file")

// wsRun is one contiguous range of the memory file.
type wsRun struct {
	Off, Len uint64
}

// wsFile is a parsed WS file.
type wsFile struct {
	MemSize uint64
	Runs    []wsRun
}

// Bytes returns the sum of the run lengths.
func (w *wsFile) Bytes() uint64 {
	var n uint64
	for _, r := range w.Runs {
		n += r.Len
	}
	return n
}

// Pages returns the number of 4 KiB pages in the set.
func (w *wsFile) Pages() int64 { return int64(w.Bytes() / wsfPage) }

// encodeWS returns the file image of w.
func encodeWS(w *wsFile) []byte {
	le := binary.LittleEndian
	b := make([]byte, wsfHeaderSize+wsfRunSize*len(w.Runs))
	copy(b, wsfMagic)
	le.PutUint32(b[8:], wsfVersion)
	le.PutUint32(b[12:], wsfPage)
	le.PutUint64(b[16:], w.MemSize)
	le.PutUint64(b[24:], uint64(len(w.Runs)))
	for i, r := range w.Runs {
		o := wsfHeaderSize + wsfRunSize*i
		le.PutUint64(b[o:], r.Off)
		le.PutUint64(b[o+8:], r.Len)
	}
	le.PutUint32(b[wsfCRCOffset:], crc32.Checksum(b, castagnoli))
	return b
}

// parseWS validates and decodes a WS file image against a memory file of
// memSize bytes: magic, version, page size, the checksum, the size it was
// recorded against, and every run's alignment, order and bounds.
func parseWS(b []byte, memSize uint64) (*wsFile, error) {
	le := binary.LittleEndian
	if len(b) < wsfHeaderSize {
		return nil, fmt.Errorf("%w: %d bytes, shorter than the %d-byte header", errBadWS, len(b), wsfHeaderSize)
	}
	if string(b[:8]) != wsfMagic {
		return nil, fmt.Errorf("%w: bad magic %q", errBadWS, b[:8])
	}
	if v := le.Uint32(b[8:]); v != wsfVersion {
		return nil, fmt.Errorf("%w: version %d (this vhive reads version %d)", errBadWS, v, wsfVersion)
	}
	n := le.Uint64(b[24:])
	if n > wsfMaxRuns || uint64(len(b)) != wsfHeaderSize+wsfRunSize*n {
		return nil, fmt.Errorf("%w: %d bytes for %d runs (want %d): truncated?", errBadWS, len(b), n, wsfHeaderSize+wsfRunSize*n)
	}
	want := le.Uint32(b[wsfCRCOffset:])
	var zero [4]byte
	c := crc32.Update(0, castagnoli, b[:wsfCRCOffset])
	c = crc32.Update(c, castagnoli, zero[:])
	if c = crc32.Update(c, castagnoli, b[wsfCRCOffset+4:]); c != want {
		return nil, fmt.Errorf("%w: checksum %#x, header says %#x", errBadWS, c, want)
	}
	if ps := le.Uint32(b[12:]); ps != wsfPage {
		return nil, fmt.Errorf("%w: page size %d", errBadWS, ps)
	}
	w := &wsFile{MemSize: le.Uint64(b[16:]), Runs: make([]wsRun, n)}
	if w.MemSize != memSize {
		return nil, fmt.Errorf("%w: recorded against a memory file of %d bytes, this one has %d", errBadWS, w.MemSize, memSize)
	}
	var prevEnd uint64
	for i := range w.Runs {
		o := wsfHeaderSize + wsfRunSize*i
		r := wsRun{Off: le.Uint64(b[o:]), Len: le.Uint64(b[o+8:])}
		switch {
		case r.Len == 0 || r.Len%wsfPage != 0 || r.Off%wsfPage != 0:
			return nil, fmt.Errorf("%w: run %d [%#x, +%#x) empty or not page aligned", errBadWS, i, r.Off, r.Len)
		case i > 0 && r.Off < prevEnd:
			return nil, fmt.Errorf("%w: run %d at %#x overlaps or precedes the previous run", errBadWS, i, r.Off)
		case r.Off+r.Len < r.Off || r.Off+r.Len > memSize:
			return nil, fmt.Errorf("%w: run %d [%#x, +%#x) beyond the memory file's %d bytes", errBadWS, i, r.Off, r.Len, memSize)
		}
		prevEnd = r.Off + r.Len
		w.Runs[i] = r
	}
	return w, nil
}

// readWS reads and validates the WS file at path against memory file mem.
func readWS(path, mem string) (*wsFile, error) {
	fi, err := os.Stat(mem)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: %w", errBadWS, err)
	}
	return parseWS(b, uint64(fi.Size()))
}

// runsOfPages merges sorted page indexes into runs.
func runsOfPages(pages []uint64) []wsRun {
	var runs []wsRun
	for _, p := range pages {
		off := p * wsfPage
		if n := len(runs); n > 0 && runs[n-1].Off+runs[n-1].Len == off {
			runs[n-1].Len += wsfPage
			continue
		}
		runs = append(runs, wsRun{Off: off, Len: wsfPage})
	}
	return runs
}

// writeWS writes w to path atomically: a temporary file beside it,
// fsynced, renamed over path, and the directory fsynced.
func writeWS(path string, w *wsFile) (retErr error) {
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
	if _, err := f.Write(encodeWS(w)); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(f.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
