package python

import (
	"context"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/daemon"
	"vhive.dev/vhive/internal/debimage"
	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
	"vhive.dev/vhive/internal/wasm/wasmtest"
)

func TestMain(m *testing.M) {
	// Re-exec'd as a wasm sandbox worker by the daemon's wasm backend.
	wasmtest.RunWorkerIfRequested()
	code := m.Run()
	os.RemoveAll(suiteOut)
	os.Exit(code)
}

// requiresMmdebstrap skips (fails in CI) without mmdebstrap.
func requiresMmdebstrap(t testing.TB) {
	t.Helper()
	testutil.RequiresRoot(t)
	if _, err := exec.LookPath("mmdebstrap"); err != nil {
		msg := "mmdebstrap not found (apt-get install mmdebstrap; make deps installs it): " + err.Error()
		if os.Getenv("CI") != "" {
			t.Fatal(msg)
		}
		t.Skip(msg)
	}
}

var (
	suiteOnce   sync.Once
	suiteImages map[string]debimage.Image
	suiteErr    error
	suiteOut    = filepath.Join(os.TempDir(), fmt.Sprintf("vhive-python-suite-%d", os.Getpid()))
)

// buildSuite builds the CI set once per test binary (bases come from
// $VHIVE_CACHE/debimage, so only the first run on a machine is slow).
func buildSuite(t testing.TB) map[string]debimage.Image {
	t.Helper()
	requiresMmdebstrap(t)
	suiteOnce.Do(func() {
		dirs, err := debimage.Functions(".", false)
		if err != nil {
			suiteErr = err
			return
		}
		// One goroutine per package set: the bases (mmdebstrap) build
		// concurrently, the functions of one set one after another.
		groups := map[string][]string{}
		for _, d := range dirs {
			pkgs, err := debimage.ReadPackages(filepath.Join(d, "packages"))
			if err != nil {
				suiteErr = fmt.Errorf("%s: %w", d, err)
				return
			}
			k := debimage.BaseKey(debimage.DefaultSuite, pkgs)
			groups[k] = append(groups[k], d)
		}
		suiteImages = map[string]debimage.Image{}
		var mu sync.Mutex
		var wg sync.WaitGroup
		for _, group := range groups {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for _, d := range group {
					start := time.Now()
					img, err := debimage.Build(context.Background(), debimage.Options{Dir: d, OutDir: suiteOut, Formats: []build.Format{build.FormatLayout}})
					mu.Lock()
					if err != nil && suiteErr == nil {
						suiteErr = err
					}
					if err == nil {
						t.Logf("built %s (%s) in %.1fs, base %s cached=%v", img.Ref, img.Digest, time.Since(start).Seconds(), img.BaseKey, img.BaseCached)
						suiteImages[img.Function] = img
					}
					mu.Unlock()
					if err != nil {
						return
					}
				}
			}()
		}
		wg.Wait()
	})
	if suiteErr != nil {
		t.Fatalf("build the Python suite: %v", suiteErr)
	}
	return suiteImages
}

type testDaemon struct {
	client vhivepb.ControlClient
}

// startDaemon runs a daemon in-process on its own state dir, socket,
// network prefix and subnet (10.180.<n>.0/24).
func startDaemon(t *testing.T, n int, sandboxes ...string) *testDaemon {
	t.Helper()
	state := t.TempDir()
	cfg := daemon.Config{
		StateDir:     state,
		Socket:       filepath.Join(state, "vhive.sock"),
		Gateway:      "off",
		RunscPath:    testutil.RunscPath(t),
		RuncPath:     testutil.RuncPath(t),
		Sandboxes:    sandboxes,
		NetPoolSize:  2,
		NetPrefix:    fmt.Sprintf("h10p%d", n),
		Subnet:       netip.MustParsePrefix(fmt.Sprintf("10.180.%d.0/24", n)),
		ReadyTimeout: 60 * time.Second,
		QueueTimeout: 2 * time.Minute,
		// wasm: a ready worker per module, and 16 pages per lazy fault
		// (--wasm-chunk-pages 16): 1-page faults make a lazy restore of a
		// big heap take tens of seconds on this nested VM.
		WasmPoolSize:   1,
		WasmChunkPages: 16,
	}
	ctx, cancel := context.WithCancel(context.Background())
	d, err := daemon.New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatalf("daemon.New: %v", err)
	}
	var serveErr error
	served := make(chan struct{})
	go func() {
		serveErr = d.Serve(ctx)
		close(served)
	}()
	var conn *grpc.ClientConn
	t.Cleanup(func() {
		if conn != nil {
			conn.Close()
		}
		cancel()
		<-served
		if serveErr != nil {
			t.Errorf("daemon: %v", serveErr)
		}
		if left := nodetest.Snapshot(state, cfg.NetPrefix).Netns; len(left) > 0 {
			t.Errorf("namespaces left behind: %v", left)
		}
	})
	wait, cancelWait := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelWait()
	conn, err = nodetest.Connect(wait, cfg.Socket, served)
	if err != nil {
		t.Fatal(err)
	}
	return &testDaemon{client: vhivepb.NewControlClient(conn)}
}

