// Package memory is vhive's memory manager: an out-of-process userfaultfd
// page server for restored sandboxes, speaking Firecracker's UFFD
// handshake, with three modes — lazy, record and prefetch (REAP, ASPLOS'21).
//
// # Protocol (Firecracker's "Uffd" memory backend)
//
// For each restore the manager binds and listens on a unix stream socket
// whose path the caller chooses (RestoreConfig.SocketPath; Firecracker's
// snapshot-load request names it in mem_backend
// {"backend_type": "Uffd", "backend_path": "<socket>"}). The sandbox process
//
//  1. maps its guest memory (anonymous, private),
//
//  2. creates a userfaultfd with O_NONBLOCK|O_CLOEXEC, does UFFDIO_API
//     requesting UFFD_FEATURE_EVENT_REMOVE, and registers the mapping with
//     UFFDIO_REGISTER_MODE_MISSING,
//
//  3. connects and sends ONE message: the payload is a JSON array of
//     regions
//
//     [{"base_host_virt_addr": 140737..., "size": 268435456, "offset": 0,
//     "page_size": 4096, "page_size_kib": 4096}]
//
//     (page_size_kib is deprecated and, despite its name, holds bytes; either
//     field may carry the page size, and if both are set they must agree),
//     with the userfaultfd attached as SCM_RIGHTS ancillary data.
//
// The manager reads the peer's pid with SO_PEERCRED and takes a pidfd for it
// with SO_PEERPIDFD (Linux 6.5+; pidfd_open of the pid on older kernels).
// A handshake that does not arrive within 10 s of connecting, or that is not
// complete JSON within 1 s of its first byte, is rejected.
// It rejects, with an error naming the problem, malformed JSON, an empty
// array, page sizes that are not powers of two >= 4096, unaligned base,
// size or offset, overlapping regions, regions extending past the memory
// file, and a message carrying no fd or more than one.
//
// Then it serves: a fault at addr in region r is served from memory-file
// offset r.offset + (page(addr) - r.base_host_virt_addr) with UFFDIO_COPY.
// EEXIST (page already present) is skipped and the waiter woken; EAGAIN with
// nothing copied (a remove event is pending) makes the manager read the
// pending events and retry; a partial copy is continued. After
// UFFD_EVENT_REMOVE (madvise(MADV_DONTNEED) or balloon) the removed pages
// read as zero on their next fault (UFFDIO_ZEROPAGE), as anonymous memory
// would; removal is permanent for the restore (a dropped page never holds
// the file's bytes again), and the removes of each batch of events are
// applied before its faults. A peer that did not request
// UFFD_FEATURE_EVENT_REMOVE still works: a fault on a page the manager
// already installed means the guest dropped it, and it gets a zero page.
//
// Beyond Firecracker's protocol, after the handshake the manager writes one
// line back on the connection: "ok\n" once memory is ready (in prefetch mode
// after the working set is installed, or right after the handshake with
// RestoreConfig.EarlyResume), or "error: <reason>\n". vhive's
// sandboxes wait for it (WaitReady, Attach) before resuming the guest; a
// Firecracker peer never reads it and still works, because faults on pages
// not yet installed are simply served.
//
// Serving ends when the peer exits (its pidfd becomes readable) or when
// Restore.Close or Manager.Close is called, or if serving fails. A peer
// still alive at that point is killed with SIGKILL through its pidfd — never
// by a possibly recycled pid, never any other process — because without its
// page server it would hang on its next fault. The page server must run in
// a different process from the faulting one: a Go process blocked on its own
// uffd fault stalls the garbage collector's stop-the-world. If the
// manager's process itself dies, nobody can kill the peer; the peer sees its
// connection close instead (Client.ManagerGone) and should exit.
//
// # Sparse memory files
//
// Pages wholly inside holes of the memory file (SEEK_DATA/SEEK_HOLE, found
// once per restore) are installed with UFFDIO_ZEROPAGE, not copied. The wasm
// snapshot writer leaves zero pages as holes, so untouched guest memory costs
// neither disk nor copies.
//
// # Modes
//
// lazy: every fault installs its page — or, with RestoreConfig.ChunkPages =
// N > 1, the aligned N-page chunk around it (clipped to the region), which
// trades extra copying for far fewer round trips (each fault costs tens of
// µs of wake-up in a nested VM).
//
// record: lazy, and every page installed from the file is logged once, in
// fault order. Restore.FinishRecord (or Close, if not called) sorts them by
// offset, merges contiguous pages into runs and writes the working-set file
// (below) to a temporary name, fsyncs it, renames it over
// RestoreConfig.WorkingSet and fsyncs the directory. RestoreConfig.Trace, if
// set, receives the fault-order CSV "seq,offset,length" (file offsets,
// bytes).
//
// prefetch: as soon as the restore starts (before the peer connects), the
// manager reads the WS file in 1 MiB blocks with 4 reads in flight —
// buffered if cachestat(2) says it is wholly in the page cache, else with
// O_DIRECT (buffered where the filesystem refuses O_DIRECT) — into a
// reused, pre-faulted buffer of 2 MiB huge pages (package iobuf: direct
// reads into 4 KiB pages were 5× slower in a VM), and verifies it as the
// blocks arrive: the header and tables first, then each 1 MiB data chunk
// against its CRC-32C, two chunks at a time. A chunk that fails ends the
// fetch once every chunk before it is verified, so those are still
// installed. Once the handshake is done it installs each chunk as soon as it
// is verified, one UFFDIO_COPY in UFFDIO_COPY_MODE_DONTWAKE mode per run
// (or part of a run) in the chunk, then one UFFDIO_WAKE per region, so a
// prefetch costs about the larger of reading and installing, not their
// sum, and no byte is installed before its checksum matched. By default
// the ack follows the last chunk; with RestoreConfig.EarlyResume it is
// sent right after the handshake and the guest runs while the WS streams
// in: a fault on a WS page not installed yet waits for its chunk (counted
// in Stats.WSWaits; the chunk's wake releases it), other faults are served
// lazily and counted as Unique. Restores that prefetch the same WS file
// (same inode, size and mtime) at the same time share one read and one
// buffer (Stats.SharedFetch); the buffer is released when the last of them
// has installed it, so a later restore reads the file again. A WS file
// that is corrupt, truncated, or recorded against a memory file of another
// size is never installed: the restore logs a warning and serves lazily
// (Stats.PrefetchFallback). If a data chunk fails its checksum midway, the
// chunks before it (verified) stay installed and everything else is served
// lazily from the memory file.
//
// # Working-set file format (version 2, little-endian)
//
//	offset size field
//	0      8    magic "VHIVEWS\x00"
//	8      4    version = 2
//	12     4    page size (bytes)
//	16     8    number of runs n
//	24     8    size of the memory file it was recorded against
//	32     8    data offset D (multiple of 4096, >= 64 + 16n + 4m)
//	40     8    data length L (sum of run lengths)
//	48     4    CRC-32C (Castagnoli) of bytes [0, D) with this field zero
//	52     4    data chunk size C (multiple of 4096; 1 MiB when written)
//	56     4    number of chunks m = ceil(L / C)
//	60     4    reserved, zero
//	64     16n  run table: n × {offset u64, length u64}, memory-file offsets,
//	            page aligned, sorted, non-overlapping, non-empty
//	64+16n 4m   CRC-32C of each data chunk [D + kC, D + min((k+1)C, L))
//	D      L    the runs' bytes, concatenated in run order
//
// The file is zero-padded to a multiple of 4096 bytes so that it can be read
// with O_DIRECT. Version 1 (written by earlier vhive) has no chunk table and
// one CRC-32C of bytes [0, D+L) at offset 48 (bytes 52–63 reserved); it is
// still read, but can only be verified and installed once wholly read (the
// restore logs that it should be recorded again). Other versions are
// refused (lazy fallback) with an error naming the version.
//
// # Metrics
//
// Restore.Stats returns vHive's names: FetchState (read + verify the WS,
// from the restore's start), InstallWS (from the handshake to the last
// chunk installed; InstallBusy of it in the ioctls), PrefetchWS (restore
// start to WS installed), ServeUnique (total service time of lazily
// served faults), RecPages and RecRegions (pages and runs of the working
// set), Unique (pages served lazily), Faults, BytesRead, and per-fault
// service-time samples (Stats.Percentile). Stats.Stages and Stats.Pages map
// them for sandbox.RestoreResult. NewMetrics registers Prometheus collectors
// (vhive_memory_*) on a caller-supplied Registerer.
//
// # Use
//
// Daemon side:
//
//	m, _ := memory.NewManager(memory.Config{Logger: log, Metrics: met})
//	r, err := m.Start(ctx, memory.RestoreConfig{ID: id, SocketPath: sock,
//		MemoryFile: memFile, Mode: memory.ModePrefetch, WorkingSet: wsFile})
//	// start the sandbox process, which connects to sock
//	<-r.Ready(); if err := r.ReadyErr(); err != nil { ... }
//	// ... the sandbox runs; in record mode: r.FinishRecord(ctx)
//	r.Close(); stats := r.Stats()
//
// Sandbox side (a process other than the manager):
//
//	mem, _ := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
//	c, err := memory.Attach(ctx, sock, mem, 0) // returns once memory is ready
//	defer c.Close()
//
// Standalone, for one Firecracker restore on a KVM host: ServeOne.
package memory
