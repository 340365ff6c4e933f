package input

import (
	"context"
	"fmt"
	"math"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"
	"unicode/utf8"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
)

const helloRef = "localhost/vhive/helloworld:latest"

// node is one daemon per test process (each fuzz worker is a process of its
// own and gets its own daemon, network prefix and subnet).
var (
	nodeOnce   sync.Once
	theNode    *nodetest.Node
	helloDgst  string
	nodeFailed string
)

// daemonNode starts the daemon shared by this process's tests. It is never
// stopped by a test's cleanup: the process's exit (Pdeathsig) or TestMain's
// end stops it.
func daemonNode(t *testing.T) (*nodetest.Node, string) {
	t.Helper()
	nodeOnce.Do(func() {
		prefix, subnet := "h3bi", "10.188.1.0/24"
		if nodetest.FuzzWorker() {
			pid := os.Getpid()
			prefix, subnet = fmt.Sprintf("h3bf%04d", pid%10000), fmt.Sprintf("10.188.%d.0/24", 100+pid%100)
		}
		// No image may be pulled from outside: every registry but loopback
		// goes through a proxy that refuses every connection.
		proxy, err := refusedAddr()
		if err != nil {
			nodeFailed = err.Error()
			return
		}
		tb := &keepAlive{T: t}
		theNode = nodetest.Start(tb, shared.Bin(t), nodetest.Options{NetPrefix: prefix, Subnet: subnet, NoGateway: true,
			Env: []string{"HTTPS_PROXY=http://" + proxy, "HTTP_PROXY=http://" + proxy, "NO_PROXY=", "no_proxy="}})
		im, err := theNode.Client.ImportImage(context.Background(), &vhivepb.ImportImageRequest{Path: shared.Helloworld(t)})
		if err != nil {
			nodeFailed = err.Error()
			return
		}
		helloDgst = im.Digest
		if _, err := theNode.Client.Deploy(context.Background(), &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "keep", Image: helloRef, Sandbox: "runc"}}); err != nil {
			nodeFailed = err.Error()
		}
	})
	if theNode == nil || nodeFailed != "" {
		t.Fatalf("test daemon unavailable: %s", nodeFailed)
	}
	return theNode, helloDgst
}

// refusedAddr is a 127.0.0.1 address where every connection is refused
// (nodetest.RefusedAddr), held for the life of this test binary: the shared
// daemon uses it until the process ends.
var refusedAddr = sync.OnceValues(func() (string, error) {
	addr, _, err := nodetest.RefusedAddr()
	return addr, err
})

// keepAlive lets the shared daemon outlive the test that started it: its
// cleanups run when the process ends (stopShared).
type keepAlive struct {
	*testing.T
}

var sharedCleanups []func()

func (k *keepAlive) Cleanup(f func()) { sharedCleanups = append(sharedCleanups, f) }

// Error reports what a cleanup finds wrong: on stderr, since the test that
// started the daemon has ended when the cleanups run.
func (k *keepAlive) Error(args ...any) { fmt.Fprintln(os.Stderr, args...) }
func (k *keepAlive) TempDir() string {
	d, err := os.MkdirTemp(shared.Dir(k.T), "node-*")
	if err != nil {
		k.T.Fatal(err)
	}
	return d
}

// deployCase is one fuzzed deploy request.
type deployCase struct {
	Name, Image, Sandbox string
	Port                 uint32
	EnvKey, EnvVal       string
	EnvCount             uint16
	KeepaliveMs          int64
	MaxInst, Conc        uint32
	Mode                 string
	MemMiB               int64
	CPU                  float64
}

