package cluster

import (
	"context"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/testutil"
)

// testInstance is the instance of this package's root tests (make cluster
// uses 0, the cluster e2e 1).
const testInstance = 2

func TestLayoutIsDisjoint(t *testing.T) {
	seenIP := map[netip.Addr]string{}
	var prefixes []netip.Prefix
	var owners []string
	seenName := map[string]string{}
	seenPort := map[int]string{}
	lo, hi, err := ephemeralRange(portRangeFile)
	if err != nil {
		t.Fatal(err)
	}
	for inst := range MaxInstances {
		c := Config{Instance: inst, Nodes: MaxNodes, Dir: fmt.Sprintf("/var/lib/vc%d", inst)}
		who := fmt.Sprintf("instance %d", inst)
		if err := c.checkPortsOutside(lo, hi, portRangeFile); err != nil {
			t.Errorf("%s: %v", who, err)
		}
		for _, p := range []int{c.apiPort(), c.etcdPort(), c.etcdPeerPort(), c.registryPort(), c.schedulerPort(), c.cmPort()} {
			// Below Linux's default ephemeral range and the NodePort range,
			// whatever this machine's range is.
			if p < 1024 || p >= 30000 {
				t.Errorf("%s: port %d outside 1024-29999", who, p)
			}
			if o, ok := seenPort[p]; ok {
				t.Errorf("port %d of %s also used by %s", p, who, o)
			}
			seenPort[p] = who
		}
		prefixes = append(prefixes, c.bridgePrefix().Masked(), c.ServiceCIDR(), c.ClusterCIDR(), c.functionRange())
		owners = append(owners, who+" bridge", who+" services", who+" pods", who+" functions")
		for _, n := range c.nodes() {
			nw := fmt.Sprintf("%s node %s", who, n.Name)
			if !c.bridgePrefix().Contains(n.IP) || n.IP == c.HostIP() {
				t.Errorf("%s: IP %s not a host address of %s", nw, n.IP, c.bridgePrefix())
			}
			if o, ok := seenIP[n.IP]; ok {
				t.Errorf("%s: IP %s also used by %s", nw, n.IP, o)
			}
			seenIP[n.IP] = nw
			if !c.ClusterCIDR().Contains(n.PodCIDR.Addr()) || !c.functionRange().Contains(n.FunctionSubnet.Addr()) {
				t.Errorf("%s: pod CIDR %s / function subnet %s outside the instance's ranges", nw, n.PodCIDR, n.FunctionSubnet)
			}
			for _, name := range []string{n.Name, n.NetPrefix} {
				if o, ok := seenName[name]; ok {
					t.Errorf("%s: name %s also used by %s", nw, name, o)
				}
				seenName[name] = nw
			}
			if len(n.Name) > 15 {
				t.Errorf("%s: link name %q longer than 15 bytes", nw, n.Name)
			}
			if len(n.NetPrefix) > 8 {
				t.Errorf("%s: net prefix %q longer than the daemon's 8", nw, n.NetPrefix)
			}
			if !c.ownNodeName(n.Name) || !c.ownLink(n.Name) || !c.ownFuncNetns(n.NetPrefix+"-3") {
				t.Errorf("%s: own names not recognised", nw)
			}
			if len(n.CRISocket) > 100 || len(n.ContainerdSock) > 100 {
				t.Errorf("%s: socket path too long", nw)
			}
			for other := range MaxInstances {
				if other == inst {
					continue
				}
				o := Config{Instance: other}
				if o.ownNodeName(n.Name) || o.ownFuncNetns(n.NetPrefix+"-0") || o.ownLink(n.Name) {
					t.Errorf("%s: claimed by instance %d", nw, other)
				}
			}
		}
	}
	for i := range prefixes {
		for j := range prefixes {
			if i != j && prefixes[i].Overlaps(prefixes[j]) {
				t.Errorf("%s %s overlaps %s %s", owners[i], prefixes[i], owners[j], prefixes[j])
			}
		}
	}
	// Names the other suites own must never be swept as ours.
	c := Config{Instance: 0}
	for _, foreign := range []string{"vhcri0", "vhk8s0", "vhk8s-3", "vh-1", "vtd-1", "vhc0-n", "vhc0-nx", "vhc0f-1", "vhc0f1-", "cni0", "vhcbr1"} {
		if c.ownLink(foreign) || c.ownFuncNetns(foreign) || c.ownNodeName(foreign) {
			t.Errorf("instance 0 claims %q", foreign)
		}
	}
}

