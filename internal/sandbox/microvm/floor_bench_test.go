package microvm

// Benchmarks of the microvm backend against its floor: the same QEMU
// command line, the same kernel, initramfs, disk and snapshot files, driven
// by a minimal client written here instead of the backend. Run with
//
//	go test -run '^$' -bench . -benchtime 3x -timeout 60m ./internal/sandbox/microvm/
//
// Every iteration is a cold start of its own (a new QEMU process); the page
// cache is not dropped (the snapshot files are warm in it for both sides).
// What each side includes:
//
//   - Restore, vhive: Backend.Restore (netpool Get, bridge and tap in the
//     instance netns, [eager: read the RAM file], QEMU start, QMP and agent
//     channel connect, migrate-incoming, cont, the agent's resume handshake:
//     clock, entropy, new address) and then the first SayHello (TCP connect,
//     gRPC client, call) answered.
//   - Restore, bare-qemu: [eager: read the RAM file], QEMU start with the
//     command line the backend builds for that snapshot (Sandbox.qemuArgs),
//     QMP connect (a few lines of JSON written here), migrate-set-capabilities
//     x-ignore-shared, migrate-incoming from the same state file, poll
//     query-status until the state is in, cont, a connect to the agent's
//     chardev (without it QEMU tells the guest that the host side closed the
//     port, the agent reads EOF and powers the VM off; nothing is sent on it),
//     then the same first SayHello. Excluded (set up before the timer
//     starts, removed after it stops): the netns, its tap and the NAT to the
//     guest's fixed address (vhive overlaps the NAT with QEMU's start). The
//     tap's and NAT's set-up is reported as tap-ms.
//   - Restore, bare-qemu+resume: bare-qemu plus the agent's resume handshake
//     the backend does (clock, entropy)
//     sent on the agent channel right after cont, without the backend's QMP
//     status polling: what vhive's clone-uniqueness work costs in the guest.
//     (A variant polling QMP every 10 ms during the handshake, as the
//     backend does every 250 ms, made no consistent difference: commit
//     98e28ae, docs/benchmarks/microvm.md.)
//   - Boot, vhive: Backend.Create (netpool Get, rootfs disk from its cache,
//     bridge and tap) + Start (QEMU, QMP, agent channel, start message, the
//     agent's ready) and the first SayHello answered.
//   - Boot, bare-qemu: QEMU start with the backend's boot command line, a
//     connect to the agent chardev, the same start message (the guest runs
//     no function without it), then TCP connect polling and the first
//     SayHello. Excluded: netns, bridge and tap (set up untimed), the rootfs
//     disk (already in its cache).
//
// BenchmarkClonePrivateMemory restores clones of one snapshot at once and
// reports per clone the QEMU process's private and shared memory.
// The warm-invocation benchmark (direct vs through the daemon) is
// internal/daemon's BenchmarkMicroVMWarmInvoke.

