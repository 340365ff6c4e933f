package bench

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// Progress receives one step per invocation the bench makes. It matches
// *progressbar.ProgressBar; nil means no progress output.
type Progress interface {
	Add(n int) error
	Describe(description string)
}

// Cell is one measured configuration.
type Cell struct {
	Function string `json:"function"`
	Sandbox  string `json:"sandbox"`
	Mode     string `json:"mode"`
}

func (c Cell) String() string { return c.Function + "/" + c.Sandbox + "/" + c.Mode }

// DeployName is the function name the bench deploys a cell as.
func (c Cell) DeployName() string {
	return "bench-" + c.Function + "-" + c.Sandbox + "-" + c.Mode
}

// Phases of an invocation within a cell.
const (
	PhasePrepare = "prepare" // boots and snapshots, not measured
	PhaseRecord  = "record"  // REAP record run, reported separately
	PhaseMeasure = "measure"
)

// Invocation is one invocation the bench made and what the daemon said.
type Invocation struct {
	Cell
	Phase        string    `json:"phase"`
	Index        int       `json:"index"`
	Time         time.Time `json:"time"`
	StartMode    string    `json:"start_mode"`
	ColdStart    bool      `json:"cold_start"`
	InstanceID   string    `json:"instance_id"`
	ClientMicros int64     `json:"client_micros"` // wall time of the Invoke RPC
	// DaemonTotalMicros is the daemon's "Total" stage when it reports one
	// (its end-to-end time, gaps between stages included).
	DaemonTotalMicros int64            `json:"daemon_total_micros,omitempty"`
	Stages            Sample           `json:"stages"` // the daemon's stage timings, µs
	MemoryStats       map[string]int64 `json:"memory_stats,omitempty"`
}

// Footprint phases.
const (
	AfterBoot    = "after-boot"
	AfterRestore = "after-restore"
	Warm         = "warm"
)

// Footprint is an instance's memory footprint at one point.
type Footprint struct {
	Cell
	Phase    string `json:"phase"`
	Instance string `json:"instance"`
	RSS      int64  `json:"rss_bytes"`
	PSS      int64  `json:"pss_bytes"`
}

// CellResult is everything measured for one cell.
type CellResult struct {
	Cell
	// Unsupported is the daemon's reason when it refused this start mode
	// for this sandbox; such a cell has no measurements.
	Unsupported string `json:"unsupported,omitempty"`
	// Err is why the cell failed part-way; measurements before the failure
	// are kept but not summarized.
	Err        string       `json:"error,omitempty"`
	Prepare    []Invocation `json:"prepare,omitempty"`
	Record     *Invocation  `json:"record,omitempty"`
	Iterations []Invocation `json:"iterations"`
	Footprints []Footprint  `json:"footprints,omitempty"`
}

// OK reports whether the cell has a complete set of measurements.
func (r *CellResult) OK() bool { return r.Unsupported == "" && r.Err == "" && len(r.Iterations) > 0 }

// Samples returns the stage samples of the measured iterations.
func (r *CellResult) Samples() []Sample {
	s := make([]Sample, len(r.Iterations))
	for i, it := range r.Iterations {
		s[i] = it.Stages
	}
	return s
}

// ColdstartOptions configures RunColdstart.
type ColdstartOptions struct {
	Functions  []string
	Sandboxes  []string
	Modes      []string
	Iterations int
	Common
	// Skip, if set, leaves out the function × sandbox pairs it reports
	// (neither run nor recorded): e.g. the Python suite on wasm (see
	// SuiteSkip).
	Skip func(function, sandbox string) bool
}

