// Package sdk turns one handler into a vhive function for both targets:
//
//	type Handler func(ctx context.Context, payload string) (string, error)
//
// # Linux (every GOOS but wasip1)
//
// Run serves the handler as the vHive data plane: a gRPC server implementing
// helloworld.Greeter/SayHello on all interfaces at port $GUEST_PORT (default
// 50051). HelloRequest.name is the payload, HelloReply.message the result; a
// handler error becomes a gRPC status with code Unknown and the error text.
// The standard gRPC health service (grpc.health.v1.Health) answers Check and
// List with SERVING (Watch is not served: it would hold up a graceful stop).
// SIGTERM or SIGINT stop the server gracefully (in-flight calls finish, at
// most ten seconds). Logs go to stderr through log/slog. Serve is the same
// server on a caller's listener, for tests and in-process use.
//
// # WebAssembly (GOOS=wasip1, GOARCH=wasm, -buildmode=c-shared: a reactor)
//
// The module has no _start. The host instantiates it without start functions,
// calls _initialize once (the Go runtime and every package init run there),
// then drives the handler through four exports. All pointers are offsets into
// the module's exported memory "memory"; all integers are wasm i32/i64.
//
//	vhive_alloc(size i32) -> i32
//	    Returns a pointer to size bytes of guest memory for the host to write a
//	    request into. The buffer is pinned by the SDK until vhive_free(ptr).
//	    size 0 gives a valid one-byte buffer; a negative size returns 0.
//	vhive_free(ptr i32)
//	    Releases a buffer returned by vhive_alloc or a response pointer from
//	    vhive_handle. Unknown pointers (and 0) are ignored.
//	vhive_handle(ptr i32, len i32) -> i64
//	    Runs the handler on the len request bytes at ptr, which must lie inside
//	    a buffer from vhive_alloc (len 0 means an empty payload, whatever ptr).
//	    Returns (respPtr << 32) | respLen. The response buffer stays pinned
//	    until the host calls vhive_free(respPtr); respPtr is never 0. The
//	    request buffer is NOT freed by vhive_handle: the host may reuse it.
//	vhive_status() -> i32
//	    0 if the last vhive_handle succeeded; 1 if it failed, in which case the
//	    bytes it returned are the error message (handler error, handler panic,
//	    a request pointer not from vhive_alloc, or no handler registered).
//
// Calls are not reentrant: the host calls one export at a time.
//
// A Go c-shared (reactor) module NEVER runs main.main: the runtime stops after
// package initialisation. So on wasip1 a function registers its handler from
// an init function, which the host runs once at boot through _initialize:
//
//	// main.go (both targets)
//	func main() { sdk.Run(newState().handle) }
//
//	// wasm.go
//	//go:build wasip1
//	func init() { sdk.Run(newState().handle) }
//
// On wasip1, Run only stores the handler and returns. Expensive set-up (tables,
// models) belongs in the code that builds the handler, so it runs at boot and
// is part of a snapshot. The handler gets context.Background(). The SDK uses no
// WASI files or sockets.
//
// Build: GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared -o f.wasm ./functions/f
package sdk
