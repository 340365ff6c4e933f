package oci

import (
	"bufio"
	"errors"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"

	specs "github.com/opencontainers/runtime-spec/specs-go"

	"vhive.dev/vhive/internal/sandbox"
)

// cpuPeriod is the CFS period used for CPU limits (µs).
const cpuPeriod = 100000

// defaultCaps returns the minimal capability set given to the function
// process: enough for a server that drops to a user or binds a low port,
// nothing that reaches outside its own files.
func defaultCaps() []string {
	return []string{
		"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FOWNER", "CAP_FSETID", "CAP_KILL",
		"CAP_SETGID", "CAP_SETUID", "CAP_NET_BIND_SERVICE",
	}
}

// buildSpec generates the OCI runtime spec of one instance.
func buildSpec(spec sandbox.Spec, rootPath string, readonly bool, netnsPath, cgroupsPath string) (*specs.Spec, error) {
	user, err := resolveUser(spec.Rootfs, spec.Process.User)
	if err != nil {
		return nil, fmt.Errorf("oci: sandbox %q: %w", spec.ID, err)
	}
	cwd := spec.Process.Cwd
	if cwd == "" {
		cwd = "/"
	}
	if !strings.HasPrefix(cwd, "/") {
		return nil, fmt.Errorf("oci: sandbox %q: Process.Cwd %q is not absolute", spec.ID, cwd)
	}
	env := buildEnv(spec.Process.Env, spec.Port)
	for _, kv := range env {
		if !strings.Contains(kv, "=") {
			return nil, fmt.Errorf("oci: sandbox %q: environment entry %q is not K=V", spec.ID, kv)
		}
	}
	caps := defaultCaps()
	s := &specs.Spec{
		Version:  specs.Version,
		Hostname: spec.ID,
		Root:     &specs.Root{Path: rootPath, Readonly: readonly},
		Process: &specs.Process{
			Args:            append([]string(nil), spec.Process.Args...),
			Env:             env,
			Cwd:             cwd,
			User:            user,
			NoNewPrivileges: true,
			Capabilities: &specs.LinuxCapabilities{
				Bounding: caps, Effective: caps, Permitted: caps,
			},
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "strictatime", "mode=755", "size=65536k"}},
			{Destination: "/dev/pts", Type: "devpts", Source: "devpts", Options: []string{"nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620"}},
			{Destination: "/dev/shm", Type: "tmpfs", Source: "shm", Options: []string{"nosuid", "noexec", "nodev", "mode=1777", "size=65536k"}},
			{Destination: "/dev/mqueue", Type: "mqueue", Source: "mqueue", Options: []string{"nosuid", "noexec", "nodev"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
		},
		Linux: &specs.Linux{
			CgroupsPath: cgroupsPath,
			Namespaces: []specs.LinuxNamespace{
				{Type: specs.PIDNamespace},
				{Type: specs.IPCNamespace},
				{Type: specs.UTSNamespace},
				{Type: specs.MountNamespace},
				{Type: specs.NetworkNamespace, Path: netnsPath},
			},
			Resources: &specs.LinuxResources{
				Devices: []specs.LinuxDeviceCgroup{{Allow: false, Access: "rwm"}},
			},
			MaskedPaths: []string{
				"/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats",
				"/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/proc/scsi",
				"/sys/firmware",
			},
			ReadonlyPaths: []string{
				"/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger",
			},
		},
	}
	if spec.MemoryLimit > 0 {
		limit := spec.MemoryLimit
		s.Linux.Resources.Memory = &specs.LinuxMemory{Limit: &limit}
	}
	if spec.CPULimit > 0 {
		quota := int64(spec.CPULimit * cpuPeriod)
		if quota < 1000 {
			return nil, fmt.Errorf("oci: sandbox %q: CPULimit %g is below the 0.01 core minimum", spec.ID, spec.CPULimit)
		}
		period := uint64(cpuPeriod)
		s.Linux.Resources.CPU = &specs.LinuxCPU{Quota: &quota, Period: &period}
	}
	return s, nil
}

