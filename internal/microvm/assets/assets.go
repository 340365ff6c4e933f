// Package assets builds and caches what a microVM boots from, under
// <cache>/microvm (cache: $VHIVE_CACHE, default /var/cache/vhive):
//
//	assets.json                 the Manifest of the current assets
//	kernel/<package>_<version>/ vmlinuz and the needed modules (*.ko), from
//	                            Debian's linux-image-*-cloud-amd64 package
//	                            (apt-get download + dpkg-deb -x into a
//	                            temporary directory; never installed)
//	initramfs-<sha256>.cpio.gz  /init = vhive's guest agent, /dev/console,
//	                            /lib/modules/*.ko and /lib/modules/order
//
// QEMU comes from apt (qemu-system-x86; bookworm-backports when apt has it,
// else Debian stable) and is installed on the host when missing.
//
// Initramfs files are content-addressed and never removed by Ensure, so a
// snapshot that names one keeps working after the agent changes.
package assets

import (
	"bytes"
	"context"
	"crypto/sha256"
	"debug/elf"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"

	"github.com/klauspost/compress/gzip"
	"github.com/u-root/u-root/pkg/cpio"
)

// KernelMetaPackage is the Debian package whose dependency names the kernel.
const KernelMetaPackage = "linux-image-cloud-amd64"

// QEMUPackage is Debian's package of qemu-system-x86_64.
const QEMUPackage = "qemu-system-x86"

// Modules are the kernel modules the guest loads (with their dependencies,
// found in each module's .modinfo): virtio-mmio transport, block, net,
// virtio-serial (the agent channel) and overlayfs (the writable root).
var Modules = []string{"virtio_ring", "virtio", "virtio_mmio", "virtio_blk", "failover", "net_failover", "virtio_net", "virtio_console", "overlay"}

// Manifest describes the assets in use; assets.json holds it.
type Manifest struct {
	QEMU            string `json:"qemu"`
	QEMUVersion     string `json:"qemu_version"`
	KernelPackage   string `json:"kernel_package"`
	KernelVersion   string `json:"kernel_version"` // Debian package version
	KernelRelease   string `json:"kernel_release"` // uname -r
	Vmlinuz         string `json:"vmlinuz"`
	VmlinuzSHA256   string `json:"vmlinuz_sha256"`
	Initramfs       string `json:"initramfs"`
	InitramfsSHA256 string `json:"initramfs_sha256"`
	// Modules in load order (file names under /lib/modules in the guest).
	Modules []string `json:"modules"`
}

// Options configure Ensure.
type Options struct {
	// Dir is <cache>/microvm. Default: Dir(CacheDir()).
	Dir string
	// Agent is the path of a prebuilt guest agent (static linux/amd64). If
	// empty, it is built with `go build` from this module
	// (vhive.dev/vhive/internal/microvm/guestagent), which needs the source
	// tree and the Go toolchain (tools/microvm, tests).
	Agent string
	// KernelPackage pins the kernel package; default: the one
	// KernelMetaPackage depends on, or the cached one if any.
	KernelPackage string
	Logger        *slog.Logger
}

// CacheDir is $VHIVE_CACHE or /var/cache/vhive.
func CacheDir() string {
	if d := os.Getenv("VHIVE_CACHE"); d != "" {
		return d
	}
	return "/var/cache/vhive"
}

// Dir is where the microVM assets live below cache.
func Dir(cache string) string { return filepath.Join(cache, "microvm") }

// Load reads the manifest Ensure wrote under dir and checks that its files
// exist. It builds nothing (the daemon's path).
func Load(dir string) (*Manifest, error) {
	data, err := os.ReadFile(filepath.Join(dir, "assets.json"))
	if err != nil {
		return nil, fmt.Errorf("microvm assets: %w (build them with `go run ./tools/microvm`)", err)
	}
	var m Manifest
	if err := json.Unmarshal(data, &m); err != nil {
		return nil, fmt.Errorf("microvm assets: %s: %w", filepath.Join(dir, "assets.json"), err)
	}
	for _, p := range []string{m.QEMU, m.Vmlinuz, m.Initramfs} {
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("microvm assets: %w (rebuild with `go run ./tools/microvm`)", err)
		}
	}
	return &m, nil
}

