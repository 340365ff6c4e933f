package oci

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"time"
)

// versionCache remembers the runtime's version for one state of its binary.
type versionCache struct {
	size    int64
	modTime time.Time
	version string
}

// RuntimeVersion returns the first line of `<binary> --version` ("runsc
// version v0.0.0-2026…", "runc version 1.1.5+ds1"). A gVisor checkpoint
// restores only with the runsc version that wrote it, so snapshot keys
// should include this. The value is cached while the binary's size and
// modification time stay the same, and recomputed when it is replaced.
func (b *Backend) RuntimeVersion(ctx context.Context) (string, error) {
	fi, err := os.Stat(b.cfg.Binary)
	if err != nil {
		return "", fmt.Errorf("oci: runtime binary %q: %w", b.cfg.Binary, err)
	}
	b.verMu.Lock()
	defer b.verMu.Unlock()
	if c := b.ver; c.version != "" && c.size == fi.Size() && c.modTime.Equal(fi.ModTime()) {
		return c.version, nil
	}
	out, err := exec.CommandContext(ctx, b.cfg.Binary, "--version").Output()
	if err != nil {
		return "", fmt.Errorf("oci: %s --version: %w", b.cfg.Binary, err)
	}
	line, _, _ := bytes.Cut(out, []byte("\n"))
	v := strings.TrimSpace(string(line))
	if v == "" {
		return "", fmt.Errorf("oci: %s --version printed nothing", b.cfg.Binary)
	}
	b.ver = versionCache{size: fi.Size(), modTime: fi.ModTime(), version: v}
	return v, nil
}
