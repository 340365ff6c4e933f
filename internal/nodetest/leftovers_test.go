package nodetest

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
)

// TestSnapshotReportsWhatItCannotInspect: entries with the prefix that are
// not a single readable network namespace mount — a plain file, a file with
// two nsfs mounts stacked on it, a plain file over an nsfs mount hidden
// under /run/netns's self-bind (what TestGoTwinsAcrossRestores' daemon left
// in CI) — are leaks with their reason; a healthy namespace is not. Before,
// Snapshot skipped every entry whose cookie it could not read and so saw
// nothing wrong here.
func TestSnapshotReportsWhatItCannotInspect(t *testing.T) {
	if !testutil.InPrivateRun(t) {
		return
	}
	const prefix = "h13s"
	dir := "/var/run/netns"
	path := func(n string) string { return filepath.Join(dir, prefix+"-"+n) }
	touch := func(p string) {
		t.Helper()
		if err := os.WriteFile(p, nil, 0o444); err != nil {
			t.Fatal(err)
		}
	}
	bind := func(p string) {
		t.Helper()
		if err := unix.Mount("/proc/thread-self/ns/net", p, "", unix.MS_BIND, ""); err != nil {
			t.Fatalf("bind the test's netns to %s: %v", p, err)
		}
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	// A namespace bound in the plain directory, covered by iproute2's
	// recursive self-bind of /run/netns, then its visible copy unmounted.
	touch(path("2"))
	bind(path("2"))
	if out, err := exec.Command("ip", "netns", "add", prefix+"-3").CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v %s", err, out)
	}
	if err := unix.Unmount(path("2"), unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	touch(path("0"))
	touch(path("1"))
	bind(path("1"))
	bind(path("1"))

	r := Snapshot(t.TempDir(), prefix)
	leaks := r.LeakedFrom(Resources{}, 10)
	t.Logf("snapshot %+v, leaks %q", r, leaks)
	all := strings.Join(leaks, "\n")
	for _, n := range []string{"0", "1", "2"} {
		if !strings.Contains(all, prefix+"-"+n) {
			t.Errorf("%s is not reported as a leak", path(n))
		}
	}
	if strings.Contains(all, prefix+"-3") {
		t.Errorf("the healthy namespace %s is reported: %q", path("3"), leaks)
	}
}
