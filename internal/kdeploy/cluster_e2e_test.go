//go:build e2e

package kdeploy

// The cluster end-to-end test (make cluster-e2e): a real multi-node cluster
// (internal/cluster: control plane on the host, workers in network
// namespaces, each with containerd, vhive's CRI, kubelet and kube-proxy),
// two functions deployed from vSwarm's functions.json, the invoker driving
// them through their Services, a scale-from-zero experiment, and the loss
// of a worker during a run.
//
// Knobs (defaults are CI's): VHIVE_E2E_NODES (2), VHIVE_E2E_RPS (10 per
// second over all endpoints), VHIVE_E2E_TIME (steady run, 20s),
// VHIVE_E2E_REPORT (write the figures as markdown to this file),
// VHIVE_E2E_SANDBOX (the nodes' function sandbox: gvisor, runc or microvm).

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"log/slog"
	"maps"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/watch"
	"k8s.io/client-go/kubernetes"

	"vhive.dev/vhive/internal/cluster"
	"vhive.dev/vhive/internal/invoker"
	"vhive.dev/vhive/internal/testutil"
)

// e2eInstance is the cluster instance of this test (make cluster uses 0,
// internal/cluster's own tests 2).
const e2eInstance = 1

func envInt(t *testing.T, k string, def int) int {
	if v := os.Getenv(k); v != "" {
		n, err := strconv.Atoi(v)
		if err != nil || n < 1 {
			t.Fatalf("%s=%q: want a positive integer", k, v)
		}
		return n
	}
	return def
}

func envDur(t *testing.T, k string, def time.Duration) time.Duration {
	if v := os.Getenv(k); v != "" {
		d, err := time.ParseDuration(v)
		if err != nil || d <= 0 {
			t.Fatalf("%s=%q: want a positive duration", k, v)
		}
		return d
	}
	return def
}

// report collects the markdown the run writes to VHIVE_E2E_REPORT.
type report struct {
	mu sync.Mutex
	b  strings.Builder
}

func (r *report) printf(t *testing.T, format string, args ...any) {
	t.Helper()
	s := fmt.Sprintf(format, args...)
	t.Log(s)
	r.mu.Lock()
	r.b.WriteString(s + "\n")
	r.mu.Unlock()
}

