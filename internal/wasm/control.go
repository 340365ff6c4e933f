package wasm

import (
	"context"
	"encoding/json"
	"fmt"

	"google.golang.org/grpc"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// The worker's private control service, served on its control socket (never
// on the greeter socket). Messages are JSON documents carried in
// google.protobuf.BytesValue, so no generated code is needed:
//
//	/vhive.wasm.Worker/Start     StartRequest    → StartReply
//	/vhive.wasm.Worker/Snapshot  SnapshotRequest → SnapshotReply
const controlService = "vhive.wasm.Worker"

// Restore modes understood by the worker.
const (
	// RestoreCopy reads the memory file's data extents into fresh memory
	// before the guest runs (eager).
	RestoreCopy = "copy"
	// RestoreMmap maps the memory file privately (copy-on-write): pages come
	// from the page cache on first touch.
	RestoreMmap = "mmap"
	// RestoreUffd registers the memory with userfaultfd and hands the uffd
	// to the memory manager at UffdSocket (Firecracker's handshake).
	RestoreUffd = "uffd"
)

// StartRequest asks an idle worker to boot or restore its instance and then
// serve helloworld.Greeter on GreeterSocket.
type StartRequest struct {
	GreeterSocket string `json:"greeter_socket"`
	// Env is passed to the guest as K=V (only at boot: a restored guest
	// keeps the environment it was booted with).
	Env []string `json:"env,omitempty"`
	// Args are the guest's argv (boot only, like Env).
	Args []string `json:"args,omitempty"`
	// MaxMemory caps linear memory in bytes (0: 4 GiB).
	MaxMemory uint64 `json:"max_memory,omitempty"`
	// Restore is nil for a boot.
	Restore *RestoreRequest `json:"restore,omitempty"`
}

// RestoreRequest says where the snapshot is and how to load its memory.
type RestoreRequest struct {
	Dir  string `json:"dir"`
	Mode string `json:"mode"`
	// UffdSocket is the memory manager's socket (mode uffd).
	UffdSocket string `json:"uffd_socket,omitempty"`
	// VerifyMemory hashes the memory file against the state's checksum
	// before the guest runs (reads every page: meant for eager restores
	// and the first restore of a snapshot).
	VerifyMemory bool `json:"verify_memory,omitempty"`
}

// StartReply reports the worker's own stage timings in microseconds:
// Compile (0 when preloaded), LoadMemory, Instantiate, Initialize (boot) or
// SetState (restore), and Worker (the whole call inside the worker).
type StartReply struct {
	Stages map[string]int64 `json:"stages"`
	// Preloaded is true when the module was compiled before this call (a
	// pooled worker); false when this call compiled it or loaded it from the
	// compilation cache (Stages["Compile"] says how long that took).
	Preloaded bool `json:"preloaded"`
}

// SnapshotRequest asks for a snapshot into Dir (which exists).
type SnapshotRequest struct {
	Dir string `json:"dir"`
}

// SnapshotReply describes the snapshot written.
type SnapshotReply struct {
	MemoryPages uint32 `json:"memory_pages"`
	DataPages   int64  `json:"data_pages"`
	MemorySize  int64  `json:"memory_size"`
}

// controlServer is implemented by the worker.
type controlServer interface {
	start(ctx context.Context, req *StartRequest) (*StartReply, error)
	snapshot(ctx context.Context, req *SnapshotRequest) (*SnapshotReply, error)
}

func unaryJSON[Req, Resp any](call func(controlServer, context.Context, *Req) (*Resp, error), method string) grpc.MethodDesc {
	return grpc.MethodDesc{
		MethodName: method,
		Handler: func(srv any, ctx context.Context, dec func(any) error, _ grpc.UnaryServerInterceptor) (any, error) {
			in := new(wrapperspb.BytesValue)
			if err := dec(in); err != nil {
				return nil, err
			}
			req := new(Req)
			if err := json.Unmarshal(in.Value, req); err != nil {
				return nil, fmt.Errorf("decode %s request: %w", method, err)
			}
			resp, err := call(srv.(controlServer), ctx, req)
			if err != nil {
				return nil, err
			}
			b, err := json.Marshal(resp)
			if err != nil {
				return nil, fmt.Errorf("encode %s reply: %w", method, err)
			}
			return wrapperspb.Bytes(b), nil
		},
	}
}

var controlDesc = grpc.ServiceDesc{
	ServiceName: controlService,
	HandlerType: (*controlServer)(nil),
	Methods: []grpc.MethodDesc{
		unaryJSON(controlServer.start, "Start"),
		unaryJSON(controlServer.snapshot, "Snapshot"),
	},
	Metadata: "internal/wasm/control.go",
}

// WorkerClient talks to a worker's control socket.
type WorkerClient struct {
	conn *grpc.ClientConn
}

// NewWorkerClient wraps a connection to a worker's control socket.
func NewWorkerClient(conn *grpc.ClientConn) *WorkerClient { return &WorkerClient{conn: conn} }

func invokeJSON[Resp any](ctx context.Context, conn *grpc.ClientConn, method string, req any) (*Resp, error) {
	b, err := json.Marshal(req)
	if err != nil {
		return nil, fmt.Errorf("encode %s request: %w", method, err)
	}
	out := new(wrapperspb.BytesValue)
	if err := conn.Invoke(ctx, "/"+controlService+"/"+method, wrapperspb.Bytes(b), out); err != nil {
		return nil, err
	}
	resp := new(Resp)
	if err := json.Unmarshal(out.Value, resp); err != nil {
		return nil, fmt.Errorf("decode %s reply: %w", method, err)
	}
	return resp, nil
}

// Start boots or restores the worker's instance.
func (c *WorkerClient) Start(ctx context.Context, req *StartRequest) (*StartReply, error) {
	return invokeJSON[StartReply](ctx, c.conn, "Start", req)
}

// Snapshot writes the instance's snapshot into dir.
func (c *WorkerClient) Snapshot(ctx context.Context, dir string) (*SnapshotReply, error) {
	return invokeJSON[SnapshotReply](ctx, c.conn, "Snapshot", &SnapshotRequest{Dir: dir})
}
