package memory

import (
	"encoding/binary"
	"errors"
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
		end := le.Uint64(b[32:]) + le.Uint64(b[40:])
		if end <= uint64(len(b)) {
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
		{"too many runs", func(b []byte) []byte { le.PutUint64(b[16:], 1<<40); return b }, "do not fit"},
		{"truncated", func(b []byte) []byte { return b[:len(b)-4096] }, "truncated"},
		{"unaligned run", func(b []byte) []byte { le.PutUint64(b[wsHeaderSize:], 100); return reseal(b) }, "not page aligned"},
		{"overlapping runs", func(b []byte) []byte { le.PutUint64(b[wsHeaderSize+16:], 0); return reseal(b) }, "overlaps"},
		{"beyond memory", func(b []byte) []byte { le.PutUint64(b[24:], 8192); return reseal(b) }, "beyond the memory size"},
		{"length mismatch", func(b []byte) []byte { le.PutUint64(b[40:], 4096); return reseal(b) }, "runs exceed"},
		{"checksum", func(b []byte) []byte { b[len(b)-1] ^= 1; return b }, "checksum"},
	} {
		b := tc.mangle(append([]byte(nil), good...))
		_, err := ParseWorkingSet(b)
		if !errors.Is(err, ErrBadWorkingSet) || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want ErrBadWorkingSet containing %q", tc.name, err, tc.want)
		}
	}
}

func TestMergeSpans(t *testing.T) {
	got := mergeSpans([]span{{8192, 4096}, {0, 4096}, {4096, 4096}, {20480, 4096}, {8192, 4096}})
	want := []Run{{0, 12288}, {20480, 4096}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] {
		t.Fatalf("mergeSpans = %v, want %v", got, want)
	}
}
