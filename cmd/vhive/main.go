// Command vhive is the vhive node daemon and its CLI in one binary.
//
// This file only wires commands together; each command lives in its own file
// and calls into internal/ packages with typed options.
package main

import (
	"context"
	"fmt"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/cobra"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// DefaultSocket is where the daemon listens for the CLI.
const DefaultSocket = "/run/vhive/vhive.sock"

// globalOpts are the flags every client command shares.
type globalOpts struct {
	socket string
}

// dial connects to the daemon's control socket.
func (g *globalOpts) dial(ctx context.Context) (*grpc.ClientConn, vhivepb.ControlClient, error) {
	if _, err := os.Stat(g.socket); err != nil {
		return nil, nil, fmt.Errorf("vhive daemon socket %s: %w (is `vhive daemon` running? set --socket or VHIVE_SOCKET)", g.socket, err)
	}
	conn, err := grpc.NewClient("unix://"+g.socket, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return nil, nil, fmt.Errorf("connect to daemon at %s: %w", g.socket, err)
	}
	return conn, vhivepb.NewControlClient(conn), nil
}

// call dials the daemon, runs fn with the control client and closes the
// connection.
func (g *globalOpts) call(ctx context.Context, fn func(c vhivepb.ControlClient) error) error {
	conn, c, err := g.dial(ctx)
	if err != nil {
		return err
	}
	defer conn.Close()
	return fn(c)
}

func newRootCmd() *cobra.Command {
	g := &globalOpts{}
	root := &cobra.Command{
		Use:   "vhive",
		Short: "vhive: a serverless experimentation framework (node daemon + CLI)",
		Long: `vhive runs functions packaged as OCI images in isolated sandboxes (gVisor, runc,
WebAssembly) and measures their cold starts: boot, snapshot restore and REAP.

Start the node daemon with 'vhive daemon', then deploy and invoke functions.`,
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	defSock := DefaultSocket
	if s := os.Getenv("VHIVE_SOCKET"); s != "" {
		defSock = s
	}
	root.PersistentFlags().StringVar(&g.socket, "socket", defSock, "daemon control socket (env VHIVE_SOCKET)")
	for _, add := range commands() {
		root.AddCommand(add(g))
	}
	return root
}

// commands lists the constructors of every sub-command, one file each.
func commands() []func(*globalOpts) *cobra.Command {
	return []func(*globalOpts) *cobra.Command{
		newDaemonCmd,
		newDeployCmd,
		newInvokeCmd,
		newLsCmd,
		newRmCmd,
		newImagesCmd,
		newSnapshotsCmd,
		newInstancesCmd,
		newBenchCmd,
		newInvokerCmd,
		newDeployerCmd,
		newClusterCmd,
		newInternalCmd,
		func(*globalOpts) *cobra.Command { return newPageServerCmd() },
	}
}

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := newRootCmd().ExecuteContext(ctx)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "vhive:", err)
		os.Exit(1)
	}
}
