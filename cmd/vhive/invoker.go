package main

import (
	"errors"
	"flag"
	"fmt"
	"log/slog"
	"time"

	"github.com/spf13/cobra"

	"vhive.dev/vhive/internal/invoker"
)

// vSwarm's tools take single-dash Go flags (-rps 10), which cobra's pflag
// cannot parse, so invoker and deployer parse their arguments with the
// standard flag package (which accepts -flag and --flag alike).

const invokerLong = `Open-loop load generator with vSwarm's invoker semantics and flags.

One request per tick at -rps, round-robin over the endpoints of
-endpointsFile, never waiting for replies; each request is
helloworld.Greeter/SayHello. With -addr every request goes to that address
(e.g. the vhive gateway 127.0.0.1:3334) with the endpoint hostname as its
:authority; otherwise to <hostname>:<port> as vSwarm does.

Writes the latencies of the measured, successful requests (µs, one per
line) to rps<real rps>_<latf> like vSwarm, and every request with its
timestamp, gRPC code and cold-start flag to -reqf.`

func newInvokerCmd(_ *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:                "invoker [-endpointsFile endpoints.json] [-rps 1] [-time 5] [-latf lat.csv] [-port 80 | -addr host:port]",
		Short:              "Open-loop invoker (vSwarm flags): fixed RPS, round-robin, latency file",
		Long:               invokerLong,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return runInvoker(cmd, args)
		},
	}
}

// newFlagSet is the flag set of a command that takes vSwarm's single-dash
// flags (DisableFlagParsing), printing to the command's stderr.
func newFlagSet(cmd *cobra.Command, name string) *flag.FlagSet {
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(cmd.ErrOrStderr())
	return fs
}

// parseFlags parses args with fs, whose -h prints long and the flags (help
// is then true); arguments that are not flags are an error.
func parseFlags(fs *flag.FlagSet, long string, args []string) (help bool, err error) {
	fs.Usage = func() {
		fmt.Fprintf(fs.Output(), "%s\n\nUsage: %s [flags]\n\n", long, fs.Name())
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return true, nil
		}
		return false, err
	}
	if fs.NArg() > 0 {
		return false, fmt.Errorf("unexpected arguments %q (flags only)", fs.Args())
	}
	return false, nil
}

func runInvoker(cmd *cobra.Command, args []string) error {
	fs := newFlagSet(cmd, "vhive invoker")
	endpointsFile := fs.String("endpointsFile", "endpoints.json", "file with the endpoints' metadata (vSwarm format)")
	rps := fs.Float64("rps", 1.0, "target requests per second")
	runTime := fs.Float64("time", 5, "run the experiment for this many seconds")
	latf := fs.String("latf", "lat.csv", "latency file (µs per line), written as rps<real rps>_<latf>")
	port := fs.Int("port", 80, "port the functions listen on (when -addr is not set)")
	addr := fs.String("addr", "", "dial this host:port for every endpoint, sending the hostname as :authority (e.g. the vhive gateway 127.0.0.1:3334)")
	connPerRequest := fs.Bool("connPerRequest", false, "dial a new connection for every request (as vSwarm's invoker), so a Kubernetes Service balances them over its pods")
	grpcTimeout := fs.Int("grpcTimeout", 30, "timeout in seconds for each gRPC request")
	warmup := fs.Float64("warmup", 0, "seconds of load before the measured phase, excluded from the figures")
	reqf := fs.String("reqf", "requests.csv", "per-request CSV (timestamp, latency, code, cold start); \"\" to skip")
	payload := fs.String("payload", invoker.DefaultPayload, "HelloRequest name sent to the functions")
	method := fs.String("method", "", "gRPC method to call instead of SayHello, pkg.Service/Method")
	data := fs.String("data", "", "with -method: the request in protobuf JSON (types from -protoset or the first endpoint's server reflection); for -http: the body")
	dataFile := fs.String("data-file", "", "the request's bytes as they are: the serialized message (-method) or the HTTP body")
	protoset := fs.String("protoset", "", "with -method and -data: a FileDescriptorSet instead of server reflection")
	useHTTP := fs.Bool("http", false, "send HTTP requests (to HTTP functions) instead of gRPC")
	httpMethod := fs.String("http-method", "", "with -http: request method (default GET, or POST with a body)")
	path := fs.String("path", "/", "with -http: path and query")
	var headers []string
	fs.Func("H", "with -http: request header 'Name: value' (repeatable)", func(v string) error { headers = append(headers, v); return nil })
	debug := fs.Bool("dbg", false, "debug logging")
	noProgress := fs.Bool("no-progress", false, "no progress bar on stderr")
	if help, err := parseFlags(fs, invokerLong, args); help || err != nil {
		return err
	}
	level := slog.LevelInfo
	if *debug {
		level = slog.LevelDebug
	}
	log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), &slog.HandlerOptions{Level: level}))
	eps, err := invoker.ReadEndpoints(*endpointsFile)
	if err != nil {
		return err
	}
	cfg := invoker.Config{
		Endpoints:      eps,
		RPS:            *rps,
		Duration:       time.Duration(*runTime * float64(time.Second)),
		Warmup:         time.Duration(*warmup * float64(time.Second)),
		Port:           *port,
		Addr:           *addr,
		ConnPerRequest: *connPerRequest,
		Timeout:        time.Duration(*grpcTimeout) * time.Second,
		Payload:        *payload,
		Logger:         log,
	}
	if err := invokerRequest(cmd.Context(), &cfg, invokerRequestFlags{method: *method, data: *data, dataFile: *dataFile, protoset: *protoset,
		http: *useHTTP, httpMethod: *httpMethod, path: *path, headers: headers}); err != nil {
		return err
	}
	total := int(*rps*(*runTime+*warmup)) + 1
	bar := newProgress(total, *noProgress, "invoking")
	cfg.OnIssue = func() { _ = bar.Add(1) }
	log.Info("invoking", "endpoints", len(eps), "rps", *rps, "time_s", *runTime, "warmup_s", *warmup)
	res, runErr := invoker.Run(cmd.Context(), cfg)
	_ = bar.Finish()
	if res == nil {
		return runErr
	}
	sum := res.Summarize()
	if err := sum.WriteReport(cmd.OutOrStdout()); err != nil {
		return err
	}
	if len(res.Endpoints()) > 1 {
		if err := res.WriteEndpointTable(cmd.OutOrStdout()); err != nil {
			return err
		}
	}
	name := invoker.LatencyFileName(*latf, sum.RealRPS)
	if err := res.WriteLatencyFile(name); err != nil {
		return err
	}
	log.Info("the measured latencies are saved", "file", name)
	if *reqf != "" {
		if err := res.WriteRecordsCSV(*reqf); err != nil {
			return err
		}
		log.Info("per-request records are saved", "file", *reqf)
	}
	if runErr != nil {
		return fmt.Errorf("invoker interrupted (partial results written): %w", runErr)
	}
	return nil
}
