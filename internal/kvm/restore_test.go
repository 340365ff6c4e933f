package kvm

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"vhive.dev/vhive/internal/memory"
)

// testDataPages is the data area of the restore tests: 4 MiB, so that a
// lazily served run (≈ 50 µs per fault here) takes well under a second.
const testDataPages = 1024

// systemPages are the slot-0 pages the toucher needs besides its data, all
// served through the userfaultfd like any other: the code page, PML4, PDPT,
// and the PDs mapping the data (first GiB), the I/O slot (2 GiB) and the
// exit address (3 GiB).
const systemPages = 6

func checkVerified(t *testing.T, what string, res vmmResult) {
	t.Helper()
	v := res.Verify
	if v.Pages != res.Touched || v.Bytes != int64(res.Touched)*PageSize || res.Touched == 0 {
		t.Errorf("%s: verified %d pages (%d bytes) of %d touched", what, v.Pages, v.Bytes, res.Touched)
	}
	if v.Mismatches != 0 {
		t.Errorf("%s: %d pages differ from the memory file; first: %s", what, v.Mismatches, v.First)
	}
}

// TestLazyServesEveryGuestRead: a real vCPU's faults, served one page at a
// time by the manager in another process, give the guest exactly the
// memory file's bytes, for every pattern and both output modes; each page
// the guest needs faults exactly once.
func TestLazyServesEveryGuestRead(t *testing.T) {
	fx := newFixture(t, testDataPages)
	for _, pat := range Patterns {
		for _, out := range []OutputMode{OutputCopy, OutputHash} {
			what := fmt.Sprintf("%s/output=%d", pat, out)
			res, st := fx.restore(t, memory.ModeLazy, fx.image, vmmConfig{Pattern: pat, Seed: 1, Output: out})
			checkVerified(t, what, res)
			if want := int64(res.Touched + systemPages); st.Unique != want || st.Faults != want {
				t.Errorf("%s: %d unique pages in %d faults, want %d (touched %d + %d system pages)", what, st.Unique, st.Faults, want, res.Touched, systemPages)
			}
			if pat == Clustered && res.Touched >= testDataPages*3/4 {
				t.Errorf("clustered touched %d of %d pages", res.Touched, testDataPages)
			}
		}
	}
}

// TestRecordThenPrefetch: the first restore records the working set, later
// ones install it before the vCPU runs and fault on nothing; a guest that
// touches other pages than recorded faults on exactly those.
func TestRecordThenPrefetch(t *testing.T) {
	fx := newFixture(t, testDataPages)
	for _, pat := range Patterns {
		res, st := fx.restore(t, memory.ModeRecord, fx.image, vmmConfig{Pattern: pat, Seed: 1, Output: OutputCopy})
		checkVerified(t, string(pat)+" record", res)
		if want := int64(res.Touched + systemPages); st.RecPages != want {
			t.Errorf("%s: recorded %d pages, want %d", pat, st.RecPages, want)
		}
		for i := range 2 {
			res, st = fx.restore(t, memory.ModePrefetch, fx.image, vmmConfig{Pattern: pat, Seed: 1, Output: OutputCopy})
			checkVerified(t, fmt.Sprintf("%s prefetch %d", pat, i), res)
			if st.PrefetchFallback || st.Faults != 0 || st.RecPages != int64(res.Touched+systemPages) {
				t.Errorf("%s prefetch %d: fallback %v, %d faults, %d pages installed", pat, i, st.PrefetchFallback, st.Faults, st.RecPages)
			}
		}
		// As Firecracker: the vCPU runs without waiting for the
		// manager's ack, racing the installation.
		res, st = fx.restore(t, memory.ModePrefetch, fx.image, vmmConfig{Pattern: pat, Seed: 1, Output: OutputHash, Firecracker: true})
		checkVerified(t, string(pat)+" prefetch (Firecracker, no ack)", res)
		if st.PrefetchFallback || st.Unique > int64(res.Touched+systemPages) {
			t.Errorf("%s prefetch without ack: fallback %v, %d unique", pat, st.PrefetchFallback, st.Unique)
		}
		// And with the manager serving while the WS streams in: the
		// vCPU's faults on pages not installed yet wait for them.
		res, st = fx.restoreAsFirecracker(t, vmmConfig{Pattern: pat, Seed: 1, Output: OutputCopy})
		checkVerified(t, string(pat)+" prefetch (Firecracker, early resume)", res)
		if st.PrefetchFallback || st.Unique != 0 || st.RecPages != int64(res.Touched+systemPages) {
			t.Errorf("%s prefetch with early resume: fallback %v, %d unique faults served lazily, %d pages installed", pat, st.PrefetchFallback, st.Unique, st.RecPages)
		}
	}

	// Recorded with one clustered draw, restored with another: the pages
	// outside the working set, and only those, are served on faults.
	res, _ := fx.restore(t, memory.ModeRecord, fx.image, vmmConfig{Pattern: Clustered, Seed: 1})
	checkVerified(t, "clustered record seed 1", res)
	res, st := fx.restore(t, memory.ModePrefetch, fx.image, vmmConfig{Pattern: Clustered, Seed: 2})
	checkVerified(t, "clustered prefetch seed 2", res)
	recorded, _ := Clustered.Pages(testDataPages, 1)
	now, _ := Clustered.Pages(testDataPages, 2)
	in := map[uint64]bool{}
	for _, p := range recorded {
		in[p] = true
	}
	var outside int64
	for _, p := range now {
		if !in[p] {
			outside++
		}
	}
	if outside == 0 || outside == int64(len(now)) {
		t.Fatalf("seeds 1 and 2 overlap in %d of %d pages: the case tests nothing", int64(len(now))-outside, len(now))
	}
	if st.Unique != outside {
		t.Errorf("prefetch with another draw: %d pages served on faults, want the %d outside the working set", st.Unique, outside)
	}
}

