package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"github.com/spf13/pflag"
	"golang.org/x/term"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/bench"
)

// benchCommon are the flags both bench sub-commands share.
type benchCommon struct {
	sandboxes  []string
	modes      []string
	opts       bench.Common
	out        string
	runsc      string
	runc       string
	noProgress bool
	noPlots    bool
	request    requestOpts
}

func (b *benchCommon) register(fs *pflag.FlagSet, defModes []string) {
	defRunsc := os.Getenv("VHIVE_RUNSC")
	if defRunsc == "" {
		if p := "/var/cache/vhive/bin/runsc"; fileExists(p) {
			defRunsc = p
		}
	}
	defRunc, _ := exec.LookPath("runc")
	fs.StringSliceVar(&b.modes, "modes", defModes, "start modes: boot, snapshot, lazy, reap, warm")
	fs.BoolVar(&b.opts.WithCache, "with-cache", false, "keep the page cache (default: drop it before every cold start; needs root)")
	fs.StringVar(&b.out, "out", "bench-results", "directory for CSV, plots and run-<command>.json (mean/std CSVs are appended)")
	fs.StringVar(&b.opts.ImagesDir, "images", "out/images", "directory of function images to import when the daemon lacks them")
	fs.StringVar(&b.opts.Payload, "payload", "replay", `payload of the measured invocations (boot, snapshot and REAP record runs send "record")`)
	fs.StringVar(&b.runsc, "runsc", defRunsc, "runsc binary whose version is recorded in run-<command>.json (\"\" to skip)")
	fs.StringVar(&b.runc, "runc", defRunc, "runc binary whose version is recorded in run-<command>.json (\"\" to skip)")
	fs.DurationVar(&b.opts.InvokeTimeout, "invoke-timeout", 5*time.Minute, "bound on each invocation")
	fs.DurationVar(&b.opts.SnapshotTimeout, "snapshot-timeout", 5*time.Minute, "bound on waiting for a snapshot or REAP working set")
	fs.BoolVar(&b.opts.KeepFunctions, "keep", false, "leave the bench's functions deployed")
	fs.DurationVar(&b.opts.Settle, "settle", 0, "pause after stopping the instances before each cold start or burst (e.g. 5s: lets the daemon refill its ready-worker pools and finish tearing instances down, as between requests on a real node)")
	fs.BoolVar(&b.noProgress, "no-progress", false, "no progress bar on stderr")
	fs.BoolVar(&b.noPlots, "no-plots", false, "do not draw PNG/SVG plots")
	b.request.addFlags(fs)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}

func flagMap(fs *pflag.FlagSet) map[string]string {
	m := map[string]string{}
	fs.VisitAll(func(f *pflag.Flag) { m[f.Name] = f.Value.String() })
	return m
}

// newProgress is a progress bar on stderr, hidden when asked or when
// stderr is not a terminal (logs and CI output stay readable).
func newProgress(total int, hide bool, what string) *progressbar.ProgressBar {
	hide = hide || !term.IsTerminal(int(os.Stderr.Fd()))
	return progressbar.NewOptions(total,
		progressbar.OptionSetWriter(os.Stderr),
		progressbar.OptionSetDescription(what),
		progressbar.OptionShowCount(),
		progressbar.OptionSetElapsedTime(true),
		progressbar.OptionSetPredictTime(true),
		progressbar.OptionSetVisibility(!hide),
		progressbar.OptionOnCompletion(func() { fmt.Fprintln(os.Stderr) }),
		progressbar.OptionSetWidth(30),
	)
}

func newBenchCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "bench",
		Short: "Measure cold starts the way the vHive/REAP papers do",
		Long: `Measure cold starts the way vHive does on one node: scale the function to zero,
drop the page cache, invoke, and record the daemon's stage timings.

Results go to --out as vHive-format CSVs, a per-iteration CSV, memory
footprints, PNG/SVG plots and run-<command>.json (machine, versions, flags).`,
	}
	cmd.AddCommand(newBenchColdstartCmd(g), newBenchConcurrencyCmd(g))
	return cmd
}

func newBenchColdstartCmd(g *globalOpts) *cobra.Command {
	var (
		c          benchCommon
		functions  []string
		suite      string
		iterations int
	)
	cmd := &cobra.Command{
		Use:   "coldstart",
		Short: "Cold-start latency per function × sandbox × start mode",
		Example: `  vhive bench coldstart --functions helloworld --sandbox gvisor,wasm --modes boot,snapshot,reap,warm
  vhive bench coldstart --functions helloworld,aes --sandbox runc --modes boot --iterations 3 --with-cache
  vhive bench coldstart --suite ci --sandbox gvisor,runc,wasm --modes boot,snapshot,lazy,reap,warm`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts := bench.ColdstartOptions{Functions: functions, Sandboxes: c.sandboxes, Modes: c.modes, Iterations: iterations}
			if suite != "" {
				if cmd.Flags().Changed("functions") {
					return errors.New("give --functions or --suite, not both")
				}
				fns, ok := bench.SuiteFunctions(suite)
				if !ok {
					return fmt.Errorf("--suite %q: want ci or full", suite)
				}
				opts.Functions, opts.Skip = fns, bench.SuiteSkip
			}
			return runBench(cmd, g, c, "coldstart", bench.ColdstartSteps(opts),
				func(ctx context.Context, client vhivepb.ControlClient, common bench.Common) (*bench.ColdstartResult, error) {
					opts.Common = common
					return bench.RunColdstart(ctx, client, opts)
				})
		},
	}
	fs := cmd.Flags()
	fs.StringSliceVar(&functions, "functions", []string{"helloworld"}, "functions to measure (images localhost/vhive/<fn>:latest, <fn>-wasm for wasm)")
	fs.StringVar(&suite, "suite", "", "measure the function suite instead of --functions: ci (make images) or full (make images-full): the Python functions py-<fn> on gvisor/runc/microvm, their Go twins everywhere (docs/functions.md)")
	fs.StringSliceVar(&c.sandboxes, "sandbox", []string{"gvisor"}, "sandboxes: gvisor, runc, wasm, microvm")
	fs.IntVar(&iterations, "iterations", 10, "measured cold starts per cell")
	c.register(fs, []string{"boot", "snapshot", "reap", "warm"})
	return cmd
}

