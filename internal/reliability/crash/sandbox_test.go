package crash

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
)

const (
	killPrefix = "h13k"
	killSubnet = "10.187.2.0/24"
	// killMetrics is passed to the daemon before it binds it: a fixed
	// port, below the ephemeral range (32768-60999) where any outgoing
	// connection could hold it, and apart from nodetest.Port's 26000-26999.
	killMetrics = "127.0.0.1:25013"
)

// TestSandboxKilledMidRequest kills the sandbox side of an instance while a
// request is in flight — the runc container's process, the runsc sandbox
// process, the wasm worker, a microVM's QEMU (when the microVM assets are
// built) — and the memory manager's peer (the wasm worker)
// while its lazily restored memory is being faulted in. Each time the
// request fails with Unavailable naming the instance, the daemon keeps
// running, the instance and everything it held are released, the
// function's snapshot is kept, and the next request succeeds.
func TestSandboxKilledMidRequest(t *testing.T) {
	testutil.RequiresRoot(t)
	testutil.RunscPath(t)
	work := t.TempDir()
	probe := shared.Probe(t)
	fib := shared.Function(t, "fibonacci", true)
	counterW := shared.Function(t, "counter", true)
	state, err := os.MkdirTemp("", "h13k")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	sbs := "runc,gvisor,wasm"
	cases := []struct{ sb, image, warm, slow, wantWarm string }{
		{"runc", nodetest.ProbeRef, "counter", "sleep:20000", "1"},
		{"gvisor", nodetest.ProbeRef, "counter", "sleep:20000", "1"},
		{"wasm", "localhost/vhive/fibonacci-wasm:latest", "10", "100000", "fib(10) = 55"},
	}
	if _, err := assets.Load(assets.Dir(testutil.CacheDir())); err == nil {
		sbs += ",microvm"
		cases = append(cases, struct{ sb, image, warm, slow, wantWarm string }{"microvm", nodetest.ProbeRef, "counter", "sleep:20000", "1"})
	} else {
		t.Logf("microvm not tested: %v", err)
	}
	// --ready-timeout: a microVM boot takes 5-40 s on this machine's TCG.
	d := nodetest.Start(t, shared.Bin(t), nodetest.Options{StateDir: state, Sandboxes: sbs, NetPrefix: killPrefix, Subnet: killSubnet,
		Metrics: killMetrics, Log: filepath.Join(work, "daemon.log"), NoGateway: true, Args: []string{"--ready-timeout", "3m"}})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log tail:\n%s", d.LogTail(5000))
		}
	})
	ctx := context.Background()
	c := d.Client
	for _, p := range []string{probe, fib, counterW} {
		if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: p}); err != nil {
			t.Fatalf("import %s: %v", p, err)
		}
	}

	// findPid returns the process to kill for instance id of sandbox sb.
	findPid := func(t *testing.T, sb, id, endpoint string) int {
		switch sb {
		case "runc":
			out, err := exec.Command(testutil.RuncPath(t), "--root", filepath.Join(state, "sandboxes/runc/state"), "state", id).Output()
			if err != nil {
				t.Fatalf("runc state %s: %v", id, err)
			}
			var st struct{ Pid int }
			if err := json.Unmarshal(out, &st); err != nil || st.Pid <= 1 {
				t.Fatalf("runc state %s: %s (%v)", id, out, err)
			}
			return st.Pid // the function, the container's init
		case "gvisor":
			// The runsc sandbox process (the Sentry) of this instance.
			ents, _ := os.ReadDir("/proc")
			for _, e := range ents {
				pid, err := strconv.Atoi(e.Name())
				if err != nil {
					continue
				}
				cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
				args := strings.Split(string(cmd), "\x00")
				if len(args) > 0 && strings.HasSuffix(args[0], "runsc-sandbox") && strings.Contains(string(cmd), "\x00"+id+"\x00") {
					return pid
				}
			}
			t.Fatalf("no runsc-sandbox process for %s", id)
		case "wasm":
			return workerPid(t, filepath.Dir(strings.TrimPrefix(endpoint, "unix://")))
		case "microvm":
			b, err := os.ReadFile(filepath.Join(state, "sandboxes/microvm/instances", id, "qemu.pid"))
			pid, perr := strconv.Atoi(strings.TrimSpace(string(b)))
			if err != nil || perr != nil || pid <= 1 {
				t.Fatalf("QEMU pid of %s: %q, %v", id, b, err)
			}
			return pid
		}
		return 0
	}

	for _, tc := range cases {
		t.Run(tc.sb, func(t *testing.T) {
			name := "k-" + tc.sb
			if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: name, Image: tc.image, Sandbox: tc.sb}}); err != nil {
				t.Fatal(err)
			}
			if r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte(tc.warm)}); err != nil || string(r.Payload) != tc.wantWarm {
				t.Fatalf("first invoke: %v, %v", r, err)
			}
			inst := onlyInstance(t, c, name)
			pid := findPid(t, tc.sb, inst.Id, inst.Endpoint)
			res := make(chan error, 1)
			start := time.Now()
			go func() {
				_, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte(tc.slow)})
				res <- err
			}()
			waitInFlight(t, c, name)
			time.Sleep(50 * time.Millisecond)
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
				t.Fatalf("kill %d: %v", pid, err)
			}
			err := <-res
			t.Logf("%s: killed pid %d mid-request; the request failed after %v: %v", tc.sb, pid, time.Since(start).Round(time.Millisecond), err)
			checkInstanceFailure(t, err, inst.Id)
			waitNoInstances(t, c, name)
			if l := instanceLeftovers(state, inst.Id, pid); len(l) > 0 {
				t.Errorf("instance %s left %v", inst.Id, l)
			}
			if !d.Alive() {
				t.Fatal("the daemon died")
			}
			if r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte(tc.warm)}); err != nil || !r.ColdStart || string(r.Payload) != tc.wantWarm {
				t.Fatalf("invoke after the kill = %v, %v; want a fresh cold start", r, err)
			}
			if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: name}); err != nil {
				t.Fatal(err)
			}
		})
	}

	// The memory manager's peer dies mid-fault: a lazy restore of the
	// counter, its worker killed while its pages are being served.
	t.Run("wasm-lazy-mid-fault", func(t *testing.T) {
		name := "k-lazy"
		if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: name, Image: counterWRef, Sandbox: "wasm", StartMode: "lazy"}}); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte("x")}); err != nil {
			t.Fatal(err)
		}
		waitSnapshots(t, c, name)
		rng := rand.New(rand.NewPCG(uint64(time.Now().UnixNano()), 13))
		// Trials until enough kills landed mid-fault (the window moves
		// towards where the faults are: later when a kill came before the
		// first fault, earlier when the reply won), at most maxTrials.
		want, maxTrials := 1, 10
		if nodetest.Full() {
			want, maxTrials = 4, 16
		}
		lo, hi := time.Duration(0), 60*time.Millisecond
		killedMidFault, trials := 0, 0
		for i := 0; i < maxTrials && killedMidFault < want; i++ {
			trials++
			if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: name}); err != nil {
				t.Fatal(err)
			}
			faults0 := d.Metric(t, "vhive_memory_faults_total")
			fds0 := d.FDs()
			before := workerDirs(state)
			res := make(chan error, 1)
			go func() {
				r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte("x")})
				if err == nil && (r.StartMode != "lazy" || !strings.HasPrefix(string(r.Payload), "count=2 ")) {
					err = fmt.Errorf("restore answered %q in mode %s", r.Payload, r.StartMode)
				}
				res <- err
			}()
			// Wait for the manager to take its peer, then kill the peer
			// while (most often) its faults are being served.
			var pid int
			for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(time.Millisecond) {
				if d.Metric(t, "vhive_memory_active_restores") > 0 {
					pid = newWorker(t, state, before)
					break
				}
				if time.Now().After(deadline) {
					t.Fatal("no restore became active within 60s")
				}
			}
			delay := lo + time.Duration(rng.Int64N(int64(hi-lo)+1))
			time.Sleep(delay)
			faultsAtKill := d.Metric(t, "vhive_memory_faults_total") - faults0
			if err := syscall.Kill(pid, syscall.SIGKILL); err != nil && err != syscall.ESRCH {
				t.Fatal(err)
			}
			err := <-res
			faults := d.Metric(t, "vhive_memory_faults_total") - faults0
			t.Logf("trial %d: worker %d killed %v after its restore became active, %v faults served by then, %v in all; request: %v", i+1, pid, delay.Round(time.Millisecond), faultsAtKill, faults, err)
			if err == nil {
				hi = max(lo+time.Millisecond, delay*9/10)
				continue // the reply won the race: nothing to check
			}
			if faultsAtKill > 0 {
				killedMidFault++
			} else {
				lo = min(delay, hi-time.Millisecond)
			}
			if status.Code(err) != codes.Unavailable {
				t.Errorf("trial %d: request failed with %v, want Unavailable", i+1, err)
			}
			waitNoInstances(t, c, name)
			// The manager let go of its peer: no restore active, its
			// descriptors (uffd, memory file, socket) closed.
			for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
				active := d.Metric(t, "vhive_memory_active_restores")
				fds := d.FDs()
				if active == 0 && fds <= fds0 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("trial %d: 10s after the peer died: %v restores active, %d fds open (before: %d)", i+1, active, fds, fds0)
				}
			}
			if !d.Alive() {
				t.Fatal("the daemon died")
			}
			// The snapshot is intact and still used: a lazy restore with
			// the snapshotted state.
			r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte("x")})
			if err != nil || r.StartMode != "lazy" || !strings.HasPrefix(string(r.Payload), "count=2 ") {
				t.Fatalf("trial %d: invoke after the kill = %v, %v; want a lazy restore answering count=2", i+1, r, err)
			}
		}
		t.Logf("SANDBOX-KILL mid-fault: %d of %d kills landed after faults were served and before the reply", killedMidFault, trials)
		if killedMidFault == 0 {
			t.Errorf("no kill of %d landed between the first fault and the reply", trials)
		}
	})
	if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{}); err != nil {
		t.Fatal(err)
	}
	if err := d.Stop(); err != nil {
		t.Error(err)
	}
	if l := nodetest.Snapshot(state, killPrefix); l.Count() != 0 {
		t.Errorf("after a clean shutdown: %+v", l)
	}
}