// buildEnv returns env with GUEST_PORT set to port (replacing any given
// value) and a default PATH if none is given.
func buildEnv(in []string, port int) []string {
	out := make([]string, 0, len(in)+2)
	hasPath := false
	for _, kv := range in {
		if strings.HasPrefix(kv, "GUEST_PORT=") {
			continue
		}
		if strings.HasPrefix(kv, "PATH=") {
			hasPath = true
		}
		out = append(out, kv)
	}
	if !hasPath {
		out = append(out, "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
	}
	return append(out, "GUEST_PORT="+strconv.Itoa(port))
}

// resolveUser turns "uid[:gid]" or "name[:group]" into a specs.User, looking
// names up in the image's /etc/passwd and /etc/group. Empty means root.
func resolveUser(rootfs, u string) (specs.User, error) {
	if u == "" {
		return specs.User{}, nil
	}
	name, group, hasGroup := strings.Cut(u, ":")
	var out specs.User
	if uid, err := strconv.ParseUint(name, 10, 32); err == nil {
		out.UID = uint32(uid)
		// A numeric user without a group takes its primary group from
		// /etc/passwd when listed there, else gid 0.
		if !hasGroup {
			if ent, ok, err := lookupDB(rootfs, "/etc/passwd", func(f []string) bool { return len(f) > 3 && f[2] == name }); err != nil {
				return out, err
			} else if ok {
				gid, _ := strconv.ParseUint(ent[3], 10, 32)
				out.GID = uint32(gid)
			}
		}
	} else {
		ent, ok, err := lookupDB(rootfs, "/etc/passwd", func(f []string) bool { return len(f) > 3 && f[0] == name })
		if err != nil {
			return out, err
		}
		if !ok {
			return out, fmt.Errorf("user %q is not in the image's /etc/passwd", name)
		}
		uid, err1 := strconv.ParseUint(ent[2], 10, 32)
		gid, err2 := strconv.ParseUint(ent[3], 10, 32)
		if err1 != nil || err2 != nil {
			return out, fmt.Errorf("user %q: malformed /etc/passwd entry %q", name, strings.Join(ent, ":"))
		}
		out.UID, out.GID = uint32(uid), uint32(gid)
	}
	if hasGroup {
		if gid, err := strconv.ParseUint(group, 10, 32); err == nil {
			out.GID = uint32(gid)
		} else {
			ent, ok, err := lookupDB(rootfs, "/etc/group", func(f []string) bool { return len(f) > 2 && f[0] == group })
			if err != nil {
				return out, err
			}
			if !ok {
				return out, fmt.Errorf("group %q is not in the image's /etc/group", group)
			}
			gid, err := strconv.ParseUint(ent[2], 10, 32)
			if err != nil {
				return out, fmt.Errorf("group %q: malformed /etc/group entry", group)
			}
			out.GID = uint32(gid)
		}
	}
	return out, nil
}

// lookupDB finds the first line of a colon-separated database file inside
// rootfs (confined to rootfs) whose fields match.
func lookupDB(rootfs, name string, match func([]string) bool) ([]string, bool, error) {
	f, err := os.OpenInRoot(rootfs, strings.TrimPrefix(name, "/"))
	if errors.Is(err, os.ErrNotExist) {
		return nil, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("read the image's %s: %w", name, err)
	}
	defer f.Close()
	sc := bufio.NewScanner(io.LimitReader(f, 16<<20))
	for sc.Scan() {
		line := sc.Text()
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		if fields := strings.Split(line, ":"); match(fields) {
			return fields, true, nil
		}
	}
	if err := sc.Err(); err != nil {
		return nil, false, fmt.Errorf("read the image's %s: %w", name, err)
	}
	return nil, false, nil
}
