package wasm

import (
	"context"
	"fmt"
	"io"

	"vhive.dev/vhive/internal/memory"
)

// registerUffd makes mem a lazily served view of the snapshot's memory file:
// it registers mem with a new userfaultfd and hands it to the memory manager
// listening at socket (Firecracker's handshake), returning once the manager
// says memory is ready (in prefetch mode: the working set is installed).
// Faults are then served by the manager, a different process, as the
// protocol requires. If the manager goes away, it kills this process.
func registerUffd(ctx context.Context, mem []byte, socket string) (io.Closer, error) {
	if socket == "" {
		return nil, fmt.Errorf("restore mode %q needs the memory manager's socket", RestoreUffd)
	}
	c, err := memory.Attach(ctx, socket, mem, 0)
	if err != nil {
		return nil, err
	}
	return c, nil
}
