package cri

import (
	"regexp"
	"testing"
)

// kubelet parses RuntimeVersion; anything but a version shows as
// "vhive://Unknown" in `kubectl get nodes -o wide`.
func TestRuntimeVersionIsSemver(t *testing.T) {
	semver := regexp.MustCompile(`^(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)\.(0|[1-9][0-9]*)(\+[0-9A-Za-z-]+(\.[0-9A-Za-z-]+)*)?$`)
	for in, want := range map[string]string{
		"containerd-1.6.20~ds1": "containerd-1.6.20.ds1",
		"containerd-v2.0.0":     "containerd-v2.0.0",
		"cri-o 1.30 (rc)":       "cri-o.1.30.rc",
	} {
		got := semverMeta(in)
		if got != want {
			t.Errorf("semverMeta(%q) = %q, want %q", in, got, want)
		}
		if v := RuntimeVersion + "+" + got; !semver.MatchString(v) {
			t.Errorf("%q is not semver", v)
		}
	}
}
