package memory

import (
	"encoding/binary"
	"encoding/json"
	"slices"
	"testing"
)

// FuzzParseWorkingSet: the WS parser never panics, and whatever it accepts
// is self-consistent and re-encodes to a file that parses the same.
// Seed corpus: testdata/fuzz/FuzzParseWorkingSet.
func FuzzParseWorkingSet(f *testing.F) {
	data := make([]byte, 3*4096)
	for i := range data {
		data[i] = byte(i)
	}
	good := EncodeWorkingSet(4096, 1<<20, []Run{{Offset: 0, Length: 4096}, {Offset: 3 * 4096, Length: 2 * 4096}}, data)
	f.Add(good)
	f.Add(good[:len(good)/2])
	f.Add(EncodeWorkingSet(4096, 1<<20, nil, nil))
	f.Add([]byte(wsMagic))
	f.Fuzz(func(t *testing.T, b []byte) {
		ws, err := ParseWorkingSet(b)
		if err != nil {
			return
		}
		var total, prevEnd uint64
		for i, r := range ws.Runs {
			if r.Length == 0 || r.Offset%ws.PageSize != 0 || r.Length%ws.PageSize != 0 ||
				(i > 0 && r.Offset < prevEnd) || r.Offset+r.Length > ws.MemSize {
				t.Fatalf("accepted bad run %d %+v (page size %d, mem size %d)", i, r, ws.PageSize, ws.MemSize)
			}
			prevEnd = r.Offset + r.Length
			total += r.Length
		}
		if total != uint64(len(ws.Data)) {
			t.Fatalf("runs hold %d bytes, data has %d", total, len(ws.Data))
		}
		again, err := ParseWorkingSet(EncodeWorkingSet(ws.PageSize, ws.MemSize, ws.Runs, ws.Data))
		if err != nil {
			t.Fatalf("re-encoded file rejected: %v", err)
		}
		if !slices.Equal(again.Runs, ws.Runs) || string(again.Data) != string(ws.Data) {
			t.Fatal("re-encoded file parses differently")
		}
		// Any single flipped bit in the covered bytes is caught.
		end := binary.LittleEndian.Uint64(b[32:]) + binary.LittleEndian.Uint64(b[40:])
		if end > 0 {
			c := slices.Clone(b)
			c[end/2] ^= 1
			if _, err := ParseWorkingSet(c); err == nil {
				t.Fatalf("flipped bit at %d not detected", end/2)
			}
		}
	})
}

// FuzzParseRegions: the handshake parser never panics, and whatever it
// accepts satisfies every documented rule.
// Seed corpus: testdata/fuzz/FuzzParseRegions.
func FuzzParseRegions(f *testing.F) {
	f.Add([]byte(`[{"base_host_virt_addr":140737488289792,"size":268435456,"offset":0,"page_size":4096,"page_size_kib":4096}]`), uint64(268435456))
	f.Add([]byte(`[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096},{"base_host_virt_addr":65536,"size":4096,"offset":8192,"page_size":4096}]`), uint64(1<<20))
	f.Add([]byte(`[{"base_host_virt_addr":2097152,"size":4194304,"offset":2097152,"page_size":2097152}]`), uint64(8<<20))
	f.Add([]byte(`[]`), uint64(4096))
	f.Add([]byte(`[null]`), uint64(4096))
	f.Add([]byte(`[{"size":-1}]`), uint64(4096))
	f.Fuzz(func(t *testing.T, payload []byte, memSize uint64) {
		regions, err := ParseRegions(payload, memSize)
		if err != nil {
			return
		}
		if len(regions) == 0 {
			t.Fatal("accepted no regions")
		}
		for i, r := range regions {
			ps := r.PageSize
			if ps < 4096 || ps&(ps-1) != 0 || r.Size == 0 || r.BaseHostVirtAddr%ps != 0 || r.Size%ps != 0 ||
				r.Offset%ps != 0 || r.Offset+r.Size < r.Offset || r.Offset+r.Size > memSize ||
				r.BaseHostVirtAddr+r.Size < r.BaseHostVirtAddr {
				t.Fatalf("accepted bad region %d %+v (mem size %d)", i, r, memSize)
			}
			if i > 0 && r.BaseHostVirtAddr < regions[i-1].end() {
				t.Fatalf("accepted overlapping regions %+v %+v", regions[i-1], r)
			}
		}
		b, err := json.Marshal(regions)
		if err != nil {
			t.Fatal(err)
		}
		again, err := ParseRegions(b, memSize)
		if err != nil || !slices.Equal(again, regions) {
			t.Fatalf("re-encoded regions: %v, %v != %v", err, again, regions)
		}
	})
}
