package wasm

import (
	"bytes"
	"errors"
	"fmt"
	"io"

	"github.com/tetratelabs/wabin/leb128"
	wasmbin "github.com/tetratelabs/wabin/wasm"
)

// Limits Prepare enforces before it decodes a module. The decoder (wabin)
// allocates every vector from the count the module declares before it reads
// a single element, and expands each function's local declarations one
// local at a time: without these checks a module of 20 bytes declaring a
// vector of 2³²−1 exports, types or locals makes it allocate tens of
// gigabytes or run for minutes, and a daemon must never do either for a
// module it is given.
const (
	// MaxFunctionLocals bounds the locals one function declares (the limit
	// web engines enforce, e.g. V8's 50,000). The functions of the Go
	// modules measured (the test guest, helloworld) declare at most 17.
	MaxFunctionLocals = 50_000
	// MaxModuleLocals bounds the locals of all functions of a module
	// together: Go modules of 2.7 MB declare about 7,300.
	MaxModuleLocals = 1 << 23
)

// ErrModuleTooLarge is wrapped by Prepare when a module declares more
// locals than MaxFunctionLocals or MaxModuleLocals allow.
var ErrModuleTooLarge = errors.New("wasm module exceeds a limit")

// checkBounds walks the sections of module the way the decoder will and
// refuses, naming the section and the field, every count or length that
// does not fit in the bytes its section has left (every element of a vector
// takes at least one byte), and local declarations beyond the limits above.
// Decoding a module that passes therefore allocates in proportion to its
// size. What checkBounds does not need to look into (instructions, fixed-size
// fields) is left for the decoder to validate; a module it cannot parse is
// refused here as malformed, which the decoder would do too.
func checkBounds(module []byte) error {
	const headerSize = 8 // magic and version: the decoder checks them
	if len(module) < headerSize {
		return nil
	}
	b := newBoundsReader(module[headerSize:])
	var locals uint64
	for b.r.Len() > 0 {
		id, _ := b.r.ReadByte()
		name := wasmbin.SectionIDName(id)
		content, err := b.bytes("size")
		if err != nil {
			return fmt.Errorf("section %s: %w", name, err)
		}
		if err := newBoundsReader(content).section(id, &locals); err != nil {
			return fmt.Errorf("section %s: %w", name, err)
		}
	}
	return nil
}

// boundsReader reads the parts of one section (or of the whole module) that
// checkBounds needs.
type boundsReader struct {
	buf []byte
	r   *bytes.Reader
}

func newBoundsReader(buf []byte) *boundsReader {
	return &boundsReader{buf: buf, r: bytes.NewReader(buf)}
}

func (b *boundsReader) u32(what string) (uint32, error) {
	v, _, err := leb128.DecodeUint32(b.r)
	if err != nil {
		return 0, fmt.Errorf("%s: %v", what, err)
	}
	return v, nil
}

func (b *boundsReader) byte(what string) (byte, error) {
	v, err := b.r.ReadByte()
	if err != nil {
		return 0, fmt.Errorf("%s: truncated", what)
	}
	return v, nil
}

// count reads a vector length and refuses one larger than the bytes left.
func (b *boundsReader) count(what string) (uint32, error) {
	n, err := b.u32(what + " count")
	if err != nil {
		return 0, err
	}
	if int64(n) > int64(b.r.Len()) {
		return 0, fmt.Errorf("%s: %d declared with only %d bytes left", what, n, b.r.Len())
	}
	return n, nil
}

// bytes reads a length-prefixed byte vector (names, bodies, segments) and
// returns it without copying.
func (b *boundsReader) bytes(what string) ([]byte, error) {
	n, err := b.u32(what)
	if err != nil {
		return nil, err
	}
	if int64(n) > int64(b.r.Len()) {
		return nil, fmt.Errorf("%s: %d bytes declared with only %d bytes left", what, n, b.r.Len())
	}
	start := len(b.buf) - b.r.Len()
	_, _ = b.r.Seek(int64(n), io.SeekCurrent)
	return b.buf[start : start+int(n)], nil
}

func (b *boundsReader) skip(n int, what string) error {
	if n > b.r.Len() {
		return fmt.Errorf("%s: truncated", what)
	}
	_, _ = b.r.Seek(int64(n), io.SeekCurrent)
	return nil
}

