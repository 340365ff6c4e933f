package bench

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/testutil"
)

// fakeDaemon is an in-memory stand-in for the daemon's control API that
// follows the documented protocol (boot, snapshot after the first boot,
// REAP record then prefetch). It checks the bench's side of the method:
// a cold start only after StopInstances and a page-cache drop. The real
// daemon is exercised by the e2e smoke test (e2e_test.go).
type fakeDaemon struct {
	mu        sync.Mutex
	images    []string
	imported  []string
	funcs     map[string]*fakeFunc
	drops     int
	violation []string
	// lieMode, when set, is reported as the start mode of every restore.
	lieMode string
}

type fakeFunc struct {
	spec      *vhivepb.FunctionSpec
	running   int
	snapshot  bool
	ws        bool
	recorded  bool
	dropsSeen int
	n         int
}

func newFakeDaemon() *fakeDaemon { return &fakeDaemon{funcs: map[string]*fakeFunc{}} }

func (d *fakeDaemon) drop() error {
	d.mu.Lock()
	defer d.mu.Unlock()
	d.drops++
	return nil
}

func (d *fakeDaemon) Deploy(_ context.Context, in *vhivepb.DeployRequest, _ ...grpc.CallOption) (*vhivepb.DeployResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	s := in.GetSpec()
	if !slices.Contains(d.images, s.GetImage()) {
		return nil, status.Errorf(codes.NotFound, "image %q not found", s.GetImage())
	}
	if s.GetSandbox() == "wasm" && s.GetStartMode() == "reap" {
		return nil, status.Error(codes.InvalidArgument, "sandbox wasm does not support start mode reap")
	}
	d.funcs[s.GetName()] = &fakeFunc{spec: s, dropsSeen: d.drops}
	return &vhivepb.DeployResponse{}, nil
}

func (d *fakeDaemon) Invoke(_ context.Context, in *vhivepb.InvokeRequest, _ ...grpc.CallOption) (*vhivepb.InvokeResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f, ok := d.funcs[in.GetFunction()]
	if !ok {
		return nil, status.Errorf(codes.NotFound, "function %q", in.GetFunction())
	}
	f.n++
	resp := &vhivepb.InvokeResponse{InstanceId: fmt.Sprintf("%s-%d", in.GetFunction(), f.n), Payload: in.GetPayload()}
	if f.running > 0 && f.running >= int(max(f.spec.GetMaxInstances(), 1)) {
		resp.StartMode = "boot"
		resp.Stages = []*vhivepb.Stage{{Name: "FuncInvocation", Micros: 900}}
		return resp, nil
	}
	if d.drops == f.dropsSeen && f.running == 0 {
		d.violation = append(d.violation, "cold start of "+in.GetFunction()+" without a page-cache drop")
	}
	f.dropsSeen = d.drops
	f.running++
	resp.ColdStart = true
	mode := f.spec.GetStartMode()
	switch {
	case !f.snapshot || mode == "boot":
		resp.StartMode = "boot"
		resp.Stages = []*vhivepb.Stage{{Name: "CreateSandbox", Micros: 100000}, {Name: "StartSandbox", Micros: 200000}, {Name: "FuncInvocation", Micros: 1000}, {Name: "Total", Micros: 305000}}
		if mode != "boot" {
			f.snapshot = true
		}
	case mode == "reap" && !f.ws:
		resp.StartMode = "reap-record"
		f.recorded = true
		resp.Stages = []*vhivepb.Stage{{Name: "LoadVMM", Micros: 50000}, {Name: "FuncInvocation", Micros: 250000}}
		resp.MemoryStats = map[string]int64{"RecPages": 2400, "RecRegions": 130}
	case mode == "reap":
		resp.StartMode = "reap-prefetch"
		resp.Stages = []*vhivepb.Stage{{Name: "LoadVMM", Micros: 50000}, {Name: "InstallWS", Micros: 8000}, {Name: "FuncInvocation", Micros: 2000}}
		resp.MemoryStats = map[string]int64{"Unique": 10 + int64(f.n%3)}
	default:
		resp.StartMode = mode
		resp.Stages = []*vhivepb.Stage{{Name: "LoadVMM", Micros: 50000}, {Name: "FuncInvocation", Micros: 180000}}
	}
	if d.lieMode != "" && resp.StartMode != "boot" {
		resp.StartMode = d.lieMode
	}
	return resp, nil
}

