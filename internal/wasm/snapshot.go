package wasm

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// Snapshot directory layout (one directory per snapshot):
//
//	memory   linear memory, exactly MemorySize bytes; 4 KiB pages that are
//	         all zero are holes (sparse file), which the memory manager maps
//	         to UFFDIO_ZEROPAGE and a copy restore skips.
//	state    one header line "vhive-wasm-state/<version> sha256=<hex>\n"
//	         followed by a JSON State; the hash covers the JSON bytes.
//
// The memory file is written first and the state file last, each through a
// temporary file, fsync and rename: a directory with a valid state file holds
// a complete snapshot.
const (
	MemoryFile = "memory"
	StateFile  = "state"

	// StateVersion is the version of the state file this package writes
	// and the only one it reads.
	StateVersion = 1

	// PageSize is the host page size the memory file is laid out in.
	PageSize = 4096
	// WasmPageSize is the size of a wasm linear-memory page.
	WasmPageSize = 65536

	stateMagic = "vhive-wasm-state/"
)

// Errors a restore can classify. The daemon falls back to a boot on any of
// them.
var (
	// ErrDigestMismatch: the snapshot was taken of a different module.
	ErrDigestMismatch = errors.New("snapshot was taken of a different wasm module")
	// ErrCorruptSnapshot: a file is missing, truncated or fails its checksum.
	ErrCorruptSnapshot = errors.New("corrupt wasm snapshot")
)

// GlobalValue is one global's saved value (raw bits, as wazero returns them).
type GlobalValue struct {
	Export string `json:"export"`
	Type   string `json:"type"`
	Value  uint64 `json:"value"`
}

// State is the content of the state file.
type State struct {
	Version      int    `json:"version"`
	ModuleDigest string `json:"module_digest"`
	// MemoryPages is the linear memory size in 64 KiB pages.
	MemoryPages uint32 `json:"memory_pages"`
	// MemorySize is the memory file's size in bytes (MemoryPages*64 KiB).
	MemorySize int64 `json:"memory_size"`
	// MemorySHA256 is the hex sha256 of the memory file's content (holes
	// read as zeros).
	MemorySHA256 string `json:"memory_sha256"`
	// DataPages counts the non-zero 4 KiB pages written to the memory file.
	DataPages int64         `json:"data_pages"`
	Globals   []GlobalValue `json:"globals"`
	// Nanotime is the guest monotonic clock's value when the snapshot was
	// taken; a restored guest's clock continues from it.
	Nanotime int64     `json:"nanotime"`
	Created  time.Time `json:"created"`
}

// WriteMemoryFile writes mem to path as a sparse file (all-zero 4 KiB pages
// are holes) through a temporary file, fsync and rename. It returns the hex
// sha256 of mem and the number of data pages written.
func WriteMemoryFile(path string, mem []byte) (sum string, dataPages int64, err error) {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return "", 0, fmt.Errorf("create temporary memory file: %w", err)
	}
	tmp := f.Name()
	defer func() {
		if err != nil {
			f.Close()
			os.Remove(tmp)
		}
	}()
	h := sha256.New()
	h.Write(mem)
	var zero [PageSize]byte
	for off := 0; off < len(mem); {
		if isZero(mem[off:min(off+PageSize, len(mem))], zero[:]) {
			off += PageSize
			continue
		}
		end := off + PageSize
		for end < len(mem) && !isZero(mem[end:min(end+PageSize, len(mem))], zero[:]) {
			end += PageSize
		}
		end = min(end, len(mem))
		if _, err := f.WriteAt(mem[off:end], int64(off)); err != nil {
			return "", 0, fmt.Errorf("write memory file %s: %w", tmp, err)
		}
		dataPages += int64((end - off + PageSize - 1) / PageSize)
		off = end
	}
	if err := f.Truncate(int64(len(mem))); err != nil {
		return "", 0, fmt.Errorf("size memory file %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		return "", 0, fmt.Errorf("fsync memory file %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return "", 0, fmt.Errorf("close memory file %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return "", 0, fmt.Errorf("rename memory file: %w", err)
	}
	return hex.EncodeToString(h.Sum(nil)), dataPages, nil
}

func isZero(b, zero []byte) bool { return bytes.Equal(b, zero[:len(b)]) }

// WriteState writes the state file into dir atomically.
func WriteState(dir string, st *State) error {
	st.Version = StateVersion
	body, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return fmt.Errorf("encode snapshot state: %w", err)
	}
	sum := sha256.Sum256(body)
	var buf bytes.Buffer
	fmt.Fprintf(&buf, "%s%d sha256=%s\n", stateMagic, StateVersion, hex.EncodeToString(sum[:]))
	buf.Write(body)
	return writeFileAtomic(filepath.Join(dir, StateFile), buf.Bytes())
}

