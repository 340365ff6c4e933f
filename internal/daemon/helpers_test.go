package daemon

import (
	"archive/tar"
	"bytes"
	"context"
	"fmt"
	"math/rand/v2"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/build"
	"vhive.dev/vhive/internal/testutil"
)

// buildHelloworld packages functions/helloworld as an OCI layout once per
// test binary run.
func buildHelloworld(t testing.TB) string {
	t.Helper()
	out := filepath.Join(sharedDir(t), "images")
	if _, err := os.Stat(filepath.Join(out, "helloworld", "index.json")); err == nil {
		return filepath.Join(out, "helloworld")
	}
	imgs, err := build.BuildFunction(context.Background(), build.Options{Function: "helloworld", OutDir: out, Formats: []build.Format{build.FormatLayout}})
	if err != nil {
		t.Fatalf("build helloworld image: %v", err)
	}
	return imgs[0].Layout
}

// buildProbe compiles testdata/probe and packages it as an OCI layout with
// ref localhost/vhive/probe:test.
func buildProbe(t testing.TB) string {
	t.Helper()
	dir := filepath.Join(sharedDir(t), "probe")
	if _, err := os.Stat(filepath.Join(dir, "index.json")); err == nil {
		return dir
	}
	bin := filepath.Join(sharedDir(t), "probe.bin")
	cmd := exec.Command("go", "build", "-trimpath", "-o", bin, "./testdata/probe")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0")
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build probe: %v\n%s", err, out)
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	_ = tw.WriteHeader(&tar.Header{Name: "usr/", Typeflag: tar.TypeDir, Mode: 0o755})
	_ = tw.WriteHeader(&tar.Header{Name: "usr/local/", Typeflag: tar.TypeDir, Mode: 0o755})
	_ = tw.WriteHeader(&tar.Header{Name: "usr/local/bin/", Typeflag: tar.TypeDir, Mode: 0o755})
	_ = tw.WriteHeader(&tar.Header{Name: "usr/local/bin/probe", Typeflag: tar.TypeReg, Mode: 0o755, Size: int64(len(data))})
	_, _ = tw.Write(data)
	_ = tw.Close()
	layer, err := tarball.LayerFromReader(&buf)
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{OS: "linux", Architecture: "amd64", Config: v1.Config{
		Entrypoint: []string{"/usr/local/bin/probe"}, Env: []string{"GUEST_PORT=50051"}, WorkingDir: "/"}})
	if err != nil {
		t.Fatal(err)
	}
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "localhost/vhive/probe:test"})); err != nil {
		t.Fatal(err)
	}
	return dir
}

var sharedDirPath = filepath.Join(os.TempDir(), fmt.Sprintf("vhive-daemon-test-%d", os.Getpid()))

func sharedDir(t testing.TB) string {
	if err := os.MkdirAll(sharedDirPath, 0o755); err != nil {
		t.Fatal(err)
	}
	return sharedDirPath
}

func freePort(t testing.TB) string {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// testDaemon is a daemon served in-process for one test.
type testDaemon struct {
	d       *Daemon
	cfg     Config
	client  vhivepb.ControlClient
	conn    *grpc.ClientConn
	cancel  context.CancelFunc
	done    chan error
	gateway string
}

func daemonConfig(t testing.TB, stateDir string) Config {
	return Config{
		StateDir:    stateDir,
		Socket:      filepath.Join(stateDir, "vhive.sock"),
		Gateway:     freePort(t),
		RunscPath:   testutil.RunscPath(t),
		RuncPath:    testutil.RuncPath(t),
		Sandboxes:   []string{"gvisor", "runc"},
		NetPoolSize: 1,
		// A fixed prefix: a test run killed before its cleanup leaves
		// namespaces that the next run's daemon removes at start.
		NetPrefix: testNetPrefix("vtd"),
		// A subnet of its own, so that packages testing in parallel never
		// route the same address to two namespaces.
		Subnet:       netip.MustParsePrefix(fmt.Sprintf("10.%d.%d.0/24", 100+os.Getpid()%50, rand.IntN(250))),
		ReadyTimeout: 20 * time.Second,
		QueueTimeout: 30 * time.Second,
	}
}

func startDaemon(t testing.TB, cfg Config) *testDaemon {
	t.Helper()
	testutil.RequiresRoot(t)
	ctx, cancel := context.WithCancel(context.Background())
	d, err := New(ctx, cfg)
	if err != nil {
		cancel()
		t.Fatalf("daemon.New: %v", err)
	}
	td := &testDaemon{d: d, cfg: cfg, cancel: cancel, done: make(chan error, 1), gateway: cfg.Gateway}
	go func() { td.done <- d.Serve(ctx) }()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(cfg.Socket); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("daemon socket %s did not appear", cfg.Socket)
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+cfg.Socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	td.conn, td.client = conn, vhivepb.NewControlClient(conn)
	t.Cleanup(td.stop)
	return td
}

func (td *testDaemon) stop() {
	if td.cancel == nil {
		return
	}
	td.conn.Close()
	td.cancel()
	<-td.done
	td.cancel = nil
}

func (td *testDaemon) importImage(t testing.TB, path string) *vhivepb.ImageInfo {
	t.Helper()
	im, err := td.client.ImportImage(context.Background(), &vhivepb.ImportImageRequest{Path: path})
	if err != nil {
		t.Fatalf("import %s: %v", path, err)
	}
	return im
}

func (td *testDaemon) deploy(t testing.TB, spec *vhivepb.FunctionSpec) {
	t.Helper()
	if _, err := td.client.Deploy(context.Background(), &vhivepb.DeployRequest{Spec: spec}); err != nil {
		t.Fatalf("deploy %s: %v", spec.Name, err)
	}
}

func (td *testDaemon) invoke(t testing.TB, fn, payload string) *vhivepb.InvokeResponse {
	t.Helper()
	resp, err := td.client.Invoke(context.Background(), &vhivepb.InvokeRequest{Function: fn, Payload: []byte(payload)})
	if err != nil {
		t.Fatalf("invoke %s: %v", fn, err)
	}
	return resp
}

// leftovers lists network namespaces with prefix and mounts under dir.
func leftovers(t *testing.T, prefix, dir string) []string {
	t.Helper()
	var out []string
	ents, _ := os.ReadDir("/var/run/netns")
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), prefix+"-") {
			out = append(out, "netns "+e.Name())
		}
	}
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && strings.HasPrefix(f[4], dir) {
			out = append(out, "mount "+f[4])
		}
	}
	return out
}

// testNetPrefix returns a fixed network-name prefix for this package's
// daemons: base plus $VHIVE_TEST_NETNS_TAG (at most 5 characters), so that
// two checkouts testing on one machine at once never remove each other's
// namespaces, while a killed run is still cleaned by the next with the same tag.
func testNetPrefix(base string) string {
	tag := os.Getenv("VHIVE_TEST_NETNS_TAG")
	if len(tag) > 5 {
		tag = tag[:5]
	}
	return base + tag
}
