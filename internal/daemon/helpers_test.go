package daemon

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/netip"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
)

// shared holds the images this package's tests build (once per test binary).
var shared nodetest.Shared

func freePort(t testing.TB) string { return testutil.Port(t) }

// testDaemon is a daemon served in-process for one test.
type testDaemon struct {
	d       *Daemon
	cfg     Config
	client  vhivepb.ControlClient
	conn    *grpc.ClientConn
	cancel  context.CancelFunc
	done    chan struct{} // closed when Serve returned err
	err     error
	gateway string
}

func daemonConfig(t testing.TB, stateDir string) Config {
	cfg := baseConfig(t, stateDir)
	cfg.RunscPath = testutil.RunscPath(t)
	return cfg
}

// baseConfig is daemonConfig without runsc.
func baseConfig(t testing.TB, stateDir string) Config {
	return Config{
		StateDir:    stateDir,
		Socket:      filepath.Join(stateDir, "vhive.sock"),
		Gateway:     freePort(t),
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
	td := &testDaemon{d: d, cfg: cfg, cancel: cancel, done: make(chan struct{}), gateway: cfg.Gateway}
	go func() {
		td.err = d.Serve(ctx)
		close(td.done)
	}()
	t.Cleanup(td.stop)
	wait, cancelWait := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancelWait()
	td.conn, err = nodetest.Connect(wait, cfg.Socket, td.done)
	if errors.Is(err, nodetest.ErrExited) {
		t.Fatalf("%v: %v", err, td.err)
	}
	if err != nil {
		t.Fatal(err)
	}
	td.client = vhivepb.NewControlClient(td.conn)
	return td
}

func (td *testDaemon) stop() {
	if td.cancel == nil {
		return
	}
	if td.conn != nil {
		td.conn.Close()
	}
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
