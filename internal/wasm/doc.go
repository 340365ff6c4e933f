// Package wasm runs WebAssembly functions under wazero in worker processes
// and snapshots and restores their state (ARCHITECTURE.md §5).
//
// # Modules
//
// Prepare (PrepareCached: once per sha256 digest, under
// <cache>/modules/<hex>/) derives two modules with wabin:
//
//   - boot.wasm: the original plus an export of every defined global
//     (GlobalExportPrefix+index, as Wizer does); boots instantiate it, so
//     that boot and restore share global indices;
//   - restore.wasm: boot.wasm without data, data-count and start sections,
//     so instantiating it leaves the restored linear memory untouched.
//
// Modules whose state a snapshot would not capture are refused
// (ErrUnsupportedModule): imports other than functions, no memory, passive
// data or element segments, and code using table.set/grow/fill/copy/init,
// elem.drop, memory.init, data.drop, atomics, exceptions, SIMD or tail
// calls (scanCode does not guess at instructions it does not know). Go's
// wasip1 modules pass: their single funcref table is filled by an active
// element segment and never changed.
//
// # Worker processes
//
// WorkerMain (the hidden command `vhive internal wasm-worker`) serves one
// instance. It compiles the prepared modules with wazero's on-disk
// compilation cache (--preload compiles them before it reports ready, for
// pools), listens on its control socket and writes "ready" to stdout. Its
// private control service (control.go, JSON in BytesValue, no generated
// code) has two calls:
//
//	Start     boot (instantiate boot.wasm, _initialize) or restore (memory
//	          from the snapshot: "copy" = data extents read into fresh
//	          memory, "mmap" = MAP_PRIVATE file mapping, "uffd" = registered
//	          with userfaultfd and handed to the memory manager with
//	          memory.Attach; then instantiate restore.wasm without start
//	          functions, grow memory, set every global), then serve
//	          helloworld.Greeter on the given socket.
//	Snapshot  between two guest calls: linear memory and globals to a
//	          snapshot directory; the instance keeps running.
//
// Linear memory is a 4 GiB MAP_NORESERVE reservation given to wazero by
// experimental.WithMemoryAllocator; it never moves, so its prefix can be
// backed by a file mapping or userfaultfd before instantiation. A limit
// (StartRequest.MaxMemory) makes memory.grow fail beyond it.
//
// The guest gets no files, sockets or preopens; stdout and stderr go to the
// worker's stderr; randomness is crypto/rand; walltime is the host's; the
// monotonic clock continues from the snapshot's value after a restore (Go's
// runtime aborts if it goes back). Calls into the guest are serialised (Go
// guests are single-threaded). A trap or exit of the guest is fatal: the
// worker returns the error and exits non-zero.
//
// The guest ABI is functions/sdk's: vhive_alloc, vhive_handle,
// vhive_status, vhive_free; HelloRequest.name is the payload and
// HelloReply.message the reply; status 1 becomes codes.Unknown.
//
// # Snapshots
//
// See snapshot.go for the files (sparse memory file, versioned state file
// with sha256 checksums, atomic writes). ReadState refuses a corrupt or
// truncated snapshot (ErrCorruptSnapshot), State.CheckModule a snapshot of
// another module (ErrDigestMismatch); VerifyMemory hashes the memory file.
//
// Caveats, as for every snapshot system (AWS documents the same for
// SnapStart): every clone of one snapshot shares Go's map seeds and
// math/rand state (crypto/rand stays unique); a restored guest keeps the
// environment it was booted with.
package wasm
