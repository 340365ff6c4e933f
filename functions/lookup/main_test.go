package main

import (
	"context"
	"strings"
	"testing"
)

func TestSubsets(t *testing.T) {
	count := func(sel func(int) bool) (n int) {
		for i := range numChunks {
			if sel(i) {
				n++
			}
		}
		return n
	}
	_, rec := subset("record")
	_, rep := subset("replay")
	both := count(func(i int) bool { return rec(i) && rep(i) })
	if r, p := count(rec), count(rep); r-p > 1 || p-r > 1 || r < numChunks/2 || both*6 < r*5-6 {
		t.Errorf("record %d, replay %d, shared %d chunks: want sizes within one, > half, and 5/6 overlap", r, p, both)
	}
	if numChunks*chunkFloats*8 != 48<<20 {
		t.Errorf("table is %d bytes, want 48 MiB", numChunks*chunkFloats*8)
	}
	// Different payloads touch different subsets (some of 20 differ from record).
	differ := false
	for _, p := range []string{"a", "b", "c", "d", "e", "f", "g", "h", "i", "j", "k", "l"} {
		_, s := subset(p)
		for i := range 10 {
			if s(i) != rec(i) {
				differ = true
			}
		}
	}
	if !differ {
		t.Error("every payload selects the record subset")
	}
}

func TestHandle(t *testing.T) {
	m := newModel()
	ctx := context.Background()
	rec, err := m.handle(ctx, "record")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(rec, "lookup subset=record chunks=924/1536 touched_mib=28.9 score=") {
		t.Errorf("record = %q", rec)
	}
	rep, _ := m.handle(ctx, "replay")
	if !strings.HasPrefix(rep, "lookup subset=replay chunks=923/1536 ") || rep == rec {
		t.Errorf("replay = %q", rep)
	}
	if again, _ := m.handle(ctx, "record"); again != rec {
		t.Errorf("record is not deterministic: %q vs %q", rec, again)
	}
	// The reply depends on the table contents: a changed table changes it.
	for i := range m.table {
		m.table[i] = -m.table[i]
	}
	if flipped, _ := m.handle(ctx, "record"); flipped == rec {
		t.Error("the reply does not depend on the table")
	}
}

func BenchmarkRecord(b *testing.B) {
	m := newModel()
	b.SetBytes(924 * chunkFloats * 8)
	for b.Loop() {
		if _, err := m.handle(context.Background(), "record"); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkRecordFloor is the floor for BenchmarkRecord: one plain pass
// summing the same 924 chunks.
func BenchmarkRecordFloor(b *testing.B) {
	m := newModel()
	_, sel := subset("record")
	b.SetBytes(924 * chunkFloats * 8)
	for b.Loop() {
		sumChunks(m.table, sel)
	}
}

func sumChunks(table []float64, sel func(int) bool) float64 {
	var sum float64
	for c := range numChunks {
		if sel(c) {
			for _, w := range table[c*chunkFloats : (c+1)*chunkFloats] {
				sum += w
			}
		}
	}
	return sum
}
