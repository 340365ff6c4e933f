// Package cluster brings up a multi-node Kubernetes cluster on one machine
// with vhive as every worker's container runtime, and tears it down without
// leaving anything behind.
//
// # Layout
//
// The control plane runs on the host: an embedded etcd (vhive-etcd),
// kube-apiserver, kube-scheduler, kube-controller-manager, and the image
// registry the nodes pull from (the go-containerregistry registry of
// scripts/critest/registry). Each worker node i (1..Nodes) is a network
// namespace with its own address on a host bridge and its own
//
//	containerd          own root, state, socket, CNI config (bridge plugin,
//	                    pod CIDR of the node), registry mirrors → the host registry
//	vhive daemon        --cri-socket in front of that containerd; own state
//	                    dir, net prefix and function-sandbox subnet
//	kubelet             own root dir, pod log dir, cgroup root, node name, node IP
//	kube-proxy          iptables mode, inside the node's netns
//
// For instance I (Config.Instance, 0..MaxInstances-1; `make cluster` uses 0)
// and node i:
//
//	host bridge         vhcbrI, 10.182.0.(64I+1)/26
//	node netns/veth     vhcI-ni (netns /var/run/netns/vhcI-ni; host veth of the same name)
//	node IP             10.182.0.(64I+1+i)
//	pod CIDR            10.183.(16I+i).0/24 (CNI bridge cni0 inside the netns)
//	function subnet     10.185.(16I+i).0/24, net prefix vhcIfi (the daemon's netpool)
//	service CIDR        10.184.0.(64I)/26
//	ports (host)        29000+100I + 1 apiserver, 2 etcd, 3 etcd peer,
//	                    4 registry, 5 scheduler, 6 controller-manager
//	control cgroup      /vhcI-cp in the pids hierarchy (the control plane)
//	cgroup root         /vhcI-ni in every cgroup hierarchy; the node's own
//	                    daemons run in /vhcI-ni/system (pids hierarchy)
//
// # Node resources
//
// Every kubelet sees the whole machine as its capacity. Each node's
// allocatable CPU and memory is Config.NodeMilliCPU / NodeMemory (default:
// the machine's CPUs and memory, less pre-allocated huge pages, divided
// among the nodes): the kubelet config's systemReserved holds back the rest
// of the machine, since kubelet computes allocatable = capacity -
// systemReserved - kubeReserved (none) - evictionHard (0% here), and its
// default enforceNodeAllocatable "pods" also caps the node's kubepods
// cgroup at that share. systemReserved rather than kubeReserved only because
// the rest of the machine is the other nodes and the host, not this
// kubelet; neither is enforced on its own cgroup. Capacity is read as
// kubelet's cAdvisor does: online CPUs (/sys/devices/system/cpu/online),
// /proc/meminfo MemTotal. The vhive daemons' function sandboxes run in the
// daemons' own cgroups, outside kubepods, so the cap does not bound them.
//
// Routes: inside node i, the other nodes' pod CIDRs and function subnets go
// via their node IPs and the default route via the host bridge address; on
// the host, every node's pod CIDR and function subnet go via its node IP and
// the service CIDR via node 1 (whose kube-proxy forwards it). Forwarding is
// enabled inside the node namespaces only; the host's ip_forward is not
// touched, and there is no NAT to anything outside these ranges.
//
// # API
//
//	c, err := cluster.Up(ctx, cluster.Config{Nodes: 3, Dir: "/var/lib/vhive-cluster"})
//	c.Kubeconfig()            // admin kubeconfig (client certificate, CA-verified)
//	c.Nodes()                 // []Node: Name, IP, PodCIDR, CRISocket, ...
//	c.Registry()              // "10.182.0.1:29004": push images here, nodes pull them
//	c.KillNode(ctx, "vhc0-n2")    // SIGKILL the node's kubelet and vhive daemon
//	c.RestartNode(ctx, "vhc0-n2") // start them again (the daemon cleans up after its predecessor)
//	c.Kill(ctx, "vhc0-n2", cluster.Containerd) // any one component
//	c.Status()                // which recorded processes are alive
//	err = c.Down(ctx)         // same as cluster.Down(ctx, cfg)
//
//	cluster.Load(cfg)         // the running cluster recorded in cfg.Dir
//	cluster.Down(ctx, cfg)    // remove everything, also after a crash of any part
//	cluster.Leftovers(cfg)    // what of this instance still exists (tests assert empty)
//
// The host ports lie below the ephemeral port range (32768-60999 by
// default): a port in it may be held by any outgoing connection on the
// machine, or by one in TIME_WAIT, as its local end. Up refuses to start
// when a host port lies inside the range read from
// /proc/sys/net/ipv4/ip_local_port_range, and, once an earlier cluster in
// Dir is torn down, when one cannot be bound (naming the sockets on it).
//
// Up is idempotent: when cfg.Dir records a cluster of the same size whose
// processes are all alive, Up returns it; a recorded cluster with dead parts
// is torn down and brought up again; one of another size is an error.
// A bring-up that fails half-way tears down what it made.
//
// # State
//
// Dir/state.json records, as they are made, the bridge, namespaces, veths,
// host routes, cgroups, the original values of the kernel sysctls kubelet
// changes, and every process (pid and start time, so a reused pid is never
// signalled; a process is gone only when its last thread is). Down works
// from that record and then sweeps by this instance's own names and paths:
// processes in the node cgroups, the control cgroup or whose command line
// names Dir, mounts under Dir, namespaces and links named
// vhcI-n*, vhcIf*-*, vhcbrI, the oci backend's cgroups of each node daemon,
// kubelet's /var/log/containers links into Dir.
//
//	Dir/state.json  Dir/lock  Dir/pki/  Dir/admin.kubeconfig  Dir/logs/*.log
//	Dir/etcd/       Dir/nI/{containerd,vhive,kubelet,pods,cni}/
package cluster
