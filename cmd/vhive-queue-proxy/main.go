// Command vhive-queue-proxy is the queue-proxy container of vhive's function
// pods (the role of Knative's queue-proxy): it relays requests on -listen to
// the function at GUEST_ADDR:GUEST_PORT, which vhive's CRI puts in its env,
// answers readiness probes (header K-Network-Probe: queue) and serves
// Prometheus metrics. SIGTERM drains it. It is packaged as the image
// localhost/vhive/queue-proxy (vhive's functions/build) so that nodes pull it
// like any other image; the logic is in internal/queueproxy.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/signal"
	"syscall"
	"time"

	"vhive.dev/vhive/internal/queueproxy"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "vhive-queue-proxy:", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("vhive-queue-proxy", flag.ContinueOnError)
	listen := fs.String("listen", ":8012", "address the pod's Service targets")
	metrics := fs.String("metrics", ":9091", "Prometheus /metrics address (\"\" off)")
	upstream := fs.String("upstream", net.JoinHostPort(os.Getenv("GUEST_ADDR"), os.Getenv("GUEST_PORT")),
		"function address (default GUEST_ADDR:GUEST_PORT from the env)")
	drainWait := fs.Duration("drain-wait", 2*time.Second, "keep serving this long after SIGTERM while failing probes")
	drainTimeout := fs.Duration("drain-timeout", 20*time.Second, "then wait at most this long for requests in flight")
	if err := fs.Parse(args); err != nil {
		if err == flag.ErrHelp {
			return nil
		}
		return err
	}
	log := slog.New(slog.NewTextHandler(os.Stderr, nil))
	p, err := queueproxy.New(queueproxy.Config{
		Upstream: *upstream, DrainWait: *drainWait, DrainTimeout: *drainTimeout, Logger: log,
	})
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	var ml net.Listener
	if *metrics != "" {
		if ml, err = net.Listen("tcp", *metrics); err != nil {
			lis.Close()
			return err
		}
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, os.Interrupt)
	defer stop()
	return p.Run(ctx, lis, ml)
}
