package kdeploy

import (
	"context"
	"log/slog"
	"net"
	"net/http"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// TestPublish builds the queue-proxy and helloworld images and pushes them
// to a real registry on loopback (go-containerregistry's, as the
// cluster's), where they are found under the refs the pods use.
func TestPublish(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(slog.NewLogLogger(slog.DiscardHandler, 0)))}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	reg := l.Addr().String()
	s, err := ReadService(repoFile(t, "deploy/knative-helloworld.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	qp, err := Publish(ctx, []*Service{s, s}, PublishOptions{Registry: reg, OutDir: t.TempDir()})
	if err != nil {
		t.Fatal(err)
	}
	if qp != reg+"/vhive/queue-proxy:latest" {
		t.Errorf("queue-proxy ref %q", qp)
	}
	for ref, entry := range map[string]string{
		qp: "/usr/local/bin/queue-proxy",
		reg + "/vhive-serverless/helloworld:var_workload": "/usr/local/bin/helloworld",
	} {
		r, err := name.ParseReference(ref, name.Insecure)
		if err != nil {
			t.Fatal(err)
		}
		img, err := remote.Image(r, remote.WithContext(ctx))
		if err != nil {
			t.Fatalf("%s not in the registry: %v", ref, err)
		}
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if len(cf.Config.Entrypoint) != 1 || cf.Config.Entrypoint[0] != entry {
			t.Errorf("%s: entrypoint %v, want %s", ref, cf.Config.Entrypoint, entry)
		}
	}
	if _, err := Publish(ctx, nil, PublishOptions{}); err == nil {
		t.Error("Publish without a registry succeeded")
	}
}
