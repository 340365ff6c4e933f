package nodetest

import (
	"os/exec"
	"testing"

	"vhive.dev/vhive/internal/testutil"
)

// TestNetnsCookieTellsRecreatedNamespaces: a namespace deleted and created
// again under its name has another cookie (inode numbers are reused). It
// runs in a private mount namespace: `ip netns add` on the host binds a
// plain /run/netns onto itself recursively and so hides the namespaces
// other processes bound there (see internal/netpool/netns.go).
func TestNetnsCookieTellsRecreatedNamespaces(t *testing.T) {
	if !testutil.InPrivateRun(t) {
		return
	}
	const name = "h13n-0"
	add := func() uint64 {
		t.Helper()
		if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
			t.Fatalf("ip netns add: %v %s", err, out)
		}
		c, err := netnsCookie("/var/run/netns/" + name)
		if err != nil || c == 0 {
			t.Fatalf("cookie: %d, %v", c, err)
		}
		return c
	}
	del := func() { _ = exec.Command("ip", "netns", "del", name).Run() }
	t.Cleanup(del)
	a := add()
	if b, err := netnsCookie("/var/run/netns/" + name); err != nil || b != a {
		t.Fatalf("cookie read twice: %d then %d (%v)", a, b, err)
	}
	del()
	if b := add(); b == a {
		t.Fatalf("recreated namespace has the same cookie %d", a)
	}
}