import (
	"bufio"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/microvm/agentproto"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// benchEnv is newEnv for a benchmark, skipped with the reason where the
// guest assets (QEMU, kernel, initramfs) are missing, plus a spec maker for
// the helloworld image.
func benchEnv(b *testing.B, mut ...func(*Config)) (*env, func(id string) sandbox.Spec) {
	b.Helper()
	if os.Geteuid() != 0 {
		b.Skip("needs root: network namespaces, taps")
	}
	if testAssets == nil {
		b.Skipf("microVM guest assets (QEMU, kernel, initramfs) unavailable: %v (run `make microvm`)", assetsErr)
	}
	if _, err := exec.LookPath(testAssets.QEMU); err != nil {
		b.Skipf("QEMU: %v", err)
	}
	e := newEnv(b, mut...)
	ctx := context.Background()
	layout := helloworldImage(b)
	svc, err := image.New(ctx, image.Options{Root: filepath.Join(e.root, "images"), Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { svc.Close() })
	img, err := svc.Import(ctx, layout, "localhost/vhive/helloworld:latest")
	if err != nil {
		b.Fatal(err)
	}
	return e, func(id string) sandbox.Spec {
		return sandbox.Spec{
			ID: id, Function: "helloworld", ImageDigest: img.Digest, Rootfs: img.Rootfs,
			Process: sandbox.Process{
				Args: append(append([]string(nil), img.Config.Entrypoint...), img.Config.Cmd...),
				Env:  img.Config.Env, Cwd: img.Config.WorkingDir, User: img.Config.User,
			},
			Port: build.GuestPort,
		}
	}
}

// firstReply connects to the function at addr (polling a TCP connect, as
// the daemon's ConnectFuncClient does: gRPC's own reconnect backoff would
// add up to a second) and calls SayHello once.
func firstReply(ctx context.Context, addr string) error {
	ctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
	defer cancel()
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if ctx.Err() != nil {
			return fmt.Errorf("connect %s: %w", addr, err)
		}
		time.Sleep(time.Millisecond)
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return err
	}
	defer conn.Close()
	r, err := helloworld.NewGreeterClient(conn).SayHello(ctx, &helloworld.HelloRequest{Name: "bench"})
	if err != nil {
		return fmt.Errorf("SayHello at %s: %w", addr, err)
	}
	if r.GetMessage() != "Hello, bench!" {
		return fmt.Errorf("SayHello at %s = %q", addr, r.GetMessage())
	}
	return nil
}

func median(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

func ms(d time.Duration) float64 { return float64(d.Microseconds()) / 1000 }

// stages collects durations by stage name and reports their medians as
// <stage>-ms metrics.
type stages map[string][]time.Duration

func (s stages) add(name string, d time.Duration) { s[name] = append(s[name], d) }

func (s stages) report(b *testing.B) {
	for k, v := range s {
		b.ReportMetric(ms(median(v)), k+"-ms")
	}
}

// pair collects the medians of a vhive and a bare-qemu sub-benchmark and
// reports their ratio in a third one (the parent of sub-benchmarks prints
// no metrics of its own).
type pair struct{ vhive, bare, bareResume time.Duration }

func (p *pair) report(b *testing.B, name string) {
	b.Run(name, func(b *testing.B) {
		if p.vhive == 0 || p.bare == 0 {
			b.Skip("a side did not run")
		}
		b.ReportMetric(ms(p.vhive), "vhive-ms")
		b.ReportMetric(ms(p.bare), "bare-ms")
		b.ReportMetric(ms(p.vhive-p.bare), "added-ms")
		b.ReportMetric(float64(p.vhive)/float64(p.bare), "ratio")
		if p.bareResume > 0 {
			b.ReportMetric(ms(p.bareResume), "bare+resume-ms")
			b.ReportMetric(float64(p.vhive)/float64(p.bareResume), "ratio-vs-bare+resume")
		}
		b.ReportMetric(0, "ns/op")
	})
}

// miniQMP is the least QMP client that can drive a restore: one command at
// a time, events skipped.
type miniQMP struct {
	c net.Conn
	r *bufio.Reader
}

func dialMiniQMP(ctx context.Context, path string, qemuDone <-chan struct{}) (*miniQMP, error) {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", path)
		if err == nil {
			q := &miniQMP{c: c, r: bufio.NewReader(c)}
			if _, err := q.r.ReadBytes('\n'); err != nil { // greeting
				c.Close()
				return nil, fmt.Errorf("QMP greeting: %w", err)
			}
			if _, err := q.exec(ctx, "qmp_capabilities", nil); err != nil {
				c.Close()
				return nil, err
			}
			return q, nil
		}
		select {
		case <-ctx.Done():
			return nil, fmt.Errorf("QMP %s: %w", path, err)
		case <-qemuDone:
			return nil, errors.New("QEMU exited")
		case <-time.After(time.Millisecond):
		}
	}
}

func (q *miniQMP) exec(ctx context.Context, cmd string, args any) (json.RawMessage, error) {
	if dl, ok := ctx.Deadline(); ok {
		_ = q.c.SetDeadline(dl)
	}
	req := map[string]any{"execute": cmd}
	if args != nil {
		req["arguments"] = args
	}
	line, err := json.Marshal(req)
	if err != nil {
		return nil, err
	}
	if _, err := q.c.Write(append(line, '\n')); err != nil {
		return nil, fmt.Errorf("QMP %s: %w", cmd, err)
	}
	for {
		resp, err := q.r.ReadBytes('\n')
		if err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		var m struct {
			Return json.RawMessage `json:"return"`
			Error  *struct {
				Desc string `json:"desc"`
			} `json:"error"`
			Event string `json:"event"`
		}
		if err := json.Unmarshal(resp, &m); err != nil {
			return nil, fmt.Errorf("QMP %s: %w", cmd, err)
		}
		switch {
		case m.Event != "":
			continue
		case m.Error != nil:
			return nil, fmt.Errorf("QMP %s: %s", cmd, m.Error.Desc)
		default:
			return m.Return, nil
		}
	}
}

// bareVM is a QEMU process started by a benchmark's floor.
type bareVM struct {
	sb    *Sandbox // only its paths and qemuArgs are used
	cmd   *exec.Cmd
	done  chan struct{}
	qmp   *miniQMP
	agent net.Conn
}

// newBare returns the paths of a floor VM: an instance directory of e's
// backend (so that Backend.Cleanup kills a QEMU a failed benchmark left)
// and the backend's socket names.
func newBare(e *env, id, disk string, memMiB int) (*bareVM, error) {
	base := e.b.sockBase(id)
	s := &Sandbox{b: e.b, id: id, dir: e.b.InstanceDir(id), qmpSock: base + ".qmp", agentSck: base + ".agent", disk: disk, memMiB: memMiB}
	if err := os.Mkdir(s.dir, 0o700); err != nil {
		return nil, err
	}
	return &bareVM{sb: s}, nil
}

// start runs QEMU with args and the tap as fd 3.
func (v *bareVM) start(args []string, tap *os.File) error {
	logf, err := os.Create(filepath.Join(v.sb.dir, "qemu.log"))
	if err != nil {
		return err
	}
	defer logf.Close()
	cmd := exec.Command(v.sb.b.cfg.Assets.QEMU, args...)
	cmd.Dir = v.sb.dir
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.ExtraFiles = []*os.File{tap}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		return err
	}
	v.cmd, v.done = cmd, make(chan struct{})
	_ = os.WriteFile(filepath.Join(v.sb.dir, "qemu.pid"), []byte(strconv.Itoa(cmd.Process.Pid)+"\n"), 0o600)
	go func() { _ = cmd.Wait(); close(v.done) }()
	return nil
}

