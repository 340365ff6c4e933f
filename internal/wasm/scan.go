package wasm

import (
	"bytes"
	"fmt"

	"github.com/tetratelabs/wabin/leb128"
)

// scanCode walks one function body and refuses instructions whose effects a
// snapshot would not capture: table mutation (table.set/grow/fill/copy/init,
// elem.drop), data-segment use (memory.init, data.drop: the restore module
// has no data section), atomics (shared memory) and exception handling. An
// instruction it does not know is refused too, naming its opcode, rather
// than guessed at.
func scanCode(body []byte) error {
	r := bytes.NewReader(body)
	u32 := func() error { _, _, err := leb128.DecodeUint32(r); return err }
	skip := func(n int64) error {
		if int64(r.Len()) < n {
			return fmt.Errorf("truncated immediate")
		}
		_, err := r.Seek(n, 1)
		return err
	}
	for r.Len() > 0 {
		pos := int(r.Size()) - r.Len()
		op, _ := r.ReadByte()
		var err error
		switch {
		case op <= 0x01, op == 0x05, op == 0x0B, op == 0x0F, op == 0x1A, op == 0x1B,
			op >= 0x45 && op <= 0xC4, op == 0xD1:
			// no immediates
		case op >= 0x02 && op <= 0x04: // block, loop, if: blocktype
			var b byte
			if b, err = r.ReadByte(); err == nil && b != 0x40 && !isValType(b) {
				_ = r.UnreadByte()
				_, _, err = leb128.DecodeInt33AsInt64(r)
			}
		case op == 0x0C, op == 0x0D, op == 0x10, op == 0xD2,
			op >= 0x20 && op <= 0x25: // br, br_if, call, ref.func, locals, globals, table.get
			err = u32()
		case op == 0x0E: // br_table
			var n uint32
			if n, _, err = leb128.DecodeUint32(r); err == nil {
				for i := uint32(0); i <= n && err == nil; i++ {
					err = u32()
				}
			}
		case op == 0x11: // call_indirect
			if err = u32(); err == nil {
				err = u32()
			}
		case op == 0x1C: // select t*
			var n uint32
			if n, _, err = leb128.DecodeUint32(r); err == nil {
				err = skip(int64(n))
			}
		case op >= 0x28 && op <= 0x3E: // loads, stores: memarg
			if err = u32(); err == nil {
				err = u32()
			}
		case op == 0x3F, op == 0x40, op == 0xD0: // memory.size, memory.grow, ref.null
			err = skip(1)
		case op == 0x41:
			_, _, err = leb128.DecodeInt32(r)
		case op == 0x42:
			_, _, err = leb128.DecodeInt64(r)
		case op == 0x43:
			err = skip(4)
		case op == 0x44:
			err = skip(8)
		case op == 0x26:
			return fmt.Errorf("table.set at offset %d: tables are not saved in snapshots", pos)
		case op == 0xFC:
			var sub uint32
			if sub, _, err = leb128.DecodeUint32(r); err != nil {
				break
			}
			switch {
			case sub <= 7: // saturating truncations
			case sub == 8 || sub == 9:
				return fmt.Errorf("memory.init/data.drop at offset %d: data segments are not kept after a restore", pos)
			case sub == 10:
				err = skip(2)
			case sub == 11:
				err = skip(1)
			case sub == 16: // table.size
				err = u32()
			default: // 12 table.init, 13 elem.drop, 14 table.copy, 15 table.grow, 17 table.fill
				return fmt.Errorf("table-changing instruction 0xFC %d at offset %d: tables are not saved in snapshots", sub, pos)
			}
		default:
			return fmt.Errorf("instruction 0x%02X at offset %d is not understood by the snapshot checker (SIMD, atomics, exceptions and tail calls are not supported)", op, pos)
		}
		if err != nil {
			return fmt.Errorf("decode instruction 0x%02X at offset %d: %v", op, pos, err)
		}
	}
	return nil
}

func isValType(b byte) bool {
	switch b {
	case 0x7F, 0x7E, 0x7D, 0x7C, 0x7B, 0x70, 0x6F:
		return true
	}
	return false
}