func (td *testDaemon) invoke(t *testing.T, fn, payload string) *vhivepb.InvokeResponse {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	resp, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte(payload)})
	if err != nil {
		t.Fatalf("invoke %s %q: %v", fn, payload, err)
	}
	return resp
}

func (td *testDaemon) deploy(t *testing.T, spec *vhivepb.FunctionSpec) {
	t.Helper()
	if _, err := td.client.Deploy(context.Background(), &vhivepb.DeployRequest{Spec: spec}); err != nil {
		t.Fatalf("deploy %s: %v", spec.Name, err)
	}
}

func (td *testDaemon) waitSnapshot(t *testing.T, fn string) {
	t.Helper()
	deadline := time.Now().Add(3 * time.Minute)
	for {
		ls, err := td.client.ListSnapshots(context.Background(), &vhivepb.ListSnapshotsRequest{Function: fn})
		if err != nil {
			t.Fatal(err)
		}
		if len(ls.Snapshots) == 1 {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("no snapshot of %s after 3 minutes", fn)
		}
		time.Sleep(200 * time.Millisecond)
	}
}

func (td *testDaemon) stopInstances(t *testing.T, fn string) {
	t.Helper()
	if _, err := td.client.StopInstances(context.Background(), &vhivepb.StopInstancesRequest{Function: fn}); err != nil {
		t.Fatal(err)
	}
}

func stage(r *vhivepb.InvokeResponse, name string) time.Duration {
	for _, s := range r.Stages {
		if s.Name == name {
			return time.Duration(s.Micros) * time.Microsecond
		}
	}
	return -1
}

// payloads are the default input set and vHive's two named ones.
var payloads = []string{"world", "record", "replay"}

// microvmSandbox returns "microvm" in a list of sandboxes when its guest
// assets (`make microvm`) are there, and an empty list (with the reason)
// when they are not: the microvm parts of the suite tests then skip (fail
// in CI, where make test builds them).
func microvmSandbox() (sandboxes []string, missing string) {
	if _, err := assets.Load(assets.Dir(testutil.CacheDir())); err != nil {
		return nil, err.Error()
	}
	return []string{"microvm"}, ""
}

// requiresMicroVM skips (fails in CI) when the microvm assets are missing.
func requiresMicroVM(t *testing.T, missing string) {
	t.Helper()
	if missing == "" {
		return
	}
	msg := "microvm sandbox not available: " + missing
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
}

