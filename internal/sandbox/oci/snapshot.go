package oci

import (
	"context"
	"fmt"
	"os"

	runc "github.com/containerd/go-runc"

	"vhive.dev/vhive/internal/sandbox"
)

// checkpointFile is the state file `runsc checkpoint` writes into its image
// directory (next to pages_meta.img and pages.img).
const checkpointFile = "checkpoint.img"

// Snapshot checkpoints the running sandbox into dir with `runsc checkpoint
// --leave-running`: the instance keeps serving. gVisor only.
func (s *Sandbox) Snapshot(ctx context.Context, dir string) error {
	if s.b.cfg.Runtime != RuntimeGVisor {
		return fmt.Errorf("oci: snapshot of sandbox %q with runtime %q: %w", s.id, s.b.cfg.Runtime, sandbox.ErrNotSupported)
	}
	fi, err := os.Stat(dir)
	if err != nil {
		return fmt.Errorf("oci: snapshot of sandbox %q: %w", s.id, err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("oci: snapshot of sandbox %q: %q is not a directory", s.id, dir)
	}
	select {
	case <-s.done:
		return fmt.Errorf("oci: snapshot of sandbox %q: it has ended: %w", s.id, s.Err())
	default:
	}
	if err := s.b.rt.Checkpoint(ctx, s.id, &runc.CheckpointOpts{ImagePath: dir}, runc.LeaveRunning); err != nil {
		return fmt.Errorf("oci: snapshot of sandbox %q into %q: %w", s.id, dir, err)
	}
	return nil
}
