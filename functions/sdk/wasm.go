//go:build wasip1

package sdk

import (
	"context"
	"fmt"
	"unsafe"
)

// guest is the state behind the wasm exports. It must be package-level: a
// //go:wasmexport function is called by the host with nothing but integers, so
// the handler and the buffers the host holds pointers into can only live in
// the guest runtime's globals. The pinned map is also what keeps those buffers
// alive: the Go GC does not move objects, so a slice referenced here stays at
// the address the host was given until vhive_free drops it.
var guest struct {
	handler Handler
	pinned  map[uint32][]byte // buffer address -> buffer
	failed  bool              // the last vhive_handle failed
}

// Run registers h for the wasm exports and returns. A reactor never runs
// main.main, so call Run from an init function (see the package doc).
func Run(h Handler) {
	guest.handler = h
}

// pin keeps a buffer of n bytes (at least one, so its address is unique and
// non-zero) alive and returns it with its address.
func pin(n int) ([]byte, uint32) {
	if guest.pinned == nil {
		guest.pinned = make(map[uint32][]byte)
	}
	buf := make([]byte, max(n, 1))
	ptr := uint32(uintptr(unsafe.Pointer(unsafe.SliceData(buf))))
	guest.pinned[ptr] = buf
	return buf[:n], ptr
}

//go:wasmexport vhive_alloc
func vhiveAlloc(size int32) int32 {
	if size < 0 {
		return 0
	}
	_, ptr := pin(int(size))
	return int32(ptr)
}

//go:wasmexport vhive_free
func vhiveFree(ptr int32) {
	delete(guest.pinned, uint32(ptr))
}

//go:wasmexport vhive_handle
func vhiveHandle(ptr, length int32) int64 {
	out, err := handle(uint32(ptr), length)
	guest.failed = err != nil
	if err != nil {
		out = err.Error()
	}
	buf, rptr := pin(len(out))
	copy(buf, out)
	return int64(rptr)<<32 | int64(len(out))
}

//go:wasmexport vhive_status
func vhiveStatus() int32 {
	if guest.failed {
		return 1
	}
	return 0
}

// handle finds the request in a pinned buffer and runs the handler on it.
func handle(ptr uint32, length int32) (out string, err error) {
	if guest.handler == nil {
		return "", fmt.Errorf("no handler registered: call sdk.Run from an init function (a wasip1 reactor never runs main)")
	}
	var payload string
	if length < 0 {
		return "", fmt.Errorf("request length %d is negative", length)
	}
	if length > 0 {
		buf, ok := guest.pinned[ptr]
		if !ok {
			return "", fmt.Errorf("request pointer %#x was not returned by vhive_alloc (or was freed)", ptr)
		}
		if int(length) > len(buf) {
			return "", fmt.Errorf("request length %d exceeds the %d-byte buffer at %#x", length, len(buf), ptr)
		}
		payload = string(buf[:length])
	}
	defer func() {
		if r := recover(); r != nil {
			out, err = "", fmt.Errorf("handler panicked: %v", r)
		}
	}()
	return guest.handler(context.Background(), payload)
}