// Ensure makes every asset present (installing QEMU, downloading and
// unpacking the kernel, building the agent and initramfs as needed) and
// writes the manifest.
func Ensure(ctx context.Context, opts Options) (*Manifest, error) {
	if opts.Dir == "" {
		opts.Dir = Dir(CacheDir())
	}
	if opts.Logger == nil {
		opts.Logger = slog.Default()
	}
	log := opts.Logger.With("component", "microvm-assets")
	if err := os.MkdirAll(opts.Dir, 0o755); err != nil {
		return nil, fmt.Errorf("microvm assets: %w", err)
	}
	var old Manifest
	if data, err := os.ReadFile(filepath.Join(opts.Dir, "assets.json")); err == nil {
		_ = json.Unmarshal(data, &old)
	}
	m := &Manifest{}
	var err error
	if m.QEMU, m.QEMUVersion, err = ensureQEMU(ctx, log); err != nil {
		return nil, err
	}
	pkg := opts.KernelPackage
	if pkg == "" && old.KernelPackage != "" {
		pkg = old.KernelPackage
	}
	if err := ensureKernel(ctx, log, opts.Dir, pkg, &old, m); err != nil {
		return nil, err
	}
	agent := opts.Agent
	if agent == "" {
		tmp, err := os.MkdirTemp(opts.Dir, ".agent-")
		if err != nil {
			return nil, fmt.Errorf("microvm assets: %w", err)
		}
		defer os.RemoveAll(tmp)
		agent = filepath.Join(tmp, "init")
		if err := BuildAgent(ctx, agent); err != nil {
			return nil, err
		}
	}
	if err := buildInitramfs(opts.Dir, agent, m); err != nil {
		return nil, err
	}
	data, err := json.MarshalIndent(m, "", "  ")
	if err != nil {
		return nil, err
	}
	if err := writeAtomic(filepath.Join(opts.Dir, "assets.json"), data, 0o644); err != nil {
		return nil, fmt.Errorf("microvm assets: write manifest: %w", err)
	}
	log.Info("microvm assets ready", "qemu", m.QEMUVersion, "kernel", m.KernelPackage+" "+m.KernelVersion, "vmlinuz_sha256", m.VmlinuzSHA256, "initramfs", m.Initramfs)
	return m, nil
}

// BuildAgent builds the guest agent as a static linux/amd64 binary at out.
func BuildAgent(ctx context.Context, out string) error {
	cmd := exec.CommandContext(ctx, "go", "build", "-trimpath", "-ldflags=-s -w", "-o", out, "vhive.dev/vhive/internal/microvm/guestagent")
	cmd.Env = append(os.Environ(), "CGO_ENABLED=0", "GOOS=linux", "GOARCH=amd64")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("microvm assets: build the guest agent: %w: %s", err, bytes.TrimSpace(b))
	}
	return nil
}

func run(ctx context.Context, dir string, name string, args ...string) (string, error) {
	cmd := exec.CommandContext(ctx, name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), "DEBIAN_FRONTEND=noninteractive", "LC_ALL=C")
	var out, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &stderr
	if err := cmd.Run(); err != nil {
		return out.String(), fmt.Errorf("%s %s: %w: %s", name, strings.Join(args, " "), err, strings.TrimSpace(stderr.String()))
	}
	return out.String(), nil
}

var qemuVersionRE = regexp.MustCompile(`QEMU emulator version (\S+)`)

