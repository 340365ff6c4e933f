package bench

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"text/tabwriter"
	"time"

	"vhive.dev/vhive/internal/bench/stats"
)

// Output file names under the --out directory.
const (
	IterationsFile = "coldstart-iterations.csv"
	MemoryFile     = "memory.csv"
	StatusFile     = "cells.csv"
	ResultsFile    = "results.json"
)

// RunInfoFile is where a bench command (coldstart, concurrency) records the
// machine, versions and flags of its run: run-<command>.json.
func RunInfoFile(command string) string { return "run-" + command + ".json" }

// MeanStdFile is the vHive PrintMeanStd CSV of one sandbox and mode; rows
// are appended run after run.
func MeanStdFile(sandbox, mode string) string {
	return "coldstart-" + sandbox + "-" + mode + ".csv"
}

// PageStatsFile is the page statistics CSV of one sandbox's REAP runs.
func PageStatsFile(sandbox string) string { return "pages-" + sandbox + ".csv" }

// Cells status values in cells.csv.
const (
	StatusOK          = "ok"
	StatusUnsupported = "unsupported"
	StatusFailed      = "failed"
)

// Status is how a cell ended: ok, unsupported or failed.
func (r *CellResult) Status() string {
	switch {
	case r.Unsupported != "":
		return StatusUnsupported
	case r.OK():
		return StatusOK
	}
	return StatusFailed
}

// WriteFiles writes every CSV and results.json of r into dir (created if
// needed) and returns the paths written. Mean/std and page statistics CSVs
// are appended to (vHive's behaviour); the others are replaced.
func (r *ColdstartResult) WriteFiles(dir string) ([]string, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("create output directory %q: %w", dir, err)
	}
	var written []string
	add := func(name string) string {
		p := filepath.Join(dir, name)
		if !slices.Contains(written, p) {
			written = append(written, p)
		}
		return p
	}
	var status [][]string
	for i := range r.Cells {
		c := &r.Cells[i]
		reason := c.Unsupported
		if reason == "" {
			reason = c.Err
		}
		status = append(status, []string{c.Function, c.Sandbox, c.Mode, c.Status(), reason})
		if !c.OK() {
			continue
		}
		if err := WriteMeanStd(add(MeanStdFile(c.Sandbox, c.Mode)), c.Function, c.Samples()); err != nil {
			return written, err
		}
		if c.Record != nil {
			if err := WriteMeanStd(add(MeanStdFile(c.Sandbox, StartedREAPRecord)), c.Function, []Sample{c.Record.Stages}); err != nil {
				return written, err
			}
			var unique []float64
			for _, it := range c.Iterations {
				unique = append(unique, float64(it.MemoryStats["Unique"]))
			}
			recPages, recRegions := recordedWS(c)
			if err := WritePageStats(add(PageStatsFile(c.Sandbox)), c.Function, recPages, recRegions, unique); err != nil {
				return written, err
			}
		}
	}
	if err := WriteCSV(add(StatusFile), []string{"FuncName", "Sandbox", "Mode", "Status", "Reason"}, status); err != nil {
		return written, err
	}
	h, rows := r.iterationRows()
	if err := WriteCSV(add(IterationsFile), h, rows); err != nil {
		return written, err
	}
	var mem [][]string
	for _, c := range r.Cells {
		for _, f := range c.Footprints {
			mem = append(mem, []string{f.Function, f.Sandbox, f.Mode, f.Phase, f.Instance, strconv.FormatInt(f.RSS, 10), strconv.FormatInt(f.PSS, 10)})
		}
	}
	if err := WriteCSV(add(MemoryFile), []string{"FuncName", "Sandbox", "Mode", "Phase", "Instance", "RSSBytes", "PSSBytes"}, mem); err != nil {
		return written, err
	}
	if err := WriteJSON(add(ResultsFile), r); err != nil {
		return written, err
	}
	return written, nil
}

// allInvocations lists every invocation of every cell in order.
func (r *ColdstartResult) allInvocations() []Invocation {
	var all []Invocation
	for _, c := range r.Cells {
		all = append(all, c.Prepare...)
		if c.Record != nil {
			all = append(all, *c.Record)
		}
		all = append(all, c.Iterations...)
	}
	return all
}

