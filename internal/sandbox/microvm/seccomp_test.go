package microvm

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/net/bpf"
	"golang.org/x/sys/unix"
)

// madviseProbeEnv makes the test binary (run as QEMU's stand-in by the
// launcher) try madvise(MADV_HUGEPAGE) and MADV_DONTNEED on an anonymous
// mapping, print the results and exit.
const madviseProbeEnv = "VHIVE_TEST_MADVISE_PROBE"

func init() {
	if os.Getenv(madviseProbeEnv) != "1" {
		return
	}
	m, err := unix.Mmap(-1, 0, 4<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		fmt.Println("mmap:", err)
		os.Exit(1)
	}
	res := func(err error) string {
		if err != nil {
			return err.Error()
		}
		return "ok"
	}
	fmt.Printf("hugepage=%s dontneed=%s\n", res(unix.Madvise(m, unix.MADV_HUGEPAGE)), res(unix.Madvise(m, unix.MADV_DONTNEED)))
	os.Exit(0)
}

// TestNoHugepageLauncher: a program run through the launcher gets EINVAL
// for madvise(MADV_HUGEPAGE) and nothing else changes; run directly, the
// same program's advice succeeds (the filter is what made the difference,
// and it never applies to the test process itself).
func TestNoHugepageLauncher(t *testing.T) {
	run := func(cmd *exec.Cmd) string {
		t.Helper()
		cmd.Env = append(cmd.Environ(), madviseProbeEnv+"=1")
		out, err := cmd.CombinedOutput()
		if err != nil {
			t.Fatalf("%v: %v: %s", cmd.Args, err, out)
		}
		return strings.TrimSpace(string(out))
	}
	if got := run(launcherCommand("/proc/self/exe")); got != "hugepage=invalid argument dontneed=ok" {
		t.Errorf("under the launcher: %q, want MADV_HUGEPAGE refused with EINVAL, MADV_DONTNEED allowed", got)
	}
	if got := run(exec.Command("/proc/self/exe")); got != "hugepage=ok dontneed=ok" {
		t.Errorf("without the launcher: %q, want both allowed", got)
	}
	// The test process itself has no filter.
	m, err := unix.Mmap(-1, 0, 4<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	if err := unix.Madvise(m, unix.MADV_HUGEPAGE); err != nil {
		t.Errorf("the test process's own madvise(MADV_HUGEPAGE): %v", err)
	}
}

// TestNoHugepageFilterProgram runs the BPF program on seccomp_data
// records. (x/net/bpf's VM loads words big-endian where the kernel loads
// seccomp_data in host order, so the records are written big-endian.)
func TestNoHugepageFilterProgram(t *testing.T) {
	raw, err := noHugepageFilter()
	if err != nil {
		t.Fatal(err)
	}
	insns, ok := bpf.Disassemble(raw)
	if !ok {
		t.Fatal("disassemble")
	}
	vm, err := bpf.NewVM(insns)
	if err != nil {
		t.Fatal(err)
	}
	data := func(arch, nr uint32, args ...uint64) []byte {
		b := make([]byte, 64)
		be := binary.BigEndian
		be.PutUint32(b[0:], nr)
		be.PutUint32(b[4:], arch)
		for i, a := range args {
			// The low half of each argument, where the kernel's
			// little-endian layout has it (offset 16+8i).
			be.PutUint32(b[16+8*i:], uint32(a))
			be.PutUint32(b[20+8*i:], uint32(a>>32))
		}
		return b
	}
	const x86 = unix.AUDIT_ARCH_X86_64
	errno := unix.SECCOMP_RET_ERRNO | uint32(unix.EINVAL)
	for _, c := range []struct {
		name string
		in   []byte
		want uint32
	}{
		{"madvise hugepage", data(x86, unix.SYS_MADVISE, 0x7f0000000000, 1<<30, unix.MADV_HUGEPAGE), errno},
		{"madvise dontneed", data(x86, unix.SYS_MADVISE, 0x7f0000000000, 1<<30, unix.MADV_DONTNEED), unix.SECCOMP_RET_ALLOW},
		{"madvise nohugepage", data(x86, unix.SYS_MADVISE, 0, 0, unix.MADV_NOHUGEPAGE), unix.SECCOMP_RET_ALLOW},
		{"mmap with 14 as third argument", data(x86, unix.SYS_MMAP, 0, 4096, unix.MADV_HUGEPAGE), unix.SECCOMP_RET_ALLOW},
		{"other architecture", data(unix.AUDIT_ARCH_AARCH64, unix.SYS_MADVISE, 0, 0, unix.MADV_HUGEPAGE), unix.SECCOMP_RET_ALLOW},
	} {
		got, err := vm.Run(c.in)
		if err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if uint32(got) != c.want {
			t.Errorf("%s: %#x, want %#x", c.name, got, c.want)
		}
	}
}