func (c deployCase) spec() *vhivepb.FunctionSpec {
	s := &vhivepb.FunctionSpec{Name: c.Name, Image: c.Image, Sandbox: c.Sandbox, Port: c.Port, KeepaliveMs: c.KeepaliveMs,
		MaxInstances: c.MaxInst, Concurrency: c.Conc, StartMode: c.Mode, MemoryLimitMib: c.MemMiB, CpuLimit: c.CPU}
	n := int(min(c.EnvCount, 2000))
	if n > 0 {
		s.Env = map[string]string{}
		for i := range n {
			k := c.EnvKey
			if n > 1 {
				k += strconv.Itoa(i)
			}
			s.Env[k] = c.EnvVal
		}
	}
	return s
}

// verdict is what the oracle expects of a deploy request.
type verdict struct {
	bad map[string]string // field -> word its error must carry
	// imageUnknown: the image is not the one imported; the daemon must
	// refuse it naming the image, or (an alias of it) accept it with its
	// digest.
	imageUnknown bool
	// unsupported: a known start mode the sandbox cannot do (Unimplemented).
	unsupported bool
	exists      bool
}

func validName(s string) bool {
	if len(s) < 1 || len(s) > 63 || s[0] == '-' || s[len(s)-1] == '-' {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}

// judge is the oracle: an independent statement of what a valid spec is
// (docs/reliability.md §3 lists the bounds).
func judge(s *vhivepb.FunctionSpec) verdict {
	v := verdict{bad: map[string]string{}}
	if !validName(s.Name) {
		v.bad["name"] = "function name"
	}
	img := s.Image
	switch {
	case strings.TrimSpace(img) == "" || len(img) > 4096 || strings.ContainsFunc(img, func(r rune) bool { return r <= ' ' || r == 0x7f }):
		v.bad["image"] = "image"
	case img != helloRef:
		v.imageUnknown = true
	}
	sb := s.Sandbox
	if sb == "" {
		sb = "gvisor"
	}
	if sb != "gvisor" && sb != "runc" {
		v.bad["sandbox"] = "sandbox"
	}
	if s.Port > 65535 {
		v.bad["port"] = "port"
	}
	if s.KeepaliveMs < 0 || s.KeepaliveMs > 365*24*3600*1000 {
		v.bad["keepalive"] = "keepalive"
	}
	if s.MaxInstances > 1024 {
		v.bad["max-instances"] = "max-instances"
	}
	if s.Concurrency > 1024 {
		v.bad["concurrency"] = "concurrency"
	}
	if m := s.MemoryLimitMib; m != 0 && (m < 16 || m > 1<<20) {
		v.bad["memory"] = "memory limit"
	}
	if c := s.CpuLimit; math.IsNaN(c) || c < 0 || c > 1024 {
		v.bad["cpu"] = "cpu limit"
	}
	switch s.StartMode {
	case "", "boot":
	case "snapshot":
		v.unsupported = sb == "runc"
	case "lazy", "reap":
		v.unsupported = sb == "runc" || sb == "gvisor"
	default:
		v.bad["start-mode"] = "start mode"
	}
	total := 0
	for k, val := range s.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") || strings.ContainsRune(val, 0) {
			v.bad["env"] = "environment"
		}
		// An exec takes no "KEY=VALUE" string over MAX_ARG_STRLEN
		// (128 KiB with its NUL).
		if len(k)+len(val)+2 > 128<<10 {
			v.bad["env"] = "environment"
		}
		total += len(k) + len(val) + 2
	}
	if len(s.Env) > 1024 || total > 256<<10 {
		v.bad["env"] = "environment"
	}
	v.exists = s.Name == "keep"
	return v
}

