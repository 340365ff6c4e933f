package install

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"vhive.dev/vhive/internal/testutil"
)

// missing skips, or fails in CI, where make test builds every tool.
func missing(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// kubectl runs the cache's kubectl (make k8s-tools) against a real etcd
// and kube-apiserver v1.37.2 on loopback ports of testutil.Port, started for
// the test and stopped at its end.
type kubectl func(ctx context.Context, args ...string) (string, error)

func apiserver(t *testing.T) kubectl {
	t.Helper()
	bin := filepath.Join(testutil.CacheDir(), "bin")
	for _, b := range []string{"vhive-etcd", "kube-apiserver", "kubectl"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			missing(t, "%s not found in %s (run `make k8s-tools`): %v", b, bin, err)
		}
	}
	if _, err := exec.LookPath("openssl"); err != nil {
		missing(t, "openssl not found (apt-get install openssl): %v", err)
	}
	dir := t.TempDir()
	ctx := context.Background()
	sa := filepath.Join(dir, "sa")
	for _, args := range [][]string{
		{"genrsa", "-out", sa + ".key", "2048"},
		{"rsa", "-in", sa + ".key", "-pubout", "-out", sa + ".pub"},
	} {
		if out, err := exec.CommandContext(ctx, "openssl", args...).CombinedOutput(); err != nil {
			t.Fatalf("openssl %v: %v\n%s", args, err, out)
		}
	}
	tok := make([]byte, 16)
	rand.Read(tok)
	token := hex.EncodeToString(tok)
	if err := os.WriteFile(filepath.Join(dir, "tokens.csv"), []byte(token+",admin,admin,system:masters\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	etcdClient, etcdPeer, api := testutil.Port(t), testutil.Port(t), testutil.Port(t)
	start := func(name string, args ...string) {
		log, err := os.Create(filepath.Join(dir, name+".log"))
		if err != nil {
			t.Fatal(err)
		}
		cmd := exec.Command(filepath.Join(bin, name), args...)
		cmd.Stdout, cmd.Stderr = log, log
		if err := cmd.Start(); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		t.Cleanup(func() {
			_ = cmd.Process.Kill()
			_ = cmd.Wait()
			log.Close()
			if t.Failed() {
				b, _ := os.ReadFile(log.Name())
				if len(b) > 3000 {
					b = b[len(b)-3000:]
				}
				t.Logf("%s log (tail):\n%s", name, b)
			}
		})
	}
	start("vhive-etcd", "-data-dir", filepath.Join(dir, "etcd"), "-listen-client", "http://"+etcdClient,
		"-listen-peer", "http://"+etcdPeer)
	_, port, _ := strings.Cut(api, ":")
	start("kube-apiserver", "--etcd-servers", "http://"+etcdClient, "--bind-address", "127.0.0.1",
		"--secure-port", port, "--advertise-address", "127.0.0.1",
		"--endpoint-reconciler-type", "none", "--service-cluster-ip-range", "10.187.0.0/16",
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", sa+".pub",
		"--service-account-signing-key-file", sa+".key", "--token-auth-file", filepath.Join(dir, "tokens.csv"),
		"--authorization-mode", "AlwaysAllow", "--cert-dir", filepath.Join(dir, "pki"),
		"--disable-admission-plugins", "ServiceAccount")
	run := func(ctx context.Context, args ...string) (string, error) {
		args = append([]string{"--server", "https://" + api, "--token", token, "--insecure-skip-tls-verify"}, args...)
		out, err := exec.CommandContext(ctx, filepath.Join(bin, "kubectl"), args...).CombinedOutput()
		if err != nil {
			return string(out), fmt.Errorf("kubectl %s: %w\n%s", strings.Join(args[5:], " "), err, out)
		}
		return string(out), nil
	}
	wctx, cancel := context.WithTimeout(ctx, 3*time.Minute)
	defer cancel()
	for {
		out, err := run(wctx, "get", "--raw", "/readyz")
		if err == nil && strings.TrimSpace(out) == "ok" {
			return run
		}
		select {
		case <-wctx.Done():
			t.Fatalf("kube-apiserver not ready: %v", err)
		case <-time.After(500 * time.Millisecond):
		}
	}
}

// TestApplyToAPIServer applies the generated YAML with kubectl to a real
// kube-apiserver (the cluster's v1.37.2), as make cluster will: the CRDs,
// a wait until they are Established, then the rest. The apiserver accepts
// every object (each CRD's schema, and the Image and Certificate against
// theirs); the four Deployments name the registry's images; applying again
// changes no object's spec. Nothing runs them: there are no nodes.
func TestApplyToAPIServer(t *testing.T) {
	kc := apiserver(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	crds, core, err := GenerateParts(Options{Sources: sources(t), Registry: testRegistry, Tag: "v0.50.0", Version: Release})
	if err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	crdFile, coreFile := filepath.Join(dir, "serving-crds.yaml"), filepath.Join(dir, "serving-core.yaml")
	if err := os.WriteFile(crdFile, crds, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(coreFile, core, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := kc(ctx, "apply", "-f", crdFile)
	if err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out, " created"); n != 12 {
		t.Errorf("%d CRDs created, want 12:\n%s", n, out)
	}
	if _, err := kc(ctx, "wait", "--for", "condition=Established", "--timeout", "120s", "crd", "--all"); err != nil {
		t.Fatal(err)
	}
	if out, err = kc(ctx, "apply", "-f", coreFile); err != nil {
		t.Fatal(err)
	}
	if n := strings.Count(out, " created"); n != 47 {
		t.Errorf("%d objects created, want 47:\n%s", n, out)
	}
	out, err = kc(ctx, "get", "deployments", "-n", Namespace,
		"-o", `jsonpath={range .items[*]}{.metadata.name}={.spec.template.spec.containers[0].image}{"\n"}{end}`)
	if err != nil {
		t.Fatal(err)
	}
	got := strings.Fields(out)
	slices.Sort(got)
	var want []string
	for _, d := range []string{"activator", "autoscaler", "controller", "webhook"} {
		want = append(want, d+"="+testRegistry+"/knative/"+d+":v0.50.0")
	}
	if !slices.Equal(got, want) {
		t.Errorf("deployments %v, want %v", got, want)
	}
	out, err = kc(ctx, "get", "images.caching.internal.knative.dev", "queue-proxy", "-n", Namespace, "-o", "jsonpath={.spec.image}")
	if err != nil || out != testRegistry+"/knative/queue:v0.50.0" {
		t.Errorf("Image queue-proxy: %q, %v", out, err)
	}
	// Applying again changes no object's spec: every generation stays 1.
	// (kubectl may still say "configured" for some: a 3-way patch that
	// rewrites only its last-applied annotation.)
	for _, f := range []string{crdFile, coreFile} {
		if _, err := kc(ctx, "apply", "-f", f); err != nil {
			t.Fatal(err)
		}
	}
	for _, kind := range []string{"crd", "deployments", "poddisruptionbudgets", "horizontalpodautoscalers"} {
		args := []string{"get", kind, "-o", `jsonpath={range .items[*]}{.metadata.name}={.metadata.generation}{"\n"}{end}`}
		if kind != "crd" {
			args = append(args, "-n", Namespace)
		}
		out, err := kc(ctx, args...)
		if err != nil {
			t.Fatal(err)
		}
		if strings.TrimSpace(out) == "" {
			t.Errorf("no %s", kind)
		}
		for _, l := range strings.Fields(out) {
			if !strings.HasSuffix(l, "=1") {
				t.Errorf("%s %s after a second apply", kind, l)
			}
		}
	}
}
