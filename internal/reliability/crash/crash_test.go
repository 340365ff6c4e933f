// Package crash holds the crash-consistency tests of docs/reliability.md §1:
// a real `vhive daemon` process is killed with SIGKILL at random points of
// its state-changing operations, restarted on the same state directory, and
// checked for lost or half-written state and for leaked resources; and the
// sandbox side (runsc, runc, the wasm worker, the memory manager's peer) is
// killed mid-request.
package crash

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
)

// Test resources of this package (issue 13, helper H13a): network prefix
// h13c*, subnets in 10.187.0.0/16.
const (
	crashPrefix  = "h13c"
	crashSubnet  = "10.187.1.0/24"
	helloRef     = "localhost/vhive/helloworld:latest"
	counterRef   = "localhost/vhive/counter:latest"
	counterWRef  = "localhost/vhive/counter-wasm:latest"
	importPrefix = "localhost/h13/imp"
)

var shared nodetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	shared.Cleanup()
	os.Exit(code)
}

// fnModel is what the test knows to be committed about one function.
type fnModel struct {
	name, image, sandbox, mode string
	counter                    bool // replies count=N checksum=…
	snap                       bool // a committed snapshot is known
	ws                         bool // a committed working set is known
	seq                        int
}

// trialStats are the figures docs/reliability.md reports.
type trialStats struct {
	trials, lost, leaked, inFlight int
	byOp                           map[string]int
}

type world struct {
	t       *testing.T
	rng     *rand.Rand
	seed    uint64
	state   string
	logPath string
	work    string
	sbs     []string
	bin     string
	d       *nodetest.Node
	fns     map[string]*fnModel
	imgs    map[string]string // imported ref → its layout
	hello   string
	seq     int
	durs    map[string]time.Duration // last duration of each call that completed
	// replacing is the new spec of a function an interrupted deploy
	// --replace was redeploying.
	replacing *fnModel
	stats     trialStats
	failed    []string
}

func (w *world) opts() nodetest.Options {
	return nodetest.Options{StateDir: w.state, Sandboxes: strings.Join(w.sbs, ","), NetPrefix: crashPrefix, Subnet: crashSubnet,
		Log: w.logPath, NoGateway: true}
}

func (w *world) ctx() (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.Background(), 3*time.Minute)
}

// fail records a lost or inconsistent trial and fails the test at the end
// (so that every trial's figures are still printed).
func (w *world) fail(format string, args ...any) {
	w.t.Helper()
	msg := fmt.Sprintf(format, args...)
	w.failed = append(w.failed, msg)
	w.t.Errorf("seed %d: %s", w.seed, msg)
}