func (v *bareVM) dialAgent(ctx context.Context) error {
	var d net.Dialer
	for {
		c, err := d.DialContext(ctx, "unix", v.sb.agentSck)
		if err == nil {
			v.agent = c
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("agent channel: %w", err)
		case <-v.done:
			return errors.New("QEMU exited")
		case <-time.After(time.Millisecond):
		}
	}
}

// restore loads the snapshot in dir into the QEMU started with -incoming
// defer and runs it.
func (v *bareVM) restore(ctx context.Context, dir string, st stages) error {
	t0 := time.Now()
	q, err := dialMiniQMP(ctx, v.sb.qmpSock, v.done)
	if err != nil {
		return err
	}
	v.qmp = q
	if err := v.dialAgent(ctx); err != nil {
		return err
	}
	st.add("LaunchVMM", time.Since(t0))
	t0 = time.Now()
	defer func() { st.add("LoadState", time.Since(t0)) }()
	if _, err := q.exec(ctx, "migrate-set-capabilities", map[string]any{
		"capabilities": []map[string]any{{"capability": "x-ignore-shared", "state": true}},
	}); err != nil {
		return err
	}
	if _, err := q.exec(ctx, "migrate-incoming", map[string]any{"uri": "exec:cat " + shellQuote(filepath.Join(dir, SnapshotState))}); err != nil {
		return err
	}
	for {
		raw, err := q.exec(ctx, "query-status", nil)
		if err != nil {
			return err
		}
		var st struct {
			Status string `json:"status"`
		}
		if err := json.Unmarshal(raw, &st); err != nil {
			return err
		}
		if st.Status == "paused" {
			break
		}
		if st.Status != "inmigrate" {
			return fmt.Errorf("status %q after migrate-incoming", st.Status)
		}
		time.Sleep(time.Millisecond)
	}
	_, err = q.exec(ctx, "cont", nil)
	return err
}

