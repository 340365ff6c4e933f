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

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/api"
)

// DefaultSocket is where the daemon listens for the CLI.
const DefaultSocket = "/run/vhive/vhive.sock"

// globalOpts are the flags every client command shares.
type globalOpts struct {
	socket    string
	tokenFile string
}

// dial connects to the daemon's control API.
func (g *globalOpts) dial(ctx context.Context) (*grpc.ClientConn, vhivepb.ControlClient, error) {
	t, err := api.ParseControlTarget(g.socket)
	if err != nil {
		return nil, nil, fmt.Errorf("--socket: %w", err)
	}
	tok, err := api.ClientToken(g.tokenFile, os.Getenv("VHIVE_TOKEN"))
	if err != nil {
		return nil, nil, err
	}
	conn, err := api.DialControl(t, tok)
	if err != nil {
		return nil, nil, err
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
	root.PersistentFlags().StringVar(&g.socket, "socket", defSock, "daemon control API: a unix socket path or tcp://HOST:PORT (env VHIVE_SOCKET)")
	root.PersistentFlags().StringVar(&g.tokenFile, "token-file", "", "file holding the control token for tcp:// (env VHIVE_TOKEN holds the token itself)")
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
