package cluster

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"k8s.io/apimachinery/pkg/api/resource"

	"vhive.dev/vhive/internal/testutil"
)

// testConfig returns a 2-node config of the test instance with the vhive
// binary built from this tree; it fails (CI) or skips when a tool is
// missing.
func testConfig(t *testing.T) Config {
	t.Helper()
	testutil.RequiresRoot(t)
	bin := filepath.Join(testutil.CacheDir(), "bin")
	for _, b := range append(binaries, "kubectl") {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			missing(t, "%s not found (make k8s-tools cluster-tools): %v", filepath.Join(bin, b), err)
		}
	}
	vhive := filepath.Join(t.TempDir(), "vhive")
	out, err := exec.Command("go", "build", "-o", vhive, "vhive.dev/vhive/cmd/vhive").CombinedOutput()
	if err != nil {
		t.Fatalf("build vhive: %v\n%s", err, out)
	}
	return Config{Nodes: 2, Instance: testInstance, Dir: "/tmp/vhive-cluster-t2", BinDir: bin, Vhive: vhive,
		Runsc: testutil.RunscPath(t), KeepLogs: os.Getenv("VHIVE_CLUSTER_KEEP_LOGS") != ""}
}

func kubectl(t *testing.T, c *Cluster, stdin string, args ...string) string {
	t.Helper()
	cmd := exec.Command(filepath.Join(c.Config().BinDir, "kubectl"), append([]string{"--kubeconfig", c.Kubeconfig()}, args...)...)
	if stdin != "" {
		cmd.Stdin = strings.NewReader(stdin)
	}
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	return string(out)
}

func httpGet(url string) (string, error) {
	hc := &http.Client{Timeout: 3 * time.Second}
	resp, err := hc.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}