// TestSuiteOnGVisorRuncAndMicroVM runs every CI-set function through a real
// daemon: on gVisor it boots (answering all three input sets), is
// snapshotted, and is restored twice — once answering "record" first, once
// "replay" — and every restored answer must equal the booted one; on runc
// it boots and must answer the same again; on microvm (QEMU TCG) it boots,
// is snapshotted and restored twice as on gVisor, every answer the same as
// gVisor's.
func TestSuiteOnGVisorRuncAndMicroVM(t *testing.T) {
	imgs := buildSuite(t)
	mvm, mvmMissing := microvmSandbox()
	td := startDaemon(t, 21, append([]string{"gvisor", "runc"}, mvm...)...)
	for _, name := range sortedKeys(imgs) {
		img := imgs[name]
		t.Run(name, func(t *testing.T) {
			if _, err := td.client.ImportImage(context.Background(), &vhivepb.ImportImageRequest{Path: img.Layout}); err != nil {
				t.Fatalf("import %s: %v", img.Layout, err)
			}
			g, r := name+"-g", name+"-r"
			td.deploy(t, &vhivepb.FunctionSpec{Name: g, Image: img.Ref, Sandbox: "gvisor", StartMode: "snapshot"})
			td.deploy(t, &vhivepb.FunctionSpec{Name: r, Image: img.Ref, Sandbox: "runc"})

			booted := map[string]string{}
			for i, p := range payloads {
				resp := td.invoke(t, g, p)
				if i == 0 && (!resp.ColdStart || resp.StartMode != "boot") {
					t.Fatalf("first invocation: cold=%v mode=%q, want a boot", resp.ColdStart, resp.StartMode)
				}
				booted[p] = string(resp.Payload)
				if i == 0 {
					t.Logf("gvisor boot: %v total (%q)", stage(resp, "Total"), resp.Payload)
				}
			}
			if booted["record"] == booted["replay"] || booted["record"] == booted["world"] {
				t.Errorf("input sets give the same answer: %q", booted)
			}
			td.waitSnapshot(t, g)
			for _, first := range []string{"record", "replay"} {
				td.stopInstances(t, g)
				resp := td.invoke(t, g, first)
				if !resp.ColdStart || resp.StartMode != "snapshot" || stage(resp, "RestoreSandbox") < 0 {
					t.Fatalf("cold start after the snapshot: cold=%v mode=%q stages=%v, want a restore", resp.ColdStart, resp.StartMode, resp.Stages)
				}
				t.Logf("gvisor restore (%s first): %v total", first, stage(resp, "Total"))
				got := map[string]string{first: string(resp.Payload)}
				for _, p := range payloads {
					if p != first {
						got[p] = string(td.invoke(t, g, p).Payload)
					}
				}
				for _, p := range payloads {
					if got[p] != booted[p] {
						t.Errorf("after a restore (%s first), %q answers %q; after a boot %q", first, p, got[p], booted[p])
					}
				}
			}
			for i, p := range payloads {
				resp := td.invoke(t, r, p)
				if i == 0 {
					t.Logf("runc boot: %v total", stage(resp, "Total"))
				}
				if string(resp.Payload) != booted[p] {
					t.Errorf("runc answers %q with %q; gVisor %q", p, resp.Payload, booted[p])
				}
			}
			t.Run("microvm", func(t *testing.T) {
				requiresMicroVM(t, mvmMissing)
				m := name + "-m"
				td.deploy(t, &vhivepb.FunctionSpec{Name: m, Image: img.Ref, Sandbox: "microvm", StartMode: "snapshot"})
				defer func() {
					if _, err := td.client.RemoveFunction(context.Background(), &vhivepb.RemoveFunctionRequest{Name: m}); err != nil {
						t.Errorf("rm %s: %v", m, err)
					}
				}()
				for i, p := range payloads {
					resp := td.invoke(t, m, p)
					if i == 0 {
						if !resp.ColdStart || resp.StartMode != "boot" {
							t.Fatalf("first invocation: cold=%v mode=%q, want a boot", resp.ColdStart, resp.StartMode)
						}
						t.Logf("microvm boot: %v total", stage(resp, "Total"))
					}
					if string(resp.Payload) != booted[p] {
						t.Errorf("a booted microvm answers %q with %q; gVisor %q", p, resp.Payload, booted[p])
					}
				}
				td.waitSnapshot(t, m)
				for _, first := range []string{"replay", "record"} {
					td.stopInstances(t, m)
					resp := td.invoke(t, m, first)
					if !resp.ColdStart || resp.StartMode != "snapshot" || stage(resp, "RestoreSandbox") < 0 {
						t.Fatalf("cold start after the snapshot: cold=%v mode=%q stages=%v, want a restore", resp.ColdStart, resp.StartMode, resp.Stages)
					}
					t.Logf("microvm restore (%s first): %v total", first, stage(resp, "Total"))
					got := map[string]string{first: string(resp.Payload)}
					for _, p := range payloads {
						if p != first {
							got[p] = string(td.invoke(t, m, p).Payload)
						}
					}
					for _, p := range payloads {
						if got[p] != booted[p] {
							t.Errorf("after a microvm restore (%s first), %q answers %q; gVisor %q", first, p, got[p], booted[p])
						}
					}
				}
			})
			for _, fn := range []string{g, r} {
				if _, err := td.client.RemoveFunction(context.Background(), &vhivepb.RemoveFunctionRequest{Name: fn}); err != nil {
					t.Errorf("rm %s: %v", fn, err)
				}
			}
		})
	}
}

