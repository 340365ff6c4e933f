//go:build !wasip1

package sdk

import (
	"context"
	"crypto/rand"
	"os"
	"strings"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
)

// reactor is testdata/echo built as a wasip1 reactor and instantiated the
// way the vhive wasm host does it: no start functions, then _initialize.
type reactor struct {
	t   testing.TB
	mod api.Module
}

func newReactor(t testing.TB) *reactor {
	t.Helper()
	wasm, err := os.ReadFile(buildEcho(t, "wasip1", "wasm", "-buildmode=c-shared"))
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	t.Cleanup(func() { rt.Close(ctx) })
	wasi_snapshot_preview1.MustInstantiate(ctx, rt)
	cfg := wazero.NewModuleConfig().WithStartFunctions().
		WithSysNanotime().WithSysWalltime().WithRandSource(rand.Reader).WithStderr(os.Stderr)
	mod, err := rt.InstantiateWithConfig(ctx, wasm, cfg)
	if err != nil {
		t.Fatalf("instantiate: %v", err)
	}
	for _, name := range []string{"_initialize", "vhive_alloc", "vhive_free", "vhive_handle", "vhive_status"} {
		if mod.ExportedFunction(name) == nil {
			t.Fatalf("module does not export %s", name)
		}
	}
	if _, err := mod.ExportedFunction("_initialize").Call(ctx); err != nil {
		t.Fatalf("_initialize: %v", err)
	}
	return &reactor{t: t, mod: mod}
}

func (r *reactor) call(name string, args ...uint64) uint64 {
	r.t.Helper()
	res, err := r.mod.ExportedFunction(name).Call(context.Background(), args...)
	if err != nil {
		r.t.Fatalf("%s%v: %v", name, args, err)
	}
	if len(res) == 0 {
		return 0
	}
	return res[0]
}

// alloc writes p into a guest buffer and returns its pointer.
func (r *reactor) alloc(p []byte) uint32 {
	r.t.Helper()
	ptr := uint32(r.call("vhive_alloc", api.EncodeI32(int32(len(p)))))
	if ptr == 0 {
		r.t.Fatalf("vhive_alloc(%d) returned 0", len(p))
	}
	if !r.mod.Memory().Write(ptr, p) {
		r.t.Fatalf("write %d bytes at %#x: out of range", len(p), ptr)
	}
	return ptr
}

// handle calls vhive_handle, reads and frees the response, and returns it
// with vhive_status.
func (r *reactor) handle(ptr uint32, n int32) (string, int32) {
	r.t.Helper()
	packed := r.call("vhive_handle", api.EncodeI32(int32(ptr)), api.EncodeI32(n))
	rptr, rlen := uint32(packed>>32), uint32(packed)
	if rptr == 0 {
		r.t.Fatal("vhive_handle returned a null response pointer")
	}
	b, ok := r.mod.Memory().Read(rptr, rlen)
	if !ok {
		r.t.Fatalf("response %#x+%d is out of memory range", rptr, rlen)
	}
	out := string(b) // copy before freeing
	st := api.DecodeI32(r.call("vhive_status"))
	r.call("vhive_free", api.EncodeI32(int32(rptr)))
	return out, st
}

func TestWasmABI(t *testing.T) {
	r := newReactor(t)

	req := r.alloc([]byte("hello wasm"))
	if out, st := r.handle(req, 10); st != 0 || out != "echo:HELLO WASM" {
		t.Errorf("handle = %q, status %d; want %q, 0", out, st, "echo:HELLO WASM")
	}
	// The request buffer survives handle: the host may reuse it.
	if out, st := r.handle(req, 5); st != 0 || out != "echo:HELLO" {
		t.Errorf("second handle on the same buffer = %q, %d", out, st)
	}
	r.call("vhive_free", api.EncodeI32(int32(req)))

	fail := r.alloc([]byte("fail"))
	if out, st := r.handle(fail, 4); st != 1 || out != "echo: asked to fail" {
		t.Errorf("failing handler = %q, status %d; want the error and 1", out, st)
	}
	// Status reflects only the last call.
	ok := r.alloc([]byte("ok"))
	if _, st := r.handle(ok, 2); st != 0 {
		t.Errorf("status after a good call = %d, want 0", st)
	}
	pan := r.alloc([]byte("panic"))
	if out, st := r.handle(pan, 5); st != 1 || !strings.Contains(out, "asked to panic") {
		t.Errorf("panicking handler = %q, status %d", out, st)
	}

	// Empty payload.
	if out, st := r.handle(0, 0); st != 0 || out != "echo:" {
		t.Errorf("empty payload = %q, %d", out, st)
	}
	// Bad requests fail with a message naming the problem.
	if out, st := r.handle(12345, 3); st != 1 || !strings.Contains(out, "not returned by vhive_alloc") {
		t.Errorf("unknown pointer = %q, status %d", out, st)
	}
	if out, st := r.handle(ok, 3); st != 1 || !strings.Contains(out, "exceeds") {
		t.Errorf("overlong length = %q, status %d", out, st)
	}
	if out, st := r.handle(ok, -1); st != 1 || !strings.Contains(out, "negative") {
		t.Errorf("negative length = %q, status %d", out, st)
	}
	r.call("vhive_free", api.EncodeI32(int32(ok)))
	if out, st := r.handle(ok, 2); st != 1 || !strings.Contains(out, "freed") {
		t.Errorf("freed pointer = %q, status %d", out, st)
	}
	if got := r.call("vhive_alloc", api.EncodeI32(-1)); got != 0 {
		t.Errorf("vhive_alloc(-1) = %#x, want 0", got)
	}
	r.call("vhive_free", 0) // ignored

	// A large request (4 MiB) grows memory and round-trips.
	big := make([]byte, 4<<20)
	for i := range big {
		big[i] = 'a' + byte(i%26)
	}
	bp := r.alloc(big)
	out, st := r.handle(bp, int32(len(big)))
	if st != 0 || out != "echo:"+strings.ToUpper(string(big)) {
		t.Errorf("4 MiB payload: status %d, %d bytes back", st, len(out))
	}
	r.call("vhive_free", api.EncodeI32(int32(bp)))
}

func TestWasmManyCalls(t *testing.T) {
	// Buffers are freed and reused across many calls without corrupting
	// live ones (the GC runs meanwhile).
	r := newReactor(t)
	keep := r.alloc([]byte("keep"))
	for i := range 2000 {
		p := []byte(strings.Repeat("x", i%300))
		ptr := r.alloc(p)
		if out, st := r.handle(ptr, int32(len(p))); st != 0 || out != "echo:"+strings.ToUpper(string(p)) {
			t.Fatalf("call %d: %q, status %d", i, out, st)
		}
		r.call("vhive_free", api.EncodeI32(int32(ptr)))
	}
	if out, st := r.handle(keep, 4); st != 0 || out != "echo:KEEP" {
		t.Errorf("long-lived buffer after 2000 calls: %q, %d", out, st)
	}
}
