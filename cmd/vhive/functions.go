package main

import (
	"context"
	"fmt"
	"io"
	"net/http"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

func newDeployCmd(g *globalOpts) *cobra.Command {
	var (
		spec      vhivepb.FunctionSpec
		port      uint32
		env       []string
		keepalive time.Duration
		replace   bool
	)
	cmd := &cobra.Command{
		Use:   "deploy NAME --image REF",
		Short: "Deploy a function",
		Long: `Deploy a function packaged as an OCI image. The image is resolved (pulled if it is
not cached) at deploy time, so a bad reference fails here. Instances start on the
first invocation.

Start modes: boot (every cold start boots), snapshot (after the first
invocation the instance is snapshotted; later cold starts restore), lazy
(restore with memory served on demand), reap (record the working set on the
first restore, prefetch it on later ones). A mode the sandbox cannot do is
refused.

Protocols: grpc (any gRPC service; an instance is ready when it answers the
standard gRPC health service with SERVING, or, if it serves none, when its port
accepts connections) and http (an HTTP/1.1 server listening on $PORT, Knative's
contract; ready when its port accepts connections or, with --readiness-path,
when a GET of that path answers 2xx/3xx).`,
		Example: `  vhive deploy helloworld --image localhost/vhive/helloworld:latest
  vhive deploy aes --image localhost/vhive/aes:latest     # any gRPC service: invoke --method
  vhive deploy hello-http --image localhost/vhive/hello-http:latest --protocol http --port 8080 --readiness-path /healthz
  vhive deploy hello-runc --image localhost/vhive/helloworld:latest --sandbox runc
  vhive deploy hello-wasm --image localhost/vhive/helloworld-wasm:latest --sandbox wasm --start-mode reap`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			spec.Name = args[0]
			spec.Port = port
			spec.KeepaliveMs = keepalive.Milliseconds()
			spec.Env = map[string]string{}
			for _, kv := range env {
				k, v, ok := strings.Cut(kv, "=")
				if !ok || k == "" {
					return fmt.Errorf("--env %q: want KEY=VALUE", kv)
				}
				spec.Env[k] = v
			}
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				resp, err := c.Deploy(cmd.Context(), &vhivepb.DeployRequest{Spec: &spec, Replace: replace})
				if err != nil {
					return fmt.Errorf("deploy %q: %w", spec.Name, grpcErr(err))
				}
				fs := resp.GetFunction()
				fmt.Fprintf(cmd.OutOrStdout(), "deployed %s: image %s (%s), sandbox %s, start mode %s, %s on port %d\n",
					fs.GetSpec().GetName(), fs.GetSpec().GetImage(), shortDigest(fs.GetImageDigest()), fs.GetSpec().GetSandbox(), fs.GetSpec().GetStartMode(),
					fs.GetSpec().GetProtocol(), fs.GetSpec().GetPort())
				return nil
			})
		},
	}
	f := cmd.Flags()
	f.StringVar(&spec.Image, "image", "", "function image reference (required)")
	f.StringVar(&spec.Sandbox, "sandbox", "", "gvisor, runc, wasm or microvm (default: the daemon's default sandbox)")
	f.Uint32Var(&port, "port", 0, "port the function listens on, told in GUEST_PORT (and PORT for http) (default 50051 for grpc, 8080 for http)")
	f.StringVar(&spec.Protocol, "protocol", "", "grpc (any gRPC service, the default) or http (an HTTP server on $PORT)")
	f.StringVar(&spec.ReadinessPath, "readiness-path", "", "http: the path a GET of which answers 2xx/3xx once the function is ready (default: the port accepting connections)")
	f.StringArrayVar(&env, "env", nil, "environment variable KEY=VALUE for the function (repeatable)")
	f.DurationVar(&keepalive, "keepalive", 0, "idle time before an instance stops (default: the daemon's, 10m)")
	f.Uint32Var(&spec.MaxInstances, "max-instances", 0, "cap on instances (default: the daemon's, 16)")
	f.Uint32Var(&spec.Concurrency, "concurrency", 1, "requests one instance serves at once")
	f.StringVar(&spec.StartMode, "start-mode", "", "boot, snapshot, lazy or reap (default: the daemon's, boot)")
	f.Int64Var(&spec.MemoryLimitMib, "memory", 0, "memory limit in MiB (default: the daemon's, 256)")
	f.Float64Var(&spec.CpuLimit, "cpus", 0, "CPU limit in cores (default: none)")
	f.BoolVar(&replace, "replace", false, "replace an existing function of the same name")
	_ = cmd.MarkFlagRequired("image")
	return cmd
}

