package cluster

import "fmt"

// registryHosts is containerd's hosts.toml for the cluster registry: plain
// HTTP. containerd 1.6 still dials https when only "server" is set; the
// host entry makes it use http (measured: "server gave HTTP response to
// HTTPS client" without it).
func registryHosts(c Config) string {
	return fmt.Sprintf("server = \"http://%[1]s\"\n[host.\"http://%[1]s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", c.Registry())
}
