package nodetest

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/testutil"
)

// Options configure a Node.
type Options struct {
	// NetPrefix names the daemon's netns and veths (at most 8 characters)
	// and Subnet is its instance subnet: each test uses its own.
	NetPrefix string
	Subnet    string
	// Sandboxes is --sandboxes (default "gvisor,runc").
	Sandboxes string
	// StateDir is --state-dir (default: a new directory of the test). Set
	// it to start a daemon on the state another one left; keep it short
	// then, wasm worker sockets live under it. The control socket is
	// StateDir/vhive.sock.
	StateDir string
	// Log is the file the daemon's output is appended to (default: next to
	// the default state dir; never in the state dir, which may be a full
	// file system).
	Log string
	// NoGateway turns the data plane off (--gateway off); otherwise the
	// gateway listens on an address from Port.
	NoGateway bool
	// Metrics, if set, is --metrics (an address from Port).
	Metrics string
	// Args are extra daemon flags.
	Args []string
	// Env are extra environment variables of the daemon.
	Env []string
}

// Node is a running daemon process.
type Node struct {
	// Opts are the options it was started with, defaults filled in:
	// Start(t, n.Bin, n.Opts) starts another daemon on the same state.
	Opts     Options
	Bin      string
	StateDir string
	Socket   string
	Gateway  string // "off" with NoGateway
	Log      string
	Client   vhivepb.ControlClient

	args   []string
	env    []string
	cmd    *exec.Cmd
	conn   *grpc.ClientConn
	cgroup string // tracking cgroup directory, "" once removed
	done   chan struct{}
	err    error
}

// Start starts a daemon and waits until its control socket answers. The
// daemon is stopped (Stop) when t ends.
func Start(t testing.TB, bin string, o Options) *Node {
	t.Helper()
	testutil.RequiresRoot(t)
	if o.StateDir == "" || o.Log == "" {
		dir := t.TempDir()
		if o.StateDir == "" {
			o.StateDir = filepath.Join(dir, "state")
		}
		if o.Log == "" {
			o.Log = filepath.Join(dir, "daemon.log")
		}
	}
	if o.Sandboxes == "" {
		o.Sandboxes = "gvisor,runc"
	}
	n := &Node{Opts: o, Bin: bin, StateDir: o.StateDir, Socket: filepath.Join(o.StateDir, "vhive.sock"), Gateway: "off", Log: o.Log}
	if !o.NoGateway {
		n.Gateway = Port(t)
	}
	n.args = []string{"daemon", "--state-dir", n.StateDir, "--socket", n.Socket, "--gateway", n.Gateway,
		"--runsc", testutil.RunscPath(t), "--runc", testutil.RuncPath(t), "--sandboxes", o.Sandboxes,
		"--net-pool-size", "1", "--net-prefix", o.NetPrefix, "--subnet", o.Subnet, "--wasm-pool", "0", "--log-level", "debug"}
	if o.Metrics != "" {
		n.args = append(n.args, "--metrics", o.Metrics)
	}
	n.args = append(n.args, o.Args...)
	n.env = append(os.Environ(), o.Env...)
	t.Cleanup(func() {
		if err := n.Stop(); err != nil {
			t.Error(err)
		}
	})
	n.start(t)
	return n
}

// Restart stops the daemon (it must exit cleanly) and starts it again on
// the same state.
func (n *Node) Restart(t testing.TB) {
	t.Helper()
	if err := n.Stop(); err != nil {
		t.Fatal(err)
	}
	if n.err != nil {
		t.Fatalf("daemon stopped with %v\n%s", n.err, n.LogTail(4096))
	}
	n.start(t)
}

// trackingRoot is the cgroup hierarchy tracking cgroups are made in.
func trackingRoot() string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return "/sys/fs/cgroup" // v2
	}
	return "/sys/fs/cgroup/pids"
}