// TestCrashConsistency kills the daemon at random points (seeded: set
// VHIVE_CRASH_SEED to replay a run; VHIVE_CRASH_TRIALS and VHIVE_CRASH_OPS
// choose how many trials of which operations) during deploy (also with
// --replace), image import, snapshot write, working-set record and function
// removal, and checks after every
// restart that what was committed is listed and usable, that nothing
// half-written is visible, and that the dead daemon left no process, netns,
// veth, mount or cgroup.
func TestCrashConsistency(t *testing.T) {
	testutil.RequiresRoot(t)
	runsc := testutil.RunscPath(t)
	_ = testutil.RuncPath(t)
	seed := uint64(time.Now().UnixNano())
	if s := os.Getenv("VHIVE_CRASH_SEED"); s != "" {
		v, err := strconv.ParseUint(s, 10, 64)
		if err != nil {
			t.Fatalf("VHIVE_CRASH_SEED=%q: %v", s, err)
		}
		seed = v
	}
	trials := 5
	if nodetest.Full() {
		trials = 25
	}
	if s := os.Getenv("VHIVE_CRASH_TRIALS"); s != "" {
		trials, _ = strconv.Atoi(s)
	}
	t.Logf("crash seed %d (replay: VHIVE_CRASH_SEED=%d), %d trials, runsc %s", seed, seed, trials, runsc)

	work := t.TempDir()
	hello := shared.Helloworld(t)
	counter := shared.Function(t, "counter", false)
	counterW := shared.Function(t, "counter", true)
	state, err := os.MkdirTemp("", "h13c")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(state) })
	w := &world{t: t, bin: shared.Bin(t), rng: rand.New(rand.NewPCG(seed, 13)), seed: seed, state: state, work: work,
		logPath: filepath.Join(work, "daemon.log"), sbs: []string{"runc", "gvisor", "wasm"},
		fns: map[string]*fnModel{}, durs: map[string]time.Duration{}, imgs: map[string]string{}, hello: hello, stats: trialStats{byOp: map[string]int{}}}
	t.Cleanup(func() {
		if t.Failed() && w.d != nil {
			t.Logf("daemon log tail:\n%s", w.d.LogTail(6000))
		}
	})
	w.d = nodetest.Start(t, w.bin, w.opts())
	ctx, cancel := w.ctx()
	defer cancel()
	for _, p := range []string{hello, counter, counterW} {
		if _, err := w.d.Client.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: p}); err != nil {
			t.Fatalf("import %s: %v", p, err)
		}
	}

	ops := []string{"deploy", "import", "snapshot", "ws-record", "rm"}
	if s := os.Getenv("VHIVE_CRASH_OPS"); s != "" {
		ops = strings.Split(s, ",") // e.g. to replay one kind of trial
	}
	for i := 0; i < trials; i++ {
		if i%len(ops) == 0 {
			w.rng.Shuffle(len(ops), func(a, b int) { ops[a], ops[b] = ops[b], ops[a] })
		}
		w.trial(i, ops[i%len(ops)])
		if t.Failed() && len(w.failed) > 3 {
			break
		}
	}
	t.Logf("CRASH SUMMARY seed=%d trials=%d lost=%d leaked=%d killed-mid-operation=%d by-op=%v",
		seed, w.stats.trials, w.stats.lost, w.stats.leaked, w.stats.inFlight, w.stats.byOp)
	if err := w.d.Stop(); err != nil {
		t.Error(err)
	}
	if l := nodetest.Snapshot(w.state, crashPrefix); l.Count() != 0 {
		t.Errorf("after a clean shutdown: %+v", l)
	}
}

