package iobuf

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// TestAllocDirectRead: a buffer is aligned, sized in huge pages, huge-page
// backed where THP allows it, and an O_DIRECT read lands in it exactly.
func TestAllocDirectRead(t *testing.T) {
	const n = 27<<20 + 12288
	b, err := Alloc(n)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := Free(b); err != nil {
			t.Error(err)
		}
	}()
	if len(b) != n || cap(b) != 28<<20 {
		t.Fatalf("len %d cap %d, want %d and %d", len(b), cap(b), n, 28<<20)
	}
	if addr := uintptr(unsafe.Pointer(unsafe.SliceData(b))); addr%Align != 0 {
		t.Fatalf("buffer at %#x is not %d-aligned", addr, Align)
	}
	if thp, _ := os.ReadFile("/sys/kernel/mm/transparent_hugepage/enabled"); len(thp) > 0 && !strings.Contains(string(thp), "[never]") {
		if h := hugeBytes(b); h == 0 {
			t.Errorf("THP is %q but no part of the buffer is huge-page backed", strings.TrimSpace(string(thp)))
		}
	}

	want := make([]byte, n)
	rand.NewChaCha8([32]byte{1}).Read(want)
	path := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(path, want, 0o600); err != nil {
		t.Fatal(err)
	}
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Skipf("O_DIRECT refused here (%v): nothing more to check", err)
	}
	defer unix.Close(fd)
	if got, err := unix.Pread(fd, b, 0); err != nil || got != n {
		t.Fatalf("pread = %d, %v", got, err)
	}
	if !bytes.Equal(b, want) {
		t.Fatal("O_DIRECT read into the buffer differs from the file")
	}
}

func TestAllocRefusesNonPositive(t *testing.T) {
	for _, n := range []int{0, -1} {
		if _, err := Alloc(n); err == nil || !strings.Contains(err.Error(), "must be positive") {
			t.Errorf("Alloc(%d) = %v, want a size error", n, err)
		}
	}
	if err := Free(nil); err != nil {
		t.Errorf("Free(nil) = %v", err)
	}
}
