// Package debimage builds OCI images of functions whose runtime comes from
// Debian packages (the Python function suite under functions/python), with
// mmdebstrap and no container registry or Docker.
//
// # Function directory
//
//	packages    Debian packages, one per line ('#' starts a comment); the
//	            runtime's own (python3-minimal, python3-grpcio,
//	            python3-protobuf) are always added
//	handler.py  the function: handle(name, input_set) -> str, optional
//	            init(data_dir) run once at start-up (see functions/python)
//	build.py    optional: run at image build time as
//	            `python3 build.py OUT` chrooted into the base rootfs, with
//	            the function's files beside it; what it writes to OUT
//	            (a generated input, a trained model) ships in the image
//	full-only   optional marker: the function is built only for the full
//	            suite (make images-full), e.g. because its packages are big
//	*           every other regular file ships in the image; so does
//	            a symlink to a file of another function directory of the
//	            suite, as a copy of that file (lr-training/reviews.py is
//	            lr-serving's), so that two functions share one source
//
// # Image
//
// Two layers: the base — the mmdebstrap rootfs of the package set, shared by
// every function with the same set (same digest) — and a thin function layer
// with /opt/vhive/server.py (the gRPC server of vHive's contract, from
// functions/python/runtime) and /opt/vhive/function/ (the function's files
// and build outputs). Config: Entrypoint [/usr/bin/python3 /opt/vhive/server.py],
// Env GUEST_PORT=50051, WorkingDir /opt/vhive/function. Reference
// localhost/vhive/py-<name>:latest. The base keeps the device nodes mmdebstrap
// puts under /dev; the image service skips them on import (internal/image).
//
// # Cache and determinism
//
// The base is built once per package set and kept under
// <Cache>/base/<key>/ (key = sha256 of the suite, variant and sorted package
// list): the rootfs directory (build.py runs in it), the gzip layer, and a
// "done" stamp written last; a per-key file lock makes concurrent builds of
// one set wait for each other. Downloaded .debs are kept in <Cache>/debs and
// reused by later sets. The function layer has sorted entries, fixed
// owners and the Unix epoch as every time, so building the same function
// directory on the same cached base gives the same digests. A fresh base
// is as reproducible as the Debian archive is between the two builds.
package debimage

import (
	"archive/tar"
	"bufio"
	"bytes"
	"compress/gzip"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"log/slog"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"golang.org/x/sys/unix"

	"vhive.dev/vhive/functions/build"
)

// RuntimePackages are installed in every base: the interpreter and what
// the gRPC server needs.
var RuntimePackages = []string{"python3-minimal", "python3-grpcio", "python3-protobuf"}

const (
	// DefaultSuite is the Debian release the bases come from.
	DefaultSuite = "bookworm"
	// DefaultMirror is the Debian mirror mmdebstrap downloads from.
	DefaultMirror = "http://deb.debian.org/debian"
	// variant is mmdebstrap's package selection before --include.
	variant = "essential"
	// cacheVersion changes when the base's layout or contents policy does.
	cacheVersion = "debimage v1"
	serverPath   = "opt/vhive/server.py"
	functionDir  = "opt/vhive/function"
	defaultPath  = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
)

// Options says what to build.
type Options struct {
	// Dir is the function directory (required).
	Dir string
	// Name is the function's name; default the directory's base name. It
	// must be a valid function name (lower case, digits, dashes).
	Name string
	// Runtime is the directory holding server.py; default
	// <Dir>/../runtime.
	Runtime string
	// Cache is where bases and .debs are kept; default $VHIVE_CACHE/debimage
	// ($VHIVE_CACHE defaults to /var/cache/vhive).
	Cache string
	// OutDir receives py-<name>/ and py-<name>.tar (required).
	OutDir string
	// Formats defaults to both.
	Formats []build.Format
	// Suite and Mirror default to DefaultSuite and DefaultMirror.
	Suite, Mirror string
	// Mmdebstrap is the mmdebstrap command; default "mmdebstrap" from PATH.
	Mmdebstrap string
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
}

// Image is one built image.
type Image struct {
	build.Image
	// Packages is the sorted package set of the base.
	Packages []string
	// BaseKey names the cached base; BaseDigest is its layer's digest.
	BaseKey, BaseDigest string
	// BaseCached is true when the base came from the cache.
	BaseCached bool
	// FullOnly is true for a function marked full-only.
	FullOnly bool
}

