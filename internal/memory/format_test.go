package memory

import (
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestParseRegions(t *testing.T) {
	// Old Firecracker: only page_size_kib, which holds bytes.
	r, err := ParseRegions([]byte(`[{"base_host_virt_addr":65536,"size":8192,"offset":4096,"page_size_kib":4096},
		{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096,"future_field":1}]`), 3*4096)
	if err != nil {
		t.Fatal(err)
	}
	if len(r) != 2 || r[0].BaseHostVirtAddr != 4096 || r[1].PageSize != 4096 || r[1].Offset != 4096 {
		t.Fatalf("regions %+v: want sorted by address with page_size filled in", r)
	}
	_, err = ParseRegions([]byte(`[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":8192}]`), 8192)
	if !errors.Is(err, ErrBadHandshake) || !strings.Contains(err.Error(), "disagree") {
		t.Errorf("conflicting page sizes: %v", err)
	}
	_, err = ParseRegions([]byte(`[null]`), 8192)
	if err == nil || !strings.Contains(err.Error(), "region 0 is null") {
		t.Errorf("null region: %v", err)
	}
}

// TestParseWorkingSetRejects: each kind of damage is refused with an error
// that says what is wrong.
func TestParseWorkingSetRejects(t *testing.T) {
	data := make([]byte, 2*4096)
	for i := range data {
		data[i] = byte(i)
	}
	runs := []Run{{Offset: 0, Length: 4096}, {Offset: 8192, Length: 4096}}
	good := EncodeWorkingSet(4096, 1<<20, runs, data)
	if ws, err := ParseWorkingSet(good); err != nil || ws.Pages() != 2 || len(ws.Runs) != 2 {
		t.Fatalf("good file: %v", err)
	}
	// reseal recomputes the checksum so that the damage under test is the
	// only one.
	reseal := func(b []byte) []byte {
		le := binary.LittleEndian
		if end := le.Uint64(b[32:]); end <= uint64(len(b)) {
			le.PutUint32(b[wsCRCOffset:], wsChecksum(b[:end]))
		}
		return b
	}
	le := binary.LittleEndian
	for _, tc := range []struct {
		name   string
		mangle func([]byte) []byte
		want   string
	}{
		{"short", func(b []byte) []byte { return b[:10] }, "shorter than"},
		{"magic", func(b []byte) []byte { b[0] = 'X'; return b }, "bad magic"},
		{"version", func(b []byte) []byte { le.PutUint32(b[8:], 9); return reseal(b) }, "version 9"},
		{"page size", func(b []byte) []byte { le.PutUint32(b[12:], 1000); return reseal(b) }, "page size 1000"},
		{"too many runs", func(b []byte) []byte { le.PutUint64(b[16:], 1<<40); return reseal(b) }, "do not fit"},
		{"truncated", func(b []byte) []byte { return b[:len(b)-4096] }, "truncated"},
		{"unaligned run", func(b []byte) []byte { le.PutUint64(b[wsHeaderSize:], 100); return reseal(b) }, "not page aligned"},
		{"overlapping runs", func(b []byte) []byte { le.PutUint64(b[wsHeaderSize+16:], 0); return reseal(b) }, "overlaps"},
		{"beyond memory", func(b []byte) []byte { le.PutUint64(b[24:], 8192); return reseal(b) }, "beyond the memory size"},
		{"length mismatch", func(b []byte) []byte { le.PutUint64(b[40:], 4096); return reseal(b) }, "runs exceed"},
		{"data checksum", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }, "chunk 0 (data bytes [0, 8192)) checksum"},
		{"header checksum", func(b []byte) []byte { b[60] ^= 1; return b }, "header and tables checksum"},
		{"chunk size", func(b []byte) []byte { le.PutUint32(b[52:], 100); return reseal(b) }, "chunk size 100"},
		{"chunk count", func(b []byte) []byte { le.PutUint32(b[56:], 3); return reseal(b) }, "3 chunk checksums"},
		{"data offset", func(b []byte) []byte { le.PutUint64(b[32:], 1<<30); return b }, "data offset"},
	} {
		b := tc.mangle(append([]byte(nil), good...))
		_, err := ParseWorkingSet(b)
		if !errors.Is(err, ErrBadWorkingSet) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadWorkingSet containing %q", tc.name, err, tc.want)
		}
	}
}

// TestWorkingSetChunks: version 2 checks each chunk on its own; version 1
// files still parse and are checked as a whole.
func TestWorkingSetChunks(t *testing.T) {
	data := make([]byte, 5*4096)
	for i := range data {
		data[i] = byte(i * 7)
	}
	runs := []Run{{Offset: 4096, Length: 3 * 4096}, {Offset: 8 * 4096, Length: 2 * 4096}}
	b := encodeWorkingSet(4096, 1<<20, runs, data, 2*4096) // chunks of 2 pages: 3 chunks
	ws, err := ParseWorkingSet(b)
	if err != nil || ws.Version != 2 || string(ws.Data) != string(data) {
		t.Fatalf("version 2: %v", err)
	}
	dataOff := len(b) - int(alignUp(uint64(len(data)), wsAlign))
	for k := range 3 {
		c := slices.Clone(b)
		c[dataOff+k*2*4096+5] ^= 1
		_, err := ParseWorkingSet(c)
		if want := fmt.Sprintf("chunk %d ", k); !errors.Is(err, ErrBadWorkingSet) || !strings.Contains(err.Error(), want) {
			t.Errorf("flip in chunk %d: %v, want an error naming %q", k, err, want)
		}
	}
	v1 := encodeWorkingSetV1(4096, 1<<20, runs, data)
	ws, err = ParseWorkingSet(v1)
	if err != nil || ws.Version != 1 || string(ws.Data) != string(data) {
		t.Fatalf("version 1: %v", err)
	}
	v1[len(v1)-1] ^= 1
	if _, err := ParseWorkingSet(v1); !errors.Is(err, ErrBadWorkingSet) || !strings.Contains(err.Error(), "checksum") {
		t.Errorf("damaged version 1: %v", err)
	}
}

func TestMergeSpans(t *testing.T) {
	got := mergeSpans([]span{{8192, 4096}, {0, 4096}, {4096, 4096}, {20480, 4096}, {8192, 4096}})
	want := []Run{{0, 12288}, {20480, 4096}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("mergeSpans = %v, want %v", got, want)
	}
}

// encodeWorkingSetV1 builds a version 1 file (tests of the old format).
func encodeWorkingSetV1(pageSize, memSize uint64, runs []Run, data []byte) []byte {
	le := binary.LittleEndian
	dataOff := alignUp(wsHeaderSize+uint64(len(runs))*wsRunSize, wsAlign)
	end := dataOff + uint64(len(data))
	b := make([]byte, alignUp(end, wsAlign))
	copy(b, wsMagic)
	le.PutUint32(b[8:], wsVersion1)
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
