package cluster

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// Cluster is a running cluster recorded in Config.Dir.
type Cluster struct {
	cfg Config
	st  *store
}

// kubeletSysctls are the host sysctls kubelet sets at start
// (vm.overcommit_memory, kernel.panic, ...); Down restores their values from
// before the cluster.
var kubeletSysctls = []string{"vm/overcommit_memory", "vm/panic_on_oom", "kernel/panic", "kernel/panic_on_oops",
	"kernel/keys/root_maxkeys", "kernel/keys/root_maxbytes"}

// Up brings up the cluster cfg describes, or returns the one already
// running in cfg.Dir (package doc). It returns once every node is Ready.
func Up(ctx context.Context, cfg Config) (_ *Cluster, retErr error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	if os.Geteuid() != 0 {
		return nil, errors.New("cluster: needs root (network namespaces, cgroups, mounts)")
	}
	if err := cfg.checkBinaries(); err != nil {
		return nil, err
	}
	lo, hi, err := ephemeralRange(portRangeFile)
	if err != nil {
		return nil, err
	}
	if err := cfg.checkPortsOutside(lo, hi, portRangeFile); err != nil {
		return nil, err
	}
	if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	unlock, err := lockDir(ctx, cfg.Dir)
	if err != nil {
		return nil, err
	}
	defer unlock()
	log := cfg.Logger.With("component", "cluster", "instance", cfg.Instance)

	s, ok, err := loadStore(cfg.Dir)
	if err != nil {
		return nil, err
	}
	if ok {
		old := s.snapshot()
		c := &Cluster{cfg: cfg, st: s}
		dead := c.deadProcs()
		switch {
		case old.Instance != cfg.Instance:
			return nil, fmt.Errorf("cluster: %s holds instance %d, not %d", cfg.Dir, old.Instance, cfg.Instance)
		case old.Ready && len(dead) == 0 && old.Nodes == cfg.Nodes && old.NodeMilliCPU == cfg.NodeMilliCPU && old.NodeMemory == cfg.NodeMemory:
			log.Info("cluster already running", "nodes", old.Nodes, "kubeconfig", c.Kubeconfig())
			return c, nil
		case old.Ready && len(dead) == 0:
			return nil, fmt.Errorf("cluster: a cluster of %d nodes (%dm CPU, %d bytes memory each) is running in %s; run cluster down first",
				old.Nodes, old.NodeMilliCPU, old.NodeMemory, cfg.Dir)
		}
		log.Info("tearing down an incomplete cluster first", "ready", old.Ready, "dead", dead)
		if err := down(ctx, cfg, s); err != nil {
			return nil, fmt.Errorf("cluster: clean up the previous cluster in %s: %w", cfg.Dir, err)
		}
		if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
			return nil, fmt.Errorf("cluster: %w", err)
		}
	}
	// Another instance's leftovers are not ours to touch, but our own names
	// must be free.
	if left, err := Leftovers(cfg); err == nil {
		left = slices.DeleteFunc(left, func(s string) bool { return strings.HasPrefix(s, "dir ") })
		if len(left) > 0 {
			log.Info("sweeping leftovers of an earlier cluster", "what", left)
			if err := down(ctx, cfg, &store{path: statePath(cfg.Dir)}); err != nil {
				return nil, err
			}
			if err := os.MkdirAll(cfg.Dir, 0o755); err != nil {
				return nil, fmt.Errorf("cluster: %w", err)
			}
		}
	}

	// Every process of an earlier cluster in Dir is gone now (down checks
	// it); a port still taken is someone else's.
	if err := cfg.checkPortsFree(); err != nil {
		return nil, err
	}

	s = &store{path: statePath(cfg.Dir)}
	if err := s.update(func(st *state) {
		*st = state{Instance: cfg.Instance, Nodes: cfg.Nodes, NodeMilliCPU: cfg.NodeMilliCPU, NodeMemory: cfg.NodeMemory,
			Created: time.Now().UTC(), Sysctls: map[string]string{}}
	}); err != nil {
		return nil, err
	}
	c := &Cluster{cfg: cfg, st: s}
	defer func() {
		if retErr != nil {
			log.Error("bring-up failed; tearing down", "err", retErr)
			keep := cfg
			keep.KeepLogs = true
			cctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 3*time.Minute)
			defer cancel()
			if err := down(cctx, keep, s); err != nil {
				retErr = errors.Join(retErr, fmt.Errorf("cluster: teardown after the failure: %w", err))
			}
			retErr = fmt.Errorf("%w (logs: %s)", retErr, filepath.Join(cfg.Dir, "logs"))
		}
	}()
	t0 := time.Now()
	if err := c.prepare(ctx); err != nil {
		return nil, err
	}
	log.Info("host prepared", "nodes", cfg.Nodes, "took", time.Since(t0).Round(time.Millisecond))
	if err := c.startControlPlane(ctx); err != nil {
		return nil, err
	}
	log.Info("control plane ready", "apiserver", cfg.APIServer(), "took", time.Since(t0).Round(time.Millisecond))
	var wg sync.WaitGroup
	errs := make([]error, cfg.Nodes)
	for i, n := range cfg.nodes() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = c.startNode(ctx, n, nil)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return nil, err
	}
	log.Info("node components started", "took", time.Since(t0).Round(time.Millisecond))
	if err := c.waitNodesReady(ctx); err != nil {
		return nil, err
	}
	if err := s.update(func(st *state) { st.Ready = true }); err != nil {
		return nil, err
	}
	log.Info("cluster ready", "nodes", cfg.Nodes, "kubeconfig", c.Kubeconfig(), "took", time.Since(t0).Round(time.Millisecond))
	return c, nil
}

