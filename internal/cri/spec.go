package cri

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/image"
)

// ociBundle is a container's bundle directory: config.json and rootfs (an
// overlay of the read-only image root with a private upper dir).
type ociBundle struct {
	Dir    string
	Rootfs string
}

// defaultCaps is the capability set containerd gives unprivileged containers.
var defaultCaps = []string{
	"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
	"CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
	"CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
}

// prepareBundle mounts the overlay rootfs and writes config.json. On error
// nothing is left mounted (the directory is removed by the caller).
func prepareBundle(dir string, img image.Image, spec *specs.Spec) (*ociBundle, error) {
	b := &ociBundle{Dir: dir, Rootfs: filepath.Join(dir, "rootfs")}
	for _, d := range []string{b.Rootfs, filepath.Join(dir, "upper"), filepath.Join(dir, "work")} {
		if err := os.MkdirAll(d, 0o755); err != nil {
			return nil, fmt.Errorf("create %q: %w", d, err)
		}
	}
	opts := fmt.Sprintf("lowerdir=%s,upperdir=%s,workdir=%s", img.Rootfs, filepath.Join(dir, "upper"), filepath.Join(dir, "work"))
	if err := unix.Mount("overlay", b.Rootfs, "overlay", 0, opts); err != nil {
		return nil, fmt.Errorf("mount overlay rootfs at %q (lower %q): %w", b.Rootfs, img.Rootfs, err)
	}
	spec.Root = &specs.Root{Path: b.Rootfs, Readonly: spec.Root != nil && spec.Root.Readonly}
	// Mount points the image lacks (the runtime would create them in the
	// overlay anyway; doing it here keeps errors readable).
	data, err := json.MarshalIndent(spec, "", "  ")
	if err == nil {
		err = os.WriteFile(filepath.Join(dir, "config.json"), data, 0o600)
	}
	if err != nil {
		_ = unix.Unmount(b.Rootfs, unix.MNT_DETACH)
		return nil, fmt.Errorf("write config.json in %q: %w", dir, err)
	}
	return b, nil
}

// removeContainerDir unmounts a container's rootfs and removes its directory.
func removeContainerDir(dir string) error {
	rootfs := filepath.Join(dir, "rootfs")
	if err := unix.Unmount(rootfs, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.ENOENT) {
		return fmt.Errorf("cri: unmount %q: %w", rootfs, err)
	}
	if err := os.RemoveAll(dir); err != nil {
		return fmt.Errorf("cri: remove %q: %w", dir, err)
	}
	return nil
}

// processArgs applies Docker's rules: the CRI command replaces the image
// entrypoint, the CRI args replace the image cmd.
func processArgs(cfg *runtimeapi.ContainerConfig, ic image.Config) []string {
	if len(cfg.GetCommand()) > 0 {
		return append(append([]string{}, cfg.GetCommand()...), cfg.GetArgs()...)
	}
	args := cfg.GetArgs()
	if len(args) == 0 {
		args = ic.Cmd
	}
	return append(append([]string{}, ic.Entrypoint...), args...)
}

// checkContainerConfig refuses what no runtime can run, naming the field:
// a relative working directory, an environment variable without a name or
// with '=' or NUL in it, or longer than an exec accepts.
func checkContainerConfig(cfg *runtimeapi.ContainerConfig) error {
	if wd := cfg.GetWorkingDir(); wd != "" && !filepath.IsAbs(wd) {
		return status.Errorf(codes.InvalidArgument, "cri: config.working_dir %q is not an absolute path", wd)
	}
	return checkConfigEnv(cfg)
}

// checkConfigEnv refuses a config.envs variable without a name, with '=' or
// NUL in it, or whose KEY=VALUE string no exec accepts.
func checkConfigEnv(cfg *runtimeapi.ContainerConfig) error {
	for _, kv := range cfg.GetEnvs() {
		if k := kv.GetKey(); k == "" || strings.ContainsAny(k, "=\x00") || bytes.IndexByte(kv.GetValue(), 0) >= 0 {
			return status.Errorf(codes.InvalidArgument, "cri: config.envs: variable %.80q: want a name without '=' or NUL and a value without NUL", k)
		}
		if n := len(kv.GetKey()) + len(kv.GetValue()) + 2; n > maxEnvString {
			return status.Errorf(codes.InvalidArgument, "cri: config.envs: variable %.80q: %s", kv.GetKey(), envStringTooLong(n))
		}
	}
	return nil
}