// checkDeploy sends one deploy request and checks the daemon's answer and
// state against the oracle.
func checkDeploy(t *testing.T, n *nodetest.Node, digest string, spec *vhivepb.FunctionSpec) {
	t.Helper()
	v := judge(spec)
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	resp, err := n.Client.Deploy(ctx, &vhivepb.DeployRequest{Spec: spec})
	if err == nil {
		// Removed whatever the verdict, so that one failure does not
		// cascade into the next cases.
		defer func() {
			if _, err := n.Client.RemoveFunction(context.Background(), &vhivepb.RemoveFunctionRequest{Name: spec.Name}); err != nil {
				t.Errorf("remove %q: %v", spec.Name, err)
			}
		}()
	}
	st := status.Convert(err)
	desc := fmt.Sprintf("deploy %.300s", fmt.Sprintf("%+v", spec))
	if !n.Alive() {
		t.Fatalf("%s: the daemon died:\n%s", desc, n.LogTail(8192))
	}
	switch {
	case len(v.bad) > 0:
		if st.Code() != codes.InvalidArgument {
			t.Fatalf("%s: got %v %q, want InvalidArgument naming one of %v", desc, st.Code(), st.Message(), v.bad)
		}
		named := false
		for _, word := range v.bad {
			named = named || strings.Contains(st.Message(), word)
		}
		if !named {
			t.Fatalf("%s: error %q names none of the bad fields %v", desc, st.Message(), v.bad)
		}
	case v.unsupported:
		if st.Code() != codes.Unimplemented || !strings.Contains(st.Message(), "start mode") {
			t.Fatalf("%s: got %v %q, want Unimplemented naming the start mode", desc, st.Code(), st.Message())
		}
	case v.imageUnknown && err != nil:
		if v.exists && st.Code() == codes.AlreadyExists {
			break // two faults (a taken name and an unknown image): either answer is right
		}
		if c := st.Code(); (c != codes.InvalidArgument && c != codes.NotFound && c != codes.Unavailable) || !strings.Contains(st.Message(), "image") {
			t.Fatalf("%s: got %v %q, want InvalidArgument, NotFound or Unavailable naming the image", desc, st.Code(), st.Message())
		}
	case v.exists:
		if st.Code() != codes.AlreadyExists {
			t.Fatalf("%s: got %v %q, want AlreadyExists", desc, st.Code(), st.Message())
		}
	default:
		if err != nil {
			t.Fatalf("%s: a valid spec was refused: %v", desc, err)
		}
		if got := resp.GetFunction().GetImageDigest(); got != digest {
			t.Fatalf("%s: deployed with image digest %q, want %q", desc, got, digest)
		}
		return
	}
	// Nothing stored: only the function deployed at start remains.
	ls, err := n.Client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if err != nil {
		t.Fatalf("list functions after %s: %v", desc, err)
	}
	if len(ls.Functions) != 1 || ls.Functions[0].Spec.Name != "keep" || ls.Functions[0].ImageDigest != digest {
		t.Fatalf("after %s the daemon lists %d functions %v; want only \"keep\"", desc, len(ls.Functions), ls.Functions)
	}
}

