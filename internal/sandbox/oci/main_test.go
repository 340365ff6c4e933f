package oci

import (
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/testutil"
)

// testRootfs is the image rootfs every test uses: the testfn server plus an
// /etc/passwd, built once by TestMain.
var testRootfs string

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	if os.Getenv(crashHelperEnv) != "" {
		return crashHelper()
	}
	dir, err := os.MkdirTemp("", "oci-test-rootfs-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	if err := buildRootfs(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testRootfs = dir
	return m.Run()
}

func buildRootfs(dir string) error {
	for _, d := range []string{"bin", "etc", "tmp", "home/fn"} {
		if err := os.MkdirAll(filepath.Join(dir, d), 0o755); err != nil {
			return err
		}
	}
	if err := os.Chmod(filepath.Join(dir, "tmp"), 0o1777); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte("root:x:0:0:root:/root:/bin/sh\nfn:x:1000:1000:fn:/home/fn:/bin/sh\n"), 0o644); err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(dir, "etc/group"), []byte("root:x:0:\nfn:x:1000:\nfngroup:x:2000:\n"), 0o644); err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-o", filepath.Join(dir, "bin/testfn"), "vhive.dev/vhive/internal/sandbox/sandboxtest/testfn")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build testfn: %v: %s", err, out)
	}
	return nil
}

type env struct {
	b      *Backend
	pool   *netpool.Pool
	prefix string
	root   string
}

// newEnv makes a pool (unique prefix and subnet) and a backend; everything
// is removed when the test ends, even on failure.
func newEnv(t testing.TB, runtime string, mut ...func(*Config)) *env {
	t.Helper()
	testutil.RequiresRoot(t)
	bin := testutil.RuncPath(t)
	if runtime == RuntimeGVisor {
		bin = testutil.RunscPath(t)
	}
	ctx := context.Background()
	r := rand.IntN(9000) + 1000
	prefix := fmt.Sprintf("vo%d", r)
	pool, err := netpool.New(ctx, netpool.Options{
		Size:   2,
		Prefix: prefix,
		// Away from the daemon's default 10.168.0.0/16 and other tests.
		Subnet: netip.MustParsePrefix(fmt.Sprintf("172.%d.%d.0/24", 18+r%8, r%250)),
	})
	if err != nil {
		t.Fatal(err)
	}
	root, err := os.MkdirTemp("", "oci-test-root-")
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Runtime: runtime, Binary: bin, Root: root, NetPool: pool}
	for _, f := range mut {
		f(&cfg)
	}
	b, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	e := &env{b: b, pool: pool, prefix: prefix, root: root}
	t.Cleanup(func() {
		ctx := context.Background()
		if err := b.Cleanup(ctx); err != nil {
			t.Errorf("backend cleanup: %v", err)
		}
		if err := pool.Close(ctx); err != nil {
			t.Errorf("pool close: %v", err)
		}
		_ = netpool.Cleanup(ctx, prefix)
		_ = os.RemoveAll(root)
	})
	return e
}

// start creates and starts a sandbox of spec, stopped when t ends.
func (e *env) start(t testing.TB, spec sandbox.Spec) sandbox.Sandbox {
	t.Helper()
	ctx := context.Background()
	sb, err := e.b.Create(ctx, spec)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sb.Stop(context.Background()) })
	if err := sb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	return sb
}

func (e *env) spec(id string) sandbox.Spec {
	return sandbox.Spec{
		ID:       id,
		Function: "testfn",
		Rootfs:   testRootfs,
		Process:  sandbox.Process{Args: []string{"/bin/testfn"}},
		Port:     8080,
	}
}

// get fetches http://endpoint/path, retrying while the server comes up.
func get(t testing.TB, endpoint, path string) string {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	c := &http.Client{Timeout: 3 * time.Second}
	for {
		resp, err := c.Get("http://" + endpoint + path)
		if err == nil {
			b, rerr := io.ReadAll(resp.Body)
			resp.Body.Close()
			if rerr == nil && resp.StatusCode == http.StatusOK {
				return strings.TrimSpace(string(b))
			}
			err = fmt.Errorf("status %s, body %q, %v", resp.Status, b, rerr)
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s%s: %v", endpoint, path, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// assertClean checks that nothing of instance id is left: bundle, mounts,
// cgroups, and that every net is back in the pool (no extra netns/veth).
func (e *env) assertClean(t testing.TB, id string) {
	t.Helper()
	if _, err := os.Stat(filepath.Join(e.root, "bundles", id)); !os.IsNotExist(err) {
		t.Errorf("bundle of %q still exists (%v)", id, err)
	}
	// runsc keeps a "null-netns" mount in its state directory; only the
	// bundles are ours.
	bundle := filepath.Join(e.root, "bundles", id)
	if ms, err := mountinfo.Under(bundle); err != nil || len(ms) > 0 {
		t.Errorf("mounts left under %s: %v %v", bundle, ms, err)
	}
	if cg := e.b.CgroupDirs(id); len(cg) > 0 {
		t.Errorf("cgroups of %q left: %v", id, cg)
	}
	list, err := e.b.rt.List(context.Background())
	if err != nil {
		t.Errorf("list containers: %v", err)
	}
	for _, c := range list {
		if c.ID == id {
			t.Errorf("container %q still known to the runtime (%s)", id, c.Status)
		}
	}
}