var (
	validName    = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,50}[a-z0-9])?$`)
	validPackage = regexp.MustCompile(`^[a-z0-9][a-z0-9+.-]+(:[a-z0-9]+)?$`)
)

// Ref is the image reference of the Python function name.
func Ref(name string) string { return "localhost/vhive/" + ImageName(name) + ":latest" }

// ImageName is the output name (layout directory, tarball stem) of name.
func ImageName(name string) string { return "py-" + name }

func (o Options) withDefaults() (Options, error) {
	if o.Dir == "" {
		return o, errors.New("debimage: no function directory")
	}
	if o.Name == "" {
		o.Name = filepath.Base(filepath.Clean(o.Dir))
	}
	if !validName.MatchString(o.Name) {
		return o, fmt.Errorf("function %q: invalid name (want lower case letters, digits and dashes)", o.Name)
	}
	fi, err := os.Stat(o.Dir)
	if err != nil {
		return o, fmt.Errorf("function %q: %w", o.Name, err)
	}
	if !fi.IsDir() {
		return o, fmt.Errorf("function %q: %s is not a directory", o.Name, o.Dir)
	}
	if o.Runtime == "" {
		o.Runtime = filepath.Join(filepath.Dir(filepath.Clean(o.Dir)), "runtime")
	}
	if o.Cache == "" {
		c := os.Getenv("VHIVE_CACHE")
		if c == "" {
			c = "/var/cache/vhive"
		}
		o.Cache = filepath.Join(c, "debimage")
	}
	if o.OutDir == "" {
		return o, fmt.Errorf("function %q: no output directory", o.Name)
	}
	if o.Suite == "" {
		o.Suite = DefaultSuite
	}
	if o.Mirror == "" {
		o.Mirror = DefaultMirror
	}
	if o.Mmdebstrap == "" {
		o.Mmdebstrap = "mmdebstrap"
	}
	if o.Logger == nil {
		o.Logger = slog.Default()
	}
	return o, nil
}

// ReadPackages parses a package list file: one package per line, '#'
// comments, blank lines ignored. It returns the sorted set together with the
// runtime's packages.
func ReadPackages(path string) ([]string, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	pkgs := slices.Clone(RuntimePackages)
	for i, line := range strings.Split(string(b), "\n") {
		line, _, _ = strings.Cut(line, "#")
		for _, p := range strings.Fields(line) {
			if !validPackage.MatchString(p) {
				return nil, fmt.Errorf("%s:%d: %q is not a Debian package name", path, i+1, p)
			}
			pkgs = append(pkgs, p)
		}
	}
	slices.Sort(pkgs)
	return slices.Compact(pkgs), nil
}

// Build builds the image of one function directory.
func Build(ctx context.Context, o Options) (Image, error) {
	o, err := o.withDefaults()
	if err != nil {
		return Image{}, err
	}
	fail := func(err error) (Image, error) { return Image{}, fmt.Errorf("function %q: %w", o.Name, err) }
	pkgs, err := ReadPackages(filepath.Join(o.Dir, "packages"))
	if errors.Is(err, fs.ErrNotExist) {
		return fail(fmt.Errorf("no package list: %s does not exist (one Debian package per line)", filepath.Join(o.Dir, "packages")))
	}
	if err != nil {
		return fail(fmt.Errorf("package list: %w", err))
	}
	if _, err := os.Stat(filepath.Join(o.Dir, "handler.py")); err != nil {
		return fail(fmt.Errorf("no handler: %w", err))
	}
	server, err := os.ReadFile(filepath.Join(o.Runtime, "server.py"))
	if err != nil {
		return fail(fmt.Errorf("runtime: %w", err))
	}
	base, err := o.base(ctx, pkgs)
	if err != nil {
		return fail(err)
	}
	files, err := o.functionFiles(ctx, base)
	if err != nil {
		return fail(err)
	}
	files[serverPath] = server
	layerTar, err := filesTar(files)
	if err != nil {
		return fail(err)
	}
	img, err := o.image(base, pkgs, layerTar)
	if err != nil {
		return fail(err)
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return fail(err)
	}
	bi, err := build.WriteImage(img, o.OutDir, ImageName(o.Name), Ref(o.Name), o.Formats)
	if err != nil {
		return fail(err)
	}
	bi.Function = o.Name
	_, ferr := os.Stat(filepath.Join(o.Dir, "full-only"))
	return Image{Image: bi, Packages: pkgs, BaseKey: base.key, BaseDigest: base.digest, BaseCached: base.cached, FullOnly: ferr == nil}, nil
}

// baseInfo is a cached base.
type baseInfo struct {
	key, dir, digest string
	cached           bool
}

func (b baseInfo) rootfs() string { return filepath.Join(b.dir, "rootfs") }
func (b baseInfo) layer() string  { return filepath.Join(b.dir, "layer.tar.gz") }

// BaseKey is the cache key of a package set.
func BaseKey(suite string, pkgs []string) string {
	h := sha256.New()
	fmt.Fprintf(h, "%s\nsuite %s\nvariant %s\n%s\n", cacheVersion, suite, variant, strings.Join(pkgs, "\n"))
	return hex.EncodeToString(h.Sum(nil))[:20]
}

// base returns the cached base of pkgs, building it first if needed.
func (o Options) base(ctx context.Context, pkgs []string) (baseInfo, error) {
	key := BaseKey(o.Suite, pkgs)
	b := baseInfo{key: key, dir: filepath.Join(o.Cache, "base", key)}
	if err := os.MkdirAll(filepath.Join(o.Cache, "base"), 0o755); err != nil {
		return b, err
	}
	unlock, err := lockFile(ctx, b.dir+".lock")
	if err != nil {
		return b, err
	}
	defer unlock()
	if d, err := os.ReadFile(filepath.Join(b.dir, "done")); err == nil {
		b.digest, b.cached = strings.TrimSpace(string(d)), true
		return b, nil
	}
	// A base without its stamp is an interrupted build: start over.
	if err := os.RemoveAll(b.dir); err != nil {
		return b, err
	}
	start := time.Now()
	o.Logger.InfoContext(ctx, "debimage: building base with mmdebstrap", "key", key, "packages", strings.Join(pkgs, ","))
	tmp := b.dir + ".tmp"
	if err := os.RemoveAll(tmp); err != nil {
		return b, err
	}
	if err := os.MkdirAll(tmp, 0o755); err != nil {
		return b, err
	}
	ok := false
	defer func() {
		if !ok {
			os.RemoveAll(tmp)
		}
	}()
	if err := o.mmdebstrap(ctx, pkgs, filepath.Join(tmp, "rootfs")); err != nil {
		return b, err
	}
	digest, err := writeDirLayer(filepath.Join(tmp, "rootfs"), filepath.Join(tmp, "layer.tar.gz"))
	if err != nil {
		return b, fmt.Errorf("base layer: %w", err)
	}
	if err := os.WriteFile(filepath.Join(tmp, "packages"), []byte(strings.Join(pkgs, "\n")+"\n"), 0o644); err != nil {
		return b, err
	}
	if err := os.WriteFile(filepath.Join(tmp, "done"), []byte(digest+"\n"), 0o644); err != nil {
		return b, err
	}
	if err := os.Rename(tmp, b.dir); err != nil {
		return b, err
	}
	ok = true
	b.digest = digest
	o.Logger.InfoContext(ctx, "debimage: base built", "key", key, "digest", digest, "took", time.Since(start).Round(time.Millisecond))
	return b, nil
}

// mmdebstrap installs pkgs into the directory dir.
func (o Options) mmdebstrap(ctx context.Context, pkgs []string, dir string) error {
	debs := filepath.Join(o.Cache, "debs")
	if err := os.MkdirAll(debs, 0o755); err != nil {
		return err
	}
	args := []string{
		"--variant=" + variant,
		"--include=" + strings.Join(pkgs, ","),
		"--mode=root",
		"--format=directory",
		// Keep documentation and translations out of the image.
		"--dpkgopt=path-exclude=/usr/share/doc/*",
		"--dpkgopt=path-include=/usr/share/doc/*/copyright",
		"--dpkgopt=path-exclude=/usr/share/man/*",
		"--dpkgopt=path-exclude=/usr/share/locale/*",
		"--dpkgopt=path-exclude=/usr/share/info/*",
		// Reuse .debs downloaded for earlier package sets.
		"--skip=download/empty",
		`--setup-hook=mkdir -p "$1/var/cache/apt/archives"`,
		"--setup-hook=sync-in " + debs + " /var/cache/apt/archives",
		"--customize-hook=sync-out /var/cache/apt/archives " + debs,
		"--quiet",
		o.Suite, dir, o.Mirror,
	}
	cmd := exec.CommandContext(ctx, o.Mmdebstrap, args...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	cmd.Stdin = nil
	if err := cmd.Run(); err != nil {
		if errors.Is(err, exec.ErrNotFound) {
			return fmt.Errorf("mmdebstrap is not installed (apt-get install mmdebstrap): %w", err)
		}
		return fmt.Errorf("mmdebstrap %s (packages %s): %w\n%s", o.Suite, strings.Join(pkgs, ","), err, tail(out.String(), 2000))
	}
	return nil
}

// tail returns the last n bytes of s, starting at a line.
func tail(s string, n int) string {
	s = strings.TrimSpace(s)
	if len(s) <= n {
		return s
	}
	s = s[len(s)-n:]
	if i := strings.IndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	return "…\n" + s
}

// functionFiles collects the function's files and its build outputs, as
// image paths → contents.
func (o Options) functionFiles(ctx context.Context, base baseInfo) (map[string][]byte, error) {
	files := map[string][]byte{}
	ents, err := os.ReadDir(o.Dir)
	if err != nil {
		return nil, err
	}
	for _, e := range ents {
		if e.Name() == "packages" || e.Name() == "full-only" || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		path := filepath.Join(o.Dir, e.Name())
		switch {
		case e.Type().IsRegular():
		case e.Type()&fs.ModeSymlink != 0:
			if err := o.checkShared(path); err != nil {
				return nil, err
			}
		default:
			continue
		}
		b, err := os.ReadFile(path)
		if err != nil {
			return nil, err
		}
		files[functionDir+"/"+e.Name()] = b
	}
	if _, ok := files[functionDir+"/build.py"]; !ok {
		return files, nil
	}
	out, err := o.runBuildStep(ctx, base, files)
	if err != nil {
		return nil, err
	}
	for p, b := range out {
		if _, dup := files[functionDir+"/"+p]; dup {
			return nil, fmt.Errorf("build.py output %q would replace a source file", p)
		}
		files[functionDir+"/"+p] = b
	}
	return files, nil
}

// checkShared accepts the symlink at path if it leads to a regular file in
// the suite (the function directory's parent), e.g. another function's.
func (o Options) checkShared(path string) error {
	abs, err := filepath.Abs(path)
	if err != nil {
		return err
	}
	target, err := filepath.EvalSymlinks(abs)
	if err != nil {
		return err
	}
	suite, err := filepath.EvalSymlinks(filepath.Dir(filepath.Dir(abs)))
	if err != nil {
		return err
	}
	if rel, err := filepath.Rel(suite, target); err != nil || rel == ".." || strings.HasPrefix(rel, "../") {
		return fmt.Errorf("%s links to %s, outside the suite %s (only files of the suite's functions can be shared)", path, target, suite)
	}
	if fi, err := os.Stat(target); err != nil || !fi.Mode().IsRegular() {
		return fmt.Errorf("%s links to %s, which is not a regular file", path, target)
	}
	return nil
}

// runBuildStep runs build.py chrooted into the base rootfs, in a scratch
// directory under its /tmp that holds the function's files, and returns what
// it wrote into its output directory (regular files, relative paths).
func (o Options) runBuildStep(ctx context.Context, base baseInfo, files map[string][]byte) (map[string][]byte, error) {
	scratch, err := os.MkdirTemp(filepath.Join(base.rootfs(), "tmp"), "vhive-build-")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(scratch)
	for p, b := range files {
		if err := os.WriteFile(filepath.Join(scratch, filepath.Base(p)), b, 0o644); err != nil {
			return nil, err
		}
	}
	outDir := filepath.Join(scratch, "out")
	if err := os.Mkdir(outDir, 0o755); err != nil {
		return nil, err
	}
	// Some libraries read /proc and /sys at import (PyTorch's cpuinfo
	// aborts without them): mount fresh ones for the step, one step per
	// base at a time.
	unlock, err := lockFile(ctx, base.dir+".build.lock")
	if err != nil {
		return nil, err
	}
	defer unlock()
	unmount, err := mountPseudoFS(base.rootfs())
	if err != nil {
		return nil, err
	}
	defer unmount()
	inRoot := "/tmp/" + filepath.Base(scratch)
	cmd := exec.CommandContext(ctx, "/usr/bin/python3", inRoot+"/build.py", inRoot+"/out")
	cmd.Dir = "/"
	cmd.Env = []string{defaultPath, "HOME=" + inRoot, "PYTHONDONTWRITEBYTECODE=1", "PYTHONHASHSEED=0",
		"OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "MKL_NUM_THREADS=1", "LC_ALL=C.UTF-8"}
	cmd.SysProcAttr = &syscall.SysProcAttr{Chroot: base.rootfs()}
	var buf bytes.Buffer
	cmd.Stdout, cmd.Stderr = &buf, &buf
	start := time.Now()
	if err := cmd.Run(); err != nil {
		return nil, fmt.Errorf("build.py failed: %w\n%s", err, tail(buf.String(), 2000))
	}
	o.Logger.InfoContext(ctx, "debimage: build.py done", "function", o.Name, "took", time.Since(start).Round(time.Millisecond))
	out := map[string][]byte{}
	err = filepath.WalkDir(outDir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		if !d.Type().IsRegular() {
			return fmt.Errorf("build.py output %s is not a regular file", p)
		}
		rel, err := filepath.Rel(outDir, p)
		if err != nil {
			return err
		}
		b, err := os.ReadFile(p)
		out[filepath.ToSlash(rel)] = b
		return err
	})
	return out, err
}

// mountPseudoFS mounts proc and a read-only sysfs at rootfs/proc and
// rootfs/sys and returns the function that unmounts them.
func mountPseudoFS(rootfs string) (func(), error) {
	var done []string
	undo := func() {
		for i := len(done) - 1; i >= 0; i-- {
			unix.Unmount(done[i], unix.MNT_DETACH)
		}
	}
	for _, m := range []struct {
		fstype, dir string
		flags       uintptr
	}{
		{"proc", "proc", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC},
		{"sysfs", "sys", unix.MS_NOSUID | unix.MS_NODEV | unix.MS_NOEXEC | unix.MS_RDONLY},
	} {
		dir := filepath.Join(rootfs, m.dir)
		if err := os.MkdirAll(dir, 0o555); err != nil {
			undo()
			return nil, err
		}
		if err := unix.Mount(m.fstype, dir, m.fstype, m.flags, ""); err != nil {
			undo()
			return nil, fmt.Errorf("mount %s at %s for build.py: %w", m.fstype, dir, err)
		}
		done = append(done, dir)
	}
	return undo, nil
}

var epoch = time.Unix(0, 0).UTC()

// filesTar is a deterministic tar of files (paths without a leading slash)
// and their parent directories.
func filesTar(files map[string][]byte) ([]byte, error) {
	dirs := map[string]bool{}
	var paths []string
	for p := range files {
		paths = append(paths, p)
		for d := filepath.Dir(p); d != "." && d != "/"; d = filepath.Dir(d) {
			dirs[d] = true
		}
	}
	for d := range dirs {
		paths = append(paths, d+"/")
	}
	slices.Sort(paths)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, p := range paths {
		h := &tar.Header{Name: p, ModTime: epoch, Format: tar.FormatPAX}
		if strings.HasSuffix(p, "/") {
			h.Typeflag, h.Mode = tar.TypeDir, 0o755
		} else {
			h.Typeflag, h.Mode, h.Size = tar.TypeReg, 0o644, int64(len(files[p]))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := tw.Write(files[p]); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// writeDirLayer writes the directory root as a gzip tar layer at path, in
// lexical order, keeping modes, owners, mtimes (whole seconds), hard links,
// symlinks and device nodes; sockets are left out. It returns the digest of
// the compressed layer and writes the uncompressed one (the diff ID) to
// path+".diffid".
func writeDirLayer(root, path string) (string, error) {
	f, err := os.Create(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	bw := bufio.NewWriterSize(io.MultiWriter(f, h), 1<<20)
	zw, err := gzip.NewWriterLevel(bw, gzip.DefaultCompression)
	if err != nil {
		return "", err
	}
	diff := sha256.New()
	tw := tar.NewWriter(io.MultiWriter(zw, diff))
	links := map[[2]uint64]string{}
	err = filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, err := filepath.Rel(root, p)
		if err != nil {
			return err
		}
		if rel == "." {
			return nil
		}
		fi, err := d.Info()
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSocket != 0 {
			return nil
		}
		var link string
		if fi.Mode()&fs.ModeSymlink != 0 {
			if link, err = os.Readlink(p); err != nil {
				return err
			}
		}
		hdr, err := tar.FileInfoHeader(fi, link)
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		hdr.Name = filepath.ToSlash(rel)
		if fi.IsDir() {
			hdr.Name += "/"
		}
		hdr.Uname, hdr.Gname = "", ""
		hdr.ModTime = hdr.ModTime.Truncate(time.Second)
		hdr.AccessTime, hdr.ChangeTime = time.Time{}, time.Time{}
		hdr.Format = tar.FormatPAX
		st, _ := fi.Sys().(*syscall.Stat_t)
		if st != nil && fi.Mode().IsRegular() && st.Nlink > 1 {
			id := [2]uint64{uint64(st.Dev), st.Ino}
			if first, ok := links[id]; ok {
				hdr.Typeflag, hdr.Linkname, hdr.Size = tar.TypeLink, first, 0
			} else {
				links[id] = hdr.Name
			}
		}
		if err := tw.WriteHeader(hdr); err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		if hdr.Typeflag == tar.TypeReg {
			src, err := os.Open(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(tw, src)
			src.Close()
			return err
		}
		return nil
	})
	if err != nil {
		return "", err
	}
	if err := tw.Close(); err != nil {
		return "", err
	}
	if err := zw.Close(); err != nil {
		return "", err
	}
	if err := bw.Flush(); err != nil {
		return "", err
	}
	if err := f.Sync(); err != nil {
		return "", err
	}
	if err := os.WriteFile(path+".diffid", []byte("sha256:"+hex.EncodeToString(diff.Sum(nil))+"\n"), 0o644); err != nil {
		return "", err
	}
	return "sha256:" + hex.EncodeToString(h.Sum(nil)), f.Close()
}

// fileLayer is a cached gzip layer whose digests are known, so that
// assembling an image does not read (and gunzip) it again.
type fileLayer struct {
	path         string
	digest, diff v1.Hash
	size         int64
}

func openFileLayer(path, digest string) (*fileLayer, error) {
	d, err := v1.NewHash(digest)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path + ".diffid")
	if errors.Is(err, fs.ErrNotExist) {
		// A base cached before diff IDs were kept: compute it once.
		b, err = computeDiffID(path)
	}
	if err != nil {
		return nil, err
	}
	diff, err := v1.NewHash(strings.TrimSpace(string(b)))
	if err != nil {
		return nil, err
	}
	fi, err := os.Stat(path)
	if err != nil {
		return nil, err
	}
	return &fileLayer{path: path, digest: d, diff: diff, size: fi.Size()}, nil
}

func computeDiffID(path string) ([]byte, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	zr, err := gzip.NewReader(bufio.NewReaderSize(f, 1<<20))
	if err != nil {
		return nil, err
	}
	h := sha256.New()
	if _, err := io.Copy(h, zr); err != nil {
		return nil, err
	}
	b := []byte("sha256:" + hex.EncodeToString(h.Sum(nil)) + "\n")
	return b, os.WriteFile(path+".diffid", b, 0o644)
}

func (l *fileLayer) Digest() (v1.Hash, error)            { return l.digest, nil }
func (l *fileLayer) DiffID() (v1.Hash, error)            { return l.diff, nil }
func (l *fileLayer) Size() (int64, error)                { return l.size, nil }
func (l *fileLayer) MediaType() (types.MediaType, error) { return types.OCILayer, nil }
func (l *fileLayer) Compressed() (io.ReadCloser, error)  { return os.Open(l.path) }
func (l *fileLayer) Uncompressed() (io.ReadCloser, error) {
	f, err := os.Open(l.path)
	if err != nil {
		return nil, err
	}
	zr, err := gzip.NewReader(f)
	if err != nil {
		f.Close()
		return nil, err
	}
	return struct {
		io.Reader
		io.Closer
	}{zr, f}, nil
}

// image assembles the two-layer image.
func (o Options) image(base baseInfo, pkgs []string, fnLayer []byte) (v1.Image, error) {
	bl, err := openFileLayer(base.layer(), base.digest)
	if err != nil {
		return nil, fmt.Errorf("base layer: %w", err)
	}
	fl, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(fnLayer)), nil
	}, tarball.WithMediaType(types.OCILayer), tarball.WithCompressedCaching)
	if err != nil {
		return nil, fmt.Errorf("function layer: %w", err)
	}
	port := strconv.Itoa(build.GuestPort)
	img := mutate.MediaType(empty.Image, types.OCIManifestSchema1)
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	img, err = mutate.ConfigFile(img, &v1.ConfigFile{
		Architecture: goarch(),
		OS:           "linux",
		Created:      v1.Time{Time: epoch},
		Config: v1.Config{
			Entrypoint: []string{"/usr/bin/python3", "/" + serverPath},
			Env: []string{"GUEST_PORT=" + port, defaultPath, "PYTHONDONTWRITEBYTECODE=1", "PYTHONUNBUFFERED=1",
				"LC_ALL=C.UTF-8", "OPENBLAS_NUM_THREADS=1", "OMP_NUM_THREADS=1", "VHIVE_FUNCTION_DIR=/" + functionDir},
			ExposedPorts: map[string]struct{}{port + "/tcp": {}},
			WorkingDir:   "/" + functionDir,
			Labels: map[string]string{
				"dev.vhive.function":        o.Name,
				"dev.vhive.debian.suite":    o.Suite,
				"dev.vhive.debian.packages": strings.Join(pkgs, ","),
			},
		},
	})
	if err != nil {
		return nil, err
	}
	for _, a := range []struct {
		l  v1.Layer
		by string
	}{
		{bl, fmt.Sprintf("mmdebstrap --variant=%s --include=%s %s", variant, strings.Join(pkgs, ","), o.Suite)},
		{fl, "vhive debimage: " + o.Name},
	} {
		img, err = mutate.Append(img, mutate.Addendum{
			Layer: a.l, MediaType: types.OCILayer,
			History: v1.History{Created: v1.Time{Time: epoch}, CreatedBy: a.by},
		})
		if err != nil {
			return nil, err
		}
	}
	return img, nil
}

// lockFile takes an exclusive flock on path, waiting until ctx ends.
func lockFile(ctx context.Context, path string) (func(), error) {
	f, err := os.OpenFile(path, os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return nil, err
	}
	for {
		err := unix.Flock(int(f.Fd()), unix.LOCK_EX|unix.LOCK_NB)
		if err == nil {
			return func() { unix.Flock(int(f.Fd()), unix.LOCK_UN); f.Close() }, nil
		}
		if !errors.Is(err, unix.EWOULDBLOCK) {
			f.Close()
			return nil, fmt.Errorf("lock %s: %w", path, err)
		}
		select {
		case <-ctx.Done():
			f.Close()
			return nil, ctx.Err()
		case <-time.After(200 * time.Millisecond):
		}
	}
}

func goarch() string { return runtime.GOARCH }

// Functions lists the function directories under suiteDir (every
// subdirectory but runtime/), sorted; without full, those marked full-only
// are left out.
func Functions(suiteDir string, full bool) ([]string, error) {
	ents, err := os.ReadDir(suiteDir)
	if err != nil {
		return nil, err
	}
	var out []string
	for _, e := range ents {
		if !e.IsDir() || e.Name() == "runtime" || strings.HasPrefix(e.Name(), ".") {
			continue
		}
		if _, err := os.Stat(filepath.Join(suiteDir, e.Name(), "full-only")); err == nil && !full {
			continue
		}
		out = append(out, filepath.Join(suiteDir, e.Name()))
	}
	return out, nil
}
