package bench

import (
	"context"
	"fmt"
	"io"
	"slices"
	"strconv"
	"sync"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/bench/stats"
)

// ConcurrencyOptions configures RunConcurrency.
type ConcurrencyOptions struct {
	Function string
	Sandbox  string
	Modes    []string // boot, snapshot, lazy, reap
	Levels   []int    // numbers of simultaneous cold starts
	// Repeats is how many times each level is measured (default 1).
	Repeats int
	Common
}

func (o *ConcurrencyOptions) setDefaults() error {
	co := ColdstartOptions{Functions: []string{o.Function}, Sandboxes: []string{o.Sandbox}, Modes: o.Modes, Iterations: 1, Common: o.Common}
	if o.Function == "" {
		return fmt.Errorf("no --function given")
	}
	if err := co.setDefaults(); err != nil {
		return err
	}
	if slices.Contains(o.Modes, ModeWarm) {
		return fmt.Errorf("mode %q makes no sense for concurrent cold starts (use boot, snapshot, lazy or reap)", ModeWarm)
	}
	if len(o.Levels) == 0 {
		return fmt.Errorf("no concurrency levels given")
	}
	for _, l := range o.Levels {
		if l < 1 {
			return fmt.Errorf("concurrency level %d: want at least 1", l)
		}
	}
	if o.Repeats == 0 {
		o.Repeats = 1
	}
	if o.Repeats < 0 {
		return fmt.Errorf("repeats %d: want at least 1", o.Repeats)
	}
	o.Common = co.Common
	return nil
}

// ConcurrencySteps is the number of invocations RunConcurrency makes at
// most: a progress bar's total.
func ConcurrencySteps(o ConcurrencyOptions) int {
	rep := max(o.Repeats, 1)
	n := 0
	for _, m := range o.Modes {
		n++ // prepare
		if m == ModeREAP {
			n++
		}
		for _, l := range o.Levels {
			n += l * rep
		}
	}
	return n
}

// LevelResult is what one concurrency level measured.
type LevelResult struct {
	Mode        string       `json:"mode"`
	Level       int          `json:"level"`
	Invocations []Invocation `json:"invocations"`
	// Errors are failed invocations and invocations that were not a cold
	// start in the asked mode; they are excluded from the figures.
	Errors []string `json:"errors,omitempty"`
}

// measured are the invocations that count: cold starts in the asked mode.
func (l *LevelResult) measured() []Invocation {
	var out []Invocation
	for _, inv := range l.Invocations {
		if inv.Phase == PhaseMeasure {
			out = append(out, inv)
		}
	}
	return out
}

// Latencies returns the client-side latencies (µs) of the measured cold
// starts and the daemon's total stage times.
func (l *LevelResult) Latencies() (client, daemon []float64) {
	for _, inv := range l.measured() {
		client = append(client, float64(inv.ClientMicros))
		daemon = append(daemon, inv.Stages.Total())
	}
	return client, daemon
}

// ConcurrencyMode is the outcome of one start mode.
type ConcurrencyMode struct {
	Mode        string        `json:"mode"`
	Unsupported string        `json:"unsupported,omitempty"`
	Err         string        `json:"error,omitempty"`
	Levels      []LevelResult `json:"levels"`
}

// ConcurrencyResult is the outcome of RunConcurrency.
type ConcurrencyResult struct {
	Function string            `json:"function"`
	Sandbox  string            `json:"sandbox"`
	Repeats  int               `json:"repeats"`
	Modes    []ConcurrencyMode `json:"modes"`
}

// RunConcurrency measures N simultaneous cold starts of one function for
// each level N: the function is deployed once per mode with max_instances
// set to the highest level, prepared like RunColdstart does (boot and
// snapshot, REAP record), then for each level all instances are stopped,
// the page cache is dropped, and N invocations are released at once.
// Only cold starts in the asked mode count; the others are reported as
// errors of that level.
func RunConcurrency(ctx context.Context, c Control, opts ConcurrencyOptions) (*ConcurrencyResult, error) {
	if err := opts.setDefaults(); err != nil {
		return nil, err
	}
	if err := opts.checkDropCaches(); err != nil {
		return nil, err
	}
	if err := EnsureImage(ctx, c, ImageRef(opts.Function, opts.Sandbox), imageName(opts.Function, opts.Sandbox), opts.ImagesDir); err != nil {
		return nil, err
	}
	res := &ConcurrencyResult{Function: opts.Function, Sandbox: opts.Sandbox, Repeats: opts.Repeats}
	maxLevel := slices.Max(opts.Levels)
	for _, mode := range opts.Modes {
		cm := runConcurrencyMode(ctx, c, &opts, mode, maxLevel)
		res.Modes = append(res.Modes, cm)
		if ctx.Err() != nil {
			return res, ctx.Err()
		}
	}
	return res, nil
}

