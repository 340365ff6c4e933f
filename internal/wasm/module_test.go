package wasm_test

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"

	"github.com/tetratelabs/wabin/binary"
	"github.com/tetratelabs/wabin/leb128"
	wasmbin "github.com/tetratelabs/wabin/wasm"

	"vhive.dev/vhive/internal/wasm"
	"vhive.dev/vhive/internal/wasm/wasmtest"
)

func TestPrepareGoGuest(t *testing.T) {
	b, err := os.ReadFile(wasmtest.GuestModule(t))
	if err != nil {
		t.Fatal(err)
	}
	p, err := wasm.Prepare(b)
	if err != nil {
		t.Fatalf("Prepare: %v", err)
	}
	if p.Info.Digest != wasm.Digest(b) || !strings.HasPrefix(p.Info.Digest, "sha256:") {
		t.Errorf("digest %q", p.Info.Digest)
	}
	boot, err := binary.DecodeModule(p.Boot, wasmbin.CoreFeaturesV2)
	if err != nil {
		t.Fatalf("decode boot module: %v", err)
	}
	restore, err := binary.DecodeModule(p.Restore, wasmbin.CoreFeaturesV2)
	if err != nil {
		t.Fatalf("decode restore module: %v", err)
	}
	if len(boot.GlobalSection) != 8 || len(p.Info.Globals) != 8 {
		t.Fatalf("Go modules have 8 globals; got %d, info %d", len(boot.GlobalSection), len(p.Info.Globals))
	}
	exported := map[string]bool{}
	for _, e := range restore.ExportSection {
		if e.Type == wasmbin.ExternTypeGlobal {
			exported[e.Name] = true
		}
	}
	for _, g := range p.Info.Globals {
		if !exported[g.Export] {
			t.Errorf("global %d not exported as %q", g.Index, g.Export)
		}
	}
	if len(boot.DataSection) == 0 {
		t.Error("boot module lost its data section")
	}
	if len(restore.DataSection) != 0 || restore.StartSection != nil || restore.DataCountSection != nil {
		t.Errorf("restore module keeps data (%d segments) / start / data count", len(restore.DataSection))
	}
}

// module builds a minimal module with one memory and one function body.
func module(body []byte, edit func(m *wasmbin.Module)) []byte {
	m := &wasmbin.Module{
		TypeSection:     []*wasmbin.FunctionType{{}},
		FunctionSection: []wasmbin.Index{0},
		CodeSection:     []*wasmbin.Code{{Body: body}},
		MemorySection:   &wasmbin.Memory{Min: 1},
		TableSection:    []*wasmbin.Table{{Min: 1, Type: wasmbin.RefTypeFuncref}},
	}
	if edit != nil {
		edit(m)
	}
	return binary.EncodeModule(m)
}

// unwritableModules are modules Prepare accepted but could not write back:
// the encoder panicked on declarative segments and on ref.null elements,
// wrote a segment of table 1 as another kind of segment, and an export named
// vhive_global_0 made the prepared modules' exports collide.
func unwritableModules() []struct {
	name, want string
	mod        []byte
} {
	// One function of type () -> (), one table of type tab, one memory,
	// the element section elem, and the function's body.
	withElems := func(tab byte, tables int, elem ...[]byte) []byte {
		tbl := [][]byte{u32(uint32(tables))}
		for i := 0; i < tables; i++ {
			tbl = append(tbl, []byte{tab, 0, 1})
		}
		return rawModule(rawSection(1, u32(1), []byte{0x60, 0, 0}), rawSection(3, u32(1), u32(0)),
			rawSection(4, tbl...), rawSection(5, u32(1), []byte{0, 1}),
			rawSection(9, append([][]byte{u32(1)}, elem...)...), rawSection(10, u32(1), u32(2), []byte{0, 0x0B}))
	}
	i32Const0 := []byte{0x41, 0, 0x0B}
	return []struct {
		name, want string
		mod        []byte
	}{
		{"declarative elements", "declarative", withElems(0x70, 1, u32(3), []byte{0}, u32(1), u32(0))},
		{"ref.null element", "ref.null", withElems(0x70, 1, u32(4), i32Const0, u32(1), []byte{0xD0, 0x70, 0x0B})},
		{"elements of table 1", "table 1", withElems(0x70, 2, u32(2), u32(1), i32Const0, []byte{0}, u32(1), u32(0))},
		{"externref elements", "externref table 0", withElems(0x6F, 1, u32(6), u32(0), i32Const0, []byte{0x6F}, u32(1), []byte{0xD0, 0x6F, 0x0B})},
		{"export named like a global's", `export "vhive_global_0"`, module([]byte{wasmbin.OpcodeEnd}, func(m *wasmbin.Module) {
			m.GlobalSection = []*wasmbin.Global{{Type: &wasmbin.GlobalType{ValType: wasmbin.ValueTypeI32},
				Init: &wasmbin.ConstantExpression{Opcode: wasmbin.OpcodeI32Const, Data: []byte{0}}}}
			m.ExportSection = []*wasmbin.Export{{Type: wasmbin.ExternTypeFunc, Name: wasm.GlobalExportPrefix + "0"}}
		})},
	}
}