// Load returns the cluster recorded in cfg.Dir (running or not).
func Load(cfg Config) (*Cluster, error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 1 // replaced by the recorded count below
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	s, ok, err := loadStore(cfg.Dir)
	if err != nil {
		return nil, err
	}
	if !ok {
		return nil, fmt.Errorf("cluster: no cluster recorded in %s", cfg.Dir)
	}
	st := s.snapshot()
	cfg.Nodes, cfg.Instance = st.Nodes, st.Instance
	cfg.NodeMilliCPU, cfg.NodeMemory = st.NodeMilliCPU, st.NodeMemory
	return &Cluster{cfg: cfg, st: s}, nil
}

// lockDir takes an exclusive flock on dir/lock, waiting while ctx allows.
func lockDir(ctx context.Context, dir string) (func(), error) {
	f, err := os.OpenFile(filepath.Join(dir, "lock"), os.O_CREATE|os.O_RDWR, 0o600)
	if err != nil {
		return nil, fmt.Errorf("cluster: lock: %w", err)
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("cluster: lock %s: %w", f.Name(), err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, fmt.Errorf("cluster: %s is locked by another up or down: %w", dir, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

// prepare makes the PKI, kubeconfigs, the bridge, the node namespaces,
// veths, routes, cgroups and config files, recording each before making it.
func (c *Cluster) prepare(ctx context.Context) error {
	cfg := c.cfg
	for _, k := range kubeletSysctls {
		b, err := os.ReadFile(filepath.Join("/proc/sys", k))
		if err != nil {
			continue
		}
		if err := c.st.update(func(st *state) { st.Sysctls[k] = strings.TrimSpace(string(b)) }); err != nil {
			return err
		}
	}
	p, err := loadOrMakePKI(cfg)
	if err != nil {
		return err
	}
	if _, _, err := p.clientCert("apiserver-kubelet-client", "kube-apiserver-kubelet-client", "system:masters"); err != nil {
		return err
	}
	kcs := [][]string{
		{filepath.Join(cfg.Dir, "admin.kubeconfig"), "admin", "admin", "system:masters"},
		{filepath.Join(cfg.Dir, "scheduler.kubeconfig"), "scheduler", "system:kube-scheduler"},
		{filepath.Join(cfg.Dir, "controller-manager.kubeconfig"), "controller-manager", "system:kube-controller-manager"},
	}
	for _, n := range cfg.nodes() {
		kcs = append(kcs,
			[]string{filepath.Join(n.Dir, "kubelet.kubeconfig"), n.Name + "-kubelet", "system:node:" + n.Name, "system:nodes"},
			[]string{filepath.Join(n.Dir, "kube-proxy.kubeconfig"), n.Name + "-kube-proxy", "system:kube-proxy"})
	}
	for _, k := range kcs {
		if err := p.kubeconfig(k[0], k[1], k[2], k[3:]...); err != nil {
			return err
		}
	}

	if err := c.st.update(func(st *state) { st.Links = addUnique(st.Links, cfg.BridgeName()) }); err != nil {
		return err
	}
	if err := makeBridge(cfg); err != nil {
		return err
	}
	pidsH, err := pidsHierarchy()
	if err != nil {
		return err
	}
	cp := filepath.Join(pidsH, cfg.controlCgroup())
	if err := c.st.update(func(st *state) { st.Cgroups = addUnique(st.Cgroups, cp) }); err != nil {
		return err
	}
	if err := os.Mkdir(cp, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
		return fmt.Errorf("cluster: create cgroup %s: %w", cp, err)
	}
	for _, n := range cfg.nodes() {
		if err := ctx.Err(); err != nil {
			return err
		}
		if err := c.st.update(func(st *state) {
			st.Netns = addUnique(st.Netns, n.Name)
			st.Links = addUnique(st.Links, n.Name)
		}); err != nil {
			return err
		}
		if err := makeNetns(n.Name); err != nil {
			return err
		}
		if err := wireNode(cfg, n); err != nil {
			return err
		}
		rec := func(d string) error { return c.st.update(func(st *state) { st.Cgroups = addUnique(st.Cgroups, d) }) }
		if err := makeNodeCgroups(n.CgroupRoot, rec); err != nil {
			return err
		}
		sys := filepath.Join(pidsH, n.CgroupRoot, "system")
		if err := rec(sys); err != nil {
			return err
		}
		if err := os.Mkdir(sys, 0o755); err != nil && !errors.Is(err, os.ErrExist) {
			return fmt.Errorf("cluster: create cgroup %s: %w", sys, err)
		}
		if err := writeNodeFiles(cfg, n); err != nil {
			return err
		}
	}
	return routeNodes(cfg, cfg.nodes())
}

// run starts one component and records it.
func (c *Cluster) run(component string, n *Node, args []string) (proc, error) {
	l := launch{component: component, args: args}
	pidsH, err := pidsHierarchy()
	if err != nil {
		return proc{}, err
	}
	if n != nil {
		l.node, l.netns, l.cgroup = n.Name, n.NetnsPath, filepath.Join(pidsH, n.CgroupRoot, "system")
		l.log = filepath.Join(c.cfg.Dir, "logs", n.Name+"-"+component+".log")
		l.env = []string{"VHIVE_CACHE=" + filepath.Dir(c.cfg.BinDir)}
	} else {
		l.cgroup = filepath.Join(pidsH, c.cfg.controlCgroup())
		l.log = filepath.Join(c.cfg.Dir, "logs", component+".log")
	}
	p, err := start(l)
	if err != nil {
		return proc{}, err
	}
	return p, c.st.update(func(st *state) { st.setProc(p) })
}

// waitFor polls ok until it returns nil, p dies, or timeout.
func waitFor(ctx context.Context, what string, timeout time.Duration, p proc, ok func() error) error {
	deadline := time.Now().Add(timeout)
	var last error
	for {
		if last = ok(); last == nil {
			return nil
		}
		if p.PID != 0 && !p.alive() {
			return fmt.Errorf("cluster: %s: %s exited: %s", what, p.key(), logTail(p.Log, 15))
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("cluster: %s: not after %v: %v; log %s: %s", what, timeout, last, p.Log, logTail(p.Log, 10))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: %s: %w", what, ctx.Err())
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func logTail(path string, lines int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return "(no log)"
	}
	ls := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(ls) > lines {
		ls = ls[len(ls)-lines:]
	}
	return strings.Join(ls, "\n")
}

func dialable(network, addr string) func() error {
	return func() error {
		conn, err := net.DialTimeout(network, addr, time.Second)
		if err != nil {
			return err
		}
		return conn.Close()
	}
}

func (c *Cluster) startControlPlane(ctx context.Context) error {
	cfg := c.cfg
	args := controlPlaneArgs(cfg)
	api, err := newAPIClient(cfg)
	if err != nil {
		return err
	}
	for _, comp := range controlComponents {
		p, err := c.run(comp, nil, args[comp])
		if err != nil {
			return err
		}
		switch comp {
		case Registry:
			err = waitFor(ctx, "registry ready", time.Minute, p, func() error {
				if strings.Contains(logTail(p.Log, 50), "registry ready") {
					return nil
				}
				return errors.New("no ready line yet")
			})
		case Etcd:
			err = waitFor(ctx, "etcd listening", time.Minute, p, dialable("tcp", fmt.Sprintf("127.0.0.1:%d", cfg.etcdPort())))
		case APIServer:
			err = waitFor(ctx, "apiserver ready", 3*time.Minute, p, func() error { return api.readyz(ctx) })
		}
		if err != nil {
			return err
		}
	}
	return api.applyRuntimeClass(ctx)
}

// startNode starts node n's components in order, those in only (all when
// nil), waiting for each socket.
func (c *Cluster) startNode(ctx context.Context, n Node, only []string) error {
	args := nodeArgs(c.cfg, n)
	for _, comp := range nodeComponents {
		if only != nil && !slices.Contains(only, comp) {
			continue
		}
		if comp == VhiveDaemon {
			// A stale socket from a killed daemon must not pass the wait.
			_ = os.Remove(n.CRISocket)
		}
		p, err := c.run(comp, &n, args[comp])
		if err != nil {
			return err
		}
		switch comp {
		case Containerd:
			err = waitFor(ctx, n.Name+" containerd socket", time.Minute, p, dialable("unix", n.ContainerdSock))
		case VhiveDaemon:
			err = waitFor(ctx, n.Name+" vhive CRI socket", 2*time.Minute, p, dialable("unix", n.CRISocket))
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// waitNodesReady waits until every node is registered, Ready and runs on
// vhive's CRI, recording each node's pod CIDR on its Node object.
func (c *Cluster) waitNodesReady(ctx context.Context) error {
	api, err := newAPIClient(c.cfg)
	if err != nil {
		return err
	}
	want := map[string]Node{}
	for _, n := range c.cfg.nodes() {
		want[n.Name] = n
	}
	cidrSet := map[string]bool{}
	deadline := time.Now().Add(c.cfg.ReadyTimeout)
	for {
		ns, err := api.nodes(ctx)
		ready := 0
		var notReady []string
		if err == nil {
			seen := map[string]bool{}
			for _, s := range ns {
				n, ok := want[s.Name]
				if !ok {
					continue
				}
				seen[s.Name] = true
				if !cidrSet[s.Name] && s.PodCIDR == "" {
					if err := api.setPodCIDR(ctx, s.Name, n.PodCIDR.String()); err == nil {
						cidrSet[s.Name] = true
					}
				}
				if s.Ready && strings.HasPrefix(s.ContainerRuntime, "vhive://") {
					ready++
				} else {
					notReady = append(notReady, fmt.Sprintf("%s (ready %v, runtime %q)", s.Name, s.Ready, s.ContainerRuntime))
				}
			}
			for name := range want {
				if !seen[name] {
					notReady = append(notReady, name+" (not registered)")
				}
			}
		}
		if err == nil && ready == len(want) {
			return nil
		}
		if dead := c.deadProcs(); len(dead) > 0 {
			return fmt.Errorf("cluster: waiting for nodes: %s died: %s", strings.Join(dead, ", "), c.deadLogs(dead))
		}
		if time.Now().After(deadline) {
			slices.Sort(notReady)
			return fmt.Errorf("cluster: nodes not Ready after %v: %s (err %v); kubelet logs in %s",
				c.cfg.ReadyTimeout, strings.Join(notReady, ", "), err, filepath.Join(c.cfg.Dir, "logs"))
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("cluster: waiting for nodes: %w", ctx.Err())
		case <-time.After(time.Second):
		}
	}
}

// deadProcs lists recorded processes that are no longer running.
func (c *Cluster) deadProcs() []string {
	var dead []string
	for _, p := range c.st.snapshot().Procs {
		if !p.alive() {
			dead = append(dead, p.key())
		}
	}
	return dead
}

func (c *Cluster) deadLogs(keys []string) string {
	var b strings.Builder
	for _, p := range c.st.snapshot().Procs {
		if slices.Contains(keys, p.key()) {
			fmt.Fprintf(&b, "\n--- %s (%s):\n%s", p.key(), p.Log, logTail(p.Log, 10))
		}
	}
	return b.String()
}