func newBenchConcurrencyCmd(g *globalOpts) *cobra.Command {
	var (
		c        benchCommon
		function string
		sandbox  string
		levels   []int
		repeats  int
	)
	cmd := &cobra.Command{
		Use:     "concurrency",
		Short:   "Latency of N simultaneous cold starts, for each N in --levels",
		Example: `  vhive bench concurrency --function helloworld --sandbox gvisor --modes snapshot,reap --levels 1,2,4,8`,
		Args:    cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			opts := bench.ConcurrencyOptions{Function: function, Sandbox: sandbox, Modes: c.modes, Levels: levels, Repeats: repeats}
			return runBench(cmd, g, c, "concurrency", bench.ConcurrencySteps(opts),
				func(ctx context.Context, client vhivepb.ControlClient, common bench.Common) (*bench.ConcurrencyResult, error) {
					opts.Common = common
					return bench.RunConcurrency(ctx, client, opts)
				})
		},
	}
	fs := cmd.Flags()
	fs.StringVar(&function, "function", "helloworld", "function to measure")
	fs.StringVar(&sandbox, "sandbox", "gvisor", "sandbox: gvisor, runc, wasm, microvm")
	fs.IntSliceVar(&levels, "levels", []int{1, 2, 4, 8, 16, 32, 64}, "numbers of simultaneous cold starts")
	fs.IntVar(&repeats, "repeats", 1, "measurements per level")
	c.register(fs, []string{"boot", "snapshot", "reap"})
	return cmd
}

// benchResult is what a bench measured.
type benchResult interface {
	WriteTable(io.Writer) error
	WriteFiles(dir string) ([]string, error)
}

// measured is the result type of a bench run: a pointer, nil when the run
// measured nothing.
type measured interface {
	comparable
	benchResult
}

// runBench runs one bench of command with steps invocations: it records the
// run (run-<command>.json), dials the daemon, calls run with the common
// options (a progress bar, warnings logged on stderr), then — also after a
// partial run — prints the result's table, writes its files (and plots
// when it draws them apart, unless --no-plots) and lists the files written
// on stderr.
func runBench[R measured](cmd *cobra.Command, g *globalOpts, c benchCommon, command string, steps int,
	run func(context.Context, vhivepb.ControlClient, bench.Common) (R, error)) error {
	ctx := cmd.Context()
	ri, err := bench.NewRunInfo(ctx, "vhive "+strings.Join(os.Args[1:], " "), flagMap(cmd.Flags()), c.runsc, c.runc)
	if err != nil {
		return err
	}
	conn, client, err := g.dial(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	bar := newProgress(steps, c.noProgress, command)
	common := c.opts
	if r := c.request; r.method != "" || r.data != "" || r.dataFile != "" || r.httpMethod != "" || r.path != "" || len(r.headers) > 0 {
		req, _, err := r.request("", false)
		if err != nil {
			return err
		}
		common.Request = req
	}
	common.Progress = bar
	common.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn}))
	res, runErr := run(ctx, client, common)
	_ = bar.Finish()
	var none R
	if res == none {
		return runErr
	}
	files, err := writeResult(cmd.OutOrStdout(), res, c.out, !c.noPlots)
	ri.Finished = time.Now().UTC()
	if err == nil {
		p := filepath.Join(c.out, bench.RunInfoFile(command))
		if err = bench.WriteJSON(p, ri); err == nil {
			files = append(files, p)
		}
	}
	if len(files) > 0 {
		fmt.Fprintln(os.Stderr, "wrote: "+strings.Join(files, " "))
	}
	if runErr != nil {
		return fmt.Errorf("bench stopped early (partial results written): %w", runErr)
	}
	return err
}

// writeResult prints res's table on w and writes its files into dir, and
// its plots if it draws them apart and plots is set.
func writeResult(w io.Writer, res benchResult, dir string, plots bool) ([]string, error) {
	if err := res.WriteTable(w); err != nil {
		return nil, err
	}
	files, err := res.WriteFiles(dir)
	p, ok := res.(interface {
		WritePlots(string) ([]string, error)
	})
	if err != nil || !ok || !plots {
		return files, err
	}
	more, err := p.WritePlots(dir)
	return append(files, more...), err
}
