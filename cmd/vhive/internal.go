package main

import (
	"fmt"
	"log/slog"
	"os"

	"github.com/spf13/cobra"

	"vhive.dev/vhive/internal/memory"
	"vhive.dev/vhive/internal/wasm"
)

// newInternalCmd groups hidden commands the daemon starts itself (sandbox
// worker processes) and the standalone page server.
func newInternalCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:    "internal",
		Short:  "Commands the daemon runs itself",
		Hidden: true,
	}
	cmd.AddCommand(&cobra.Command{
		Use:                "wasm-worker",
		Short:              "A wasm sandbox worker process (started by the daemon)",
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			return wasm.WorkerMain(cmd.Context(), args)
		},
	})
	return cmd
}

// newPageServerCmd runs the memory manager for one restore, standalone: a
// real Firecracker on a KVM host can point its Uffd memory backend at it.
func newPageServerCmd() *cobra.Command {
	var cfg memory.RestoreConfig
	var mode string
	cmd := &cobra.Command{
		Use:   "page-server --socket PATH --memory-file FILE [--mode lazy|record|prefetch --ws FILE]",
		Short: "Serve one restore's guest memory over userfaultfd (Firecracker's UFFD handshake)",
		Long: `Serve guest memory for one restore: listen on --socket, accept the sandbox's
handshake (JSON region array + userfaultfd over SCM_RIGHTS, Firecracker's
mem_backend {"backend_type": "Uffd", "backend_path": SOCKET}), then serve its
page faults from --memory-file until the peer exits. record writes the REAP
working set to --ws when the peer exits; prefetch installs it first.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			cfg.Mode = memory.Mode(mode)
			if cfg.ID == "" {
				cfg.ID = fmt.Sprintf("page-server-%d", os.Getpid())
			}
			st, err := memory.ServeOne(cmd.Context(), cfg, slog.New(slog.NewTextHandler(os.Stderr, nil)))
			fmt.Fprintf(cmd.OutOrStdout(), "%+v\n", st)
			return err
		},
	}
	f := cmd.Flags()
	f.StringVar(&cfg.SocketPath, "socket", "", "unix socket to listen on for the handshake (required)")
	f.StringVar(&cfg.MemoryFile, "memory-file", "", "guest memory snapshot file (required)")
	f.StringVar(&mode, "mode", "lazy", "lazy, record or prefetch")
	f.StringVar(&cfg.WorkingSet, "ws", "", "working-set file (written by record, read by prefetch)")
	f.StringVar(&cfg.Trace, "trace", "", "record: also write the faulted pages in fault order as CSV")
	f.IntVar(&cfg.ChunkPages, "chunk-pages", 1, "pages installed per fault (1 = pure lazy)")
	_ = cmd.MarkFlagRequired("socket")
	_ = cmd.MarkFlagRequired("memory-file")
	return cmd
}
