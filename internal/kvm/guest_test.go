package kvm

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

func TestPatternPages(t *testing.T) {
	const n = 5000
	for _, pat := range Patterns {
		ps, err := pat.Pages(n, 3)
		if err != nil {
			t.Fatal(err)
		}
		again, _ := pat.Pages(n, 3)
		if !slices.Equal(ps, again) {
			t.Errorf("%s: not deterministic for one seed", pat)
		}
		other, _ := pat.Pages(n, 4)
		if pat != Sequential && slices.Equal(ps, other) {
			t.Errorf("%s: seeds 3 and 4 give the same pages", pat)
		}
		seen := map[uint64]bool{}
		for _, p := range ps {
			if p >= n || seen[p] {
				t.Fatalf("%s: page %d out of range or repeated", pat, p)
			}
			seen[p] = true
		}
		switch pat {
		case Sequential:
			if len(ps) != n || !slices.IsSorted(ps) {
				t.Errorf("sequential: %d pages, sorted %v", len(ps), slices.IsSorted(ps))
			}
		case Random:
			if len(ps) != n || slices.IsSorted(ps) {
				t.Errorf("random: %d pages, sorted %v", len(ps), slices.IsSorted(ps))
			}
		case Clustered:
			// Runs of 1..64 ascending pages, separated by gaps, in an order
			// that is not ascending overall.
			runs, longest := 1, 1
			cur := 1
			for i := 1; i < len(ps); i++ {
				if ps[i] == ps[i-1]+1 {
					cur++
					longest = max(longest, cur)
					continue
				}
				runs, cur = runs+1, 1
			}
			if longest > 64 || runs < 20 || len(ps) > n*3/4 || len(ps) < n/4 || slices.IsSorted(ps) {
				t.Errorf("clustered: %d pages in %d runs, longest %d, sorted %v", len(ps), runs, longest, slices.IsSorted(ps))
			}
		}
	}
	if _, err := Pattern("zigzag").Pages(10, 1); err == nil || !strings.Contains(err.Error(), "zigzag") {
		t.Errorf("unknown pattern: %v", err)
	}
	if _, err := Random.Pages(0, 1); err == nil {
		t.Error("0 pages accepted")
	}
}

func TestPageHashDetectsAnySingleWordChange(t *testing.T) {
	page := make([]byte, PageSize)
	fillPage(page, 1, 9)
	h := PageHash(DataPageGPA(9), page)
	if PageHash(DataPageGPA(10), page) == h {
		t.Error("the same page at another address hashes the same")
	}
	for w := 0; w < PageSize/8; w++ {
		for _, bit := range []uint{0, 31, 63} {
			c := bytes.Clone(page)
			v := binary.LittleEndian.Uint64(c[w*8:])
			binary.LittleEndian.PutUint64(c[w*8:], v^1<<bit)
			if PageHash(DataPageGPA(9), c) == h {
				t.Fatalf("flipping bit %d of word %d does not change the hash", bit, w)
			}
		}
	}
}

func TestWriteImageRefusesBadInput(t *testing.T) {
	dir := t.TempDir()
	p := filepath.Join(dir, "mem")
	if err := os.WriteFile(p, []byte("keep"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := WriteImage(p, 4, 1); err == nil {
		t.Error("overwrote an existing file")
	}
	if b, _ := os.ReadFile(p); string(b) != "keep" {
		t.Errorf("existing file changed to %q", b)
	}
	for _, n := range []int{0, -1, MaxDataPages + 1} {
		if err := WriteImage(filepath.Join(dir, "x"), n, 1); err == nil || !strings.Contains(err.Error(), "data pages") {
			t.Errorf("%d data pages: %v", n, err)
		}
	}
	q := filepath.Join(dir, "ok")
	if err := WriteImage(q, 3, 1); err != nil {
		t.Fatal(err)
	}
	if fi, _ := os.Stat(q); fi.Size() != int64(MemorySize(3)) {
		t.Errorf("image is %d bytes, want %d", fi.Size(), MemorySize(3))
	}
}

func TestNewGuestRefusesBadInput(t *testing.T) {
	for name, tc := range map[string]struct {
		dataPages int
		pages     []uint64
		mode      OutputMode
		want      string
	}{
		"no data":        {0, nil, OutputHash, "data pages"},
		"page past data": {4, []uint64{1, 4}, OutputHash, "outside the data area"},
		"mode":           {4, []uint64{1}, 7, "output mode"},
	} {
		if _, err := NewGuest(GuestConfig{DataPages: tc.dataPages, Pages: tc.pages, Output: tc.mode}); err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%s: %v, want an error containing %q", name, err, tc.want)
		}
	}
}

// populatedGuest is a guest whose slot 0 the test process fills itself
// from the image: no userfaultfd, so running it here is safe.
func populatedGuest(t *testing.T, dataPages int, pages []uint64, mode OutputMode) (*Guest, string) {
	t.Helper()
	requiresKVM(t)
	img := filepath.Join(t.TempDir(), "mem")
	if err := WriteImage(img, dataPages, 5); err != nil {
		t.Fatal(err)
	}
	g, err := NewGuest(GuestConfig{DataPages: dataPages, Pages: pages, Output: mode})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { g.Close() })
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	copy(g.Memory(), b)
	return g, img
}

