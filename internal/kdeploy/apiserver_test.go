package kdeploy

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/rest"

	"vhive.dev/vhive/internal/testutil"
)

// Loopback ports of this package's control plane. Fixed, since they are
// passed to etcd and the apiserver before these bind them; below the
// ephemeral range (32768-60999), where any outgoing connection on the
// machine could hold them, and apart from the other suites' fixed ports
// (internal/cluster 29000-29306, nodetest.Port 26000-26999, scripts/k8s
// 16443, 23790, 23800).
const (
	etcdClientPort = 24010
	etcdPeerPort   = 24011
	apiserverPort  = 24443
	serviceCIDR    = "10.186.0.0/16"
)

// apiserver starts a real etcd (scripts/k8s/build.sh's vhive-etcd) and
// kube-apiserver on loopback for the test, with a static admin token, and
// returns a clientset. Both are stopped, and their data removed, at cleanup.
func apiserver(t *testing.T) kubernetes.Interface {
	t.Helper()
	bin := filepath.Join(testutil.CacheDir(), "bin")
	for _, b := range []string{"vhive-etcd", "kube-apiserver"} {
		if _, err := os.Stat(filepath.Join(bin, b)); err != nil {
			missing(t, "%s not found in %s (run `make k8s-tools`): %v", b, bin, err)
		}
	}
	dir := t.TempDir()
	key, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	pub, err := x509.MarshalPKIXPublicKey(&key.PublicKey)
	if err != nil {
		t.Fatal(err)
	}
	write := func(name string, b []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	saKey := write("sa.key", pem.EncodeToMemory(&pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key)}))
	saPub := write("sa.pub", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub}))
	tok := make([]byte, 16)
	rand.Read(tok)
	token := hex.EncodeToString(tok)
	tokens := write("tokens.csv", []byte(token+",admin,admin,system:masters\n"))

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
				if len(b) > 4000 {
					b = b[len(b)-4000:]
				}
				t.Logf("%s log (tail):\n%s", name, b)
			}
		})
	}
	etcd := fmt.Sprintf("http://127.0.0.1:%d", etcdClientPort)
	start("vhive-etcd", "-data-dir", filepath.Join(dir, "etcd"), "-listen-client", etcd,
		"-listen-peer", fmt.Sprintf("http://127.0.0.1:%d", etcdPeerPort))
	start("kube-apiserver", "--etcd-servers", etcd, "--bind-address", "127.0.0.1",
		"--secure-port", fmt.Sprint(apiserverPort), "--advertise-address", "127.0.0.1",
		"--endpoint-reconciler-type", "none", "--service-cluster-ip-range", serviceCIDR,
		"--service-account-issuer", "https://kubernetes.default.svc", "--service-account-key-file", saPub,
		"--service-account-signing-key-file", saKey, "--token-auth-file", tokens,
		"--authorization-mode", "AlwaysAllow", "--cert-dir", filepath.Join(dir, "pki"),
		"--disable-admission-plugins", "ServiceAccount")
	cfg := &rest.Config{
		Host:            fmt.Sprintf("https://127.0.0.1:%d", apiserverPort),
		BearerToken:     token,
		TLSClientConfig: rest.TLSClientConfig{Insecure: true},
	}
	cs, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	for {
		b, err := cs.Discovery().RESTClient().Get().AbsPath("/readyz").DoRaw(ctx)
		if err == nil && string(b) == "ok" {
			break
		}
		select {
		case <-ctx.Done():
			t.Fatalf("kube-apiserver not ready: %v (%s)", err, b)
		case <-time.After(250 * time.Millisecond):
		}
	}
	// The default namespace appears shortly after readiness.
	for {
		if _, err := cs.CoreV1().Namespaces().Get(ctx, "default", metav1.GetOptions{}); err == nil {
			return cs
		}
		select {
		case <-ctx.Done():
			t.Fatal("namespace default never appeared")
		case <-time.After(250 * time.Millisecond):
		}
	}
}

func missing(t *testing.T, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}
