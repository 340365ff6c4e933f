package memory

import (
	"context"
	"fmt"
	"log/slog"
)

// ServeOne runs a page server for a single restore — for a hidden CLI
// command that a real Firecracker (mem_backend {"backend_type": "Uffd",
// "backend_path": cfg.SocketPath}) can use unchanged. It returns when the
// peer has exited or ctx is done (then a peer still running is killed),
// with what the restore measured. In record mode the working set is written
// before it returns.
func ServeOne(ctx context.Context, cfg RestoreConfig, log *slog.Logger) (Stats, error) {
	m, err := NewManager(Config{Logger: log})
	if err != nil {
		return Stats{}, err
	}
	defer m.Close()
	r, err := m.Start(ctx, cfg)
	if err != nil {
		return Stats{}, err
	}
	select {
	case <-r.Done():
	case <-ctx.Done():
	}
	cerr := r.Close()
	if err := r.ReadyErr(); err != nil && ctx.Err() == nil {
		return r.Stats(), err
	}
	if err := r.Err(); err != nil {
		return r.Stats(), fmt.Errorf("serve restore %q: %w", cfg.ID, err)
	}
	return r.Stats(), cerr
}