// Common are the options of every bench.
type Common struct {
	// WithCache keeps the page cache between cold starts instead of
	// dropping it before each.
	WithCache bool
	// ImagesDir holds images to import when the daemon lacks them.
	ImagesDir string
	// Payload of the measured invocations (default "replay": vHive's
	// functions then use input set 2, while the boot, snapshot and REAP
	// record runs use "record", set 1; "record" measures REAP on the same
	// input it recorded).
	Payload string
	// Request, when set, is every invocation's request instead of the
	// payloads: a gRPC method and its request, or an HTTP request (its
	// Function and TimeoutMs are the bench's). The CSVs are the same.
	Request *vhivepb.InvokeRequest
	// InvokeTimeout bounds each invocation (default 5m).
	InvokeTimeout time.Duration
	// SnapshotTimeout bounds the wait for a snapshot or a REAP working set
	// to appear (default 5m).
	SnapshotTimeout time.Duration
	// KeepFunctions leaves the bench's functions deployed at the end.
	KeepFunctions bool
	Progress      Progress
	Logger        *slog.Logger
	// DropCaches replaces DropPageCache (for callers that drop caches by
	// other means); nil uses DropPageCache.
	DropCaches func() error
	// Settle is a pause after stopping a function's instances and before
	// dropping the caches for the next cold start (or burst), so that the
	// daemon's background work — refilling its ready-worker pools,
	// tearing the stopped instances down — is over and does not compete
	// with the cold start measured (0: none).
	Settle time.Duration
}

