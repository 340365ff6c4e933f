// Package nodetest runs real vhive daemons for tests and builds the images
// they run.
//
// A Node is a `vhive daemon` process, built from this tree (Shared.Bin),
// with its own state dir, control socket, gateway port, network-name prefix
// and subnet: started, stopped with SIGTERM or killed with SIGKILL by its
// PID, restarted on the same state, and measured (RSS, open files,
// goroutines, Prometheus metrics). It runs as a process of its own, not in
// the test binary, so that what the CLI and `vhive invoker` see is what a
// user sees, and so that a kill is a real crash.
//
// Every daemon runs in a tracking cgroup of its own (pids hierarchy in
// cgroup v1, the unified one in v2), entered by a shell before it execs the
// daemon, so every process the daemon or its children fork stays accounted
// for: the OCI runtimes move container processes into their own /vhive/…
// cgroups, which Snapshot lists, and everything else stays in the tracking
// cgroup until it exits (TrackedProcs).
//
// Tests that serve a daemon in-process (internal/daemon, functions/python)
// use Connect and the image builders of Shared.
//
// It is a test helper: only tests import it.
package nodetest

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"golang.org/x/sys/unix"
	"vhive.dev/vhive/internal/testutil"
)

// Full reports whether the full suite runs (VHIVE_RELIABILITY=full, `make
// reliability`); otherwise the fast subset of `make test`.
func Full() bool { return os.Getenv("VHIVE_RELIABILITY") == "full" }

// Shared is a directory shared by the tests of one test binary (built
// binaries and images), removed by Cleanup from TestMain. The worker
// processes of `go test -fuzz` use their coordinator's directory (found by
// the parent's PID), so that what the coordinator built before f.Fuzz is
// not built again in every worker.
type Shared struct {
	once sync.Once
	dir  string
	err  error
	mu   sync.Mutex
}

// FuzzWorker reports whether this process is a worker of `go test -fuzz`.
func FuzzWorker() bool {
	for _, a := range os.Args {
		if strings.HasPrefix(a, "-test.fuzzworker") {
			return true
		}
	}
	return false
}

// Dir returns the shared directory, creating it on first use.
func (s *Shared) Dir(t testing.TB) string {
	t.Helper()
	s.once.Do(func() {
		owner := os.Getpid()
		if FuzzWorker() {
			owner = os.Getppid()
		}
		s.dir = filepath.Join(os.TempDir(), fmt.Sprintf("vhive-nodetest-%d", owner))
		s.err = os.MkdirAll(s.dir, 0o755)
	})
	if s.err != nil {
		t.Fatal(s.err)
	}
	return s.dir
}

// Cleanup removes the shared directory (not in a fuzz worker: its
// coordinator owns it).
func (s *Shared) Cleanup() {
	if s.dir != "" && !FuzzWorker() {
		os.RemoveAll(s.dir)
	}
}

// cached returns dir/name, calling make to create it unless dir/name/done
// (dir/name itself if done is "") exists.
func (s *Shared) cached(t testing.TB, name, done string, make func(path string)) string {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	p := filepath.Join(s.Dir(t), name)
	if _, err := os.Stat(filepath.Join(p, done)); err == nil {
		return p
	}
	make(p)
	return p
}

func moduleRoot(t testing.TB) string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		t.Fatalf("go env GOMOD: %v", err)
	}
	return filepath.Dir(strings.TrimSpace(string(out)))
}

// Bin builds the vhive binary from this tree (once per test binary).
func (s *Shared) Bin(t testing.TB) string {
	t.Helper()
	return s.cached(t, "vhive", "", func(bin string) {
		cmd := exec.Command("go", "build", "-o", bin+".tmp", "./cmd/vhive")
		cmd.Dir = moduleRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build vhive: %v\n%s", err, out)
		}
		if err := os.Rename(bin+".tmp", bin); err != nil {
			t.Fatal(err)
		}
	})
}

// Port returns a 127.0.0.1 address for a server that is told its address
// before it binds (a daemon's gateway, metrics or control TCP address): see
// testutil.Port, which reserves it against every other test on the machine
// and lies below the ephemeral port range.
func Port(t testing.TB) string {
	t.Helper()
	return testutil.Port(t)
}

// RefusedAddr returns a 127.0.0.1 address where every connection is refused
// until release is called: a TCP socket bound there (a kernel-chosen port)
// that never listens. While it is held nobody else can bind or listen on the
// port (it has no SO_REUSEADDR) and connect() never picks it as a local
// port, so unlike a port merely believed free, nothing can answer there.
func RefusedAddr() (addr string, release func(), err error) {
	fd, err := unix.Socket(unix.AF_INET, unix.SOCK_STREAM|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return "", nil, fmt.Errorf("nodetest: socket: %w", err)
	}
	if err := unix.Bind(fd, &unix.SockaddrInet4{Addr: [4]byte{127, 0, 0, 1}}); err != nil {
		unix.Close(fd)
		return "", nil, fmt.Errorf("nodetest: bind 127.0.0.1:0: %w", err)
	}
	sa, err := unix.Getsockname(fd)
	if err != nil {
		unix.Close(fd)
		return "", nil, fmt.Errorf("nodetest: getsockname: %w", err)
	}
	return fmt.Sprintf("127.0.0.1:%d", sa.(*unix.SockaddrInet4).Port), func() { unix.Close(fd) }, nil
}
