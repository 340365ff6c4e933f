// Package iobuf allocates the buffers that snapshot state is read into
// with O_DIRECT: anonymous memory, aligned to and sized in 2 MiB, backed
// by transparent huge pages where the kernel allows it (madvise mode or
// always), and populated before use, so that no read pays for faulting
// its destination in.
//
// Huge pages matter more than the disk here: in a VM, a direct read's
// destination pages are mapped for the device page by page, and on this
// project's reference machine (a nested VM) the same 27 MiB O_DIRECT read
// took 35–46 ms into 4 KiB pages and 7–8 ms into 2 MiB pages
// (docs/benchmarks/wasm.md). Where huge pages are unavailable (THP
// "never", or none free) the buffer is made of 4 KiB pages and works the
// same, only slower.
package iobuf

import (
	"fmt"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Align is the alignment and size granule of a buffer: one huge page.
const Align = 2 << 20

// Alloc returns a populated buffer of n bytes (n > 0). Its capacity is n
// rounded up to Align; Free it (with the same slice or any reslice of it
// that keeps its start) when done.
func Alloc(n int) ([]byte, error) {
	if n <= 0 {
		return nil, fmt.Errorf("iobuf: size %d: must be positive", n)
	}
	size := uintptr(n+Align-1) &^ (Align - 1)
	// Map one granule more, then cut the mapping down to an aligned
	// window: THP backs only 2 MiB-aligned ranges.
	raw, err := unix.MmapPtr(-1, 0, nil, size+Align, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return nil, fmt.Errorf("iobuf: map %d bytes: %w", size+Align, err)
	}
	head := (Align - uintptr(raw)%Align) % Align
	if head > 0 {
		unix.MunmapPtr(raw, head)
	}
	if tail := Align - head; tail > 0 {
		unix.MunmapPtr(unsafe.Add(raw, head+size), tail)
	}
	b := unsafe.Slice((*byte)(unsafe.Add(raw, head)), size)
	_ = unix.Madvise(b, unix.MADV_HUGEPAGE) // EINVAL where THP is compiled out: 4 KiB pages then
	if err := unix.Madvise(b, unix.MADV_POPULATE_WRITE); err != nil {
		// Before Linux 5.14: touch every page instead.
		for i := 0; i < len(b); i += unix.Getpagesize() {
			b[i] = 0
		}
	}
	return b[:n], nil
}

// Free unmaps a buffer returned by Alloc.
func Free(b []byte) error {
	if cap(b) == 0 {
		return nil
	}
	b = b[:cap(b)]
	if err := unix.MunmapPtr(unsafe.Pointer(unsafe.SliceData(b)), uintptr(len(b))); err != nil {
		return fmt.Errorf("iobuf: unmap: %w", err)
	}
	return nil
}