// TestPortsOutsideEphemeralRange: a host port inside the ephemeral range
// is refused with an error naming the port and the range; the range file
// is parsed strictly.
func TestPortsOutsideEphemeralRange(t *testing.T) {
	f := filepath.Join(t.TempDir(), "ip_local_port_range")
	c := Config{Instance: 3}
	for _, tc := range []struct {
		file    string
		wantErr string // "" when the ports pass
	}{
		{"32768\t60999\n", ""},
		{"1024 65535\n", fmt.Sprintf("host port %d (%s) lies in this machine's ephemeral port range 1024-65535 (%s)", c.apiPort(), APIServer, f)},
		{fmt.Sprintf("%d %d\n", c.cmPort(), c.cmPort()), fmt.Sprintf("host port %d (%s) lies in", c.cmPort(), ControllerManager)},
		{fmt.Sprintf("%d %d\n", c.cmPort()+1, 60999), ""},
		{"", "is not"},
		{"60999 32768", "is not"},
		{"x y", "is not"},
	} {
		if err := os.WriteFile(f, []byte(tc.file), 0o644); err != nil {
			t.Fatal(err)
		}
		lo, hi, err := ephemeralRange(f)
		if err == nil {
			err = c.checkPortsOutside(lo, hi, f)
		}
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("range %q: %v", tc.file, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("range %q: error %v, want it to contain %q", tc.file, err, tc.wantErr)
		}
	}
}

// TestPortsFree: a port of the instance held by a listener is reported
// with its number and component before anything is started.
func TestPortsFree(t *testing.T) {
	c := Config{Instance: testInstance}
	if err := c.checkPortsFree(); err != nil {
		t.Skipf("instance %d's ports are in use (a cluster runs?): %v", testInstance, err)
	}
	l, err := net.Listen("tcp", fmt.Sprintf("127.0.0.1:%d", c.registryPort()))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	err = c.checkPortsFree()
	if want := fmt.Sprintf("host port %d (%s) is in use (sockets: LISTEN", c.registryPort(), Registry); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("error %v, want it to contain %q", err, want)
	}
}

func TestConfigErrors(t *testing.T) {
	for _, tc := range []struct {
		cfg  Config
		want string
	}{
		{Config{Nodes: 0, Dir: "/tmp/x/y"}, "Nodes 0"},
		{Config{Nodes: MaxNodes + 1, Dir: "/tmp/x/y"}, "Nodes 16"},
		{Config{Nodes: 1, Dir: "/tmp/x/y", Instance: MaxInstances}, "Instance 4"},
		{Config{Nodes: 1, Dir: ""}, "Dir is empty"},
		{Config{Nodes: 1, Dir: "relative/dir"}, "clean absolute"},
		{Config{Nodes: 1, Dir: "/tmp/../etc"}, "clean absolute"},
		{Config{Nodes: 1, Dir: "/tmp"}, "too close to /"},
		{Config{Nodes: 1, Dir: "/tmp/" + strings.Repeat("d", 60)}, "longer than 60"},
		{Config{Nodes: 1, Dir: "/tmp/x/y", FunctionSandbox: "firecracker"}, `FunctionSandbox "firecracker"`},
		{Config{Nodes: 1, Dir: "/tmp/x/y", NodeMonitorGracePeriod: time.Second}, "NodeMonitorGracePeriod"},
	} {
		_, err := tc.cfg.withDefaults()
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("%+v: error %v, want it to name %q", tc.cfg, err, tc.want)
		}
	}
}