// instanceLeftovers lists what instance id still holds 10 s after it was
// released at most: processes naming it (runsc, gofer, runc, QEMU) or the
// killed pid, mounts of its bundle, its cgroups and any microVM leftover
// (instance directory, sockets, RAM file).
func instanceLeftovers(state, id string, pid int) []string {
	var out []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		out = nil
		ents, _ := os.ReadDir("/proc")
		for _, e := range ents {
			p, err := strconv.Atoi(e.Name())
			if err != nil {
				continue
			}
			cmd, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", p))
			st, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", p))
			if strings.Contains(string(st), ") Z ") {
				continue // exited, waiting to be reaped
			}
			if p == pid || strings.Contains(string(cmd), id) {
				out = append(out, fmt.Sprintf("process %d %q", p, strings.ReplaceAll(string(cmd), "\x00", " ")))
			}
		}
		r := nodetest.Snapshot(state, killPrefix)
		for _, m := range r.Mounts {
			if strings.Contains(m, id) {
				out = append(out, "mount "+m)
			}
		}
		for _, c := range r.Cgroups {
			if strings.Contains(c, id) {
				out = append(out, "cgroup "+c)
			}
		}
		for _, m := range r.MicroVM {
			out = append(out, "microvm "+m) // one instance at a time here
		}
		if len(out) == 0 || time.Now().After(deadline) {
			return out
		}
	}
}