// maxEnvString is the longest environment string "KEY=VALUE" with its
// terminating NUL that Linux's execve accepts (MAX_ARG_STRLEN: 32 pages of
// 4 KiB); a container with a longer one could never start.
const maxEnvString = 128 << 10

func envStringTooLong(n int) string {
	return fmt.Sprintf("KEY=VALUE is %d bytes with its terminating NUL, over Linux's limit of %d bytes (128 KiB, MAX_ARG_STRLEN) for one exec string", n, maxEnvString)
}

// checkMergedEnv refuses a container environment (config.envs over the
// image's) holding a string no exec accepts. config.envs was checked by
// checkConfigEnv, so such a string comes from image (or is the pod's
// HOSTNAME).
func checkMergedEnv(env []string, image string) error {
	for _, kv := range env {
		if n := len(kv) + 1; n > maxEnvString {
			k, _, _ := strings.Cut(kv, "=")
			from := fmt.Sprintf("set by image %q", image)
			if k == "HOSTNAME" {
				from = "the pod's hostname"
			}
			return fmt.Errorf("environment variable %.80q (%s): %s; set a shorter value in config.envs", k, from, envStringTooLong(n))
		}
	}
	return nil
}

// mergeEnv returns image env overridden by the CRI env (order kept).
func mergeEnv(imageEnv []string, kvs []*runtimeapi.KeyValue, extra ...string) []string {
	idx := map[string]int{}
	var out []string
	set := func(kv string) {
		k, _, _ := strings.Cut(kv, "=")
		if i, ok := idx[k]; ok {
			out[i] = kv
			return
		}
		idx[k] = len(out)
		out = append(out, kv)
	}
	for _, kv := range imageEnv {
		set(kv)
	}
	for _, kv := range kvs {
		set(kv.GetKey() + "=" + string(kv.GetValue()))
	}
	for _, kv := range extra {
		set(kv)
	}
	if _, ok := idx["PATH"]; !ok {
		set("PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return out
}

// resolveUser computes uid, gid and additional gids from the security
// context, falling back to the image's USER, with names looked up in the
// rootfs's /etc/passwd and /etc/group.
func resolveUser(rootfs string, sc *runtimeapi.LinuxContainerSecurityContext, imageUser string) (specs.User, error) {
	var u specs.User
	var name string
	haveUID := false
	var groupOverride *uint32
	switch {
	case sc.GetRunAsUser() != nil:
		u.UID = uint32(sc.GetRunAsUser().GetValue())
		haveUID = true
	case sc.GetRunAsUsername() != "":
		name = sc.GetRunAsUsername()
	case imageUser != "":
		user, group, hasGroup := strings.Cut(imageUser, ":")
		if n, err := strconv.ParseUint(user, 10, 32); err == nil {
			u.UID = uint32(n)
			haveUID = true
		} else {
			name = user
		}
		if hasGroup {
			if n, err := strconv.ParseUint(group, 10, 32); err == nil {
				u.GID = uint32(n)
			} else {
				gid, ok := lookupGroup(rootfs, group)
				if !ok {
					return u, fmt.Errorf("image user %q: no group %q in /etc/group", imageUser, group)
				}
				u.GID = gid
			}
			g := u.GID
			groupOverride = &g
		}
	default:
		haveUID = true
	}
	pwName, pwUID, pwGID, found := lookupPasswd(rootfs, name, u.UID, haveUID)
	if name != "" {
		if !found {
			return u, fmt.Errorf("user %q not found in the image's /etc/passwd", name)
		}
		u.UID = pwUID
	}
	if found {
		u.GID = pwGID
	}
	if groupOverride != nil {
		u.GID = *groupOverride
	}
	if sc.GetRunAsGroup() != nil {
		u.GID = uint32(sc.GetRunAsGroup().GetValue())
	}
	// Order as containerd: the primary gid, the CRI supplemental groups,
	// then the image's /etc/group memberships (unless the policy is Strict).
	u.AdditionalGids = []uint32{u.GID}
	seen := map[uint32]bool{u.GID: true}
	add := func(g uint32) {
		if !seen[g] {
			seen[g] = true
			u.AdditionalGids = append(u.AdditionalGids, g)
		}
	}
	for _, g := range sc.GetSupplementalGroups() {
		add(uint32(g))
	}
	if found && sc.GetSupplementalGroupsPolicy() != runtimeapi.SupplementalGroupsPolicy_Strict {
		for _, g := range groupsOf(rootfs, pwName, u.GID) {
			add(g)
		}
	}
	return u, nil
}

func readLines(path string, fn func(fields []string)) {
	f, err := os.Open(path)
	if err != nil {
		return
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		fn(strings.Split(line, ":"))
	}
}

// lookupPasswd finds a user by name (or by uid when byUID).
func lookupPasswd(rootfs, name string, uid uint32, byUID bool) (string, uint32, uint32, bool) {
	var rn string
	var ru, rg uint32
	found := false
	readLines(filepath.Join(rootfs, "etc", "passwd"), func(f []string) {
		if found || len(f) < 4 {
			return
		}
		pu, err1 := strconv.ParseUint(f[2], 10, 32)
		pg, err2 := strconv.ParseUint(f[3], 10, 32)
		if err1 != nil || err2 != nil {
			return
		}
		if (name != "" && f[0] == name) || (name == "" && byUID && uint32(pu) == uid) {
			rn, ru, rg, found = f[0], uint32(pu), uint32(pg), true
		}
	})
	return rn, ru, rg, found
}

func lookupGroup(rootfs, name string) (uint32, bool) {
	var gid uint32
	found := false
	readLines(filepath.Join(rootfs, "etc", "group"), func(f []string) {
		if found || len(f) < 3 || f[0] != name {
			return
		}
		if n, err := strconv.ParseUint(f[2], 10, 32); err == nil {
			gid, found = uint32(n), true
		}
	})
	return gid, found
}

// groupsOf lists the gids of the groups naming user as a member.
func groupsOf(rootfs, user string, primary uint32) []uint32 {
	var gids []uint32
	readLines(filepath.Join(rootfs, "etc", "group"), func(f []string) {
		if len(f) < 4 {
			return
		}
		n, err := strconv.ParseUint(f[2], 10, 32)
		if err != nil || uint32(n) == primary {
			return
		}
		for _, m := range strings.Split(f[3], ",") {
			if m == user {
				gids = append(gids, uint32(n))
			}
		}
	})
	return gids
}

func propagation(p runtimeapi.MountPropagation) string {
	switch p {
	case runtimeapi.MountPropagation_PROPAGATION_HOST_TO_CONTAINER:
		return "rslave"
	case runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL:
		return "rshared"
	default:
		return "rprivate"
	}
}

// buildSpec turns a CRI container config into an OCI runtime spec for a
// container of vhive-handler pod p.
func buildSpec(p *pod, id string, cfg *runtimeapi.ContainerConfig, img image.Image, targetPid int, runcLike bool) (*specs.Spec, error) {
	lc := cfg.GetLinux()
	sc := lc.GetSecurityContext()
	args := processArgs(cfg, img.Config)
	if len(args) == 0 {
		return nil, fmt.Errorf("no command: the container config and image %q give neither command nor entrypoint", img.Ref)
	}
	user, err := resolveUser(img.Rootfs, sc, img.Config.User)
	if err != nil {
		return nil, err
	}
	if err := checkContainerConfig(cfg); err != nil {
		return nil, err
	}
	cwd := cfg.GetWorkingDir()
	if cwd == "" {
		cwd = img.Config.WorkingDir
	}
	if cwd == "" {
		cwd = "/"
	}
	hostname := p.Config.GetHostname()
	// HOSTNAME comes first, as with containerd; image and CRI env override it.
	env := mergeEnv(append([]string{"HOSTNAME=" + hostname}, img.Config.Env...), cfg.GetEnvs())
	if err := checkMergedEnv(env, img.Ref); err != nil {
		return nil, err
	}

	if sc.GetRunAsGroup() != nil && sc.GetRunAsUser() == nil && sc.GetRunAsUsername() == "" {
		return nil, errors.New("run_as_group is set without run_as_user or run_as_username")
	}
	caps := append([]string{}, defaultCaps...)
	privileged := sc.GetPrivileged()
	if privileged {
		caps = allCaps()
	} else {
		caps = adjustCaps(caps, sc.GetCapabilities())
	}
	caps = boundedCaps(caps)
	seccomp, err := seccompFor(sc, privileged, caps)
	if err != nil {
		return nil, err
	}
	spec := &specs.Spec{
		Version: specs.Version,
		Process: &specs.Process{
			Args:            args,
			Env:             env,
			Cwd:             cwd,
			User:            user,
			NoNewPrivileges: sc.GetNoNewPrivs(),
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
		},
		Root: &specs.Root{Readonly: sc.GetReadonlyRootfs()},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/sys/fs/cgroup", Type: "cgroup", Source: "cgroup", Options: []string{"nosuid", "noexec", "nodev", "relatime", "ro"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
		},
		Linux: &specs.Linux{
			Resources: &specs.LinuxResources{
				Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
			CgroupsPath: cgroupPath(p, id),
			Seccomp:     seccomp,
			Sysctl:      p.Config.GetLinux().GetSysctls(),
		},
	}
	if !privileged {
		// kubelet sends the lists (empty for an Unmasked /proc); the
		// defaults are for clients that send none.
		spec.Linux.MaskedPaths = []string{"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
			"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"}
		spec.Linux.ReadonlyPaths = []string{"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"}
		if sc.GetMaskedPaths() != nil {
			spec.Linux.MaskedPaths = sc.GetMaskedPaths()
		}
		if sc.GetReadonlyPaths() != nil {
			spec.Linux.ReadonlyPaths = sc.GetReadonlyPaths()
		}
	} else {
		spec.Linux.Resources.Devices = []specs.LinuxDeviceCgroup{{Allow: true, Access: "rwm"}}
		for i := range spec.Mounts {
			if spec.Mounts[i].Destination == "/sys" || spec.Mounts[i].Destination == "/sys/fs/cgroup" {
				spec.Mounts[i].Options = replaceOpt(spec.Mounts[i].Options, "ro", "rw")
			}
		}
	}
	if r := lc.GetResources(); r != nil {
		res := spec.Linux.Resources
		if r.GetMemoryLimitInBytes() > 0 {
			m := r.GetMemoryLimitInBytes()
			res.Memory = &specs.LinuxMemory{Limit: &m}
		}
		cpu := &specs.LinuxCPU{}
		if r.GetCpuShares() > 0 {
			v := uint64(r.GetCpuShares())
			cpu.Shares = &v
		}
		if r.GetCpuQuota() > 0 {
			v := r.GetCpuQuota()
			cpu.Quota = &v
		}
		if r.GetCpuPeriod() > 0 {
			v := uint64(r.GetCpuPeriod())
			cpu.Period = &v
		}
		cpu.Cpus = r.GetCpusetCpus()
		cpu.Mems = r.GetCpusetMems()
		res.CPU = cpu
	}

	// Namespaces: network, IPC and UTS of the pod (its pause process), PID
	// per the container's option, a private mount namespace.
	ns := []specs.LinuxNamespace{{Type: specs.MountNamespace}}
	podNS := p.Config.GetLinux().GetSecurityContext().GetNamespaceOptions()
	if podNS.GetNetwork() != runtimeapi.NamespaceMode_NODE {
		ns = append(ns, specs.LinuxNamespace{Type: specs.NetworkNamespace, Path: p.NetNS})
		ns = append(ns, specs.LinuxNamespace{Type: specs.UTSNamespace, Path: nsPath(p.PausePID, "uts")})
	}
	if podNS.GetIpc() != runtimeapi.NamespaceMode_NODE {
		ns = append(ns, specs.LinuxNamespace{Type: specs.IPCNamespace, Path: nsPath(p.PausePID, "ipc")})
	}
	switch sc.GetNamespaceOptions().GetPid() {
	case runtimeapi.NamespaceMode_NODE:
	case runtimeapi.NamespaceMode_POD:
		ns = append(ns, specs.LinuxNamespace{Type: specs.PIDNamespace, Path: nsPath(p.PausePID, "pid")})
	case runtimeapi.NamespaceMode_TARGET:
		if targetPid == 0 {
			return nil, fmt.Errorf("pid namespace target %q is not running", sc.GetNamespaceOptions().GetTargetId())
		}
		ns = append(ns, specs.LinuxNamespace{Type: specs.PIDNamespace, Path: nsPath(targetPid, "pid")})
	default:
		ns = append(ns, specs.LinuxNamespace{Type: specs.PIDNamespace})
	}
	spec.Linux.Namespaces = ns
	if !runcLike && podNS.GetNetwork() != runtimeapi.NamespaceMode_NODE {
		// runsc does not join the pause's UTS namespace; it sets the name.
		spec.Hostname = hostname
	}

	// Pod files unless kubelet mounts its own.
	mounted := map[string]bool{}
	for _, m := range cfg.GetMounts() {
		mounted[m.GetContainerPath()] = true
	}
	for _, f := range []string{"hosts", "hostname", "resolv.conf"} {
		dst := "/etc/" + f
		if mounted[dst] {
			continue
		}
		opts := []string{"rbind", "rprivate", "rw"}
		if sc.GetReadonlyRootfs() {
			opts[2] = "ro"
		}
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: dst, Type: "bind", Source: filepath.Join(p.Dir, f), Options: opts})
	}
	for _, m := range cfg.GetMounts() {
		if m.GetContainerPath() == "" || m.GetHostPath() == "" {
			return nil, fmt.Errorf("mount %v: container_path and host_path are required", m)
		}
		src := m.GetHostPath()
		if _, err := os.Stat(src); errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(src, 0o755); err != nil {
				return nil, fmt.Errorf("create mount source %q: %w", src, err)
			}
		}
		if r, err := filepath.EvalSymlinks(src); err == nil {
			src = r
		}
		opts := []string{"rbind", propagation(m.GetPropagation())}
		if m.GetReadonly() {
			opts = append(opts, "ro")
		} else {
			opts = append(opts, "rw")
		}
		spec.Mounts = append(spec.Mounts, specs.Mount{Destination: m.GetContainerPath(), Type: "bind", Source: src, Options: opts})
		if m.GetPropagation() != runtimeapi.MountPropagation_PROPAGATION_PRIVATE {
			spec.Linux.RootfsPropagation = "rslave"
			if m.GetPropagation() == runtimeapi.MountPropagation_PROPAGATION_BIDIRECTIONAL {
				spec.Linux.RootfsPropagation = "rshared"
			}
		}
	}
	return spec, nil
}

