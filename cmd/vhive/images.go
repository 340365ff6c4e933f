package main

import (
	"context"
	"fmt"
	"io"
	"path/filepath"
	"time"

	"github.com/spf13/cobra"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// grpcErr strips the gRPC wrapping so the CLI prints the daemon's message
// with its class ("not found: function \"x\" is not deployed").
func grpcErr(err error) error {
	if s, ok := status.FromError(err); ok {
		return fmt.Errorf("%s (%s)", s.Message(), s.Code())
	}
	return err
}

// printImage prints a pulled or imported image: ref, digest and kind.
func printImage(w io.Writer, im *vhivepb.ImageInfo) error {
	_, err := fmt.Fprintf(w, "%s %s (%s)\n", im.GetRef(), im.GetDigest(), im.GetKind())
	return err
}

func newImagesCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "images",
		Short: "Manage function images (ls, pull, import, rm)",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "ls",
		Short: "List images in the daemon's cache",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				resp, err := c.ListImages(cmd.Context(), &vhivepb.ListImagesRequest{})
				if err != nil {
					return grpcErr(err)
				}
				tw := newTable(cmd.OutOrStdout(), "REF\tDIGEST\tKIND\tSIZE\tCREATED")
				for _, im := range resp.GetImages() {
					created := "-"
					if im.GetCreatedUnixMs() > 0 {
						created = time.UnixMilli(im.GetCreatedUnixMs()).UTC().Format(time.RFC3339)
					}
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\n", im.GetRef(), shortDigest(im.GetDigest()), im.GetKind(), fmtBytes(im.GetSize()), created)
				}
				return tw.Flush()
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:     "pull REF",
		Short:   "Pull an image from a registry (plain HTTP for localhost registries; auth from the docker config)",
		Example: "  vhive images pull 127.0.0.1:5000/vhive/helloworld:latest",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				im, err := c.PullImage(cmd.Context(), &vhivepb.PullImageRequest{Ref: args[0]})
				if err != nil {
					return fmt.Errorf("pull %q: %w", args[0], grpcErr(err))
				}
				return printImage(cmd.OutOrStdout(), im)
			})
		},
	})
	var ref string
	imp := &cobra.Command{
		Use:   "import PATH",
		Short: "Import an OCI layout directory, or an OCI or docker-archive tarball",
		Example: `  vhive images import out/images/helloworld
  vhive images import out/images/helloworld.tar --ref localhost/vhive/hello:v2`,
		Args: cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			p, err := filepath.Abs(args[0])
			if err != nil {
				return err
			}
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				im, err := c.ImportImage(cmd.Context(), &vhivepb.ImportImageRequest{Path: p, Ref: ref})
				if err != nil {
					return fmt.Errorf("import %q: %w", args[0], grpcErr(err))
				}
				return printImage(cmd.OutOrStdout(), im)
			})
		},
	}
	imp.Flags().StringVar(&ref, "ref", "", "name to record (default: the name stored in the archive)")
	cmd.AddCommand(imp)
	cmd.AddCommand(newRemoveCmd(g, "rm REF|DIGEST...", "Remove images (refused while a deployed function uses them)",
		func(ctx context.Context, c vhivepb.ControlClient, ref string) error {
			_, err := c.RemoveImage(ctx, &vhivepb.RemoveImageRequest{Ref: ref})
			return err
		}))
	return cmd
}

func newSnapshotsCmd(g *globalOpts) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "snapshots",
		Short: "Manage function snapshots (ls, inspect, rm)",
	}
	cmd.AddCommand(&cobra.Command{
		Use:   "ls [FUNCTION]",
		Short: "List snapshots and their disk usage",
		Args:  cobra.MaximumNArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			fn := optionalArg(args)
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				resp, err := c.ListSnapshots(cmd.Context(), &vhivepb.ListSnapshotsRequest{Function: fn})
				if err != nil {
					return grpcErr(err)
				}
				tw := newTable(cmd.OutOrStdout(), "ID\tFUNCTION\tBACKEND\tRESTORE\tWS\tMODES\tDISK\tCREATED")
				var total int64
				for _, s := range resp.GetSnapshots() {
					total += s.GetDiskBytes()
					fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%v\t%v\t%s\t%s\n", s.GetId(), s.GetFunction(), s.GetBackend(), s.GetRestore(),
						s.GetWorkingSet(), s.GetModes(), fmtBytes(s.GetDiskBytes()), time.UnixMilli(s.GetCreatedUnixMs()).UTC().Format(time.RFC3339))
				}
				if err := tw.Flush(); err != nil {
					return err
				}
				fmt.Fprintf(cmd.OutOrStdout(), "%d snapshot(s), %s on disk\n", len(resp.GetSnapshots()), fmtBytes(total))
				return nil
			})
		},
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "inspect ID",
		Short: "Show a snapshot's manifest: files, checksums, modes, restore behaviour",
		Args:  cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return g.call(cmd.Context(), func(c vhivepb.ControlClient) error {
				s, err := c.InspectSnapshot(cmd.Context(), &vhivepb.InspectSnapshotRequest{Id: args[0]})
				if err != nil {
					return fmt.Errorf("inspect %q: %w", args[0], grpcErr(err))
				}
				out := cmd.OutOrStdout()
				fmt.Fprintf(out, "id:           %s\nfunction:     %s\nbackend:      %s\nimage digest: %s\ncreated:      %s\npath:         %s\ndisk:         %s\nrestore:      %s\nmodes:        %v\nworking set:  %v\n",
					s.GetId(), s.GetFunction(), s.GetBackend(), s.GetImageDigest(), time.UnixMilli(s.GetCreatedUnixMs()).UTC().Format(time.RFC3339),
					s.GetPath(), fmtBytes(s.GetDiskBytes()), s.GetRestore(), s.GetModes(), s.GetWorkingSet())
				for k, v := range s.GetDetails() {
					fmt.Fprintf(out, "  %s: %s\n", k, v)
				}
				return nil
			})
		},
	})
	cmd.AddCommand(newRemoveCmd(g, "rm ID...", "Remove snapshots (the next cold start boots and takes a fresh one)",
		func(ctx context.Context, c vhivepb.ControlClient, id string) error {
			_, err := c.RemoveSnapshot(ctx, &vhivepb.RemoveSnapshotRequest{Id: id})
			return err
		}))
	return cmd
}