func TestPrepareRefuses(t *testing.T) {
	end := []byte{wasmbin.OpcodeEnd}
	cases := []struct {
		name, want string
		mod        []byte
	}{
		{"imported memory", "imports memory", module(end, func(m *wasmbin.Module) {
			m.MemorySection = nil
			m.ImportSection = []*wasmbin.Import{{Type: wasmbin.ExternTypeMemory, Module: "env", Name: "mem", DescMem: &wasmbin.Memory{Min: 1}}}
		})},
		{"no memory", "no linear memory", module(end, func(m *wasmbin.Module) { m.MemorySection = nil })},
		// i32.const 0, ref.null func, table.set 0
		{"table.set", "table.set", module([]byte{0x41, 0, 0xD0, 0x70, 0x26, 0, 0x0B}, nil)},
		// ref.null func, i32.const 1, table.grow 0, drop
		{"table.grow", "table-changing", module([]byte{0xD0, 0x70, 0x41, 1, 0xFC, 15, 0, 0x1A, 0x0B}, nil)},
		// i32.const 0 ×3, memory.init 0 0
		{"memory.init", "memory.init", module([]byte{0x41, 0, 0x41, 0, 0x41, 0, 0xFC, 8, 0, 0, 0x0B}, nil)},
		// v128.const (SIMD)
		{"simd", "not understood", module([]byte{0xFD, 12, 0x0B}, nil)},
	}
	cases = append(cases, unwritableModules()...)
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, err := wasm.Prepare(c.mod)
			if !errors.Is(err, wasm.ErrUnsupportedModule) || !strings.Contains(err.Error(), c.want) {
				t.Fatalf("Prepare = %v, want ErrUnsupportedModule mentioning %q", err, c.want)
			}
		})
	}
	// The same module without the offending code is accepted.
	if _, err := wasm.Prepare(module([]byte{0x41, 0, 0x1A, 0x0B}, nil)); err != nil {
		t.Fatalf("Prepare of a plain module: %v", err)
	}
	if _, err := wasm.Prepare([]byte("not wasm")); err == nil || !strings.Contains(err.Error(), "decode wasm module") {
		t.Fatalf("Prepare of garbage = %v", err)
	}
}

// rawSection encodes a section with the given id and content.
func rawSection(id byte, content ...[]byte) []byte {
	var c []byte
	for _, x := range content {
		c = append(c, x...)
	}
	return append(append([]byte{id}, leb128.EncodeUint32(uint32(len(c)))...), c...)
}

// rawModule is the wasm header followed by sections.
func rawModule(sections ...[]byte) []byte {
	b := []byte{0, 'a', 's', 'm', 1, 0, 0, 0}
	for _, s := range sections {
		b = append(b, s...)
	}
	return b
}

func u32(n uint32) []byte { return leb128.EncodeUint32(n) }