func TestPKI(t *testing.T) {
	c := Config{Nodes: 1, Instance: 1, Dir: t.TempDir()}
	p, err := loadOrMakePKI(c)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	read := func(name string) *x509.Certificate {
		b, err := os.ReadFile(filepath.Join(c.Dir, "pki", name))
		if err != nil {
			t.Fatal(err)
		}
		blk, _ := pem.Decode(b)
		crt, err := x509.ParseCertificate(blk.Bytes)
		if err != nil {
			t.Fatal(err)
		}
		return crt
	}
	srv := read("apiserver.crt")
	for _, host := range []string{c.HostIP().String(), "127.0.0.1", c.apiServiceIP().String(), "kubernetes.default.svc"} {
		if _, err := srv.Verify(x509.VerifyOptions{DNSName: host, Roots: pool}); err != nil {
			t.Errorf("serving cert for %s: %v", host, err)
		}
	}
	kc := filepath.Join(c.Dir, "admin.kubeconfig")
	if err := p.kubeconfig(kc, "admin", "admin", "system:masters"); err != nil {
		t.Fatal(err)
	}
	adm := read("admin.crt")
	if _, err := adm.Verify(x509.VerifyOptions{Roots: pool, KeyUsages: []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}}); err != nil {
		t.Errorf("admin cert: %v", err)
	}
	if adm.Subject.CommonName != "admin" || len(adm.Subject.Organization) != 1 || adm.Subject.Organization[0] != "system:masters" {
		t.Errorf("admin subject %v", adm.Subject)
	}
	b, _ := os.ReadFile(kc)
	if !strings.Contains(string(b), "server: "+c.APIServer()) || !strings.Contains(string(b), "client-key-data: ") {
		t.Errorf("kubeconfig:\n%s", b)
	}
	// A second run keeps the CA and what was issued.
	p2, err := loadOrMakePKI(c)
	if err != nil {
		t.Fatal(err)
	}
	if !p2.ca.Equal(p.ca) {
		t.Error("CA replaced on the second run")
	}
	if err := p2.kubeconfig(kc, "admin", "admin", "system:masters"); err != nil {
		t.Fatal(err)
	}
	if !read("admin.crt").Equal(adm) {
		t.Error("admin cert replaced on the second run")
	}
}

func TestNodeFiles(t *testing.T) {
	c := Config{Nodes: 2, Instance: 1, Dir: t.TempDir(), CNIBinDir: "/usr/lib/cni", NodeMonitorGracePeriod: 20 * time.Second, NodeMilliCPU: 700, NodeMemory: 1 << 30}
	m, err := readMachine()
	if err != nil {
		t.Fatal(err)
	}
	n := c.node(2)
	if err := writeNodeFiles(c, n); err != nil {
		t.Fatal(err)
	}
	var cni struct {
		Plugins []struct {
			Type string `json:"type"`
			IPAM struct {
				Ranges [][]struct {
					Subnet string `json:"subnet"`
				} `json:"ranges"`
				DataDir string `json:"dataDir"`
			} `json:"ipam"`
			IPMasq bool `json:"ipMasq"`
		} `json:"plugins"`
	}
	b, err := os.ReadFile(filepath.Join(n.Dir, "containerd", "cni", "10-vhive-cluster.conflist"))
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(b, &cni); err != nil {
		t.Fatalf("CNI config is not JSON: %v\n%s", err, b)
	}
	br := cni.Plugins[0]
	if br.Type != "bridge" || br.IPMasq || br.IPAM.Ranges[0][0].Subnet != n.PodCIDR.String() || !strings.HasPrefix(br.IPAM.DataDir, n.Dir+"/") {
		t.Errorf("bridge plugin config %+v", br)
	}
	ctd, _ := os.ReadFile(filepath.Join(n.Dir, "containerd", "config.toml"))
	for _, want := range []string{"restrict_oom_score_adj = true", "netns_mounts_under_state_dir = true", `address = "` + n.ContainerdSock + `"`} {
		if !strings.Contains(string(ctd), want) {
			t.Errorf("containerd config lacks %q", want)
		}
	}
	kl, _ := os.ReadFile(filepath.Join(n.Dir, "kubelet.yaml"))
	for _, want := range []string{"failCgroupV1: false", "cgroupDriver: cgroupfs", `cgroupRoot: "` + n.CgroupRoot + `"`,
		"containerRuntimeEndpoint: unix://" + n.CRISocket, "address: " + n.IP.String(), "nodeStatusUpdateFrequency: 5s", `"0%"`,
		fmt.Sprintf(`systemReserved: {cpu: "%dm", memory: "%d"}`, m.milliCPU-700, m.memory-(1<<30))} {
		if !strings.Contains(string(kl), want) {
			t.Errorf("kubelet config lacks %q:\n%s", want, kl)
		}
	}
	hosts, _ := os.ReadFile(filepath.Join(n.Dir, "containerd", "certs.d", "registry.k8s.io", "hosts.toml"))
	if !strings.Contains(string(hosts), `[host."http://`+c.Registry()+`"]`) {
		t.Errorf("registry.k8s.io mirror:\n%s", hosts)
	}
}