// ensureQEMU finds qemu-system-x86_64 or installs it with apt (backports
// first, then stable).
func ensureQEMU(ctx context.Context, log *slog.Logger) (string, string, error) {
	path, err := exec.LookPath("qemu-system-x86_64")
	if err != nil {
		log.Info("installing QEMU with apt", "package", QEMUPackage)
		if _, err := run(ctx, "", "apt-get", "-t", "bookworm-backports", "install", "-y", "--no-install-recommends", QEMUPackage); err != nil {
			log.Info("no bookworm-backports QEMU, installing Debian stable's", "err", err)
			if _, err := run(ctx, "", "apt-get", "install", "-y", "--no-install-recommends", QEMUPackage); err != nil {
				if _, uerr := run(ctx, "", "apt-get", "update"); uerr != nil {
					return "", "", fmt.Errorf("microvm assets: install %s: %w (apt-get update: %v)", QEMUPackage, err, uerr)
				}
				if _, err := run(ctx, "", "apt-get", "install", "-y", "--no-install-recommends", QEMUPackage); err != nil {
					return "", "", fmt.Errorf("microvm assets: install %s: %w", QEMUPackage, err)
				}
			}
		}
		if path, err = exec.LookPath("qemu-system-x86_64"); err != nil {
			return "", "", fmt.Errorf("microvm assets: qemu-system-x86_64 not in PATH after installing %s: %w", QEMUPackage, err)
		}
	}
	out, err := run(ctx, "", path, "--version")
	if err != nil {
		return "", "", fmt.Errorf("microvm assets: %w", err)
	}
	mm := qemuVersionRE.FindStringSubmatch(out)
	if mm == nil {
		return "", "", fmt.Errorf("microvm assets: cannot read QEMU's version from %q", strings.TrimSpace(out))
	}
	return path, strings.TrimSpace(strings.SplitN(out, "\n", 2)[0]), nil
}

var dependsRE = regexp.MustCompile(`(?m)^\s*Depends:\s*(linux-image-\S+-cloud-amd64)\s*$`)

// resolveKernelPackage returns the package KernelMetaPackage depends on.
func resolveKernelPackage(ctx context.Context) (string, error) {
	out, err := run(ctx, "", "apt-cache", "depends", KernelMetaPackage)
	if err != nil || !dependsRE.MatchString(out) {
		if _, uerr := run(ctx, "", "apt-get", "update"); uerr != nil {
			return "", fmt.Errorf("microvm assets: apt-get update: %w", uerr)
		}
		if out, err = run(ctx, "", "apt-cache", "depends", KernelMetaPackage); err != nil {
			return "", fmt.Errorf("microvm assets: %w", err)
		}
	}
	mm := dependsRE.FindStringSubmatch(out)
	if mm == nil {
		return "", fmt.Errorf("microvm assets: %s depends on no linux-image-*-cloud-amd64 package: %q", KernelMetaPackage, out)
	}
	return mm[1], nil
}

// ensureKernel fills the kernel fields of m: reused from old when its files
// are intact, else downloaded and unpacked.
func ensureKernel(ctx context.Context, log *slog.Logger, dir, pkg string, old, m *Manifest) error {
	if pkg != "" && old.KernelPackage == pkg && old.Vmlinuz != "" {
		if sum, err := fileSHA256(old.Vmlinuz); err == nil && sum == old.VmlinuzSHA256 {
			kdir := filepath.Dir(old.Vmlinuz)
			ok := true
			for _, mod := range old.Modules {
				if _, err := os.Stat(filepath.Join(kdir, "modules", mod)); err != nil {
					ok = false
				}
			}
			if ok && len(old.Modules) > 0 {
				m.KernelPackage, m.KernelVersion, m.KernelRelease = old.KernelPackage, old.KernelVersion, old.KernelRelease
				m.Vmlinuz, m.VmlinuzSHA256, m.Modules = old.Vmlinuz, old.VmlinuzSHA256, old.Modules
				return nil
			}
		}
	}
	if pkg == "" {
		var err error
		if pkg, err = resolveKernelPackage(ctx); err != nil {
			return err
		}
	}
	tmp, err := os.MkdirTemp(dir, ".kernel-")
	if err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	defer os.RemoveAll(tmp)
	log.Info("downloading the guest kernel", "package", pkg)
	if _, err := run(ctx, tmp, "apt-get", "download", pkg); err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	debs, _ := filepath.Glob(filepath.Join(tmp, pkg+"_*.deb"))
	if len(debs) != 1 {
		return fmt.Errorf("microvm assets: apt-get download %s left %d .deb files", pkg, len(debs))
	}
	ver, err := run(ctx, "", "dpkg-deb", "-f", debs[0], "Version")
	if err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	ver = strings.TrimSpace(ver)
	x := filepath.Join(tmp, "x")
	if _, err := run(ctx, "", "dpkg-deb", "-x", debs[0], x); err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	vmlinuz, _ := filepath.Glob(filepath.Join(x, "boot", "vmlinuz-*"))
	if len(vmlinuz) != 1 {
		return fmt.Errorf("microvm assets: %s holds %d boot/vmlinuz-* files", pkg, len(vmlinuz))
	}
	release := strings.TrimPrefix(filepath.Base(vmlinuz[0]), "vmlinuz-")
	modRoot := filepath.Join(x, "lib", "modules", release)
	if _, err := os.Stat(modRoot); err != nil {
		// usrmerge layouts
		modRoot = filepath.Join(x, "usr", "lib", "modules", release)
	}
	order, files, err := resolveModules(modRoot, Modules)
	if err != nil {
		return fmt.Errorf("microvm assets: kernel %s: %w", pkg, err)
	}
	kdir := filepath.Join(dir, "kernel", pkg+"_"+ver)
	stage := kdir + ".tmp"
	_ = os.RemoveAll(stage)
	if err := os.MkdirAll(filepath.Join(stage, "modules"), 0o755); err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	if err := copyFile(vmlinuz[0], filepath.Join(stage, "vmlinuz")); err != nil {
		return err
	}
	for i, name := range order {
		if err := writeModule(files[i], filepath.Join(stage, "modules", name)); err != nil {
			return err
		}
	}
	_ = os.RemoveAll(kdir)
	if err := os.Rename(stage, kdir); err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	sum, err := fileSHA256(filepath.Join(kdir, "vmlinuz"))
	if err != nil {
		return err
	}
	m.KernelPackage, m.KernelVersion, m.KernelRelease = pkg, ver, release
	m.Vmlinuz, m.VmlinuzSHA256, m.Modules = filepath.Join(kdir, "vmlinuz"), sum, order
	return nil
}

