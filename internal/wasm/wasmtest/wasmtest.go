// Package wasmtest holds helpers for tests of the wasm runtime and sandbox:
// building the test guest and running the test binary as a wasm worker.
package wasmtest

import (
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"runtime"
	"syscall"
	"testing"

	"vhive.dev/vhive/internal/wasm"
)

// WorkerEnv, set to 1, makes a test binary run as a wasm worker (see
// RunWorkerIfRequested).
const WorkerEnv = "VHIVE_TEST_WASM_WORKER"

// RunWorkerIfRequested turns the test binary into a wasm worker when it was
// started as one: with WorkerEnv set (WorkerCommand), or with the arguments
// a daemon's wasm backend gives its own executable by default ("internal
// wasm-worker …", as to `vhive internal wasm-worker`), which is the test
// binary when a test serves a daemon in-process. Call it first in TestMain.
// It does not return then.
func RunWorkerIfRequested() {
	var args []string
	switch {
	case os.Getenv(WorkerEnv) == "1":
		args = os.Args[1:]
	case len(os.Args) > 2 && os.Args[1] == "internal" && os.Args[2] == "wasm-worker":
		args = os.Args[3:]
	default:
		return
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	err := wasm.WorkerMain(ctx, args)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "wasm worker:", err)
		os.Exit(1)
	}
	os.Exit(0)
}

// WorkerCommand is the argv prefix that re-executes the test binary as a
// worker; pass WorkerEnv=1 in its environment (WorkerEnvList).
func WorkerCommand(t testing.TB) []string {
	t.Helper()
	exe, err := os.Executable()
	if err != nil {
		t.Fatalf("find test executable: %v", err)
	}
	return []string{exe}
}

// WorkerEnvList is the environment a re-executed worker needs.
func WorkerEnvList() []string { return []string{WorkerEnv + "=1"} }

// CompileCacheDir is a wazero compilation cache shared by every test run on
// this machine (wazero keys entries by module hash and wazero version).
func CompileCacheDir() string { return filepath.Join(os.TempDir(), "vhive-wasm-test-compiled") }

func sourceDir() string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Join(filepath.Dir(file), "..", "testdata", "guest")
}

// GuestModule builds the test guest (internal/wasm/testdata/guest) with
// GOOS=wasip1 -buildmode=c-shared and returns the module's path. Builds are
// kept in the temporary directory by source hash and reused.
func GuestModule(t testing.TB) string {
	t.Helper()
	return buildModule(t, sourceDir(), ".", "guest")
}

// FunctionModule builds vhive.dev/vhive/functions/<name> as a wasip1 reactor
// and returns the module's path (rebuilt when its sources change).
func FunctionModule(t testing.TB, name string) string {
	t.Helper()
	root := filepath.Join(sourceDir(), "..", "..", "..", "..")
	return buildModule(t, root, "./functions/"+name, name)
}

func buildModule(t testing.TB, dir, pkg, name string) string {
	t.Helper()
	h := sha256.New()
	h.Write([]byte(runtime.Version()))
	srcs, _ := filepath.Glob(filepath.Join(dir, pkg, "*.go"))
	sdk, _ := filepath.Glob(filepath.Join(dir, "functions", "sdk", "*.go"))
	for _, f := range append(srcs, sdk...) {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatalf("read wasm source: %v", err)
		}
		h.Write([]byte(f))
		h.Write(b)
	}
	if len(srcs) == 0 {
		t.Fatalf("no Go sources in %s", filepath.Join(dir, pkg))
	}
	out := filepath.Join(os.TempDir(), fmt.Sprintf("vhive-wasm-%s-%x.wasm", name, h.Sum(nil)[:8]))
	if _, err := os.Stat(out); err == nil {
		return out
	}
	goBin := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(goBin); err != nil {
		if goBin, err = exec.LookPath("go"); err != nil {
			t.Fatalf("go toolchain not found to build the wasm module: %v", err)
		}
	}
	tmp := out + fmt.Sprintf(".%d.tmp", os.Getpid())
	cmd := exec.Command(goBin, "build", "-buildmode=c-shared", "-o", tmp, pkg)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "GOOS=wasip1", "GOARCH=wasm", "CGO_ENABLED=0")
	if outp, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build wasm module %s: %v\n%s", pkg, err, outp)
	}
	if err := os.Rename(tmp, out); err != nil {
		t.Fatalf("store wasm module: %v", err)
	}
	return out
}
