package netpool

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os/exec"
	"strings"
)

// The host filter keeps a sandbox inside its namespace. Without it a
// function reaches every service the host serves on a wildcard address (via
// the host side of its own veth, or any other host address: the kernel
// delivers locally whatever arrives for one of its addresses), and with
// forwarding on (any Kubernetes node) every other instance.
//
// Each pool installs one nftables table, "inet vhive-<prefix>", whose
// input and forward chains drop what arrives from the pool's host veths
// ("<prefix>-*") unless it belongs to a connection the host opened (the
// daemon dialling the function), and drop forwarding into them. A table of
// its own per prefix leaves every other ruleset (and other daemons) alone;
// in nftables a drop in any base chain is final, so other tables cannot
// re-open what this one closes.

// FilterTable is the nftables table (family inet) of the pool with prefix.
func FilterTable(prefix string) string { return "vhive-" + prefix }

func filterRuleset(prefix string, allowForward bool) string {
	t, ifs := FilterTable(prefix), prefix+"-*"
	// allowForward (a Kubernetes node: the CRI's queue-proxy, in a pod
	// network, must reach its function) accepts connections forwarded into
	// the sandboxes and their replies; a sandbox still cannot open a
	// connection to the host, to another sandbox, or through the node.
	fwd := fmt.Sprintf("\t\tiifname %[1]q counter drop\n\t\toifname %[1]q counter drop\n", ifs)
	if allowForward {
		fwd = fmt.Sprintf("\t\tiifname %[1]q ct state established,related accept\n\t\tiifname %[1]q counter drop\n", ifs)
	}
	return fmt.Sprintf(`add table inet %[1]s
delete table inet %[1]s
table inet %[1]s {
	chain input {
		type filter hook input priority filter - 10; policy accept;
		iifname "%[2]s" ct state established,related accept
		iifname "%[2]s" counter drop
	}
	chain forward {
		type filter hook forward priority filter - 10; policy accept;
%[3]s	}
}
`, t, ifs, fwd)
}

func nft(ctx context.Context, script string) error {
	path, err := exec.LookPath("nft")
	if err != nil {
		for _, p := range []string{"/usr/sbin/nft", "/sbin/nft"} {
			if _, e := exec.LookPath(p); e == nil {
				path, err = p, nil
				break
			}
		}
	}
	if err != nil {
		return fmt.Errorf("netpool: host filter needs nft (apt-get install nftables): %w", err)
	}
	cmd := exec.CommandContext(ctx, path, "-f", "-")
	cmd.Stdin = strings.NewReader(script)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("netpool: nft: %w: %s", err, strings.TrimSpace(out.String()))
	}
	return nil
}

// installFilter (re)creates the pool's table atomically.
func installFilter(ctx context.Context, prefix string, allowForward bool) error {
	if err := nft(ctx, filterRuleset(prefix, allowForward)); err != nil {
		return fmt.Errorf("netpool: install host filter for %q: %w", prefix+"-*", err)
	}
	return nil
}

// removeFilter deletes the pool's table, if it exists.
func removeFilter(ctx context.Context, prefix string) error {
	t := FilterTable(prefix)
	err := nft(ctx, fmt.Sprintf("add table inet %[1]s\ndelete table inet %[1]s\n", t))
	var ee *exec.Error
	if errors.As(err, &ee) {
		return nil // no nft: no table either
	}
	return err
}
