package image

import (
	"archive/tar"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

const (
	whiteoutPrefix = ".wh."
	opaqueMarker   = ".wh..wh..opq"
)

// errLayerTooLarge is returned by limitReader past the layer limit.
var errLayerTooLarge = errors.New("layer exceeds the size limit")

// limitReader fails with errLayerTooLarge once more than n bytes were read.
type limitReader struct {
	r io.Reader
	n int64 // bytes still allowed
}

func (l *limitReader) Read(p []byte) (int, error) {
	if l.n < 0 {
		return 0, errLayerTooLarge
	}
	if int64(len(p)) > l.n+1 {
		p = p[:l.n+1]
	}
	n, err := l.r.Read(p)
	l.n -= int64(n)
	if l.n < 0 {
		return n, errLayerTooLarge
	}
	return n, err
}

// unpacker applies tar layers, in order, to one rootfs.
type unpacker struct {
	root     *os.Root
	maxEntry int64
	maxLayer int64
	chown    bool
	// dirTimes are applied after the last layer: writing into a directory
	// changes its mtime.
	dirTimes map[string]time.Time
	// dirs known to exist in the current layer; only an optimisation (os.Root
	// re-resolves every path safely), dropped when a path is replaced.
	dirs map[string]bool
	// written holds the paths the current layer wrote, for opaque markers.
	written map[string]bool
	buf     []byte // copy buffer
	roots   map[string]*os.Root
	// skipped counts the device nodes and FIFOs under /dev the current
	// layer carried and that were not created (see skipDevEntry).
	skipped []string
}

func newUnpacker(root *os.Root, maxEntry, maxLayer int64) *unpacker {
	return &unpacker{
		root:     root,
		maxEntry: maxEntry,
		maxLayer: maxLayer,
		chown:    os.Geteuid() == 0,
		dirTimes: map[string]time.Time{},
		buf:      make([]byte, 256<<10),
		roots:    map[string]*os.Root{},
	}
}

// applyLayer reads one uncompressed tar layer. layer is its digest, for errors.
func (u *unpacker) applyLayer(ctx context.Context, layer string, r io.Reader) error {
	u.dirs = map[string]bool{".": true}
	u.written = map[string]bool{}
	u.skipped = u.skipped[:0]
	defer u.closeDirs()
	lr := &limitReader{r: r, n: u.maxLayer}
	tr := tar.NewReader(lr)
	last := ""
	for {
		if err := ctx.Err(); err != nil {
			return err
		}
		hdr, err := tr.Next()
		if err == io.EOF {
			// Read the rest (tar padding, trailing bytes), within the limit,
			// so that the caller can verify the digest of the whole blob.
			_, err = io.Copy(io.Discard, lr)
			if err == nil {
				return nil
			}
		}
		if err != nil {
			if errors.Is(err, errLayerTooLarge) {
				return &UnsafeLayerError{Layer: layer, Path: last, Reason: fmt.Sprintf("uncompressed layer larger than %d bytes", u.maxLayer)}
			}
			return fmt.Errorf("layer %s: read tar after entry %q: %w", layer, last, err)
		}
		last = hdr.Name
		if err := u.apply(layer, hdr, tr); err != nil {
			if errors.Is(err, errLayerTooLarge) {
				return &UnsafeLayerError{Layer: layer, Path: hdr.Name, Reason: fmt.Sprintf("uncompressed layer larger than %d bytes", u.maxLayer)}
			}
			return err
		}
	}
}

func unsafe(layer string, hdr *tar.Header, reason string, err error) error {
	return &UnsafeLayerError{Layer: layer, Path: hdr.Name, Reason: reason, Err: err}
}

// pathError classifies an os.Root failure: an escape attempt is unsafe, any
// other failure (disk full, missing parent) is a plain error naming the entry.
func pathError(layer string, hdr *tar.Header, op string, err error) error {
	// os.Root reports escapes with an unexported error whose text is stable.
	if strings.Contains(err.Error(), "path escapes from parent") {
		return unsafe(layer, hdr, op+" would leave the rootfs", err)
	}
	// Errors the layer's own content causes make it invalid; others (disk
	// full, I/O) are the node's problem and stay unclassified.
	if errors.Is(err, unix.ENOTDIR) || errors.Is(err, unix.ENOENT) || errors.Is(err, unix.ELOOP) ||
		errors.Is(err, unix.EISDIR) || errors.Is(err, unix.EEXIST) || errors.Is(err, unix.EPERM) || errors.Is(err, unix.ENAMETOOLONG) {
		return fmt.Errorf("layer %s: entry %q: %s: %w: %w", layer, hdr.Name, op, err, ErrInvalid)
	}
	return fmt.Errorf("layer %s: entry %q: %s: %w", layer, hdr.Name, op, err)
}

func (u *unpacker) apply(layer string, hdr *tar.Header, tr *tar.Reader) error {
	if hdr.Typeflag == tar.TypeXGlobalHeader {
		return nil // archive metadata, not a file
	}
	p, err := cleanEntryPath(hdr.Name)
	if err != nil {
		return unsafe(layer, hdr, "bad name", err)
	}
	dir, base := path.Split(p)
	dir = path.Clean(dir) // "" → "."

	if strings.HasPrefix(base, whiteoutPrefix) {
		return u.whiteout(layer, hdr, dir, base)
	}

	switch hdr.Typeflag {
	case tar.TypeReg, '\x00', tar.TypeDir, tar.TypeSymlink, tar.TypeLink:
	case tar.TypeChar, tar.TypeBlock, tar.TypeFifo:
		if skipDevEntry(p) {
			// Root filesystems made by mmdebstrap, debootstrap or
			// `docker export` carry /dev/null, /dev/console, … as real
			// nodes. Every sandbox mounts its own /dev over the image's,
			// so these are never seen: skip them (nothing is created).
			u.skipped = append(u.skipped, p)
			return nil
		}
		if hdr.Typeflag == tar.TypeFifo {
			return unsafe(layer, hdr, "FIFO outside /dev (only /dev may hold special files; they are skipped there)", nil)
		}
		return unsafe(layer, hdr, "device node outside /dev (only /dev may hold device nodes; they are skipped there)", nil)
	default:
		return unsafe(layer, hdr, fmt.Sprintf("unsupported entry type %q", hdr.Typeflag), nil)
	}
	if p == "." && hdr.Typeflag != tar.TypeDir {
		return unsafe(layer, hdr, "non-directory entry replaces the rootfs", nil)
	}
	if hdr.Size > u.maxEntry {
		return unsafe(layer, hdr, fmt.Sprintf("entry of %d bytes exceeds the limit of %d", hdr.Size, u.maxEntry), nil)
	}

	if p != "." && !u.dirs[dir] {
		if err := u.root.MkdirAll(dir, 0o755); err != nil {
			return pathError(layer, hdr, "create parent directory", err)
		}
		u.dirs[dir] = true
	}
	u.written[p] = true

	mode := hdr.FileInfo().Mode() & (fs.ModePerm | fs.ModeSetuid | fs.ModeSetgid | fs.ModeSticky)
	switch hdr.Typeflag {
	case tar.TypeDir:
		if p != "." {
			err := u.root.Mkdir(p, 0o700)
			if errors.Is(err, fs.ErrExist) {
				// Keep a directory (merging layers); replace anything else.
				if fi, lerr := u.root.Lstat(p); lerr == nil && fi.IsDir() {
					err = nil
				} else if err = u.replace(p); err == nil {
					err = u.root.Mkdir(p, 0o700)
				}
			}
			if err != nil {
				return pathError(layer, hdr, "create directory", err)
			}
		}
		u.dirs[p] = true
		if err := u.meta(p, hdr, mode); err != nil {
			return pathError(layer, hdr, "set directory attributes", err)
		}
		u.dirTimes[p] = hdr.ModTime
	case tar.TypeReg, '\x00':
		pr, err := u.parent(dir)
		if err != nil {
			return pathError(layer, hdr, "open parent directory", err)
		}
		f, err := pr.OpenFile(base, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
		if errors.Is(err, fs.ErrExist) {
			if err = u.replace(p); err == nil {
				f, err = pr.OpenFile(base, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
			}
		}
		if err != nil {
			return pathError(layer, hdr, "create file", err)
		}
		// Hide ReadFrom so that CopyBuffer uses our buffer.
		n, err := io.CopyBuffer(struct{ io.Writer }{f}, tr, u.buf)
		if err == nil && n != hdr.Size {
			err = io.ErrUnexpectedEOF
		}
		if err == nil && u.chown {
			err = f.Chown(hdr.Uid, hdr.Gid)
		}
		if err == nil {
			err = f.Chmod(mode) // after chown, which clears setuid/setgid
		}
		if err == nil && u.chown {
			err = setXattrs(f, hdr)
		}
		if err == nil {
			err = setTimes(f, hdr.AccessTime, hdr.ModTime)
		}
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			if errors.Is(err, errLayerTooLarge) {
				return err
			}
			return fmt.Errorf("layer %s: entry %q: write file: %w", layer, hdr.Name, err)
		}
	case tar.TypeSymlink:
		if hdr.Linkname == "" || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return unsafe(layer, hdr, fmt.Sprintf("bad symlink target %q", hdr.Linkname), nil)
		}
		err := u.root.Symlink(hdr.Linkname, p)
		if errors.Is(err, fs.ErrExist) {
			if err = u.replace(p); err == nil {
				err = u.root.Symlink(hdr.Linkname, p)
			}
		}
		if err != nil {
			return pathError(layer, hdr, "create symlink", err)
		}
		if u.chown {
			if err := u.root.Lchown(p, hdr.Uid, hdr.Gid); err != nil {
				return pathError(layer, hdr, "chown symlink", err)
			}
		}
	case tar.TypeLink:
		target, err := cleanEntryPath(hdr.Linkname)
		if err != nil {
			return unsafe(layer, hdr, fmt.Sprintf("bad hard-link target %q", hdr.Linkname), err)
		}
		if target == "." {
			return unsafe(layer, hdr, "hard link to the rootfs directory", nil)
		}
		err = u.root.Link(target, p)
		if errors.Is(err, fs.ErrExist) {
			if err = u.replace(p); err == nil {
				err = u.root.Link(target, p)
			}
		}
		if err != nil {
			return pathError(layer, hdr, fmt.Sprintf("hard link to %q", hdr.Linkname), err)
		}
	}
	return nil
}

// skipDevEntry reports whether a special file (device node or FIFO) at the
// cleaned entry path p lies strictly below the rootfs's dev directory, where
// the unpacker skips it. Nothing is created for a skipped entry, so a "dev"
// that a layer made a symlink cannot redirect anything.
func skipDevEntry(p string) bool {
	return strings.HasPrefix(p, "dev/") && len(p) > len("dev/")
}

// replace removes what a lower layer left at p (never following a symlink
// at p: RemoveAll removes the link itself).
func (u *unpacker) replace(p string) error {
	if err := u.root.RemoveAll(p); err != nil {
		return err
	}
	u.forget(p)
	delete(u.dirTimes, p)
	return nil
}

// setTimes sets a file's times through its descriptor (utimensat with
// AT_EMPTY_PATH), so no path is resolved again.
func setTimes(f *os.File, atime, mtime time.Time) error {
	if atime.IsZero() {
		atime = mtime
	}
	ts := []unix.Timespec{unix.NsecToTimespec(atime.UnixNano()), unix.NsecToTimespec(mtime.UnixNano())}
	rc, err := f.SyscallConn()
	if err != nil {
		return err
	}
	var serr error
	if err := rc.Control(func(fd uintptr) {
		serr = unix.UtimesNanoAt(int(fd), "", ts, unix.AT_EMPTY_PATH)
	}); err != nil {
		return err
	}
	if serr != nil {
		return fmt.Errorf("set times: %w", serr)
	}
	return nil
}

// xattrPrefix marks extended attributes in PAX records.
const xattrPrefix = "SCHILY.xattr."

// setXattrs applies a regular file's extended attributes (e.g.
// security.capability of ping). A filesystem without xattr support is not
// an error: the attributes are dropped.
func setXattrs(f *os.File, hdr *tar.Header) error {
	for k, v := range hdr.PAXRecords {
		attr, ok := strings.CutPrefix(k, xattrPrefix)
		if !ok {
			continue
		}
		rc, err := f.SyscallConn()
		if err != nil {
			return err
		}
		var serr error
		if err := rc.Control(func(fd uintptr) {
			serr = unix.Fsetxattr(int(fd), attr, []byte(v), 0)
		}); err != nil {
			return err
		}
		if serr != nil && !errors.Is(serr, unix.ENOTSUP) {
			return fmt.Errorf("set xattr %q: %w", attr, serr)
		}
	}
	return nil
}

// meta sets ownership and mode of a directory.
func (u *unpacker) meta(p string, hdr *tar.Header, mode fs.FileMode) error {
	if u.chown {
		if err := u.root.Lchown(p, hdr.Uid, hdr.Gid); err != nil {
			return err
		}
	}
	return u.root.Chmod(p, mode)
}

// forget drops cached directories at or below p after p was replaced.
func (u *unpacker) forget(p string) {
	for d := range u.dirs {
		if d == p || strings.HasPrefix(d, p+"/") {
			delete(u.dirs, d)
		}
	}
	for d, r := range u.roots {
		if d == p || strings.HasPrefix(d, p+"/") {
			r.Close()
			delete(u.roots, d)
		}
	}
}

// maxOpenDirs bounds the cache of open parent directories.
const maxOpenDirs = 64

// parent returns an os.Root on directory dir of the rootfs, cached so that
// the files of one directory do not re-walk its path. A cached Root holds
// the directory itself: even if a later entry replaced the path (forget
// drops it then) it could only reach that directory, never outside.
func (u *unpacker) parent(dir string) (*os.Root, error) {
	if dir == "." {
		return u.root, nil
	}
	if r := u.roots[dir]; r != nil {
		return r, nil
	}
	if len(u.roots) >= maxOpenDirs {
		u.closeDirs()
	}
	r, err := u.root.OpenRoot(dir)
	if err != nil {
		return nil, err
	}
	u.roots[dir] = r
	return r, nil
}

func (u *unpacker) closeDirs() {
	for d, r := range u.roots {
		r.Close()
		delete(u.roots, d)
	}
}

func (u *unpacker) whiteout(layer string, hdr *tar.Header, dir, base string) error {
	if base == opaqueMarker {
		f, err := u.root.Open(dir)
		if errors.Is(err, fs.ErrNotExist) {
			return nil
		}
		if err != nil {
			return pathError(layer, hdr, "open opaque directory", err)
		}
		names, err := f.Readdirnames(-1)
		f.Close()
		if err != nil {
			return fmt.Errorf("layer %s: entry %q: read opaque directory: %w", layer, hdr.Name, err)
		}
		for _, n := range names {
			c := path.Join(dir, n)
			if u.written[c] {
				continue
			}
			if err := u.root.RemoveAll(c); err != nil {
				return pathError(layer, hdr, "clear opaque directory", err)
			}
			u.forget(c)
		}
		return nil
	}
	victim := base[len(whiteoutPrefix):]
	if victim == "" || victim == "." || victim == ".." {
		return unsafe(layer, hdr, "bad whiteout name", nil)
	}
	p := path.Join(dir, victim)
	if err := u.root.RemoveAll(p); err != nil {
		return pathError(layer, hdr, "apply whiteout", err)
	}
	u.forget(p)
	delete(u.dirTimes, p)
	return nil
}

// finish sets directory mtimes, deepest first.
func (u *unpacker) finish() error {
	paths := make([]string, 0, len(u.dirTimes))
	for p := range u.dirTimes {
		paths = append(paths, p)
	}
	sort.Slice(paths, func(i, j int) bool { return len(paths[i]) > len(paths[j]) })
	for _, p := range paths {
		fi, err := u.root.Lstat(p)
		if err != nil || !fi.IsDir() {
			continue // removed or replaced by a later layer
		}
		if err := u.root.Chtimes(p, u.dirTimes[p], u.dirTimes[p]); err != nil {
			return fmt.Errorf("set mtime of directory %q: %w", p, err)
		}
	}
	return nil
}