func nsPath(pid int, kind string) string {
	return fmt.Sprintf("/proc/%d/ns/%s", pid, kind)
}

func cgroupPath(p *pod, id string) string {
	parent := p.Config.GetLinux().GetCgroupParent()
	if parent == "" {
		parent = "/vhive-cri"
	}
	return filepath.Join(parent, "vhive-"+id[:12])
}

func replaceOpt(opts []string, from, to string) []string {
	out := make([]string, len(opts))
	for i, o := range opts {
		if o == from {
			o = to
		}
		out[i] = o
	}
	return out
}

// allCapNames are the capabilities by number (CAP_CHOWN = 0 ...).
var allCapNames = []string{"CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID",
	"SETPCAP", "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK",
	"IPC_OWNER", "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT",
	"SYS_NICE", "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL",
	"SETFCAP", "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ",
	"PERFMON", "BPF", "CHECKPOINT_RESTORE"}

func allCaps() []string {
	out := make([]string, len(allCapNames))
	for i, n := range allCapNames {
		out[i] = "CAP_" + n
	}
	return out
}

// adjustCaps applies CRI add/drop lists ("ALL" allowed; names with or
// without the CAP_ prefix).
func adjustCaps(caps []string, c *runtimeapi.Capability) []string {
	norm := func(s string) string {
		s = strings.ToUpper(s)
		if s != "ALL" && !strings.HasPrefix(s, "CAP_") {
			s = "CAP_" + s
		}
		return s
	}
	set := map[string]bool{}
	for _, x := range caps {
		set[x] = true
	}
	for _, d := range c.GetDropCapabilities() {
		if norm(d) == "ALL" {
			set = map[string]bool{}
			continue
		}
		delete(set, norm(d))
	}
	for _, a := range c.GetAddCapabilities() {
		if norm(a) == "ALL" {
			for _, x := range allCaps() {
				set[x] = true
			}
			continue
		}
		set[norm(a)] = true
	}
	out := make([]string, 0, len(set))
	for _, x := range append(allCaps(), caps...) {
		if set[x] {
			out = append(out, x)
			delete(set, x)
		}
	}
	for x := range set {
		out = append(out, x)
	}
	return out
}