// ReadState reads and validates dir's state file and checks the memory file's
// size against it (a truncated file is refused). It does not hash the memory
// file: see VerifyMemory. Errors wrap ErrCorruptSnapshot.
func ReadState(dir string) (*State, error) {
	path := filepath.Join(dir, StateFile)
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: read state file: %w", ErrCorruptSnapshot, err)
	}
	header, body, ok := bytes.Cut(b, []byte("\n"))
	if !ok || !bytes.HasPrefix(header, []byte(stateMagic)) {
		return nil, fmt.Errorf("%w: %s is not a wasm snapshot state file", ErrCorruptSnapshot, path)
	}
	var version int
	var want string
	if _, err := fmt.Sscanf(string(header[len(stateMagic):]), "%d sha256=%s", &version, &want); err != nil {
		return nil, fmt.Errorf("%w: %s: bad header %q", ErrCorruptSnapshot, path, header)
	}
	if version != StateVersion {
		return nil, fmt.Errorf("%w: %s has version %d, this vhive reads version %d", ErrCorruptSnapshot, path, version, StateVersion)
	}
	sum := sha256.Sum256(body)
	if got := hex.EncodeToString(sum[:]); got != want {
		return nil, fmt.Errorf("%w: %s: checksum mismatch (header %s, content %s)", ErrCorruptSnapshot, path, want, got)
	}
	var st State
	dec := json.NewDecoder(bytes.NewReader(body))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&st); err != nil {
		return nil, fmt.Errorf("%w: decode %s: %w", ErrCorruptSnapshot, path, err)
	}
	if st.MemorySize != int64(st.MemoryPages)*WasmPageSize {
		return nil, fmt.Errorf("%w: %s: memory size %d does not match %d pages", ErrCorruptSnapshot, path, st.MemorySize, st.MemoryPages)
	}
	fi, err := os.Stat(filepath.Join(dir, MemoryFile))
	if err != nil {
		return nil, fmt.Errorf("%w: memory file: %w", ErrCorruptSnapshot, err)
	}
	if fi.Size() != st.MemorySize {
		return nil, fmt.Errorf("%w: memory file %s has %d bytes, the state says %d (truncated?)",
			ErrCorruptSnapshot, filepath.Join(dir, MemoryFile), fi.Size(), st.MemorySize)
	}
	return &st, nil
}

// CheckModule refuses a snapshot of another module (wraps ErrDigestMismatch).
func (st *State) CheckModule(info *ModuleInfo) error {
	if st.ModuleDigest != info.Digest {
		return fmt.Errorf("%w: snapshot of %s, module is %s", ErrDigestMismatch, st.ModuleDigest, info.Digest)
	}
	if len(st.Globals) != len(info.Globals) {
		return fmt.Errorf("%w: snapshot has %d globals, module %s has %d", ErrCorruptSnapshot, len(st.Globals), info.Digest, len(info.Globals))
	}
	for i, g := range st.Globals {
		if g.Export != info.Globals[i].Export || g.Type != info.Globals[i].Type {
			return fmt.Errorf("%w: global %d is %s %s in the snapshot, %s %s in the module",
				ErrCorruptSnapshot, i, g.Export, g.Type, info.Globals[i].Export, info.Globals[i].Type)
		}
	}
	return nil
}

// VerifyMemory hashes dir's memory file and compares it with the state.
func VerifyMemory(dir string, st *State) error {
	path := filepath.Join(dir, MemoryFile)
	f, err := os.Open(path)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrCorruptSnapshot, err)
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return fmt.Errorf("%w: read %s: %w", ErrCorruptSnapshot, path, err)
	}
	if n != st.MemorySize {
		return fmt.Errorf("%w: memory file %s has %d bytes, the state says %d", ErrCorruptSnapshot, path, n, st.MemorySize)
	}
	if got := hex.EncodeToString(h.Sum(nil)); !strings.EqualFold(got, st.MemorySHA256) {
		return fmt.Errorf("%w: memory file %s: checksum mismatch (state %s, content %s)", ErrCorruptSnapshot, path, st.MemorySHA256, got)
	}
	return nil
}
