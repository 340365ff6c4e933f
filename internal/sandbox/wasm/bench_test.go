package wasm

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/iobuf"
	"vhive.dev/vhive/internal/sandbox"
	wasmrt "vhive.dev/vhive/internal/wasm"
	"vhive.dev/vhive/internal/wasm/wasmtest"
)

// evict drops the files' pages from the page cache (only these files: the
// machine is shared), as vHive drops caches before every cold start — unless
// VHIVE_BENCH_WITH_CACHE=1 (vHive's --with-cache).
func evict(b *testing.B, paths ...string) {
	if os.Getenv("VHIVE_BENCH_WITH_CACHE") == "1" {
		return
	}
	for _, p := range paths {
		f, err := os.Open(p)
		if os.IsNotExist(err) {
			continue
		}
		if err != nil {
			b.Fatal(err)
		}
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			b.Fatalf("fadvise %s: %v", p, err)
		}
		f.Close()
	}
}

type coldStats struct {
	lat                                      []time.Duration
	faults, unique, recPages, ready, zeroPgs int64
	wsWaits                                  int64
	n                                        int64
	stages                                   map[string]time.Duration
	toReady                                  time.Duration // start → sandbox returned (before the first call)
	firstCall                                time.Duration // dial + first call
	secondCall                               time.Duration // dial + a second call on the same instance (not part of the cold start)
	firstGuest, secondGuest                  time.Duration // of which in the guest (the worker's x-vhive-guest-us)
	firstFlt, secondFlt                      int64         // the worker's minor page faults during those calls
	prefetch, floor, rawRead, busy           []float64     // REAP: ms from Restore to the WS installed; raw read + install ioctls; raw read
}