// TestPrepareAndDown checks that a started process runs inside the
// node's netns and pids cgroup from its first instruction, and that Down
// removes the namespaces, links, cgroups and routes of a prepared host.
func TestPrepareAndDown(t *testing.T) {
	testutil.RequiresRoot(t)
	cfg, err := (Config{Nodes: 2, Instance: testInstance, Dir: "/tmp/vhive-cluster-t2", Containerd: "/bin/true", Vhive: "/bin/true"}).withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	t.Cleanup(func() {
		if err := Down(context.Background(), cfg); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	if err := Down(ctx, cfg); err != nil {
		t.Fatalf("down before: %v", err)
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		t.Fatal(err)
	}
	s := &store{path: statePath(cfg.Dir)}
	if err := s.update(func(st *state) { *st = state{Instance: cfg.Instance, Nodes: cfg.Nodes, Sysctls: map[string]string{}} }); err != nil {
		t.Fatal(err)
	}
	c := &Cluster{cfg: cfg, st: s}
	if err := c.prepare(ctx); err != nil {
		t.Fatalf("prepare: %v", err)
	}
	n1, n2 := cfg.node(1), cfg.node(2)
	// Node 1 reaches node 2 and the host over the bridge.
	p, err := c.run("pinger", &n1, []string{"/bin/sh", "-c", fmt.Sprintf("busybox ping -c1 -W2 %s && busybox ping -c1 -W2 %s && sleep 60", n2.IP, cfg.HostIP())})
	if err != nil {
		t.Fatal(err)
	}
	got, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/net", p.PID))
	if err != nil {
		t.Fatal(err)
	}
	var st1 unix.Stat_t
	if err := unix.Stat(n1.NetnsPath, &st1); err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("net:[%d]", st1.Ino); got != want {
		t.Errorf("process netns %s, node netns %s", got, want)
	}
	cg, _ := os.ReadFile(fmt.Sprintf("/proc/%d/cgroup", p.PID))
	if !strings.Contains(string(cg), ":pids:"+n1.CgroupRoot+"/system\n") {
		t.Errorf("process cgroups:\n%s", cg)
	}
	if err := waitFor(ctx, "ping", 20*time.Second, proc{}, func() error {
		if strings.Count(logTail(p.Log, 50), " 0% packet loss") == 2 {
			return nil
		}
		return fmt.Errorf("log: %s", logTail(p.Log, 5))
	}); err != nil {
		t.Error(err)
	}
	if out, err := exec.Command("ip", "route", "get", n2.PodCIDR.Addr().Next().String()).CombinedOutput(); err != nil || !strings.Contains(string(out), "via "+n2.IP.String()) {
		t.Errorf("host route to node 2's pods: %s %v", out, err)
	}
	left, err := Leftovers(cfg)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"netns " + n1.Name, "link " + cfg.BridgeName(), "link " + n2.Name, "cgroup /sys/fs/cgroup/pids" + n1.CgroupRoot, "route " + n2.PodCIDR.String()} {
		if !containsPrefix(left, want) {
			t.Errorf("Leftovers before down lacks %q: %v", want, left)
		}
	}
	if err := Down(ctx, cfg); err != nil {
		t.Fatalf("down: %v", err)
	}
	if left, err := Leftovers(cfg); err != nil || len(left) > 0 {
		t.Errorf("after down: %v %v", left, err)
	}
	if p.alive() {
		t.Errorf("pid %d alive after down", p.PID)
	}
}

func containsPrefix(list []string, p string) bool {
	for _, s := range list {
		if strings.HasPrefix(s, p) {
			return true
		}
	}
	return false
}

// TestInNetnsSysctl: a /proc/sys/net write from inNetns lands in the node's
// namespace, never on the host (Up enables forwarding this way).
func TestInNetnsSysctl(t *testing.T) {
	testutil.RequiresRoot(t)
	c := Config{Instance: testInstance}
	name := c.nodePrefix() + "14"
	if err := makeNetns(name); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := deleteNetns(name); err != nil {
			t.Error(err)
		}
	})
	const f = "/proc/sys/net/ipv4/ip_default_ttl"
	host, err := os.ReadFile(f)
	if err != nil {
		t.Fatal(err)
	}
	want := "61"
	if strings.TrimSpace(string(host)) == want {
		want = "62"
	}
	if err := inNetns(filepath.Join(netnsDir, name), func() error { return os.WriteFile(f, []byte(want), 0o644) }); err != nil {
		t.Fatal(err)
	}
	var got []byte
	if err := inNetns(filepath.Join(netnsDir, name), func() (err error) { got, err = os.ReadFile(f); return err }); err != nil {
		t.Fatal(err)
	}
	if strings.TrimSpace(string(got)) != want {
		t.Errorf("in the netns: %s = %q, want %s", f, got, want)
	}
	if now, _ := os.ReadFile(f); string(now) != string(host) {
		t.Errorf("host %s changed from %q to %q", f, host, now)
	}
}