// trial runs one kill trial of op.
func (w *world) trial(i int, op string) {
	t := w.t
	w.seq++
	w.cap()
	ctx, cancel := w.ctx()
	defer cancel()
	c := w.d.Client
	var (
		run    func() error // the operation the kill interrupts
		window time.Duration
		// afterReply: the kill delay counts from the call's return (the
		// operation runs after the reply: snapshot, working set).
		afterReply bool
		target     string // the function / image the operation is about
		onCommit   func()
	)
	switch op {
	case "deploy":
		// Sandboxes in turn, so that even the fast subset covers them.
		sb := w.sbs[w.stats.byOp[op]%len(w.sbs)]
		f := &fnModel{name: fmt.Sprintf("d%d", w.seq), sandbox: sb, mode: "boot", image: helloRef, seq: w.seq}
		if sb == "wasm" {
			f.image, f.counter = counterWRef, true
		}
		// Every other deploy replaces a running function (redeploy with
		// --replace into another sandbox): old or new, never none.
		replace := false
		if w.stats.byOp[op]%2 == 1 && w.replaceable() == nil {
			p := &fnModel{name: fmt.Sprintf("p%d", w.seq), sandbox: "runc", mode: "boot", image: helloRef, seq: w.seq}
			w.deploy(p)
			w.invoke(p, true) // a running instance: the replace stops it
		}
		if old := w.replaceable(); old != nil && w.stats.byOp[op]%2 == 1 {
			replace = true
			f = &fnModel{name: old.name, sandbox: map[string]string{"runc": "gvisor", "gvisor": "runc"}[old.sandbox], mode: "boot", image: helloRef, seq: old.seq}
			w.replacing = f
		}
		target, window = f.name, w.window(op, 15*time.Millisecond)
		if replace {
			window = w.window("replace", 400*time.Millisecond)
		}
		run = func() error {
			_, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: f.name, Image: f.image, Sandbox: f.sandbox, StartMode: f.mode}, Replace: replace})
			return err
		}
		onCommit = func() { w.fns[f.name] = f }
	case "import":
		ref := fmt.Sprintf("%s%d:t", importPrefix, w.seq)
		lay := nodetest.Variant(t, w.hello, filepath.Join(w.work, fmt.Sprintf("imp%d", w.seq)), ref, 24<<20, w.seed+uint64(w.seq))
		target, window = ref, w.window(op, 800*time.Millisecond)
		run = func() error {
			_, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: lay})
			return err
		}
		onCommit = func() { w.imgs[ref] = lay }
	case "snapshot":
		f := &fnModel{name: fmt.Sprintf("s%d", w.seq), sandbox: "gvisor", mode: "snapshot", image: counterRef, counter: true, seq: w.seq}
		window, afterReply = 1200*time.Millisecond, true
		if w.stats.byOp[op]%2 == 1 {
			f.sandbox, f.mode, f.image, window = "wasm", "lazy", counterWRef, 300*time.Millisecond
		}
		w.deploy(f)
		target = f.name
		// The invocation's reply comes first; the snapshot is written
		// right after it, and the kill lands somewhere in there.
		run = func() error {
			r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: f.name, Payload: []byte("x")})
			if err == nil && !strings.HasPrefix(string(r.Payload), "count=1 ") {
				return fmt.Errorf("first reply %q", r.Payload)
			}
			return err
		}
	case "ws-record":
		f := &fnModel{name: fmt.Sprintf("r%d", w.seq), sandbox: "wasm", mode: "reap", image: counterWRef, counter: true, seq: w.seq}
		w.deploy(f)
		w.invoke(f, false)
		w.waitSnapshot(f, false)
		if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: f.name}); err != nil {
			t.Fatal(err)
		}
		target, window, afterReply = f.name, 300*time.Millisecond, true
		run = func() error {
			r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: f.name, Payload: []byte("x")})
			if err == nil && (r.StartMode != "reap-record" || !strings.HasPrefix(string(r.Payload), "count=2 ")) {
				return fmt.Errorf("record restore answered %q in mode %s", r.Payload, r.StartMode)
			}
			return err
		}
	case "rm":
		var cands []*fnModel
		for _, f := range w.fns {
			cands = append(cands, f)
		}
		if len(cands) == 0 {
			f := &fnModel{name: fmt.Sprintf("s%d", w.seq), sandbox: "wasm", mode: "lazy", image: counterWRef, counter: true, seq: w.seq}
			w.deploy(f)
			w.invoke(f, false)
			w.waitSnapshot(f, false)
			cands = append(cands, f)
		}
		slices.SortFunc(cands, func(a, b *fnModel) int { return a.seq - b.seq })
		// Prefer a function with a snapshot: its removal has the most to do.
		f := cands[w.rng.IntN(len(cands))]
		for _, x := range cands {
			if x.snap && w.rng.IntN(2) == 0 {
				f = x
			}
		}
		target, window = f.name, w.window(op, 700*time.Millisecond)
		run = func() error {
			_, err := c.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: f.name})
			return err
		}
		onCommit = func() { delete(w.fns, f.name) }
	}

	delay := time.Duration(w.rng.Int64N(int64(window)))
	res := make(chan error, 1)
	start := time.Now()
	var returned time.Duration
	go func() {
		err := run()
		returned = time.Since(start)
		res <- err
	}()
	var err error
	if afterReply {
		err = <-res
		time.Sleep(delay)
		w.d.Kill(t)
	} else {
		time.Sleep(delay)
		w.d.Kill(t)
		err = <-res
	}
	done := err == nil && (afterReply || returned <= delay)
	if done && !afterReply {
		if w.replacing != nil {
			w.durs["replace"] = returned
		} else {
			w.durs[op] = returned
		}
	}
	if err == nil && onCommit != nil {
		onCommit() // the call returned success: it is committed
	}
	dead := nodetest.Snapshot(w.state, crashPrefix)
	tmp := w.tempArtifacts()
	inFlight := !done || len(tmp) > 0
	if op == "snapshot" || op == "ws-record" {
		inFlight = len(tmp) > 0
	}
	if inFlight {
		w.stats.inFlight++
	}
	w.stats.trials++
	w.stats.byOp[op]++
	from := "its start"
	if afterReply {
		from = "its reply"
	}
	t.Logf("trial %d: %s %s, kill %v after %s (call returned: %v after %v, err=%v), temp files at kill: %v, left by the dead daemon: %d netns, %d veths, %d mounts, %d cgroups",
		i+1, op, target, delay.Round(time.Millisecond), from, done, returned.Round(time.Millisecond), errString(err), tmp, len(dead.Netns), len(dead.Veths), len(dead.Mounts), len(dead.Cgroups))

	old := w.d
	w.d = nodetest.Start(t, w.bin, w.opts())
	lost0, leak0 := len(w.failed), 0
	// Nothing of the dead daemon is left: processes, netns, veths,
	// mounts, cgroups.
	var procs []string
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if procs = old.TrackedProcs(); len(procs) == 0 || time.Now().After(deadline) {
			break
		}
	}
	leaks := append(nodetest.Snapshot(w.state, crashPrefix).LeakedFrom(dead, 1), procs...)
	if err := old.Stop(); err != nil {
		t.Error(err)
	}
	if len(leaks) > 0 {
		leak0 = len(leaks)
		w.stats.leaked += len(leaks)
		w.fail("trial %d (%s): the dead daemon left %v", i+1, op, leaks)
	}
	w.verify(i, op, target)
	if len(w.failed) > lost0+min(leak0, 1) {
		w.stats.lost++
	}
}

