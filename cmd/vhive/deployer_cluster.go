package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"time"

	"vhive.dev/vhive/internal/invoker"
	"vhive.dev/vhive/internal/kdeploy"
)

// kubeFlags are the deployer's cluster-mode flags.
type kubeFlags struct {
	kubeconfig, manifest, namespace, queueProxy, push string
	cluster, noSpread                                 bool
	replicas                                          int
	toleration                                        int64
	wait                                              time.Duration
}

func (k *kubeFlags) register(fs *flag.FlagSet) {
	fs.StringVar(&k.kubeconfig, "kubeconfig", "", "cluster mode: deploy on the Kubernetes cluster of this kubeconfig")
	fs.BoolVar(&k.cluster, "cluster", false, "cluster mode with the kubeconfig of env KUBECONFIG")
	fs.StringVar(&k.manifest, "manifest", "", "cluster mode: deploy this Knative Service manifest instead of -jsonFile")
	fs.StringVar(&k.namespace, "namespace", "default", "cluster mode: namespace of the functions")
	fs.StringVar(&k.queueProxy, "queueProxyImage", "", "cluster mode: queue-proxy image (default <-push registry>/"+kdeploy.QueueProxyRepo+")")
	fs.StringVar(&k.push, "push", "", "cluster mode: build and push the queue-proxy and the named example functions to this registry (host:port) first")
	fs.IntVar(&k.replicas, "replicas", 1, "cluster mode: pods per function when its template has no autoscaling.knative.dev/min-scale")
	fs.Int64Var(&k.toleration, "tolerationSeconds", 5, "cluster mode: how long pods stay on a not-ready or unreachable node before they are evicted")
	fs.BoolVar(&k.noSpread, "noSpread", false, "cluster mode: no topology spread of a function's pods over nodes")
	fs.DurationVar(&k.wait, "wait", 5*time.Minute, "cluster mode: wait this long for every pod to be ready behind its Service (0: do not wait)")
}

func (k *kubeFlags) enabled() bool { return k.kubeconfig != "" || k.cluster || k.manifest != "" }

func (k *kubeFlags) deploy(ctx context.Context, jsonFile, funcPath, endpointsFile string, replace bool, log *slog.Logger) error {
	kc := k.kubeconfig
	if kc == "" {
		kc = os.Getenv("KUBECONFIG")
	}
	if kc == "" {
		return fmt.Errorf("cluster mode needs -kubeconfig or env KUBECONFIG")
	}
	if k.replicas < 0 {
		return fmt.Errorf("-replicas %d is negative", k.replicas)
	}
	// Read every manifest first: nothing is built or created for bad input.
	var (
		entries []invoker.FunctionEntry
		svcs    []*kdeploy.Service
	)
	if k.manifest != "" {
		s, err := kdeploy.ReadService(k.manifest)
		if err != nil {
			return err
		}
		if s.Metadata.Name == "" {
			return fmt.Errorf("manifest %q has no metadata.name", k.manifest)
		}
		svcs = append(svcs, s)
	} else {
		var err error
		if entries, err = invoker.ReadFunctions(jsonFile); err != nil {
			return err
		}
		for _, e := range entries {
			p := e.File
			if funcPath != "" && !filepath.IsAbs(p) {
				p = filepath.Join(funcPath, p)
			}
			s, err := kdeploy.ReadService(p)
			if err != nil {
				return fmt.Errorf("function %q: %w", e.Name, err)
			}
			svcs = append(svcs, s)
		}
	}
	cs, err := kdeploy.NewClient(kc)
	if err != nil {
		return err
	}
	qp := k.queueProxy
	if k.push != "" {
		ref, err := kdeploy.Publish(ctx, svcs, kdeploy.PublishOptions{Registry: k.push, Logger: log})
		if err != nil {
			return err
		}
		if qp == "" {
			qp = ref
		}
	}
	if qp == "" {
		return fmt.Errorf("cluster mode needs -queueProxyImage or -push REGISTRY (the queue-proxy image the nodes pull)")
	}
	r := int32(k.replicas)
	opts := kdeploy.Options{
		ObjectOptions: kdeploy.ObjectOptions{
			Namespace: k.namespace, QueueProxyImage: qp, Replicas: &r,
			TolerationSeconds: k.toleration, NoSpread: k.noSpread,
		},
		FuncPath: funcPath, Replace: replace, Wait: k.wait, Logger: log,
	}
	var fns []kdeploy.Function
	if k.manifest != "" {
		fn, err := kdeploy.DeployService(ctx, cs, svcs[0], svcs[0].Metadata.Name, opts)
		if err != nil {
			return err
		}
		fns = []kdeploy.Function{fn}
		if k.wait > 0 {
			wctx, cancel := context.WithTimeout(ctx, k.wait)
			defer cancel()
			if err := kdeploy.WaitReady(wctx, cs, fn, fn.Replicas); err != nil {
				return err
			}
		}
	} else if fns, err = kdeploy.Deploy(ctx, cs, entries, opts); err != nil {
		return err
	}
	if err := invoker.WriteEndpoints(endpointsFile, kdeploy.Endpoints(fns)); err != nil {
		return err
	}
	log.Info("endpoints written", "file", endpointsFile, "endpoints", len(fns))
	return nil
}
