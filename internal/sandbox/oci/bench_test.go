package oci

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// Benchmarks compare the backend with the raw floor measured in the same
// run: the runtime CLI alone on an equivalent bundle in the same kind of
// netns. Run with
//
//	go test -run '^$' -bench . -benchtime 10x ./internal/sandbox/oci/

// waitConnect dials addr until a TCP connection is accepted.
func waitConnect(b testing.TB, addr string) {
	deadline := time.Now().Add(30 * time.Second)
	for {
		c, err := net.DialTimeout("tcp", addr, time.Second)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			b.Fatalf("connect %s: %v", addr, err)
		}
		time.Sleep(time.Millisecond)
	}
}

// rawBundle is a bundle for the raw floor: the same generated config.json
// and an overlay rootfs, mounted once.
type rawBundle struct {
	dir, state string
	net        *netpool.Net
	globals    []string
}

func newRawBundle(b *testing.B, e *env, spec sandbox.Spec) *rawBundle {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "oci-bench-raw-")
	if err != nil {
		b.Fatal(err)
	}
	r := &rawBundle{dir: dir, state: filepath.Join(dir, "state")}
	b.Cleanup(func() { os.RemoveAll(dir) })
	for _, d := range []string{"rootfs", "upper", "work", "state"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o755); err != nil {
			b.Fatal(err)
		}
	}
	rootfs := filepath.Join(dir, "rootfs")
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s/upper,workdir=%s/work", spec.Rootfs, dir, dir)
	if err := unix.Mount("overlay", rootfs, "overlay", 0, opts); err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		// runsc leaves a null-netns mount in its state dir.
		ms, _ := mountinfo.Under(dir)
		for i := len(ms) - 1; i >= 0; i-- {
			_ = unix.Unmount(ms[i], unix.MNT_DETACH)
		}
	})
	r.net, err = e.pool.Get(ctx)
	if err != nil {
		b.Fatal(err)
	}
	cs, err := buildSpec(spec, rootfs, false, r.net.NsPath, e.b.cgroupParent+"/"+spec.ID)
	if err != nil {
		b.Fatal(err)
	}
	data, _ := json.Marshal(cs)
	if err := os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600); err != nil {
		b.Fatal(err)
	}
	r.globals = append([]string{"--root", r.state}, e.b.rt.ExtraArgs...)
	return r
}

