package wasm

import (
	"fmt"
	"os"
	"sync"

	"github.com/tetratelabs/wazero/experimental"
	"golang.org/x/sys/unix"
)

// reserveBytes is the virtual reservation behind every linear memory: the
// largest memory a 32-bit wasm module can have. MAP_NORESERVE, so only
// touched pages cost anything.
const reserveBytes = 4 << 30

// region is one linear memory: a fixed 4 GiB anonymous reservation handed to
// wazero through experimental.WithMemoryAllocator. It never moves, so the
// memory manager (userfaultfd) or a MAP_FIXED file mapping can back its
// prefix before the module is instantiated.
type region struct {
	mu       sync.Mutex
	mem      []byte // the whole reservation
	size     uint64 // bytes wazero currently uses
	limit    uint64 // Reallocate beyond this fails (memory.grow returns -1)
	freed    bool
	allocate bool
}

func newRegion(limit uint64) (*region, error) {
	if limit == 0 || limit > reserveBytes {
		limit = reserveBytes
	}
	mem, err := unix.Mmap(-1, 0, reserveBytes, unix.PROT_READ|unix.PROT_WRITE,
		unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return nil, fmt.Errorf("reserve %d bytes for linear memory: %w", reserveBytes, err)
	}
	return &region{mem: mem, limit: limit}, nil
}

// mapFile maps the first size bytes of f privately over the start of the
// region (copy-on-write, pages read from the page cache on first touch).
func (r *region) mapFile(f *os.File, size int64) error {
	if size == 0 {
		return nil
	}
	_, err := unix.MmapPtr(int(f.Fd()), 0, unsafePointer(r.mem), uintptr(size),
		unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_FIXED)
	if err != nil {
		return fmt.Errorf("map memory file %s over linear memory: %w", f.Name(), err)
	}
	return nil
}

// Allocate implements experimental.MemoryAllocator. Only one memory per
// region: a second call (a module with two memories) gets nil.
func (r *region) Allocate(capacity, max uint64) experimental.LinearMemory {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.allocate || r.freed || max > reserveBytes {
		return nil
	}
	r.allocate = true
	return r
}

// Reallocate implements experimental.LinearMemory: the same backing array,
// a longer slice.
func (r *region) Reallocate(size uint64) []byte {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.freed || size > r.limit {
		return nil
	}
	r.size = size
	return r.mem[:size:size]
}

// Free implements experimental.LinearMemory.
func (r *region) Free() { r.release() }

func (r *region) release() {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.freed {
		return
	}
	r.freed = true
	_ = unix.Munmap(r.mem)
}
