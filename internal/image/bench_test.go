package image

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// benchLayer is a ≈52 MiB uncompressed layer shaped like a runtime image:
// 400 files of 128 KiB and 2000 files of 1 KiB in 100 directories.
func benchLayer(b *testing.B) []byte {
	b.Helper()
	rng := rand.New(rand.NewPCG(1, 2))
	big := make([]byte, 128<<10)
	small := make([]byte, 1<<10)
	var entries []entry
	for d := range 100 {
		dn := fmt.Sprintf("usr/lib/pkg%03d/", d)
		entries = append(entries, dir(dn, 0o755))
		for i := range 4 {
			for j := range big {
				big[j] = byte(rng.Uint32())
			}
			entries = append(entries, file(fmt.Sprintf("%sbig%d.so", dn, i), string(big), 0o755))
		}
		for i := range 20 {
			for j := range small {
				small[j] = byte(rng.Uint32())
			}
			entries = append(entries, file(fmt.Sprintf("%ssmall%02d.py", dn, i), string(small), 0o644))
		}
	}
	return tarBytes(b, append([]entry{dir("usr/", 0o755), dir("usr/lib/", 0o755)}, entries...)...)
}

// rawUnpack is the floor: archive/tar to files with no checks, no metadata.
func rawUnpack(dst string, r io.Reader) error {
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dst, hdr.Name)
		switch hdr.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			f, err := os.Create(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			f.Close()
			if err != nil {
				return err
			}
		}
	}
}

// BenchmarkUnpackLayer compares the checked unpacker with the raw floor on
// the same decompressed tar, in the same run. MB/s is of the tar stream.
func BenchmarkUnpackLayer(b *testing.B) {
	data := benchLayer(b)
	base := b.TempDir()
	run := func(b *testing.B, fn func(dst string) error) {
		b.SetBytes(int64(len(data)))
		b.ReportAllocs()
		for i := 0; b.Loop(); i++ {
			dst := filepath.Join(base, fmt.Sprintf("%s-%d", filepath.Base(b.Name()), i))
			if err := os.Mkdir(dst, 0o755); err != nil {
				b.Fatal(err)
			}
			if err := fn(dst); err != nil {
				b.Fatal(err)
			}
			b.StopTimer()
			if err := os.RemoveAll(dst); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
	}
	b.Run("raw-floor", func(b *testing.B) {
		run(b, func(dst string) error { return rawUnpack(dst, bytes.NewReader(data)) })
	})
	b.Run("vhive", func(b *testing.B) {
		run(b, func(dst string) error { return checkedUnpack(dst, data) })
	})
}

// BenchmarkPull is the whole path: a gzip layer from a 127.0.0.1 registry,
// digest verification, unpack, record. Each iteration uses a fresh store.
func BenchmarkPull(b *testing.B) {
	data := benchLayer(b)
	host, _ := startRegistry(b)
	l := layerFromBytes(b, data)
	ref := push(b, host, "bench/pull:v1", buildImage(b, v1.Config{}, l))
	b.SetBytes(int64(len(data)))
	ctx := context.Background()
	for i := 0; b.Loop(); i++ {
		b.StopTimer()
		e := newEnv(b, nil)
		b.StartTimer()
		if _, err := e.svc.Pull(ctx, ref); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		e.svc.Close()
		os.RemoveAll(e.base)
		b.StartTimer()
	}
}

// BenchmarkUnpackPaired runs the floor and the checked unpacker back to back
// in every iteration, so that both see the same machine load (this machine
// is shared and its load swings by 2× within a minute), and reports the
// per-iteration times and their ratio. "disk" unpacks under the test's temp
// dir, "tmpfs" under /dev/shm (filesystem cost mostly removed, so the
// checks' own cost shows).
func BenchmarkUnpackPaired(b *testing.B) {
	data := benchLayer(b)
	targets := map[string]string{"disk": b.TempDir()}
	if fi, err := os.Stat("/dev/shm"); err == nil && fi.IsDir() {
		d, err := os.MkdirTemp("/dev/shm", "vhive-image-bench-")
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { os.RemoveAll(d) })
		targets["tmpfs"] = d
	}
	for _, tname := range []string{"disk", "tmpfs"} {
		base, ok := targets[tname]
		if !ok {
			continue
		}
		b.Run(tname, func(b *testing.B) {
			var floor, checked time.Duration
			n := 0
			for i := 0; b.Loop(); i++ {
				for _, variant := range []string{"floor", "vhive"} {
					dst := filepath.Join(base, fmt.Sprintf("%s-%d", variant, i))
					if err := os.Mkdir(dst, 0o755); err != nil {
						b.Fatal(err)
					}
					start := time.Now()
					var err error
					if variant == "floor" {
						err = rawUnpack(dst, bytes.NewReader(data))
					} else {
						err = checkedUnpack(dst, data)
					}
					d := time.Since(start)
					if err != nil {
						b.Fatal(err)
					}
					if variant == "floor" {
						floor += d
					} else {
						checked += d
					}
					if err := os.RemoveAll(dst); err != nil {
						b.Fatal(err)
					}
				}
				n++
			}
			b.ReportMetric(float64(floor.Milliseconds())/float64(n), "floor-ms/op")
			b.ReportMetric(float64(checked.Milliseconds())/float64(n), "vhive-ms/op")
			b.ReportMetric(float64(checked)/float64(floor), "vhive/floor")
			b.ReportMetric(float64(len(data))/(1<<20), "MiB/layer")
		})
	}
}

func checkedUnpack(dst string, data []byte) error {
	root, err := os.OpenRoot(dst)
	if err != nil {
		return err
	}
	defer root.Close()
	u := newUnpacker(root, DefaultMaxEntryBytes, DefaultMaxLayerBytes)
	if err := u.applyLayer(context.Background(), "sha256:bench", bytes.NewReader(data)); err != nil {
		return err
	}
	return u.finish()
}
