package python

import (
	"path/filepath"
	"slices"
	"testing"

	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/bench"
	"vhive.dev/vhive/internal/debimage"
)

// The bench's suite lists name exactly the function directories here, and
// the Go twins are example functions.
func TestSuiteListsMatchDirectories(t *testing.T) {
	for _, full := range []bool{false, true} {
		dirs, err := debimage.Functions(".", full)
		if err != nil {
			t.Fatal(err)
		}
		var names []string
		for _, d := range dirs {
			names = append(names, filepath.Base(d))
		}
		want := slices.Clone(bench.SuitePythonCI)
		if full {
			want = append(want, bench.SuitePythonFull...)
		}
		slices.Sort(want)
		if !slices.Equal(names, want) {
			t.Errorf("full=%v: directories %q, bench lists %q", full, names, want)
		}
	}
	for _, g := range bench.SuiteGoTwins {
		if !slices.Contains(build.Names(), g) {
			t.Errorf("Go twin %q is not an example function", g)
		}
	}
	fns, _ := bench.SuiteFunctions("ci")
	n := bench.ColdstartSteps(bench.ColdstartOptions{Functions: fns, Sandboxes: []string{"gvisor", "wasm"}, Modes: []string{"boot"}, Iterations: 1, Skip: bench.SuiteSkip})
	if want := 2 * (len(fns) + len(bench.SuiteGoTwins)); n != want {
		t.Errorf("ColdstartSteps with the wasm skip = %d, want %d", n, want)
	}
}
