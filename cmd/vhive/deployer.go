package main

import (
	"log/slog"

	"github.com/spf13/cobra"

	"vhive.dev/vhive/internal/invoker"
)

const deployerLong = `Deploy functions on the local vhive daemon from vSwarm's deployer input and
write the endpoints.json that 'vhive invoker' reads.

-jsonFile is {"functions":[{"name": ..., "file": ..., "count": N}]}; "file"
is an image reference (localhost/vhive/helloworld:latest) or the path of an
image (OCI layout directory or tarball, relative to -funcPath), which is
imported first. Each function is deployed -count times as <name>-0 ...
<name>-<count-1>, like vSwarm. Endpoint hostnames are <name>-<i>.<domain>
(bare names with -domain ""); the vhive gateway routes by the first label.

Cluster mode (-kubeconfig, or env KUBECONFIG with -cluster): "file" is a
Knative Service manifest in vHive's shape (deploy/knative-helloworld.yaml),
relative to -funcPath, or -manifest names one (deployed under its
metadata.name). Each function becomes what Knative would run for its
revision: a Deployment <name>-00001-deployment of pods with the
user-container (GUEST_IMAGE runs in a vhive sandbox on the node) and a
queue-proxy relaying to it, and a ClusterIP Service <name> on port 80 (see
docs/cluster-functions.md). -push REGISTRY first builds and pushes the
queue-proxy image and the example functions the manifests name. The
endpoints file names each function <name>.<namespace>.svc.cluster.local
with its ClusterIP:80 as "address"; run the invoker with -connPerRequest so
kube-proxy spreads the requests over the pods.`

func newDeployerCmd(g *globalOpts) *cobra.Command {
	return &cobra.Command{
		Use:                "deployer [-jsonFile functions.json] [-funcPath DIR] [-endpointsFile endpoints.json]",
		Short:              "Deploy functions from vSwarm's functions.json and write endpoints.json",
		Long:               deployerLong,
		DisableFlagParsing: true,
		RunE: func(cmd *cobra.Command, args []string) error {
			fs := newFlagSet(cmd, "vhive deployer")
			jsonFile := fs.String("jsonFile", "functions.json", "functions to deploy (vSwarm deployer format)")
			funcPath := fs.String("funcPath", ".", "directory relative image paths in -jsonFile are resolved in")
			endpointsFile := fs.String("endpointsFile", "endpoints.json", "endpoints file to write")
			concurrency := fs.Int("deploymentConcurrency", 1, "deployments at once")
			sandbox := fs.String("sandbox", "", "sandbox of every function: gvisor, runc, wasm, microvm (\"\": daemon default)")
			startMode := fs.String("startMode", "", "start mode: boot, snapshot, lazy, reap (\"\": daemon default)")
			domain := fs.String("domain", "default.127.0.0.1.nip.io", "hostname suffix of the endpoints (\"\" for bare function names)")
			replace := fs.Bool("replace", false, "redeploy functions that already exist")
			socket := fs.String("socket", g.socket, "daemon control API: a unix socket path or tcp://HOST:PORT (env VHIVE_SOCKET)")
			tokenFile := fs.String("token-file", g.tokenFile, "file holding the control token for tcp:// (env VHIVE_TOKEN holds the token itself)")
			var k kubeFlags
			k.register(fs)
			if help, err := parseFlags(fs, deployerLong, args); help || err != nil {
				return err
			}
			g.socket, g.tokenFile = *socket, *tokenFile
			log := slog.New(slog.NewTextHandler(cmd.ErrOrStderr(), nil))
			if k.enabled() {
				return k.deploy(cmd.Context(), *jsonFile, *funcPath, *endpointsFile, *replace, log)
			}
			fns, err := invoker.ReadFunctions(*jsonFile)
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			conn, client, err := g.dial(ctx)
			if err != nil {
				return err
			}
			defer conn.Close()
			eps, err := invoker.DeployFunctions(ctx, client, fns, invoker.DeployOptions{
				FuncPath: *funcPath, Sandbox: *sandbox, StartMode: *startMode, Domain: *domain,
				Concurrency: *concurrency, Replace: *replace, Logger: log,
			})
			if err != nil {
				return err
			}
			if err := invoker.WriteEndpoints(*endpointsFile, eps); err != nil {
				return err
			}
			log.Info("endpoints written", "file", *endpointsFile, "endpoints", len(eps))
			return nil
		},
	}
}
