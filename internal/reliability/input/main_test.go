// Package input holds the hostile-input tests of the reliability suite
// (docs/reliability.md §3): the control API of a running daemon fuzzed end to
// end, and hand-made bad requests of every RPC.
package input

import (
	"os"
	"testing"

	"vhive.dev/vhive/internal/nodetest"
)

var shared nodetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	stopShared()
	shared.Cleanup()
	os.Exit(code)
}