func newInvokeCmd(g *globalOpts) *cobra.Command {
	var (
		payload string
		timeout time.Duration
		quiet   bool
		ro      requestOpts
	)
	cmd := &cobra.Command{
		Use:   "invoke NAME",
		Short: "Invoke a function and print its reply and cold-start stages",
		Long: `Invoke a function once and print its reply, whether the call was cold or warm, and
a cold start's stages.

Without --method a gRPC function is called as vHive's helloworld.Greeter/SayHello
with --payload as the name. --method pkg.Service/Method calls any unary method:
--data takes the request as protobuf JSON, converted with the function's gRPC
server reflection (or with the descriptors of --protoset FILE, from protoc
--descriptor_set_out --include_imports), and the reply is printed as JSON;
--data-file takes the serialized request as it is, and the reply is printed as
its raw bytes. An HTTP function (deploy --protocol http) gets --http-method (GET,
or POST with a body), --path, -H headers and the body from --data or --data-file.`,
		Args: cobra.ExactArgs(1),
		Example: `  vhive invoke helloworld --payload world
  vhive invoke aes --payload record
  vhive invoke aes --method aes.Aes/ShowEncryption --data '{"plaintext_message":"hi"}'
  vhive invoke echo --method echo.Echo/Say --data-file req.bin
  vhive invoke hello-http --path '/hello?name=x' -H 'Accept: text/plain'`,
		RunE: func(cmd *cobra.Command, args []string) error {
			req, decode, err := ro.request(payload, cmd.Flags().Changed("payload"))
			if err != nil {
				return err
			}
			req.Function, req.TimeoutMs = args[0], timeout.Milliseconds()
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				t0 := time.Now()
				resp, err := c.Invoke(cmd.Context(), req)
				if err != nil {
					return fmt.Errorf("invoke %q: %w", args[0], grpcErr(err))
				}
				rtt := time.Since(t0)
				out := cmd.OutOrStdout()
				reply := resp.GetPayload()
				if decode != nil {
					if reply, err = decode(reply); err != nil {
						return fmt.Errorf("invoke %q: %w", args[0], err)
					}
				}
				if h := resp.GetHttp(); h != nil && !quiet {
					fmt.Fprintf(out, "HTTP %d %s\n", h.GetStatus(), http.StatusText(int(h.GetStatus())))
					for _, kv := range h.GetHeaders() {
						fmt.Fprintf(out, "%s: %s\n", kv.GetName(), kv.GetValue())
					}
					fmt.Fprintln(out)
				}
				fmt.Fprintln(out, string(reply))
				if quiet {
					return nil
				}
				kind := "warm"
				if resp.GetColdStart() {
					kind = "cold (" + resp.GetStartMode() + ")"
				}
				fmt.Fprintf(out, "\n%s invocation on instance %s, %s round trip from the CLI\n", kind, resp.GetInstanceId(), fmtMicros(rtt.Microseconds()))
				if len(resp.GetStages()) > 0 {
					tw := tabwriter.NewWriter(out, 0, 4, 2, ' ', tabwriter.AlignRight)
					fmt.Fprintln(tw, "stage\tµs\t")
					for _, st := range resp.GetStages() {
						fmt.Fprintf(tw, "%s\t%d\t\n", st.GetName(), st.GetMicros())
					}
					tw.Flush()
				}
				if ms := resp.GetMemoryStats(); len(ms) > 0 {
					keys := make([]string, 0, len(ms))
					for k := range ms {
						keys = append(keys, k)
					}
					sort.Strings(keys)
					fmt.Fprintln(out, "\nmemory:")
					for _, k := range keys {
						fmt.Fprintf(out, "  %s = %d\n", k, ms[k])
					}
				}
				return nil
			})
		},
	}
	cmd.Flags().StringVar(&payload, "payload", "", `SayHello's name (vHive: "record"/"replay" select the functions' input sets)`)
	cmd.Flags().DurationVar(&timeout, "timeout", 0, "give up after this long (default: no limit beyond the daemon's)")
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print only the reply")
	ro.addFlags(cmd.Flags())
	return cmd
}

func newLsCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:   "ls",
		Short: "List deployed functions",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				resp, err := c.ListFunctions(cmd.Context(), &vhivepb.ListFunctionsRequest{})
				if err != nil {
					return grpcErr(err)
				}
				tw := newTable(cmd.OutOrStdout(), "NAME\tIMAGE\tDIGEST\tSANDBOX\tMODE\tPROTOCOL\tINSTANCES\tBUSY\tCOLD\tWARM\tKEEPALIVE")
				for _, f := range resp.GetFunctions() {
					s := f.GetSpec()
					proto := fmt.Sprintf("%s:%d", s.GetProtocol(), s.GetPort())
					if s.GetReadinessPath() != "" {
						proto += s.GetReadinessPath()
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%d\t%d\t%d\t%d\t%s\n", s.GetName(), s.GetImage(), shortDigest(f.GetImageDigest()),
						s.GetSandbox(), s.GetStartMode(), proto, f.GetInstances(), f.GetBusy(), f.GetColdStarts(), f.GetWarmInvocations(),
						time.Duration(s.GetKeepaliveMs())*time.Millisecond)
				}
				return tw.Flush()
			})
		},
	}
}

func newRmCmd(g *globalOpts) *cobra.Command {
	return newRemoveCmd(g, "rm NAME...", "Remove functions (in-flight requests finish first), their instances and snapshots",
		func(ctx context.Context, c vhivepb.ControlClient, name string) error {
			_, err := c.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: name})
			return err
		})
}

// newRemoveCmd is an rm command that removes each argument with remove, in
// order, stopping at the first refusal.
func newRemoveCmd(g *globalOpts, use, short string, remove func(context.Context, vhivepb.ControlClient, string) error) *cobra.Command {
	return &cobra.Command{
		Use:   use,
		Short: short,
		Args:  cobra.MinimumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				for _, a := range args {
					if err := remove(cmd.Context(), c, a); err != nil {
						return fmt.Errorf("rm %q: %w", a, grpcErr(err))
					}
					fmt.Fprintln(cmd.OutOrStdout(), "removed", a)
				}
				return nil
			})
		},
	}
}

// newTable is a table on w, columns aligned, whose first row is header
// (tab-separated).
func newTable(w io.Writer, header string) *tabwriter.Writer {
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, header)
	return tw
}

// optionalArg is the argument of a command taking at most one, or "".
func optionalArg(args []string) string {
	if len(args) == 1 {
		return args[0]
	}
	return ""
}

func newInstancesCmd(g *globalOpts) *cobra.Command {
	var stats bool
	var stop bool
	cmd := &cobra.Command{
		Use:   "instances [FUNCTION]",
		Short: "List live instances (with --stats: RSS and PSS), or stop them with --stop",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fn := optionalArg(args)
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				if stop {
					resp, err := c.StopInstances(cmd.Context(), &vhivepb.StopInstancesRequest{Function: fn})
					if err != nil {
						return grpcErr(err)
					}
					fmt.Fprintf(cmd.OutOrStdout(), "stopped %d instance(s)\n", resp.GetStopped())
					return nil
				}
				resp, err := c.ListInstances(cmd.Context(), &vhivepb.ListInstancesRequest{Function: fn, Stats: stats})
				if err != nil {
					return grpcErr(err)
				}
				tw := newTable(cmd.OutOrStdout(), "ID\tFUNCTION\tSANDBOX\tSTARTED AS\tENDPOINT\tIN FLIGHT\tAGE\tRSS\tPSS")
				for _, in := range resp.GetInstances() {
					age := time.Since(time.UnixMilli(in.GetStartedUnixMs())).Round(time.Second)
					rss, pss := "-", "-"
					if stats {
						rss, pss = fmtBytes(in.GetRssBytes()), fmtBytes(in.GetPssBytes())
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d\t%s\t%s\t%s\n", in.GetId(), in.GetFunction(), in.GetSandbox(), in.GetStartMode(),
						in.GetEndpoint(), in.GetInFlight(), age, rss, pss)
				}
				return tw.Flush()
			})
		},
	}
	cmd.Flags().BoolVar(&stats, "stats", false, "measure each instance's RSS and PSS")
	cmd.Flags().BoolVar(&stop, "stop", false, "stop the instances (scale to zero) instead of listing them")
	return cmd
}

func shortDigest(d string) string {
	if len(d) > 19 {
		return d[:19]
	}
	return d
}

func fmtMicros(us int64) string {
	if us >= 10000 {
		return fmt.Sprintf("%.1f ms", float64(us)/1000)
	}
	return fmt.Sprintf("%d µs", us)
}

func fmtBytes(b int64) string {
	switch {
	case b >= 1<<30:
		return fmt.Sprintf("%.1fGiB", float64(b)/(1<<30))
	case b >= 1<<20:
		return fmt.Sprintf("%.1fMiB", float64(b)/(1<<20))
	case b >= 1<<10:
		return fmt.Sprintf("%.1fKiB", float64(b)/(1<<10))
	}
	return fmt.Sprintf("%dB", b)
}
