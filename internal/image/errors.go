package image

import (
	"errors"
	"fmt"
	"strconv"
	"strings"
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
	// as used (by a deployed function or a CRI container). Returned as
	// *InUseError, which names the users.
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

// Users is what uses an image (Options.InUse reports it).
type Users struct {
	// Functions are deployed functions (removed with `vhive rm`).
	Functions []string
	// CRI are containers of the CRI server (kubelet's pods).
	CRI []string
}

// Empty reports that nothing uses the image.
func (u Users) Empty() bool { return len(u.Functions) == 0 && len(u.CRI) == 0 }

// InUseError is Remove's refusal to delete an image something uses.
type InUseError struct {
	Ref    string // the reference Remove was given; "" when given a digest
	Digest string // manifest digest
	Users  Users
}

func (e *InUseError) Error() string {
	var b strings.Builder
	if e.Ref != "" {
		fmt.Fprintf(&b, "image %q (%s)", e.Ref, e.Digest)
	} else {
		fmt.Fprintf(&b, "image %s", e.Digest)
	}
	var by, fix []string
	if n := len(e.Users.Functions); n > 0 {
		by = append(by, plural(n, "function ", "functions ")+quoteList(e.Users.Functions))
		fix = append(fix, "vhive rm")
	}
	if n := len(e.Users.CRI); n > 0 {
		by = append(by, plural(n, "CRI container ", "CRI containers ")+quoteList(e.Users.CRI))
		fix = append(fix, "delete their pods")
	}
	it := plural(len(e.Users.Functions)+len(e.Users.CRI), "it", "them")
	fmt.Fprintf(&b, " is used by %s: remove %s first (%s)", strings.Join(by, " and "), it, strings.Join(fix, "; "))
	return b.String()
}

// Unwrap makes errors.Is(err, ErrInUse) true.
func (e *InUseError) Unwrap() error { return ErrInUse }

func plural(n int, one, many string) string {
	if n == 1 {
		return one
	}
	return many
}

// quoteList is "a", "b".
func quoteList(names []string) string {
	q := make([]string, len(names))
	for i, n := range names {
		q[i] = strconv.Quote(n)
	}
	return strings.Join(q, ", ")
}
