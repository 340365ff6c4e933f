package cluster

import (
	"context"
	"fmt"

	"github.com/vishvananda/netlink"
)

// Isolate cuts node off the network: the host end of its veth goes down, so
// nothing reaches the node or its pods and nothing leaves it. With KillNode
// it makes the node lost the way a failed machine is (its pods stop
// answering rather than keep serving). Reconnect undoes it.
func (c *Cluster) Isolate(ctx context.Context, node string) error { return c.setLink(node, false) }

// Reconnect brings an isolated node back on the network.
func (c *Cluster) Reconnect(ctx context.Context, node string) error { return c.setLink(node, true) }

func (c *Cluster) setLink(node string, up bool) error {
	n, err := c.Node(node)
	if err != nil {
		return err
	}
	l, err := netlink.LinkByName(n.Name)
	if err != nil {
		return fmt.Errorf("cluster: node %s: host veth %s: %w", node, n.Name, err)
	}
	if up {
		err = netlink.LinkSetUp(l)
	} else {
		err = netlink.LinkSetDown(l)
	}
	if err != nil {
		return fmt.Errorf("cluster: node %s: set veth %s up=%v: %w", node, n.Name, up, err)
	}
	return nil
}