// writePodFiles writes the pod's hosts, hostname and resolv.conf.
func writePodFiles(dir string, cfg *runtimeapi.PodSandboxConfig) error {
	hostname := cfg.GetHostname()
	if hostname == "" {
		h, _ := os.Hostname()
		hostname = h
	}
	hosts := "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
	resolv := ""
	if d := cfg.GetDnsConfig(); d != nil && (len(d.GetServers()) > 0 || len(d.GetSearches()) > 0 || len(d.GetOptions()) > 0) {
		var b strings.Builder
		if len(d.GetSearches()) > 0 {
			fmt.Fprintf(&b, "search %s\n", strings.Join(d.GetSearches(), " "))
		}
		for _, s := range d.GetServers() {
			fmt.Fprintf(&b, "nameserver %s\n", s)
		}
		if len(d.GetOptions()) > 0 {
			fmt.Fprintf(&b, "options %s\n", strings.Join(d.GetOptions(), " "))
		}
		resolv = b.String()
	} else if b, err := os.ReadFile("/etc/resolv.conf"); err == nil {
		resolv = string(b)
	}
	for name, content := range map[string]string{"hosts": hosts, "hostname": hostname + "\n", "resolv.conf": resolv} {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o644); err != nil {
			return fmt.Errorf("write pod file %q: %w", name, err)
		}
	}
	return nil
}

