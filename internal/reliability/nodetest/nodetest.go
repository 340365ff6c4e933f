// Package nodetest runs a real vhive daemon process for the reliability
// tests: the vhive binary built from this tree, its own state dir, control
// socket, gateway port, network-name prefix and subnet, stopped by its PID
// when the test ends. It also packages test functions as OCI images.
//
// The daemon runs as a separate process (not in the test binary) so that a
// test can measure its RSS, open files and goroutines, and so that what the
// CLI and `vhive invoker` see is what a user sees.
package nodetest

import (
	"archive/tar"
	"bufio"
	"bytes"
	"context"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/build"
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
		s.dir = filepath.Join(os.TempDir(), fmt.Sprintf("vhive-reliability-%d", owner))
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

// cached returns dir/name, calling make to create it unless it exists.
func (s *Shared) cached(t testing.TB, name string, make func(path string)) string {
	t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	p := filepath.Join(s.Dir(t), name)
	if _, err := os.Stat(p); err == nil {
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
	return s.cached(t, "vhive", func(bin string) {
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

// Helloworld packages functions/helloworld as an OCI layout (ref
// localhost/vhive/helloworld:latest).
func (s *Shared) Helloworld(t testing.TB) string {
	t.Helper()
	return s.cached(t, "images/helloworld", func(want string) {
		imgs, err := build.BuildFunction(context.Background(), build.Options{Function: "helloworld", OutDir: filepath.Dir(want), Formats: []build.Format{build.FormatLayout}})
		if err != nil {
			t.Fatalf("build helloworld image: %v", err)
		}
		if imgs[0].Layout != want {
			t.Fatalf("helloworld layout at %s, want %s", imgs[0].Layout, want)
		}
	})
}

// GoImage compiles the Go main package pkg (a path relative to the module
// root, e.g. "./internal/reliability/isolation/testdata/netprobe"),
// statically, and packages it as an OCI layout whose entrypoint is the
// binary, with image ref ref.
func (s *Shared) GoImage(t testing.TB, pkg, ref string) string {
	t.Helper()
	name := filepath.Base(pkg)
	return s.cached(t, "images/"+name, func(out string) {
		bin := out + ".bin"
		cmd := exec.Command("go", "build", "-trimpath", "-o", bin, pkg)
		cmd.Dir = moduleRoot(t)
		cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Fatalf("build %s: %v\n%s", pkg, err, out)
		}
		data, err := os.ReadFile(bin)
		if err != nil {
			t.Fatal(err)
		}
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, d := range []string{"usr/", "usr/local/", "usr/local/bin/", "tmp/"} {
			_ = tw.WriteHeader(&tar.Header{Name: d, Typeflag: tar.TypeDir, Mode: 0o755})
		}
		_ = tw.WriteHeader(&tar.Header{Name: "usr/local/bin/" + name, Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(data))})
		_, _ = tw.Write(data)
		_ = tw.Close()
		layer, err := tarball.LayerFromReader(&buf)
		if err != nil {
			t.Fatal(err)
		}
		img, err := mutate.AppendLayers(empty.Image, layer)
		if err != nil {
			t.Fatal(err)
		}
		img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64", Config: v1.Config{
			Entrypoint: []string{"/usr/local/bin/" + name}, Env: []string{"GUEST_PORT=50051"}, WorkingDir: "/"}})
		if err != nil {
			t.Fatal(err)
		}
		p, err := layout.Write(out, empty.Index)
		if err != nil {
			t.Fatal(err)
		}
		if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": ref})); err != nil {
			t.Fatal(err)
		}
	})
}

// Port returns a free 127.0.0.1 port in [46000, 47000), the range of these
// tests, starting at 46000+offset: each test binary passes its own offset.
func Port(t testing.TB, offset int) string {
	t.Helper()
	for p := 46000 + offset; p < 47000; p++ {
		l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", p))
		if err != nil {
			continue
		}
		l.Close()
		return l.Addr().String()
	}
	t.Fatalf("no free port in 127.0.0.1:46000-46999 from %d", 46000+offset)
	return ""
}

// Options configure a Node.
type Options struct {
	// NetPrefix names the daemon's netns and veths (at most 8 characters,
	// starting with "h3b" for these tests).
	NetPrefix string
	// Subnet is the instance subnet, inside 10.188.0.0/16.
	Subnet string
	// PortOffset picks where Port starts looking for the gateway port.
	PortOffset int
	// NoGateway turns the data plane off (--gateway off).
	NoGateway bool
	// Args are extra daemon flags.
	Args []string
	// Env are extra environment variables of the daemon.
	Env []string
}

// Node is a running daemon process.
type Node struct {
	Bin      string
	StateDir string
	Socket   string
	Gateway  string
	Log      string
	Client   vhivepb.ControlClient

	args []string
	env  []string
	cmd  *exec.Cmd
	conn *grpc.ClientConn
	done chan struct{}
	err  error
}

// Start starts a daemon and waits until its control socket answers. The
// daemon is stopped (SIGTERM by PID, SIGKILL after 30 s) when t ends.
func Start(t testing.TB, bin string, o Options) *Node {
	t.Helper()
	testutil.RequiresRoot(t)
	dir := t.TempDir()
	n := &Node{Bin: bin, StateDir: filepath.Join(dir, "state"), Socket: filepath.Join(dir, "vhive.sock"),
		Gateway: "off", Log: filepath.Join(dir, "daemon.log"), done: make(chan struct{})}
	if !o.NoGateway {
		n.Gateway = Port(t, o.PortOffset)
	}
	args := []string{"daemon", "--state-dir", n.StateDir, "--socket", n.Socket, "--gateway", n.Gateway,
		"--runsc", testutil.RunscPath(t), "--runc", testutil.RuncPath(t), "--sandboxes", "gvisor,runc",
		"--net-pool-size", "1", "--net-prefix", o.NetPrefix, "--subnet", o.Subnet, "--log-level", "debug"}
	n.args = append(args, o.Args...)
	n.env = append(os.Environ(), o.Env...)
	t.Cleanup(n.Stop)
	n.start(t)
	return n
}

