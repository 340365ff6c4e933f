package cluster

import (
	"fmt"
	"path/filepath"
	"strings"
	"time"
)

// mirroredHosts are the registries whose images the nodes pull from the
// host registry instead (the machine reaches none of them).
var mirroredHosts = []string{"registry.k8s.io", "k8s.gcr.io", "gcr.io", "docker.io", "ghcr.io", "quay.io"}

// writeNodeFiles writes node n's containerd config, CNI config, registry
// hosts, kubelet config and kube-proxy config.
func writeNodeFiles(c Config, n Node) error {
	m, err := readMachine()
	if err != nil {
		return err
	}
	cd := filepath.Join(n.Dir, "containerd")
	files := map[string]string{
		filepath.Join(cd, "config.toml"):                         containerdConfig(c, n),
		filepath.Join(cd, "cni", "10-vhive-cluster.conflist"):    cniConfig(n),
		filepath.Join(cd, "certs.d", c.Registry(), "hosts.toml"): registryHosts(c),
		filepath.Join(n.Dir, "kubelet.yaml"):                     kubeletConfig(c, n, m),
		filepath.Join(n.Dir, "kube-proxy.yaml"):                  kubeProxyConfig(c, n),
	}
	for _, h := range mirroredHosts {
		files[filepath.Join(cd, "certs.d", h, "hosts.toml")] = fmt.Sprintf(
			"server = \"https://%s\"\n[host.\"http://%s\"]\n  capabilities = [\"pull\", \"resolve\"]\n", h, c.Registry())
	}
	for p, body := range files {
		if err := writeFile(p, []byte(body), 0o644); err != nil {
			return err
		}
	}
	return nil
}

// containerdConfig: own root, state, socket and CNI; restrict_oom_score_adj
// since lowering oom_score_adj is refused here; pod netns mounted under its
// state dir (not /var/run/netns) so they are found by path after a crash.
func containerdConfig(c Config, n Node) string {
	cd := filepath.Join(n.Dir, "containerd")
	return fmt.Sprintf(`version = 2
root = %[1]q
state = %[2]q
[grpc]
  address = %[3]q
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = %[4]q
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  restrict_oom_score_adj = true
  enable_selinux = false
  netns_mounts_under_state_dir = true
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = %[5]q
    conf_dir = %[6]q
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = %[7]q
`, filepath.Join(cd, "root"), filepath.Join(cd, "state"), n.ContainerdSock, filepath.Join(cd, "opt"),
		c.CNIBinDir, filepath.Join(cd, "cni"), filepath.Join(cd, "certs.d"))
}

// cniConfig: the bridge plugin on cni0 inside the node's netns, host-local
// addresses from the node's pod CIDR, no masquerading.
func cniConfig(n Node) string {
	return fmt.Sprintf(`{
  "cniVersion": "0.4.0",
  "name": "vhive-cluster",
  "plugins": [
    {"type": "bridge", "bridge": "cni0", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": %q}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": %q}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
`, n.PodCIDR.String(), filepath.Join(n.Dir, "cni-ipam"))
}

func dur(d time.Duration) string { return d.String() }

// kubeletConfig: this machine needs failCgroupV1 false, the cgroupfs driver
// and swap allowed; eviction and image GC off (the disk is shared).
//
// Every kubelet sees the whole machine as its capacity; systemReserved
// holds back the rest of the machine so that the node's allocatable is its
// configured share, and enforceNodeAllocatable (default "pods") makes
// kubelet cap its pods' cgroup (kubepods) at that share.
func kubeletConfig(c Config, n Node, m machine) string {
	update := c.NodeMonitorGracePeriod / 4
	resCPU, resMem := c.systemReserved(m)
	return fmt.Sprintf(`apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
cgroupRoot: %q
failSwapOn: false
containerRuntimeEndpoint: unix://%s
address: %s
port: 10250
readOnlyPort: 0
healthzBindAddress: 127.0.0.1
healthzPort: 10248
podLogsDir: %q
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}, x509: {clientCAFile: %q}}
authorization: {mode: AlwaysAllow}
nodeStatusUpdateFrequency: %s
nodeStatusReportFrequency: %s
evictionHard: {memory.available: "0%%", nodefs.available: "0%%", imagefs.available: "0%%", nodefs.inodesFree: "0%%"}
imageGCHighThresholdPercent: 100
localStorageCapacityIsolation: false
resolvConf: /etc/resolv.conf
serializeImagePulls: false
systemReserved: {cpu: "%dm", memory: "%d"}
`, n.CgroupRoot, n.CRISocket, n.IP, filepath.Join(n.Dir, "pods"), filepath.Join(c.Dir, "pki", "ca.crt"),
		dur(update), dur(update), resCPU, resMem)
}

