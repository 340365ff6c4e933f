package main

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"time"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/api/resource"

	"vhive.dev/vhive/internal/cluster"
)

// newClusterCmd: a multi-node Kubernetes cluster on this machine with vhive
// as every worker's CRI (docs/cluster.md).
func newClusterCmd(*globalOpts) *cobra.Command {
	var (
		cfg      cluster.Config
		logLevel string
		timeout  time.Duration
	)
	setup := func() error {
		var lvl slog.Level
		if err := lvl.UnmarshalText([]byte(logLevel)); err != nil {
			return fmt.Errorf("--log-level %q: %w", logLevel, err)
		}
		cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: lvl}))
		return nil
	}
	// load is setup, then the cluster recorded in --dir.
	load := func() (*cluster.Cluster, error) {
		if err := setup(); err != nil {
			return nil, err
		}
		return cluster.Load(cfg)
	}
	// nodeCmd is a command acting on one node of the recorded cluster.
	nodeCmd := func(use, short string, act func(*cluster.Cluster, context.Context, string) error) *cobra.Command {
		return &cobra.Command{
			Use:   use + " NODE",
			Short: short,
			Args:  cobra.ExactArgs(1),
			RunE: func(cmd *cobra.Command, args []string) error {
				c, err := load()
				if err != nil {
					return err
				}
				return act(c, cmd.Context(), args[0])
			},
		}
	}
	cmd := &cobra.Command{
		Use:   "cluster",
		Short: "A multi-node Kubernetes cluster on this machine, vhive on every worker",
		Long: `Bring up, inspect and tear down a Kubernetes cluster on this machine: the
control plane (etcd, kube-apiserver, kube-scheduler, kube-controller-manager)
and an image registry on the host, and N worker nodes, each a network
namespace on a host bridge with its own containerd, vhive daemon (the node's
CRI), kubelet and kube-proxy. See docs/cluster.md for the layout.

Needs root and the binaries of 'make k8s-tools cluster-tools' in --bin-dir.`,
	}
	pf := cmd.PersistentFlags()
	pf.StringVar(&cfg.Dir, "dir", cluster.DefaultDir, "state directory of the cluster (removed by down)")
	pf.IntVar(&cfg.Instance, "instance", 0, fmt.Sprintf("instance 0..%d: selects names, addresses and ports so clusters can coexist", cluster.MaxInstances-1))
	pf.StringVar(&cfg.BinDir, "bin-dir", "", "Kubernetes, etcd and registry binaries (default $VHIVE_CACHE/bin)")
	pf.StringVar(&logLevel, "log-level", "info", "debug, info, warn or error")
	pf.DurationVar(&timeout, "timeout", 10*time.Minute, "give up after this long")

	var nodeCPU, nodeMemory string
	up := &cobra.Command{
		Use:   "up",
		Short: "Bring the cluster up (or report the one already running) and print its kubeconfig path",
		Long: `Bring the cluster up and wait until every node is Ready with vhive as its
runtime; the cluster keeps running after this command returns. If --dir
already holds a running cluster of the same size, nothing new is made. A
bring-up that fails tears down what it made (logs kept in --dir/logs).`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := setup(); err != nil {
				return err
			}
			if nodeCPU != "" {
				q, err := resource.ParseQuantity(nodeCPU)
				if err != nil || q.Sign() <= 0 {
					return fmt.Errorf("--node-cpu %q: want a positive CPU quantity such as 1, 1.5 or 500m", nodeCPU)
				}
				cfg.NodeMilliCPU = q.MilliValue()
			}
			if nodeMemory != "" {
				q, err := resource.ParseQuantity(nodeMemory)
				if err != nil || q.Sign() <= 0 {
					return fmt.Errorf("--node-memory %q: want a positive memory quantity such as 2Gi or 512Mi", nodeMemory)
				}
				cfg.NodeMemory = q.Value()
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			t0 := time.Now()
			c, err := cluster.Up(ctx, cfg)
			if err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "cluster of %d nodes ready after %v; apiserver %s, registry %s\n",
				len(c.Nodes()), time.Since(t0).Round(100*time.Millisecond), c.APIServer(), c.Registry())
			fmt.Fprintf(cmd.ErrOrStderr(), "  export KUBECONFIG=%s\n", c.Kubeconfig())
			fmt.Fprintln(cmd.OutOrStdout(), c.Kubeconfig())
			return nil
		},
	}
	up.Flags().IntVar(&cfg.Nodes, "nodes", 3, fmt.Sprintf("worker nodes (1..%d)", cluster.MaxNodes))
	up.Flags().StringVar(&cfg.FunctionSandbox, "function-sandbox", "gvisor", "sandbox of Knative user-containers: gvisor, runc or microvm (needs make microvm)")
	up.Flags().StringVar(&cfg.Vhive, "vhive", "", "vhive binary for the node daemons (default: this executable)")
	up.Flags().DurationVar(&cfg.NodeMonitorGracePeriod, "node-monitor-grace-period", 20*time.Second, "how long a silent node stays Ready")
	up.Flags().StringVar(&nodeCPU, "node-cpu", "", "each node's allocatable CPU, e.g. 1.5 or 500m (default: the machine's CPUs divided among the nodes)")
	up.Flags().StringVar(&nodeMemory, "node-memory", "", "each node's allocatable memory, e.g. 4Gi (default: the machine's memory divided among the nodes)")

	down := &cobra.Command{
		Use:   "down",
		Short: "Stop the cluster and remove every process, netns, link, mount, cgroup and file it made",
		Long: `Stop the cluster recorded in --dir and remove everything it made, also after a
crash of any component or an interrupted up; then sweep by the instance's own
names (netns and links vhcI-n*, bridge vhcbrI, cgroups /vhcI-n*, mounts and
processes under --dir). Fails, naming them, if anything is left.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := setup(); err != nil {
				return err
			}
			ctx, cancel := context.WithTimeout(cmd.Context(), timeout)
			defer cancel()
			t0 := time.Now()
			if err := cluster.Down(ctx, cfg); err != nil {
				return err
			}
			fmt.Fprintf(cmd.ErrOrStderr(), "cluster down after %v; nothing left\n", time.Since(t0).Round(100*time.Millisecond))
			return nil
		},
	}
	down.Flags().BoolVar(&cfg.KeepLogs, "keep-logs", false, "keep --dir/logs")

	status := &cobra.Command{
		Use:   "status",
		Short: "Show the cluster's processes and nodes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			c, err := load()
			if err != nil {
				return err
			}
			w := newTable(cmd.OutOrStdout(), "NODE\tCOMPONENT\tPID\tALIVE\tLOG")
			for _, p := range c.Status() {
				node := p.Node
				if node == "" {
					node = "(host)"
				}
				fmt.Fprintf(w, "%s\t%s\t%d\t%v\t%s\n", node, p.Component, p.PID, p.Alive, p.Log)
			}
			w.Flush()
			ctx, cancel := context.WithTimeout(cmd.Context(), 10*time.Second)
			defer cancel()
			ns, err := c.NodeStatus(ctx)
			if err != nil {
				return fmt.Errorf("apiserver: %w", err)
			}
			fmt.Fprintln(cmd.OutOrStdout())
			w = newTable(cmd.OutOrStdout(), "NAME\tREADY\tINTERNAL-IP\tPOD-CIDR\tRUNTIME")
			for _, n := range ns {
				fmt.Fprintf(w, "%s\t%v\t%s\t%s\t%s\n", n.Name, n.Ready, n.InternalIP, n.PodCIDR, n.ContainerRuntime)
			}
			w.Flush()
			fmt.Fprintf(cmd.OutOrStdout(), "\nkubeconfig: %s\n", c.Kubeconfig())
			return nil
		},
	}

	killNode := nodeCmd("kill-node", "Simulate a node failure: SIGKILL the node's kubelet and vhive daemon", (*cluster.Cluster).KillNode)
	restartNode := nodeCmd("restart-node", "Start the node's components that are not running", (*cluster.Cluster).RestartNode)
	cmd.AddCommand(up, down, status, killNode, restartNode)
	return cmd
}
