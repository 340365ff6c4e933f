package kdeploy

import (
	"context"
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"

	"vhive.dev/vhive/internal/invoker"
)

// qpImage is only a reference written into the objects; nothing pulls it.
const qpImage = "10.186.0.1:24500/vhive/queue-proxy:latest"

func repoFile(t *testing.T, rel string) string {
	t.Helper()
	p := filepath.Join("..", "..", rel)
	if _, err := os.Stat(p); err != nil {
		t.Fatal(err)
	}
	return p
}

func TestParseServiceHelloworld(t *testing.T) {
	s, err := ReadService(repoFile(t, "deploy/knative-helloworld.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	c := s.Spec.Template.Spec.Containers[0]
	if guestImage(c) != "ghcr.io/vhive-serverless/helloworld:var_workload" || envOf(c, EnvGuestPort) != "50051" {
		t.Errorf("container env = %+v", c.Env)
	}
}

func TestParseServiceRefusesBadManifests(t *testing.T) {
	good := `apiVersion: serving.knative.dev/v1
kind: Service
metadata: {name: f}
spec:
  template:
    metadata:
      annotations: {autoscaling.knative.dev/min-scale: "2"}
    spec:
      containerConcurrency: 1
      containers:
        - image: registry.k8s.io/pause:3.9
          env: [{name: GUEST_IMAGE, value: "localhost/vhive/helloworld:latest"}, {name: GUEST_PORT, value: "50051"}]
`
	if s, err := ParseService("good.yaml", []byte(good)); err != nil {
		t.Fatalf("good manifest: %v", err)
	} else if n, _ := s.minScale(); n != 2 {
		t.Errorf("min-scale = %d, want 2", n)
	}
	if _, err := ParseService("good.yaml", []byte("# a comment\n---\n"+good)); err != nil {
		t.Errorf("a leading --- and comment: %v", err)
	}
	for name, tc := range map[string]struct{ yaml, want string }{
		"unknown field":  {strings.Replace(good, "containerConcurrency", "containerConcurency", 1), "containerConcurency"},
		"kind":           {strings.Replace(good, "kind: Service", "kind: Pod", 1), "want a Knative Service"},
		"api version":    {strings.Replace(good, "serving.knative.dev/v1", "v1", 1), "want a Knative Service"},
		"no GUEST_IMAGE": {strings.Replace(good, "GUEST_IMAGE", "OTHER", 1), "GUEST_IMAGE"},
		"bad GUEST_PORT": {strings.Replace(good, `value: "50051"`, `value: "http"`, 1), "GUEST_PORT"},
		"bad min-scale":  {strings.Replace(good, `min-scale: "2"`, `min-scale: "two"`, 1), "min-scale"},
		"two containers": {good + "        - image: x\n", "2 containers"},
		"two documents":  {good + "---\n" + good, "2 YAML documents"},
		"empty":          {"", "0 YAML documents"},
		"no image":       {strings.Replace(good, "image: registry.k8s.io/pause:3.9", "name: c", 1), "no image"},
		"traffic split":  {good + "  traffic: [{revisionName: f-00001, percent: 50}]\n", "traffic splitting"},
	} {
		_, err := ParseService("bad.yaml", []byte(tc.yaml))
		if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "bad.yaml") {
			t.Errorf("%s: err = %v, want one naming bad.yaml and %q", name, err, tc.want)
		}
	}
}

func TestObjects(t *testing.T) {
	s, err := ReadService(repoFile(t, "deploy/knative-helloworld.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	three := int32(3)
	dep, svc, err := Objects(s, "helloworld-0", ObjectOptions{QueueProxyImage: qpImage, Replicas: &three})
	if err != nil {
		t.Fatal(err)
	}
	if dep.Name != "helloworld-0-00001-deployment" || *dep.Spec.Replicas != 3 || dep.Namespace != "default" {
		t.Errorf("deployment %s/%s replicas %d", dep.Namespace, dep.Name, *dep.Spec.Replicas)
	}
	ps := dep.Spec.Template.Spec
	if len(ps.Containers) != 2 || ps.Containers[0].Name != UserContainer || ps.Containers[1].Name != QueueProxy {
		t.Fatalf("containers %+v", ps.Containers)
	}
	uc, qp := ps.Containers[0], ps.Containers[1]
	for k, v := range map[string]string{
		EnvGuestImage: "ghcr.io/vhive-serverless/helloworld:var_workload", EnvGuestPort: "50051",
		EnvRevision: "helloworld-0-00001", "PORT": "50051", "K_SERVICE": "helloworld-0",
	} {
		if got := envOf(uc, k); got != v {
			t.Errorf("user-container env %s = %q, want %q", k, got, v)
		}
	}
	if len(uc.Ports) != 0 {
		t.Errorf("user-container keeps ports %v; the function does not listen in the pod", uc.Ports)
	}
	if qp.Image != qpImage || qp.ReadinessProbe == nil || qp.ReadinessProbe.HTTPGet == nil ||
		qp.ReadinessProbe.HTTPGet.Port.IntValue() != QueueProxyPort ||
		len(qp.ReadinessProbe.HTTPGet.HTTPHeaders) != 1 || qp.ReadinessProbe.HTTPGet.HTTPHeaders[0].Name != "K-Network-Probe" {
		t.Errorf("queue-proxy %+v", qp)
	}
	tol := map[string]int64{}
	for _, tl := range ps.Tolerations {
		if tl.Effect == corev1.TaintEffectNoExecute && tl.TolerationSeconds != nil {
			tol[tl.Key] = *tl.TolerationSeconds
		}
	}
	if tol[corev1.TaintNodeNotReady] != 5 || tol[corev1.TaintNodeUnreachable] != 5 {
		t.Errorf("tolerations %v, want not-ready and unreachable at 5s", tol)
	}
	if len(ps.TopologySpreadConstraints) != 1 || ps.TopologySpreadConstraints[0].TopologyKey != corev1.LabelHostname {
		t.Errorf("spread %+v", ps.TopologySpreadConstraints)
	}
	if dep.Spec.Template.Labels[LabelRevision] != "helloworld-0-00001" || dep.Spec.Selector.MatchLabels[LabelRevision] != "helloworld-0-00001" {
		t.Errorf("pod labels %v selector %v", dep.Spec.Template.Labels, dep.Spec.Selector.MatchLabels)
	}
	if svc.Name != "helloworld-0" || svc.Spec.Selector[LabelRevision] != "helloworld-0-00001" ||
		svc.Spec.Ports[0].Port != 80 || svc.Spec.Ports[0].TargetPort.IntValue() != QueueProxyPort {
		t.Errorf("service %+v", svc)
	}
	// The manifest itself is not modified.
	if n := len(s.Spec.Template.Spec.Containers[0].Env); n != 2 {
		t.Errorf("Objects changed the manifest's env: %d entries", n)
	}
	if _, _, err := Objects(s, "x", ObjectOptions{}); err == nil || !strings.Contains(err.Error(), "queue-proxy image") {
		t.Errorf("no queue-proxy image: %v", err)
	}
	if _, _, err := Objects(s, "Bad_Name", ObjectOptions{QueueProxyImage: qpImage}); err == nil || !strings.Contains(err.Error(), "Bad_Name") {
		t.Errorf("bad name: %v", err)
	}
}

// TestDeployOnAPIServer creates, updates, scales and removes functions on a
// real kube-apiserver (no nodes: the pods stay pending; running them is
// what the cluster end-to-end test does).
func TestDeployOnAPIServer(t *testing.T) {
	cs := apiserver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	dir := t.TempDir()
	hello, err := os.ReadFile(repoFile(t, "deploy/knative-helloworld.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "helloworld.yaml"), hello, 0o644); err != nil {
		t.Fatal(err)
	}
	aes := strings.ReplaceAll(string(hello), "helloworld", "aes")
	aes = strings.Replace(aes, "  template:\n", "  template:\n    metadata:\n      annotations: {autoscaling.knative.dev/min-scale: \"2\"}\n", 1)
	if err := os.WriteFile(filepath.Join(dir, "aes.yaml"), []byte(aes), 0o644); err != nil {
		t.Fatal(err)
	}
	fnsFile := filepath.Join(dir, "functions.json")
	os.WriteFile(fnsFile, []byte(`{"functions":[{"name":"helloworld","file":"helloworld.yaml","count":2},{"name":"aes","file":"aes.yaml","count":1}]}`), 0o644)
	entries, err := invoker.ReadFunctions(fnsFile)
	if err != nil {
		t.Fatal(err)
	}
	opts := Options{ObjectOptions: ObjectOptions{QueueProxyImage: qpImage}, FuncPath: dir}
	fns, err := Deploy(ctx, cs, entries, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(fns) != 3 || fns[0].Name != "helloworld-0" || fns[1].Name != "helloworld-1" || fns[2].Name != "aes-0" {
		t.Fatalf("deployed %+v", fns)
	}
	_, cidr, _ := net.ParseCIDR(serviceCIDR)
	for _, f := range fns {
		if ip := net.ParseIP(f.ClusterIP); ip == nil || !cidr.Contains(ip) {
			t.Errorf("%s: cluster IP %q not in %s", f.Name, f.ClusterIP, serviceCIDR)
		}
		d, err := cs.AppsV1().Deployments("default").Get(ctx, f.Deployment, metav1.GetOptions{})
		if err != nil {
			t.Fatalf("%s: %v", f.Name, err)
		}
		want := int32(1)
		if f.Name == "aes-0" {
			want = 2
		}
		if *d.Spec.Replicas != want || f.Replicas != want {
			t.Errorf("%s: replicas %d (reported %d), want %d", f.Name, *d.Spec.Replicas, f.Replicas, want)
		}
		if got := guestImage(d.Spec.Template.Spec.Containers[0]); !strings.Contains(got, strings.TrimSuffix(f.Name, "-0")[:3]) {
			t.Errorf("%s: GUEST_IMAGE %q", f.Name, got)
		}
	}
	// The endpoints file the invoker reads.
	epFile := filepath.Join(dir, "endpoints.json")
	if err := invoker.WriteEndpoints(epFile, Endpoints(fns)); err != nil {
		t.Fatal(err)
	}
	eps, err := invoker.ReadEndpoints(epFile)
	if err != nil {
		t.Fatal(err)
	}
	if len(eps) != 3 || eps[0].Hostname != "helloworld-0.default.svc.cluster.local" || eps[0].Address != fns[0].ClusterIP+":80" {
		t.Errorf("endpoints %+v", eps)
	}

	// Deploying again is refused without Replace; nothing changes.
	if _, err := Deploy(ctx, cs, entries, opts); !errors.Is(err, ErrExists) || !strings.Contains(err.Error(), "helloworld-0") {
		t.Errorf("second deploy: %v, want ErrExists naming helloworld-0", err)
	}
	// With Replace the objects are updated in place (same cluster IP).
	opts.Replace = true
	five := int32(5)
	opts.Replicas = &five
	again, err := Deploy(ctx, cs, entries[:1], opts)
	if err != nil {
		t.Fatal(err)
	}
	if again[0].ClusterIP != fns[0].ClusterIP || again[0].Replicas != 5 {
		t.Errorf("replaced: %+v (was %+v)", again[0], fns[0])
	}
	// An object vhive does not manage is never replaced.
	foreign := &corev1.Service{ObjectMeta: metav1.ObjectMeta{Name: "other-0", Namespace: "default"},
		Spec: corev1.ServiceSpec{Ports: []corev1.ServicePort{{Port: 1234}}}}
	if _, err := cs.CoreV1().Services("default").Create(ctx, foreign, metav1.CreateOptions{}); err != nil {
		t.Fatal(err)
	}
	s, _ := ReadService(filepath.Join(dir, "helloworld.yaml"))
	if _, err := DeployService(ctx, cs, s, "other-0", opts); err == nil || !strings.Contains(err.Error(), "not managed by vhive") {
		t.Errorf("deploy over a foreign service: %v", err)
	}
	if got, _ := cs.CoreV1().Services("default").Get(ctx, "other-0", metav1.GetOptions{}); got.Spec.Ports[0].Port != 1234 {
		t.Errorf("foreign service changed: %+v", got.Spec)
	}

	// Scale (the scale-from-zero experiment's knob) and Remove.
	if err := Scale(ctx, cs, fns[2], 0); err != nil {
		t.Fatal(err)
	}
	if d, _ := cs.AppsV1().Deployments("default").Get(ctx, fns[2].Deployment, metav1.GetOptions{}); *d.Spec.Replicas != 0 {
		t.Errorf("scaled to 0, have %d", *d.Spec.Replicas)
	}
	if err := Scale(ctx, cs, fns[2], -1); err == nil {
		t.Error("negative scale accepted")
	}
	for _, f := range fns {
		if err := Remove(ctx, cs, f); err != nil {
			t.Fatal(err)
		}
		if _, err := cs.CoreV1().Services("default").Get(ctx, f.Name, metav1.GetOptions{}); err == nil {
			t.Errorf("%s: service left after Remove", f.Name)
		}
	}
	// A bad manifest is reported before anything is created.
	os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte("kind: Pod\n"), 0o644)
	_, err = Deploy(ctx, cs, []invoker.FunctionEntry{{Name: "good", File: "helloworld.yaml", Count: 1}, {Name: "bad", File: "bad.yaml", Count: 1}}, opts)
	if err == nil || !strings.Contains(err.Error(), "bad.yaml") {
		t.Errorf("bad manifest: %v", err)
	}
	if _, err := cs.CoreV1().Services("default").Get(ctx, "good-0", metav1.GetOptions{}); err == nil {
		t.Error("a function was created although a later manifest was bad")
	}
}