// kubeProxyConfig: iptables mode in the node's netns; conntrack sysctls
// left alone (they are host-wide or refused outside the initial netns).
func kubeProxyConfig(c Config, n Node) string {
	return fmt.Sprintf(`apiVersion: kubeproxy.config.k8s.io/v1alpha1
kind: KubeProxyConfiguration
clientConnection: {kubeconfig: %q}
hostnameOverride: %s
bindAddress: %s
healthzBindAddress: "%s:10256"
metricsBindAddress: "127.0.0.1:10249"
mode: iptables
clusterCIDR: %s
oomScoreAdj: 0
conntrack: {maxPerCore: 0, min: 0, tcpEstablishedTimeout: 0s, tcpCloseWaitTimeout: 0s}
`, filepath.Join(n.Dir, "kube-proxy.kubeconfig"), n.Name, n.IP, n.IP, c.ClusterCIDR())
}

// controlPlaneArgs returns the command lines of the control plane.
func controlPlaneArgs(c Config) map[string][]string {
	pk := func(f string) string { return filepath.Join(c.Dir, "pki", f) }
	etcd := fmt.Sprintf("http://127.0.0.1:%d", c.etcdPort())
	grace := c.NodeMonitorGracePeriod
	return map[string][]string{
		Registry: {c.bin("vhive-critest-registry"), "-addr", c.Registry()},
		Etcd: {c.bin("vhive-etcd"), "-data-dir", filepath.Join(c.Dir, "etcd"), "-listen-client", etcd,
			"-listen-peer", fmt.Sprintf("http://127.0.0.1:%d", c.etcdPeerPort())},
		APIServer: {c.bin("kube-apiserver"), "--etcd-servers", etcd,
			"--bind-address", c.HostIP().String(), "--secure-port", fmt.Sprint(c.apiPort()),
			"--advertise-address", c.HostIP().String(),
			"--service-cluster-ip-range", c.ServiceCIDR().String(),
			"--tls-cert-file", pk("apiserver.crt"), "--tls-private-key-file", pk("apiserver.key"),
			"--client-ca-file", pk("ca.crt"),
			"--kubelet-client-certificate", pk("apiserver-kubelet-client.crt"), "--kubelet-client-key", pk("apiserver-kubelet-client.key"),
			"--service-account-issuer", "https://kubernetes.default.svc",
			"--service-account-key-file", pk("sa.pub"), "--service-account-signing-key-file", pk("sa.key"),
			"--authorization-mode", "AlwaysAllow",
			"--disable-admission-plugins", "ServiceAccount",
			"--profiling=false"},
		Scheduler: {c.bin("kube-scheduler"), "--kubeconfig", filepath.Join(c.Dir, "scheduler.kubeconfig"),
			"--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(c.schedulerPort())},
		ControllerManager: {c.bin("kube-controller-manager"), "--kubeconfig", filepath.Join(c.Dir, "controller-manager.kubeconfig"),
			"--leader-elect=false", "--bind-address", "127.0.0.1", "--secure-port", fmt.Sprint(c.cmPort()),
			"--service-account-private-key-file", pk("sa.key"), "--root-ca-file", pk("ca.crt"),
			"--cluster-signing-cert-file", pk("ca.crt"), "--cluster-signing-key-file", pk("ca.key"),
			"--service-cluster-ip-range", c.ServiceCIDR().String(),
			"--node-monitor-grace-period", dur(grace), "--node-monitor-period", dur(grace / 8),
			"--controllers", "*"},
	}
}

// nodeArgs returns the command lines of node n's components.
func nodeArgs(c Config, n Node) map[string][]string {
	cd := filepath.Join(n.Dir, "containerd")
	daemon := []string{c.Vhive, "daemon", "--socket", n.ControlSocket, "--state-dir", filepath.Join(n.Dir, "vhive"),
		"--gateway", "off", "--sandboxes", c.FunctionSandbox, "--net-prefix", n.NetPrefix,
		"--subnet", n.FunctionSubnet.String(), "--net-pool-size", "2",
		"--cri-socket", n.CRISocket, "--cri-containerd", n.ContainerdSock,
		"--cri-function-sandbox", c.FunctionSandbox, "--cri-mirror", "*=" + c.Registry()}
	if c.FunctionSandbox == "gvisor" {
		daemon = append(daemon, "--runsc", c.Runsc)
	}
	return map[string][]string{
		Containerd:  {c.Containerd, "--config", filepath.Join(cd, "config.toml")},
		VhiveDaemon: daemon,
		Kubelet: {c.bin("kubelet"), "--kubeconfig", filepath.Join(n.Dir, "kubelet.kubeconfig"),
			"--config", filepath.Join(n.Dir, "kubelet.yaml"), "--root-dir", filepath.Join(n.Dir, "kubelet"),
			"--hostname-override", n.Name, "--node-ip", n.IP.String(),
			"--node-labels", strings.Join([]string{"vhive.dev/cluster=" + fmt.Sprint(c.Instance), "vhive.dev/node=" + fmt.Sprint(n.Index)}, ",")},
		KubeProxy: {c.bin("kube-proxy"), "--config", filepath.Join(n.Dir, "kube-proxy.yaml")},
	}
}

// nodeComponents in start order (stopped in reverse).
var nodeComponents = []string{Containerd, VhiveDaemon, Kubelet, KubeProxy}

// controlComponents in start order (stopped in reverse).
var controlComponents = []string{Registry, Etcd, APIServer, Scheduler, ControllerManager}