// resume does the agent's resume handshake as the backend does (clock,
// entropy) and waits for
// its answer; nothing polls QMP meanwhile (the backend does, every
// nudgeEvery).
func (v *bareVM) resume(ctx context.Context, n *netpool.Net) error {
	e, err := entropy()
	if err != nil {
		return err
	}
	res := &agentproto.Resume{TimeUnixNano: time.Now().UnixNano(), Entropy: e}
	if dl, ok := ctx.Deadline(); ok {
		_ = v.agent.SetDeadline(dl)
	} else {
		_ = v.agent.SetDeadline(time.Now().Add(2 * time.Minute))
	}
	if err := agentproto.Write(v.agent, agentproto.Message{Type: agentproto.TypeResume, Resume: res}); err != nil {
		return err
	}
	r := agentproto.NewReader(v.agent)
	for {
		m, err := r.Read()
		if err != nil {
			return fmt.Errorf("agent: %w", err)
		}
		if m.Type == agentproto.TypeResumed {
			if m.Error != "" {
				return fmt.Errorf("agent: %s", m.Error)
			}
			return nil
		}
	}
}

// stop kills QEMU and removes the floor VM's files.
func (v *bareVM) stop() error {
	if v.qmp != nil {
		v.qmp.c.Close()
	}
	if v.agent != nil {
		v.agent.Close()
	}
	if v.cmd != nil {
		_ = v.cmd.Process.Kill()
		select {
		case <-v.done:
		case <-time.After(30 * time.Second):
			return fmt.Errorf("QEMU pid %d does not exit", v.cmd.Process.Pid)
		}
	}
	for _, p := range []string{v.sb.qmpSock, v.sb.agentSck, v.sb.b.MemoryFile(v.sb.id)} {
		_ = os.Remove(p)
	}
	return os.RemoveAll(v.sb.dir)
}

// snapshotHello boots helloworld, answers one call, snapshots it and stops
// it; it returns the snapshot directory and the Net the source ran in,
// taken back from the pool (the floor restores into it: the guest keeps
// the source's address), which the caller must Put back.
func snapshotHello(b *testing.B, e *env, spec func(string) sandbox.Spec) (string, *netpool.Net) {
	b.Helper()
	ctx := context.Background()
	src, err := e.b.Create(ctx, spec("src"))
	if err != nil {
		b.Fatal(err)
	}
	defer src.Stop(ctx)
	if err := src.Start(ctx); err != nil {
		b.Fatal(err)
	}
	if err := firstReply(ctx, src.Endpoint()); err != nil {
		b.Fatal(err)
	}
	dir := filepath.Join(e.root, "snap")
	if err := os.Mkdir(dir, 0o700); err != nil {
		b.Fatal(err)
	}
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		b.Fatal(err)
	}
	ip := src.(*Sandbox).net.GuestIP
	if err := src.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	var others []*netpool.Net
	defer func() {
		for _, n := range others {
			_ = e.pool.Put(ctx, n)
		}
	}()
	for range 8 {
		n, err := e.pool.Get(ctx)
		if err != nil {
			b.Fatal(err)
		}
		if n.GuestIP == ip {
			return dir, n
		}
		others = append(others, n)
	}
	b.Fatalf("the pool did not hand back the source's net (%s)", ip)
	return "", nil
}

