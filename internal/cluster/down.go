package cluster

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/vishvananda/netlink"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/mountinfo"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox/oci"
)

// Down stops the cluster recorded in cfg.Dir and removes every process,
// mount, namespace, link, route, cgroup and file it made, also when parts of
// it crashed or Up was interrupted; it then sweeps by the instance's own
// names and paths (package doc). Nodes need not be set.
func Down(ctx context.Context, cfg Config) error {
	if cfg.Nodes == 0 {
		cfg.Nodes = 1
	}
	cfg, err := cfg.withDefaults()
	if err != nil {
		return err
	}
	if os.Geteuid() != 0 {
		return errors.New("cluster: needs root")
	}
	if _, err := os.Stat(cfg.Dir); errors.Is(err, os.ErrNotExist) {
		// Nothing recorded: still sweep by name.
		return down(ctx, cfg, &store{path: statePath(cfg.Dir)})
	}
	unlock, err := lockDir(ctx, cfg.Dir)
	if err != nil {
		return err
	}
	s, _, err := loadStore(cfg.Dir)
	if err != nil {
		cfg.Logger.Warn("cluster: state unreadable; sweeping by name only", "err", err)
		s = &store{path: statePath(cfg.Dir)}
	}
	err = down(ctx, cfg, s)
	unlock()
	if err == nil && !cfg.KeepLogs {
		_ = os.Remove(filepath.Join(cfg.Dir, "lock"))
		if err := os.Remove(cfg.Dir); err != nil && !errors.Is(err, os.ErrNotExist) {
			return fmt.Errorf("cluster: remove %s: %w", cfg.Dir, err)
		}
	}
	return err
}

// down is Down without the lock; it leaves Dir/lock (and Dir/logs with
// KeepLogs).
func down(ctx context.Context, cfg Config, s *store) error {
	log := cfg.Logger.With("component", "cluster", "instance", cfg.Instance)
	st := s.snapshot()
	if st.Nodes > cfg.Nodes {
		cfg.Nodes = st.Nodes
	}
	// Sweep as many nodes as can exist, in case the record is gone.
	sweep := cfg
	sweep.Nodes = MaxNodes
	var errs []error
	note := func(err error) {
		if err != nil {
			errs = append(errs, err)
		}
	}
	byKey := map[string]proc{}
	for _, p := range st.Procs {
		byKey[p.key()] = p
	}
	stopAll := func(comp string, grace time.Duration) {
		var wg sync.WaitGroup
		for _, p := range st.Procs {
			if p.Component == comp {
				wg.Add(1)
				go func() { defer wg.Done(); note(p.stop(ctx, grace)) }()
			}
		}
		wg.Wait()
	}
	// 1. Node agents first, so nothing recreates pods.
	stopAll(Kubelet, 10*time.Second)
	stopAll(KubeProxy, 5*time.Second)
	// 2. Pods through the CRI (vhive's, else containerd's): stops vhive's
	// sandboxes and lets CNI release addresses and veths.
	var wg sync.WaitGroup
	for _, n := range cfg.nodes() {
		d, okD := byKey[n.Name+"/"+VhiveDaemon]
		ct, okC := byKey[n.Name+"/"+Containerd]
		sock := ""
		switch {
		case okD && d.alive():
			sock = n.CRISocket
		case okC && ct.alive():
			sock = n.ContainerdSock
		}
		if sock == "" {
			continue
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := removePods(ctx, sock); err != nil {
				log.Warn("removing pods through the CRI failed; killing them", "node", n.Name, "err", err)
			}
		}()
	}
	wg.Wait()
	// 3. The node daemons, then the control plane.
	stopAll(VhiveDaemon, 20*time.Second)
	stopAll(Containerd, 10*time.Second)
	for i := len(controlComponents) - 1; i >= 0; i-- {
		stopAll(controlComponents[i], 10*time.Second)
	}
	// 4. Whatever still runs: in the node cgroups, in the node daemons'
	// sandbox cgroups, or naming Dir on its command line (shims, runsc).
	pidsH, _ := pidsHierarchy()
	hs, _ := cgroupHierarchies()
	var cgroupTrees []string
	if pidsH != "" {
		cgroupTrees = append(cgroupTrees, filepath.Join(pidsH, cfg.controlCgroup()))
	}
	for _, n := range sweep.nodes() {
		for _, h := range hs {
			cgroupTrees = append(cgroupTrees, filepath.Join(h, n.CgroupRoot))
			for _, rt := range []string{oci.RuntimeGVisor, oci.RuntimeRunc} {
				cgroupTrees = append(cgroupTrees, filepath.Join(h, oci.CgroupParent(rt, filepath.Join(n.Dir, "vhive", "sandboxes", rt))))
			}
		}
	}
	for _, t := range cgroupTrees {
		if pidsH != "" && strings.HasPrefix(t, pidsH+"/") {
			note(killCgroupTree(ctx, t))
		}
	}
	note(killByCmdline(ctx, cfg.Dir+"/"))
	// 5. Mounts under Dir (kubelet volumes, containerd snapshots and pod
	// netns) and the instance's named netns.
	note(unmountUnder(cfg.Dir + "/"))
	netnsNames := slices.Clone(st.Netns)
	if names, err := netpool.NetnsNames(cfg.ownNetns); err == nil {
		for _, n := range names {
			netnsNames = addUnique(netnsNames, n)
		}
	}
	for _, name := range netnsNames {
		note(deleteNetns(name))
	}
	// 6. Host links (routes through them go with them).
	links := slices.Clone(st.Links)
	if ls, err := netlink.LinkList(); err == nil {
		for _, l := range ls {
			if cfg.ownLink(l.Attrs().Name) {
				links = addUnique(links, l.Attrs().Name)
			}
		}
	}
	// Veths before the bridge.
	sort.SliceStable(links, func(i, j int) bool { return links[j] == cfg.BridgeName() && links[i] != cfg.BridgeName() })
	for _, l := range links {
		note(deleteLink(l))
	}
	// 7. Cgroups.
	for _, d := range st.Cgroups {
		cgroupTrees = addUnique(cgroupTrees, d)
	}
	// Deepest first, so node roots go after their system children.
	sort.Slice(cgroupTrees, func(i, j int) bool { return len(cgroupTrees[i]) > len(cgroupTrees[j]) })
	for _, d := range cgroupTrees {
		note(removeCgroupTree(d))
	}
	for _, h := range hs {
		// The oci backends' shared parent, if now empty.
		_ = os.Remove(filepath.Join(h, "vhive"))
	}
	// 8. Host sysctls kubelet changed.
	for k, v := range st.Sysctls {
		p := filepath.Join("/proc/sys", k)
		if cur, err := os.ReadFile(p); err == nil && strings.TrimSpace(string(cur)) != v {
			note(os.WriteFile(p, []byte(v+"\n"), 0o644))
		}
	}
	// 9. kubelet's links to container logs.
	note(removeLogLinks(cfg.Dir + "/"))
	// 10. Files. Only when nothing is mounted below Dir any more.
	if ms := mountsUnder(cfg.Dir + "/"); len(ms) > 0 {
		note(fmt.Errorf("cluster: not removing %s: still mounted: %s", cfg.Dir, strings.Join(ms, ", ")))
	} else if ents, err := os.ReadDir(cfg.Dir); err == nil {
		for _, e := range ents {
			if e.Name() == "lock" || (cfg.KeepLogs && e.Name() == "logs") {
				continue
			}
			note(os.RemoveAll(filepath.Join(cfg.Dir, e.Name())))
		}
	}
	if err := errors.Join(errs...); err != nil {
		return err
	}
	if left, err := Leftovers(cfg); err != nil {
		return err
	} else if left = slices.DeleteFunc(left, func(s string) bool { return strings.HasPrefix(s, "dir ") }); len(left) > 0 {
		return fmt.Errorf("cluster: left after down: %s", strings.Join(left, "; "))
	}
	log.Info("cluster down", "dir", cfg.Dir)
	return nil
}

