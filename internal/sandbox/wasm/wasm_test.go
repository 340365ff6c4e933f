package wasm

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/memory"
	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/sandbox/sandboxtest"
	"vhive.dev/vhive/internal/testutil"
	wasmrt "vhive.dev/vhive/internal/wasm"
	"vhive.dev/vhive/internal/wasm/wasmtest"
)

func TestMain(m *testing.M) {
	wasmtest.RunWorkerIfRequested()
	os.Exit(m.Run())
}

type env struct {
	b      *Backend
	root   string
	module string
}

type envOpts struct {
	pool     int
	noMemory bool
	chunk    int
}

// newEnv makes a backend with a real memory manager, workers re-executing
// this test binary. userfaultfd needs root here (vm.unprivileged_userfaultfd).
func newEnv(t testing.TB, o envOpts) *env {
	t.Helper()
	testutil.RequiresRoot(t)
	root, err := os.MkdirTemp("", "vw") // short: socket paths
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(root) })
	cfg := Config{
		WorkerCommand: wasmtest.WorkerCommand(t),
		WorkerEnv:     wasmtest.WorkerEnvList(),
		Root:          root,
		CacheDir:      filepath.Join(root, "cache"),
		PoolSize:      o.pool,
		ChunkPages:    o.chunk,
		// Shared across tests: compiling the guest costs ~1 s.
		CompileCacheDir: wasmtest.CompileCacheDir(),
	}
	if !o.noMemory {
		mgr, err := memory.NewManager(memory.Config{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { mgr.Close() })
		cfg.Memory = mgr
	}
	b, err := New(context.Background(), cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() { b.Close() })
	return &env{b: b, root: root, module: wasmtest.GuestModule(t)}
}

func (e *env) spec(id string, envv ...string) sandbox.Spec {
	return sandbox.Spec{ID: id, Function: "guest", WasmModule: e.module, Process: sandbox.Process{Env: envv}}
}

// leftovers lists worker directories and worker processes under root that
// no live sandbox or pooled worker owns.
func (e *env) leftovers() []string {
	var left []string
	ents, _ := os.ReadDir(e.root)
	e.b.mu.Lock()
	defer e.b.mu.Unlock()
	for _, d := range ents {
		dir := filepath.Join(e.root, d.Name())
		if strings.HasPrefix(d.Name(), "w") && !e.b.owned[dir] {
			left = append(left, "directory "+dir)
		}
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		b, err := os.ReadFile(p)
		if err != nil || !strings.Contains(string(b), "\x00"+e.root+"/w") {
			continue
		}
		args := strings.Split(string(b), "\x00")
		for i, a := range args {
			if a == "--control" && i+1 < len(args) && !e.b.owned[filepath.Dir(args[i+1])] {
				left = append(left, "process "+p)
			}
		}
	}
	return left
}

func TestConformance(t *testing.T) {
	for _, pool := range []int{0, 1} {
		t.Run(fmt.Sprintf("pool%d", pool), func(t *testing.T) {
			e := newEnv(t, envOpts{pool: pool})
			sandboxtest.Run(t, e.b, sandboxtest.Config{
				Spec: func(t testing.TB, id string) sandbox.Spec { return e.spec(id) },
				Exiting: func(t testing.TB, id, marker string) sandbox.Spec {
					return e.spec(id, "VHIVE_TEST_EXIT=1", "VHIVE_TEST_STDERR="+marker)
				},
				Ping: func(ctx context.Context, endpoint string) error {
					_, err := call(ctx, endpoint, "ping")
					return err
				},
				Leftovers: func(string) []string { return e.leftovers() },
			})
		})
	}
}

func call(ctx context.Context, endpoint, req string) (string, error) {
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "", err
	}
	defer conn.Close()
	r, err := helloworld.NewGreeterClient(conn).SayHello(ctx, &helloworld.HelloRequest{Name: req})
	if err != nil {
		return "", err
	}
	return r.GetMessage(), nil
}

