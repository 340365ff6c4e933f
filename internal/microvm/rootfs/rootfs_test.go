package rootfs

import (
	"context"
	"crypto/sha256"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

func fileSum(t *testing.T, p string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// TestDeterministic builds the image of one tree twice (the second time
// with newer directory times on the host side, which must not matter for
// build time) and checks both are identical and hold the files.
func TestDeterministic(t *testing.T) {
	if _, err := exec.LookPath("mkfs.ext4"); err != nil {
		t.Skipf("mkfs.ext4 not installed: %v", err)
	}
	src := t.TempDir()
	if err := os.MkdirAll(filepath.Join(src, "bin"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "bin/hello"), []byte("hello from the image\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	ctx := context.Background()
	const digest = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef"
	a, b := filepath.Join(out, "a.ext4"), filepath.Join(out, "b.ext4")
	if err := Build(ctx, src, a, digest); err != nil {
		t.Fatal(err)
	}
	time.Sleep(1100 * time.Millisecond) // a build-time leak would show as a difference
	if err := Build(ctx, src, b, digest); err != nil {
		t.Fatal(err)
	}
	if fileSum(t, a) != fileSum(t, b) {
		t.Fatal("two builds of the same tree differ")
	}
	got, err := exec.Command("debugfs", "-R", "cat /bin/hello", a).Output()
	if err != nil {
		t.Fatalf("debugfs: %v", err)
	}
	if !strings.Contains(string(got), "hello from the image") {
		t.Fatalf("/bin/hello in the image = %q", got)
	}
	c, err := New(filepath.Join(out, "cache"))
	if err != nil {
		t.Fatal(err)
	}
	p, err := c.Get(ctx, digest, src)
	if err != nil {
		t.Fatal(err)
	}
	if fileSum(t, p) != fileSum(t, a) {
		t.Error("the cache's image differs from a direct build")
	}
	if _, err := c.Get(ctx, "latest", src); err == nil || !strings.Contains(err.Error(), "latest") {
		t.Errorf("Get with a bad digest: %v", err)
	}
}