// hostileModules are modules of a few bytes whose declared counts or lengths
// made the decoder allocate in proportion to the count (n) rather than to
// the module, or expand locals one by one. FuzzPrepare's worker died of one
// such module; testdata/fuzz/FuzzPrepare holds them with n = 2³²−1.
func hostileModules(n uint32) []struct {
	name, want string
	mod        []byte
} {
	name := []byte("name")
	localsBody := append(append(u32(1), u32(n)...), 0x7F, 0x0B) // one declaration of n i32 locals
	var manyLocals [][]byte                                     // 200 functions of 49,999 locals: more than MaxModuleLocals together
	body := append(append(u32(1), u32(49_999)...), 0x7F, 0x0B)
	manyLocals = append(manyLocals, u32(200))
	for i := 0; i < 200; i++ {
		manyLocals = append(manyLocals, u32(uint32(len(body))), body)
	}
	return []struct {
		name, want string
		mod        []byte
	}{
		{"type count", "types", rawModule(rawSection(1, u32(n)))},
		{"type parameters", "type 0 parameters", rawModule(rawSection(1, u32(1), []byte{0x60}, u32(n)))},
		{"import name", "import 0 module", rawModule(rawSection(2, u32(1), u32(n)))},
		{"function count", "section function", rawModule(rawSection(3, u32(n)))},
		{"table count", "section table", rawModule(rawSection(4, u32(n)))},
		{"global count", "section global", rawModule(rawSection(6, u32(n)))},
		{"export count", "exports", rawModule(rawSection(7, u32(n)))},
		{"export name", "export 0 name", rawModule(rawSection(7, u32(1), u32(n)))},
		{"element count", "element segments", rawModule(rawSection(9, u32(n)))},
		{"element indexes", "element segment 0 elements", rawModule(rawSection(9, u32(1), u32(0), []byte{0x41, 0, 0x0B}, u32(n)))},
		{"code count", "function bodies", rawModule(rawSection(10, u32(n)))},
		{"code size", "function body 0", rawModule(rawSection(10, u32(1), u32(n), u32(0)))},
		{"function locals", "more than 50000 locals", rawModule(rawSection(10, u32(1), u32(uint32(len(localsBody))), localsBody))},
		{"module locals", "locals together", rawModule(rawSection(10, manyLocals...))},
		{"data count", "data segments", rawModule(rawSection(11, u32(n)))},
		{"data content", "data segment 0 content", rawModule(rawSection(11, u32(1), u32(1), u32(n)))},
		{"custom section name", "section custom: name", rawModule(rawSection(0, u32(n)))},
		{"custom section size", "section custom: size", rawModule(append(append([]byte{0}, u32(n)...), 1, 'x'))},
		{"function names", "function names", rawModule(rawSection(0, u32(4), name, rawSection(1, u32(n))))},
		{"local names", "local names 0", rawModule(rawSection(0, u32(4), name, rawSection(2, u32(1), u32(0), u32(n))))},
	}
}

// TestPrepareHostileCounts: a module declaring huge counts is refused with
// an error naming the field, having allocated about as much as the module's
// size — before the bounds check each allocated 16 MiB to 1 GiB here (n =
// 2²⁴), and FuzzPrepare's worker was killed by one with n = 2³²−1.
func TestPrepareHostileCounts(t *testing.T) {
	const n = 1 << 24
	const maxAlloc = 1 << 20
	for _, c := range hostileModules(n) {
		t.Run(c.name, func(t *testing.T) {
			var err error
			var before, after runtime.MemStats
			runtime.ReadMemStats(&before)
			_, err = wasm.Prepare(c.mod)
			runtime.ReadMemStats(&after)
			if err == nil || !strings.Contains(err.Error(), c.want) {
				t.Errorf("Prepare = %v, want an error naming %q", err, c.want)
			}
			if a := after.TotalAlloc - before.TotalAlloc; a > maxAlloc {
				t.Errorf("Prepare of a %d-byte module allocated %d bytes (at most %d allowed)", len(c.mod), a, maxAlloc)
			}
		})
	}
	for _, c := range hostileModules(n) {
		if _, err := wasm.Prepare(c.mod); strings.HasSuffix(c.name, " locals") && !errors.Is(err, wasm.ErrModuleTooLarge) {
			t.Errorf("%s: Prepare = %v, want ErrModuleTooLarge", c.name, err)
		}
	}
}