// removePods stops and removes every pod sandbox through the CRI at sock.
func removePods(ctx context.Context, sock string) error {
	ctx, cancel := context.WithTimeout(ctx, 60*time.Second)
	defer cancel()
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return fmt.Errorf("cluster: dial %s: %w", sock, err)
	}
	defer conn.Close()
	rt := runtimeapi.NewRuntimeServiceClient(conn)
	pods, err := rt.ListPodSandbox(ctx, &runtimeapi.ListPodSandboxRequest{})
	if err != nil {
		return fmt.Errorf("cluster: list pods on %s: %w", sock, err)
	}
	var errs []error
	for _, p := range pods.GetItems() {
		if _, err := rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: p.GetId()}); err != nil {
			errs = append(errs, fmt.Errorf("stop pod %s: %w", p.GetMetadata().GetName(), err))
		}
		if _, err := rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: p.GetId()}); err != nil {
			errs = append(errs, fmt.Errorf("remove pod %s: %w", p.GetMetadata().GetName(), err))
		}
	}
	return errors.Join(errs...)
}

// killByCmdline SIGKILLs every process whose command line contains sub
// until none is left.
func killByCmdline(ctx context.Context, sub string) error {
	return killAll(ctx, "processes naming "+sub, func() []int { return pidsWithCmdline(sub) })
}

// mountsUnder lists the host's mount points at or below prefix (a
// directory with a trailing "/"), deepest first, each once.
func mountsUnder(prefix string) []string {
	ms, _ := mountinfo.Under(prefix)
	slices.SortFunc(ms, func(a, b string) int { return cmp.Or(cmp.Compare(len(b), len(a)), strings.Compare(a, b)) })
	return slices.Compact(ms)
}

