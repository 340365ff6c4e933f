// Package image pulls, imports, caches and unpacks OCI images for vhive's
// sandboxes.
//
// An image is identified by its manifest digest. Each digest is unpacked ONCE
// into a root filesystem directory that the sandboxes use as a read-only lower
// layer (read-only by convention: nothing in vhive writes into it after the
// unpack). References (names such as 127.0.0.1:5000/hello:v1) point at digests;
// several references may share one digest.
//
// # Layout on disk
//
//	<Root>/meta.db                          bbolt database (schema below)
//	<Root>/digests/<algo>/<hex>/rootfs/     unpacked root filesystem
//	<Root>/digests/<algo>/<hex>/module.wasm wasm module (wasm-layer images only)
//	<Root>/digests/<algo>/<hex>/manifest.json, config.json  raw image metadata
//	<Root>/tmp/                             in-progress unpacks and archive imports
//
// An unpack is done in <Root>/tmp/unpack-* and renamed into place when it has
// fully succeeded, so a failed or interrupted unpack leaves nothing behind and
// never disturbs an existing image. New removes whatever <Root>/tmp holds and
// any digest directory that no record names.
//
// # bbolt schema (version 1)
//
//	v1                     bucket
//	├── refs               bucket: key = normalised reference (ggcr's
//	│                      name.Reference.Name(), e.g.
//	│                      "index.docker.io/library/alpine:latest"),
//	│                      value = manifest digest "sha256:<hex>"
//	└── images             bucket: key = manifest digest "sha256:<hex>",
//	                       value = JSON of record (digest, size, created,
//	                       config, kind, wasm module file name, unpack time)
//
// A record is written only after its digest directory is in place; removing
// the last reference to a digest removes its record and then its directory.
//
// # Wasm images
//
// Two forms are recognised, both giving Kind "wasm":
//
//  1. A layer with media type application/vnd.wasm.content.layer.v1+wasm (the
//     form containerd's runwasi uses). The layer blob is stored as the file
//     module.wasm in the digest directory, not unpacked as a tar; WasmModule is
//     its path. Other (tar) layers of the image are unpacked into rootfs as
//     usual. More than one wasm layer is rejected.
//  2. A plain tar image whose config label or manifest annotation
//     dev.vhive.wasm.module names a file in the image (e.g. /module.wasm).
//     WasmModule is that file's path inside the unpacked rootfs; it must be a
//     regular file reached without leaving the rootfs.
//
// # Unpack safety
//
// Layers are untrusted input. Every entry is written through an os.Root
// opened on the temporary rootfs, which resolves each path component without
// following a symlink out of the root (absolute symlinks and ".." escapes are
// refused when a later entry would write through them; creating such a
// symlink is fine, it only means something inside the sandbox). In addition
// entry names and hard-link targets must be relative and free of ".."
// components. Rejected, with an UnsafeLayerError naming the layer digest and
// the entry path: names or link targets that are absolute or contain "..",
// writes through a symlink that leaves the rootfs, hard links to anything
// outside it, character and block devices and FIFOs anywhere but below dev/
// (a device node would hand the sandbox a host device; a FIFO can block a
// reader), unknown entry types, an entry larger than Options.MaxEntryBytes
// and a layer whose uncompressed tar stream is larger than
// Options.MaxLayerBytes.
//
// Device nodes and FIFOs strictly below dev/ (./dev/null, ./dev/console, …,
// as mmdebstrap, debootstrap and `docker export` write them) are skipped:
// nothing is created for them, the rest of the layer is unpacked, and one
// log line per layer counts and names them. Every sandbox mounts its own
// /dev over the image's (runc and gVisor a tmpfs with the OCI default
// devices; wasm sees no filesystem), so the image's nodes could never be
// used. Because a skipped entry writes nothing, a layer that made dev a
// symlink cannot redirect it. See RATIONALE.md.
//
// Whiteouts (.wh.<name>) remove <name> from lower layers, opaque markers
// (.wh..wh..opq) remove a directory's lower-layer contents; neither marker is
// written. Modes (including setuid/setgid/sticky), ownership (when running as
// root), hard links, symlinks, mtimes of files and directories and extended
// attributes of regular files (when running as root; dropped on filesystems
// without xattrs) are kept; symlink mtimes and directory xattrs are not.
//
// # Verification and platforms
//
// Because images are cached by manifest digest, the manifest, the config and
// every layer blob are hashed while they are read and compared with the
// digests that name them, for every source (go-containerregistry verifies
// registry blobs but not OCI layout blobs): a forged archive fails with
// ErrInvalid instead of planting content a later pull of the genuine digest
// would reuse. Layers may be gzip, zstd or uncompressed tar (told by magic
// bytes). An image must be linux/GOARCH or wasi/wasip1/wasip2 (a wasi image
// must carry a module, see above); from an index that platform is chosen.
//
// # Pulls and the cache
//
// A pull by tag asks the registry for the manifest (tags move) and unpacks
// only a digest the store does not hold. A pull by digest reference
// (repo@sha256:…) whose digest is in the store needs no registry. A record
// whose directory has vanished is unpacked again. Concurrent pulls of one
// digest unpack it once: a per-digest lock, whose wait ends with the context.
//
// # Names
//
// References are normalised with go-containerregistry's name package
// ("hello:v1" is "index.docker.io/library/hello:v1"). Import names an image
// from its argument, else from the archive: io.containerd.image.name or a full
// org.opencontainers.image.ref.name annotation (a bare tag such as "latest"
// names no repository and is not used), or all RepoTags of a docker archive.
//
// # Identity
//
// An image is its manifest digest. A docker archive keeps no manifest, so
// Import builds one the same way every time (FromDockerArchive: OCI media
// types, the archive's config and layer blobs, no annotations); an OCI image
// without annotations — every Linux image functions/build writes — has the
// same digest from its layout, a registry or its docker archive.
//
// # Removal
//
// Remove deletes a reference, or every reference to a digest; the unpacked
// image goes with its last reference unless Options.InUse reports users
// (deployed functions, CRI containers): then nothing changes and the
// *InUseError names them all, e.g. image "localhost/vhive/helloworld:latest"
// (sha256:…) is used by functions "a", "b": remove them first (vhive rm).
// The daemon returns it as FailedPrecondition with that message.
package image
