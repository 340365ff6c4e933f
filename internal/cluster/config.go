package cluster

import (
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

const (
	// MaxNodes is the largest Config.Nodes.
	MaxNodes = 15
	// MaxInstances bounds Config.Instance: that many clusters can run side
	// by side (an interactive one and tests).
	MaxInstances = 4
	// DefaultDir is the state directory of `vhive cluster up`.
	DefaultDir = "/var/lib/vhive-cluster"
)

// Config describes a cluster. Zero fields get the defaults documented on
// each; Up validates the rest.
type Config struct {
	// Nodes is the number of worker nodes, 1..MaxNodes.
	Nodes int
	// Dir holds everything the cluster writes (absolute; created).
	Dir string
	// Instance selects names, addresses and ports (package doc), so that
	// clusters with different instances never touch each other.
	Instance int
	// BinDir holds kube-apiserver, kube-scheduler, kube-controller-manager,
	// kubelet, kube-proxy, kubectl, vhive-etcd and vhive-critest-registry.
	// Default $VHIVE_CACHE/bin (/var/cache/vhive/bin).
	BinDir string
	// Vhive is the vhive binary run as each node's daemon. Default: this
	// executable.
	Vhive string
	// Runsc for the daemons' gVisor sandboxes. Default BinDir/runsc.
	Runsc string
	// Containerd binary. Default: containerd from PATH.
	Containerd string
	// CNIBinDir holds the CNI plugins (bridge, host-local, loopback,
	// portmap). Default /usr/lib/cni.
	CNIBinDir string
	// FunctionSandbox runs Knative user-containers: "gvisor" (default),
	// "runc" or "microvm" (QEMU; the nodes need `make microvm`'s assets).
	FunctionSandbox string
	// NodeMonitorGracePeriod is how long a node may miss status updates
	// before the controller-manager marks it NotReady (default 20s;
	// kubelets report every quarter of it).
	NodeMonitorGracePeriod time.Duration
	// ReadyTimeout bounds the wait for every node to be Ready (default 4m).
	ReadyTimeout time.Duration
	// NodeMilliCPU is each node's allocatable CPU in millicores (what the
	// scheduler places pods by). Default: the machine's CPUs divided among
	// the nodes. Kubelet reports it through systemReserved (package doc).
	NodeMilliCPU int64
	// NodeMemory is each node's allocatable memory in bytes. Default: the
	// machine's memory (less pre-allocated huge pages) divided among the
	// nodes, rounded down to a MiB.
	NodeMemory int64
	// KeepLogs keeps Dir/logs after Down (the rest of Dir is removed).
	KeepLogs bool
	Logger   *slog.Logger
}

func (c Config) withDefaults() (Config, error) {
	if c.Nodes < 1 || c.Nodes > MaxNodes {
		return c, fmt.Errorf("cluster: Nodes %d: want 1..%d", c.Nodes, MaxNodes)
	}
	if c.Instance < 0 || c.Instance >= MaxInstances {
		return c, fmt.Errorf("cluster: Instance %d: want 0..%d", c.Instance, MaxInstances-1)
	}
	if err := c.checkDir(); err != nil {
		return c, err
	}
	if c.BinDir == "" {
		cache := os.Getenv("VHIVE_CACHE")
		if cache == "" {
			cache = "/var/cache/vhive"
		}
		c.BinDir = filepath.Join(cache, "bin")
	}
	if c.Vhive == "" {
		exe, err := os.Executable()
		if err != nil {
			return c, fmt.Errorf("cluster: Vhive not set and this executable is unknown: %w", err)
		}
		c.Vhive = exe
	}
	if c.Runsc == "" {
		c.Runsc = filepath.Join(c.BinDir, "runsc")
	}
	if c.Containerd == "" {
		p, err := exec.LookPath("containerd")
		if err != nil {
			return c, fmt.Errorf("cluster: containerd not found (apt-get install containerd): %w", err)
		}
		c.Containerd = p
	}
	if c.CNIBinDir == "" {
		c.CNIBinDir = "/usr/lib/cni"
	}
	switch c.FunctionSandbox {
	case "":
		c.FunctionSandbox = "gvisor"
	case "gvisor", "runc", "microvm":
	default:
		return c, fmt.Errorf("cluster: FunctionSandbox %q: want gvisor, runc or microvm", c.FunctionSandbox)
	}
	if c.NodeMonitorGracePeriod == 0 {
		c.NodeMonitorGracePeriod = 20 * time.Second
	}
	if c.NodeMonitorGracePeriod < 4*time.Second {
		return c, fmt.Errorf("cluster: NodeMonitorGracePeriod %v: want at least 4s", c.NodeMonitorGracePeriod)
	}
	if c.ReadyTimeout == 0 {
		c.ReadyTimeout = 4 * time.Minute
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	m, err := readMachine()
	if err != nil {
		return c, err
	}
	return c.nodeResources(m)
}

// checkDir validates Dir: absolute, clean, and not a directory whose removal
// would hurt (Down removes it).
func (c Config) checkDir() error {
	if c.Dir == "" {
		return errors.New("cluster: Dir is empty")
	}
	if !filepath.IsAbs(c.Dir) || filepath.Clean(c.Dir) != c.Dir {
		return fmt.Errorf("cluster: Dir %q: want a clean absolute path", c.Dir)
	}
	if strings.Count(c.Dir, "/") < 2 {
		return fmt.Errorf("cluster: Dir %q: too close to / (Down removes it)", c.Dir)
	}
	// Unix socket paths (108 bytes) are built under Dir.
	if len(c.Dir) > 60 {
		return fmt.Errorf("cluster: Dir %q: longer than 60 bytes (socket paths under it would not fit)", c.Dir)
	}
	return nil
}

// binaries the cluster needs from BinDir.
var binaries = []string{"vhive-etcd", "kube-apiserver", "kube-scheduler", "kube-controller-manager",
	"kubelet", "kube-proxy", "vhive-critest-registry"}

func (c Config) checkBinaries() error {
	var missing []string
	for _, b := range binaries {
		if _, err := os.Stat(filepath.Join(c.BinDir, b)); err != nil {
			missing = append(missing, filepath.Join(c.BinDir, b))
		}
	}
	for _, p := range []string{c.Vhive, c.Containerd, filepath.Join(c.CNIBinDir, "bridge"), filepath.Join(c.CNIBinDir, "host-local")} {
		if _, err := os.Stat(p); err != nil {
			missing = append(missing, p)
		}
	}
	if c.FunctionSandbox == "gvisor" {
		if _, err := os.Stat(c.Runsc); err != nil {
			missing = append(missing, c.Runsc)
		}
	}
	if _, err := exec.LookPath("iptables-restore"); err != nil {
		missing = append(missing, "iptables-restore (apt-get install iptables)")
	}
	if len(missing) > 0 {
		return fmt.Errorf("cluster: missing %s (make k8s-tools cluster-tools runsc; apt packages containerd containernetworking-plugins iptables)", strings.Join(missing, ", "))
	}
	return nil
}

func (c Config) bin(name string) string { return filepath.Join(c.BinDir, name) }

// Layout of instance I: addresses, names and ports (package doc).

// portBase is the first host port of instance 0; instance I uses
// portBase+100I + 1..6. Outside Linux's default ephemeral range
// (32768-60999), from which connect() picks the local port of every
// outgoing connection on the machine: a port in there may be held, or sit
// in TIME_WAIT for a minute, as the local end of anyone's connection to
// anything (the apiserver's own to etcd, a test's to a 127.0.0.1 server),
// and the component's bind then fails. Below Kubernetes' NodePort range
// (30000-32767) and clear of the ports /etc/services names.
const portBase = 29000

func (c Config) base() int { return portBase + 100*c.Instance }

// APIPort and the other host ports.
func (c Config) apiPort() int       { return c.base() + 1 }
func (c Config) etcdPort() int      { return c.base() + 2 }
func (c Config) etcdPeerPort() int  { return c.base() + 3 }
func (c Config) registryPort() int  { return c.base() + 4 }
func (c Config) schedulerPort() int { return c.base() + 5 }
func (c Config) cmPort() int        { return c.base() + 6 }

// hostPort is one port the control plane binds on the host.
type hostPort struct {
	port int
	what string
}

func (c Config) hostPorts() []hostPort {
	return []hostPort{{c.apiPort(), APIServer}, {c.etcdPort(), Etcd}, {c.etcdPeerPort(), Etcd + " peer"},
		{c.registryPort(), Registry}, {c.schedulerPort(), Scheduler}, {c.cmPort(), ControllerManager}}
}

// portRangeFile holds the machine's ephemeral port range (of the host's
// network namespace, where the control plane listens).
const portRangeFile = "/proc/sys/net/ipv4/ip_local_port_range"

// ephemeralRange reads the ephemeral port range "lo hi" from path.
func ephemeralRange(path string) (lo, hi int, err error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return 0, 0, fmt.Errorf("cluster: ephemeral port range: %w", err)
	}
	if _, err := fmt.Sscan(string(b), &lo, &hi); err != nil || lo < 1 || hi < lo || hi > 65535 {
		return 0, 0, fmt.Errorf("cluster: ephemeral port range %s: %q is not \"low high\"", path, strings.TrimSpace(string(b)))
	}
	return lo, hi, nil
}

// checkPortsOutside refuses any host port of the instance inside the
// ephemeral range lo..hi (read from rangeFile): there any outgoing
// connection may hold it, so a bind would fail at random.
func (c Config) checkPortsOutside(lo, hi int, rangeFile string) error {
	for _, p := range c.hostPorts() {
		if p.port >= lo && p.port <= hi {
			return fmt.Errorf("cluster: host port %d (%s) lies in this machine's ephemeral port range %d-%d (%s), where any outgoing connection may hold it; the cluster's ports are %d+100*instance+1..6",
				p.port, p.what, lo, hi, rangeFile, portBase)
		}
	}
	return nil
}

// checkPortsFree fails, naming the port and what holds it, when a host
// port of the instance cannot be bound: on 0.0.0.0 with SO_REUSEADDR as
// the components bind (so a TIME_WAIT of their own accepted connections
// does not count), which conflicts with any listener or connection on the
// port on any address.
func (c Config) checkPortsFree() error {
	for _, p := range c.hostPorts() {
		l, err := net.Listen("tcp4", fmt.Sprintf("0.0.0.0:%d", p.port))
		if err != nil {
			return fmt.Errorf("cluster: host port %d (%s) is in use%s: %w", p.port, p.what, socketsOnPort(p.port), err)
		}
		l.Close()
	}
	return nil
}

// socketsOnPort describes the TCP sockets whose local port is port, from
// /proc/net/tcp{,6}, for an error message.
func socketsOnPort(port int) string {
	states := map[string]string{"01": "ESTABLISHED", "06": "TIME_WAIT", "0A": "LISTEN", "08": "CLOSE_WAIT"}
	var out []string
	for _, f := range []string{"/proc/net/tcp", "/proc/net/tcp6"} {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n")[1:] {
			fs := strings.Fields(line)
			if len(fs) < 10 {
				continue
			}
			_, hexPort, _ := strings.Cut(fs[1], ":")
			if pp, err := strconv.ParseUint(hexPort, 16, 16); err != nil || int(pp) != port {
				continue
			}
			st := states[fs[3]]
			if st == "" {
				st = "state " + fs[3]
			}
			out = append(out, fmt.Sprintf("%s to %s (inode %s)", st, fs[2], fs[9]))
		}
	}
	if len(out) == 0 {
		return ""
	}
	return " (sockets: " + strings.Join(out, "; ") + ")"
}

