package bench

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// Control is the part of the daemon's control API the bench drives.
// vhivepb.ControlClient satisfies it.
type Control interface {
	Deploy(ctx context.Context, in *vhivepb.DeployRequest, opts ...grpc.CallOption) (*vhivepb.DeployResponse, error)
	Invoke(ctx context.Context, in *vhivepb.InvokeRequest, opts ...grpc.CallOption) (*vhivepb.InvokeResponse, error)
	RemoveFunction(ctx context.Context, in *vhivepb.RemoveFunctionRequest, opts ...grpc.CallOption) (*vhivepb.RemoveFunctionResponse, error)
	StopInstances(ctx context.Context, in *vhivepb.StopInstancesRequest, opts ...grpc.CallOption) (*vhivepb.StopInstancesResponse, error)
	ListInstances(ctx context.Context, in *vhivepb.ListInstancesRequest, opts ...grpc.CallOption) (*vhivepb.ListInstancesResponse, error)
	ListSnapshots(ctx context.Context, in *vhivepb.ListSnapshotsRequest, opts ...grpc.CallOption) (*vhivepb.ListSnapshotsResponse, error)
	ListImages(ctx context.Context, in *vhivepb.ListImagesRequest, opts ...grpc.CallOption) (*vhivepb.ListImagesResponse, error)
	ImportImage(ctx context.Context, in *vhivepb.ImportImageRequest, opts ...grpc.CallOption) (*vhivepb.ImageInfo, error)
}

var _ Control = vhivepb.ControlClient(nil)

// Start modes accepted by --modes. "warm" is not a daemon start mode: it
// invokes an instance that is already running.
const (
	ModeBoot     = "boot"
	ModeSnapshot = "snapshot"
	ModeLazy     = "lazy"
	ModeREAP     = "reap"
	ModeWarm     = "warm"
)

// Start modes the daemon reports in InvokeResponse.start_mode.
const (
	StartedBoot         = "boot"
	StartedSnapshot     = "snapshot"
	StartedLazy         = "lazy"
	StartedREAPRecord   = "reap-record"
	StartedREAPPrefetch = "reap-prefetch"
)

// knownSandboxes are the sandboxes the daemon knows.
func knownSandboxes() []string { return []string{"gvisor", "runc", "wasm", "microvm"} }

func knownModes() []string { return []string{ModeBoot, ModeSnapshot, ModeLazy, ModeREAP, ModeWarm} }

// Payloads follow vHive's functions: "record" selects input set 1 (used to
// boot, snapshot and record), "replay" input set 2 (measured runs).
const (
	payloadRecord = "record"
	payloadReplay = "replay"
)

// ImageRef is the image a function is packaged as: localhost/vhive/<fn>:latest
// for Linux sandboxes, localhost/vhive/<fn>-wasm:latest for wasm.
func ImageRef(function, sandbox string) string {
	if sandbox == "wasm" {
		return "localhost/vhive/" + function + "-wasm:latest"
	}
	return "localhost/vhive/" + function + ":latest"
}

// imageName is the file or directory name of an image under --images.
func imageName(function, sandbox string) string {
	if sandbox == "wasm" {
		return function + "-wasm"
	}
	return function
}

// IsUnsupported reports whether a daemon error means the sandbox backend
// does not support what was asked (gRPC InvalidArgument or Unimplemented).
func IsUnsupported(err error) bool {
	switch status.Code(err) {
	case codes.InvalidArgument, codes.Unimplemented:
		return true
	}
	return false
}

// EnsureImage makes sure the daemon has ref, importing it from imagesDir
// when it does not: <dir>/<name> (OCI layout), <dir>/<name>.tar or
// <dir>/<name>.oci.tar, where name is the last path element of ref without
// its tag.
func EnsureImage(ctx context.Context, c Control, ref, name, imagesDir string) error {
	list, err := c.ListImages(ctx, &vhivepb.ListImagesRequest{})
	if err != nil {
		return fmt.Errorf("list images: %w", err)
	}
	for _, im := range list.GetImages() {
		if im.GetRef() == ref {
			return nil
		}
	}
	if imagesDir == "" {
		return fmt.Errorf("image %q is not on the daemon and no --images directory was given", ref)
	}
	var tried []string
	for _, cand := range []string{name, name + ".tar", name + ".oci.tar"} {
		p := filepath.Join(imagesDir, cand)
		tried = append(tried, p)
		if _, err := os.Stat(p); err != nil {
			continue
		}
		abs, err := filepath.Abs(p)
		if err != nil {
			return fmt.Errorf("image path %q: %w", p, err)
		}
		if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: abs, Ref: ref}); err != nil {
			return fmt.Errorf("import image %q from %q: %w", ref, abs, err)
		}
		return nil
	}
	return fmt.Errorf("image %q is not on the daemon and none of %v exists (build the function images first)", ref, tried)
}

// pollInterval is how often the bench polls the daemon while waiting.
const pollInterval = 50 * time.Millisecond

// errTimeout marks a wait that ran out of time.
var errTimeout = errors.New("timed out")

// waitFor polls cond until it returns true, an error, or timeout passes.
func waitFor(parent context.Context, timeout time.Duration, cond func(context.Context) (bool, error)) error {
	ctx, cancel := context.WithTimeout(parent, timeout)
	defer cancel()
	t := time.NewTicker(pollInterval)
	defer t.Stop()
	for {
		ok, err := cond(ctx)
		if parent.Err() != nil {
			return parent.Err()
		}
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("%w after %v: %w", errTimeout, timeout, err)
			}
			return err
		}
		if ok {
			return nil
		}
		select {
		case <-ctx.Done():
			if parent.Err() != nil {
				return parent.Err()
			}
			return fmt.Errorf("%w after %v", errTimeout, timeout)
		case <-t.C:
		}
	}
}