func onlyInstance(t *testing.T, c vhivepb.ControlClient, fn string) *vhivepb.InstanceInfo {
	t.Helper()
	ls, err := c.ListInstances(context.Background(), &vhivepb.ListInstancesRequest{Function: fn})
	if err != nil || len(ls.Instances) != 1 {
		t.Fatalf("instances of %s: %v, %v", fn, ls, err)
	}
	return ls.Instances[0]
}

func waitInFlight(t *testing.T, c vhivepb.ControlClient, fn string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(5 * time.Millisecond) {
		ls, err := c.ListInstances(context.Background(), &vhivepb.ListInstancesRequest{Function: fn})
		if err == nil && len(ls.Instances) == 1 && ls.Instances[0].InFlight == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no request in flight on %s: %v, %v", fn, ls, err)
		}
	}
}

func waitNoInstances(t *testing.T, c vhivepb.ControlClient, fn string) {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		ls, err := c.ListInstances(context.Background(), &vhivepb.ListInstancesRequest{Function: fn})
		if err == nil && len(ls.Instances) == 0 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the dead instance of %s is still listed: %v, %v", fn, ls, err)
		}
	}
}

func waitSnapshots(t *testing.T, c vhivepb.ControlClient, fn string) {
	t.Helper()
	for deadline := time.Now().Add(60 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ls, err := c.ListSnapshots(context.Background(), &vhivepb.ListSnapshotsRequest{Function: fn})
		if err == nil && len(ls.Snapshots) == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot of %s: %v, %v", fn, ls, err)
		}
	}
}

// checkInstanceFailure: the request failed as Unavailable, naming the
// instance and saying that it exited or became unreachable.
func checkInstanceFailure(t *testing.T, err error, id string) {
	t.Helper()
	if err == nil {
		t.Fatal("the request succeeded although its instance was killed")
	}
	msg := status.Convert(err).Message()
	if status.Code(err) != codes.Unavailable || !strings.Contains(msg, id) || !(strings.Contains(msg, "exited") || strings.Contains(msg, "unreachable")) {
		t.Fatalf("request failed with %v; want Unavailable naming instance %s as exited", err, id)
	}
}

func workerPid(t *testing.T, dir string) int {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(dir, "worker.pid"))
	if err != nil {
		t.Fatalf("worker pid: %v", err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil || pid <= 1 {
		t.Fatalf("worker pid %q", b)
	}
	return pid
}

func workerDirs(state string) map[string]bool {
	out := map[string]bool{}
	ents, _ := os.ReadDir(filepath.Join(state, "w"))
	for _, e := range ents {
		out[e.Name()] = true
	}
	return out
}

// newWorker waits for a wasm worker directory not in before to get its pid
// file (the manager may take the restore before the worker is spawned) and
// returns that pid.
func newWorker(t *testing.T, state string, before map[string]bool) int {
	t.Helper()
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(time.Millisecond) {
		for name := range workerDirs(state) {
			if before[name] {
				continue
			}
			b, err := os.ReadFile(filepath.Join(state, "w", name, "worker.pid"))
			if pid, perr := strconv.Atoi(strings.TrimSpace(string(b))); err == nil && perr == nil && pid > 1 {
				return pid
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("no new wasm worker within 30s of the restore")
		}
	}
}
