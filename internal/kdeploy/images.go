package kdeploy

import (
	"context"
	"fmt"
	"log/slog"
	"os"
	"path"
	"slices"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"vhive.dev/vhive/functions/build"
)

// QueueProxyFunction and QueueProxyPackage name the queue-proxy image for
// functions/build: localhost/vhive/queue-proxy, entrypoint
// /usr/local/bin/queue-proxy.
const (
	QueueProxyFunction = "queue-proxy"
	QueueProxyPackage  = "./cmd/vhive-queue-proxy"
	QueueProxyRepo     = "vhive/queue-proxy:latest"
)

// QueueProxyImageAt is the queue-proxy's reference in registry (host:port).
func QueueProxyImageAt(registry string) string { return registry + "/" + QueueProxyRepo }

// PushLayout pushes the single image of the OCI layout dir to ref
// (plain HTTP for a registry on a private address, as the cluster's).
func PushLayout(ctx context.Context, dir, ref string) error {
	r, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		return fmt.Errorf("push %s: reference: %w", ref, err)
	}
	p, err := layout.FromPath(dir)
	if err != nil {
		return fmt.Errorf("push %s: open layout %s: %w", ref, dir, err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		return fmt.Errorf("push %s: layout %s: %w", ref, dir, err)
	}
	m, err := idx.IndexManifest()
	if err != nil || len(m.Manifests) != 1 {
		return fmt.Errorf("push %s: layout %s: want one image (%v)", ref, dir, err)
	}
	img, err := idx.Image(m.Manifests[0].Digest)
	if err != nil {
		return fmt.Errorf("push %s: layout %s: %w", ref, dir, err)
	}
	if err := remote.Write(r, img, remote.WithContext(ctx)); err != nil {
		return fmt.Errorf("push %s: %w", ref, err)
	}
	return nil
}

// PublishOptions configures Publish.
type PublishOptions struct {
	// Registry is the host:port images are pushed to (the cluster's).
	Registry string
	// OutDir is where the images are built (default: a temporary directory).
	OutDir string
	// ModuleDir is the vhive source tree (default: found from the working
	// directory, see functions/build).
	ModuleDir string
	Logger    *slog.Logger
}

// Publish builds the queue-proxy image and the example functions (under
// functions/) that the services name as their GUEST_IMAGE, and pushes them
// to the registry: the queue-proxy as QueueProxyImageAt(Registry), each
// function under its GUEST_IMAGE's repository path (e.g.
// ghcr.io/vhive-serverless/helloworld:var_workload is pushed as
// <Registry>/vhive-serverless/helloworld:var_workload), where the nodes'
// vhive CRI, which mirrors every registry to the cluster's, pulls it.
// A GUEST_IMAGE whose last path element is not an example function is
// left alone (it must be in the registry already). It returns the
// queue-proxy reference.
func Publish(ctx context.Context, svcs []*Service, o PublishOptions) (string, error) {
	if o.Registry == "" {
		return "", fmt.Errorf("publish: no registry")
	}
	if o.Logger == nil {
		o.Logger = slog.New(slog.DiscardHandler)
	}
	if o.OutDir == "" {
		d, err := os.MkdirTemp("", "vhive-publish-")
		if err != nil {
			return "", fmt.Errorf("publish: %w", err)
		}
		defer os.RemoveAll(d)
		o.OutDir = d
	}
	type item struct{ function, pkg, ref string }
	items := []item{{QueueProxyFunction, QueueProxyPackage, QueueProxyImageAt(o.Registry)}}
	seen := map[string]bool{}
	for _, s := range svcs {
		gi := guestImage(s.Spec.Template.Spec.Containers[0])
		r, err := name.ParseReference(gi)
		if err != nil {
			return "", fmt.Errorf("publish: GUEST_IMAGE %q: %w", gi, err)
		}
		fn := path.Base(r.Context().RepositoryStr())
		if !slices.Contains(build.Names(), fn) {
			o.Logger.Info("GUEST_IMAGE is not an example function; expecting it in the registry", "image", gi)
			continue
		}
		tag, ok := r.(name.Tag)
		if !ok {
			o.Logger.Info("GUEST_IMAGE is pinned by digest; expecting it in the registry", "image", gi)
			continue
		}
		ref := o.Registry + "/" + r.Context().RepositoryStr() + ":" + tag.TagStr()
		if !seen[ref] {
			seen[ref] = true
			items = append(items, item{function: fn, ref: ref})
		}
	}
	for _, it := range items {
		imgs, err := build.BuildFunction(ctx, build.Options{
			Function: it.function, Package: it.pkg, OutDir: o.OutDir, ModuleDir: o.ModuleDir,
			Formats: []build.Format{build.FormatLayout},
		})
		if err != nil {
			return "", fmt.Errorf("publish %s: %w", it.ref, err)
		}
		if err := PushLayout(ctx, imgs[0].Layout, it.ref); err != nil {
			return "", fmt.Errorf("publish: %w", err)
		}
		o.Logger.Info("image pushed", "ref", it.ref, "digest", imgs[0].Digest)
	}
	return items[0].ref, nil
}