func (d *fakeDaemon) RemoveFunction(_ context.Context, in *vhivepb.RemoveFunctionRequest, _ ...grpc.CallOption) (*vhivepb.RemoveFunctionResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	delete(d.funcs, in.GetName())
	return &vhivepb.RemoveFunctionResponse{}, nil
}

func (d *fakeDaemon) StopInstances(_ context.Context, in *vhivepb.StopInstancesRequest, _ ...grpc.CallOption) (*vhivepb.StopInstancesResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.funcs[in.GetFunction()]
	n := f.running
	f.running = 0
	if f.recorded {
		f.ws = true
	}
	return &vhivepb.StopInstancesResponse{Stopped: uint32(n)}, nil
}

func (d *fakeDaemon) ListInstances(_ context.Context, in *vhivepb.ListInstancesRequest, _ ...grpc.CallOption) (*vhivepb.ListInstancesResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.funcs[in.GetFunction()]
	if f.running == 0 {
		return &vhivepb.ListInstancesResponse{}, nil
	}
	return &vhivepb.ListInstancesResponse{Instances: []*vhivepb.InstanceInfo{{Id: fmt.Sprintf("%s-%d", in.GetFunction(), f.n), Function: in.GetFunction(), RssBytes: 30 << 20, PssBytes: 20 << 20}}}, nil
}

func (d *fakeDaemon) ListSnapshots(_ context.Context, in *vhivepb.ListSnapshotsRequest, _ ...grpc.CallOption) (*vhivepb.ListSnapshotsResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	f := d.funcs[in.GetFunction()]
	if f == nil || !f.snapshot {
		return &vhivepb.ListSnapshotsResponse{}, nil
	}
	return &vhivepb.ListSnapshotsResponse{Snapshots: []*vhivepb.SnapshotInfo{{Id: "s", Function: in.GetFunction(), WorkingSet: f.ws}}}, nil
}

func (d *fakeDaemon) ListImages(context.Context, *vhivepb.ListImagesRequest, ...grpc.CallOption) (*vhivepb.ListImagesResponse, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out []*vhivepb.ImageInfo
	for _, r := range d.images {
		out = append(out, &vhivepb.ImageInfo{Ref: r})
	}
	return &vhivepb.ListImagesResponse{Images: out}, nil
}

func (d *fakeDaemon) ImportImage(_ context.Context, in *vhivepb.ImportImageRequest, _ ...grpc.CallOption) (*vhivepb.ImageInfo, error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if _, err := os.Stat(in.GetPath()); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "path %q: %v", in.GetPath(), err)
	}
	d.imported = append(d.imported, in.GetPath())
	d.images = append(d.images, in.GetRef())
	return &vhivepb.ImageInfo{Ref: in.GetRef()}, nil
}