func errString(err error) string {
	if err == nil {
		return "nil"
	}
	s := err.Error()
	if len(s) > 80 {
		s = s[:80] + "…"
	}
	return s
}

// replaceable returns a boot-mode helloworld function in runc or gVisor.
func (w *world) replaceable() *fnModel {
	var best *fnModel
	for _, f := range w.fns {
		if f.mode == "boot" && f.image == helloRef && f.sandbox != "wasm" && (best == nil || f.seq < best.seq) {
			best = f
		}
	}
	return best
}

// window is the range kill delays of op are drawn from: a little more than
// the last completed call took (def before any), so that most kills land
// while the call runs.
func (w *world) window(op string, def time.Duration) time.Duration {
	if d := w.durs[op]; d > 0 {
		return d * 5 / 4
	}
	return def
}

// tempArtifacts lists the in-progress files a kill can leave: image unpacks,
// snapshot temporaries and working-set temporaries.
func (w *world) tempArtifacts() []string {
	var out []string
	if ents, err := os.ReadDir(filepath.Join(w.state, "images", "tmp")); err == nil {
		for _, e := range ents {
			out = append(out, "images/tmp/"+e.Name())
		}
	}
	snaps := filepath.Join(w.state, "snapshots")
	ents, _ := os.ReadDir(snaps)
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			out = append(out, "snapshots/"+e.Name())
			continue
		}
		sub, _ := os.ReadDir(filepath.Join(snaps, e.Name()))
		for _, s := range sub {
			if strings.HasPrefix(s.Name(), ".") || strings.HasSuffix(s.Name(), ".tmp") {
				out = append(out, "snapshots/"+e.Name()+"/"+s.Name())
			}
		}
	}
	return out
}

