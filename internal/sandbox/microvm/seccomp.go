package microvm

import (
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"strings"

	"golang.org/x/sys/unix"
)

// QEMU madvise(MADV_HUGEPAGE)s guest RAM (ram_block_add, unconditionally,
// ignoring the result; no option turns it off). On a file-backed mapping
// the host kernel then reads two 2 MiB folios around every fault, whatever
// the read-ahead setting: a restored guest that touches 7.7 MiB pulls in
// 100+ MiB, and a working set recorded from the page cache is that large.
//
// The launcher below removes the advice for one QEMU process: the running
// binary re-executes itself (launcherEnv set), installs a seccomp filter on
// its only thread — madvise(…, MADV_HUGEPAGE) fails with EINVAL, every
// other system call is allowed — and execve's QEMU, which inherits the
// filter. Go cannot run code between fork and exec, and a filter installed
// in the daemon itself would apply to the daemon; this one applies to QEMU
// and nothing else. The filter needs PR_SET_NO_NEW_PRIVS, which QEMU
// inherits (a setuid helper it ran would lose its privileges; vhive hands
// QEMU an open tap fd and runs none). It is not a security boundary (the
// x32 ABI is not covered); it only changes a performance hint.

// launcherEnv, set to launcherNoHugepage, makes this package's init run
// the launcher instead of the program.
const (
	launcherEnv        = "VHIVE_MICROVM_LAUNCHER"
	launcherNoHugepage = "nohugepage"
)

func init() {
	if os.Getenv(launcherEnv) == launcherNoHugepage {
		runLauncher()
	}
}

// runLauncher installs the filter and execs os.Args[1:]; it never returns.
func runLauncher() {
	runtime.LockOSThread() // the filter and execve on the same thread
	env := make([]string, 0, len(os.Environ()))
	for _, kv := range os.Environ() {
		if !strings.HasPrefix(kv, launcherEnv+"=") {
			env = append(env, kv)
		}
	}
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "vhive microvm launcher: no program to run")
		os.Exit(127)
	}
	if err := installNoHugepageFilter(); err != nil {
		fmt.Fprintf(os.Stderr, "vhive microvm launcher: %v\n", err)
		os.Exit(127)
	}
	err := unix.Exec(os.Args[1], os.Args[1:], env)
	fmt.Fprintf(os.Stderr, "vhive microvm launcher: exec %s: %v\n", os.Args[1], err)
	os.Exit(127)
}

// launcherCommand returns a command that runs path with args under the
// no-hugepage filter.
func launcherCommand(path string, args ...string) *exec.Cmd {
	cmd := exec.Command("/proc/self/exe", append([]string{path}, args...)...)
	cmd.Args[0] = "vhive-microvm-launcher"
	cmd.Env = append(os.Environ(), launcherEnv+"="+launcherNoHugepage)
	return cmd
}