func modName(file string) string {
	n := filepath.Base(file)
	for _, ext := range []string{".xz", ".zst", ".gz"} {
		n = strings.TrimSuffix(n, ext)
	}
	return strings.ReplaceAll(strings.TrimSuffix(n, ".ko"), "-", "_")
}

// resolveModules finds want and their dependencies (the "depends=" of each
// module's .modinfo section) under modRoot and returns them in load order
// (dependencies first) as guest file names (<name>.ko) with their source
// files.
func resolveModules(modRoot string, want []string) ([]string, []string, error) {
	index := map[string]string{}
	err := filepath.WalkDir(modRoot, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if !d.IsDir() && strings.Contains(d.Name(), ".ko") {
			index[modName(p)] = p
		}
		return nil
	})
	if err != nil {
		return nil, nil, fmt.Errorf("list modules: %w", err)
	}
	var order, files []string
	state := map[string]int{} // 1 visiting, 2 done
	var visit func(name string, from string) error
	visit = func(name, from string) error {
		switch state[name] {
		case 1:
			return fmt.Errorf("module dependency cycle at %s", name)
		case 2:
			return nil
		}
		file, ok := index[name]
		if !ok {
			return fmt.Errorf("module %s (needed by %s) not found under %s", name, from, modRoot)
		}
		state[name] = 1
		data, err := readModule(file)
		if err != nil {
			return err
		}
		deps, err := moduleDepends(data)
		if err != nil {
			return fmt.Errorf("module %s: %w", file, err)
		}
		for _, d := range deps {
			if err := visit(d, name); err != nil {
				return err
			}
		}
		state[name] = 2
		order = append(order, name+".ko")
		files = append(files, file)
		return nil
	}
	for _, w := range want {
		if err := visit(w, "vhive"); err != nil {
			return nil, nil, err
		}
	}
	return order, files, nil
}

// readModule returns a module's ELF bytes, decompressing .ko.xz with xz(1).
func readModule(file string) ([]byte, error) {
	switch {
	case strings.HasSuffix(file, ".ko"):
		return os.ReadFile(file)
	case strings.HasSuffix(file, ".ko.xz"):
		out, err := exec.Command("xz", "-dc", file).Output()
		if err != nil {
			return nil, fmt.Errorf("decompress %s with xz: %w", file, err)
		}
		return out, nil
	default:
		return nil, fmt.Errorf("module %s: compression not supported (want .ko or .ko.xz)", file)
	}
}