// BenchmarkRestore: a restore of a helloworld snapshot to the first
// SayHello answered, through the backend and bare (see the file comment),
// eager and lazy.
func BenchmarkRestore(b *testing.B) {
	e, spec := benchEnv(b)
	ctx := context.Background()
	dir, srcNet := snapshotHello(b, e, spec)
	b.Cleanup(func() { _ = e.pool.Put(context.Background(), srcNet) })
	meta, err := e.b.readMeta(dir, spec("x"))
	if err != nil {
		b.Fatal(err)
	}
	endpoint := net.JoinHostPort(srcNet.GuestIP.String(), strconv.Itoa(build.GuestPort))
	seq := 0
	for _, mode := range []sandbox.MemoryMode{sandbox.MemoryEager, sandbox.MemoryLazy} {
		var p pair
		b.Run(string(mode)+"/vhive", func(b *testing.B) {
			var d []time.Duration
			st := stages{}
			for i := 0; i < b.N; i++ {
				seq++
				id := fmt.Sprintf("r%d", seq)
				t0 := time.Now()
				sb, err := e.b.Restore(ctx, spec(id), dir, sandbox.RestoreOptions{Mode: mode})
				if err != nil {
					b.Fatal(err)
				}
				t1 := time.Now()
				err = firstReply(ctx, sb.Endpoint())
				d = append(d, time.Since(t0))
				st.add("Reply", time.Since(t1))
				st.add("Restore", t1.Sub(t0))
				for k, v := range sb.(sandbox.RestoreReporter).RestoreStats().Stages {
					st.add(k, v)
				}
				b.StopTimer()
				if serr := sb.Stop(ctx); err == nil {
					err = serr
				}
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			p.vhive = median(d)
			b.ReportMetric(ms(p.vhive), "p50-ms")
			st.report(b)
		})
		for _, withResume := range []bool{false, true} {
			name := "/bare-qemu"
			if withResume {
				name = "/bare-qemu+resume"
			}
			b.Run(string(mode)+name, func(b *testing.B) {
				var d, tapD []time.Duration
				st := stages{}
				for i := 0; i < b.N; i++ {
					b.StopTimer()
					seq++
					id := fmt.Sprintf("bare%d", seq)
					v, err := newBare(e, id, meta.Disk, meta.MemoryMiB)
					if err != nil {
						b.Fatal(err)
					}
					t0 := time.Now()
					tap, err := plugTap(srcNet)
					if err != nil {
						b.Fatal(err)
					}
					fwd, err := natUp(ctx, srcNet)
					if err != nil {
						b.Fatal(errors.Join(err, unplugTap(ctx, srcNet, fwd)))
					}
					tapD = append(tapD, time.Since(t0))
					rp := &restoreParams{dir: dir, meta: meta, mode: mode}
					args := v.sb.qemuArgs(rp.memProps(e.b), meta.Vmlinuz, meta.Initramfs, true)
					b.StartTimer()
					t0 = time.Now()
					err = func() error {
						if mode == sandbox.MemoryEager {
							if err := readAll(filepath.Join(dir, SnapshotMemory)); err != nil {
								return err
							}
							st.add("ReadMemory", time.Since(t0))
						}
						t1 := time.Now()
						if err := v.start(args, tap); err != nil {
							return err
						}
						tap.Close()
						if err := v.restore(ctx, dir, st); err != nil {
							return err
						}
						if withResume {
							t1 = time.Now()
							if err := v.resume(ctx, srcNet); err != nil {
								return err
							}
							st.add("ResumeAgent", time.Since(t1))
						}
						t1 = time.Now()
						err := firstReply(ctx, endpoint)
						st.add("Reply", time.Since(t1))
						return err
					}()
					d = append(d, time.Since(t0))
					b.StopTimer()
					tap.Close()
					if err != nil {
						err = fmt.Errorf("%w; console: %s", err, tailOf(filepath.Join(v.sb.dir, "console.log"), 1024))
					}
					err = errors.Join(err, v.stop(), unplugTap(ctx, srcNet, fwd))
					if err != nil {
						b.Fatal(err)
					}
					b.StartTimer()
				}
				if withResume {
					p.bareResume = median(d)
				} else {
					p.bare = median(d)
				}
				b.ReportMetric(ms(median(d)), "p50-ms")
				b.ReportMetric(ms(median(tapD)), "tap-ms")
				st.report(b)
			})
		}
		p.report(b, string(mode)+"/ratio")
	}
}

// BenchmarkBoot: a boot of helloworld to the first SayHello answered,
// through the backend (Create + Start) and bare (see the file comment).
func BenchmarkBoot(b *testing.B) {
	e, spec := benchEnv(b)
	ctx := context.Background()
	seq := 0
	var p pair
	b.Run("vhive", func(b *testing.B) {
		var d []time.Duration
		st := stages{}
		for i := 0; i < b.N; i++ {
			seq++
			t0 := time.Now()
			sb, err := e.b.Create(ctx, spec(fmt.Sprintf("boot%d", seq)))
			if err != nil {
				b.Fatal(err)
			}
			st.add("Create", time.Since(t0))
			t1 := time.Now()
			err = sb.Start(ctx)
			st.add("Start", time.Since(t1))
			if err == nil {
				t1 = time.Now()
				err = firstReply(ctx, sb.Endpoint())
				st.add("Reply", time.Since(t1))
			}
			d = append(d, time.Since(t0))
			b.StopTimer()
			if serr := sb.Stop(ctx); err == nil {
				err = serr
			}
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		p.vhive = median(d)
		b.ReportMetric(ms(p.vhive), "p50-ms")
		st.report(b)
	})
	b.Run("bare-qemu", func(b *testing.B) {
		var d []time.Duration
		for i := 0; i < b.N; i++ {
			b.StopTimer()
			seq++
			id := fmt.Sprintf("bareboot%d", seq)
			sp := spec(id)
			disk, err := e.b.rootfs.Get(ctx, sp.ImageDigest, sp.Rootfs)
			if err != nil {
				b.Fatal(err)
			}
			st, err := startConfig(sp)
			if err != nil {
				b.Fatal(err)
			}
			n, err := e.pool.Get(ctx)
			if err != nil {
				b.Fatal(err)
			}
			st.Net = agentproto.Net{IP: guestIP.String(), Bits: guestPrefix.Bits(), Gateway: tapIP.String()}
			tap, err := plugTap(n)
			if err != nil {
				b.Fatal(errors.Join(err, e.pool.Put(ctx, n)))
			}
			fwd, err := natUp(ctx, n)
			if err != nil {
				b.Fatal(errors.Join(err, unplugTap(ctx, n, fwd), e.pool.Put(ctx, n)))
			}
			v, err := newBare(e, id, disk, e.b.cfg.MemoryMiB)
			if err != nil {
				b.Fatal(err)
			}
			args := v.sb.qemuArgs("mem-path="+e.b.MemoryFile(id)+",share=on", testAssets.Vmlinuz, testAssets.Initramfs, false)
			b.StartTimer()
			t0 := time.Now()
			err = func() error {
				if err := v.start(args, tap); err != nil {
					return err
				}
				tap.Close()
				if err := v.dialAgent(ctx); err != nil {
					return err
				}
				st.TimeUnixNano = time.Now().UnixNano()
				if st.Entropy, err = entropy(); err != nil {
					return err
				}
				if err := agentproto.Write(v.agent, agentproto.Message{Type: agentproto.TypeStart, Start: &st}); err != nil {
					return err
				}
				return firstReply(ctx, net.JoinHostPort(n.GuestIP.String(), strconv.Itoa(sp.Port)))
			}()
			d = append(d, time.Since(t0))
			b.StopTimer()
			tap.Close()
			if err != nil {
				err = fmt.Errorf("%w; console: %s", err, tailOf(filepath.Join(v.sb.dir, "console.log"), 1024))
			}
			err = errors.Join(err, v.stop(), unplugTap(ctx, n, fwd), e.pool.Put(ctx, n))
			if err != nil {
				b.Fatal(err)
			}
			b.StartTimer()
		}
		p.bare = median(d)
		b.ReportMetric(ms(p.bare), "p50-ms")
	})
	p.report(b, "ratio")
}

// smapsRollup reads the memory of pid in KiB by field (Rss, Pss,
// Shared_Clean, Private_Dirty, ...).
func smapsRollup(pid int) (map[string]int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps_rollup", pid))
	if err != nil {
		return nil, err
	}
	m := map[string]int64{}
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && strings.HasSuffix(f[0], ":") {
			if v, err := strconv.ParseInt(f[1], 10, 64); err == nil {
				m[strings.TrimSuffix(f[0], ":")] = v
			}
		}
	}
	return m, nil
}

// mappingPrivate sums Private_Clean + Private_Dirty (KiB) of pid's mappings
// of file.
func mappingPrivate(pid int, file string) (int64, error) {
	data, err := os.ReadFile(fmt.Sprintf("/proc/%d/smaps", pid))
	if err != nil {
		return 0, err
	}
	var sum int64
	in := false
	for _, line := range strings.Split(string(data), "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			continue
		}
		if !strings.HasSuffix(f[0], ":") || strings.Contains(f[0], "-") {
			// A mapping's header: address range, perms, offset, dev, inode, path.
			in = len(f) >= 6 && f[5] == file
			continue
		}
		if in && (f[0] == "Private_Clean:" || f[0] == "Private_Dirty:") && len(f) >= 2 {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			sum += v
		}
	}
	return sum, nil
}