// cap keeps the state small: at most 5 functions and 3 imported images
// (removed cleanly, not under a kill).
func (w *world) cap() {
	ctx, cancel := w.ctx()
	defer cancel()
	for len(w.fns) > 5 {
		var oldest *fnModel
		for _, f := range w.fns {
			if oldest == nil || f.seq < oldest.seq {
				oldest = f
			}
		}
		if _, err := w.d.Client.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: oldest.name}); err != nil {
			w.t.Fatalf("remove %s: %v", oldest.name, err)
		}
		delete(w.fns, oldest.name)
	}
	for len(w.imgs) > 3 {
		var refs []string
		for r := range w.imgs {
			refs = append(refs, r)
		}
		slices.Sort(refs)
		removed := false
		for _, r := range refs {
			inUse := false
			for _, f := range w.fns {
				inUse = inUse || f.image == r
			}
			if inUse {
				continue
			}
			if _, err := w.d.Client.RemoveImage(ctx, &vhivepb.RemoveImageRequest{Ref: r}); err != nil {
				w.t.Fatalf("remove image %s: %v", r, err)
			}
			delete(w.imgs, r)
			removed = true
			break
		}
		if !removed {
			break
		}
	}
}

func (w *world) deploy(f *fnModel) {
	w.t.Helper()
	ctx, cancel := w.ctx()
	defer cancel()
	if _, err := w.d.Client.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: f.name, Image: f.image, Sandbox: f.sandbox, StartMode: f.mode}}); err != nil {
		w.t.Fatalf("deploy %s: %v", f.name, err)
	}
	w.fns[f.name] = f
}

// wantMode is the start mode a cold start of f must report.
func (f *fnModel) wantMode() string {
	if f.mode == "boot" || !f.snap {
		return "boot"
	}
	if f.mode == "reap" {
		if f.ws {
			return "reap-prefetch"
		}
		return "reap-record"
	}
	return f.mode
}

// invoke cold-starts f (after a restart every start is cold) and checks the
// reply and the start mode against the model. check=false only runs it.
func (w *world) invoke(f *fnModel, check bool) {
	w.t.Helper()
	ctx, cancel := w.ctx()
	defer cancel()
	r, err := w.d.Client.Invoke(ctx, &vhivepb.InvokeRequest{Function: f.name, Payload: []byte("x")})
	if err != nil {
		w.fail("invoke %s (%s, %s): %v", f.name, f.sandbox, f.mode, err)
		return
	}
	want := "Hello, x!"
	if f.counter {
		want = "count=1 "
		if f.wantMode() != "boot" {
			want = "count=2 " // the snapshot was taken after the first call
		}
	}
	if !strings.HasPrefix(string(r.Payload), want) {
		w.fail("invoke %s (%s, %s, mode %s): reply %q, want %q…", f.name, f.sandbox, f.mode, r.StartMode, r.Payload, want)
	}
	if check && r.StartMode != f.wantMode() {
		w.fail("invoke %s: started %q, want %q (snapshot known: %v, working set known: %v)", f.name, r.StartMode, f.wantMode(), f.snap, f.ws)
	}
}

// waitSnapshot waits for f's snapshot (and, with ws, its working set).
func (w *world) waitSnapshot(f *fnModel, ws bool) {
	w.t.Helper()
	ctx, cancel := w.ctx()
	defer cancel()
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		ls, err := w.d.Client.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: f.name})
		if err != nil {
			w.t.Fatal(err)
		}
		if len(ls.Snapshots) == 1 && (!ws || ls.Snapshots[0].WorkingSet) {
			f.snap, f.ws = true, ls.Snapshots[0].WorkingSet
			return
		}
		if time.Now().After(deadline) {
			w.t.Fatalf("no snapshot (working set: %v) of %s after 90s", ws, f.name)
		}
	}
}

