package wasm

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/tetratelabs/wabin/binary"
	wasmbin "github.com/tetratelabs/wabin/wasm"
)

// GlobalExportPrefix names the exports Prepare adds: global i is exported as
// GlobalExportPrefix+i (as Wizer does), so that a snapshot can read and a
// restore can set every global, including the ones the module keeps private
// (Go's SP, g, CTXT, RET0–3, PAUSE).
const GlobalExportPrefix = "vhive_global_"

// ErrUnsupportedModule is wrapped by Prepare when a module keeps state that a
// snapshot does not save (imported memory or globals, mutable tables, passive
// segments, shared memory, ...).
var ErrUnsupportedModule = errors.New("wasm module not supported for snapshots")

// Global describes one defined global of a prepared module.
type Global struct {
	Index   uint32 `json:"index"`
	Export  string `json:"export"`
	Type    string `json:"type"` // i32, i64, f32, f64
	Mutable bool   `json:"mutable"`
}

// ModuleInfo is what Prepare learnt about a module; it is stored next to the
// prepared modules as module.json.
type ModuleInfo struct {
	// Digest is "sha256:<hex>" of the original module bytes.
	Digest  string   `json:"digest"`
	Globals []Global `json:"globals"`
	// MinPages is the declared initial memory size in 64 KiB pages.
	MinPages uint32 `json:"min_pages"`
	// MaxPages is the declared maximum (0: none declared).
	MaxPages uint32   `json:"max_pages"`
	Exports  []string `json:"exports"`
}

// Prepared holds the two modules derived from one original module.
type Prepared struct {
	Info ModuleInfo
	// Boot is the original module with every defined global exported. Boots
	// instantiate it so that boot and restore share global indices.
	Boot []byte
	// Restore is Boot without data, data-count and start sections:
	// instantiating it leaves linear memory untouched for the restored image.
	Restore []byte
}

// Digest returns "sha256:<hex>" of b.
func Digest(b []byte) string {
	s := sha256.Sum256(b)
	return "sha256:" + hex.EncodeToString(s[:])
}

// Prepare derives the boot and restore modules from module bytes. It refuses
// (wrapping ErrUnsupportedModule) modules whose state a snapshot would not
// capture, and (wrapping ErrModuleTooLarge) modules beyond the limits in
// bounds.go; every count and length in the module is checked against its
// size before it is decoded.
func Prepare(module []byte) (*Prepared, error) {
	if err := checkBounds(module); err != nil {
		return nil, fmt.Errorf("decode wasm module: %w", err)
	}
	m, err := binary.DecodeModule(module, wasmbin.CoreFeaturesV2)
	if err != nil {
		return nil, fmt.Errorf("decode wasm module: %w", err)
	}
	if err := checkSnapshotable(m); err != nil {
		return nil, err
	}
	info := ModuleInfo{Digest: Digest(module)}
	if m.MemorySection != nil {
		info.MinPages = m.MemorySection.Min
		if m.MemorySection.IsMaxEncoded {
			info.MaxPages = m.MemorySection.Max
		}
	}
	for _, e := range m.ExportSection {
		info.Exports = append(info.Exports, e.Name)
	}
	for i, g := range m.GlobalSection {
		name := fmt.Sprintf("%s%d", GlobalExportPrefix, i)
		typ, err := valueTypeName(g.Type.ValType)
		if err != nil {
			return nil, fmt.Errorf("%w: global %d: %v", ErrUnsupportedModule, i, err)
		}
		info.Globals = append(info.Globals, Global{Index: uint32(i), Export: name, Type: typ, Mutable: g.Type.Mutable})
		m.ExportSection = append(m.ExportSection, &wasmbin.Export{Type: wasmbin.ExternTypeGlobal, Name: name, Index: uint32(i)})
	}
	p := &Prepared{Info: info, Boot: binary.EncodeModule(m)}
	m.DataSection = nil
	m.DataCountSection = nil
	m.StartSection = nil
	p.Restore = binary.EncodeModule(m)
	return p, nil
}

func valueTypeName(t wasmbin.ValueType) (string, error) {
	switch t {
	case wasmbin.ValueTypeI32:
		return "i32", nil
	case wasmbin.ValueTypeI64:
		return "i64", nil
	case wasmbin.ValueTypeF32:
		return "f32", nil
	case wasmbin.ValueTypeF64:
		return "f64", nil
	}
	return "", fmt.Errorf("value type 0x%x cannot be saved", t)
}