func TestGuestWithoutPageTablesTripleFaults(t *testing.T) {
	g, _ := populatedGuest(t, 4, []uint64{0, 1}, OutputHash)
	clear(g.Memory()[PML4GPA : PML4GPA+8]) // PML4[0] not present: the first fetch faults
	_, err := g.Run()
	if err == nil || !strings.Contains(err.Error(), "shutdown") {
		t.Fatalf("Run = %v, want a shutdown (triple fault)", err)
	}
	if _, err := g.Run(); err == nil {
		t.Error("second Run accepted")
	}
}

func TestVerifyWithoutRun(t *testing.T) {
	g, img := populatedGuest(t, 4, []uint64{0}, OutputHash)
	f, _ := os.Open(img)
	defer f.Close()
	if _, err := g.Verify(f); err == nil {
		t.Error("Verify before Run accepted")
	}
}

// TestToucherMatchesSource re-assembles testdata/toucher.s with GNU as and
// compares it with toucherCode, so that the bytes and their source cannot
// drift apart.
func TestToucherMatchesSource(t *testing.T) {
	as, err1 := exec.LookPath("as")
	objcopy, err2 := exec.LookPath("objcopy")
	if err1 != nil || err2 != nil {
		t.Skipf("needs GNU binutils (as, objcopy) to re-assemble the guest: %v, %v", err1, err2)
	}
	dir := t.TempDir()
	obj, bin := filepath.Join(dir, "toucher.o"), filepath.Join(dir, "toucher.bin")
	if out, err := exec.Command(as, "--64", "-o", obj, "testdata/toucher.s").CombinedOutput(); err != nil {
		t.Fatalf("as: %v: %s", err, out)
	}
	if out, err := exec.Command(objcopy, "-O", "binary", "-j", ".text", obj, bin).CombinedOutput(); err != nil {
		t.Fatalf("objcopy: %v: %s", err, out)
	}
	got, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, toucherCode) {
		t.Fatalf("testdata/toucher.s assembles to\n% x\ntoucherCode is\n% x", got, toucherCode)
	}
}

// TestRunReportsKVMStats: a run over pages the guest has never touched
// makes KVM take page faults (shadow or two-dimensional paging alike) and
// exits, and Run reports them from the vCPU's statistics.
func TestRunReportsKVMStats(t *testing.T) {
	pages, _ := Random.Pages(64, 1)
	g, img := populatedGuest(t, 64, pages, OutputHash)
	st, err := g.Run()
	if err != nil {
		t.Fatal(err)
	}
	if st.PageFaults == -1 {
		t.Skip("this kernel has no KVM binary statistics (KVM_GET_STATS_FD, Linux 5.14+)")
	}
	if st.PageFaults < 1 || st.KVMExits < st.PageFaults || st.Exits != 1 {
		t.Errorf("run stats %+v: want ≥ 1 page fault, at least as many KVM exits, 1 exit to the VMM", st)
	}
	f, _ := os.Open(img)
	defer f.Close()
	if v, err := g.Verify(f); err != nil || v.Mismatches != 0 || v.Pages != 64 {
		t.Errorf("verify: %+v, %v", v, err)
	}
}
