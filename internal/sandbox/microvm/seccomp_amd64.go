package microvm

import (
	"fmt"
	"unsafe"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// noHugepageFilter is the seccomp program: on x86_64, madvise with advice
// MADV_HUGEPAGE returns EINVAL; everything else (other architectures'
// calls included) is allowed. struct seccomp_data: nr at 0, arch at 4,
// args[i] at 16+8i (the advice is an int: its low 32 bits, little-endian).
func noHugepageFilter() ([]bpf.RawInstruction, error) {
	return bpf.Assemble([]bpf.Instruction{
		bpf.LoadAbsolute{Off: 4, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.AUDIT_ARCH_X86_64, SkipFalse: 4},
		bpf.LoadAbsolute{Off: 0, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.SYS_MADVISE, SkipFalse: 2},
		bpf.LoadAbsolute{Off: 16 + 8*2, Size: 4},
		bpf.JumpIf{Cond: bpf.JumpEqual, Val: unix.MADV_HUGEPAGE, SkipTrue: 1},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ALLOW},
		bpf.RetConstant{Val: unix.SECCOMP_RET_ERRNO | uint32(unix.EINVAL)},
	})
}

// installNoHugepageFilter sets no-new-privs and installs noHugepageFilter
// on the calling thread (no TSYNC: the launcher execs from this thread).
func installNoHugepageFilter() error {
	raw, err := noHugepageFilter()
	if err != nil {
		return fmt.Errorf("assemble seccomp filter: %w", err)
	}
	prog := make([]unix.SockFilter, len(raw))
	for i, r := range raw {
		prog[i] = unix.SockFilter{Code: r.Op, Jt: r.Jt, Jf: r.Jf, K: r.K}
	}
	if err := unix.Prctl(unix.PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0); err != nil {
		return fmt.Errorf("prctl(PR_SET_NO_NEW_PRIVS): %w", err)
	}
	fprog := unix.SockFprog{Len: uint16(len(prog)), Filter: &prog[0]}
	if _, _, errno := unix.RawSyscall(unix.SYS_SECCOMP, unix.SECCOMP_SET_MODE_FILTER, 0, uintptr(unsafe.Pointer(&fprog))); errno != 0 {
		return fmt.Errorf("seccomp(SET_MODE_FILTER): %w", errno)
	}
	return nil
}
