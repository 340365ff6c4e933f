package microvm

import (
	"slices"
	"testing"
)

// TestTCGBufferArg: Config.TCGBufferMiB reaches QEMU's command line as
// -accel tcg,tb-size=N, is left out at 0 (QEMU's default) and under KVM.
func TestTCGBufferArg(t *testing.T) {
	for _, c := range []struct {
		accel string
		mib   int
		want  string
	}{
		{AccelTCG, 0, "tcg"},
		{AccelTCG, 64, "tcg,tb-size=64"},
		{AccelKVM, 64, "kvm"},
	} {
		s := &Sandbox{b: &Backend{cfg: Config{Accel: c.accel, TCGBufferMiB: c.mib, CPUs: 1}}, id: "x", dir: "/d", disk: "/disk", memMiB: 256}
		args := s.qemuArgs("mem-path=/m,share=on", "/k", "/i", false)
		i := slices.Index(args, "-accel")
		if i < 0 || i+1 >= len(args) || args[i+1] != c.want {
			t.Errorf("accel %s, TCGBufferMiB %d: args %q, want -accel %s", c.accel, c.mib, args, c.want)
		}
	}
}
