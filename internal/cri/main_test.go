package cri

import (
	"context"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox/oci"
	"vhive.dev/vhive/internal/standin"
	"vhive.dev/vhive/internal/testutil"
)

// The tests run against real components: a go-containerregistry registry on
// 127.0.0.1 serving busybox-based images, a private stock containerd
// (scripts/critest/containerd.sh) whose mirrors point at that registry, the
// image service, runc, and the oci sandbox backend with a netpool.

const testBusybox = "/bin/busybox"

// harness is shared by the tests of this package (started in TestMain when
// the prerequisites exist; each test checks h.skip).
type harness struct {
	skip       string // why the integration tests cannot run
	registry   string // host:port
	containerd string // socket
	dir        string
}

var h harness

func TestMain(m *testing.M) {
	os.Exit(runMain(m))
}

func runMain(m *testing.M) int {
	dir, err := os.MkdirTemp("", "cri-test-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	h.dir = dir
	stop, err := h.start()
	if err != nil {
		h.skip = err.Error()
	}
	code := m.Run()
	if stop != nil {
		stop()
	}
	// runc leaves the (empty) parent cgroups of pods without a cgroup parent.
	if dirs, _ := filepath.Glob("/sys/fs/cgroup/*/vhive-cri"); len(dirs) > 0 {
		for _, d := range dirs {
			_ = os.Remove(d)
		}
	}
	return code
}

func (h *harness) start() (func(), error) {
	if os.Geteuid() != 0 {
		return nil, fmt.Errorf("needs root (uid %d)", os.Geteuid())
	}
	for _, bin := range []string{"containerd", "runc"} {
		if _, err := exec.LookPath(bin); err != nil {
			return nil, fmt.Errorf("%s not in PATH (scripts/critest/containerd.sh installs it): %v", bin, err)
		}
	}
	if _, err := os.Stat(testBusybox); err != nil {
		return nil, fmt.Errorf("static busybox missing (apt-get install busybox-static): %v", err)
	}
	bb, err := os.ReadFile(testBusybox)
	if err != nil {
		return nil, err
	}
	quiet := log.New(io.Discard, "", 0)
	reg := httptest.NewServer(registry.New(registry.Logger(quiet)))
	h.registry = strings.TrimPrefix(reg.URL, "http://")
	if err := pushTestImages(h.registry, bb); err != nil {
		reg.Close()
		return nil, err
	}
	cdir := filepath.Join(h.dir, "containerd")
	script, _ := filepath.Abs("../../scripts/critest/containerd.sh")
	env := append(os.Environ(), "VHIVE_CONTAINERD_DIR="+cdir, "VHIVE_REGISTRY="+h.registry, "VHIVE_CNI_SUBNET=10.245.0.0/16", "VHIVE_CNI_BRIDGE=vhcrt0")
	cmd := exec.Command("bash", script, "start")
	cmd.Env = env
	out, err := cmd.CombinedOutput()
	if err != nil {
		reg.Close()
		return nil, fmt.Errorf("start containerd: %v: %s", err, out)
	}
	h.containerd = strings.TrimSpace(string(out))
	return func() {
		cmd := exec.Command("bash", script, "stop")
		cmd.Env = env
		_ = cmd.Run()
		reg.Close()
	}, nil
}

func requireHarness(t testing.TB) {
	t.Helper()
	testutil.RequiresRoot(t)
	if h.skip != "" {
		if os.Getenv("CI") != "" {
			t.Fatalf("integration prerequisites missing: %s", h.skip)
		}
		t.Skipf("integration prerequisites missing: %s", h.skip)
	}
}

// pushTestImages pushes:
//
//	test/busybox:1        busybox, cmd sh
//	pause:3.9             containerd's sandbox image (a sleeping shell)
//	test/fn:1             a "function": busybox httpd on GUEST_PORT serving "fn-ok"
func pushTestImages(addr string, bb []byte) error {
	files := []standin.File{{Path: "bin/", Mode: 0o755}, {Path: "etc/", Mode: 0o755}, {Path: "tmp/", Mode: 0o1777},
		{Path: "bin/busybox", Mode: 0o755, Body: string(bb)},
		{Path: "etc/passwd", Mode: 0o644, Body: "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n"},
		{Path: "etc/group", Mode: 0o644, Body: "root:x:0:\nnogroup:x:65534:\n"}}
	for _, a := range []string{"sh", "echo", "sleep", "cat", "env", "httpd", "id", "hostname", "ls", "wget", "true", "grep", "chmod", "ps", "dmesg", "head", "tail", "tr"} {
		files = append(files, standin.File{Path: "bin/" + a, Link: "busybox"})
	}
	base, err := standin.Layer(files)
	if err != nil {
		return err
	}
	env := []string{"PATH=/bin"}
	return standin.Push(context.Background(), addr, base, []standin.Image{
		{Repos: []string{"test/busybox:1"}, Cmd: []string{"sh"}, Env: env},
		{Repos: []string{"pause:3.9"}, Files: []standin.File{{Path: "pause", Mode: 0o755, Body: "#!/bin/sh\ntrap 'exit 0' TERM INT\nexec tail -f /dev/null\n"}},
			Entrypoint: []string{"/pause"}, Env: env},
		{Repos: []string{"test/fn:1"}, Files: []standin.File{{Path: "www/", Mode: 0o755}, {Path: "www/index.html", Mode: 0o644, Body: "fn-ok\n"}},
			Entrypoint: []string{"sh", "-c", "exec httpd -f -p ${GUEST_PORT:-50051} -h /www"}, Env: env},
	})
}

// env is one CRI server under test and a client to it.
type testEnv struct {
	srv    *Server
	rt     runtimeapi.RuntimeServiceClient
	img    runtimeapi.ImageServiceClient
	state  string
	logs   string
	sock   string
	prefix string
	be     *oci.Backend
}

var envCount int

// newEnv starts a Server (runc for vhive pods, the runc oci backend for
// functions) serving on a unix socket; everything is released at cleanup.
func newEnv(t testing.TB, mut ...func(*Config)) *testEnv {
	t.Helper()
	return newEnvWith(t, nil, mut...)
}

// functionsFactory makes a test env's function backend on the env's
// netpool, under dir; nil means the runc oci backend.
type functionsFactory func(t testing.TB, pool *netpool.Pool, dir string) FunctionBackend

// newEnvWith is newEnv with the function backend functions makes.
func newEnvWith(t testing.TB, functions functionsFactory, mut ...func(*Config)) *testEnv {
	t.Helper()
	requireHarness(t)
	ctx := context.Background()
	envCount++
	dir := t.TempDir()
	e := &testEnv{state: filepath.Join(dir, "cri"), logs: filepath.Join(dir, "logs"), prefix: fmt.Sprintf("vct%d", envCount)}
	imgs, err := image.New(ctx, image.Options{Root: filepath.Join(dir, "images")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { imgs.Close() })
	pool, err := netpool.New(ctx, netpool.Options{Size: 1, Prefix: e.prefix, Subnet: netip.MustParsePrefix(fmt.Sprintf("10.%d.0.0/24", 170+envCount))})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = pool.Close(context.Background())
		_ = netpool.Cleanup(context.Background(), e.prefix)
	})
	be, err := oci.New(ctx, oci.Config{Runtime: oci.RuntimeRunc, Binary: testutil.RuncPath(t), Root: filepath.Join(dir, "oci"), NetPool: pool})
	if err != nil {
		t.Fatal(err)
	}
	e.be = be
	t.Cleanup(func() { _ = be.Cleanup(context.Background()) })
	var fns FunctionBackend = be
	if functions != nil {
		fns = functions(t, pool, dir)
	}
	cfg := Config{
		StateDir:           e.state,
		ContainerdEndpoint: h.containerd,
		Images:             imgs,
		Functions:          fns,
		OCIRuntime:         testutil.RuncPath(t),
		RegistryMirrors:    map[string]string{"*": h.registry},
	}
	for _, m := range mut {
		m(&cfg)
	}
	srv, err := New(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	e.srv = srv
	sock := filepath.Join(dir, "cri.sock")
	e.sock = sock
	l, err := Listen(sock)
	if err != nil {
		t.Fatal(err)
	}
	sctx, cancel := context.WithCancel(ctx)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(sctx, l) }()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	e.rt = runtimeapi.NewRuntimeServiceClient(conn)
	e.img = runtimeapi.NewImageServiceClient(conn)
	t.Cleanup(func() {
		// Remove every pod this test made, then stop serving.
		cctx, ccancel := context.WithTimeout(context.Background(), 60*time.Second)
		defer ccancel()
		if pods, err := e.rt.ListPodSandbox(cctx, &runtimeapi.ListPodSandboxRequest{Filter: &runtimeapi.PodSandboxFilter{LabelSelector: map[string]string{"test": t.Name()}}}); err == nil {
			for _, p := range pods.GetItems() {
				_, _ = e.rt.StopPodSandbox(cctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.GetId()})
				_, _ = e.rt.RemovePodSandbox(cctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.GetId()})
			}
		}
		conn.Close()
		cancel()
		<-served
		if err := srv.Close(cctx); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return e
}

func podConfig(t testing.TB, e *testEnv, name string) *runtimeapi.PodSandboxConfig {
	return &runtimeapi.PodSandboxConfig{
		Metadata:     &runtimeapi.PodSandboxMetadata{Name: name, Namespace: "default", Uid: name + "-uid"},
		Hostname:     name,
		LogDirectory: filepath.Join(e.logs, name),
		Labels:       map[string]string{"test": t.Name()},
		Linux:        &runtimeapi.LinuxPodSandboxConfig{},
	}
}

func kv(k, v string) *runtimeapi.KeyValue { return &runtimeapi.KeyValue{Key: k, Value: []byte(v)} }

// waitFor polls cond every 50 ms for up to 30 s (a bound on a hung test, not
// a timing assertion).
func waitFor(t testing.TB, what string, cond func() (bool, error)) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for {
		ok, err := cond()
		if ok {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not reached after 30s (last error: %v)", what, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

func httpGet(url string) (string, error) {
	c := &http.Client{Timeout: 2 * time.Second, Transport: &http.Transport{DialContext: (&net.Dialer{Timeout: time.Second}).DialContext}}
	resp, err := c.Get(url)
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	return string(b), err
}
