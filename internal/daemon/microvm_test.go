package daemon

import (
	"errors"
	"strings"
	"testing"
)

func TestChooseAccel(t *testing.T) {
	vtx := accelFacts{vmx: true}
	pvm := accelFacts{pvm: true}
	none := accelFacts{kvmErr: errors.New("no such file or directory")}
	for _, c := range []struct {
		want  string
		f     accelFacts
		accel string
		why   string
	}{
		{"auto", vtx, "kvm", "hardware virtualisation"},
		{"", accelFacts{svm: true}, "kvm", "hardware"},
		{"auto", pvm, "tcg", "PVM"},
		{"auto", accelFacts{}, "tcg", "neither vmx nor svm"},
		{"auto", none, "tcg", "/dev/kvm"},
		{"kvm", pvm, "", "PVM"},
		{"kvm", none, "", "/dev/kvm"},
		{"kvm", vtx, "kvm", "asked"},
		{"tcg", vtx, "tcg", "asked"},
		{"hvf", vtx, "", "unknown accelerator"},
	} {
		accel, why := chooseAccel(c.want, c.f)
		if accel != c.accel || !strings.Contains(why, c.why) {
			t.Errorf("chooseAccel(%q, %+v) = %q, %q; want %q and a reason naming %q", c.want, c.f, accel, why, c.accel, c.why)
		}
	}
}