// iterationRows is the long table: one row per invocation, with a column
// per stage and per memory statistic seen anywhere in the run (empty when
// an invocation lacks it).
func (r *ColdstartResult) iterationRows() ([]string, [][]string) {
	all := r.allInvocations()
	var stages, mems []string
	for _, inv := range all {
		for k := range inv.Stages {
			if !slices.Contains(stages, k) {
				stages = append(stages, k)
			}
		}
		for k := range inv.MemoryStats {
			if !slices.Contains(mems, k) {
				mems = append(mems, k)
			}
		}
	}
	slices.Sort(stages)
	slices.Sort(mems)
	h := []string{"Time", "FuncName", "Sandbox", "Mode", "Phase", "Iteration", "StartMode", "ColdStart", "InstanceID", "ClientMicros", "DaemonTotal", "Total"}
	h = append(h, stages...)
	for _, m := range mems {
		h = append(h, "mem."+m)
	}
	rows := make([][]string, 0, len(all))
	for _, inv := range all {
		row := []string{
			inv.Time.Format(time.RFC3339Nano), inv.Function, inv.Sandbox, inv.Mode, inv.Phase,
			strconv.Itoa(inv.Index), inv.StartMode, strconv.FormatBool(inv.ColdStart), inv.InstanceID,
			strconv.FormatInt(inv.ClientMicros, 10), strconv.FormatInt(inv.DaemonTotalMicros, 10), strconv.FormatInt(int64(inv.Stages.Total()), 10),
		}
		for _, s := range stages {
			v, ok := inv.Stages[s]
			if ok {
				row = append(row, strconv.FormatInt(int64(v), 10))
			} else {
				row = append(row, "")
			}
		}
		for _, m := range mems {
			v, ok := inv.MemoryStats[m]
			if ok {
				row = append(row, strconv.FormatInt(v, 10))
			} else {
				row = append(row, "")
			}
		}
		rows = append(rows, row)
	}
	return h, rows
}

func ms(us float64) string { return strconv.FormatFloat(us/1000, 'f', 1, 64) }

// meanStd formats µs values as "mean ± std" in milliseconds.
func meanStd(xs []float64) string {
	return ms(stats.Mean(xs)) + " ± " + ms(stats.StdDev(xs))
}

// WriteTable prints one line per cell: total and per-stage mean ± std in
// milliseconds, or why the cell has no figures.
func (r *ColdstartResult) WriteTable(w io.Writer) error {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "FUNCTION\tSANDBOX\tMODE\tN\tTOTAL ms\tCLIENT ms\tSTAGES ms (mean ± std)")
	for _, c := range r.Cells {
		line := func(mode string, invs []Invocation) {
			samples := make([]Sample, len(invs))
			var totals, client []float64
			for i, inv := range invs {
				samples[i] = inv.Stages
				totals = append(totals, inv.Stages.Total())
				client = append(client, float64(inv.ClientMicros))
			}
			var parts []string
			for _, k := range stageUnion(samples) {
				xs := make([]float64, len(samples))
				for i, s := range samples {
					xs[i] = s[k]
				}
				parts = append(parts, k+" "+meanStd(xs))
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\n", c.Function, c.Sandbox, mode, len(invs), meanStd(totals), meanStd(client), strings.Join(parts, ", "))
		}
		switch c.Status() {
		case StatusUnsupported:
			fmt.Fprintf(tw, "%s\t%s\t%s\t-\tunsupported\t\t%s\n", c.Function, c.Sandbox, c.Mode, oneLine(c.Unsupported))
			continue
		case StatusFailed:
			fmt.Fprintf(tw, "%s\t%s\t%s\t%d\tFAILED\t\t%s\n", c.Function, c.Sandbox, c.Mode, len(c.Iterations), oneLine(c.Err))
			continue
		}
		if c.Record != nil {
			line(StartedREAPRecord, []Invocation{*c.Record})
		}
		line(c.Mode, c.Iterations)
	}
	return tw.Flush()
}

func oneLine(s string) string {
	s = strings.ReplaceAll(s, "\n", " ")
	if len(s) > 160 {
		s = s[:157] + "..."
	}
	return s
}

func dirJoin(dir, name string) string { return filepath.Join(dir, name) }

func createDir(dir string) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("create output directory %q: %w", dir, err)
	}
	return nil
}

func newTab(w io.Writer) *tabwriter.Writer { return tabwriter.NewWriter(w, 0, 4, 2, ' ', 0) }

func fprintf(w io.Writer, format string, args ...any) { fmt.Fprintf(w, format, args...) }

// recordedWS is the size of the recorded working set in pages and regions:
// as the prefetch runs report it (the WS they installed), else as the
// record run did.
func recordedWS(c *CellResult) (pages, regions int64) {
	for _, it := range c.Iterations {
		if it.MemoryStats["RecPages"] > 0 {
			return it.MemoryStats["RecPages"], it.MemoryStats["RecRegions"]
		}
	}
	if c.Record != nil {
		return c.Record.MemoryStats["RecPages"], c.Record.MemoryStats["RecRegions"]
	}
	return 0, 0
}
