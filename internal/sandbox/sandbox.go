// Package sandbox defines the small interface every isolation backend
// implements (gvisor, runc, wasm, later firecracker) and the types shared
// between the orchestrator and the backends.
//
// The orchestrator drives a cold start as named stages:
//
//	boot:    Backend.Create (CreateSandbox) → Sandbox.Start (StartSandbox)
//	restore: Restorer.Restore (RestoreSandbox)
//
// then dials Sandbox.Endpoint (ConnectFuncClient). Backends record nothing
// themselves; the caller times the stages around these calls.
package sandbox

import (
	"context"
	"errors"
	"time"
)

// GuestTimeHeader is the gRPC response header in which a sandbox that can
// tell (the wasm worker) reports how many µs a SayHello spent in the
// function itself; the orchestrator reports it for a cold start's first
// call beside the stages (memory statistic GuestTimeUs), so that
// FuncInvocation can be split into the function's own run and everything
// around it.
const GuestTimeHeader = "x-vhive-guest-us"

// Capabilities declares what a backend can do. The orchestrator and the
// bench never ask a backend for something it does not declare.
type Capabilities struct {
	// Snapshot: the backend implements Snapshotter and Restorer.
	Snapshot bool
	// LazyMemory: restored guest memory can be served on demand by the
	// memory manager (modes lazy and reap).
	LazyMemory bool
	// REAP: record-and-prefetch of the working set is supported.
	REAP bool
	// EagerRestore: a restore reads the whole memory image before the
	// sandbox runs (gVisor). Reported so users are not misled.
	EagerRestore bool
}

// Process is what runs inside the sandbox, resolved from the image config
// plus deploy-time settings.
type Process struct {
	Args []string // entrypoint + cmd
	Env  []string // K=V, image env first, deploy env overriding
	Cwd  string
	User string // "uid[:gid]" or a name from the image config
}

// Spec describes one instance to create.
type Spec struct {
	// ID is unique per instance on this node; backends derive container
	// IDs, netns names and directories from it.
	ID       string
	Function string
	// ImageDigest is the manifest digest the rootfs was unpacked from.
	ImageDigest string
	// Rootfs is the read-only unpacked image root. Backends must never
	// write into it.
	Rootfs  string
	Process Process
	// Port is the function's gRPC port inside the sandbox (GUEST_PORT).
	Port int
	// MemoryLimit in bytes; 0 means no limit.
	MemoryLimit int64
	// CPULimit in cores; 0 means no limit.
	CPULimit float64
	// WasmModule is the path of the wasm module for the wasm backend.
	WasmModule string
}

// Stats is the memory footprint of a running instance.
type Stats struct {
	RSS int64 // bytes
	PSS int64 // bytes; shared pages divided among the processes sharing them
}

// Backend creates sandboxes of one kind.
type Backend interface {
	Name() string
	Capabilities() Capabilities
	// Create prepares an instance (rootfs, network, bundle, container
	// created but not running its process). On error nothing is left
	// behind.
	Create(ctx context.Context, spec Spec) (Sandbox, error)
	// Cleanup removes every instance, netns, mount and directory a
	// previous run of this backend left behind (daemon restart).
	Cleanup(ctx context.Context) error
}

// Sandbox is one instance.
type Sandbox interface {
	ID() string
	// Start runs the function process. It returns once the process is
	// running, not once it listens.
	Start(ctx context.Context) error
	// Endpoint is the gRPC target the daemon dials to reach the function:
	// "10.168.0.2:50051" or "unix:///path/to/sock".
	Endpoint() string
	// Done is closed when the sandbox's process has exited.
	Done() <-chan struct{}
	// Err describes why the sandbox exited (exit status and the tail of its
	// stderr); nil while it runs.
	Err() error
	Stats(ctx context.Context) (Stats, error)
	// Stop ends the instance and releases everything it holds. Safe to call
	// more than once.
	Stop(ctx context.Context) error
}

// MemoryMode selects how a restore obtains guest memory.
type MemoryMode string

const (
	MemoryEager    MemoryMode = "eager"    // everything read before resume (vanilla snapshot)
	MemoryLazy     MemoryMode = "lazy"     // page faults served by the memory manager
	MemoryRecord   MemoryMode = "record"   // lazy, and record the working set (REAP, first restore)
	MemoryPrefetch MemoryMode = "prefetch" // install the recorded working set first (REAP)
)

// Snapshotter is implemented by sandboxes whose backend declares
// Capabilities.Snapshot. Snapshot writes the instance's state into dir (which
// exists and is empty) and leaves the instance running.
type Snapshotter interface {
	Snapshot(ctx context.Context, dir string) error
}

// RestoreOptions parameterise Restorer.Restore.
type RestoreOptions struct {
	Mode MemoryMode
	// WorkingSet is the path of the REAP working-set file (read for
	// prefetch, written for record).
	WorkingSet string
}

// RestoreResult carries what a restore measured about memory, with vHive's
// names (FetchState, InstallWS in µs; RecPages, RecRegions, Unique, ...).
type RestoreResult struct {
	Stages map[string]time.Duration
	Pages  map[string]int64
}

// Restorer is implemented by backends that declare Capabilities.Snapshot.
// A Restore error wraps ErrBadSnapshot when the snapshot's files are what
// is wrong.
type Restorer interface {
	Restore(ctx context.Context, spec Spec, dir string, opts RestoreOptions) (Sandbox, error)
}

// ErrNotSupported is returned for an operation a backend does not declare.
var ErrNotSupported = errors.New("not supported by this sandbox backend")

// ErrBadSnapshot is what a Restorer's error wraps when the snapshot's own
// files are unusable: missing, malformed, failing a checksum, or taken of
// something else than the spec asks for. Such a snapshot can never be
// restored, and the caller removes it. Any other Restore error (the
// sandbox's process died, a resource ran out, the context ended) is a fault
// of that attempt and says nothing against the snapshot.
var ErrBadSnapshot = errors.New("snapshot files are unusable")

// ErrOutOfMemory is what a sandbox's Err wraps when the kernel killed it for
// exceeding its memory limit (as opposed to any other crash).
var ErrOutOfMemory = errors.New("out of memory")

// RestoreReporter is implemented by restored sandboxes that can report what
// their restore measured (memory-manager stages and page statistics). The
// values grow while the instance runs (lazy faults); callers read them after
// the first invocation.
type RestoreReporter interface {
	RestoreStats() RestoreResult
}

// Recorder is implemented by sandboxes restored in MemoryRecord mode.
// FinishRecord stops recording and writes the working-set file atomically;
// the instance keeps running, its later faults served lazily. The
// orchestrator calls it after the first invocation of a recording instance.
type Recorder interface {
	FinishRecord(ctx context.Context) error
}