func (b *boundsReader) section(id byte, locals *uint64) error {
	switch id {
	case wasmbin.SectionIDCustom:
		name, err := b.bytes("name")
		if err != nil {
			return err
		}
		if string(name) == "name" {
			return b.nameSection()
		}
	case wasmbin.SectionIDType:
		n, err := b.count("types")
		if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			if _, err := b.byte("type"); err != nil {
				return err
			}
			for _, what := range []string{"parameters", "results"} {
				k, err := b.count(fmt.Sprintf("type %d %s", i, what))
				if err != nil {
					return err
				}
				if err := b.skip(int(k), what); err != nil {
					return err
				}
			}
		}
	case wasmbin.SectionIDImport:
		n, err := b.count("imports")
		if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			if err := b.imp(i); err != nil {
				return err
			}
		}
	case wasmbin.SectionIDExport:
		n, err := b.count("exports")
		if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			if _, err := b.bytes(fmt.Sprintf("export %d name", i)); err != nil {
				return err
			}
			if _, err := b.byte("export kind"); err != nil {
				return err
			}
			if _, err := b.u32("export index"); err != nil {
				return err
			}
		}
	case wasmbin.SectionIDElement:
		n, err := b.count("element segments")
		if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			if err := b.element(i); err != nil {
				return err
			}
		}
	case wasmbin.SectionIDCode:
		n, err := b.count("function bodies")
		if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			body, err := b.bytes(fmt.Sprintf("function body %d", i))
			if err != nil {
				return err
			}
			if err := newBoundsReader(body).localDecls(i, locals); err != nil {
				return err
			}
		}
	case wasmbin.SectionIDData:
		n, err := b.count("data segments")
		if err != nil {
			return err
		}
		for i := uint32(0); i < n; i++ {
			if err := b.data(i); err != nil {
				return err
			}
		}
	case wasmbin.SectionIDFunction, wasmbin.SectionIDTable, wasmbin.SectionIDMemory, wasmbin.SectionIDGlobal:
		// Vectors of elements that hold no vector themselves: their count
		// must fit in the section.
		if _, err := b.count("entries"); err != nil {
			return err
		}
	}
	// Start and data count hold one index; other ids are the decoder's to
	// refuse.
	return nil
}

// localDecls checks the local declarations at the start of a function body.
func (b *boundsReader) localDecls(fn uint32, locals *uint64) error {
	n, err := b.count(fmt.Sprintf("function body %d local declarations", fn))
	if err != nil {
		return err
	}
	var sum uint64
	for i := uint32(0); i < n; i++ {
		k, err := b.u32(fmt.Sprintf("function body %d local count", fn))
		if err != nil {
			return err
		}
		if _, err := b.byte("local type"); err != nil {
			return err
		}
		sum += uint64(k)
		if sum > MaxFunctionLocals {
			return fmt.Errorf("%w: function body %d declares more than %d locals", ErrModuleTooLarge, fn, MaxFunctionLocals)
		}
	}
	*locals += sum
	if *locals > MaxModuleLocals {
		return fmt.Errorf("%w: the functions declare more than %d locals together (at function body %d)", ErrModuleTooLarge, MaxModuleLocals, fn)
	}
	return nil
}

func (b *boundsReader) imp(i uint32) error {
	what := fmt.Sprintf("import %d", i)
	if _, err := b.bytes(what + " module"); err != nil {
		return err
	}
	if _, err := b.bytes(what + " name"); err != nil {
		return err
	}
	kind, err := b.byte(what + " kind")
	if err != nil {
		return err
	}
	switch kind {
	case wasmbin.ExternTypeFunc:
		_, err = b.u32(what + " type")
	case wasmbin.ExternTypeTable:
		if _, err = b.byte(what + " table type"); err == nil {
			err = b.limits(what)
		}
	case wasmbin.ExternTypeMemory:
		err = b.limits(what)
	case wasmbin.ExternTypeGlobal:
		err = b.skip(2, what+" global type")
	default:
		err = fmt.Errorf("%s: kind 0x%x is not a function, table, memory or global", what, kind)
	}
	return err
}

func (b *boundsReader) limits(what string) error {
	flag, err := b.byte(what + " limits")
	if err != nil {
		return err
	}
	if _, err := b.u32(what + " minimum"); err != nil {
		return err
	}
	if flag == 1 {
		_, err = b.u32(what + " maximum")
	}
	return err
}

