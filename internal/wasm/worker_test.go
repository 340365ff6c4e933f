package wasm_test

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/wasm"
	"vhive.dev/vhive/internal/wasm/wasmtest"
)

func TestMain(m *testing.M) {
	wasmtest.RunWorkerIfRequested()
	os.Exit(m.Run())
}

// env is one test's prepared module and directories. Socket paths must stay
// short (108 bytes), so they live in a short temporary directory.
type env struct {
	t         *testing.T
	moduleDir string
	info      *wasm.ModuleInfo
	cache     string
	sockDir   string
}

func newEnv(t *testing.T) *env {
	t.Helper()
	cache := t.TempDir()
	dir, info, err := wasm.PrepareCached(cache, wasmtest.GuestModule(t))
	if err != nil {
		t.Fatalf("PrepareCached: %v", err)
	}
	sock, err := os.MkdirTemp("", "vw")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(sock) })
	return &env{t: t, moduleDir: dir, info: info, cache: wasmtest.CompileCacheDir(), sockDir: sock}
}

type instance struct {
	proc    *wasm.WorkerProcess
	greeter helloworld.GreeterClient
	reply   *wasm.StartReply
}

// start spawns a worker and boots (restore == nil) or restores its instance.
func (e *env) start(name string, moduleDir string, req wasm.StartRequest) (*instance, error) {
	t := e.t
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	o := wasm.WorkerOptions{
		ControlSocket: filepath.Join(e.sockDir, name+".ctl"),
		ModuleDir:     moduleDir,
		CompileCache:  e.cache,
	}
	sc := wasm.SpawnConfig{Command: wasmtest.WorkerCommand(t), Env: wasmtest.WorkerEnvList(), StderrPath: filepath.Join(e.sockDir, name+".stderr")}
	p, err := wasm.SpawnWorker(ctx, sc, o)
	if err != nil {
		t.Fatalf("SpawnWorker: %v", err)
	}
	t.Cleanup(p.Kill)
	req.GreeterSocket = filepath.Join(e.sockDir, name+".sock")
	rep, err := p.Client.Start(ctx, &req)
	if err != nil {
		return nil, err
	}
	conn, err := grpc.NewClient("unix://"+req.GreeterSocket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { conn.Close() })
	return &instance{proc: p, greeter: helloworld.NewGreeterClient(conn), reply: rep}, nil
}

func (e *env) mustStart(name string, req wasm.StartRequest) *instance {
	e.t.Helper()
	in, err := e.start(name, e.moduleDir, req)
	if err != nil {
		e.t.Fatalf("start %s: %v", name, err)
	}
	return in
}

func (in *instance) call(t *testing.T, req string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	r, err := in.greeter.SayHello(ctx, &helloworld.HelloRequest{Name: req})
	if err != nil {
		t.Fatalf("SayHello(%q): %v", req, err)
	}
	return r.GetMessage()
}

func (in *instance) snapshot(t *testing.T) string {
	t.Helper()
	dir := t.TempDir()
	if _, err := in.proc.Client.Snapshot(context.Background(), dir); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	return dir
}

// bootStateful boots the guest with a 4 MiB table and advances its state.
func (e *env) bootStateful(t *testing.T) (*instance, map[string]string) {
	in := e.mustStart("boot", wasm.StartRequest{Env: []string{"VHIVE_TABLE_MB=4"}})
	for i := 1; i <= 3; i++ {
		if got := in.call(t, "inc"); got != string(rune('0'+i)) {
			t.Fatalf("inc #%d = %q", i, got)
		}
	}
	want := map[string]string{
		"get":          "3",
		"sum:1000:500": in.call(t, "sum:1000:500"),
		"lookup:7":     in.call(t, "lookup:7"),
		"echo:x":       "echo x",
		"sleep:20":     "slept",
		"world":        "Hello, world!",
	}
	return in, want
}

func check(t *testing.T, in *instance, want map[string]string) {
	t.Helper()
	for req, w := range want {
		if got := in.call(t, req); got != w {
			t.Errorf("%s = %q, want %q", req, got, w)
		}
	}
}