func sortedKeys[V any](m map[string]V) []string {
	return slices.Sorted(maps.Keys(m))
}

// writeFunction makes a function directory under parent from name → content.
func writeFunction(t *testing.T, parent, name string, files map[string]string) string {
	t.Helper()
	dir := filepath.Join(parent, name)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for f, body := range files {
		if err := os.WriteFile(filepath.Join(dir, f), []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

// TestMalformedFunctionDirs: every broken function directory fails the
// build, or the deploy's first invocation, with an error naming the
// function and the cause.
func TestMalformedFunctionDirs(t *testing.T) {
	requiresMmdebstrap(t)
	ctx := context.Background()
	parent := t.TempDir()
	if err := os.CopyFS(filepath.Join(parent, "runtime"), os.DirFS("runtime")); err != nil {
		t.Fatal(err)
	}
	shared, err := os.ReadFile("helloworld/packages")
	if err != nil {
		t.Fatal(err)
	}
	out := t.TempDir()
	buildErr := func(name string, files map[string]string, want ...string) {
		t.Helper()
		dir := writeFunction(t, parent, name, files)
		_, err := debimage.Build(ctx, debimage.Options{Dir: dir, OutDir: out, Formats: []build.Format{build.FormatLayout}})
		if err == nil {
			t.Errorf("%s: build succeeded", name)
			return
		}
		for _, w := range append([]string{fmt.Sprintf("function %q", name)}, want...) {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not contain %q", name, err, w)
			}
		}
		t.Logf("%s: %v", name, err)
		if _, serr := os.Stat(filepath.Join(out, debimage.ImageName(name))); serr == nil {
			t.Errorf("%s: a failed build left an image", name)
		}
	}
	handler := "def handle(name, input_set):\n    return name\n"
	buildErr("no-packages", map[string]string{"handler.py": handler}, "no package list")
	buildErr("bad-package-name", map[string]string{"handler.py": handler, "packages": "python3-pil\nNot_A_Package\n"},
		`"Not_A_Package" is not a Debian package name`, "packages:2")
	buildErr("no-handler", map[string]string{"packages": string(shared)}, "no handler")
	buildErr("failing-build-step", map[string]string{"handler.py": handler, "packages": string(shared),
		"build.py": "raise SystemExit('cannot generate the inputs')\n"}, "build.py failed", "cannot generate the inputs")
	buildErr("missing-package", map[string]string{"handler.py": handler, "packages": "python3-pil\nvhive-no-such-package\n"},
		"mmdebstrap", "vhive-no-such-package")

	// A handler that fails to import builds, and its first invocation
	// fails with the interpreter's error, on both sandboxes.
	dir := writeFunction(t, parent, "bad-import", map[string]string{"packages": string(shared),
		"handler.py": "import vhive_no_such_module\n\ndef handle(name, input_set):\n    return name\n"})
	img, err := debimage.Build(ctx, debimage.Options{Dir: dir, OutDir: out, Formats: []build.Format{build.FormatLayout}})
	if err != nil {
		t.Fatalf("build bad-import: %v", err)
	}
	td := startDaemon(t, 22, "gvisor", "runc")
	if _, err := td.client.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: img.Layout}); err != nil {
		t.Fatal(err)
	}
	for _, sb := range []string{"gvisor", "runc"} {
		fn := "bad-import-" + sb
		td.deploy(t, &vhivepb.FunctionSpec{Name: fn, Image: img.Ref, Sandbox: sb})
		ictx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		_, err := td.client.Invoke(ictx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte("x")})
		cancel()
		if err == nil {
			t.Errorf("%s: invocation of a handler that cannot be imported succeeded", sb)
			continue
		}
		for _, w := range []string{fn, "No module named 'vhive_no_such_module'"} {
			if !strings.Contains(err.Error(), w) {
				t.Errorf("%s: error %q does not contain %q", sb, err, w)
			}
		}
		t.Logf("%s: %v", sb, err)
	}
}