func runConcurrencyMode(ctx context.Context, c Control, o *ConcurrencyOptions, mode string, maxLevel int) ConcurrencyMode {
	cm := ConcurrencyMode{Mode: mode}
	cell := Cell{Function: o.Function, Sandbox: o.Sandbox, Mode: mode}
	co := &ColdstartOptions{Iterations: 1, Common: o.Common}
	cr := &cellRunner{c: c, o: co, cell: cell, name: cell.DeployName() + "-conc", r: &CellResult{Cell: cell}, log: o.Logger.With("mode", mode)}
	if o.Progress != nil {
		o.Progress.Describe("concurrency " + cell.String())
	}
	skip := func() {
		if o.Progress != nil {
			one := *o
			one.Modes = []string{mode}
			_ = o.Progress.Add(ConcurrencySteps(one))
		}
	}
	spec := &vhivepb.FunctionSpec{
		Name: cr.name, Image: ImageRef(o.Function, o.Sandbox), Sandbox: o.Sandbox, StartMode: mode,
		MaxInstances: uint32(maxLevel), Concurrency: 1,
	}
	remove, err := cr.deploy(ctx, spec)
	if err != nil {
		if IsUnsupported(err) {
			cm.Unsupported = err.Error()
		} else {
			cm.Err = fmt.Sprintf("deploy %q: %v", cr.name, err)
		}
		skip()
		return cm
	}
	defer remove()
	if _, err := cr.invoke(ctx, PhasePrepare, 0, true, expectCold, payloadRecord, StartedBoot); err != nil {
		cm.Err = err.Error()
		return cm
	}
	want := mode
	if mode != ModeBoot {
		if err := cr.waitSnapshot(ctx, false); err != nil {
			cm.Err = err.Error()
			return cm
		}
	}
	if mode == ModeREAP {
		want = StartedREAPPrefetch
		if _, err := cr.invoke(ctx, PhaseRecord, 0, true, expectCold, payloadRecord, StartedREAPRecord); err != nil {
			cm.Err = err.Error()
			return cm
		}
		if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: cr.name}); err != nil {
			cm.Err = fmt.Sprintf("stop the record instance of %q: %v", cr.name, err)
			return cm
		}
		if err := cr.waitSnapshot(ctx, true); err != nil {
			cm.Err = err.Error()
			return cm
		}
	}
	for _, level := range o.Levels {
		for rep := range o.Repeats {
			lr, err := cr.burst(ctx, level, rep, want)
			cm.Levels = append(cm.Levels, lr)
			if err != nil {
				cm.Err = err.Error()
				return cm
			}
		}
	}
	return cm
}

// burst releases n cold invocations at once and collects them.
func (cr *cellRunner) burst(ctx context.Context, n, rep int, want string) (LevelResult, error) {
	lr := LevelResult{Mode: cr.cell.Mode, Level: n}
	if err := cr.scaleToZero(ctx); err != nil {
		return lr, err
	}
	type result struct {
		inv *Invocation
		err error
	}
	results := make([]result, n)
	start := make(chan struct{})
	var wg sync.WaitGroup
	for i := range n {
		wg.Go(func() {
			<-start
			inv, err := cr.invoke(ctx, PhaseMeasure, rep*n+i, false, expectAny, cr.o.Payload, "")
			results[i] = result{inv, err}
		})
	}
	close(start)
	wg.Wait()
	for i, r := range results {
		switch {
		case r.err != nil:
			lr.Errors = append(lr.Errors, r.err.Error())
		case !r.inv.ColdStart:
			r.inv.Phase = "warm"
			lr.Invocations = append(lr.Invocations, *r.inv)
			lr.Errors = append(lr.Errors, fmt.Sprintf("invocation %d of %d was served warm by instance %q", i, n, r.inv.InstanceID))
		case r.inv.StartMode != want:
			r.inv.Phase = "wrong-mode"
			lr.Invocations = append(lr.Invocations, *r.inv)
			lr.Errors = append(lr.Errors, fmt.Sprintf("invocation %d of %d started as %q, want %q", i, n, r.inv.StartMode, want))
		default:
			lr.Invocations = append(lr.Invocations, *r.inv)
		}
	}
	return lr, ctx.Err()
}

// ConcurrencyFile is the summary CSV of concurrency runs of one sandbox.
func ConcurrencyFile(sandbox string) string { return "concurrency-" + sandbox + ".csv" }