// seeds are the hand-made bad (and good) deploy requests; they are also the
// fuzz corpus. Each changes one field of a valid request.
func seeds(tb testing.TB) []deployCase {
	tb.Helper()
	refused, err := refusedAddr()
	if err != nil {
		tb.Fatal(err)
	}
	ok := deployCase{Name: "f", Image: helloRef, Sandbox: "runc"}
	var out []deployCase
	add := func(mut func(*deployCase)) {
		c := ok
		mut(&c)
		out = append(out, c)
	}
	add(func(*deployCase) {})
	for _, s := range []string{"", "A", "-a", "a-", "a_b", "a.b", "a/b", "../x", "a\x00b", "é", " a", strings.Repeat("a", 64), strings.Repeat("b", 1<<20), "keep"} {
		add(func(c *deployCase) { c.Name = s })
	}
	for _, s := range []string{"", "   ", "a b", "x\x00y", "\n", "UPPER/Case:tag", "localhost/vhive/none:latest", refused + "/none:1", "sha256:zz", "@@@", strings.Repeat("i", 5000), "localhost/vhive/helloworld"} {
		add(func(c *deployCase) { c.Image = s })
	}
	for _, s := range []string{"wasm", "firecracker", "GVISOR", "runc\x00", "gvisor", ""} {
		add(func(c *deployCase) { c.Sandbox = s })
	}
	for _, p := range []uint32{65535, 65536, 70000, math.MaxUint32} {
		add(func(c *deployCase) { c.Port = p })
	}
	for _, k := range []int64{-1, 1, math.MaxInt64, math.MinInt64, 365*24*3600*1000 + 1} {
		add(func(c *deployCase) { c.KeepaliveMs = k })
	}
	for _, m := range []uint32{1024, 1025, math.MaxUint32, 1 << 31} {
		add(func(c *deployCase) { c.MaxInst = m })
		add(func(c *deployCase) { c.Conc = m })
	}
	for _, m := range []string{"snapshot", "lazy", "reap", "REAP", "boot\n", "x"} {
		add(func(c *deployCase) { c.Mode = m })
		add(func(c *deployCase) { c.Mode, c.Sandbox = m, "gvisor" })
	}
	for _, m := range []int64{-1, 1, 15, 16, 1 << 20, 1<<20 + 1, math.MaxInt64, math.MinInt64} {
		add(func(c *deployCase) { c.MemMiB = m })
	}
	for _, x := range []float64{-1, 0.5, 1024, 1025, math.NaN(), math.Inf(1), math.Inf(-1), math.SmallestNonzeroFloat64} {
		add(func(c *deployCase) { c.CPU = x })
	}
	for _, e := range []struct {
		k, v string
		n    uint16
	}{{"", "v", 1}, {"A=B", "v", 1}, {"A\x00", "v", 1}, {"A", "v\x00", 1}, {"OK", "fine", 1}, {"MANY", "v", 1025},
		{"BIG", strings.Repeat("x", 300), 1000}, {"HUGE", strings.Repeat("y", 300<<10), 1},
		{"EDGE", strings.Repeat("z", 128<<10-len("EDGE")-2), 1}, {"EDGE", strings.Repeat("z", 128<<10-len("EDGE")-1), 1},
		{"V", strings.Repeat("w", 128<<10), 1}, {"TWO", strings.Repeat("t", 100<<10), 2}} {
		add(func(c *deployCase) { c.EnvKey, c.EnvVal, c.EnvCount = e.k, e.v, e.n })
	}
	return out
}

// FuzzControlDeploy fuzzes the deploy spec end to end against a running
// daemon: every request is judged by an independent oracle (judge) and the
// daemon's answer, liveness and stored functions are checked.
func FuzzControlDeploy(f *testing.F) {
	for _, c := range seeds(f) {
		f.Add(c.Name, c.Image, c.Sandbox, c.Port, c.EnvKey, c.EnvVal, c.EnvCount, c.KeepaliveMs, c.MaxInst, c.Conc, c.Mode, c.MemMiB, c.CPU)
	}
	f.Cleanup(stopShared)
	if !nodetest.FuzzWorker() {
		// Built once here, used by every fuzz worker.
		shared.Bin(f)
		shared.Helloworld(f)
	}
	f.Fuzz(func(t *testing.T, name, image, sandbox string, port uint32, envKey, envVal string, envCount uint16,
		keepalive int64, maxInst, conc uint32, mode string, mem int64, cpu float64) {
		n, digest := daemonNode(t)
		c := deployCase{Name: name, Image: image, Sandbox: sandbox, Port: port, EnvKey: envKey, EnvVal: envVal, EnvCount: envCount,
			KeepaliveMs: keepalive, MaxInst: maxInst, Conc: conc, Mode: mode, MemMiB: mem, CPU: cpu}
		spec := c.spec()
		// proto3 strings must be UTF-8: the client refuses anything else
		// before it is sent, so only valid strings reach the daemon.
		for _, s := range []string{spec.Name, spec.Image, spec.Sandbox, spec.StartMode, envKey, envVal} {
			if !utf8.ValidString(s) {
				t.Skip("not UTF-8: the gRPC client refuses it before sending")
			}
		}
		checkDeploy(t, n, digest, spec)
	})
}

func stopShared() {
	for _, f := range slices.Backward(sharedCleanups) {
		f()
	}
	sharedCleanups = nil
}
