package microvm

import (
	"context"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/sandbox"
)

// reapFunc is a function image and its first request.
type reapFunc struct {
	name string
	spec func(testing.TB, *env) sandbox.Spec
	call func(testing.TB, string) string
}

var reapFuncs = []reapFunc{
	{"testfn", func(_ testing.TB, e *env) sandbox.Spec { return e.spec("src") },
		func(tb testing.TB, ep string) string { return get(tb, ep, "/count") }},
	{"helloworld", helloSpec, func(tb testing.TB, ep string) string { return hello(tb, ep, "reap") }},
}

// helloSpec builds and unpacks the helloworld function image.
func helloSpec(tb testing.TB, _ *env) sandbox.Spec {
	ctx := context.Background()
	out := tb.TempDir()
	imgs, err := build.BuildFunction(ctx, build.Options{Function: "helloworld", Targets: []build.Target{build.TargetLinux},
		Formats: []build.Format{build.FormatLayout}, OutDir: out})
	if err != nil {
		tb.Fatal(err)
	}
	svc, err := image.New(ctx, image.Options{Root: filepath.Join(out, "store"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(func() { svc.Close() })
	img, err := svc.Import(ctx, imgs[0].Layout, imgs[0].Ref)
	if err != nil {
		tb.Fatal(err)
	}
	return sandbox.Spec{
		ID: "src", Function: "helloworld", ImageDigest: img.Digest, Rootfs: img.Rootfs,
		Process: sandbox.Process{
			Args: append(append([]string(nil), img.Config.Entrypoint...), img.Config.Cmd...),
			Env:  img.Config.Env, Cwd: img.Config.WorkingDir, User: img.Config.User,
		},
		Port: build.GuestPort,
	}
}

func hello(tb testing.TB, endpoint, name string) string {
	tb.Helper()
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		tb.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	r, err := helloworld.NewGreeterClient(conn).SayHello(ctx, &helloworld.HelloRequest{Name: name})
	if err != nil {
		tb.Fatalf("SayHello at %s: %v", endpoint, err)
	}
	return r.GetMessage()
}

// reapSnapshot boots f, snapshots it, and records its WS (record restore
// from the evicted memory file, f's first request, FinishRecord). It also
// measures what stock lazy restores would record: after a lazy restore
// from the evicted file and the same request, the memory file's pages in
// the page cache (mincore) and the mapping's present pages (pagemap).
func reapSnapshot(b *testing.B, e *env, f reapFunc) (spec sandbox.Spec, dir, ws, want string) {
	ctx := context.Background()
	spec = f.spec(b, e)
	src := e.start(b, spec)
	dir = b.TempDir()
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		b.Fatal(err)
	}
	want = f.call(b, src.Endpoint())
	if err := src.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	mem := filepath.Join(dir, SnapshotMemory)
	ws = filepath.Join(dir, "ws")
	defer func() {
		// VHIVE_REAP_KEEP=<dir> keeps <dir>/<function>.{mem,ws} for
		// BenchmarkPrefetchMethods.
		if keep := os.Getenv("VHIVE_REAP_KEEP"); keep != "" {
			for _, c := range [][2]string{{mem, ".mem"}, {ws, ".ws"}} {
				_ = os.Remove(filepath.Join(keep, f.name+c[1]))
				if err := copySparse(c[0], filepath.Join(keep, f.name+c[1])); err != nil {
					b.Error(err)
				}
			}
		}
	}()
	took := map[string]time.Duration{}
	restore := func(id string, mode sandbox.MemoryMode) sandbox.Sandbox {
		if err := evict(mem); err != nil {
			b.Fatal(err)
		}
		t0 := time.Now()
		rs, err := e.b.Restore(ctx, withID(spec, id), dir, sandbox.RestoreOptions{Mode: mode, WorkingSet: ws})
		if err != nil {
			b.Fatal(err)
		}
		if got := f.call(b, rs.Endpoint()); got != want {
			b.Fatalf("%s: %q, want %q", id, got, want)
		}
		took[id] = time.Since(t0)
		return rs
	}
	rs := restore("rec", sandbox.MemoryRecord)
	if err := rs.(sandbox.Recorder).FinishRecord(ctx); err != nil {
		b.Fatal(err)
	}
	rec := rs.(sandbox.RestoreReporter).RestoreStats().Pages
	_ = rs.Stop(ctx)
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	size := int64(rs.(*Sandbox).restore.meta.MemoryMiB) << 20
	lz := restore("lazy", sandbox.MemoryLazy)
	cached, err := mincorePages(mem, size)
	if err != nil {
		b.Fatal(err)
	}
	present, err := presentPages(qemuPid(lz), mem, size)
	if err != nil {
		b.Fatal(err)
	}
	_ = lz.Stop(ctx)
	http.DefaultTransport.(*http.Transport).CloseIdleConnections()
	mib := func(p int64) float64 { return float64(p) / 256 }
	t := float64(rec["RecPages"])
	b.Logf("%s: one record restore → first reply %s (FinishRecord after it), one lazy %s", f.name,
		took["rec"].Round(time.Millisecond), took["lazy"].Round(time.Millisecond))
	b.Logf("%s: recorded WS %d pages (%.1f MiB) in %d runs; record device cache %d pages (true 4 KiB WS); "+
		"stock lazy restore: mem file cached %d pages (%.1f MiB, %.1f×), mapping present %d pages (%.1f MiB, %.1f×)",
		f.name, rec["RecPages"], mib(rec["RecPages"]), rec["RecRegions"], rec["RecDevicePages"],
		cached, mib(cached), float64(cached)/t, len(present), mib(int64(len(present))), float64(len(present))/t)
	return spec, dir, ws, want
}

func withID(s sandbox.Spec, id string) sandbox.Spec {
	s.ID = id
	return s
}

// BenchmarkReapRestore: restore → first reply of a snapshot of f, with the
// memory file evicted (fadvise DONTNEED on it) and served lazily, evicted
// and REAP-prefetched, and fully cached (read whole, lazy restore); and
// QEMU's major faults and storage reads from cont to the reply.
//
//	go test -run XXX -bench ReapRestore -benchtime 5x -timeout 60m ./internal/sandbox/microvm/
func BenchmarkReapRestore(b *testing.B) {
	for _, f := range reapFuncs {
		b.Run(f.name, func(b *testing.B) {
			e := newEnv(b)
			spec, dir, ws, want := reapSnapshot(b, e, f)
			mem := filepath.Join(dir, SnapshotMemory)
			for _, c := range []struct {
				name string
				mode sandbox.MemoryMode
				prep func(string) error
			}{
				{"lazy-evicted", sandbox.MemoryLazy, evict},
				{"reap-evicted", sandbox.MemoryPrefetch, evict},
				{"cached", sandbox.MemoryLazy, readAll},
			} {
				b.Run(c.name, func(b *testing.B) {
					ctx := context.Background()
					var maj, rd, pf, n int64
					var fetch, wait time.Duration
					for b.Loop() {
						b.StopTimer()
						if err := c.prep(mem); err != nil {
							b.Fatal(err)
						}
						rspec := withID(spec, "bench")
						b.StartTimer()
						rs, err := e.b.Restore(ctx, rspec, dir, sandbox.RestoreOptions{Mode: c.mode, WorkingSet: ws})
						if err != nil {
							b.Fatal(err)
						}
						got := f.call(b, rs.Endpoint())
						b.StopTimer()
						if got != want {
							b.Fatalf("reply %q, want %q", got, want)
						}
						rst := rs.(sandbox.RestoreReporter).RestoreStats()
						p := rst.Pages
						fetch += rst.Stages["FetchState"]
						wait += rst.Stages["PrefetchWait"]
						if c.mode == sandbox.MemoryPrefetch && p["PrefetchFallback"] != 0 {
							b.Fatalf("prefetch fell back: %v", p)
						}
						maj += p["MajorFaults"]
						rd += p["VMMReadBytes"]
						pf += p["BytesRead"]
						n++
						_ = rs.Stop(ctx)
						http.DefaultTransport.(*http.Transport).CloseIdleConnections()
						b.StartTimer()
					}
					b.ReportMetric(float64(maj)/float64(n), "majflt/op")
					b.ReportMetric(float64(rd)/float64(n)/(1<<20), "readMiB/op")
					b.ReportMetric(float64(pf)/float64(n)/(1<<20), "prefetchMiB/op")
					if c.mode == sandbox.MemoryPrefetch {
						b.ReportMetric(float64(fetch.Microseconds())/float64(n)/1000, "fetch-ms/op")
						b.ReportMetric(float64(wait.Microseconds())/float64(n)/1000, "pfwait-ms/op")
					}
				})
			}
		})
	}
}