// TestVerificationCatchesAWrongByte: the check is not vacuous — when the
// manager serves a memory file with one byte changed in a page the guest
// reads, exactly that page fails verification, in both output modes.
func TestVerificationCatchesAWrongByte(t *testing.T) {
	fx := newFixture(t, testDataPages)
	b, err := os.ReadFile(fx.image)
	if err != nil {
		t.Fatal(err)
	}
	const page, off = 300, 1234
	b[DataPageGPA(page)+off] ^= 0x40
	bad := filepath.Join(fx.dir, "mem.bad")
	if err := os.WriteFile(bad, b, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, out := range []OutputMode{OutputCopy, OutputHash} {
		res, _ := fx.restore(t, memory.ModeLazy, bad, vmmConfig{Pattern: Random, Seed: 3, Output: out})
		v := res.Verify
		if v.Pages != testDataPages || v.Mismatches != 1 || !strings.Contains(v.First, fmt.Sprintf("data page %d ", page)) {
			t.Errorf("output %d: %d pages checked, %d mismatches, first %q; want exactly data page %d", out, v.Pages, v.Mismatches, v.First, page)
		}
		if out == OutputCopy && !strings.Contains(v.First, fmt.Sprintf("byte %d:", off)) {
			t.Errorf("copy mode names %q, want byte %d", v.First, off)
		}
	}
}

// TestFloorAndMappedFile: the benchmark's references give the guest the
// same bytes — the raw floor (WS file read and installed with nothing
// else) and a private mapping of the memory file (no userfaultfd).
func TestFloorAndMappedFile(t *testing.T) {
	fx := newFixture(t, testDataPages)
	res, _ := fx.restore(t, memory.ModeRecord, fx.image, vmmConfig{Pattern: Clustered, Seed: 1, Output: OutputCopy})
	checkVerified(t, "record", res)
	buf := fx.floorBuffer(t)
	for _, direct := range []bool{false, true} {
		checkVerified(t, fmt.Sprintf("floor direct=%v", direct), fx.floor(t, vmmConfig{Pattern: Clustered, Seed: 1, Output: OutputCopy}, buf, direct))
	}
	checkVerified(t, "mapped file", fx.mapped(t, vmmConfig{Pattern: Random, Seed: 1, Output: OutputCopy}))
}