// setDefaults fills in the defaults.
func (o *Common) setDefaults() {
	if o.InvokeTimeout == 0 {
		o.InvokeTimeout = 5 * time.Minute
	}
	if o.Payload == "" {
		o.Payload = payloadReplay
	}
	if o.SnapshotTimeout == 0 {
		o.SnapshotTimeout = 5 * time.Minute
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.DropCaches == nil {
		o.DropCaches = DropPageCache
	}
}

// checkDropCaches fails, unless WithCache, if the page cache cannot be
// dropped: before anything is deployed.
func (o *Common) checkDropCaches() error {
	if o.WithCache {
		return nil
	}
	return o.DropCaches()
}

func checkList(what string, got, known []string) error {
	if len(got) == 0 {
		return fmt.Errorf("no %s given (known: %s)", what, strings.Join(known, ","))
	}
	for _, g := range got {
		if known != nil && !slices.Contains(known, g) {
			return fmt.Errorf("unknown %s %q (known: %s)", what, g, strings.Join(known, ","))
		}
		if g == "" {
			return fmt.Errorf("empty name in %s list", what)
		}
	}
	return nil
}

func (o *ColdstartOptions) setDefaults() error {
	if err := checkList("function", o.Functions, nil); err != nil {
		return err
	}
	if o.Settle < 0 {
		return fmt.Errorf("settle %v: want 0 or more", o.Settle)
	}
	for _, f := range o.Functions {
		if strings.ContainsAny(f, "/: ") {
			return fmt.Errorf("function %q: want a bare name such as helloworld (the image is localhost/vhive/<name>:latest)", f)
		}
	}
	if err := checkList("sandbox", o.Sandboxes, knownSandboxes()); err != nil {
		return err
	}
	if err := checkList("mode", o.Modes, knownModes()); err != nil {
		return err
	}
	if o.Iterations < 1 {
		return fmt.Errorf("iterations %d: want at least 1", o.Iterations)
	}
	o.Common.setDefaults()
	return nil
}

// ColdstartSteps is the number of invocations RunColdstart makes at most
// with opts: a progress bar's total.
func ColdstartSteps(opts ColdstartOptions) int {
	n := 0
	for _, m := range opts.Modes {
		per := opts.Iterations + 1 // prepare boot
		if m == ModeREAP {
			per++ // record run
		}
		n += per
	}
	pairs := 0
	for _, sb := range opts.Sandboxes {
		for _, fn := range opts.Functions {
			if opts.Skip == nil || !opts.Skip(fn, sb) {
				pairs++
			}
		}
	}
	return n * pairs
}

// ColdstartResult is the outcome of a cold-start benchmark.
type ColdstartResult struct {
	Iterations int          `json:"iterations"`
	WithCache  bool         `json:"with_cache"`
	Cells      []CellResult `json:"cells"`
}

// RunColdstart measures cold starts with vHive's single-node method for
// every function × sandbox × mode:
//
//   - boot: StopInstances → drop page cache → Invoke, N times.
//   - snapshot, lazy: one boot creates the snapshot (the bench waits until
//     ListSnapshots shows it), then N times StopInstances → drop → Invoke.
//   - reap: as snapshot, plus one record run (start mode reap-record,
//     reported separately) before the N prefetch runs.
//   - warm: one boot, then N invocations of the running instance.
//
// A start mode the daemon refuses at Deploy (InvalidArgument,
// Unimplemented) is reported as unsupported; a daemon that starts an
// instance in another mode than asked fails the cell rather than measuring
// the wrong thing. Per-cell failures (including a missing image) are
// recorded and the run goes on; the error return is for bad options, a page
// cache that cannot be dropped, or a cancelled context.
func RunColdstart(ctx context.Context, c Control, opts ColdstartOptions) (*ColdstartResult, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	if err := opts.checkDropCaches(); err != nil {
		return nil, err
	}
	res := &ColdstartResult{Iterations: opts.Iterations, WithCache: opts.WithCache}
	for _, sb := range opts.Sandboxes {
		for _, fn := range opts.Functions {
			if opts.Skip != nil && opts.Skip(fn, sb) {
				continue
			}
			imgErr := EnsureImage(ctx, c, ImageRef(fn, sb), imageName(fn, sb), opts.ImagesDir)
			if ctx.Err() != nil {
				return res, ctx.Err()
			}
			for _, mode := range opts.Modes {
				cell := Cell{Function: fn, Sandbox: sb, Mode: mode}
				if imgErr != nil {
					// Without its image no mode of this cell can run; the
					// other sandboxes and functions still can.
					r := CellResult{Cell: cell, Err: imgErr.Error()}
					if IsUnsupported(imgErr) {
						r = CellResult{Cell: cell, Unsupported: imgErr.Error()}
					}
					res.Cells = append(res.Cells, r)
					(&cellRunner{o: &opts, cell: cell}).skipSteps()
					continue
				}
				r := runCell(ctx, c, &opts, cell)
				res.Cells = append(res.Cells, r)
				if ctx.Err() != nil {
					return res, ctx.Err()
				}
			}
		}
	}
	return res, nil
}

type cellRunner struct {
	c    Control
	o    *ColdstartOptions
	cell Cell
	name string
	r    *CellResult
	log  *slog.Logger
}

func runCell(ctx context.Context, c Control, o *ColdstartOptions, cell Cell) CellResult {
	cr := &cellRunner{c: c, o: o, cell: cell, name: cell.DeployName(), r: &CellResult{Cell: cell}, log: o.Logger.With("cell", cell.String())}
	if o.Progress != nil {
		o.Progress.Describe(cell.String())
	}
	startMode := cell.Mode
	if cell.Mode == ModeWarm {
		startMode = ModeBoot
	}
	spec := &vhivepb.FunctionSpec{
		Name:      cr.name,
		Image:     ImageRef(cell.Function, cell.Sandbox),
		Sandbox:   cell.Sandbox,
		StartMode: startMode,
	}
	remove, err := cr.deploy(ctx, spec)
	if err != nil {
		if IsUnsupported(err) {
			cr.r.Unsupported = err.Error()
			cr.log.Info("unsupported", "err", err)
		} else {
			cr.r.Err = fmt.Sprintf("deploy %q: %v", cr.name, err)
		}
		cr.skipSteps()
		return *cr.r
	}
	defer remove()
	if err := cr.run(ctx); err != nil {
		cr.r.Err = err.Error()
		cr.log.Error("cell failed", "err", err)
	}
	return *cr.r
}

// deploy deploys spec as the runner's function (replacing one an earlier run
// left) and returns what removes it at the end, also after ctx ended;
// nothing with KeepFunctions.
func (cr *cellRunner) deploy(ctx context.Context, spec *vhivepb.FunctionSpec) (remove func(), err error) {
	if _, err := cr.c.Deploy(ctx, &vhivepb.DeployRequest{Spec: spec, Replace: true}); err != nil {
		return nil, err
	}
	if cr.o.KeepFunctions {
		return func() {}, nil
	}
	return func() {
		cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), time.Minute)
		defer cancel()
		if _, err := cr.c.RemoveFunction(cctx, &vhivepb.RemoveFunctionRequest{Name: cr.name}); err != nil {
			cr.log.Warn("remove bench function", "function", cr.name, "err", err)
		}
	}, nil
}