func FuzzPrepare(f *testing.F) {
	f.Add(module([]byte{0x41, 0, 0x1A, 0x0B}, nil))
	f.Add(module([]byte{0x02, 0x40, 0x0E, 2, 0, 0, 0, 0x0B, 0x0B}, nil))
	f.Fuzz(func(t *testing.T, b []byte) {
		p, err := wasm.Prepare(b)
		if err != nil {
			return
		}
		if _, err := binary.DecodeModule(p.Restore, wasmbin.CoreFeaturesV2); err != nil {
			t.Fatalf("restore module of an accepted module does not decode: %v", err)
		}
	})
}

// FuzzReadState: any state file content is either refused with
// ErrCorruptSnapshot or yields a state consistent with the memory file.
func FuzzReadState(f *testing.F) {
	dir := f.TempDir()
	if _, _, err := wasm.WriteMemoryFile(filepath.Join(dir, wasm.MemoryFile), make([]byte, 2*wasm.WasmPageSize)); err != nil {
		f.Fatal(err)
	}
	if err := wasm.WriteState(dir, &wasm.State{ModuleDigest: "sha256:00", MemoryPages: 2, MemorySize: 2 * wasm.WasmPageSize,
		Globals: []wasm.GlobalValue{{Export: "vhive_global_0", Type: "i32", Value: 7}}}); err != nil {
		f.Fatal(err)
	}
	good, err := os.ReadFile(filepath.Join(dir, wasm.StateFile))
	if err != nil {
		f.Fatal(err)
	}
	f.Add(good)
	f.Add([]byte("vhive-wasm-state/1 sha256=00\n{}"))
	f.Fuzz(func(t *testing.T, b []byte) {
		if err := os.WriteFile(filepath.Join(dir, wasm.StateFile), b, 0o600); err != nil {
			t.Fatal(err)
		}
		st, err := wasm.ReadState(dir)
		if err != nil {
			if !errors.Is(err, wasm.ErrCorruptSnapshot) {
				t.Fatalf("error not classified as corrupt: %v", err)
			}
			return
		}
		if st.MemorySize != 2*wasm.WasmPageSize || st.MemoryPages != 2 || st.Version != wasm.StateVersion {
			t.Fatalf("accepted inconsistent state %+v", st)
		}
	})
}

func TestSparseMemoryFile(t *testing.T) {
	mem := make([]byte, 64*wasm.PageSize)
	mem[5*wasm.PageSize+3] = 1
	mem[6*wasm.PageSize] = 2
	mem[40*wasm.PageSize+4095] = 3
	path := filepath.Join(t.TempDir(), "mem")
	sum, pages, err := wasm.WriteMemoryFile(path, mem)
	if err != nil {
		t.Fatal(err)
	}
	if pages != 3 {
		t.Errorf("data pages = %d, want 3", pages)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Size != int64(len(mem)) || st.Blocks*512 > 8*wasm.PageSize {
		t.Errorf("memory file: size %d, %d bytes allocated; want %d bytes with holes", st.Size, st.Blocks*512, len(mem))
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, mem) {
		t.Fatalf("memory file content differs (%v)", err)
	}
	if len(sum) != 64 {
		t.Errorf("checksum %q", sum)
	}
}

func TestRuntimeVersion(t *testing.T) {
	// Test binaries carry no dependency list, so the wazero version reads
	// "unknown" here; the vhive binary names it ("wazero v1.12.0, ...").
	if v := wasm.RuntimeVersion(); !strings.HasPrefix(v, "wazero ") || !strings.HasSuffix(v, ", wasm state 1") {
		t.Fatalf("RuntimeVersion() = %q", v)
	}
}
