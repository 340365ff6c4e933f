package microvm

import (
	"context"
	"log/slog"
	"net/http"
	"os"
	"path/filepath"
	"slices"
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

// BenchmarkReapRestore: restore → first reply of a snapshot of f, in
// rounds that take each case in turn (so that load changes hit all of them
// alike): the memory file evicted (fadvise DONTNEED on it) and served
// lazily; evicted and REAP-prefetched with runs widened to 4, 64 and 256
// KiB (the default); fully cached (read whole, lazy restore). Per case:
// the median time, and the means of QEMU's major faults and storage reads
// from cont to the reply, of the bytes prefetched and of the prefetch's
// time and of cont's wait for it.
//
//	go test -run XXX -bench ReapRestore -benchtime 10x -timeout 60m ./internal/sandbox/microvm/
func BenchmarkReapRestore(b *testing.B) {
	type acc struct {
		times       []time.Duration
		maj, rd, pf int64
		fetch, wait time.Duration
	}
	for _, f := range reapFuncs {
		b.Run(f.name, func(b *testing.B) {
			e := newEnv(b)
			spec, dir, ws, want := reapSnapshot(b, e, f)
			mem := filepath.Join(dir, SnapshotMemory)
			cases := []struct {
				name string
				mode sandbox.MemoryMode
				pad  uint64
				prep func(string) error
			}{
				{"lazy-evicted", sandbox.MemoryLazy, 0, evict},
				{"reap4k-evicted", sandbox.MemoryPrefetch, 4 << 10, evict},
				{"reap64k-evicted", sandbox.MemoryPrefetch, 64 << 10, evict},
				{"reap256k-evicted", sandbox.MemoryPrefetch, 256 << 10, evict},
				{"cached", sandbox.MemoryLazy, 0, readAll},
			}
			accs := make([]acc, len(cases))
			ctx := context.Background()
			for b.Loop() {
				for i, c := range cases {
					if err := c.prep(mem); err != nil {
						b.Fatal(err)
					}
					e.b.reapPad = max(c.pad, wsfPage)
					t0 := time.Now()
					rs, err := e.b.Restore(ctx, withID(spec, "bench"), dir, sandbox.RestoreOptions{Mode: c.mode, WorkingSet: ws})
					if err != nil {
						b.Fatal(err)
					}
					got := f.call(b, rs.Endpoint())
					took := time.Since(t0)
					if got != want {
						b.Fatalf("%s: reply %q, want %q", c.name, got, want)
					}
					st := rs.(sandbox.RestoreReporter).RestoreStats()
					if c.mode == sandbox.MemoryPrefetch && st.Pages["PrefetchFallback"] != 0 {
						b.Fatalf("prefetch fell back: %v", st.Pages)
					}
					a := &accs[i]
					a.times = append(a.times, took)
					a.maj += st.Pages["MajorFaults"]
					a.rd += st.Pages["VMMReadBytes"]
					a.pf += st.Pages["BytesRead"]
					a.fetch += st.Stages["FetchState"]
					a.wait += st.Stages["PrefetchWait"]
					_ = rs.Stop(ctx)
					http.DefaultTransport.(*http.Transport).CloseIdleConnections()
				}
			}
			e.b.reapPad = prefetchPad
			med := func(ts []time.Duration) float64 {
				s := slices.Clone(ts)
				slices.Sort(s)
				return float64(s[len(s)/2].Microseconds()) / 1000
			}
			cached := med(accs[len(accs)-1].times)
			for i, c := range cases {
				a := accs[i]
				n := float64(len(a.times))
				b.ReportMetric(med(a.times), c.name+"-ms")
				b.Logf("%-17s median %7.1f ms (%.2f× cached), majflt %5.1f, read %5.1f MiB, prefetched %5.1f MiB in %5.1f ms, cont waited %.2f ms (n=%d)",
					c.name, med(a.times), med(a.times)/cached, float64(a.maj)/n, float64(a.rd)/n/(1<<20), float64(a.pf)/n/(1<<20),
					float64(a.fetch.Microseconds())/n/1000, float64(a.wait.Microseconds())/n/1000, len(a.times))
			}
		})
	}
}