func (c *coldStats) report(b *testing.B) {
	if len(c.lat) == 0 {
		return
	}
	s := slices.Clone(c.lat)
	slices.Sort(s)
	b.ReportMetric(float64(s[len(s)/2].Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(s[len(s)-1].Microseconds())/1000, "max-ms")
	b.ReportMetric(float64(c.faults)/float64(c.n), "faults/op")
	b.ReportMetric(float64(c.unique)/float64(c.n), "unique/op")
	b.ReportMetric(float64(c.recPages)/float64(c.n), "ws-pages/op")
	b.ReportMetric(float64(c.wsWaits)/float64(c.n), "ws-waits/op")
	b.ReportMetric(float64(c.ready)/float64(c.n), "ready-worker/op")
	b.ReportMetric(float64(c.toReady.Microseconds())/1000/float64(c.n), "ready-ms")
	b.ReportMetric(float64(c.firstCall.Microseconds())/1000/float64(c.n), "first-call-ms")
	b.ReportMetric(float64(c.secondCall.Microseconds())/1000/float64(c.n), "second-call-ms")
	b.ReportMetric(float64(c.firstGuest.Microseconds())/1000/float64(c.n), "first-guest-ms")
	b.ReportMetric(float64(c.secondGuest.Microseconds())/1000/float64(c.n), "second-guest-ms")
	b.ReportMetric(float64(c.firstFlt)/float64(c.n), "first-call-minflt")
	b.ReportMetric(float64(c.secondFlt)/float64(c.n), "second-call-minflt")
	if len(c.prefetch) > 0 {
		ratio := make([]float64, len(c.prefetch))
		for i := range ratio {
			ratio[i] = c.prefetch[i] / c.floor[i]
		}
		b.ReportMetric(medianF(c.prefetch), "restore-ms")
		b.ReportMetric(medianF(c.rawRead), "floor-read-ms")
		b.ReportMetric(medianF(c.busy), "install-busy-ms")
		b.ReportMetric(medianF(ratio), "restore/floor")
	}
	for _, k := range []string{"CheckSnapshot", "MemoryStart", "WorkerStart", "Worker", "TakeWorker", "FetchState", "InstallWS", "LoadMemory", "Instantiate", "Initialize"} {
		if d, ok := c.stages[k]; ok {
			b.ReportMetric(float64(d.Microseconds())/1000/float64(c.n), k+"-ms")
		}
	}
}

// BenchmarkColdStart measures request in → reply out for the wasm backend:
// boot (compiled module, instantiate + _initialize), eager snapshot restore
// (memory copied), mmap (the memory file mapped privately, pages read by the
// kernel on first touch: Firecracker's vanilla snapshot), lazy restore (every page by userfaultfd), REAP (working
// set prefetched; recorded with payload "record", replayed with "record" and
// with "replay", which touches other pages; the guest resumes while the WS
// streams in, as the daemon runs it, and reap-wait installs the whole WS
// first, vHive's order) and warm calls, with a pool of ready workers and
// without. Run with -benchtime=10x.
func BenchmarkColdStart(b *testing.B) {
	for _, fn := range []string{"helloworld", "lookup"} {
		for _, pool := range []int{1, 0} {
			e := newEnv(b, envOpts{pool: pool})
			e.module = wasmtest.FunctionModule(b, fn)
			ctx := context.Background()

			// The snapshot is taken right after boot, as vHive does.
			booted := e.boot(b, fn+"-boot")
			snap := b.TempDir()
			if err := booted.(sandbox.Snapshotter).Snapshot(ctx, snap); err != nil {
				b.Fatal(err)
			}
			want := map[string]string{}
			for _, p := range []string{"record", "replay"} {
				// Replies do not depend on state for these functions.
				want[p] = mustCall(b, booted, p)
			}
			ws := filepath.Join(b.TempDir(), "ws")
			rec := e.restore(b, fn+"-rec", snap, sandbox.RestoreOptions{Mode: sandbox.MemoryRecord, WorkingSet: ws})
			mustCall(b, rec, "record")
			if err := rec.(sandbox.Recorder).FinishRecord(ctx); err != nil {
				b.Fatal(err)
			}
			_ = rec.Stop(ctx)
			memFile := filepath.Join(snap, wasmrt.MemoryFile)
			if fi, err := os.Stat(ws); err == nil {
				b.Logf("%s: working set file %d KiB", fn, fi.Size()>>10)
			}

			poolName := "pool"
			if pool == 0 {
				poolName = "nopool"
			}
			for _, mode := range []string{"boot", "eager", "mmap", "lazy", "reap", "reap-wait", "reap-replay", "warm"} {
				b.Run(fmt.Sprintf("%s/%s/%s", fn, mode, poolName), func(b *testing.B) {
					if mode == "warm" && pool == 0 {
						b.Skip("warm does not depend on the pool")
					}
					payload := "record"
					if mode == "reap-replay" {
						payload = "replay"
					}
					var cs coldStats
					if mode == "warm" {
						conn, err := grpc.NewClient(booted.Endpoint(), grpc.WithTransportCredentials(insecure.NewCredentials()))
						if err != nil {
							b.Fatal(err)
						}
						defer conn.Close()
						c := helloworld.NewGreeterClient(conn)
						if _, err := c.SayHello(ctx, &helloworld.HelloRequest{Name: payload}); err != nil {
							b.Fatal(err)
						}
						b.ResetTimer()
						for range b.N {
							t0 := time.Now()
							var md metadata.MD
							r, err := c.SayHello(ctx, &helloworld.HelloRequest{Name: payload}, grpc.Header(&md))
							cs.lat = append(cs.lat, time.Since(t0))
							if v := md.Get(wasmrt.GuestTimeHeader); len(v) == 1 {
								us, _ := strconv.ParseInt(v[0], 10, 64)
								cs.firstGuest += time.Duration(us) * time.Microsecond // reported as first-guest-ms: per warm call
							}
							if err != nil || r.GetMessage() != want[payload] {
								b.Fatalf("warm call: %q, %v", r.GetMessage(), err)
							}
						}
						cs.n = int64(b.N)
						cs.report(b)
						return
					}
					b.StopTimer()
					for i := range b.N {
						if pool > 0 {
							if err := e.b.Warm(ctx, e.module); err != nil {
								b.Fatal(err)
							}
						}
						evict(b, memFile, ws)
						if pool == 0 {
							// vHive drops the whole page cache: a worker start
							// then reads the worker binary and the compiled
							// module from disk too.
							evict(b, workerFiles(b, e.b.cfg)...)
						}
						id := fmt.Sprintf("%s-%s-%s-%d", fn, mode, poolName, i)
						b.StartTimer()
						t0 := time.Now()
						var sb sandbox.Sandbox
						var err error
						switch mode {
						case "boot":
							if sb, err = e.b.Create(ctx, e.spec(id)); err == nil {
								err = sb.Start(ctx)
							}
						case "eager", "mmap":
							e.b.cfg.EagerMmap = mode == "mmap"
							sb, err = e.b.Restore(ctx, e.spec(id), snap, sandbox.RestoreOptions{Mode: sandbox.MemoryEager})
							e.b.cfg.EagerMmap = false
						case "lazy":
							sb, err = e.b.Restore(ctx, e.spec(id), snap, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
						default:
							// As the daemon runs REAP (--wasm-early-resume), but
							// reap-wait installs the whole WS first (vHive's order).
							e.b.cfg.EarlyResume = mode != "reap-wait"
							sb, err = e.b.Restore(ctx, e.spec(id), snap, sandbox.RestoreOptions{Mode: sandbox.MemoryPrefetch, WorkingSet: ws})
							e.b.cfg.EarlyResume = false
						}
						if err != nil {
							b.Fatalf("%s: %v", mode, err)
						}
						pid := sb.(*Sandbox).Pid()
						f0 := minorFaults(pid)
						t1 := time.Now()
						got, g1, err := callTimed(ctx, sb.Endpoint(), payload)
						d := time.Since(t0)
						cs.toReady += t1.Sub(t0)
						cs.firstCall += time.Since(t1)
						b.StopTimer()
						if err != nil || got != want[payload] {
							b.Fatalf("%s: first call = %q, %v; want %q", mode, got, err, want[payload])
						}
						f1 := minorFaults(pid)
						t2 := time.Now()
						got, g2, err := callTimed(ctx, sb.Endpoint(), payload)
						if err != nil || got != want[payload] {
							b.Fatalf("%s: second call = %q, %v", mode, got, err)
						}
						cs.secondCall += time.Since(t2)
						cs.firstGuest += g1
						cs.secondGuest += g2
						cs.firstFlt += f1 - f0
						cs.secondFlt += minorFaults(pid) - f1
						cs.lat = append(cs.lat, d)
						st := sb.(sandbox.RestoreReporter).RestoreStats()
						cs.faults += st.Pages["Faults"]
						cs.unique += st.Pages["Unique"]
						cs.recPages += st.Pages["RecPages"]
						cs.wsWaits += st.Pages["WSWaits"]
						cs.ready += st.Pages["ReadyWorker"]
						if cs.stages == nil {
							cs.stages = map[string]time.Duration{}
						}
						for k, v := range st.Stages {
							cs.stages[k] += v
						}
						if sb, ok := sb.(*Sandbox); ok && sb.mem != nil && strings.HasPrefix(mode, "reap") {
							ms := sb.mem.Stats()
							for deadline := time.Now().Add(5 * time.Second); ms.PrefetchWS == 0 && time.Now().Before(deadline); ms = sb.mem.Stats() {
								time.Sleep(time.Millisecond) // the install may still run (early resume)
							}
							// The raw floor of this restore, measured right after
							// it: one O_DIRECT pread of the same WS file (evicted)
							// plus the manager's own install ioctl time.
							evict(b, ws)
							rr := rawReadMS(b, ws)
							cs.prefetch = append(cs.prefetch, float64(ms.PrefetchWS.Microseconds())/1000)
							cs.rawRead = append(cs.rawRead, rr)
							cs.busy = append(cs.busy, float64(ms.InstallBusy.Microseconds())/1000)
							cs.floor = append(cs.floor, rr+float64(ms.InstallBusy.Microseconds())/1000)
						}
						cs.n++
						if err := sb.Stop(ctx); err != nil {
							b.Fatal(err)
						}
					}
					cs.report(b)
				})
			}
			_ = booted.Stop(ctx)
			e.b.Close()
		}
	}
}

// BenchmarkFloor measures raw floors in the same run: fork+exec+wait of
// /bin/true (the least a process-per-instance cold start costs), a warm
// Greeter round trip to a plain Go server on a unix socket (the least a warm
// call costs) and reading 29 MiB (lookup's working set) with the file
// evicted from the page cache (the least REAP's FetchState costs here).
func BenchmarkFloor(b *testing.B) {
	b.Run("read-ws-29MiB-cold", func(b *testing.B) {
		path := filepath.Join(b.TempDir(), "ws")
		data := make([]byte, 7461*4096)
		for i := range data {
			data[i] = byte(i*7 + i>>12)
		}
		if err := os.WriteFile(path, data, 0o600); err != nil {
			b.Fatal(err)
		}
		b.SetBytes(int64(len(data)))
		b.ResetTimer()
		for range b.N {
			b.StopTimer()
			if err := unix.Fadvise(fadviseFD(b, path), 0, 0, unix.FADV_DONTNEED); err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
			if _, err := os.ReadFile(path); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("exec-true", func(b *testing.B) {
		for range b.N {
			if err := exec.Command("/bin/true").Run(); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("grpc-unix-warm", func(b *testing.B) {
		sock := filepath.Join(b.TempDir(), "g.sock")
		ln, err := net.Listen("unix", sock)
		if err != nil {
			b.Fatal(err)
		}
		srv := grpc.NewServer()
		helloworld.RegisterGreeterServer(srv, plainGreeter{})
		go srv.Serve(ln)
		defer srv.Stop()
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			b.Fatal(err)
		}
		defer conn.Close()
		c := helloworld.NewGreeterClient(conn)
		ctx := context.Background()
		if _, err := c.SayHello(ctx, &helloworld.HelloRequest{Name: "x"}); err != nil {
			b.Fatal(err)
		}
		b.ResetTimer()
		for range b.N {
			if _, err := c.SayHello(ctx, &helloworld.HelloRequest{Name: "x"}); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// workerFiles lists the files a worker start reads: its binary and the
// prepared and compiled modules.
func workerFiles(b *testing.B, cfg Config) []string {
	files := []string{}
	if p, err := exec.LookPath(cfg.WorkerCommand[0]); err == nil {
		files = append(files, p)
	}
	for _, dir := range []string{cfg.CacheDir, cfg.CompileCacheDir} {
		filepath.WalkDir(dir, func(path string, d os.DirEntry, err error) error {
			if err == nil && d.Type().IsRegular() {
				files = append(files, path)
			}
			return nil
		})
	}
	return files
}

// callTimed is call, also returning the guest time the worker reports.
func callTimed(ctx context.Context, endpoint, req string) (string, time.Duration, error) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", 0, err
	}
	defer conn.Close()
	var md metadata.MD
	r, err := helloworld.NewGreeterClient(conn).SayHello(ctx, &helloworld.HelloRequest{Name: req}, grpc.Header(&md))
	if err != nil {
		return "", 0, err
	}
	var g time.Duration
	if v := md.Get(wasmrt.GuestTimeHeader); len(v) == 1 {
		us, _ := strconv.ParseInt(v[0], 10, 64)
		g = time.Duration(us) * time.Microsecond
	}
	return r.GetMessage(), g, nil
}

// rawReadMS is one O_DIRECT pread of the whole file (buffered if the
// filesystem refuses O_DIRECT) into a buffer allocated beforehand, in ms.
func rawReadMS(b *testing.B, path string) float64 {
	fi, err := os.Stat(path)
	if err != nil {
		b.Fatal(err)
	}
	// The same kind of buffer as the memory manager's pool (iobuf).
	n := (int(fi.Size()) + 4095) &^ 4095
	buf, err := iobuf.Alloc(n)
	if err != nil {
		b.Fatal(err)
	}
	defer iobuf.Free(buf)
	t0 := time.Now()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	}
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.Pread(fd, buf, 0); err != nil {
		b.Fatal(err)
	}
	return float64(time.Since(t0).Microseconds()) / 1000
}

func medianF(x []float64) float64 {
	s := slices.Clone(x)
	slices.Sort(s)
	return s[len(s)/2]
}

// minorFaults returns the process's minor page faults so far
// (/proc/<pid>/stat field 10), -1 if unreadable.
func minorFaults(pid int) int64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return -1
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	if i < 0 {
		return -1
	}
	f := strings.Fields(s[i+1:]) // f[0] is field 3 (state)
	if len(f) < 8 {
		return -1
	}
	n, _ := strconv.ParseInt(f[7], 10, 64)
	return n
}

// fadviseFD opens path for an fadvise call; the descriptor is closed when
// the benchmark ends.
func fadviseFD(b *testing.B, path string) int {
	f, err := os.Open(path)
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { f.Close() })
	return int(f.Fd())
}

type plainGreeter struct {
	helloworld.UnimplementedGreeterServer
}

func (plainGreeter) SayHello(_ context.Context, r *helloworld.HelloRequest) (*helloworld.HelloReply, error) {
	return &helloworld.HelloReply{Message: "Hello, " + r.GetName() + "!"}, nil
}

// BenchmarkSnapshot measures Snapshot of a booted instance (memory written
// sparse and hashed, state file, fsyncs) and reports the memory size and the
// data actually written.
func BenchmarkSnapshot(b *testing.B) {
	for _, fn := range []string{"helloworld", "lookup"} {
		b.Run(fn, func(b *testing.B) {
			e := newEnv(b, envOpts{noMemory: true})
			e.module = wasmtest.FunctionModule(b, fn)
			sb := e.boot(b, fn+"-snap")
			mustCall(b, sb, "record")
			ctx := context.Background()
			var st *wasmrt.State
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				dir := b.TempDir()
				b.StartTimer()
				if err := sb.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				var err error
				if st, err = wasmrt.ReadState(dir); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			b.ReportMetric(float64(st.MemorySize)/(1<<20), "memory-MiB")
			b.ReportMetric(float64(st.DataPages*wasmrt.PageSize)/(1<<20), "data-MiB")
		})
	}
}