// verify checks, after a restart, everything the model says is committed,
// what the interrupted operation on target may or may not have committed,
// and that nothing half-written is visible.
func (w *world) verify(i int, op, target string) {
	t := w.t
	ctx, cancel := w.ctx()
	defer cancel()
	c := w.d.Client

	// Functions: every committed one is listed; nothing else but the
	// interrupted deploy's may appear.
	fl, err := c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	listed := map[string]*vhivepb.FunctionStatus{}
	for _, f := range fl.Functions {
		listed[f.Spec.Name] = f
	}
	for name, f := range w.fns {
		if listed[name] == nil {
			if op == "rm" && name == target {
				delete(w.fns, name) // the removal committed before the kill
				continue
			}
			w.fail("trial %d (%s): committed function %s (%s) is lost", i+1, op, name, f.sandbox)
		}
	}
	if f := w.replacing; f != nil && op == "deploy" && f.name == target {
		// An interrupted replace: the old or the new spec, whichever
		// the listing shows, is the committed one.
		if st := listed[f.name]; st != nil && st.Spec.Sandbox == f.sandbox {
			w.fns[f.name] = f
		}
		w.t.Logf("trial %d: replaced %s is listed in sandbox %s", i+1, f.name, w.fns[f.name].sandbox)
	}
	w.replacing = nil
	for name, st := range listed {
		if w.fns[name] != nil {
			if st.Spec.Sandbox != w.fns[name].sandbox {
				w.fail("trial %d (%s): function %s runs in %s, committed in %s", i+1, op, name, st.Spec.Sandbox, w.fns[name].sandbox)
			}
			continue
		}
		switch {
		case op == "deploy" && name == target:
			sb := st.Spec.Sandbox
			f := &fnModel{name: name, image: helloRef, sandbox: sb, mode: "boot", seq: w.seq}
			if sb == "wasm" {
				f.image, f.counter = counterWRef, true
			}
			w.fns[name] = f
		case op == "rm" && name == target:
			w.fail("trial %d: removed function %s came back", i+1, name)
		default:
			w.fail("trial %d (%s): function %s appeared from nowhere", i+1, op, name)
		}
	}

	// Images: committed imports are listed with complete contents; only
	// the interrupted import may appear besides; nothing unrecorded or
	// temporary is on disk.
	il, err := c.ListImages(ctx, &vhivepb.ListImagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	digests := map[string]bool{}
	seen := map[string]bool{}
	for _, im := range il.Images {
		digests[strings.TrimPrefix(im.Digest, "sha256:")] = true
		seen[im.Ref] = true
		if !strings.HasPrefix(im.Ref, importPrefix) {
			continue
		}
		if _, ok := w.imgs[im.Ref]; !ok {
			if op == "import" && im.Ref == target {
				w.imgs[im.Ref] = filepath.Join(w.work, strings.TrimPrefix(strings.TrimSuffix(im.Ref, ":t"), "localhost/h13/"))
			} else {
				w.fail("trial %d (%s): image %s appeared from nowhere", i+1, op, im.Ref)
				continue
			}
		}
		marker, err := os.ReadFile(filepath.Join(im.Rootfs, "marker"))
		fi, ferr := os.Stat(filepath.Join(im.Rootfs, "filler"))
		if err != nil || string(marker) != im.Ref || ferr != nil || fi.Size() != 24<<20 {
			w.fail("trial %d: image %s is listed but incomplete: marker %q (%v), filler %v", i+1, im.Ref, marker, err, ferr)
		}
	}
	for ref := range w.imgs {
		if !seen[ref] {
			w.fail("trial %d (%s): committed image %s is lost", i+1, op, ref)
		}
	}
	if ents, _ := os.ReadDir(filepath.Join(w.state, "images", "tmp")); len(ents) > 0 {
		w.fail("trial %d: images/tmp holds %d leftovers after restart", i+1, len(ents))
	}
	if ents, err := os.ReadDir(filepath.Join(w.state, "images", "digests", "sha256")); err == nil {
		for _, e := range ents {
			if !digests[e.Name()] {
				w.fail("trial %d: unrecorded image directory %s is on disk after restart", i+1, e.Name())
			}
		}
	}

	// Snapshots: committed ones are listed; every listed one is complete
	// (checked here against its manifest, independently of the daemon)
	// and belongs to a deployed function; no temporaries remain.
	sl, err := c.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	snapOf := map[string]*vhivepb.SnapshotInfo{}
	for _, s := range sl.Snapshots {
		snapOf[s.Function] = s
		if w.fns[s.Function] == nil {
			w.fail("trial %d (%s): snapshot %s of function %s, which is not deployed", i+1, op, s.Id, s.Function)
			continue
		}
		if err := checkManifest(s.Path); err != nil {
			w.fail("trial %d (%s): snapshot %s is listed but %v", i+1, op, s.Id, err)
		}
	}
	for name, f := range w.fns {
		s := snapOf[name]
		if f.snap && s == nil {
			w.fail("trial %d (%s): committed snapshot of %s is lost", i+1, op, name)
		}
		if f.ws && (s == nil || !s.WorkingSet) {
			w.fail("trial %d (%s): committed working set of %s is lost", i+1, op, name)
		}
		if s != nil {
			f.snap, f.ws = true, s.WorkingSet
		}
	}
	if tmp := w.tempArtifacts(); len(tmp) > 0 {
		w.fail("trial %d (%s): temporaries visible after restart: %v", i+1, op, tmp)
	}

	// Every function is usable: a cold start in the mode its committed
	// state implies, with the state it had.
	names := make([]string, 0, len(w.fns))
	for n := range w.fns {
		names = append(names, n)
	}
	slices.Sort(names)
	for _, n := range names {
		w.invoke(w.fns[n], true)
	}
	// A committed import is deployed once and run, then its function is
	// one of the committed ones.
	if op == "import" {
		if _, ok := w.imgs[target]; ok {
			f := &fnModel{name: fmt.Sprintf("i%d", w.seq), image: target, sandbox: "runc", mode: "boot", seq: w.seq}
			w.deploy(f)
			w.invoke(f, true)
		}
	}
	// Settle: snapshots and working sets the invocations triggered are
	// committed before the next trial, so the model is exact again.
	for _, n := range names {
		f := w.fns[n]
		if f.mode != "boot" {
			w.waitSnapshot(f, f.mode == "reap" && f.snap)
		}
	}
}

// checkManifest verifies a snapshot directory against its manifest: every
// file listed with its size and SHA-256, nothing else but the manifest.
func checkManifest(dir string) error {
	data, err := os.ReadFile(filepath.Join(dir, "manifest.json"))
	if err != nil {
		return err
	}
	var m struct {
		Files []struct {
			Name   string `json:"name"`
			Size   int64  `json:"size"`
			SHA256 string `json:"sha256"`
		} `json:"files"`
		WorkingSet *struct {
			Name   string `json:"name"`
			Size   int64  `json:"size"`
			SHA256 string `json:"sha256"`
		} `json:"working_set"`
	}
	if err := json.Unmarshal(data, &m); err != nil {
		return fmt.Errorf("manifest: %w", err)
	}
	files := m.Files
	if m.WorkingSet != nil {
		files = append(files, *m.WorkingSet)
	}
	want := map[string]bool{"manifest.json": true}
	for _, f := range files {
		want[f.Name] = true
		fh, err := os.Open(filepath.Join(dir, f.Name))
		if err != nil {
			return fmt.Errorf("file %s: %w", f.Name, err)
		}
		h := sha256.New()
		n, err := io.Copy(h, fh)
		fh.Close()
		if err != nil {
			return err
		}
		if n != f.Size || hex.EncodeToString(h.Sum(nil)) != f.SHA256 {
			return fmt.Errorf("file %s: %d bytes sha256 %x, manifest says %d bytes %s", f.Name, n, h.Sum(nil), f.Size, f.SHA256)
		}
	}
	var extra []string
	_ = filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return nil
		}
		rel, _ := filepath.Rel(dir, p)
		// After a restart not even the working set of a record that had
		// not committed may remain: only what the manifest lists.
		if !want[rel] {
			extra = append(extra, rel)
		}
		return nil
	})
	if len(extra) > 0 {
		return fmt.Errorf("holds files its manifest does not list: %v", extra)
	}
	return nil
}