// run runs the runtime CLI. Its output goes to a file: the container
// inherits the stdio of `run --detach`, and a pipe would never reach EOF.
func (r *rawBundle) run(b *testing.B, bin string, args ...string) {
	out, err := os.OpenFile(filepath.Join(r.dir, "output.log"), os.O_CREATE|os.O_RDWR|os.O_TRUNC, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer out.Close()
	cmd := exec.Command(bin, append(append([]string(nil), r.globals...), args...)...)
	cmd.Dir = r.dir
	cmd.Stdout, cmd.Stderr = out, out
	if err := cmd.Run(); err != nil {
		msg, _ := os.ReadFile(out.Name())
		b.Fatalf("%s %v: %v: %s", bin, args, err, msg)
	}
}

// reset deletes the raw container and puts back the netns address that
// runsc removed (through the pool, as the backend does).
func (r *rawBundle) reset(b *testing.B, e *env, bin, id string) {
	r.run(b, bin, "delete", "--force", id)
	// The container's init (runc) or sandbox (runsc) was re-parented to
	// this process (the backend made it a subreaper): reap it.
	if data, err := os.ReadFile(filepath.Join(r.dir, "pid")); err == nil {
		if pid, err := strconv.Atoi(strings.TrimSpace(string(data))); err == nil {
			waitPid(pid)
		}
	}
	for _, p := range childrenWithBundle(r.dir, 0) {
		waitPid(p)
	}
	ctx := context.Background()
	if err := e.pool.Put(ctx, r.net); err != nil {
		b.Fatal(err)
	}
	n, err := e.pool.Get(ctx)
	if err != nil {
		b.Fatal(err)
	}
	if n != r.net {
		b.Fatalf("pool returned %q, want the raw bundle's %q", n.Name, r.net.Name)
	}
}

// stopwatch accumulates named durations over b.N iterations and reports
// each as a ms/op metric.
type stopwatch map[string]time.Duration

func (sw stopwatch) since(name string, t time.Time) { sw[name] += time.Since(t) }

func (sw stopwatch) report(b *testing.B, ratios ...[2]string) {
	for name, d := range sw {
		b.ReportMetric(float64(d.Microseconds())/1000/float64(b.N), name+"-ms/op")
	}
	for _, r := range ratios {
		if sw[r[1]] > 0 {
			b.ReportMetric(float64(sw[r[0]])/float64(sw[r[1]]), r[0]+"/"+r[1])
		}
	}
}

// BenchmarkBoot: Create + Start + first TCP connect through the backend
// ("backend", with "create", "start" and "connect" stages), against a bare
// `run --detach` of an equivalent bundle in a netns of the same pool plus
// the first connect ("raw"). The two alternate in every iteration so that
// load from other processes hits both alike; ns/op covers both, read the
// ms/op metrics.
func BenchmarkBoot(b *testing.B) {
	for _, rt := range runtimes {
		b.Run(rt, func(b *testing.B) {
			e := newEnv(b, rt)
			ctx := context.Background()
			bin := e.b.cfg.Binary
			r := newRawBundle(b, e, e.spec("raw"))
			rawAddr := net.JoinHostPort(r.net.GuestIP.String(), "8080")
			sw := stopwatch{}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				spec := e.spec(fmt.Sprintf("bench-%d", i))
				t0 := time.Now()
				sb, err := e.b.Create(ctx, spec)
				if err != nil {
					b.Fatal(err)
				}
				sw.since("create", t0)
				t1 := time.Now()
				if err := sb.Start(ctx); err != nil {
					b.Fatal(err)
				}
				sw.since("start", t1)
				t2 := time.Now()
				waitConnect(b, sb.Endpoint())
				sw.since("connect", t2)
				sw.since("backend", t0)
				b.StopTimer()
				if err := sb.Stop(ctx); err != nil {
					b.Fatal(err)
				}
				b.StartTimer()

				id := fmt.Sprintf("raw-%d", i)
				t0 = time.Now()
				r.run(b, bin, "run", "--detach", "--pid-file", filepath.Join(r.dir, "pid"), "--bundle", r.dir, id)
				waitConnect(b, rawAddr)
				sw.since("raw", t0)
				b.StopTimer()
				r.reset(b, e, bin, id)
				b.StartTimer()
			}
			sw.report(b, [2]string{"backend", "raw"})
		})
	}
}

// BenchmarkRestore: gVisor Restore + first TCP connect through the backend
// against a bare `runsc restore --detach` of the same checkpoint into an
// equivalent bundle ("raw") and the same with --direct (O_DIRECT reads of
// pages.img, "rawdirect"), alternating in every iteration. Sub-benchmarks
// by the memory the function touched before the checkpoint (0 or 64 MiB).
// The page cache is warm (the checkpoint was just written or read).
//
// cache=cold evicts the checkpoint files from the page cache before every
// restore (fsync + posix_fadvise DONTNEED on those files only, so other
// work on the machine keeps its cache); cache=warm leaves them cached.
func BenchmarkRestore(b *testing.B) {
	for _, mb := range []int{0, 64} {
		for _, cold := range []bool{false, true} {
			name := fmt.Sprintf("mem=%dMiB/cache=warm", mb)
			if cold {
				name = fmt.Sprintf("mem=%dMiB/cache=cold", mb)
			}
			b.Run(name, func(b *testing.B) { benchRestore(b, mb, cold) })
		}
	}
}

// evictCache drops the files of dir from the page cache.
func evictCache(b *testing.B, dir string) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		b.Fatal(err)
	}
	for _, e := range ents {
		f, err := os.Open(filepath.Join(dir, e.Name()))
		if err != nil {
			b.Fatal(err)
		}
		if err := f.Sync(); err != nil {
			b.Fatal(err)
		}
		if err := unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
			b.Fatal(err)
		}
		f.Close()
	}
}