// BridgeName is the host bridge of the instance.
func (c Config) BridgeName() string { return fmt.Sprintf("vhcbr%d", c.Instance) }

// HostIP is the host's address on the bridge: the apiserver and registry
// listen there.
func (c Config) HostIP() netip.Addr {
	return netip.AddrFrom4([4]byte{10, 182, 0, byte(64*c.Instance + 1)})
}

func (c Config) bridgePrefix() netip.Prefix { return netip.PrefixFrom(c.HostIP(), 26) }

// ServiceCIDR is the cluster's service range.
func (c Config) ServiceCIDR() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 184, 0, byte(64 * c.Instance)}), 26)
}

// ClusterCIDR holds every node's pod CIDR.
func (c Config) ClusterCIDR() netip.Prefix {
	return netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 183, byte(16 * c.Instance), 0}), 20)
}

func (c Config) apiServiceIP() netip.Addr { return c.ServiceCIDR().Addr().Next() }

// APIServer is the apiserver's URL.
func (c Config) APIServer() string { return fmt.Sprintf("https://%s:%d", c.HostIP(), c.apiPort()) }

// Registry is the host:port of the image registry the nodes pull from.
func (c Config) Registry() string { return fmt.Sprintf("%s:%d", c.HostIP(), c.registryPort()) }

