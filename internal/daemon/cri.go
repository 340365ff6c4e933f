package daemon

import (
	"context"
	"fmt"
	"path/filepath"

	"vhive.dev/vhive/internal/cri"
)

// CRIConfig enables the CRI server that kubelet talks to.
type CRIConfig struct {
	// Socket is the CRI socket (created 0600); empty disables the server.
	Socket string
	// Containerd is the stock containerd CRI socket that pod sandboxes,
	// queue-proxy and every other container are proxied to.
	Containerd string
	// Handler is the runtime handler (RuntimeClass) whose pods run all
	// their containers in vhive. Default "vhive".
	Handler string
	// OCIRuntime runs the containers of Handler pods: "runc" (default),
	// or a runsc path. "none" disables the handler.
	OCIRuntime     string
	OCIRuntimeArgs []string
	// FunctionSandbox is the sandbox backend for Knative user-containers
	// (GUEST_IMAGE): gvisor (default), runc or "none" (proxy them too).
	FunctionSandbox string
	// Mirrors maps registry hosts to mirrors for the images vhive pulls
	// itself ("*" matches all).
	Mirrors map[string]string
}

// setupCRI creates the CRI server on the daemon's image service and sandbox
// backends; Serve starts it.
func (d *Daemon) setupCRI(ctx context.Context) error {
	c := d.cfg.CRI
	if c.Socket == "" {
		return nil
	}
	if c.Containerd == "" {
		c.Containerd = "/run/containerd/containerd.sock"
	}
	cfg := cri.Config{
		StateDir:           filepath.Join(d.cfg.StateDir, "cri"),
		ContainerdEndpoint: c.Containerd,
		RuntimeHandler:     c.Handler,
		Images:             d.images,
		OCIRuntime:         c.OCIRuntime,
		OCIRuntimeArgs:     c.OCIRuntimeArgs,
		RegistryMirrors:    c.Mirrors,
		Logger:             d.log.With("component", "cri"),
	}
	switch cfg.OCIRuntime {
	case "":
		cfg.OCIRuntime = "runc"
	case "none":
		cfg.OCIRuntime = ""
	}
	fs := c.FunctionSandbox
	if fs == "" {
		fs = "gvisor"
	}
	if fs != "none" {
		be, ok := d.backends[fs]
		if !ok {
			return fmt.Errorf("CRI: function sandbox %q is not enabled in this daemon (--sandboxes)", fs)
		}
		cfg.Functions = be
	}
	srv, err := cri.New(ctx, cfg)
	if err != nil {
		return fmt.Errorf("CRI server: %w", err)
	}
	d.cri = srv
	d.closers = append(d.closers, srv.Close)
	return nil
}
