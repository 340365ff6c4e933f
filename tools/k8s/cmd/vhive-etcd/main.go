// Command vhive-etcd runs a single-member etcd (go.etcd.io/etcd/server/v3/embed)
// on loopback for the kubelet end-to-end test: kube-apiserver stores its state
// there. It is not meant for anything but a throwaway test cluster.
package main

import (
	"flag"
	"fmt"
	"log/slog"
	"net/url"
	"os"
	"os/signal"
	"syscall"
	"time"

	"go.etcd.io/etcd/server/v3/embed"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "vhive-etcd:", err)
		os.Exit(1)
	}
}

func run() error {
	dataDir := flag.String("data-dir", "", "etcd data directory (required)")
	client := flag.String("listen-client", "http://127.0.0.1:2379", "client URL")
	peer := flag.String("listen-peer", "http://127.0.0.1:2380", "peer URL")
	flag.Parse()
	if *dataDir == "" {
		return fmt.Errorf("--data-dir is required")
	}
	cu, err := url.Parse(*client)
	if err != nil {
		return fmt.Errorf("parse --listen-client %q: %w", *client, err)
	}
	pu, err := url.Parse(*peer)
	if err != nil {
		return fmt.Errorf("parse --listen-peer %q: %w", *peer, err)
	}
	cfg := embed.NewConfig()
	cfg.Dir = *dataDir
	cfg.ListenClientUrls = []url.URL{*cu}
	cfg.AdvertiseClientUrls = []url.URL{*cu}
	cfg.ListenPeerUrls = []url.URL{*pu}
	cfg.AdvertisePeerUrls = []url.URL{*pu}
	cfg.InitialCluster = cfg.Name + "=" + pu.String()
	cfg.LogLevel = "warn"
	e, err := embed.StartEtcd(cfg)
	if err != nil {
		return fmt.Errorf("start etcd in %q: %w", *dataDir, err)
	}
	defer e.Close()
	select {
	case <-e.Server.ReadyNotify():
		slog.Info("etcd ready", "client", cu.String())
	case <-time.After(60 * time.Second):
		e.Server.Stop()
		return fmt.Errorf("etcd not ready after 60s")
	}
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, syscall.SIGINT, syscall.SIGTERM)
	select {
	case s := <-sig:
		slog.Info("stopping", "signal", s.String())
		return nil
	case err := <-e.Err():
		return fmt.Errorf("etcd: %w", err)
	}
}