func unmountUnder(prefix string) error {
	var errs []error
	for range 5 { // stacked mounts need more than one pass
		ms := mountsUnder(prefix)
		if len(ms) == 0 {
			return nil
		}
		errs = errs[:0]
		for _, m := range ms {
			if err := unix.Unmount(m, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
				errs = append(errs, fmt.Errorf("cluster: unmount %s: %w", m, err))
			}
		}
	}
	if ms := mountsUnder(prefix); len(ms) > 0 {
		return errors.Join(append(errs, fmt.Errorf("cluster: still mounted: %s", strings.Join(ms, ", ")))...)
	}
	return nil
}

// logLinksDir is where kubelet links every container's log.
const logLinksDir = "/var/log/containers"

func logLinksInto(prefix string) []string {
	ents, err := os.ReadDir(logLinksDir)
	if err != nil {
		return nil
	}
	var out []string
	for _, e := range ents {
		p := filepath.Join(logLinksDir, e.Name())
		if t, err := os.Readlink(p); err == nil && strings.HasPrefix(t, prefix) {
			out = append(out, p)
		}
	}
	return out
}

func removeLogLinks(prefix string) error {
	var errs []error
	for _, p := range logLinksInto(prefix) {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			errs = append(errs, err)
		}
	}
	return errors.Join(errs...)
}

// ownNetns matches the named network namespaces of the instance: its
// nodes' and their daemons' netpools'.
func (c Config) ownNetns(name string) bool { return c.ownNodeName(name) || c.ownFuncNetns(name) }

// Leftovers lists what of instance cfg exists on the host now: processes
// naming cfg.Dir or in its node cgroups, mounts under Dir, named netns and
// links with the instance's names, cgroups, host routes into its ranges,
// kubelet log links into Dir, and Dir itself ("dir ..."). After Down it is
// empty (with KeepLogs, only Dir/logs remains and is not listed).
func Leftovers(cfg Config) ([]string, error) {
	if cfg.Nodes == 0 {
		cfg.Nodes = 1
	}
	if err := cfg.checkDir(); err != nil {
		return nil, err
	}
	sweep := cfg
	sweep.Nodes = MaxNodes
	var out []string
	for _, pid := range pidsWithCmdline(cfg.Dir + "/") {
		out = append(out, fmt.Sprintf("process %d: %s", pid, cmdline(pid)))
	}
	hs, err := cgroupHierarchies()
	if err != nil {
		return nil, err
	}
	if pidsH, err := pidsHierarchy(); err == nil {
		d := filepath.Join(pidsH, cfg.controlCgroup())
		if _, err := os.Stat(d); err == nil {
			out = append(out, "cgroup "+d)
			for _, pid := range cgroupPids(d) {
				out = append(out, fmt.Sprintf("process %d in %s: %s", pid, d, cmdline(pid)))
			}
		}
	}
	for _, n := range sweep.nodes() {
		for _, h := range hs {
			dirs := []string{filepath.Join(h, n.CgroupRoot)}
			for _, rt := range []string{oci.RuntimeGVisor, oci.RuntimeRunc} {
				dirs = append(dirs, filepath.Join(h, oci.CgroupParent(rt, filepath.Join(n.Dir, "vhive", "sandboxes", rt))))
			}
			for _, d := range dirs {
				if _, err := os.Stat(d); err == nil {
					out = append(out, "cgroup "+d)
					for _, pid := range cgroupPids(d) {
						out = append(out, fmt.Sprintf("process %d in %s: %s", pid, d, cmdline(pid)))
					}
				}
			}
		}
	}
	for _, m := range mountsUnder(cfg.Dir + "/") {
		out = append(out, "mount "+m)
	}
	// Names from the directory and from the mount table (a mount hidden
	// under a later mount of /var/run/netns has no entry one sees), each
	// with what is wrong with it if it is not one nsfs mount.
	names, err := netpool.NetnsNames(cfg.ownNetns)
	if err != nil {
		return nil, fmt.Errorf("cluster: %w", err)
	}
	for _, n := range names {
		if p := netpool.NetnsProblem(n); p != "" {
			out = append(out, fmt.Sprintf("netns %s (%s)", n, p))
		} else {
			out = append(out, "netns "+n)
		}
	}
	ls, err := netlink.LinkList()
	if err != nil {
		return nil, fmt.Errorf("cluster: list links: %w", err)
	}
	for _, l := range ls {
		if cfg.ownLink(l.Attrs().Name) {
			out = append(out, "link "+l.Attrs().Name)
		}
	}
	rs, err := cfg.hostRoutes()
	if err != nil {
		return nil, err
	}
	for _, r := range rs {
		out = append(out, "route "+r)
	}
	for _, l := range logLinksInto(cfg.Dir + "/") {
		out = append(out, "log link "+l)
	}
	if ents, err := os.ReadDir(cfg.Dir); err == nil {
		var names []string
		for _, e := range ents {
			if !(cfg.KeepLogs && (e.Name() == "logs" || e.Name() == "lock")) {
				names = append(names, e.Name())
			}
		}
		if len(names) > 0 || !cfg.KeepLogs {
			out = append(out, fmt.Sprintf("dir %s (%s)", cfg.Dir, strings.Join(names, " ")))
		}
	}
	return out, nil
}