// skipSteps advances the progress bar over a cell that will not run.
func (cr *cellRunner) skipSteps() {
	if cr.o.Progress != nil {
		one := *cr.o
		one.Modes, one.Functions, one.Sandboxes = []string{cr.cell.Mode}, []string{"x"}, []string{"x"}
		_ = cr.o.Progress.Add(ColdstartSteps(one))
	}
}

func (cr *cellRunner) step() {
	if cr.o.Progress != nil {
		_ = cr.o.Progress.Add(1)
	}
}

// invoke calls the function once, optionally after scaling it to zero and
// dropping the page cache, and checks how the daemon started it.
// What an invocation is expected to be.
type expect int

const (
	expectCold expect = iota // after StopInstances: must be a cold start
	expectWarm               // must hit a running instance
	expectAny                // checked by the caller (concurrent bursts)
)

// scaleToZero stops the function's instances, waits Settle, and drops the
// page cache unless WithCache: what precedes every measured cold start.
func (cr *cellRunner) scaleToZero(ctx context.Context) error {
	if _, err := cr.c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: cr.name}); err != nil {
		return fmt.Errorf("stop instances of %q: %w", cr.name, err)
	}
	if cr.o.Settle > 0 {
		select {
		case <-time.After(cr.o.Settle):
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	if !cr.o.WithCache {
		return cr.o.DropCaches()
	}
	return nil
}

func (cr *cellRunner) invoke(ctx context.Context, phase string, index int, stopFirst bool, exp expect, payload, wantStart string) (*Invocation, error) {
	defer cr.step()
	if stopFirst {
		if err := cr.scaleToZero(ctx); err != nil {
			return nil, err
		}
	}
	ictx, cancel := context.WithTimeout(ctx, cr.o.InvokeTimeout)
	defer cancel()
	t0 := time.Now()
	req := &vhivepb.InvokeRequest{Payload: []byte(payload)}
	if cr.o.Request != nil {
		req = proto.Clone(cr.o.Request).(*vhivepb.InvokeRequest)
	}
	req.Function, req.TimeoutMs = cr.name, cr.o.InvokeTimeout.Milliseconds()
	resp, err := cr.c.Invoke(ictx, req)
	client := time.Since(t0)
	if err != nil {
		return nil, fmt.Errorf("%s invocation %d of %q: %w", phase, index, cr.name, err)
	}
	inv := &Invocation{
		Cell:         cr.cell,
		Phase:        phase,
		Index:        index,
		Time:         t0.UTC(),
		StartMode:    resp.GetStartMode(),
		ColdStart:    resp.GetColdStart(),
		InstanceID:   resp.GetInstanceId(),
		ClientMicros: client.Microseconds(),
		Stages:       Sample{},
		MemoryStats:  resp.GetMemoryStats(),
	}
	for _, s := range resp.GetStages() {
		if s.GetName() == "Total" {
			// The daemon's own end-to-end figure: kept apart, since
			// Total in vHive's CSVs is the sum of the stages.
			inv.DaemonTotalMicros = s.GetMicros()
			continue
		}
		inv.Stages[s.GetName()] += float64(s.GetMicros())
	}
	if len(inv.Stages) == 0 {
		// The daemon reported no breakdown: keep the client-side time,
		// named as such.
		inv.Stages["ClientLatency"] = float64(inv.ClientMicros)
	}
	if exp == expectCold && !inv.ColdStart {
		return inv, fmt.Errorf("%s invocation %d of %q: expected a cold start after StopInstances, the daemon reports a warm one", phase, index, cr.name)
	}
	if exp == expectWarm && inv.ColdStart {
		return inv, fmt.Errorf("warm invocation %d of %q was a cold start (instance %q): did the instance stop?", index, cr.name, inv.InstanceID)
	}
	if wantStart != "" && inv.StartMode != wantStart {
		return inv, fmt.Errorf("%s invocation %d of %q: the daemon started the instance as %q, want %q (not measured as something else)", phase, index, cr.name, inv.StartMode, wantStart)
	}
	return inv, nil
}

func (cr *cellRunner) footprint(ctx context.Context, phase, instance string) {
	resp, err := cr.c.ListInstances(ctx, &vhivepb.ListInstancesRequest{Function: cr.name, Stats: true})
	if err != nil {
		cr.log.Warn("list instances for memory footprint", "err", err)
		return
	}
	for _, in := range resp.GetInstances() {
		if instance != "" && in.GetId() != instance {
			continue
		}
		cr.r.Footprints = append(cr.r.Footprints, Footprint{
			Cell: cr.cell, Phase: phase, Instance: in.GetId(), RSS: in.GetRssBytes(), PSS: in.GetPssBytes(),
		})
	}
}

func (cr *cellRunner) snapshots(ctx context.Context) ([]*vhivepb.SnapshotInfo, error) {
	resp, err := cr.c.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: cr.name})
	if err != nil {
		return nil, fmt.Errorf("list snapshots of %q: %w", cr.name, err)
	}
	return resp.GetSnapshots(), nil
}