// boundedCaps drops the capabilities this process's bounding set lacks (a
// container cannot get them: here CAP_SYS_RESOURCE is missing), keeping
// the order.
func boundedCaps(caps []string) []string {
	bnd, ok := capBound()
	if !ok {
		return caps
	}
	index := map[string]int{}
	for i, n := range allCapNames {
		index["CAP_"+n] = i
	}
	out := caps[:0:0]
	for _, c := range caps {
		if i, known := index[c]; known && bnd&(1<<uint(i)) == 0 {
			continue
		}
		out = append(out, c)
	}
	return out
}

// capBound reads CapBnd from /proc/self/status.
func capBound() (uint64, bool) {
	var bnd uint64
	found := false
	readLines("/proc/self/status", func(f []string) {
		if len(f) == 2 && f[0] == "CapBnd" {
			if v, err := strconv.ParseUint(strings.TrimSpace(f[1]), 16, 64); err == nil {
				bnd, found = v, true
			}
		}
	})
	return bnd, found
}

// seccompFor returns the seccomp filter of a container: none when
// privileged or unconfined (also when the CRI gives no profile), the profile
// file for Localhost (Docker's JSON format, which the OCI spec shares), and
// vhive's default otherwise (RuntimeDefault).
func seccompFor(sc *runtimeapi.LinuxContainerSecurityContext, privileged bool, caps []string) (*specs.LinuxSeccomp, error) {
	prof := sc.GetSeccomp()
	if privileged || prof == nil {
		return nil, nil
	}
	switch prof.GetProfileType() {
	case runtimeapi.SecurityProfile_Unconfined:
		return nil, nil
	case runtimeapi.SecurityProfile_Localhost:
		path := prof.GetLocalhostRef()
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, fmt.Errorf("seccomp localhost profile: %w", err)
		}
		var sp specs.LinuxSeccomp
		if err := json.Unmarshal(b, &sp); err != nil {
			return nil, fmt.Errorf("seccomp localhost profile %q: %w", path, err)
		}
		if sp.DefaultAction == "" {
			return nil, fmt.Errorf("seccomp localhost profile %q has no defaultAction", path)
		}
		return &sp, nil
	default:
		return defaultSeccomp(caps), nil
	}
}

