package microvm

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"log/slog"
	"math/rand/v2"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/testutil"
)

// helloworldLayout is the helloworld image the benchmarks use, built once
// per test binary under helloworldDir (removed by runMain). nodetest's
// shared builder cannot be used here: nodetest imports this package for its
// leak checks.
var (
	helloworldOnce   sync.Once
	helloworldDir    string
	helloworldResult string
	helloworldErr    error
)

func helloworldImage(t testing.TB) string {
	t.Helper()
	helloworldOnce.Do(func() {
		imgs, err := build.BuildFunction(context.Background(), build.Options{Function: "helloworld",
			Targets: []build.Target{build.TargetLinux}, Formats: []build.Format{build.FormatLayout}, OutDir: helloworldDir})
		if err != nil {
			helloworldErr = err
			return
		}
		helloworldResult = imgs[0].Layout
	})
	if helloworldErr != nil {
		t.Fatalf("build the helloworld image: %v", helloworldErr)
	}
	return helloworldResult
}

// Built once by TestMain: the testfn image rootfs (and its digest) and the
// guest assets (QEMU, kernel, initramfs with this tree's agent).
var (
	testRootfs string
	testDigest string
	testAssets *assets.Manifest
	assetsErr  error
)

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "microvm-test-rootfs-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	helloworldDir = filepath.Join(dir, "helloworld")
	if err := buildRootfs(dir); err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testRootfs = dir
	sum, err := treeDigest(dir)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	testDigest = sum
	if os.Geteuid() == 0 {
		// QEMU is installed with apt and the kernel downloaded when missing;
		// tests that need them fail with this error if that is impossible.
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
		testAssets, assetsErr = assets.Ensure(ctx, assets.Options{Dir: assets.Dir(testutil.CacheDir()), Logger: slog.New(slog.NewTextHandler(io.Discard, nil))})
		cancel()
	}
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
	if err := os.WriteFile(filepath.Join(dir, "etc/group"), []byte("root:x:0:\nfn:x:1000:\nfngroup:x:2000:fn\n"), 0o644); err != nil {
		return err
	}
	cmd := exec.Command("go", "build", "-trimpath", "-o", filepath.Join(dir, "bin/testfn"), "vhive.dev/vhive/internal/sandbox/sandboxtest/testfn")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("build testfn: %v: %s", err, out)
	}
	return nil
}

// treeDigest stands in for an image digest: the hash of the tree's files.
func treeDigest(dir string) (string, error) {
	h := sha256.New()
	err := filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		fmt.Fprintf(h, "%s\x00%v\x00", rel, d.Type())
		if d.Type().IsRegular() {
			b, err := os.ReadFile(p)
			if err != nil {
				return err
			}
			h.Write(b)
		}
		return nil
	})
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), err
}

type env struct {
	b      *Backend
	pool   *netpool.Pool
	prefix string
	root   string
}

// newEnv makes a pool (unique prefix and subnet) and a backend; everything
// is removed when the test ends, even on failure.
func newEnv(t testing.TB, mut ...func(*Config)) *env {
	t.Helper()
	testutil.RequiresRoot(t)
	if assetsErr != nil {
		t.Fatalf("microVM assets (QEMU, kernel, initramfs) cannot be built: %v", assetsErr)
	}
	ctx := context.Background()
	r := rand.IntN(9000) + 1000
	prefix := fmt.Sprintf("vm%d", r)
	pool, err := netpool.New(ctx, netpool.Options{
		Size:   2,
		Prefix: prefix,
		Subnet: netip.MustParsePrefix(fmt.Sprintf("172.%d.%d.0/24", 26+r%4, r%250)),
	})
	if err != nil {
		t.Fatal(err)
	}
	root, err := os.MkdirTemp("", "mvm-")
	if err != nil {
		t.Fatal(err)
	}
	cfg := Config{Root: root, Assets: testAssets, NetPool: pool, RootfsDir: filepath.Join(root, "rootfs")}
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

func (e *env) spec(id string) sandbox.Spec {
	return sandbox.Spec{
		ID:          id,
		Function:    "testfn",
		ImageDigest: testDigest,
		Rootfs:      testRootfs,
		Process:     sandbox.Process{Args: []string{"/bin/testfn"}},
		Port:        8080,
	}
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
	t0 := time.Now()
	if err := sb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Logf("%s: boot to listening %s", spec.ID, time.Since(t0).Round(time.Millisecond))
	return sb
}

// get fetches http://endpoint/path once.
func get(t testing.TB, endpoint, path string) string {
	t.Helper()
	c := &http.Client{Timeout: 20 * time.Second}
	resp, err := c.Get("http://" + endpoint + path)
	if err != nil {
		t.Fatalf("GET %s%s: %v", endpoint, path, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s%s: status %s, body %q, %v", endpoint, path, resp.Status, b, err)
	}
	return strings.TrimSpace(string(b))
}
