package image

import (
	"errors"
	"fmt"
)

// Error classes. Every error returned by this package wraps at most one of
// them (test with errors.Is); the daemon maps them to gRPC codes:
// ErrNotFound → NotFound, ErrInvalid and ErrUnsafeLayer → InvalidArgument,
// ErrInUse → FailedPrecondition, ErrUnavailable → Unavailable.
var (
	// ErrNotFound: no such image in the store, or the registry has no such
	// repository, tag or manifest.
	ErrNotFound = errors.New("image not found")
	// ErrInvalid: a malformed reference, archive, manifest or config, a blob
	// whose content does not match its digest, a broken layer (a file where
	// a directory is needed, a hard link to nothing, a symlink loop), or an
	// image vhive cannot run (no matching platform, several wasm layers, a
	// wasi image without a module).
	ErrInvalid = errors.New("invalid image")
	// ErrUnsafeLayer: a layer entry that would escape the rootfs, a device
	// node, or an oversized entry or layer. Returned as *UnsafeLayerError.
	ErrUnsafeLayer = errors.New("unsafe image layer")
	// ErrInUse: Remove was asked to delete an image the InUse hook reports
	// as used by a sandbox.
	ErrInUse = errors.New("image in use")
	// ErrUnavailable: the registry could not be reached or failed.
	ErrUnavailable = errors.New("registry unavailable")
)

// UnsafeLayerError names the layer and the entry that was rejected.
type UnsafeLayerError struct {
	Layer  string // layer digest (compressed, as in the manifest)
	Path   string // entry name as written in the tar header
	Reason string // what is wrong with it
	Err    error  // underlying error, if any
}

func (e *UnsafeLayerError) Error() string {
	msg := fmt.Sprintf("layer %s: entry %q: %s", e.Layer, e.Path, e.Reason)
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

// Unwrap makes errors.Is(err, ErrUnsafeLayer) true and exposes the cause.
func (e *UnsafeLayerError) Unwrap() []error {
	if e.Err != nil {
		return []error{ErrUnsafeLayer, e.Err}
	}
	return []error{ErrUnsafeLayer}
}
