package main

import (
	"github.com/spf13/cobra"
)

// newInternalCmd groups hidden commands the daemon starts itself (sandbox
// worker processes, a standalone page server).
func newInternalCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:    "internal",
		Short:  "Commands the daemon runs itself",
		Hidden: true,
	}
	return cmd
}
