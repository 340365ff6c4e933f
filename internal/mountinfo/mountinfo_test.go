package mountinfo

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
)

func TestUnescape(t *testing.T) {
	for in, want := range map[string]string{`/a\040b`: "/a b", `/plain`: "/plain", `/x\134y`: `/x\y`, `/bad\09`: `/bad\09`, `/end\04`: `/end\04`, `/t\011`: "/t\t"} {
		if got := Unescape(in); got != want {
			t.Errorf("Unescape(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestUnder: tmpfs mounts at and below a directory whose name has a space
// are listed, parent first, by their real paths; a sibling whose name
// extends the directory's is not.
func TestUnder(t *testing.T) {
	testutil.RequiresRoot(t)
	base := t.TempDir()
	dir := filepath.Join(base, "a b")
	inner := filepath.Join(dir, "in")
	sibling := filepath.Join(base, "a bc")
	for _, d := range []string{dir, sibling} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	mount := func(p string) {
		t.Helper()
		if err := unix.Mount("tmpfs", p, "tmpfs", 0, "size=1m"); err != nil {
			t.Fatalf("mount tmpfs on %s: %v", p, err)
		}
		t.Cleanup(func() { _ = unix.Unmount(p, unix.MNT_DETACH) })
	}
	mount(dir)
	if err := os.Mkdir(inner, 0o755); err != nil {
		t.Fatal(err)
	}
	mount(inner)
	mount(sibling)
	got, err := Under(dir + "/")
	if err != nil {
		t.Fatal(err)
	}
	if want := []string{dir, inner}; !slices.Equal(got, want) {
		t.Errorf("Under(%q) = %q, want %q", dir, got, want)
	}
	if got, _ := Under(filepath.Join(base, "none")); len(got) != 0 {
		t.Errorf("Under a directory with no mounts: %q", got)
	}
}
