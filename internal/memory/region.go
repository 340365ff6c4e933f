package memory

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
)

// Region maps guest memory in the sandbox process to the memory file: one
// element of the handshake's JSON array, with Firecracker's field names.
type Region struct {
	// BaseHostVirtAddr is where the region starts in the sandbox
	// process's address space (registered with the userfaultfd).
	BaseHostVirtAddr uint64 `json:"base_host_virt_addr"`
	// Size in bytes.
	Size uint64 `json:"size"`
	// Offset of the region's first byte in the memory file.
	Offset uint64 `json:"offset"`
	// PageSize in bytes (4096, or a huge page size).
	PageSize uint64 `json:"page_size"`
	// PageSizeKiB is deprecated: despite its name Firecracker puts the page
	// size in BYTES here. Accepted when PageSize is 0.
	PageSizeKiB uint64 `json:"page_size_kib"`
}

// pageSize returns the effective page size (PageSize, else PageSizeKiB).
func (r Region) pageSize() uint64 {
	if r.PageSize != 0 {
		return r.PageSize
	}
	return r.PageSizeKiB
}

func (r Region) end() uint64 { return r.BaseHostVirtAddr + r.Size }

// maxRegions bounds the handshake; Firecracker sends one per guest memory
// slot (a handful).
const maxRegions = 1024

// ErrBadHandshake classifies every rejected handshake.
var ErrBadHandshake = errors.New("bad memory handshake")

// ParseRegions decodes and validates the handshake payload: a non-empty
// JSON array of regions, each with a power-of-two page size of at least
// 4 KiB (page_size, or the deprecated page_size_kib, which also holds
// bytes; if both are set they must agree), a page-aligned base address,
// size and file offset, no overflow, lying within a memory file of memSize
// bytes, and no two regions overlapping in the sandbox's address space. The
// result is sorted by address and has PageSize filled in.
func ParseRegions(payload []byte, memSize uint64) ([]Region, error) {
	var raw []json.RawMessage
	if err := json.Unmarshal(payload, &raw); err != nil {
		return nil, fmt.Errorf("%w: payload is not a JSON array of regions: %w", ErrBadHandshake, err)
	}
	if len(raw) == 0 {
		return nil, fmt.Errorf("%w: no regions", ErrBadHandshake)
	}
	if len(raw) > maxRegions {
		return nil, fmt.Errorf("%w: %d regions (at most %d)", ErrBadHandshake, len(raw), maxRegions)
	}
	regions := make([]Region, 0, len(raw))
	for i, m := range raw {
		if bytes.Equal(bytes.TrimSpace(m), []byte("null")) {
			return nil, fmt.Errorf("%w: region %d is null", ErrBadHandshake, i)
		}
		var r Region
		if err := json.Unmarshal(m, &r); err != nil {
			return nil, fmt.Errorf("%w: region %d: %w", ErrBadHandshake, i, err)
		}
		if err := r.validate(memSize); err != nil {
			return nil, fmt.Errorf("%w: region %d %s: %w", ErrBadHandshake, i, r, err)
		}
		r.PageSize = r.pageSize()
		regions = append(regions, r)
	}
	slices.SortFunc(regions, func(a, b Region) int {
		switch {
		case a.BaseHostVirtAddr < b.BaseHostVirtAddr:
			return -1
		case a.BaseHostVirtAddr > b.BaseHostVirtAddr:
			return 1
		}
		return 0
	})
	for i := 1; i < len(regions); i++ {
		if regions[i].BaseHostVirtAddr < regions[i-1].end() {
			return nil, fmt.Errorf("%w: regions %s and %s overlap", ErrBadHandshake, regions[i-1], regions[i])
		}
	}
	return regions, nil
}

func (r Region) String() string {
	return fmt.Sprintf("[%#x, +%#x) @file %#x", r.BaseHostVirtAddr, r.Size, r.Offset)
}

func (r Region) validate(memSize uint64) error {
	ps := r.pageSize()
	if r.PageSize != 0 && r.PageSizeKiB != 0 && r.PageSize != r.PageSizeKiB {
		return fmt.Errorf("page_size %d and page_size_kib %d disagree (page_size_kib holds bytes)", r.PageSize, r.PageSizeKiB)
	}
	switch {
	case ps == 0:
		return errors.New("no page_size")
	case ps < 4096 || ps&(ps-1) != 0:
		return fmt.Errorf("page size %d is not a power of two >= 4096", ps)
	case r.Size == 0:
		return errors.New("size is 0")
	case r.BaseHostVirtAddr%ps != 0:
		return fmt.Errorf("base_host_virt_addr not aligned to page size %d", ps)
	case r.Size%ps != 0:
		return fmt.Errorf("size not a multiple of page size %d", ps)
	case r.Offset%ps != 0:
		return fmt.Errorf("offset not aligned to page size %d", ps)
	case r.BaseHostVirtAddr+r.Size < r.BaseHostVirtAddr:
		return errors.New("address range overflows")
	case r.Offset+r.Size < r.Offset || r.Offset+r.Size > memSize:
		return fmt.Errorf("file range [%#x, +%#x) lies beyond the memory file (%d bytes)", r.Offset, r.Size, memSize)
	}
	return nil
}
