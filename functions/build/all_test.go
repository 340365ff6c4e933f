package build

import (
	"bytes"
	"context"
	"debug/elf"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
)

// recordPrefix is what each function answers to "record" (or, for
// helloworld, "Hello, record!").
var recordPrefix = map[string]string{
	"helloworld":  "Hello, record!",
	"aes":         "aes-ctr set=1 bytes=16384 sha256=",
	"fibonacci":   "fib(10000) = 336447648764317832666216120051075433103021484606800639065647699746800814421666623681555955136337340255820653",
	"json-serdes": "json-serdes set=1 records=100 bytes=",
	"counter":     "count=1 checksum=",
	"lookup":      "lookup subset=record chunks=924/1536 touched_mib=28.9 score=",
	"heavyinit":   "heavyinit heap_mib=8 rounds=1 init_ms=",
	// The Go twins of the Python suite's functions; the same answer on
	// Linux and wasm.
	"image-rotate": "image-rotate set=1 rotated 1024x768 by 90/180/270, 513397 JPEG bytes, pixels sha256=8effaaf9e1543230",
	"chameleon":    "chameleon set=1 rendered 100x20 table, 63302 bytes, sha256=b38b6a3e6e19d118",
	"lr-serving":   "lr-serving set=1 reviews=200 positive=99 negative=101 scores=70535ea4bf1b081c",
}

// TestAllFunctions builds every example function for both targets: the Linux
// binary must be a static ELF, and the wasm reactor must answer "record"
// through the sdk ABI under wazero.
func TestAllFunctions(t *testing.T) {
	if len(recordPrefix) != len(Names()) {
		t.Fatalf("recordPrefix covers %d functions, Names has %d", len(recordPrefix), len(Names()))
	}
	ctx := context.Background()
	dir := t.TempDir()
	for _, fn := range Names() {
		t.Run(fn, func(t *testing.T) {
			bin := filepath.Join(dir, fn)
			if err := BuildBinary(ctx, Options{Function: fn}, TargetLinux, bin); err != nil {
				t.Fatal(err)
			}
			ef, err := elf.Open(bin)
			if err != nil {
				t.Fatalf("not ELF: %v", err)
			}
			for _, p := range ef.Progs {
				if p.Type == elf.PT_INTERP {
					t.Errorf("%s is dynamically linked", fn)
				}
			}
			ef.Close()

			mod := filepath.Join(dir, fn+".wasm")
			if err := BuildBinary(ctx, Options{Function: fn}, TargetWasm, mod); err != nil {
				t.Fatal(err)
			}
			wasm, err := os.ReadFile(mod)
			if err != nil {
				t.Fatal(err)
			}
			replies := invokeWasm(t, wasm, "record", "record")
			for i, r := range replies {
				want := recordPrefix[fn]
				if fn == "counter" && i == 1 {
					want = "count=2 " // state continues between calls
				}
				if r.status != 0 || !strings.HasPrefix(r.out, want) {
					t.Errorf("wasm %s(record) call %d = %.120q (status %d), want prefix %.120q", fn, i+1, r.out, r.status, want)
				}
			}
		})
	}
}

type reply struct {
	out    string
	status uint32
}

// invokeWasm instantiates a reactor module (with HEAVYINIT_HEAP_MIB=8 in its
// environment) and calls it once per payload through the sdk ABI.
func invokeWasm(t *testing.T, module []byte, payloads ...string) []reply {
	t.Helper()
	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	wasi_snapshot_preview1.MustInstantiate(ctx, rt)
	var stderr bytes.Buffer
	mod, err := rt.InstantiateWithConfig(ctx, module, wazero.NewModuleConfig().WithStartFunctions().
		WithSysNanotime().WithSysWalltime().WithEnv("HEAVYINIT_HEAP_MIB", "8").WithStderr(&stderr))
	if err != nil {
		t.Fatalf("instantiate: %v", err)
	}
	call := func(fn string, args ...uint64) uint64 {
		res, err := mod.ExportedFunction(fn).Call(ctx, args...)
		if err != nil {
			t.Fatalf("%s: %v (stderr: %s)", fn, err, stderr.String())
		}
		if len(res) == 0 {
			return 0
		}
		return res[0]
	}
	call("_initialize")
	var replies []reply
	for _, payload := range payloads {
		ptr := uint32(call("vhive_alloc", api.EncodeI32(int32(len(payload)))))
		mod.Memory().Write(ptr, []byte(payload))
		packed := call("vhive_handle", uint64(ptr), api.EncodeI32(int32(len(payload))))
		out, ok := mod.Memory().Read(uint32(packed>>32), uint32(packed))
		if !ok {
			t.Fatalf("response out of range")
		}
		replies = append(replies, reply{string(out), uint32(call("vhive_status"))})
		call("vhive_free", packed>>32)
		call("vhive_free", uint64(ptr))
	}
	return replies
}