func benchRestore(b *testing.B, allocMiB int, cold bool) {
	e := newEnv(b, RuntimeGVisor)
	ctx := context.Background()
	orig, err := e.b.Create(ctx, e.spec("bench-orig"))
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { _ = orig.Stop(context.Background()) })
	if err := orig.Start(ctx); err != nil {
		b.Fatal(err)
	}
	if allocMiB > 0 {
		get(b, orig.Endpoint(), fmt.Sprintf("/alloc?mb=%d", allocMiB))
	} else {
		waitConnect(b, orig.Endpoint())
	}
	dir := b.TempDir()
	if err := orig.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		b.Fatal(err)
	}
	if err := orig.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	fi, err := os.Stat(filepath.Join(dir, "pages.img"))
	if err != nil {
		b.Fatal(err)
	}
	bin := e.b.cfg.Binary
	r := newRawBundle(b, e, e.spec("raw-restore"))
	rawAddr := net.JoinHostPort(r.net.GuestIP.String(), "8080")
	sw := stopwatch{}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if cold {
			b.StopTimer()
			evictCache(b, dir)
			b.StartTimer()
		}
		t0 := time.Now()
		sb, err := e.b.Restore(ctx, e.spec(fmt.Sprintf("bench-r-%d", i)), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryEager})
		if err != nil {
			b.Fatal(err)
		}
		sw.since("restore", t0)
		t1 := time.Now()
		waitConnect(b, sb.Endpoint())
		sw.since("connect", t1)
		sw.since("backend", t0)
		b.StopTimer()
		if err := sb.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()

		for _, v := range []struct {
			name  string
			extra []string
		}{{"raw", nil}, {"rawdirect", []string{"--direct"}}} {
			id := fmt.Sprintf("%s-%d", v.name, i)
			if cold {
				b.StopTimer()
				evictCache(b, dir)
				b.StartTimer()
			}
			args := append([]string{"restore", "--detach", "--pid-file", filepath.Join(r.dir, "pid"), "--image-path", dir, "--bundle", r.dir}, v.extra...)
			t0 := time.Now()
			r.run(b, bin, append(args, id)...)
			waitConnect(b, rawAddr)
			sw.since(v.name, t0)
			b.StopTimer()
			r.reset(b, e, bin, id)
			b.StartTimer()
		}
	}
	sw.report(b, [2]string{"backend", "raw"}, [2]string{"rawdirect", "raw"})
	b.ReportMetric(float64(fi.Size())/(1<<20), "pages-MiB")
}

// BenchmarkBootRootfs compares the rootfs modes (Create + Start + first
// connect), alternating between them in every iteration. The test rootfs
// is small (one 8 MiB binary): RootfsCopy grows with the image size.
func BenchmarkBootRootfs(b *testing.B) {
	for _, c := range []struct {
		rt    string
		modes []RootfsMode
	}{
		{RuntimeRunc, []RootfsMode{RootfsOverlay, RootfsCopy}},
		{RuntimeGVisor, []RootfsMode{RootfsOverlay, RootfsDirect, RootfsCopy}},
	} {
		b.Run(c.rt, func(b *testing.B) {
			ctx := context.Background()
			envs := map[RootfsMode]*env{}
			for _, m := range c.modes {
				envs[m] = newEnv(b, c.rt, func(cfg *Config) { cfg.Rootfs = m })
			}
			sw := stopwatch{}
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for _, m := range c.modes {
					e := envs[m]
					t0 := time.Now()
					sb, err := e.b.Create(ctx, e.spec(fmt.Sprintf("rootfs-%d", i)))
					if err != nil {
						b.Fatal(err)
					}
					if err := sb.Start(ctx); err != nil {
						b.Fatal(err)
					}
					waitConnect(b, sb.Endpoint())
					sw.since(string(m), t0)
					b.StopTimer()
					if err := sb.Stop(ctx); err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
			}
			sw.report(b)
		})
	}
}