// defaultSeccomp allows everything but the syscalls Docker's default
// profile refuses to containers (kernel modules, keyring, clock, reboot,
// swap, accounting, ...); those gated by CAP_SYS_ADMIN (mount, unshare,
// setns, ...) are allowed when the container has it.
func defaultSeccomp(caps []string) *specs.LinuxSeccomp {
	denied := []string{"acct", "add_key", "bpf", "clock_adjtime", "clock_settime", "create_module", "delete_module",
		"finit_module", "get_kernel_syms", "get_mempolicy", "init_module", "ioperm", "iopl", "kcmp",
		"kexec_file_load", "kexec_load", "keyctl", "lookup_dcookie", "mbind", "move_pages", "nfsservctl",
		"open_by_handle_at", "perf_event_open", "process_vm_readv", "process_vm_writev", "query_module",
		"quotactl", "reboot", "request_key", "set_mempolicy", "settimeofday", "stime", "swapon", "swapoff",
		"sysfs", "_sysctl", "uselib", "userfaultfd", "ustat", "vm86", "vm86old"}
	admin := []string{"mount", "umount", "umount2", "unshare", "setns", "pivot_root", "name_to_handle_at", "fanotify_init",
		"open_tree", "move_mount", "fsopen", "fsconfig", "fsmount", "fspick", "syslog"}
	hasAdmin := false
	for _, c := range caps {
		if c == "CAP_SYS_ADMIN" {
			hasAdmin = true
		}
	}
	if !hasAdmin {
		denied = append(denied, admin...)
	}
	eperm := uint(unix.EPERM)
	return &specs.LinuxSeccomp{
		DefaultAction: specs.ActAllow,
		Architectures: []specs.Arch{specs.ArchX86_64, specs.ArchX86, specs.ArchX32},
		Syscalls:      []specs.LinuxSyscall{{Names: denied, Action: specs.ActErrno, ErrnoRet: &eperm}},
	}
}
