// Package testutil holds helpers shared by the integration tests: finding the
// real tools (runsc, runc) and saying clearly why a test cannot run.
//
// In CI (CI=true) a missing prerequisite fails the test instead of skipping
// it: every tool is installed by `make test`, so a skip there would hide a
// broken setup.
package testutil

import (
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// CacheDir is where `make` puts tools built from Go modules.
func CacheDir() string {
	if d := os.Getenv("VHIVE_CACHE"); d != "" {
		return d
	}
	return "/var/cache/vhive"
}

func missing(t testing.TB, format string, args ...any) {
	t.Helper()
	if os.Getenv("CI") != "" {
		t.Fatalf(format, args...)
	}
	t.Skipf(format, args...)
}

// RequiresRoot skips (fails in CI) when the test does not run as root.
func RequiresRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		missing(t, "test needs root (uid %d): it creates network namespaces, mounts and containers", os.Geteuid())
	}
}

// RunscPath returns the runsc binary built by `make runsc` ($VHIVE_RUNSC,
// then $VHIVE_CACHE/bin/runsc). Debian's runsc is too old and never used.
func RunscPath(t testing.TB) string {
	t.Helper()
	p := os.Getenv("VHIVE_RUNSC")
	if p == "" {
		p = filepath.Join(CacheDir(), "bin", "runsc")
	}
	if _, err := os.Stat(p); err != nil {
		missing(t, "runsc not found at %s (run `make runsc` or set VHIVE_RUNSC): %v", p, err)
	}
	return p
}

// RuncPath returns runc from $VHIVE_RUNC or PATH (Debian's package).
func RuncPath(t testing.TB) string {
	t.Helper()
	if p := os.Getenv("VHIVE_RUNC"); p != "" {
		return p
	}
	p, err := exec.LookPath("runc")
	if err != nil {
		missing(t, "runc not found in PATH (apt-get install runc): %v", err)
	}
	return p
}
