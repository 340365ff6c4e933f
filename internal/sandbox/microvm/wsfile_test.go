package microvm

import (
	"encoding/binary"
	"errors"
	"strings"
	"testing"
)

func TestWSFileRoundTripAndCorruption(t *testing.T) {
	const mem = 64 << 20
	w := &wsFile{MemSize: mem, Runs: runsOfPages([]uint64{0, 1, 2, 7, 100, 101, mem/wsfPage - 1})}
	if len(w.Runs) != 4 || w.Pages() != 7 {
		t.Fatalf("runs %v", w.Runs)
	}
	img := encodeWS(w)
	got, err := parseWS(img, mem)
	if err != nil {
		t.Fatal(err)
	}
	if got.MemSize != mem || len(got.Runs) != 4 || got.Runs[3] != (wsRun{mem - wsfPage, wsfPage}) {
		t.Fatalf("parsed %+v", got)
	}
	// Every single flipped byte is refused (the checksum covers all).
	for i := range img {
		b := append([]byte(nil), img...)
		b[i] ^= 0x40
		if _, err := parseWS(b, mem); !errors.Is(err, errBadWS) {
			t.Fatalf("byte %d flipped: err %v, want errBadWS", i, err)
		}
	}
	bad := func(name string, b []byte, memSize uint64, want string) {
		t.Helper()
		_, err := parseWS(b, memSize)
		if !errors.Is(err, errBadWS) || !strings.Contains(err.Error(), want) {
			t.Errorf("%s: err %v, want errBadWS mentioning %q", name, err, want)
		}
	}
	bad("truncated", img[:len(img)-1], mem, "truncated")
	bad("empty", nil, mem, "shorter")
	bad("other memory size", img, mem*2, "recorded against")
	// Well-formed files (valid checksum) with wrong tables.
	bad("run beyond memory", encodeWS(&wsFile{MemSize: mem, Runs: []wsRun{{mem - wsfPage, 2 * wsfPage}}}), mem, "beyond")
	bad("unaligned run", encodeWS(&wsFile{MemSize: mem, Runs: []wsRun{{100, wsfPage}}}), mem, "aligned")
	bad("overlap", encodeWS(&wsFile{MemSize: mem, Runs: []wsRun{{0, 2 * wsfPage}, {wsfPage, wsfPage}}}), mem, "overlaps")
	v2 := encodeWS(w)
	binary.LittleEndian.PutUint32(v2[8:], 2)
	bad("version", v2, mem, "version 2")
}

func TestPadRuns(t *testing.T) {
	const k = 1024
	got := padRuns([]wsRun{{4 * k, 4 * k}, {60 * k, 8 * k}, {200 * k, 4 * k}, {1020 * k, 4 * k}}, 64*k, 1024*k)
	want := []wsRun{{0, 128 * k}, {192 * k, 64 * k}, {960 * k, 64 * k}}
	if len(got) != len(want) {
		t.Fatalf("padRuns = %v, want %v", got, want)
	}
	for i := range got {
		if got[i] != want[i] {
			t.Fatalf("padRuns = %v, want %v", got, want)
		}
	}
}