func TestBootSnapshotRestore(t *testing.T) {
	e := newEnv(t)
	booted, want := e.bootStateful(t)
	snap := booted.snapshot(t)
	if got := booted.call(t, "inc"); got != "4" {
		t.Fatalf("booted instance after snapshot: inc = %q, want 4", got)
	}
	for _, mode := range []string{wasm.RestoreCopy, wasm.RestoreMmap} {
		for i := range 2 {
			t.Run(mode, func(t *testing.T) {
				name := mode + string(rune('0'+i))
				in := e.mustStart(name, wasm.StartRequest{Restore: &wasm.RestoreRequest{Dir: snap, Mode: mode, VerifyMemory: i == 0}})
				check(t, in, want)
				if got := in.call(t, "inc"); got != "4" {
					t.Errorf("restored inc = %q, want 4", got)
				}
				// A snapshot of a restored instance restores too.
				snap2 := in.snapshot(t)
				in2 := e.mustStart(name+"b", wasm.StartRequest{Restore: &wasm.RestoreRequest{Dir: snap2, Mode: wasm.RestoreCopy}})
				if got := in2.call(t, "inc"); got != "5" {
					t.Errorf("re-restored inc = %q, want 5", got)
				}
			})
		}
	}
}

func TestRestoreRefusesOtherModule(t *testing.T) {
	e := newEnv(t)
	booted, _ := e.bootStateful(t)
	snap := booted.snapshot(t)

	// The same code with one more custom section: another digest.
	b, err := os.ReadFile(wasmtest.GuestModule(t))
	if err != nil {
		t.Fatal(err)
	}
	b = append(b, 0, 6, 4, 'v', 'h', 'i', 'x', 1) // custom section "vhix" holding one byte
	other := filepath.Join(t.TempDir(), "other.wasm")
	if err := os.WriteFile(other, b, 0o600); err != nil {
		t.Fatal(err)
	}
	otherDir, otherInfo, err := wasm.PrepareCached(t.TempDir(), other)
	if err != nil {
		t.Fatal(err)
	}
	if otherInfo.Digest == e.info.Digest {
		t.Fatal("test module has the same digest")
	}
	_, err = e.start("other", otherDir, wasm.StartRequest{Restore: &wasm.RestoreRequest{Dir: snap, Mode: wasm.RestoreCopy}})
	if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "different wasm module") {
		t.Fatalf("restore into another module: %v, want FailedPrecondition naming the digest mismatch", err)
	}
}

func copyDir(t *testing.T, src string) string {
	t.Helper()
	dst := t.TempDir()
	for _, f := range []string{wasm.MemoryFile, wasm.StateFile} {
		b, err := os.ReadFile(filepath.Join(src, f))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dst, f), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dst
}

func TestCorruptSnapshotDetected(t *testing.T) {
	e := newEnv(t)
	booted, _ := e.bootStateful(t)
	snap := booted.snapshot(t)
	st, err := wasm.ReadState(snap)
	if err != nil {
		t.Fatalf("ReadState of a good snapshot: %v", err)
	}
	if err := wasm.VerifyMemory(snap, st); err != nil {
		t.Fatalf("VerifyMemory of a good snapshot: %v", err)
	}
	cases := []struct {
		name    string
		corrupt func(dir string) error
		verify  bool // needs the memory checksum to notice
	}{
		{"state flipped byte", func(dir string) error { return flip(filepath.Join(dir, wasm.StateFile), 200) }, false},
		{"state truncated", func(dir string) error { return os.Truncate(filepath.Join(dir, wasm.StateFile), 100) }, false},
		{"state missing", func(dir string) error { return os.Remove(filepath.Join(dir, wasm.StateFile)) }, false},
		{"memory truncated", func(dir string) error { return os.Truncate(filepath.Join(dir, wasm.MemoryFile), st.MemorySize-4096) }, false},
		{"memory flipped byte", func(dir string) error { return flip(filepath.Join(dir, wasm.MemoryFile), 1<<20+17) }, true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := copyDir(t, snap)
			if err := c.corrupt(dir); err != nil {
				t.Fatal(err)
			}
			st, err := wasm.ReadState(dir)
			if err == nil && c.verify {
				err = wasm.VerifyMemory(dir, st)
			}
			if !errors.Is(err, wasm.ErrCorruptSnapshot) {
				t.Fatalf("ReadState/VerifyMemory = %v, want ErrCorruptSnapshot", err)
			}
			_, err = e.start("corrupt"+string(rune('a'+i)), e.moduleDir,
				wasm.StartRequest{Restore: &wasm.RestoreRequest{Dir: dir, Mode: wasm.RestoreCopy, VerifyMemory: true}})
			if status.Code(err) != codes.FailedPrecondition || !strings.Contains(err.Error(), "corrupt wasm snapshot") {
				b, _ := os.ReadFile(filepath.Join(e.sockDir, "corrupt"+string(rune('a'+i))+".stderr"))
				t.Logf("stderr: %s", b)
				t.Fatalf("restore of a corrupt snapshot: %v, want FailedPrecondition naming the corruption", err)
			}
		})
	}
}