// constExpr skips a constant expression (one instruction and end), as the
// decoder reads it.
func (b *boundsReader) constExpr(what string) error {
	op, err := b.byte(what)
	if err != nil {
		return err
	}
	switch op {
	case wasmbin.OpcodeI32Const:
		_, _, err = leb128.DecodeInt32(b.r)
	case wasmbin.OpcodeI64Const:
		_, _, err = leb128.DecodeInt64(b.r)
	case wasmbin.OpcodeF32Const:
		err = b.skip(4, what)
	case wasmbin.OpcodeF64Const:
		err = b.skip(8, what)
	case wasmbin.OpcodeGlobalGet, wasmbin.OpcodeRefFunc:
		_, err = b.u32(what)
	case wasmbin.OpcodeRefNull:
		err = b.skip(1, what)
	case wasmbin.OpcodeVecPrefix:
		err = b.skip(1+16, what)
	default:
		return fmt.Errorf("%s: instruction 0x%x is not a constant", what, op)
	}
	if err != nil {
		return fmt.Errorf("%s: %v", what, err)
	}
	_, err = b.byte(what + " end")
	return err
}

func (b *boundsReader) element(i uint32) error {
	what := fmt.Sprintf("element segment %d", i)
	prefix, err := b.u32(what + " prefix")
	if err != nil {
		return err
	}
	if prefix > 7 {
		return fmt.Errorf("%s: prefix %d is not a segment kind", what, prefix)
	}
	if prefix == 2 || prefix == 6 { // table index
		if _, err := b.u32(what + " table"); err != nil {
			return err
		}
	}
	if prefix&1 == 0 { // active: offset
		if err := b.constExpr(what + " offset"); err != nil {
			return err
		}
	}
	if prefix&3 != 0 { // element kind or reference type
		if _, err := b.byte(what + " type"); err != nil {
			return err
		}
	}
	n, err := b.count(what + " elements")
	if err != nil {
		return err
	}
	for j := uint32(0); j < n; j++ {
		if prefix&4 == 0 {
			_, err = b.u32(what + " function index")
		} else {
			err = b.constExpr(what + " element")
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (b *boundsReader) data(i uint32) error {
	what := fmt.Sprintf("data segment %d", i)
	prefix, err := b.u32(what + " prefix")
	if err != nil {
		return err
	}
	switch prefix {
	case 0, 2:
		if prefix == 2 {
			if _, err := b.u32(what + " memory"); err != nil {
				return err
			}
		}
		if err := b.constExpr(what + " offset"); err != nil {
			return err
		}
	case 1:
	default:
		return fmt.Errorf("%s: prefix %d is not a segment kind", what, prefix)
	}
	_, err = b.bytes(what + " content")
	return err
}

// nameSection checks the "name" custom section's subsections: module name,
// function names and local names (others are skipped by the decoder).
func (b *boundsReader) nameSection() error {
	for b.r.Len() > 0 {
		id, _ := b.r.ReadByte()
		content, err := b.bytes(fmt.Sprintf("name subsection %d size", id))
		if err != nil {
			return err
		}
		s := newBoundsReader(content)
		switch id {
		case 0:
			_, err = s.bytes("module name")
		case 1:
			err = s.nameMap("function names")
		case 2:
			var n uint32
			if n, err = s.count("local name maps"); err != nil {
				return err
			}
			for i := uint32(0); i < n && err == nil; i++ {
				if _, err = s.u32("function index"); err == nil {
					err = s.nameMap(fmt.Sprintf("local names %d", i))
				}
			}
		}
		if err == nil && s.r.Len() > 0 && id <= 2 {
			// The decoder reads subsections back to back; bytes left over
			// would be read as another subsection.
			err = fmt.Errorf("name subsection %d: %d bytes after its content", id, s.r.Len())
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (b *boundsReader) nameMap(what string) error {
	n, err := b.count(what)
	if err != nil {
		return err
	}
	for i := uint32(0); i < n; i++ {
		if _, err := b.u32(what + " index"); err != nil {
			return err
		}
		if _, err := b.bytes(what + " name"); err != nil {
			return err
		}
	}
	return nil
}
