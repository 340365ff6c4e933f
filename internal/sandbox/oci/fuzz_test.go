package oci

import (
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// FuzzResolveUser feeds arbitrary /etc/passwd, /etc/group and user strings:
// resolveUser must not panic, and an error must name what was looked up.
func FuzzResolveUser(f *testing.F) {
	f.Add("root:x:0:0::/root:/bin/sh\nfn:x:1000:1000::/:/bin/sh\n", "fn:x:1000:\ng2:x:2000:\n", "fn:g2")
	f.Add("a:b\n::::\n", "x\n", "1000")
	f.Add("fn:x:notanumber:1:\n", "", "fn")
	f.Fuzz(func(t *testing.T, passwd, group, user string) {
		dir := t.TempDir()
		if err := os.Mkdir(filepath.Join(dir, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "etc/passwd"), []byte(passwd), 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, "etc/group"), []byte(group), 0o644); err != nil {
			t.Fatal(err)
		}
		_, err := resolveUser(dir, user)
		if err != nil {
			name, grp, _ := strings.Cut(user, ":")
			msg := err.Error()
			if !strings.Contains(msg, strconv.Quote(name)) && !strings.Contains(msg, strconv.Quote(grp)) {
				t.Errorf("error %q names neither %q nor %q", err, name, grp)
			}
		}
	})
}

func TestResolveUser(t *testing.T) {
	for u, want := range map[string][2]uint32{
		"": {0, 0}, "fn": {1000, 1000}, "fn:fngroup": {1000, 2000}, "1000": {1000, 1000},
		"4242": {4242, 0}, "4242:7": {4242, 7}, "fn:0": {1000, 0},
	} {
		got, err := resolveUser(testRootfs, u)
		if err != nil || got.UID != want[0] || got.GID != want[1] {
			t.Errorf("resolveUser(%q) = %d:%d, %v; want %d:%d", u, got.UID, got.GID, err, want[0], want[1])
		}
	}
	for _, u := range []string{"nobody", "fn:nogroup"} {
		if _, err := resolveUser(testRootfs, u); err == nil {
			t.Errorf("resolveUser(%q) succeeded", u)
		}
	}
}