func mustCall(t testing.TB, sb sandbox.Sandbox, req string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	got, err := call(ctx, sb.Endpoint(), req)
	if err != nil {
		t.Fatalf("%s: SayHello(%q): %v", sb.ID(), req, err)
	}
	return got
}

func (e *env) boot(t testing.TB, id string, envv ...string) sandbox.Sandbox {
	t.Helper()
	sb, err := e.b.Create(context.Background(), e.spec(id, envv...))
	if err != nil {
		t.Fatalf("Create: %v", err)
	}
	t.Cleanup(func() { sb.Stop(context.Background()) })
	if err := sb.Start(context.Background()); err != nil {
		t.Fatalf("Start: %v", err)
	}
	return sb
}

func (e *env) restore(t testing.TB, id, dir string, opts sandbox.RestoreOptions) sandbox.Sandbox {
	t.Helper()
	sb, err := e.b.Restore(context.Background(), e.spec(id), dir, opts)
	if err != nil {
		t.Fatalf("Restore(%s): %v", opts.Mode, err)
	}
	t.Cleanup(func() { sb.Stop(context.Background()) })
	return sb
}

// TestRestoreModes: a stateful guest (counter, 16 MiB table built at init,
// a goroutine) answers identically after restores in every memory mode, and
// a working set recorded with one input serves another input correctly.
func TestRestoreModes(t *testing.T) {
	e := newEnv(t, envOpts{})
	booted := e.boot(t, "boot", "VHIVE_TABLE_MB=16")
	for range 3 {
		mustCall(t, booted, "inc")
	}
	snap := t.TempDir()
	if err := booted.(sandbox.Snapshotter).Snapshot(context.Background(), snap); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	inputs := []string{"get", "lookup:1", "lookup:2", "sum:0:2000000", "echo:hi", "sleep:5", "inc"}
	want := map[string]string{}
	for _, in := range inputs {
		want[in] = mustCall(t, booted, in)
	}
	if want["inc"] != "4" {
		t.Fatalf("booted inc = %q", want["inc"])
	}
	ws := filepath.Join(t.TempDir(), "ws")
	steps := []struct {
		mode  sandbox.MemoryMode
		first string // the first request, before the checks
		flip  bool   // flip a byte of the WS file's last data chunk first
	}{
		{sandbox.MemoryEager, "lookup:1", false},
		{sandbox.MemoryLazy, "lookup:1", false},
		{sandbox.MemoryRecord, "lookup:1", false},
		{sandbox.MemoryPrefetch, "lookup:1", false},
		{sandbox.MemoryPrefetch, "lookup:2", false}, // another input than recorded
		{sandbox.MemoryPrefetch, "lookup:1", false},
		// The WS served the restores above; damaged now, the damaged
		// chunk is never installed and its pages are served lazily: every
		// reply is still right.
		{sandbox.MemoryPrefetch, "lookup:1", true},
	}
	var lazyFaults, wsPages int64
	for i, st := range steps {
		if st.flip {
			b, err := os.ReadFile(ws)
			if err != nil {
				t.Fatal(err)
			}
			parsed, err := memory.ParseWorkingSet(b)
			if err != nil {
				t.Fatal(err)
			}
			dataEnd := len(b) - (len(parsed.Data)+4095)&^4095 + len(parsed.Data)
			b[dataEnd-100] ^= 0x10
			if err := os.WriteFile(ws, b, 0o600); err != nil {
				t.Fatal(err)
			}
		}
		sb := e.restore(t, fmt.Sprintf("r%d", i), snap, sandbox.RestoreOptions{Mode: st.mode, WorkingSet: ws})
		if got := mustCall(t, sb, st.first); got != want[st.first] {
			t.Errorf("%s: first %s = %q, want %q", st.mode, st.first, got, want[st.first])
		}
		stats := sb.(sandbox.RestoreReporter).RestoreStats()
		if st.mode == sandbox.MemoryRecord {
			if err := sb.(sandbox.Recorder).FinishRecord(context.Background()); err != nil {
				t.Fatalf("FinishRecord: %v", err)
			}
			stats = sb.(sandbox.RestoreReporter).RestoreStats()
			if stats.Pages["RecPages"] == 0 {
				t.Errorf("record: RecPages = 0 (%v)", stats.Pages)
			}
		}
		t.Logf("%s first %s: stages %v pages %v", st.mode, st.first, stats.Stages, stats.Pages)
		switch st.mode {
		case sandbox.MemoryLazy:
			lazyFaults = stats.Pages["Faults"]
			if lazyFaults == 0 {
				t.Errorf("lazy restore served no faults: %v", stats.Pages)
			}
		case sandbox.MemoryPrefetch:
			if stats.Pages["RecPages"] == 0 {
				t.Errorf("prefetch installed nothing: %v", stats.Pages)
			}
			if st.flip {
				if stats.Pages["RecPages"] >= wsPages || stats.Pages["Unique"] == 0 {
					t.Errorf("damaged WS: installed %d of %d pages, %d served lazily; want the damaged chunk served lazily", stats.Pages["RecPages"], wsPages, stats.Pages["Unique"])
				}
				break
			}
			wsPages = stats.Pages["RecPages"]
			if st.first == "lookup:1" && stats.Pages["Unique"]*10 > lazyFaults {
				t.Errorf("prefetch of the recorded input still faulted %d pages (lazy: %d)", stats.Pages["Unique"], lazyFaults)
			}
		}
		for _, in := range inputs {
			if got := mustCall(t, sb, in); got != want[in] {
				t.Errorf("%s restore %d: %s = %q, want %q", st.mode, i, in, got, want[in])
			}
		}
		if st.mode == sandbox.MemoryLazy {
			// A snapshot of a lazily restored instance reads its memory
			// through the memory manager and restores like any other.
			snap2 := t.TempDir()
			if err := sb.(sandbox.Snapshotter).Snapshot(context.Background(), snap2); err != nil {
				t.Fatalf("Snapshot of a lazily restored instance: %v", err)
			}
			again := e.restore(t, "again", snap2, sandbox.RestoreOptions{Mode: sandbox.MemoryEager})
			if got := mustCall(t, again, "inc"); got != "5" {
				t.Errorf("restore of a snapshot of a lazy restore: inc = %q, want 5", got)
			}
			if err := again.Stop(context.Background()); err != nil {
				t.Errorf("Stop: %v", err)
			}
		}
		if err := sb.Stop(context.Background()); err != nil {
			t.Errorf("Stop: %v", err)
		}
	}
	if left := e.leftovers(); len(left) > 0 {
		t.Errorf("left behind: %v", left)
	}
}