func writeModule(src, dst string) error {
	data, err := readModule(src)
	if err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	return os.WriteFile(dst, data, 0o644)
}

// moduleDepends reads "depends=a,b" from the .modinfo section.
func moduleDepends(data []byte) ([]string, error) {
	f, err := elf.NewFile(bytes.NewReader(data))
	if err != nil {
		return nil, err
	}
	sec := f.Section(".modinfo")
	if sec == nil {
		return nil, errors.New("no .modinfo section")
	}
	info, err := sec.Data()
	if err != nil {
		return nil, err
	}
	for _, kv := range bytes.Split(info, []byte{0}) {
		if v, ok := bytes.CutPrefix(kv, []byte("depends=")); ok {
			var deps []string
			for _, d := range strings.Split(string(v), ",") {
				if d = strings.TrimSpace(d); d != "" {
					deps = append(deps, strings.ReplaceAll(d, "-", "_"))
				}
			}
			return deps, nil
		}
	}
	return nil, nil
}

// buildInitramfs writes the gzip'd newc archive (reproducible: fixed
// owners, times and order) and names it by its SHA-256.
func buildInitramfs(dir, agent string, m *Manifest) error {
	agentData, err := os.ReadFile(agent)
	if err != nil {
		return fmt.Errorf("microvm assets: guest agent: %w", err)
	}
	kdir := filepath.Dir(m.Vmlinuz)
	recs := []cpio.Record{
		cpio.Directory("dev", 0o755),
		cpio.CharDev("dev/console", 0o600, 5, 1),
		cpio.CharDev("dev/null", 0o666, 1, 3),
		cpio.Directory("proc", 0o755),
		cpio.Directory("sys", 0o755),
		cpio.Directory("run", 0o755),
		cpio.Directory("lib", 0o755),
		cpio.Directory("lib/modules", 0o755),
		cpio.StaticFile("lib/modules/order", strings.Join(m.Modules, "\n")+"\n", 0o644),
		cpio.StaticRecord(agentData, cpio.Info{Name: "init", Mode: cpio.S_IFREG | 0o755}),
	}
	mods := append([]string(nil), m.Modules...)
	sort.Strings(mods)
	for _, name := range mods {
		data, err := os.ReadFile(filepath.Join(kdir, "modules", name))
		if err != nil {
			return fmt.Errorf("microvm assets: %w", err)
		}
		recs = append(recs, cpio.StaticRecord(data, cpio.Info{Name: "lib/modules/" + name, Mode: cpio.S_IFREG | 0o644}))
	}
	cpio.MakeAllReproducible(recs)
	var buf bytes.Buffer
	zw, err := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	if err != nil {
		return err
	}
	w := cpio.Newc.Writer(zw)
	if err := cpio.WriteRecords(w, recs); err != nil {
		return fmt.Errorf("microvm assets: write initramfs: %w", err)
	}
	if err := cpio.WriteTrailer(w); err != nil {
		return fmt.Errorf("microvm assets: write initramfs: %w", err)
	}
	if err := zw.Close(); err != nil {
		return err
	}
	sum := sha256.Sum256(buf.Bytes())
	hexSum := hex.EncodeToString(sum[:])
	path := filepath.Join(dir, "initramfs-"+hexSum[:16]+".cpio.gz")
	if _, err := os.Stat(path); err != nil {
		if err := writeAtomic(path, buf.Bytes(), 0o644); err != nil {
			return fmt.Errorf("microvm assets: %w", err)
		}
	}
	m.Initramfs, m.InitramfsSHA256 = path, hexSum
	return nil
}

func fileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", fmt.Errorf("microvm assets: %w", err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("microvm assets: hash %s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func copyFile(src, dst string) error {
	data, err := os.ReadFile(src)
	if err != nil {
		return fmt.Errorf("microvm assets: %w", err)
	}
	return os.WriteFile(dst, data, 0o644)
}

func writeAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), ".tmp-"+filepath.Base(path)+"-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	_, err = f.Write(data)
	if err == nil {
		err = f.Chmod(perm)
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		os.Remove(tmp)
	}
	return err
}