func TestClusterE2E(t *testing.T) {
	testutil.RequiresRoot(t)
	nodes := envInt(t, "VHIVE_E2E_NODES", 2)
	rps := float64(envInt(t, "VHIVE_E2E_RPS", 10))
	steady := envDur(t, "VHIVE_E2E_TIME", 20*time.Second)
	if nodes < 2 {
		t.Fatal("VHIVE_E2E_NODES: the failover part needs 2 or more nodes")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Minute)
	defer cancel()
	rep := &report{}
	log := slog.New(slog.NewTextHandler(testWriter{t}, &slog.HandlerOptions{Level: slog.LevelInfo}))

	// The vhive binary every node runs as its daemon.
	bin := filepath.Join(t.TempDir(), "vhive")
	if out, err := exec.CommandContext(ctx, "go", "build", "-o", bin, "../../cmd/vhive").CombinedOutput(); err != nil {
		t.Fatalf("build vhive: %v\n%s", err, out)
	}
	cfg := cluster.Config{
		Nodes: nodes, Dir: "/var/lib/vhive-cluster-e2e", Instance: e2eInstance, Vhive: bin,
		NodeMonitorGracePeriod: 12 * time.Second, Logger: log, FunctionSandbox: os.Getenv("VHIVE_E2E_SANDBOX"),
	}
	// What a crashed earlier run of this test left (this instance only).
	if err := cluster.Down(ctx, cfg); err != nil {
		t.Fatalf("clean up an earlier run: %v", err)
	}
	t.Cleanup(func() {
		dctx, dcancel := context.WithTimeout(context.Background(), 3*time.Minute)
		defer dcancel()
		if err := cluster.Down(dctx, cfg); err != nil {
			t.Errorf("cluster down: %v", err)
		}
		if left, err := cluster.Leftovers(cfg); err != nil || len(left) > 0 {
			t.Errorf("left behind after down: %v %v", left, err)
		}
	})
	start := time.Now()
	c, err := cluster.Up(ctx, cfg)
	if err != nil {
		t.Fatalf("cluster up: %v", err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, c)
		}
	})
	t.Logf("cluster of %d nodes up in %v", nodes, time.Since(start).Round(time.Millisecond))
	cs, err := NewClient(c.Kubeconfig())
	if err != nil {
		t.Fatal(err)
	}

	// Images from the host registry, functions from vSwarm's JSON.
	entries, err := invoker.ReadFunctions(repoFile(t, "deploy/functions.json"))
	if err != nil {
		t.Fatal(err)
	}
	var svcs []*Service
	for _, e := range entries {
		s, err := ReadService(repoFile(t, filepath.Join("deploy", e.File)))
		if err != nil {
			t.Fatal(err)
		}
		svcs = append(svcs, s)
	}
	qp, err := Publish(ctx, svcs, PublishOptions{Registry: c.Registry(), OutDir: t.TempDir(), Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	replicas := int32(nodes)
	start = time.Now()
	fns, err := Deploy(ctx, cs, entries, Options{
		ObjectOptions: ObjectOptions{QueueProxyImage: qp, Replicas: &replicas},
		FuncPath:      repoFile(t, "deploy"), Wait: 5 * time.Minute, Logger: log,
	})
	if err != nil {
		t.Fatalf("deploy: %v", err)
	}
	t.Logf("%d functions × %d pods ready in %v", len(fns), replicas, time.Since(start).Round(time.Millisecond))
	if len(fns) != 2 {
		t.Fatalf("deployed %d functions, want 2", len(fns))
	}
	// Pods of one function on every node.
	for _, fn := range fns {
		on, err := NodesOf(ctx, cs, fn)
		if err != nil {
			t.Fatal(err)
		}
		got := slices.Sorted(maps.Values(on))
		got = slices.Compact(got)
		if len(got) != nodes {
			t.Errorf("%s: pods on nodes %v, want one on each of %d nodes", fn.Name, on, nodes)
		}
	}
	if t.Failed() {
		t.FailNow()
	}

	rep.printf(t, "Cluster: %d worker nodes (vhive CRI, %s function sandboxes), %d pods per function, invoker on the host through the Services' ClusterIPs, a new connection per request.\n", nodes, c.Config().FunctionSandbox, replicas)
	steadyRun(ctx, t, c, cs, fns, rps, steady, rep)
	scaleFromZero(ctx, t, c, cs, fns[len(fns)-1], rps, rep)
	nodeFailure(ctx, t, c, cs, fns, rps, rep)

	if p := os.Getenv("VHIVE_E2E_REPORT"); p != "" {
		if err := os.WriteFile(p, []byte(rep.b.String()), 0o644); err != nil {
			t.Error(err)
		}
	}
}

// steadyRun drives every function at rps and expects no error; each
// function's queue-proxies together count exactly the requests sent to it,
// and every pod served some.
func steadyRun(ctx context.Context, t *testing.T, c *cluster.Cluster, cs kubernetes.Interface, fns []Function, rps float64, d time.Duration, rep *report) {
	before := queueProxyCounts(ctx, t, cs, fns)
	res, err := invoker.Run(ctx, invoker.Config{
		Endpoints: Endpoints(fns), RPS: rps, Duration: d, Warmup: 2 * time.Second,
		ConnPerRequest: true, Timeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatalf("steady run: %v", err)
	}
	s := res.Summarize()
	want := int(rps * d.Seconds())
	if s.Failed != 0 || s.Completed != s.Issued || s.Issued < want-1 || s.Issued > want+1 {
		t.Errorf("steady run: issued %d (want %d), completed %d, errors %v", s.Issued, want, s.Completed, s.Errors)
	}
	rep.printf(t, "Steady run: %.0f RPS for %v (after 2 s of warm-up): issued %d, completed %d, errors %d, real RPS %.2f.\n", rps, d, s.Issued, s.Completed, s.Failed, s.RealRPS)
	rep.printf(t, "| function | requests | errors | p50 | p90 | p99 | max |")
	rep.printf(t, "|---|---|---|---|---|---|---|")
	for _, ep := range res.Endpoints() {
		es := res.ForEndpoint(ep).Summarize()
		l := es.Latency
		rep.printf(t, "| %s | %d | %d | %s | %s | %s | %s |", strings.Split(ep, ".")[0], es.Issued, es.Failed, us(l.P50), us(l.P90), us(l.P99), us(l.Max))
	}
	// A queue-proxy counts a request once its handler returns, just after
	// the client has the reply: scrape until the counts settle (≤ 3 s).
	after := queueProxyCounts(ctx, t, cs, fns)
	for deadline := time.Now().Add(3 * time.Second); time.Now().Before(deadline); {
		settled := true
		for _, fn := range fns {
			total := 0
			for pod, n := range after[fn.Name] {
				total += n - before[fn.Name][pod]
			}
			settled = settled && total >= len(res.ForEndpoint(fn.Hostname()).Records)
		}
		if settled {
			break
		}
		time.Sleep(100 * time.Millisecond)
		after = queueProxyCounts(ctx, t, cs, fns)
	}
	for _, fn := range fns {
		sent := len(res.ForEndpoint(fn.Hostname()).Records) // warm-up included
		total := 0
		for pod, n := range after[fn.Name] {
			served := n - before[fn.Name][pod]
			total += served
			if served == 0 {
				t.Errorf("%s: pod %s served no request: the Service did not spread the connections", fn.Name, pod)
			}
		}
		if total != sent {
			t.Errorf("%s: queue-proxies relayed %d OK requests, the invoker sent %d", fn.Name, total, sent)
		}
		t.Logf("%s: queue-proxies relayed %d requests: %v", fn.Name, total, after[fn.Name])
	}
	rep.printf(t, "")
	floors(ctx, t, c, cs, fns[0], rps/float64(len(fns)), min(d, 20*time.Second), rep)
}

// floors drives fn through its Service, one of its pods' queue-proxy (pod
// IP:8012, no Service) and that pod's function sandbox directly (the
// endpoint vhive's CRI gave the queue-proxy), each at rps, interleaved.
func floors(ctx context.Context, t *testing.T, c *cluster.Cluster, cs kubernetes.Interface, fn Function, rps float64, d time.Duration, rep *report) {
	pods, err := cs.CoreV1().Pods(fn.Namespace).List(ctx, metav1.ListOptions{LabelSelector: fn.Selector()})
	if err != nil || len(pods.Items) == 0 {
		t.Fatalf("pods of %s: %v", fn.Name, err)
	}
	pod := pods.Items[0]
	ep, ok := functionEndpoints(t, c)[pod.Name]
	if !ok {
		t.Fatalf("no function endpoint logged for pod %s", pod.Name)
	}
	qp := fmt.Sprintf("%s:%d", pod.Status.PodIP, QueueProxyPort)
	// One run, round-robin over the three paths, so that they share the
	// machine's load request by request.
	paths := []struct{ name, addr string }{
		{"through the Service (ClusterIP, kube-proxy, any pod)", fn.Address()},
		{"one pod's queue-proxy (pod IP:8012)", qp},
		{"that pod's function sandbox directly (" + ep + ")", ep},
	}
	var eps []invoker.Endpoint
	for i, p := range paths {
		eps = append(eps, invoker.Endpoint{Hostname: fmt.Sprintf("path%d.%s", i, fn.Hostname()), Address: p.addr})
	}
	res, err := invoker.Run(ctx, invoker.Config{
		Endpoints: eps, RPS: rps * float64(len(paths)), Duration: d, Warmup: time.Second,
		ConnPerRequest: true, Timeout: 10 * time.Second,
	})
	if err != nil {
		t.Fatal(err)
	}
	var sums []invoker.Summary
	for i, e := range eps {
		s := res.ForEndpoint(e.Hostname).Summarize()
		if s.Failed != 0 || s.Completed == 0 {
			t.Errorf("%s: %d of %d failed %v", paths[i].name, s.Failed, s.Issued, s.Errors)
		}
		sums = append(sums, s)
	}
	floor := sums[len(sums)-1].Latency
	rep.printf(t, "Floors (%s, %.0f RPS on each path, interleaved in one run, a new connection per request):\n", fn.Name, rps)
	rep.printf(t, "| path | requests | p50 | p99 | p50 / direct |")
	rep.printf(t, "|---|---|---|---|---|")
	for i, s := range sums {
		rep.printf(t, "| %s | %d | %s | %s | %.2f× |", paths[i].name, s.Issued, us(s.Latency.P50), us(s.Latency.P99), s.Latency.P50/floor.P50)
	}
	rep.printf(t, "")
}

var okCount = regexp.MustCompile(`(?m)^vhive_queue_proxy_requests_total\{code="OK"\} (\d+)$`)

// queueProxyCounts scrapes every running pod's queue-proxy: function →
// pod → OK requests relayed.
func queueProxyCounts(ctx context.Context, t *testing.T, cs kubernetes.Interface, fns []Function) map[string]map[string]int {
	t.Helper()
	out := map[string]map[string]int{}
	for _, fn := range fns {
		out[fn.Name] = map[string]int{}
		pods, err := cs.CoreV1().Pods(fn.Namespace).List(ctx, metav1.ListOptions{LabelSelector: fn.Selector()})
		if err != nil {
			t.Fatal(err)
		}
		for _, p := range pods.Items {
			if p.Status.PodIP == "" || p.DeletionTimestamp != nil {
				continue
			}
			url := fmt.Sprintf("http://%s:%d/metrics", p.Status.PodIP, QueueProxyAdmin)
			res, err := http.Get(url)
			if err != nil {
				t.Fatalf("scrape %s (%s): %v", p.Name, url, err)
			}
			b, _ := io.ReadAll(res.Body)
			res.Body.Close()
			n := 0
			if m := okCount.FindSubmatch(b); m != nil {
				n, _ = strconv.Atoi(string(m[1]))
			}
			out[fn.Name][p.Name] = n
		}
	}
	return out
}

func us(v float64) string {
	return (time.Duration(v) * time.Microsecond).Round(10 * time.Microsecond).String()
}

// podTimes are when the watch first saw a pod in each state.
type podTimes struct {
	node                           string
	created, scheduled, run, ready time.Time
}

// watchPods records podTimes of the pods matching sel until ctx ends.
func watchPods(ctx context.Context, t *testing.T, cs kubernetes.Interface, ns, sel string) (func() map[string]*podTimes, error) {
	w, err := cs.CoreV1().Pods(ns).Watch(ctx, metav1.ListOptions{LabelSelector: sel})
	if err != nil {
		return nil, err
	}
	var mu sync.Mutex
	seen := map[string]*podTimes{}
	done := make(chan struct{})
	go func() {
		defer close(done)
		for ev := range w.ResultChan() {
			p, ok := ev.Object.(*corev1.Pod)
			if !ok || ev.Type == watch.Deleted {
				continue
			}
			now := time.Now()
			mu.Lock()
			pt := seen[p.Name]
			if pt == nil {
				pt = &podTimes{created: now}
				seen[p.Name] = pt
			}
			if pt.scheduled.IsZero() && p.Spec.NodeName != "" {
				pt.scheduled, pt.node = now, p.Spec.NodeName
			}
			if pt.run.IsZero() && p.Status.Phase == corev1.PodRunning {
				pt.run = now
			}
			for _, c := range p.Status.Conditions {
				if c.Type == corev1.PodReady && c.Status == corev1.ConditionTrue && pt.ready.IsZero() {
					pt.ready = now
				}
			}
			mu.Unlock()
		}
	}()
	return func() map[string]*podTimes {
		w.Stop()
		<-done
		mu.Lock()
		defer mu.Unlock()
		return seen
	}, nil
}

var (
	stageLine    = regexp.MustCompile(`msg="function sandbox started".* pod=(\S+) .*GetImage_us=(\d+) CreateSandbox_us=(\d+) StartSandbox_us=(\d+)`)
	endpointLine = regexp.MustCompile(`msg="function sandbox started".* pod=(\S+) .*endpoint=(\S+)`)
)

// functionEndpoints reads pod → function sandbox endpoint (host:port) from
// the vhive daemons' logs.
func functionEndpoints(t *testing.T, c *cluster.Cluster) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, log := range daemonLogs(c) {
		b, err := os.ReadFile(log)
		if err != nil {
			continue
		}
		for _, m := range endpointLine.FindAllStringSubmatch(string(b), -1) {
			out[m[1]] = m[2]
		}
	}
	return out
}

// daemonLogs lists the log files of the cluster's vhive daemons.
func daemonLogs(c *cluster.Cluster) []string {
	var logs []string
	for _, p := range c.Status() {
		if p.Component == cluster.VhiveDaemon && p.Log != "" {
			logs = append(logs, p.Log)
		}
	}
	return logs
}

// nodeStages reads the node-local cold-start stages (µs) of pods from the
// vhive daemons' logs: pod → [GetImage, CreateSandbox, StartSandbox].
func nodeStages(t *testing.T, c *cluster.Cluster) map[string][3]int64 {
	t.Helper()
	out := map[string][3]int64{}
	for _, log := range daemonLogs(c) {
		f, err := os.Open(log)
		if err != nil {
			continue
		}
		sc := bufio.NewScanner(f)
		sc.Buffer(make([]byte, 1<<20), 1<<20)
		for sc.Scan() {
			if m := stageLine.FindStringSubmatch(sc.Text()); m != nil {
				var v [3]int64
				for i := range v {
					v[i], _ = strconv.ParseInt(m[i+2], 10, 64)
				}
				out[m[1]] = v
			}
		}
		f.Close()
	}
	return out
}

// scaleFromZero scales fn to zero, then back to one pod per node while the
// invoker drives it, and reports when each new pod was scheduled, running
// and ready, the node-local stages of its function sandbox, and the first
// reply after the scale-up. Requests before the first ready pod fail
// (there is no activator to hold them, as Knative's would).
func scaleFromZero(ctx context.Context, t *testing.T, c *cluster.Cluster, cs kubernetes.Interface, fn Function, rps float64, rep *report) {
	if err := Scale(ctx, cs, fn, 0); err != nil {
		t.Fatal(err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer wcancel()
	if err := WaitReady(wctx, cs, fn, 0); err != nil {
		t.Fatal(err)
	}
	// The pods are gone from the API; wait for them to be gone for real.
	waitNoPods(wctx, t, cs, fn)
	stop, err := watchPods(ctx, t, cs, fn.Namespace, fn.Selector())
	if err != nil {
		t.Fatal(err)
	}
	n := int32(len(c.Nodes()))
	var (
		res    *invoker.Result
		runErr error
		wg     sync.WaitGroup
	)
	wg.Go(func() {
		res, runErr = invoker.Run(ctx, invoker.Config{
			Endpoints: Endpoints([]Function{fn}), RPS: rps, Duration: 20 * time.Second,
			ConnPerRequest: true, Timeout: 10 * time.Second,
		})
	})
	time.Sleep(2 * time.Second)
	scaled := time.Now()
	if err := Scale(ctx, cs, fn, n); err != nil {
		t.Fatal(err)
	}
	wg.Wait()
	if runErr != nil {
		t.Fatal(runErr)
	}
	pods := stop()
	stages := nodeStages(t, c)
	var lastReady time.Time
	for _, pt := range pods {
		if pt.ready.After(lastReady) {
			lastReady = pt.ready
		}
	}
	if lastReady.IsZero() {
		t.Fatalf("scale from zero: no pod became ready (pods %v)", pods)
	}
	// The requests issued between the scale-up and the last pod's
	// readiness are the ones that met the cold start.
	var firstOK time.Time
	var coldLat []time.Duration
	coldFailed, late := 0, 0
	for _, r := range res.Records {
		end := r.Start.Add(r.Latency)
		if r.Code == 0 && r.Start.After(scaled) && (firstOK.IsZero() || end.Before(firstOK)) {
			firstOK = end
		}
		switch {
		case r.Start.After(lastReady.Add(3 * time.Second)):
			if r.Code != 0 {
				late++
			}
		case r.Start.After(scaled) && !r.Start.After(lastReady):
			if r.Code == 0 {
				coldLat = append(coldLat, r.Latency)
			} else {
				coldFailed++
			}
		}
	}
	if firstOK.IsZero() {
		t.Fatalf("scale from zero: no successful reply after the scale-up (pods %v)", pods)
	}
	if len(pods) != int(n) {
		t.Errorf("scale from zero: %d pods seen, want %d", len(pods), n)
	}
	if late != 0 {
		t.Errorf("scale from zero: %d errors more than 3 s after every pod was ready", late)
	}
	ms := func(a, b time.Time) string {
		if a.IsZero() || b.IsZero() {
			return "-"
		}
		return strconv.FormatInt(a.Sub(b).Milliseconds(), 10)
	}
	slices.Sort(coldLat)
	coldSum := "none succeeded"
	if k := len(coldLat); k > 0 {
		coldSum = fmt.Sprintf("latency p50 %v, max %v", coldLat[k/2].Round(time.Millisecond), coldLat[k-1].Round(time.Millisecond))
	}
	rep.printf(t, "Scale from zero (%s, 0 → %d pods while the invoker sends %.0f RPS to its Service): first reply %s ms after the scale-up, last pod ready after %s ms. Requests issued in between: %d succeeded (%s: their connection attempts completed once the Service had an endpoint), %d failed (no activator holds requests, as Knative's would).\n",
		fn.Name, n, rps, ms(firstOK, scaled), ms(lastReady, scaled), len(coldLat), coldSum, coldFailed)
	rep.printf(t, "| pod | node | scheduled | running | ready | GetImage | CreateSandbox | StartSandbox |")
	rep.printf(t, "|---|---|---|---|---|---|---|---|")
	for _, name := range slices.Sorted(maps.Keys(pods)) {
		pt := pods[name]
		st, ok := stages[name]
		if !ok {
			t.Errorf("no node-local stages logged for pod %s", name)
		}
		rep.printf(t, "| %s | %s | %s | %s | %s | %.1f | %.1f | %.1f |", name, pt.node, ms(pt.scheduled, scaled), ms(pt.run, scaled), ms(pt.ready, scaled),
			float64(st[0])/1000, float64(st[1])/1000, float64(st[2])/1000)
	}
	rep.printf(t, "\n(ms after the scale-up; the stages are the vhive CRI's, in ms, from the node's daemon log)\n")
}

func waitNoPods(ctx context.Context, t *testing.T, cs kubernetes.Interface, fn Function) {
	t.Helper()
	for {
		pods, err := cs.CoreV1().Pods(fn.Namespace).List(ctx, metav1.ListOptions{LabelSelector: fn.Selector()})
		if err == nil && len(pods.Items) == 0 {
			return
		}
		select {
		case <-ctx.Done():
			t.Fatalf("%s: pods left after scaling to zero", fn.Name)
		case <-time.After(250 * time.Millisecond):
		}
	}
}

// nodeFailure kills the last node's kubelet and vhive daemon and cuts its
// network during a run:
// its pods are evicted and recreated on the other nodes, the run goes on,
// the errors are counted; then the node is restarted and its new daemon
// removes what the killed one left.
func nodeFailure(ctx context.Context, t *testing.T, c *cluster.Cluster, cs kubernetes.Interface, fns []Function, rps float64, rep *report) {
	victim := c.Nodes()[len(c.Nodes())-1]
	leftover := sandboxProcs(t, victim)
	if len(leftover) == 0 {
		t.Fatalf("no function sandbox processes found on %s before the failure", victim.Name)
	}
	run := 45 * time.Second
	var (
		res    *invoker.Result
		runErr error
		wg     sync.WaitGroup
	)
	wg.Go(func() {
		res, runErr = invoker.Run(ctx, invoker.Config{
			Endpoints: Endpoints(fns), RPS: rps, Duration: run, ConnPerRequest: true, Timeout: 2 * time.Second,
		})
	})
	time.Sleep(5 * time.Second)
	killed := time.Now()
	// The worker is lost as a machine would be: its agents die and it
	// drops off the network, so requests to its pods go unanswered until
	// the endpoints drop them.
	if err := c.KillNode(ctx, victim.Name); err != nil {
		t.Fatalf("kill node %s: %v", victim.Name, err)
	}
	if err := c.Isolate(ctx, victim.Name); err != nil {
		t.Fatalf("isolate node %s: %v", victim.Name, err)
	}
	// Replacement pods become ready on the other nodes.
	var recovered time.Time
	for _, fn := range fns {
		wctx, wcancel := context.WithTimeout(ctx, run)
		for {
			on, err := NodesOf(wctx, cs, fn)
			ready, _ := ReadyEndpoints(wctx, cs, fn)
			moved := 0
			for _, node := range on {
				if node != victim.Name {
					moved++
				}
			}
			if err == nil && moved == len(c.Nodes()) && ready == len(c.Nodes()) {
				break
			}
			if wctx.Err() != nil {
				t.Fatalf("%s: pods not recreated off %s: %v, %d ready endpoints", fn.Name, victim.Name, on, ready)
			}
			time.Sleep(250 * time.Millisecond)
		}
		wcancel()
		recovered = time.Now()
	}
	wg.Wait()
	if runErr != nil {
		t.Fatal(runErr)
	}
	s := res.Summarize()
	want := int(rps * run.Seconds())
	if s.Issued < want-1 {
		t.Errorf("failover run: issued %d, want %d: the run did not keep going", s.Issued, want)
	}
	late := 0
	for _, r := range res.Records {
		if r.Code != 0 && r.Start.After(recovered.Add(3*time.Second)) {
			late++
		}
	}
	if late != 0 {
		t.Errorf("failover run: %d errors more than 3 s after the pods were recreated", late)
	}
	codes := []string{}
	for _, k := range slices.Sorted(maps.Keys(s.Errors)) {
		codes = append(codes, fmt.Sprintf("%s %d", k, s.Errors[k]))
	}
	rep.printf(t, "Node failure (%s's kubelet and vhive daemon killed and its link cut %v into a %v run at %.0f RPS, request timeout 2 s): pods recreated on the other nodes and ready %.1f s after the kill; issued %d, completed %d, errors during failover %d (%s).\n",
		victim.Name, 5*time.Second, run, rps, recovered.Sub(killed).Seconds(), s.Issued, s.Completed, s.Failed, strings.Join(codes, ", "))

	// The node comes back; its new daemon cleans up after the killed one.
	if err := c.Reconnect(ctx, victim.Name); err != nil {
		t.Fatalf("reconnect node %s: %v", victim.Name, err)
	}
	if err := c.RestartNode(ctx, victim.Name); err != nil {
		t.Fatalf("restart node %s: %v", victim.Name, err)
	}
	wctx, wcancel := context.WithTimeout(ctx, 2*time.Minute)
	defer wcancel()
	if err := c.WaitReady(wctx); err != nil {
		t.Fatalf("node %s not Ready after restart: %v", victim.Name, err)
	}
	for {
		alive := 0
		for _, p := range leftover {
			if p.alive() {
				alive++
			}
		}
		if alive == 0 {
			break
		}
		if wctx.Err() != nil {
			t.Fatalf("%d function sandbox processes of the killed daemon on %s still run after its restart", alive, victim.Name)
		}
		time.Sleep(500 * time.Millisecond)
	}
	rep.printf(t, "After %s restarted, its vhive daemon removed the %d sandbox processes its killed predecessor left.\n", victim.Name, len(leftover))
}

// proc is a process identified by pid and start time (never a reused pid).
type proc struct {
	pid   int
	start string
}

func (p proc) alive() bool { return procStart(p.pid) == p.start }

func procStart(pid int) string {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return ""
	}
	// Field 22 (starttime), counted after the ")" that ends the command.
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return ""
	}
	f := strings.Fields(s[i+1:])
	if len(f) < 20 {
		return ""
	}
	return f[19]
}

// sandboxProcs lists the runsc processes of node n's vhive daemon (their
// command line names the daemon's state dir under the node's dir).
func sandboxProcs(t *testing.T, n cluster.Node) []proc {
	t.Helper()
	ents, err := os.ReadDir("/proc")
	if err != nil {
		t.Fatal(err)
	}
	var out []proc
	state := filepath.Join(n.Dir, "vhive")
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil {
			continue
		}
		args := strings.Split(string(b), "\x00")
		// gVisor's runsc, or the microvm sandbox's QEMU.
		if len(args) == 0 || !(strings.Contains(filepath.Base(args[0]), "runsc") || strings.HasPrefix(filepath.Base(args[0]), "qemu-system")) {
			continue
		}
		if strings.Contains(string(b), state+"/") {
			out = append(out, proc{pid: pid, start: procStart(pid)})
		}
	}
	return out
}

func dumpLogs(t *testing.T, c *cluster.Cluster) {
	for _, p := range c.Status() {
		if p.Log == "" {
			continue
		}
		b, err := os.ReadFile(p.Log)
		if err != nil {
			continue
		}
		if len(b) > 3000 {
			b = b[len(b)-3000:]
		}
		t.Logf("--- %s %s (alive %v) %s:\n%s", p.Node, p.Component, p.Alive, p.Log, b)
	}
}

// testWriter sends slog output to t.Log.
type testWriter struct{ t *testing.T }

func (w testWriter) Write(b []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(b), "\n"))
	return len(b), nil
}