// BenchmarkClonePrivateMemory restores clonesAtOnce clones of one
// helloworld snapshot at once (lazy), has each answer one SayHello, and
// reports the mean per clone of its QEMU process's private memory
// (Private_Clean + Private_Dirty), shared memory (Shared_Clean +
// Shared_Dirty), Pss and Rss, in MiB; and the restores' median time to the
// first reply; guest-ram-private is the part of private that is the guest's
// RAM mapping (pages the guest wrote since the restore, copied on write,
// and pages only this clone read). Sub-benchmarks: QEMU's default TCG
// translation buffer (1 GiB reserved, of which a restored helloworld
// touches ≈16-18 MiB) and smaller ones (Config.TCGBufferMiB, -accel
// tcg,tb-size=N).
func BenchmarkClonePrivateMemory(b *testing.B) {
	const clonesAtOnce = 3
	e, spec := benchEnv(b)
	dir, srcNet := snapshotHello(b, e, spec)
	if err := e.pool.Put(context.Background(), srcNet); err != nil {
		b.Fatal(err)
	}
	ctx := context.Background()
	seq := 0
	for _, tb := range []int{0, 256, 64, 32} {
		name := "tb-size=" + strconv.Itoa(tb)
		if tb == 0 {
			name = "tb-size=qemu-default"
		}
		b.Run(name, func(b *testing.B) {
			// Nothing else uses the backend meanwhile: set its
			// configuration in place for this sub-benchmark's restores.
			e.b.cfg.TCGBufferMiB = tb
			defer func() { e.b.cfg.TCGBufferMiB = 0 }()
			var priv, shr, pss, rss, ram float64
			var lat []time.Duration
			samples := 0
			for i := 0; i < b.N; i++ {
				clones := make([]sandbox.Sandbox, clonesAtOnce)
				errs := make([]error, clonesAtOnce)
				durs := make([]time.Duration, clonesAtOnce)
				var wg sync.WaitGroup
				for j := range clonesAtOnce {
					seq++
					id := fmt.Sprintf("clone%d", seq)
					wg.Add(1)
					go func() {
						defer wg.Done()
						t0 := time.Now()
						sb, err := e.b.Restore(ctx, spec(id), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
						if err != nil {
							errs[j] = err
							return
						}
						clones[j] = sb
						errs[j] = firstReply(ctx, sb.Endpoint())
						durs[j] = time.Since(t0)
					}()
				}
				wg.Wait()
				lat = append(lat, durs...)
				b.StopTimer()
				var err error
				for j, sb := range clones {
					err = errors.Join(err, errs[j])
					if sb == nil || errs[j] != nil {
						continue
					}
					m, rerr := smapsRollup(sb.(*Sandbox).cmd.Process.Pid)
					if rerr != nil {
						err = errors.Join(err, rerr)
						continue
					}
					r, rerr := mappingPrivate(sb.(*Sandbox).cmd.Process.Pid, filepath.Join(dir, SnapshotMemory))
					if rerr != nil {
						err = errors.Join(err, rerr)
						continue
					}
					ram += float64(r) / 1024
					priv += float64(m["Private_Clean"]+m["Private_Dirty"]) / 1024
					shr += float64(m["Shared_Clean"]+m["Shared_Dirty"]) / 1024
					pss += float64(m["Pss"]) / 1024
					rss += float64(m["Rss"]) / 1024
					samples++
				}
				for _, sb := range clones {
					if sb != nil {
						err = errors.Join(err, sb.Stop(ctx))
					}
				}
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
			}
			n := float64(samples)
			b.ReportMetric(priv/n, "private-MiB/clone")
			b.ReportMetric(ram/n, "guest-ram-private-MiB/clone")
			b.ReportMetric(shr/n, "shared-MiB/clone")
			b.ReportMetric(pss/n, "pss-MiB/clone")
			b.ReportMetric(rss/n, "rss-MiB/clone")
			b.ReportMetric(ms(median(lat)), "p50-ms")
		})
	}
}