// controlCgroup is the pids-hierarchy cgroup (relative to the hierarchy)
// the control plane runs in, so that Down finds a control-plane process
// even if Up was killed between starting and recording it (the registry's
// command line does not name Dir).
func (c Config) controlCgroup() string { return fmt.Sprintf("/vhc%d-cp", c.Instance) }

// nodePrefix starts every node name of the instance.
func (c Config) nodePrefix() string { return fmt.Sprintf("vhc%d-n", c.Instance) }

// funcPrefix starts the net prefix of every node daemon of the instance.
func (c Config) funcPrefix() string { return fmt.Sprintf("vhc%df", c.Instance) }

// Node is one worker node.
type Node struct {
	Index          int          // 1..Nodes
	Name           string       // node name, netns name and host veth name: vhcI-ni
	IP             netip.Addr   // on the host bridge
	PodCIDR        netip.Prefix // the CNI bridge's range
	FunctionSubnet netip.Prefix // the vhive daemon's netpool subnet
	NetPrefix      string       // the vhive daemon's --net-prefix
	Dir            string       // Dir/n<i>
	CRISocket      string       // vhive's CRI (kubelet's runtime endpoint)
	ContainerdSock string       // the node's containerd
	ControlSocket  string       // the vhive daemon's control API
	CgroupRoot     string       // kubelet's --cgroup-root, e.g. /vhc0-n1
	NetnsPath      string       // /var/run/netns/<Name>
}