func (n *Node) start(t testing.TB) {
	t.Helper()
	// A socket left by a killed daemon would look like a ready one.
	if err := os.Remove(n.Socket); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	cg, err := os.MkdirTemp(trackingRoot(), "vnt-")
	if err != nil {
		t.Fatalf("create tracking cgroup: %v", err)
	}
	logf, err := os.OpenFile(n.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		os.Remove(cg)
		t.Fatal(err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "=== %s: vhive %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(n.args, " "))
	// The shell moves itself into the tracking cgroup, then becomes the
	// daemon: nothing the daemon starts escapes the accounting.
	n.cmd = exec.Command("/bin/sh", append([]string{"-c", `echo $$ > "$0/cgroup.procs" && exec "$@"`, cg, n.Bin}, n.args...)...)
	n.cmd.Stdout, n.cmd.Stderr = logf, logf
	n.cmd.Env = n.env
	n.cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := n.cmd.Start(); err != nil {
		os.Remove(cg)
		t.Fatalf("start daemon: %v", err)
	}
	n.cgroup, n.err, n.done = cg, nil, make(chan struct{})
	go func(cmd *exec.Cmd, done chan struct{}) {
		n.err = cmd.Wait()
		close(done)
	}(n.cmd, n.done)
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	n.conn, err = Connect(ctx, n.Socket, n.done)
	if err != nil {
		if !n.Alive() {
			err = fmt.Errorf("%w: %v", err, n.err)
		}
		t.Fatalf("%v; log %s:\n%s", err, n.Log, n.LogTail(4096))
	}
	n.Client = vhivepb.NewControlClient(n.conn)
}

// ErrExited is what Connect returns when the daemon ended first.
var ErrExited = errors.New("the daemon ended before it answered")

// Connect waits until the daemon serving the control socket at socket
// answers a call and returns a connection to it. It gives up when ctx ends
// or exited is closed (the daemon ended: ErrExited). For daemons started by
// Start and served in-process alike.
func Connect(ctx context.Context, socket string, exited <-chan struct{}) (*grpc.ClientConn, error) {
	for {
		if _, err := os.Stat(socket); err == nil {
			break
		}
		select {
		case <-exited:
			return nil, ErrExited
		case <-ctx.Done():
			return nil, fmt.Errorf("control socket %s did not appear: %w", socket, ctx.Err())
		case <-time.After(20 * time.Millisecond):
		}
	}
	conn, err := grpc.NewClient("unix://"+socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, err
	}
	// A daemon that ends cancels the wait for its answer.
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	go func() {
		select {
		case <-exited:
			cancel()
		case <-ctx.Done():
		}
	}()
	if _, err := vhivepb.NewControlClient(conn).ListFunctions(ctx, &vhivepb.ListFunctionsRequest{}, grpc.WaitForReady(true)); err != nil {
		conn.Close()
		select {
		case <-exited:
			return nil, ErrExited
		default:
		}
		return nil, fmt.Errorf("daemon on %s does not answer: %w", socket, err)
	}
	return conn, nil
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

// Kill sends SIGKILL to the daemon (by its PID) and waits for it to end.
// What it started stays (TrackedProcs) until Stop.
func (n *Node) Kill(t testing.TB) {
	t.Helper()
	// Killed before the connection closes: a closed connection would
	// cancel in-flight calls and let the daemon end them cleanly.
	if n.Alive() {
		if err := syscall.Kill(n.Pid(), syscall.SIGKILL); err != nil {
			t.Fatalf("kill daemon %d: %v", n.Pid(), err)
		}
	}
	<-n.done
	n.closeConn()
}

func (n *Node) closeConn() {
	if n.conn != nil {
		n.conn.Close()
		n.conn = nil
	}
}

// Stop ends the daemon with SIGTERM by its PID (SIGKILL after 60 s), then
// kills what is left in its tracking cgroup (only processes this daemon
// started) and removes the cgroup. Idempotent; it fails only if the cgroup
// stays.
func (n *Node) Stop() error {
	n.closeConn()
	if n.Alive() {
		_ = syscall.Kill(n.Pid(), syscall.SIGTERM)
		select {
		case <-n.done:
		case <-time.After(60 * time.Second):
			fmt.Fprintf(os.Stderr, "nodetest: daemon %d did not stop in 60s after SIGTERM; killing it\n", n.Pid())
			_ = syscall.Kill(n.Pid(), syscall.SIGKILL)
			<-n.done
		}
	}
	if n.cgroup == "" {
		return nil
	}
	for try := 0; try < 100; try++ {
		data, _ := os.ReadFile(filepath.Join(n.cgroup, "cgroup.procs"))
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if err := os.Remove(n.cgroup); err == nil || os.IsNotExist(err) {
			n.cgroup = ""
			return nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return fmt.Errorf("tracking cgroup %s of daemon %d could not be removed", n.cgroup, n.Pid())
}

// TrackedProcs lists the live processes in the daemon's tracking cgroup
// (the daemon itself while it runs), with their command lines.
func (n *Node) TrackedProcs() []string {
	if n.cgroup == "" {
		return nil
	}
	data, err := os.ReadFile(filepath.Join(n.cgroup, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []string
	for _, f := range strings.Fields(string(data)) {
		pid, _ := strconv.Atoi(f)
		b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		out = append(out, fmt.Sprintf("pid %d %s", pid, strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))))
	}
	return out
}

// LogTail returns the last max bytes of the daemon's log.
func (n *Node) LogTail(max int64) string {
	f, err := os.Open(n.Log)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > max {
		_, _ = f.Seek(fi.Size()-max, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// LogAll returns the daemon's whole log.
func (n *Node) LogAll() string {
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
	u.FDs, err = fdCount(pid)
	return u, err
}

func fdCount(pid int) (int, error) {
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	return len(ents), err
}

// FDs counts the daemon's open file descriptors.
func (n *Node) FDs() int {
	c, _ := fdCount(n.Pid())
	return c
}

// Usage reads the daemon's usage, with go_goroutines from its metrics if
// it serves them (Options.Metrics).
func (n *Node) Usage() (Usage, error) {
	u, err := ProcUsage(n.Pid())
	if err != nil || n.Opts.Metrics == "" {
		return u, err
	}
	g, err := n.metric("go_goroutines")
	if err == nil {
		u.Goroutines = int(g)
	}
	return u, err
}

// Metric returns the sum of the samples of a Prometheus metric from the
// daemon's metrics (Options.Metrics): name is a family (every label set)
// or a family with labels (`vhive_invocations_total{function="f",kind="cold"}`).
func (n *Node) Metric(t testing.TB, name string) float64 {
	t.Helper()
	v, err := n.metric(name)
	if err != nil {
		t.Fatalf("metric %s: %v", name, err)
	}
	return v
}

func (n *Node) metric(name string) (float64, error) {
	if n.Opts.Metrics == "" {
		return 0, errors.New("the daemon serves no metrics (Options.Metrics)")
	}
	// No keep-alive: a connection left open would count as one of the
	// daemon's descriptors (FDs).
	cl := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}
	resp, err := cl.Get("http://" + n.Opts.Metrics + "/metrics")
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		rest, ok := strings.CutPrefix(sc.Text(), name)
		if !ok || rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(rest)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum += v
		}
	}
	return sum, sc.Err()
}
