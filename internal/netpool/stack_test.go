package netpool

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/testutil"
)

// ownMounts lists the mounts of the mount table, hidden ones included, at
// NetnsDir/<prefix>-<n>.
func ownMounts(t *testing.T, prefix string) []string {
	t.Helper()
	all, err := mountinfo.All()
	if err != nil {
		t.Fatal(err)
	}
	dir := realNetnsDir()
	var out []string
	for _, m := range all {
		if filepath.Dir(m.Point) == dir && OwnName(prefix, filepath.Base(m.Point)) {
			out = append(out, m.Point+" ("+m.FSType+")")
		}
	}
	return out
}

// assertGone checks that nothing named <prefix>-<n> is left in NetnsDir,
// neither a file nor a mount at any depth.
func assertGone(t *testing.T, prefix string) {
	t.Helper()
	if m := ownMounts(t, prefix); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	ents, _ := os.ReadDir(NetnsDir)
	for _, e := range ents {
		if OwnName(prefix, e.Name()) {
			t.Errorf("file left: %s", filepath.Join(NetnsDir, e.Name()))
		}
	}
}

// ipNetnsAdd runs iproute2's `ip netns add`, which makes NetnsDir a mount
// point of its own (a recursive self-bind) if it is not one yet.
func ipNetnsAdd(t *testing.T, name string) {
	t.Helper()
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add %s: %v %s", name, err, out)
	}
}

// TestIPNetnsAddAfterPoolLeavesNothing: `ip netns add` run while a pool's
// namespaces exist (another test package, a cluster) must not make them
// undeletable. Before the pool made NetnsDir a mount point of its own,
// iproute2's recursive self-bind copied the pool's mounts over the
// originals, Close removed the copies only and failed with EBUSY, and
// plain files with the namespaces hidden below stayed behind — what
// TestGoTwinsAcrossRestores' daemon left in CI.
func TestIPNetnsAddAfterPoolLeavesNothing(t *testing.T) {
	if !testutil.InPrivateRun(t) {
		return
	}
	ctx := context.Background()
	opts := testOptions(2)
	opts.NoHostFilter = true
	p, err := New(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	ipNetnsAdd(t, "other-0")
	defer exec.Command("ip", "netns", "del", "other-0").Run()
	if err := p.Close(ctx); err != nil {
		t.Errorf("Close: %v", err)
	}
	assertGone(t, opts.Prefix)
	assertNoLeftovers(t, opts.Prefix)
}

// TestCleanupRemovesStackedAndHiddenNamespaces: what an earlier daemon left
// in a plain NetnsDir that `ip netns add` then covered with its self-bind —
// a namespace copied over its hidden original, one bound twice, and one
// whose visible copy was unmounted already so that only a plain file shows
// ("ip netns exec" fails with "Invalid argument") — is all removed by
// Cleanup, at every depth.
func TestCleanupRemovesStackedAndHiddenNamespaces(t *testing.T) {
	if !testutil.InPrivateRun(t) {
		return
	}
	prefix := testOptions(0).Prefix
	if err := os.MkdirAll(NetnsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	add := func(name string) string {
		t.Helper()
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		orig, err := netns.Get()
		if err != nil {
			t.Fatal(err)
		}
		defer orig.Close()
		ns, err := netns.NewNamed(name)
		if err != nil {
			t.Fatal(err)
		}
		ns.Close()
		if err := netns.Set(orig); err != nil {
			t.Fatal(err)
		}
		return filepath.Join(NetnsDir, name)
	}
	add(prefix + "-0")
	twice := add(prefix + "-1")
	if err := unix.Mount(twice, twice, "", unix.MS_BIND, ""); err != nil {
		t.Fatal(err)
	}
	plain := add(prefix + "-2")
	ipNetnsAdd(t, "other-0")
	defer exec.Command("ip", "netns", "del", "other-0").Run()
	if err := unix.Unmount(plain, unix.MNT_DETACH); err != nil {
		t.Fatal(err)
	}
	if err := exec.Command("ip", "netns", "exec", prefix+"-2", "true").Run(); err == nil {
		t.Fatalf("%s can be entered: the hidden state was not made", plain)
	}
	t.Logf("made: %v", ownMounts(t, prefix))

	if err := Cleanup(context.Background(), prefix); err != nil {
		t.Errorf("Cleanup: %v", err)
	}
	assertGone(t, prefix)
	assertNoLeftovers(t, prefix)
}