// concurrencyHeader is the header of ConcurrencyFile; latencies in µs.
func concurrencyHeader() []string {
	return []string{"FuncName", "Sandbox", "Mode", "Level", "Requests", "ColdStarts", "Errors",
		"Median", "P90", "Max", "Mean", "StdDev", "DaemonMedian"}
}

// Rows returns the summary rows: per mode and level (repeats pooled) the
// client-side latency median, p90, max, mean and std in µs.
func (r *ConcurrencyResult) Rows() ([]string, [][]string) {
	var rows [][]string
	for _, m := range r.Modes {
		for _, lv := range r.pooled(m) {
			client, daemon := lv.Latencies()
			s := stats.Summarize(client)
			d := stats.Summarize(daemon)
			i := func(f float64) string { return strconv.FormatInt(int64(f), 10) }
			rows = append(rows, []string{
				r.Function, r.Sandbox, m.Mode, strconv.Itoa(lv.Level),
				strconv.Itoa(lv.Level * r.Repeats), strconv.Itoa(s.N), strconv.Itoa(len(lv.Errors)),
				i(s.P50), i(s.P90), i(s.Max), i(s.Mean), fmt.Sprintf("%.1f", s.StdDev), i(d.P50),
			})
		}
	}
	return concurrencyHeader(), rows
}

// pooled merges the repeats of each level of a mode, keeping level order.
func (r *ConcurrencyResult) pooled(m ConcurrencyMode) []LevelResult {
	var out []LevelResult
	for _, lv := range m.Levels {
		k := slices.IndexFunc(out, func(o LevelResult) bool { return o.Level == lv.Level })
		if k < 0 {
			out = append(out, LevelResult{Mode: lv.Mode, Level: lv.Level})
			k = len(out) - 1
		}
		out[k].Invocations = append(out[k].Invocations, lv.Invocations...)
		out[k].Errors = append(out[k].Errors, lv.Errors...)
	}
	return out
}

// WriteFiles appends the summary rows to concurrency-<sandbox>.csv and
// writes concurrency-results.json and the plot concurrency-<sandbox>.png/.svg.
func (r *ConcurrencyResult) WriteFiles(dir string) ([]string, error) {
	if err := createDir(dir); err != nil {
		return nil, err
	}
	var written []string
	h, rows := r.Rows()
	p := dirJoin(dir, ConcurrencyFile(r.Sandbox))
	if len(rows) > 0 {
		if err := AppendCSV(p, h, rows...); err != nil {
			return nil, err
		}
		written = append(written, p)
	}
	j := dirJoin(dir, "concurrency-results.json")
	if err := WriteJSON(j, r); err != nil {
		return written, err
	}
	written = append(written, j)
	var series []Series
	for _, m := range r.Modes {
		var med, p90 Series
		med.Name, p90.Name = m.Mode+" median", m.Mode+" p90"
		for _, lv := range r.pooled(m) {
			client, _ := lv.Latencies()
			if len(client) == 0 {
				continue
			}
			s := stats.Summarize(client)
			med.X, med.Y = append(med.X, float64(lv.Level)), append(med.Y, s.P50/1000)
			p90.X, p90.Y = append(p90.X, float64(lv.Level)), append(p90.Y, s.P90/1000)
		}
		if len(med.X) > 0 {
			series = append(series, med, p90)
		}
	}
	if len(series) > 0 {
		files, err := PlotLines(dirJoin(dir, "concurrency-"+r.Sandbox), "concurrent cold starts: "+r.Function+" on "+r.Sandbox,
			"simultaneous cold starts", "latency (ms)", series, true)
		written = append(written, files...)
		if err != nil {
			return written, err
		}
	}
	return written, nil
}

// WriteTable prints the summary per mode and level in milliseconds.
func (r *ConcurrencyResult) WriteTable(w io.Writer) error {
	_, rows := r.Rows()
	tw := newTab(w)
	toMs := func(us string) string { v, _ := strconv.ParseFloat(us, 64); return ms(v) }
	fprintf(tw, "MODE\tN\tCOLD\tERRORS\tMEDIAN ms\tP90 ms\tMAX ms\n")
	for _, m := range r.Modes {
		if m.Unsupported != "" {
			fprintf(tw, "%s\t-\t\t\tunsupported: %s\n", m.Mode, oneLine(m.Unsupported))
		}
		if m.Err != "" {
			fprintf(tw, "%s\t-\t\t\tFAILED: %s\n", m.Mode, oneLine(m.Err))
		}
	}
	for _, row := range rows {
		fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", row[2], row[3], row[5], row[6], toMs(row[7]), toMs(row[8]), toMs(row[9]))
	}
	return tw.Flush()
}