func flip(path string, off int64) error {
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		return err
	}
	b[0] ^= 0xff
	_, err = f.WriteAt(b, off)
	return err
}

func TestGuestErrorAndCrash(t *testing.T) {
	e := newEnv(t)
	in := e.mustStart("crash", wasm.StartRequest{})
	_, err := in.greeter.SayHello(context.Background(), &helloworld.HelloRequest{Name: "fail"})
	if status.Code(err) != codes.Unknown || !strings.Contains(err.Error(), "failed on purpose") {
		t.Fatalf("guest error status: %v", err)
	}
	if got := in.call(t, "inc"); got != "1" {
		t.Fatalf("after a guest error: inc = %q", got)
	}
	_, err = in.greeter.SayHello(context.Background(), &helloworld.HelloRequest{Name: "exit"})
	if err == nil {
		t.Fatal("guest exit mid-request: no error")
	}
	select {
	case <-in.proc.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("worker still running after its guest exited")
	}
	if perr := in.proc.Err(); perr == nil || !strings.Contains(perr.Error(), "exit_code(3)") {
		t.Fatalf("worker exit error = %v, want the guest's exit code 3 in its stderr", perr)
	}
}

func TestWorkerKilledMidRequest(t *testing.T) {
	e := newEnv(t)
	in := e.mustStart("killed", wasm.StartRequest{})
	errc := make(chan error, 1)
	go func() {
		_, err := in.greeter.SayHello(context.Background(), &helloworld.HelloRequest{Name: "sleep:10000"})
		errc <- err
	}()
	time.Sleep(300 * time.Millisecond) // let the request enter the guest
	in.proc.Kill()
	select {
	case err := <-errc:
		if status.Code(err) != codes.Unavailable {
			t.Fatalf("request to a killed worker: %v, want Unavailable", err)
		}
	case <-time.After(30 * time.Second):
		t.Fatal("request still pending after the worker was killed")
	}
	if in.proc.Err() == nil {
		t.Fatal("Err() is nil after the worker died")
	}
}

func TestMemoryLimit(t *testing.T) {
	e := newEnv(t)
	// A 32 MiB table does not fit in 24 MiB of linear memory: the guest's
	// memory.grow fails and its runtime gives up during _initialize.
	_, err := e.start("limited", e.moduleDir, wasm.StartRequest{Env: []string{"VHIVE_TABLE_MB=32"}, MaxMemory: 24 << 20})
	if err == nil {
		t.Fatal("boot beyond the memory limit succeeded")
	}
	in := e.mustStart("fits", wasm.StartRequest{Env: []string{"VHIVE_TABLE_MB=4"}, MaxMemory: 24 << 20})
	if got := in.call(t, "inc"); got != "1" {
		t.Fatalf("inc = %q", got)
	}
	snap := in.snapshot(t)
	st, err := wasm.ReadState(snap)
	if err != nil {
		t.Fatal(err)
	}
	// A restore under a limit below the snapshot's memory is refused.
	_, err = e.start("small", e.moduleDir, wasm.StartRequest{MaxMemory: uint64(st.MemorySize) - wasm.WasmPageSize,
		Restore: &wasm.RestoreRequest{Dir: snap, Mode: wasm.RestoreCopy}})
	if err == nil || !strings.Contains(err.Error(), "exceeds the limit") {
		t.Fatalf("restore above the memory limit: %v", err)
	}
}
