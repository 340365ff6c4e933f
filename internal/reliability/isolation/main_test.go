// Package isolation holds the isolation and access tests of the reliability
// suite (docs/reliability.md §4): what a function can reach from inside its
// sandbox, what happens over its memory limit, and who may use the control
// API.
package isolation

import (
	"os"
	"testing"

	"vhive.dev/vhive/internal/nodetest"
)

var shared nodetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	shared.Cleanup()
	os.Exit(code)
}
