// Command microvm builds the microVM guest assets under
// $VHIVE_CACHE/microvm (see internal/microvm/assets): installs QEMU with apt
// when missing, unpacks Debian's cloud kernel, builds the guest agent and
// the initramfs, and prints the manifest.
//
//	go run ./tools/microvm [-cache DIR] [-kernel-package NAME]
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"

	"vhive.dev/vhive/internal/microvm/assets"
)

func main() {
	cache := flag.String("cache", assets.CacheDir(), "vhive cache directory (assets go to <cache>/microvm)")
	kpkg := flag.String("kernel-package", "", "pin the kernel package (default: what "+assets.KernelMetaPackage+" depends on, or the cached one)")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	m, err := assets.Ensure(ctx, assets.Options{Dir: assets.Dir(*cache), KernelPackage: *kpkg, Logger: slog.Default()})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	out, _ := json.MarshalIndent(m, "", "  ")
	fmt.Println(string(out))
}
