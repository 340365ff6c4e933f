package bench

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"runtime/debug"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// dropCachesPath is the kernel knob that drops the page cache.
const dropCachesPath = "/proc/sys/vm/drop_caches"

// DropPageCache flushes dirty pages and drops the page cache, dentries and
// inodes (sync; echo 3 > /proc/sys/vm/drop_caches), as vHive does before
// every measured cold start so that images and snapshots are read from disk.
func DropPageCache() error {
	unix.Sync()
	if err := os.WriteFile(dropCachesPath, []byte("3\n"), 0); err != nil {
		if errors.Is(err, os.ErrPermission) || errors.Is(err, unix.EROFS) {
			return fmt.Errorf("drop page cache via %s: %w (needs root and a writable /proc/sys; pass --with-cache to measure with a warm page cache)", dropCachesPath, err)
		}
		return fmt.Errorf("drop page cache via %s: %w", dropCachesPath, err)
	}
	return nil
}

// Machine describes the host a benchmark ran on.
type Machine struct {
	Hostname string `json:"hostname"`
	Kernel   string `json:"kernel"`  // uname -r
	Version  string `json:"version"` // uname -v
	Arch     string `json:"arch"`    // uname -m
	CPUs     int    `json:"cpus"`    // online CPUs
	CPUModel string `json:"cpu_model,omitempty"`
	MemBytes uint64 `json:"mem_bytes"` // total RAM
}

// Versions of the software under test.
type Versions struct {
	Go    string `json:"go"`
	Vhive string `json:"vhive"`
	Runsc string `json:"runsc,omitempty"`
	Runc  string `json:"runc,omitempty"`
}

// RunInfo is written next to the results as run.json: what ran, where, with
// which flags.
type RunInfo struct {
	Command  string            `json:"command"`
	Started  time.Time         `json:"started"`
	Finished time.Time         `json:"finished"`
	Machine  Machine           `json:"machine"`
	Versions Versions          `json:"versions"`
	Flags    map[string]string `json:"flags"`
}

func utsString(b []byte) string {
	if i := strings.IndexByte(string(b), 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// ReadMachine describes this host from uname, sysinfo and /proc/cpuinfo.
func ReadMachine() (Machine, error) {
	var u unix.Utsname
	if err := unix.Uname(&u); err != nil {
		return Machine{}, fmt.Errorf("uname: %w", err)
	}
	var si unix.Sysinfo_t
	if err := unix.Sysinfo(&si); err != nil {
		return Machine{}, fmt.Errorf("sysinfo: %w", err)
	}
	m := Machine{
		Hostname: utsString(u.Nodename[:]),
		Kernel:   utsString(u.Release[:]),
		Version:  utsString(u.Version[:]),
		Arch:     utsString(u.Machine[:]),
		CPUs:     runtime.NumCPU(),
		MemBytes: uint64(si.Totalram) * uint64(si.Unit),
	}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.Lines(string(b)) {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				m.CPUModel = strings.TrimSpace(v)
				break
			}
		}
	}
	return m, nil
}

// VhiveVersion is the module version and VCS revision this binary was built
// from, as recorded by the Go toolchain.
func VhiveVersion() string {
	bi, ok := debug.ReadBuildInfo()
	if !ok {
		return "unknown"
	}
	v := bi.Main.Version
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v += " " + s.Value
		case "vcs.modified":
			if s.Value == "true" {
				v += " (modified)"
			}
		}
	}
	return v
}

// ToolVersion runs `<path> --version` and returns its first output line, or
// "" when path is empty. A failing tool gives an error naming it.
func ToolVersion(ctx context.Context, path string) (string, error) {
	if path == "" {
		return "", nil
	}
	ctx, cancel := context.WithTimeout(ctx, 10*time.Second)
	defer cancel()
	out, err := exec.CommandContext(ctx, path, "--version").CombinedOutput()
	if err != nil {
		return "", fmt.Errorf("%s --version: %w: %s", path, err, strings.TrimSpace(string(out)))
	}
	first, _, _ := strings.Cut(strings.TrimSpace(string(out)), "\n")
	return first, nil
}

// NewRunInfo gathers machine facts and versions. runsc and runc are the
// paths of the tools whose versions to record ("" to skip one).
func NewRunInfo(ctx context.Context, command string, flags map[string]string, runsc, runc string) (RunInfo, error) {
	m, err := ReadMachine()
	if err != nil {
		return RunInfo{}, err
	}
	ri := RunInfo{
		Command: command,
		Started: time.Now().UTC(),
		Machine: m,
		Versions: Versions{
			Go:    runtime.Version(),
			Vhive: VhiveVersion(),
		},
		Flags: flags,
	}
	if ri.Versions.Runsc, err = ToolVersion(ctx, runsc); err != nil {
		return RunInfo{}, err
	}
	if ri.Versions.Runc, err = ToolVersion(ctx, runc); err != nil {
		return RunInfo{}, err
	}
	return ri, nil
}

// WriteJSON writes v as indented JSON to path.
func WriteJSON(path string, v any) error {
	b, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return fmt.Errorf("encode %q: %w", path, err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write %q: %w", path, err)
	}
	return nil
}