func TestColdstartProtocol(t *testing.T) {
	d := newFakeDaemon()
	d.images = []string{ImageRef("helloworld", "gvisor")}
	imgDir := t.TempDir()
	if err := os.Mkdir(filepath.Join(imgDir, "helloworld-wasm"), 0o755); err != nil {
		t.Fatal(err)
	}
	opts := ColdstartOptions{
		Functions: []string{"helloworld"}, Sandboxes: []string{"gvisor", "wasm"},
		Modes: []string{"boot", "snapshot", "reap", "warm"}, Iterations: 3,
		Common: Common{ImagesDir: imgDir, DropCaches: d.drop},
	}
	res, err := RunColdstart(context.Background(), d, opts)
	if err != nil {
		t.Fatal(err)
	}
	if len(d.violation) > 0 {
		t.Errorf("method violations: %v", d.violation)
	}
	if len(d.imported) != 1 || !strings.HasSuffix(d.imported[0], "helloworld-wasm") {
		t.Errorf("imported %v, want the wasm image from %s", d.imported, imgDir)
	}
	if len(res.Cells) != 8 {
		t.Fatalf("%d cells, want 8", len(res.Cells))
	}
	for _, c := range res.Cells {
		wantStatus := StatusOK
		if c.Sandbox == "wasm" && c.Mode == "reap" {
			wantStatus = StatusUnsupported
		}
		if c.Status() != wantStatus {
			t.Errorf("%s: status %s (%s%s), want %s", c.Cell, c.Status(), c.Unsupported, c.Err, wantStatus)
			continue
		}
		if wantStatus != StatusOK {
			if len(c.Iterations) != 0 {
				t.Errorf("%s: unsupported cell has measurements", c.Cell)
			}
			continue
		}
		if len(c.Iterations) != 3 {
			t.Errorf("%s: %d iterations", c.Cell, len(c.Iterations))
		}
		for _, it := range c.Iterations {
			switch c.Mode {
			case "warm":
				if it.ColdStart {
					t.Errorf("%s: warm iteration was cold", c.Cell)
				}
			case "reap":
				if it.StartMode != StartedREAPPrefetch {
					t.Errorf("%s: measured %q", c.Cell, it.StartMode)
				}
			default:
				if it.StartMode != c.Mode || !it.ColdStart {
					t.Errorf("%s: measured %q cold=%v", c.Cell, it.StartMode, it.ColdStart)
				}
			}
		}
		if c.Mode == "reap" && (c.Record == nil || c.Record.StartMode != StartedREAPRecord) {
			t.Errorf("%s: record run missing: %+v", c.Cell, c.Record)
		}
		if len(c.Footprints) != 1 {
			t.Errorf("%s: footprints %+v", c.Cell, c.Footprints)
		}
	}
	if len(d.funcs) != 0 {
		t.Errorf("bench functions left deployed: %v", slices.Collect(func(yield func(string) bool) {
			for k := range d.funcs {
				if !yield(k) {
					return
				}
			}
		}))
	}

	out := t.TempDir()
	files, err := res.WriteFiles(out)
	if err != nil {
		t.Fatal(err)
	}
	plots, err := res.WritePlots(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(plots) != 4 {
		t.Errorf("plots %v, want PNG+SVG for gvisor and wasm", plots)
	}
	for _, f := range append(files, plots...) {
		if fi, err := os.Stat(f); err != nil || fi.Size() == 0 {
			t.Errorf("output %s missing or empty", f)
		}
	}
	boot := readCSV(t, filepath.Join(out, MeanStdFile("gvisor", "boot")))
	wantBoot := [][]string{
		{"FuncName", "CreateSandbox", "StdDev", "FuncInvocation", "StdDev", "StartSandbox", "StdDev", "Total", "StdDev"},
		{"helloworld", "100000", "0.0", "1000", "0.0", "200000", "0.0", "301000", "0.0"},
	}
	for i := range wantBoot {
		if len(boot) != 2 || !slices.Equal(boot[i], wantBoot[i]) {
			t.Errorf("boot mean/std CSV (the daemon's Total stage must not be summed): %v, want %v", boot, wantBoot)
			break
		}
	}
	rows := readCSV(t, filepath.Join(out, MeanStdFile("gvisor", "reap")))
	if len(rows) != 2 || rows[1][0] != "helloworld" || rows[0][1] != "FuncInvocation" {
		t.Errorf("reap mean/std CSV: %v", rows)
	}
	pages := readCSV(t, filepath.Join(out, PageStatsFile("gvisor")))
	if len(pages) != 2 || pages[1][1] != "2400" || pages[1][2] != "130" {
		t.Errorf("page stats: %v", pages)
	}
	status := readCSV(t, filepath.Join(out, StatusFile))
	var unsupported int
	for _, r := range status[1:] {
		if r[3] == StatusUnsupported {
			unsupported++
			if !strings.Contains(r[4], "reap") {
				t.Errorf("unsupported reason %q", r[4])
			}
		}
	}
	if unsupported != 1 {
		t.Errorf("cells.csv: %v", status)
	}
	iters := readCSV(t, filepath.Join(out, IterationsFile))
	// 7 OK cells × (1 prepare + 3) + 1 record per reap cell.
	if want := 7*4 + 1 + 1; len(iters) != want {
		t.Errorf("iterations CSV has %d lines, want %d", len(iters), want)
	}
	var buf strings.Builder
	if err := res.WriteTable(&buf); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(buf.String(), "unsupported") || !strings.Contains(buf.String(), "reap-record") {
		t.Errorf("table:\n%s", buf.String())
	}
}

// A daemon that restores in another mode than asked fails the cell: the
// bench never reports one mode's figures under another's name.
func TestColdstartRefusesWrongStartMode(t *testing.T) {
	d := newFakeDaemon()
	d.images = []string{ImageRef("helloworld", "runc")}
	d.lieMode = "lazy"
	res, err := RunColdstart(context.Background(), d, ColdstartOptions{
		Functions: []string{"helloworld"}, Sandboxes: []string{"runc"}, Modes: []string{"snapshot"},
		Iterations: 2, Common: Common{DropCaches: d.drop},
	})
	if err != nil {
		t.Fatal(err)
	}
	c := res.Cells[0]
	if c.Status() != StatusFailed || !strings.Contains(c.Err, `as "lazy", want "snapshot"`) {
		t.Errorf("cell %+v: want a start-mode mismatch failure", c)
	}
}

func TestColdstartOptionErrors(t *testing.T) {
	d := newFakeDaemon()
	base := ColdstartOptions{Functions: []string{"helloworld"}, Sandboxes: []string{"gvisor"}, Modes: []string{"boot"}, Iterations: 1, Common: Common{DropCaches: d.drop}}
	for name, mut := range map[string]func(*ColdstartOptions){
		"sandbox":    func(o *ColdstartOptions) { o.Sandboxes = []string{"firecracker"} },
		"mode":       func(o *ColdstartOptions) { o.Modes = []string{"fast"} },
		"iterations": func(o *ColdstartOptions) { o.Iterations = 0 },
		"function":   func(o *ColdstartOptions) { o.Functions = []string{"docker.io/x:1"} },
		"none":       func(o *ColdstartOptions) { o.Functions = nil },
		"settle":     func(o *ColdstartOptions) { o.Settle = -time.Second },
	} {
		o := base
		mut(&o)
		if _, err := RunColdstart(context.Background(), d, o); err == nil {
			t.Errorf("%s: want error", name)
		}
	}
	// Missing image and no images dir: the cell fails with a clear error
	// naming the ref.
	res, err := RunColdstart(context.Background(), d, base)
	if err != nil {
		t.Fatal(err)
	}
	if c := res.Cells[0]; c.Status() != StatusFailed || !strings.Contains(c.Err, "localhost/vhive/helloworld:latest") {
		t.Errorf("missing image: %+v", c)
	}
}

// TestColdstartSandboxNames: every sandbox the daemon offers is accepted
// (microvm was refused as unknown before the daemon's fourth backend was
// added to the bench's list).
func TestColdstartSandboxNames(t *testing.T) {
	for _, sb := range []string{"gvisor", "runc", "wasm", "microvm"} {
		o := ColdstartOptions{Functions: []string{"helloworld"}, Sandboxes: []string{sb}, Modes: []string{"boot"}, Iterations: 1}
		if err := o.setDefaults(); err != nil {
			t.Errorf("sandbox %s: %v", sb, err)
		}
	}
}

func TestConcurrencyBursts(t *testing.T) {
	d := newFakeDaemon()
	d.images = []string{ImageRef("helloworld", "gvisor")}
	res, err := RunConcurrency(context.Background(), d, ConcurrencyOptions{
		Function: "helloworld", Sandbox: "gvisor", Modes: []string{"boot", "reap"}, Levels: []int{1, 2, 4},
		Repeats: 2, Common: Common{DropCaches: d.drop},
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(d.violation) > 0 {
		t.Errorf("method violations: %v", d.violation)
	}
	h, rows := res.Rows()
	if len(rows) != 6 {
		t.Fatalf("rows %v", rows)
	}
	for _, r := range rows {
		// Requests = level × repeats, all cold in the asked mode.
		if r[4] != r[5] || r[6] != "0" {
			t.Errorf("row %v (header %v): every request should be a measured cold start", r, h)
		}
	}
	out := t.TempDir()
	files, err := res.WriteFiles(out)
	if err != nil {
		t.Fatal(err)
	}
	if len(files) != 4 { // csv, json, png, svg
		t.Errorf("files %v", files)
	}
	if _, err := RunConcurrency(context.Background(), d, ConcurrencyOptions{Function: "helloworld", Sandbox: "gvisor", Modes: []string{"warm"}, Levels: []int{1}}); err == nil {
		t.Error("warm mode: want error")
	}
}

// The real page-cache drop works as root (what the bench does by default).
func TestDropPageCache(t *testing.T) {
	testutil.RequiresRoot(t)
	if err := DropPageCache(); err != nil {
		t.Fatal(err)
	}
}

func TestReadMachine(t *testing.T) {
	m, err := ReadMachine()
	if err != nil {
		t.Fatal(err)
	}
	if m.CPUs < 1 || m.MemBytes == 0 || m.Kernel == "" || m.Arch == "" {
		t.Errorf("machine %+v", m)
	}
}