// waitSnapshot waits until the daemon lists a snapshot of the function
// (with a working set if ws). A daemon may snapshot right after the boot or
// when the instance is stopped, so the bench first waits briefly with the
// instance running and then stops it.
func (cr *cellRunner) waitSnapshot(ctx context.Context, ws bool) error {
	has := func(ctx context.Context) (bool, error) {
		snaps, err := cr.snapshots(ctx)
		if err != nil {
			return false, err
		}
		for _, s := range snaps {
			if !ws || s.GetWorkingSet() {
				return true, nil
			}
		}
		return false, nil
	}
	what := "snapshot"
	if ws {
		what = "REAP working set"
	}
	// Generous: stopping the instance while the daemon is still taking
	// its snapshot could abort it.
	first := min(30*time.Second, cr.o.SnapshotTimeout)
	err := waitFor(ctx, first, has)
	if err == nil {
		return nil
	}
	if !errors.Is(err, errTimeout) {
		return err
	}
	if _, err := cr.c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: cr.name}); err != nil {
		return fmt.Errorf("stop instances of %q: %w", cr.name, err)
	}
	if err := waitFor(ctx, cr.o.SnapshotTimeout, has); err != nil {
		return fmt.Errorf("wait for the %s of %q: %w", what, cr.name, err)
	}
	return nil
}

func (cr *cellRunner) run(ctx context.Context) error {
	mode := cr.cell.Mode
	// Prepare: boot once. For snapshot modes this creates the snapshot.
	prep, err := cr.invoke(ctx, PhasePrepare, 0, true, expectCold, payloadRecord, StartedBoot)
	if prep != nil {
		cr.r.Prepare = append(cr.r.Prepare, *prep)
	}
	if err != nil {
		return err
	}
	want := ""
	switch mode {
	case ModeBoot:
		want = StartedBoot
	case ModeSnapshot:
		want = StartedSnapshot
	case ModeLazy:
		want = StartedLazy
	case ModeREAP:
		want = StartedREAPPrefetch
	}
	if mode == ModeSnapshot || mode == ModeLazy || mode == ModeREAP {
		if err := cr.waitSnapshot(ctx, false); err != nil {
			return err
		}
	}
	if mode == ModeREAP {
		rec, err := cr.invoke(ctx, PhaseRecord, 0, true, expectCold, payloadRecord, StartedREAPRecord)
		cr.r.Record = rec
		if err != nil {
			return err
		}
		if _, err := cr.c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: cr.name}); err != nil {
			return fmt.Errorf("stop the record instance of %q: %w", cr.name, err)
		}
		if err := cr.waitSnapshot(ctx, true); err != nil {
			return err
		}
	}
	cold := mode != ModeWarm
	exp := expectCold
	if !cold {
		exp = expectWarm
	}
	for i := range cr.o.Iterations {
		inv, err := cr.invoke(ctx, PhaseMeasure, i, cold, exp, cr.o.Payload, want)
		if err != nil {
			return err
		}
		cr.r.Iterations = append(cr.r.Iterations, *inv)
		if i == 0 && cold {
			phase := AfterRestore
			if mode == ModeBoot {
				phase = AfterBoot
			}
			cr.footprint(ctx, phase, inv.InstanceID)
		}
	}
	if !cold {
		cr.footprint(ctx, Warm, "")
	}
	return nil
}
