package assets

import (
	"bytes"
	"context"
	"io"
	"log/slog"
	"os"
	"strings"
	"testing"

	"github.com/klauspost/compress/gzip"
	"github.com/u-root/u-root/pkg/cpio"
)

// TestEnsure builds (or reuses) the assets in $VHIVE_CACHE/microvm and
// checks the initramfs: /init is the agent, /dev/console is the console
// device, every module of the load order is there and each module's
// dependencies come before it.
func TestEnsure(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root: installs QEMU with apt and writes the cache")
	}
	ctx := context.Background()
	m, err := Ensure(ctx, Options{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	if sum, err := fileSHA256(m.Vmlinuz); err != nil || sum != m.VmlinuzSHA256 {
		t.Errorf("vmlinuz sha256 %s, manifest says %s (%v)", sum, m.VmlinuzSHA256, err)
	}
	if !strings.Contains(m.QEMUVersion, "QEMU emulator version") || m.KernelVersion == "" {
		t.Errorf("manifest %+v lacks versions", m)
	}
	data, err := os.ReadFile(m.Initramfs)
	if err != nil {
		t.Fatal(err)
	}
	zr, err := gzip.NewReader(bytes.NewReader(data))
	if err != nil {
		t.Fatal(err)
	}
	raw, err := io.ReadAll(zr)
	if err != nil {
		t.Fatal(err)
	}
	recs, err := cpio.ReadAllRecords(cpio.Newc.Reader(bytes.NewReader(raw)))
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]cpio.Record{}
	for _, r := range recs {
		got[r.Name] = r
	}
	con, ok := got["dev/console"]
	if !ok || con.Mode&cpio.S_IFMT != cpio.S_IFCHR || con.Rmajor != 5 || con.Rminor != 1 {
		t.Errorf("dev/console = %+v, want the char device 5:1", con.Info)
	}
	if ini, ok := got["init"]; !ok || ini.Mode&0o111 == 0 || ini.FileSize < 1<<20 {
		t.Errorf("init = %+v, want the executable agent", ini.Info)
	}
	order, ok := got["lib/modules/order"]
	if !ok {
		t.Fatal("no lib/modules/order")
	}
	ob, _ := io.ReadAll(io.NewSectionReader(order, 0, int64(order.FileSize)))
	names := strings.Fields(string(ob))
	if strings.Join(names, ",") != strings.Join(m.Modules, ",") {
		t.Errorf("order %v, manifest %v", names, m.Modules)
	}
	pos := map[string]int{}
	for i, n := range names {
		pos[strings.TrimSuffix(n, ".ko")] = i
		r, ok := got["lib/modules/"+n]
		if !ok {
			t.Fatalf("module %s missing", n)
		}
		body, _ := io.ReadAll(io.NewSectionReader(r, 0, int64(r.FileSize)))
		deps, err := moduleDepends(body)
		if err != nil {
			t.Fatalf("%s: %v", n, err)
		}
		for _, d := range deps {
			if j, ok := pos[d]; !ok || j >= i {
				t.Errorf("module %s needs %s, which is not loaded before it", n, d)
			}
		}
	}
	for _, want := range Modules {
		if _, ok := pos[want]; !ok {
			t.Errorf("module %s not in the initramfs", want)
		}
	}
}