// node returns the layout of node i (1-based).
func (c Config) node(i int) Node {
	d := filepath.Join(c.Dir, fmt.Sprintf("n%d", i))
	name := fmt.Sprintf("%s%d", c.nodePrefix(), i)
	return Node{
		Index:          i,
		Name:           name,
		IP:             netip.AddrFrom4([4]byte{10, 182, 0, byte(64*c.Instance + 1 + i)}),
		PodCIDR:        netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 183, byte(16*c.Instance + i), 0}), 24),
		FunctionSubnet: netip.PrefixFrom(netip.AddrFrom4([4]byte{10, 185, byte(16*c.Instance + i), 0}), 24),
		NetPrefix:      fmt.Sprintf("%s%d", c.funcPrefix(), i),
		Dir:            d,
		CRISocket:      filepath.Join(d, "vhive", "cri.sock"),
		ContainerdSock: filepath.Join(d, "containerd", "containerd.sock"),
		ControlSocket:  filepath.Join(d, "vhive", "control.sock"),
		CgroupRoot:     "/" + name,
		NetnsPath:      filepath.Join(netnsDir, name),
	}
}

func (c Config) nodes() []Node {
	out := make([]Node, c.Nodes)
	for i := range out {
		out[i] = c.node(i + 1)
	}
	return out
}

const netnsDir = "/var/run/netns"
