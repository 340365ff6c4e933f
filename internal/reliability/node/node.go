// Package node runs a real `vhive daemon` process, built from this source
// tree, for the reliability tests: started, killed with SIGKILL, restarted on
// the same state directory, and inspected for what it left on the machine.
//
// Every daemon runs in a tracking cgroup of its own (pids hierarchy in
// cgroup v1, the unified one in v2), entered by a shell before it execs the
// daemon, so every process the daemon or its children fork stays accounted
// for: the OCI runtimes move container processes into their own /vhive/…
// cgroups, which Leftovers checks as well, and everything else stays in the
// tracking cgroup until it exits.
//
// It is a test helper: only tests import it.
package node

import (
	"bufio"
	"context"
	"fmt"
	"hash/crc32"
	"io"
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

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// buildOnce builds the vhive binary once per test process.
var buildOnce = sync.OnceValues(func() (string, error) {
	out, err := exec.Command("go", "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := filepath.Dir(strings.TrimSpace(string(out)))
	if err := os.MkdirAll(binDir(), 0o755); err != nil {
		return "", err
	}
	bin := filepath.Join(binDir(), "vhive")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/vhive")
	cmd.Dir = mod
	if b, err := cmd.CombinedOutput(); err != nil {
		return "", fmt.Errorf("go build ./cmd/vhive: %v\n%s", err, b)
	}
	return bin, nil
})

// Cleanup removes what Binary and ImageDir made (call it from TestMain).
func Cleanup() { os.RemoveAll(sharedDir()) }

// sharedDir holds this test process's vhive binary and images.
func sharedDir() string { return filepath.Join(os.TempDir(), fmt.Sprintf("vhive-rel-%d", os.Getpid())) }

func binDir() string { return filepath.Join(sharedDir(), "bin") }

// ImageDir is where the tests of one process build their images (shared by
// the tests of a package, removed by Cleanup).
func ImageDir() string { return filepath.Join(sharedDir(), "images") }

// Binary returns the path of a vhive binary built from this tree.
func Binary(t testing.TB) string {
	t.Helper()
	bin, err := buildOnce()
	if err != nil {
		t.Fatal(err)
	}
	return bin
}

// Options configure a daemon process.
type Options struct {
	// StateDir is --state-dir (required). Keep it short: wasm worker
	// sockets live under it.
	StateDir string
	// Sandboxes is --sandboxes, e.g. "runc,gvisor,wasm".
	Sandboxes string
	// NetPrefix (at most 8 characters) and Subnet are the daemon's own.
	NetPrefix string
	Subnet    string
	// Metrics, if set, is --metrics (127.0.0.1:port).
	Metrics string
	// Log is where the daemon's stderr is appended (required; not in the
	// state dir, which may be a full file system).
	Log string
	// Args are further daemon flags.
	Args []string
}

// Daemon is one running daemon process.
type Daemon struct {
	Opts   Options
	Client vhivepb.ControlClient
	// Pid is the daemon's process id.
	Pid int

	conn   *grpc.ClientConn
	cmd    *exec.Cmd
	cgroup string // tracking cgroup directory
	done   chan struct{}
	err    error
}

// Socket returns the control socket path.
func (o Options) Socket() string { return filepath.Join(o.StateDir, "vhive.sock") }

// trackingRoot is the cgroup hierarchy tracking cgroups are made in.
func trackingRoot() string {
	if _, err := os.Stat("/sys/fs/cgroup/cgroup.controllers"); err == nil {
		return "/sys/fs/cgroup" // v2
	}
	return "/sys/fs/cgroup/pids"
}

// Start starts a daemon and waits until its control socket answers.
func Start(t testing.TB, o Options) *Daemon {
	t.Helper()
	bin := Binary(t)
	// A socket left by a killed daemon would look like a ready one.
	if err := os.Remove(o.Socket()); err != nil && !os.IsNotExist(err) {
		t.Fatal(err)
	}
	cg, err := os.MkdirTemp(trackingRoot(), "h13-")
	if err != nil {
		t.Fatalf("create tracking cgroup: %v", err)
	}
	args := []string{"daemon", "--state-dir", o.StateDir, "--socket", o.Socket(), "--gateway", "off",
		"--sandboxes", o.Sandboxes, "--net-prefix", o.NetPrefix, "--subnet", o.Subnet, "--net-pool-size", "1",
		"--wasm-pool", "0", "--log-level", "debug", "--runsc", runscPath()}
	if o.Metrics != "" {
		args = append(args, "--metrics", o.Metrics)
	}
	args = append(args, o.Args...)
	logf, err := os.OpenFile(o.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	fmt.Fprintf(logf, "=== %s: vhive %s\n", time.Now().Format(time.RFC3339Nano), strings.Join(args, " "))
	// The shell moves itself into the tracking cgroup, then becomes the
	// daemon: nothing the daemon starts escapes the accounting.
	cmd := exec.Command("/bin/sh", append([]string{"-c", `echo $$ > "$0/cgroup.procs" && exec "$@"`, cg, bin}, args...)...)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.Env = os.Environ()
	if err := cmd.Start(); err != nil {
		os.Remove(cg)
		t.Fatalf("start daemon: %v", err)
	}
	d := &Daemon{Opts: o, Pid: cmd.Process.Pid, cmd: cmd, cgroup: cg, done: make(chan struct{})}
	go func() {
		d.err = cmd.Wait()
		close(d.done)
	}()
	t.Cleanup(func() { d.Stop(t) })
	deadline := time.Now().Add(90 * time.Second)
	for {
		if _, err := os.Stat(o.Socket()); err == nil {
			break
		}
		select {
		case <-d.done:
			t.Fatalf("daemon exited at start: %v; log %s:\n%s", d.err, o.Log, Tail(o.Log, 3000))
		case <-time.After(20 * time.Millisecond):
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon socket %s did not appear in 90s; log:\n%s", o.Socket(), Tail(o.Log, 3000))
		}
	}
	conn, err := grpc.NewClient("unix://"+o.Socket(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	d.conn, d.Client = conn, vhivepb.NewControlClient(conn)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if _, err := d.Client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{}, grpc.WaitForReady(true)); err != nil {
		t.Fatalf("daemon does not answer: %v", err)
	}
	return d
}

func runscPath() string {
	if p := os.Getenv("VHIVE_RUNSC"); p != "" {
		return p
	}
	c := os.Getenv("VHIVE_CACHE")
	if c == "" {
		c = "/var/cache/vhive"
	}
	return filepath.Join(c, "bin", "runsc")
}

// Exited reports whether the daemon process has ended.
func (d *Daemon) Exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// Kill sends SIGKILL to the daemon (by its pid) and waits for it to end.
func (d *Daemon) Kill(t testing.TB) {
	t.Helper()
	// Killed before the connection closes: a closed connection would
	// cancel in-flight calls and let the daemon end them cleanly.
	if !d.Exited() {
		if err := syscall.Kill(d.Pid, syscall.SIGKILL); err != nil {
			t.Fatalf("kill daemon %d: %v", d.Pid, err)
		}
	}
	<-d.done
	if d.conn != nil {
		d.conn.Close()
	}
}

// Stop ends the daemon with SIGTERM (SIGKILL after 60 s), then removes its
// tracking cgroup once it is empty. Idempotent.
func (d *Daemon) Stop(t testing.TB) {
	if d.conn != nil {
		d.conn.Close()
	}
	if !d.Exited() {
		_ = syscall.Kill(d.Pid, syscall.SIGTERM)
		select {
		case <-d.done:
		case <-time.After(60 * time.Second):
			_ = syscall.Kill(d.Pid, syscall.SIGKILL)
			<-d.done
		}
	}
	d.RemoveCgroup(t)
}

// TrackedProcs lists the live processes in the daemon's tracking cgroup
// (the daemon itself while it runs), with their command lines.
func (d *Daemon) TrackedProcs() []string {
	data, err := os.ReadFile(filepath.Join(d.cgroup, "cgroup.procs"))
	if err != nil {
		return nil
	}
	var out []string
	for _, f := range strings.Fields(string(data)) {
		pid, _ := strconv.Atoi(f)
		out = append(out, fmt.Sprintf("pid %d %s", pid, cmdline(pid)))
	}
	return out
}

// RemoveCgroup kills what is left in the tracking cgroup (only processes
// this daemon started) and removes it. Tests call it after checking
// TrackedProcs.
func (d *Daemon) RemoveCgroup(t testing.TB) {
	if d.cgroup == "" {
		return
	}
	for try := 0; try < 100; try++ {
		data, _ := os.ReadFile(filepath.Join(d.cgroup, "cgroup.procs"))
		for _, f := range strings.Fields(string(data)) {
			if pid, err := strconv.Atoi(f); err == nil && pid > 1 {
				_ = syscall.Kill(pid, syscall.SIGKILL)
			}
		}
		if err := os.Remove(d.cgroup); err == nil || os.IsNotExist(err) {
			d.cgroup = ""
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Errorf("tracking cgroup %s could not be removed", d.cgroup)
}

func cmdline(pid int) string {
	b, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return strings.TrimSpace(strings.ReplaceAll(string(b), "\x00", " "))
}

// Metric returns the sum of every sample of a Prometheus metric family
// (all label sets) from the daemon's --metrics endpoint.
func (d *Daemon) Metric(t testing.TB, name string) float64 {
	t.Helper()
	// No keep-alive: a connection left open would count as one of the
	// daemon's descriptors (FDs).
	cl := &http.Client{Transport: &http.Transport{DisableKeepAlives: true}, Timeout: 30 * time.Second}
	resp, err := cl.Get("http://" + d.Opts.Metrics + "/metrics")
	if err != nil {
		t.Fatalf("metrics: %v", err)
	}
	defer resp.Body.Close()
	var sum float64
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, name) {
			continue
		}
		rest := line[len(name):]
		if rest == "" || (rest[0] != ' ' && rest[0] != '{') {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		if err == nil {
			sum += v
		}
	}
	return sum
}

// FDs counts the daemon's open file descriptors.
func (d *Daemon) FDs() int {
	ents, _ := os.ReadDir(fmt.Sprintf("/proc/%d/fd", d.Pid))
	return len(ents)
}

// Tail returns the last n bytes of a file.
func Tail(path string, n int64) string {
	f, err := os.Open(path)
	if err != nil {
		return err.Error()
	}
	defer f.Close()
	if fi, err := f.Stat(); err == nil && fi.Size() > n {
		_, _ = f.Seek(fi.Size()-n, io.SeekStart)
	}
	b, _ := io.ReadAll(f)
	return string(b)
}

// CgroupParents returns the cgroup parents (relative to a hierarchy root)
// the OCI backends of a daemon with this state dir use for instances.
func CgroupParents(stateDir string) []string {
	var out []string
	for _, rt := range []string{"gvisor", "runc"} {
		root, _ := filepath.Abs(filepath.Join(stateDir, "sandboxes", rt))
		out = append(out, fmt.Sprintf("/vhive/%s-%08x", rt, crc32.ChecksumIEEE([]byte(root))))
	}
	return out
}