// TestClusterUpDown brings up two nodes, checks they are Ready on vhive's
// CRI, that a second Up reuses the cluster, that pods run on both nodes and
// answer across the bridge (pod IPs and a ClusterIP service through
// kube-proxy), that a Knative-shaped pod's function runs in a vhive sandbox,
// that KillNode makes a node NotReady and RestartNode brings it back;
// then it kills containerd on one node, the vhive daemon on the other and
// the apiserver, and checks that Down leaves no process, mount, netns,
// link, route, cgroup or file behind.
func TestClusterUpDown(t *testing.T) {
	cfg := testConfig(t)
	ctx, cancel := context.WithTimeout(context.Background(), 12*time.Minute)
	defer cancel()
	if err := Down(ctx, cfg); err != nil {
		t.Fatalf("down before the test: %v", err)
	}
	downDone := false
	t.Cleanup(func() {
		if !downDone {
			if err := Down(context.Background(), cfg); err != nil {
				t.Errorf("cleanup: %v", err)
			}
		}
	})
	t0 := time.Now()
	c, err := Up(ctx, cfg)
	if err != nil {
		t.Fatalf("up: %v", err)
	}
	t.Logf("up: %v", time.Since(t0))
	ns, err := c.NodeStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if len(ns) != 2 {
		t.Fatalf("nodes: %+v", ns)
	}
	for i, n := range ns {
		want := c.Nodes()[i]
		if n.Name != want.Name || !n.Ready || n.InternalIP != want.IP.String() || !strings.HasPrefix(n.ContainerRuntime, "vhive://") || n.PodCIDR != want.PodCIDR.String() {
			t.Errorf("node %d: %+v, want %s Ready at %s on vhive:// with pod CIDR %s", i, n, want.Name, want.IP, want.PodCIDR)
		}
	}
	t.Logf("kubectl get nodes -o wide:\n%s", kubectl(t, c, "", "get", "nodes", "-o", "wide"))
	checkAllocatable(t, ctx, c) // the default: the machine's share

	// Idempotent: the same processes.
	before := c.Status()
	c2, err := Up(ctx, cfg)
	if err != nil {
		t.Fatalf("second up: %v", err)
	}
	after := c2.Status()
	if len(after) != len(before) {
		t.Fatalf("second up: %d processes, first %d", len(after), len(before))
	}
	for i := range before {
		if before[i].PID != after[i].PID || !after[i].Alive {
			t.Errorf("second up replaced %s/%s: pid %d -> %d (alive %v)", before[i].Node, before[i].Component, before[i].PID, after[i].PID, after[i].Alive)
		}
	}

	// Pods on both nodes, reachable from the host and through a service.
	root, _ := filepath.Abs("../..")
	dep, err := os.ReadFile(filepath.Join(root, "deploy", "vhive-deployment.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	kubectl(t, c, strings.Replace(string(dep), "replicas: 3", "replicas: 4", 1), "apply", "-f", "-")
	kubectl(t, c, "", "expose", "deployment", "vhive-web", "--port", "80")
	rev, err := os.ReadFile(filepath.Join(root, "deploy", "knative-revision-pod.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	kubectl(t, c, strings.ReplaceAll(string(rev), "${GUEST_IMAGE}", "registry.k8s.io/vhive-e2e/hello:1"), "apply", "-f", "-")
	kubectl(t, c, "", "rollout", "status", "deployment/vhive-web", "--timeout=240s")
	kubectl(t, c, "", "wait", "pod/helloworld-00001-deployment", "--for=condition=Ready", "--timeout=240s")
	var pods struct {
		Items []struct {
			Spec struct {
				NodeName string `json:"nodeName"`
			} `json:"spec"`
			Status struct {
				PodIP string `json:"podIP"`
			} `json:"status"`
		} `json:"items"`
	}
	if err := json.Unmarshal([]byte(kubectl(t, c, "", "get", "pods", "-l", "app=vhive-web", "-o", "json")), &pods); err != nil {
		t.Fatal(err)
	}
	onNode := map[string]int{}
	for _, p := range pods.Items {
		onNode[p.Spec.NodeName]++
		if body, err := httpGet("http://" + p.Status.PodIP + "/"); err != nil || !strings.Contains(body, "Welcome to nginx") {
			t.Errorf("pod on %s at %s: %q %v", p.Spec.NodeName, p.Status.PodIP, body, err)
		}
	}
	if len(onNode) != 2 {
		t.Errorf("replicas by node: %v, want both nodes", onNode)
	}
	svcIP := strings.TrimSpace(kubectl(t, c, "", "get", "svc", "vhive-web", "-o", "jsonpath={.spec.clusterIP}"))
	var body string
	for range 60 {
		if body, err = httpGet("http://" + svcIP + "/"); err == nil && strings.Contains(body, "Welcome to nginx") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !strings.Contains(body, "Welcome to nginx") {
		t.Errorf("service %s: %q %v", svcIP, body, err)
	}
	revIP := strings.TrimSpace(kubectl(t, c, "", "get", "pod", "helloworld-00001-deployment", "-o", "jsonpath={.status.podIP}"))
	for range 60 {
		if body, err = httpGet("http://" + revIP + ":8012/index.html"); err == nil && strings.Contains(body, "Hello, vhive!") {
			break
		}
		time.Sleep(500 * time.Millisecond)
	}
	if !strings.Contains(body, "Hello, vhive!") {
		t.Errorf("function through queue-proxy at %s:8012: %q %v", revIP, body, err)
	}

	// A node failure and its recovery: NotReady after the grace period,
	// Ready again once restarted.
	n1, n2 := c.Nodes()[0], c.Nodes()[1]
	if err := c.KillNode(ctx, n2.Name); err != nil {
		t.Fatal(err)
	}
	for _, p := range c.Status() {
		if p.Node == n2.Name && (p.Component == Kubelet || p.Component == VhiveDaemon) && p.Alive {
			t.Errorf("%s/%s alive after KillNode", p.Node, p.Component)
		}
	}
	nodeReady := func(name string) bool {
		ns, err := c.NodeStatus(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, n := range ns {
			if n.Name == name {
				return n.Ready
			}
		}
		return false
	}
	t0 = time.Now()
	for nodeReady(n2.Name) {
		if time.Since(t0) > 2*time.Minute {
			t.Fatalf("%s still Ready %v after KillNode", n2.Name, time.Since(t0))
		}
		time.Sleep(time.Second)
	}
	t.Logf("%s NotReady %v after KillNode", n2.Name, time.Since(t0).Round(time.Second))
	if err := c.RestartNode(ctx, n2.Name); err != nil {
		t.Fatal(err)
	}
	rctx, rcancel := context.WithTimeout(ctx, 2*time.Minute)
	err = c.WaitReady(rctx)
	rcancel()
	if err != nil {
		t.Fatalf("after RestartNode: %v", err)
	}
	t.Logf("%s Ready %v after KillNode", n2.Name, time.Since(t0).Round(time.Second))

	// Crash parts of it, then tear down.
	for _, k := range [][2]string{{n1.Name, Containerd}, {n2.Name, VhiveDaemon}, {"", APIServer}} {
		if err := c.Kill(ctx, k[0], k[1]); err != nil {
			t.Fatalf("kill %v: %v", k, err)
		}
	}
	t0 = time.Now()
	downDone = true
	if err := c.Down(ctx); err != nil {
		t.Fatalf("down: %v", err)
	}
	t.Logf("down after crashes: %v", time.Since(t0))
	left, err := Leftovers(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 0 {
		t.Errorf("left after down:\n%s", strings.Join(left, "\n"))
	}
	// Independent of Leftovers' own bookkeeping: the raw tables.
	for _, check := range []struct {
		what string
		cmd  []string
		bad  []string
	}{
		{"netns", []string{"ip", "netns", "list"}, []string{n1.Name, n2.Name, n1.NetPrefix + "-", n2.NetPrefix + "-"}},
		{"links", []string{"ip", "-o", "link", "show"}, []string{cfg.BridgeName(), n1.Name + "@", n2.Name + "@"}},
		{"mounts", []string{"cat", "/proc/self/mountinfo"}, []string{cfg.Dir + "/", "/" + n1.Name + " ", "/" + n2.Name + " "}},
		{"routes", []string{"ip", "route", "show"}, []string{n1.PodCIDR.String(), n2.PodCIDR.String(), cfg.ServiceCIDR().String()}},
		{"processes", []string{"ps", "-eo", "args"}, []string{cfg.Dir + "/"}},
		{"cgroups", []string{"ls", "/sys/fs/cgroup/pids", "/sys/fs/cgroup/memory"}, []string{n1.Name, n2.Name}},
	} {
		out, err := exec.Command(check.cmd[0], check.cmd[1:]...).CombinedOutput()
		if err != nil && check.what != "netns" {
			t.Errorf("%s: %v\n%s", check.what, err, out)
			continue
		}
		for _, line := range strings.Split(string(out), "\n") {
			for _, b := range check.bad {
				if strings.Contains(line, b) && !strings.Contains(line, "ps -eo") {
					t.Errorf("%s still lists %q: %s", check.what, b, line)
				}
			}
		}
	}
	if _, err := os.Stat(cfg.Dir); err == nil && !cfg.KeepLogs {
		t.Errorf("%s still exists", cfg.Dir)
	}
}

// checkAllocatable checks through the API that every node's allocatable
// CPU and memory is the configured share.
func checkAllocatable(t *testing.T, ctx context.Context, c *Cluster) {
	t.Helper()
	ns, err := c.NodeStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	cfg := c.Config()
	for _, n := range ns {
		cpu, err1 := resource.ParseQuantity(n.AllocatableCPU)
		mem, err2 := resource.ParseQuantity(n.AllocatableMem)
		if err1 != nil || err2 != nil || cpu.MilliValue() != cfg.NodeMilliCPU || mem.Value() != cfg.NodeMemory {
			t.Errorf("node %s: allocatable cpu %q memory %q, want %dm and %d bytes", n.Name, n.AllocatableCPU, n.AllocatableMem, cfg.NodeMilliCPU, cfg.NodeMemory)
		}
	}
	t.Logf("each node: allocatable %dm CPU, %d MiB", cfg.NodeMilliCPU, cfg.NodeMemory>>20)
}

// missing fails in CI (make test installs every tool) and skips elsewhere.
func missing(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// TestUpAfterKilledUp SIGKILLs `vhive cluster up` while its nodes start:
// the next Up finds the incomplete record, tears it down and brings up a
// Ready cluster, and Down then leaves nothing.
func TestUpAfterKilledUp(t *testing.T) {
	cfg := testConfig(t)
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	if err := Down(ctx, cfg); err != nil {
		t.Fatalf("down before the test: %v", err)
	}
	t.Cleanup(func() {
		if err := Down(context.Background(), cfg); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	cmd := exec.Command(cfg.Vhive, "cluster", "up", "--nodes", "2", "--instance", fmt.Sprint(cfg.Instance),
		"--dir", cfg.Dir, "--bin-dir", cfg.BinDir)
	cmd.Env = append(os.Environ(), "VHIVE_CACHE="+filepath.Dir(cfg.BinDir))
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64<<10)
	var seen strings.Builder
	for !strings.Contains(seen.String(), "control plane ready") {
		n, err := stderr.Read(buf)
		seen.Write(buf[:n])
		if err != nil {
			t.Fatalf("cluster up ended before its control plane was ready: %v\n%s", err, seen.String())
		}
	}
	// Nodes are starting now.
	time.Sleep(300 * time.Millisecond)
	if err := cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	_ = cmd.Wait()
	left, err := Leftovers(cfg)
	if err != nil {
		t.Fatal(err)
	}
	if !containsPrefix(left, "process ") || !containsPrefix(left, "netns ") {
		t.Fatalf("a killed up left no processes or netns to clean up? %v", left)
	}
	cfg.NodeMilliCPU, cfg.NodeMemory = 700, 1536<<20
	c, err := Up(ctx, cfg)
	if err != nil {
		t.Fatalf("up after a killed up: %v", err)
	}
	checkAllocatable(t, ctx, c) // explicit
	ns, err := c.NodeStatus(ctx)
	if err != nil {
		t.Fatal(err)
	}
	ready := 0
	for _, n := range ns {
		if n.Ready {
			ready++
		}
	}
	if len(ns) != 2 || ready != 2 {
		t.Errorf("nodes after recovery: %+v", ns)
	}
	if err := c.Down(ctx); err != nil {
		t.Fatalf("down: %v", err)
	}
	if left, err := Leftovers(cfg); err != nil || len(left) > 0 {
		t.Errorf("left after down: %v %v", left, err)
	}
}