func TestRestoreRefusals(t *testing.T) {
	e := newEnv(t, envOpts{})
	booted := e.boot(t, "boot")
	snap := t.TempDir()
	if err := booted.(sandbox.Snapshotter).Snapshot(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	// Another module: the guest bytes plus a custom section.
	b, err := os.ReadFile(e.module)
	if err != nil {
		t.Fatal(err)
	}
	other := filepath.Join(t.TempDir(), "other.wasm")
	if err := os.WriteFile(other, append(b, 0, 6, 4, 'v', 'h', 'i', 'x', 1), 0o600); err != nil {
		t.Fatal(err)
	}
	spec := e.spec("other")
	spec.WasmModule = other
	if _, err := e.b.Restore(ctx, spec, snap, sandbox.RestoreOptions{Mode: sandbox.MemoryEager}); !errors.Is(err, wasmrt.ErrDigestMismatch) {
		t.Errorf("restore into another module: %v, want ErrDigestMismatch", err)
	}

	// A corrupt memory file, seen before any restore verified it.
	bad := t.TempDir()
	for _, f := range []string{wasmrt.MemoryFile, wasmrt.StateFile} {
		data, err := os.ReadFile(filepath.Join(snap, f))
		if err != nil {
			t.Fatal(err)
		}
		if f == wasmrt.MemoryFile {
			data[2<<20+5] ^= 1
		}
		if err := os.WriteFile(filepath.Join(bad, f), data, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	for _, m := range []sandbox.MemoryMode{sandbox.MemoryLazy, sandbox.MemoryEager} {
		if _, err := e.b.Restore(ctx, e.spec("bad"+string(m)), bad, sandbox.RestoreOptions{Mode: m}); !errors.Is(err, wasmrt.ErrCorruptSnapshot) {
			t.Errorf("restore(%s) of a corrupt memory file: %v, want ErrCorruptSnapshot", m, err)
		}
	}
	if err := os.Truncate(filepath.Join(bad, wasmrt.StateFile), 50); err != nil {
		t.Fatal(err)
	}
	if _, err := e.b.Restore(ctx, e.spec("badstate"), bad, sandbox.RestoreOptions{Mode: sandbox.MemoryEager}); !errors.Is(err, wasmrt.ErrCorruptSnapshot) {
		t.Errorf("restore of a truncated state file: %v, want ErrCorruptSnapshot", err)
	}
	if _, err := e.b.Restore(ctx, e.spec("nows"), snap, sandbox.RestoreOptions{Mode: sandbox.MemoryPrefetch}); err == nil {
		t.Error("prefetch without a working-set path succeeded")
	}

	noMem := newEnv(t, envOpts{noMemory: true})
	if c := noMem.b.Capabilities(); c.LazyMemory || c.REAP || !c.Snapshot {
		t.Errorf("capabilities without a memory manager: %+v", c)
	}
	if _, err := noMem.b.Restore(ctx, noMem.spec("lazy"), snap, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy}); !errors.Is(err, sandbox.ErrNotSupported) {
		t.Errorf("lazy restore without a memory manager: %v, want ErrNotSupported", err)
	}
	if left := e.leftovers(); len(left) > 0 {
		t.Errorf("failed restores left: %v", left)
	}
}

func TestCrashMidRequest(t *testing.T) {
	e := newEnv(t, envOpts{})
	sb := e.boot(t, "crash")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	_, err := call(ctx, sb.Endpoint(), "exit")
	if err == nil {
		t.Fatal("a request whose guest exits succeeded")
	}
	select {
	case <-sb.Done():
	case <-ctx.Done():
		t.Fatal("Done not closed after the guest exited mid-request")
	}
	if err := sb.Err(); err == nil || !strings.Contains(err.Error(), "exit_code(3)") {
		t.Fatalf("Err = %v, want the guest exit status", err)
	}

	// The worker killed while a request runs in the guest.
	sb2 := e.boot(t, "killed")
	errc := make(chan error, 1)
	go func() {
		_, err := call(ctx, sb2.Endpoint(), "sleep:20000")
		errc <- err
	}()
	time.Sleep(300 * time.Millisecond)
	sb2.(*Sandbox).w.proc.Kill()
	if err := <-errc; status.Code(err) != codes.Unavailable {
		t.Fatalf("request to a killed worker: %v, want Unavailable", err)
	}
	<-sb2.Done()
	if sb2.Err() == nil {
		t.Fatal("Err nil after the worker was killed")
	}
	if err := sb2.Stop(ctx); err != nil {
		t.Fatalf("Stop after a crash: %v", err)
	}
}

// TestMemoryServerDies: a lazily restored instance whose page server goes
// away ends (the manager kills it) instead of hanging.
func TestMemoryServerDies(t *testing.T) {
	e := newEnv(t, envOpts{})
	booted := e.boot(t, "boot", "VHIVE_TABLE_MB=16")
	snap := t.TempDir()
	if err := booted.(sandbox.Snapshotter).Snapshot(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	sb := e.restore(t, "lazy", snap, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
	mustCall(t, sb, "get")
	sb.(*Sandbox).mem.Close()
	select {
	case <-sb.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("instance still running after its memory server closed")
	}
	if sb.Err() == nil {
		t.Fatal("Err is nil")
	}
}

func TestPoolAndCleanup(t *testing.T) {
	e := newEnv(t, envOpts{pool: 1})
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	if err := e.b.Warm(ctx, e.module); err != nil {
		t.Fatalf("Warm: %v", err)
	}
	sb := e.boot(t, "pooled")
	if !sb.(*Sandbox).ReadyWorker() || sb.(sandbox.RestoreReporter).RestoreStats().Pages["ReadyWorker"] != 1 {
		t.Error("a cold start after Warm did not find a ready worker")
	}
	if got := mustCall(t, sb, "inc"); got != "1" {
		t.Errorf("pooled inc = %q", got)
	}
	if err := e.b.Warm(ctx, e.module); err != nil {
		t.Fatalf("Warm: %v", err)
	}

	// A second backend on the same root, as after a daemon restart: its
	// Cleanup kills the first one's workers (pooled and running) and
	// removes their directories.
	pid := sb.(*Sandbox).Pid()
	b2, err := New(ctx, Config{WorkerCommand: e.b.cfg.WorkerCommand, Root: e.root, CacheDir: e.b.cfg.CacheDir})
	if err != nil {
		t.Fatal(err)
	}
	defer b2.Close()
	if err := b2.Cleanup(ctx); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	select {
	case <-sb.Done():
	case <-ctx.Done():
		t.Fatalf("worker %d survived Cleanup", pid)
	}
	ents, _ := filepath.Glob(filepath.Join(e.root, "w*"))
	if len(ents) != 0 {
		t.Errorf("Cleanup left %v", ents)
	}
	// Cleanup leaves other files alone.
	if _, err := os.Stat(e.b.cfg.CacheDir); err != nil {
		t.Errorf("Cleanup removed the cache: %v", err)
	}
}

func TestNewValidates(t *testing.T) {
	ok := Config{WorkerCommand: []string{"/bin/true"}, Root: t.TempDir(), CacheDir: t.TempDir()}
	if _, err := New(context.Background(), ok); err != nil {
		t.Fatalf("New(%+v): %v", ok, err)
	}
	for name, mut := range map[string]func(*Config){
		"no command":    func(c *Config) { c.WorkerCommand = nil },
		"relative root": func(c *Config) { c.Root = "vw" },
		"long root":     func(c *Config) { c.Root = "/tmp/" + strings.Repeat("x", 100) },
		"no cache":      func(c *Config) { c.CacheDir = "" },
		"pool":          func(c *Config) { c.PoolSize = -1 },
		"worker env":    func(c *Config) { c.WorkerEnv = []string{"NOEQUALS"} },
	} {
		c := ok
		mut(&c)
		if _, err := New(context.Background(), c); err == nil || !strings.Contains(err.Error(), "wasm backend") {
			t.Errorf("%s: New = %v, want an error naming the backend", name, err)
		}
	}
}

// TestCleanupSparesRecycledPids: a pid file naming a process that is not
// that directory's worker (the pid was reused) must not get it killed.
func TestCleanupSparesRecycledPids(t *testing.T) {
	e := newEnv(t, envOpts{noMemory: true})
	other := exec.Command("sleep", "60")
	if err := other.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		other.Process.Kill()
		other.Wait()
	}()
	dir := filepath.Join(e.root, "wstale")
	if err := os.MkdirAll(dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, pidFile), []byte(fmt.Sprintf("%d\n", other.Process.Pid)), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.b.Cleanup(context.Background()); err != nil {
		t.Fatalf("Cleanup: %v", err)
	}
	// Not waited for: a killed child would be a zombie.
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", other.Process.Pid))
	if err != nil || strings.Contains(string(stat), ") Z ") {
		t.Fatalf("Cleanup killed an unrelated process %d: %s %v", other.Process.Pid, stat, err)
	}
	if _, err := os.Stat(dir); !os.IsNotExist(err) {
		t.Errorf("stale directory %s not removed: %v", dir, err)
	}
}

// TestConcurrentClones: several instances restored at once from one
// snapshot, in every memory mode, each continue from the same state
// independently.
func TestConcurrentClones(t *testing.T) {
	e := newEnv(t, envOpts{pool: 2})
	booted := e.boot(t, "boot", "VHIVE_TABLE_MB=8")
	mustCall(t, booted, "inc")
	snap := t.TempDir()
	if err := booted.(sandbox.Snapshotter).Snapshot(context.Background(), snap); err != nil {
		t.Fatal(err)
	}
	want := mustCall(t, booted, "lookup:9")
	ws := filepath.Join(t.TempDir(), "ws")
	rec := e.restore(t, "rec", snap, sandbox.RestoreOptions{Mode: sandbox.MemoryRecord, WorkingSet: ws})
	mustCall(t, rec, "lookup:9")
	if err := rec.(sandbox.Recorder).FinishRecord(context.Background()); err != nil {
		t.Fatal(err)
	}
	modes := []sandbox.MemoryMode{sandbox.MemoryEager, sandbox.MemoryLazy, sandbox.MemoryPrefetch,
		sandbox.MemoryEager, sandbox.MemoryLazy, sandbox.MemoryPrefetch}
	errs := make(chan error, len(modes))
	for i, m := range modes {
		go func() {
			errs <- func() error {
				ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
				defer cancel()
				sb, err := e.b.Restore(ctx, e.spec(fmt.Sprintf("clone%d", i)), snap, sandbox.RestoreOptions{Mode: m, WorkingSet: ws})
				if err != nil {
					return fmt.Errorf("clone %d (%s): %w", i, m, err)
				}
				defer sb.Stop(context.Background())
				for k := 2; k <= 4; k++ {
					if got, err := call(ctx, sb.Endpoint(), "inc"); err != nil || got != fmt.Sprint(k) {
						return fmt.Errorf("clone %d (%s): inc = %q, %v; want %d", i, m, got, err, k)
					}
				}
				if got, err := call(ctx, sb.Endpoint(), "lookup:9"); err != nil || got != want {
					return fmt.Errorf("clone %d (%s): lookup = %q, %v; want %q", i, m, got, err, want)
				}
				return nil
			}()
		}()
	}
	for range modes {
		if err := <-errs; err != nil {
			t.Error(err)
		}
	}
}

// TestSnapshotUnderLoad hammers one instance with concurrent requests while
// snapshots are taken: each snapshot lands between two guest calls, so a
// restore of it continues from a counter value the live instance had.
func TestSnapshotUnderLoad(t *testing.T) {
	e := newEnv(t, envOpts{})
	sb := e.boot(t, "hammer")
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	const workers, calls = 4, 40
	errs := make(chan error, workers)
	for range workers {
		go func() {
			for range calls {
				if _, err := call(ctx, sb.Endpoint(), "inc"); err != nil {
					errs <- err
					return
				}
			}
			errs <- nil
		}()
	}
	var snaps []string
	for range 3 {
		dir := t.TempDir()
		if err := sb.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
			t.Fatalf("Snapshot under load: %v", err)
		}
		snaps = append(snaps, dir)
	}
	for range workers {
		if err := <-errs; err != nil {
			t.Fatal(err)
		}
	}
	if got := mustCall(t, sb, "get"); got != fmt.Sprint(workers*calls) {
		t.Fatalf("counter after %d increments = %s", workers*calls, got)
	}
	prev := 0
	for i, dir := range snaps {
		rs := e.restore(t, fmt.Sprintf("h%d", i), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
		var n int
		if _, err := fmt.Sscan(mustCall(t, rs, "get"), &n); err != nil {
			t.Fatal(err)
		}
		if n < prev || n > workers*calls {
			t.Errorf("snapshot %d restored counter %d (previous snapshot %d, final %d)", i, n, prev, workers*calls)
		}
		prev = n
		if got := mustCall(t, rs, "inc"); got != fmt.Sprint(n+1) {
			t.Errorf("snapshot %d: inc after restore = %s, want %d", i, got, n+1)
		}
		rs.Stop(ctx)
	}
}
