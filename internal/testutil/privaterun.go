package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
)

// privateRunEnv names the test a child process of InPrivateRun runs.
const privateRunEnv = "VHIVE_TEST_PRIVATE_RUN"

// InPrivateRun runs the calling top-level test again in a child process of
// the test binary with a mount namespace of its own (every mount private)
// and an empty tmpfs on /run, and reports false once the child passed; in
// the child it reports true and the test does its work. What the test
// mounts under /run (named network namespaces in /run/netns) is gone with
// the child even when it fails, and no other process on the machine sees
// it or has its own /run/netns disturbed. The child's output is logged.
func InPrivateRun(t *testing.T) bool {
	t.Helper()
	RequiresRoot(t)
	if os.Getenv(privateRunEnv) == t.Name() {
		run, err := filepath.EvalSymlinks("/var/run")
		if err != nil {
			t.Fatal(err)
		}
		if err := syscall.Mount("tmpfs", run, "tmpfs", 0, "mode=0755"); err != nil {
			t.Fatalf("mount a tmpfs on %s in the private mount namespace: %v", run, err)
		}
		return true
	}
	cmd := exec.Command(os.Args[0], "-test.run=^"+t.Name()+"$", "-test.count=1", "-test.v")
	cmd.Env = append(os.Environ(), privateRunEnv+"="+t.Name())
	// Go makes every mount of the new namespace private (MS_REC|MS_PRIVATE
	// on /) before it execs the child.
	cmd.SysProcAttr = &syscall.SysProcAttr{Unshareflags: syscall.CLONE_NEWNS}
	out, err := cmd.CombinedOutput()
	t.Logf("in a private mount namespace:\n%s", out)
	if err != nil {
		t.Fatalf("%s in a private mount namespace: %v", t.Name(), err)
	}
	return false
}