// Restart stops the daemon and starts it again on the same state.
func (n *Node) Restart(t testing.TB) {
	t.Helper()
	n.Stop()
	if n.err != nil {
		t.Fatalf("daemon stopped with %v\n%s", n.err, n.LogTail(4096))
	}
	n.done = make(chan struct{})
	n.start(t)
}

func (n *Node) start(t testing.TB) {
	t.Helper()
	logf, err := os.OpenFile(n.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	n.cmd = exec.Command(n.Bin, n.args...)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.Env = n.env
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := n.cmd.Start(); err != nil {
		logf.Close()
		t.Fatalf("start daemon: %v", err)
	}
	go func() {
		n.err = n.cmd.Wait()
		logf.Close()
		close(n.done)
	}()
	deadline := time.Now().Add(30 * time.Second)
	for {
		select {
		case <-n.done:
			t.Fatalf("daemon exited at start: %v\n%s", n.err, n.LogTail(4096))
		default:
		}
		if c, err := net.Dial("unix", n.Socket); err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon socket %s did not appear in 30s\n%s", n.Socket, n.LogTail(4096))
		}
		time.Sleep(20 * time.Millisecond)
	}
	n.conn, err = grpc.NewClient("unix://"+n.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	n.Client = vhivepb.NewControlClient(n.conn)
}

// Pid is the daemon's process ID.
func (n *Node) Pid() int { return n.cmd.Process.Pid }

// Alive reports whether the daemon process still runs.
func (n *Node) Alive() bool {
	select {
	case <-n.done:
		return false
	default:
		return true
	}
}

// Stop stops the daemon by its PID and waits for it; idempotent.
func (n *Node) Stop() {
	if n.conn != nil {
		n.conn.Close()
		n.conn = nil
	}
	if !n.Alive() {
		return
	}
	_ = n.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-n.done:
	case <-time.After(30 * time.Second):
		fmt.Fprintf(os.Stderr, "nodetest: daemon %d did not stop in 30s after SIGTERM; killing it\n", n.Pid())
		_ = n.cmd.Process.Kill()
		<-n.done
	}
}

// LogTail returns the last max bytes of the daemon's log.
func (n *Node) LogTail(max int) string {
	b, _ := os.ReadFile(n.Log)
	if len(b) > max {
		b = b[len(b)-max:]
	}
	return string(b)
}

// LogTailAll returns the daemon's whole log.
func (n *Node) LogTailAll() string {
	b, _ := os.ReadFile(n.Log)
	return string(b)
}

// LogContains reports whether the daemon's log holds s.
func (n *Node) LogContains(s string) bool {
	b, _ := os.ReadFile(n.Log)
	return bytes.Contains(b, []byte(s))
}

// Import imports an OCI layout and returns its ref.
func (n *Node) Import(t testing.TB, path string) string {
	t.Helper()
	im, err := n.Client.ImportImage(context.Background(), &vhivepb.ImportImageRequest{Path: path})
	if err != nil {
		t.Fatalf("import %s: %v", path, err)
	}
	return im.Ref
}

// Deploy deploys spec, failing the test on error.
func (n *Node) Deploy(t testing.TB, spec *vhivepb.FunctionSpec) {
	t.Helper()
	if _, err := n.Client.Deploy(context.Background(), &vhivepb.DeployRequest{Spec: spec}); err != nil {
		t.Fatalf("deploy %s: %v", spec.Name, err)
	}
}

// Usage is what a process holds at one moment.
type Usage struct {
	RSS        int64 // bytes (VmRSS)
	FDs        int
	Threads    int
	Goroutines int // from the daemon's /metrics (go_goroutines), -1 if unknown
}

func (u Usage) String() string {
	return fmt.Sprintf("RSS %.1f MiB, %d fds, %d threads, %d goroutines", float64(u.RSS)/(1<<20), u.FDs, u.Threads, u.Goroutines)
}

// ProcUsage reads RSS, open fds and threads of pid from /proc.
func ProcUsage(pid int) (Usage, error) {
	u := Usage{Goroutines: -1}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return u, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, ok := strings.Cut(sc.Text(), ":")
		if !ok {
			continue
		}
		fs := strings.Fields(v)
		if len(fs) == 0 {
			continue
		}
		x, _ := strconv.ParseInt(fs[0], 10, 64)
		switch k {
		case "VmRSS":
			u.RSS = x << 10
		case "Threads":
			u.Threads = int(x)
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		return u, err
	}
	u.FDs = len(ents)
	return u, nil
}

// Usage reads the daemon's usage; with metrics (the daemon's --metrics
// address) set it also reads go_goroutines.
func (n *Node) Usage(metrics string) (Usage, error) {
	u, err := ProcUsage(n.Pid())
	if err != nil || metrics == "" {
		return u, err
	}
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		return u, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "go_goroutines "); ok {
			g, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
			if err == nil {
				u.Goroutines = int(g)
			}
		}
	}
	return u, sc.Err()
}

// Metric returns the sum of the samples of a Prometheus metric whose line
// starts with prefix (e.g. `vhive_invocations_total{function="f",kind="cold"}`).
func Metric(metrics, prefix string) (float64, error) {
	resp, err := http.Get("http://" + metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	var sum float64
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, "#") || !strings.HasPrefix(line, prefix) {
			continue
		}
		fs := strings.Fields(line)
		v, err := strconv.ParseFloat(fs[len(fs)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum, sc.Err()
}
