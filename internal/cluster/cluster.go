package cluster

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"slices"
	"strings"
	"time"
)

// Config returns the cluster's configuration (defaults filled in).
func (c *Cluster) Config() Config { return c.cfg }

// Kubeconfig is the admin kubeconfig's path.
func (c *Cluster) Kubeconfig() string { return filepath.Join(c.cfg.Dir, "admin.kubeconfig") }

// Nodes returns the worker nodes' layout.
func (c *Cluster) Nodes() []Node { return c.cfg.nodes() }

// Node returns the node called name.
func (c *Cluster) Node(name string) (Node, error) {
	for _, n := range c.cfg.nodes() {
		if n.Name == name {
			return n, nil
		}
	}
	return Node{}, fmt.Errorf("cluster: no node %q (nodes are %s1..%s%d)", name, c.cfg.nodePrefix(), c.cfg.nodePrefix(), c.cfg.Nodes)
}

// Registry is the host:port of the registry every node pulls from.
func (c *Cluster) Registry() string { return c.cfg.Registry() }

// APIServer is the apiserver URL.
func (c *Cluster) APIServer() string { return c.cfg.APIServer() }

// ProcStatus is one recorded process.
type ProcStatus struct {
	Component string
	Node      string // "" for the control plane
	PID       int
	Alive     bool
	Log       string
}

// Status lists the recorded processes and whether each still runs: the
// control plane, then node by node, each in start order.
func (c *Cluster) Status() []ProcStatus {
	var out []ProcStatus
	for _, p := range c.st.snapshot().Procs {
		out = append(out, ProcStatus{Component: p.Component, Node: p.Node, PID: p.PID, Alive: p.alive(), Log: p.Log})
	}
	order := func(comp string) int {
		if i := slices.Index(controlComponents, comp); i >= 0 {
			return i
		}
		return slices.Index(nodeComponents, comp)
	}
	slices.SortStableFunc(out, func(a, b ProcStatus) int {
		if a.Node != b.Node {
			return strings.Compare(a.Node, b.Node)
		}
		return order(a.Component) - order(b.Component)
	})
	return out
}

// NodeStatus asks the apiserver about the nodes.
func (c *Cluster) NodeStatus(ctx context.Context) ([]NodeStatus, error) {
	api, err := newAPIClient(c.cfg)
	if err != nil {
		return nil, err
	}
	return api.nodes(ctx)
}

// Kill SIGKILLs one component of a node (Containerd, VhiveDaemon, Kubelet,
// KubeProxy) or, with node "", of the control plane.
func (c *Cluster) Kill(ctx context.Context, node, component string) error {
	if node != "" {
		if _, err := c.Node(node); err != nil {
			return err
		}
	}
	p, ok := c.st.snapshot().findProc(node, component)
	if !ok {
		return fmt.Errorf("cluster: no recorded %s on %q", component, node)
	}
	return p.kill(ctx)
}

// KillNode simulates a node failure: its kubelet and vhive daemon are
// killed (SIGKILL); containerd, kube-proxy and the netns stay, as on a
// machine whose node agents crashed.
func (c *Cluster) KillNode(ctx context.Context, node string) error {
	var errs []error
	for _, comp := range []string{Kubelet, VhiveDaemon} {
		errs = append(errs, c.Kill(ctx, node, comp))
	}
	return errors.Join(errs...)
}

// RestartNode starts every component of node that is not running, in
// order (containerd, vhive daemon, kubelet, kube-proxy). The new vhive
// daemon removes what its killed predecessor left.
func (c *Cluster) RestartNode(ctx context.Context, node string) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	st := c.st.snapshot()
	var dead []string
	for _, comp := range nodeComponents {
		if p, ok := st.findProc(node, comp); !ok || !p.alive() {
			dead = append(dead, comp)
		}
	}
	if len(dead) == 0 {
		return nil
	}
	if slices.Contains(dead, Containerd) {
		// kubelet and the daemon hold connections to the old containerd.
		dead = nodeComponents
		for _, comp := range []string{KubeProxy, Kubelet, VhiveDaemon} {
			if p, ok := st.findProc(node, comp); ok {
				if err := p.stop(ctx, 5*time.Second); err != nil {
					return err
				}
			}
		}
	}
	return c.startNode(ctx, n, dead)
}

// WaitReady waits until every node is Ready on vhive's CRI.
func (c *Cluster) WaitReady(ctx context.Context) error { return c.waitNodesReady(ctx) }

// Down stops the cluster and removes everything it made (see Down).
func (c *Cluster) Down(ctx context.Context) error { return Down(ctx, c.cfg) }