// checkSnapshotable refuses modules with state outside linear memory and
// globals: imports other than functions, more than one memory, passive data
// or element segments, and code that changes a table or uses data segments
// at run time. It also refuses what Prepare could not write back into a
// valid module: element segments other than active ones of function indices
// into table 0, and exports named like the ones Prepare adds.
func checkSnapshotable(m *wasmbin.Module) error {
	for _, im := range m.ImportSection {
		if im.Type != wasmbin.ExternTypeFunc {
			return fmt.Errorf("%w: imports %s %q.%q (only function imports are supported)",
				ErrUnsupportedModule, wasmbin.ExternTypeName(im.Type), im.Module, im.Name)
		}
	}
	if m.MemorySection == nil {
		return fmt.Errorf("%w: defines no linear memory", ErrUnsupportedModule)
	}
	for i, d := range m.DataSection {
		if d.OffsetExpression == nil {
			return fmt.Errorf("%w: data segment %d is passive", ErrUnsupportedModule, i)
		}
	}
	for i, e := range m.ElementSection {
		if e.Mode == wasmbin.ElementModePassive {
			return fmt.Errorf("%w: element segment %d is passive", ErrUnsupportedModule, i)
		}
		// The encoder that writes the prepared modules (wabin) writes only
		// active segments of function indices into table 0; it panics on
		// the others or writes a different module.
		if e.Mode != wasmbin.ElementModeActive {
			return fmt.Errorf("%w: element segment %d is declarative (only active segments are supported)", ErrUnsupportedModule, i)
		}
		if e.TableIndex != 0 || e.Type != wasmbin.RefTypeFuncref {
			return fmt.Errorf("%w: element segment %d initializes %s table %d (only funcref table 0 is supported)",
				ErrUnsupportedModule, i, wasmbin.RefTypeName(e.Type), e.TableIndex)
		}
		for j, idx := range e.Init {
			if idx == nil {
				return fmt.Errorf("%w: element segment %d: element %d is ref.null (only function indices are supported)", ErrUnsupportedModule, i, j)
			}
		}
	}
	for _, e := range m.ExportSection {
		if strings.HasPrefix(e.Name, GlobalExportPrefix) {
			return fmt.Errorf("%w: export %q uses the prefix %q of the exports Prepare adds", ErrUnsupportedModule, e.Name, GlobalExportPrefix)
		}
	}
	for i, c := range m.CodeSection {
		fn := uint32(i) + uint32(m.ImportFuncCount())
		if err := scanCode(c.Body); err != nil {
			return fmt.Errorf("%w: function %d: %v", ErrUnsupportedModule, fn, err)
		}
	}
	return nil
}

// PrepareCached prepares the module at modulePath once per digest: the
// results live in cacheDir/modules/<hex digest>/{boot.wasm,restore.wasm,
// module.json} and are reused on later calls. It returns the directory.
func PrepareCached(cacheDir, modulePath string) (string, *ModuleInfo, error) {
	b, err := os.ReadFile(modulePath)
	if err != nil {
		return "", nil, fmt.Errorf("read wasm module: %w", err)
	}
	digest := Digest(b)
	dir := filepath.Join(cacheDir, "modules", digest[len("sha256:"):])
	if info, err := LoadModuleInfo(dir); err == nil && info.Digest == digest {
		return dir, info, nil
	}
	p, err := Prepare(b)
	if err != nil {
		return "", nil, fmt.Errorf("prepare wasm module %s: %w", modulePath, err)
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", nil, fmt.Errorf("create module cache dir: %w", err)
	}
	info, err := json.MarshalIndent(p.Info, "", "  ")
	if err != nil {
		return "", nil, fmt.Errorf("encode module info: %w", err)
	}
	// module.json last: its presence marks a complete entry.
	for _, f := range []struct {
		name string
		data []byte
	}{{BootModuleFile, p.Boot}, {RestoreModuleFile, p.Restore}, {ModuleInfoFile, info}} {
		if err := writeFileAtomic(filepath.Join(dir, f.name), f.data); err != nil {
			return "", nil, err
		}
	}
	return dir, &p.Info, nil
}

// Names of the files in a prepared module directory.
const (
	BootModuleFile    = "boot.wasm"
	RestoreModuleFile = "restore.wasm"
	ModuleInfoFile    = "module.json"
)

// LoadModuleInfo reads module.json from a prepared module directory.
func LoadModuleInfo(dir string) (*ModuleInfo, error) {
	b, err := os.ReadFile(filepath.Join(dir, ModuleInfoFile))
	if err != nil {
		return nil, fmt.Errorf("read prepared module info: %w", err)
	}
	var info ModuleInfo
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&info); err != nil {
		return nil, fmt.Errorf("decode %s: %w", filepath.Join(dir, ModuleInfoFile), err)
	}
	return &info, nil
}

// writeFileAtomic writes data to path via a temporary file, fsync and rename,
// then fsyncs the directory.
func writeFileAtomic(path string, data []byte) error {
	f, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return fmt.Errorf("create temporary file for %s: %w", path, err)
	}
	tmp := f.Name()
	defer os.Remove(tmp) // no-op after the rename
	if _, err := f.Write(data); err != nil {
		f.Close()
		return fmt.Errorf("write %s: %w", tmp, err)
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return fmt.Errorf("fsync %s: %w", tmp, err)
	}
	if err := f.Close(); err != nil {
		return fmt.Errorf("close %s: %w", tmp, err)
	}
	if err := os.Rename(tmp, path); err != nil {
		return fmt.Errorf("rename %s: %w", tmp, err)
	}
	return syncDir(filepath.Dir(path))
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return fmt.Errorf("open directory %s: %w", dir, err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		return fmt.Errorf("fsync directory %s: %w", dir, err)
	}
	return nil
}
