package iobuf

import (
	"bufio"
	"os"
	"strconv"
	"strings"
	"unsafe"
)

// hugeBytes is the AnonHugePages of this process's mapping that holds b's
// first byte, from /proc/self/smaps (a mapping the kernel merged with a
// neighbour counts the neighbour's too; 0 when the kernel does not say).
func hugeBytes(b []byte) int64 {
	addr := uintptr(unsafe.Pointer(unsafe.SliceData(b)))
	f, err := os.Open("/proc/self/smaps")
	if err != nil {
		return 0
	}
	defer f.Close()
	in := false
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := sc.Text()
		if lo, hi, ok := vmaRange(line); ok {
			in = lo <= addr && addr < hi
			continue
		}
		if in && strings.HasPrefix(line, "AnonHugePages:") {
			if fs := strings.Fields(line); len(fs) >= 2 {
				if kb, err := strconv.ParseInt(fs[1], 10, 64); err == nil {
					return kb << 10
				}
			}
			return 0
		}
	}
	return 0
}

// vmaRange parses the "start-end perms ..." header line of a mapping.
func vmaRange(line string) (lo, hi uintptr, ok bool) {
	r, _, found := strings.Cut(line, " ")
	if !found {
		return 0, 0, false
	}
	a, b, found := strings.Cut(r, "-")
	if !found {
		return 0, 0, false
	}
	x, err1 := strconv.ParseUint(a, 16, 64)
	y, err2 := strconv.ParseUint(b, 16, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, false
	}
	return uintptr(x), uintptr(y), true
}
