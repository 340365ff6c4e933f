// Package rootfs turns an unpacked image root into the read-only ext4 disk
// a microVM boots its function from: one file per image digest, built with
// `mkfs.ext4 -d` (e2fsprogs) and shared by every instance of the image.
//
// The image is deterministic for a given source tree: fixed UUID and
// directory hash seed (derived from the digest), root owned by 0:0, no
// journal, and E2FSPROGS_FAKE_TIME / SOURCE_DATE_EPOCH pinned so that no
// timestamp of the build leaks into it.
//
// Layout under Dir: <hex of digest>.ext4, written as .tmp-* and renamed.
package rootfs

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
)

// fakeTime is the build time written into the file system (1 Jan 2020).
const fakeTime = 1577836800

// Cache builds and keeps images. Safe for concurrent use.
type Cache struct {
	dir string

	mu       sync.Mutex
	building map[string]*build
}

type build struct {
	done chan struct{}
	err  error
}

// New returns a cache in dir (created if missing).
func New(dir string) (*Cache, error) {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, fmt.Errorf("rootfs: %w", err)
	}
	return &Cache{dir: dir, building: map[string]*build{}}, nil
}

var digestRE = regexp.MustCompile(`^[a-z0-9]+:[a-f0-9]{32,128}$`)

// Path is where the image of digest is (or will be) stored.
func (c *Cache) Path(digest string) (string, error) {
	if !digestRE.MatchString(digest) {
		return "", fmt.Errorf("rootfs: image digest %q is not <algorithm>:<hex>", digest)
	}
	_, hexPart, _ := strings.Cut(digest, ":")
	return filepath.Join(c.dir, hexPart+".ext4"), nil
}

// Get returns the image of digest, building it from src (the unpacked
// image root, never written) on first use.
func (c *Cache) Get(ctx context.Context, digest, src string) (string, error) {
	path, err := c.Path(digest)
	if err != nil {
		return "", err
	}
	for {
		if _, err := os.Stat(path); err == nil {
			return path, nil
		}
		c.mu.Lock()
		b, busy := c.building[digest]
		if !busy {
			b = &build{done: make(chan struct{})}
			c.building[digest] = b
			c.mu.Unlock()
			b.err = Build(ctx, src, path, digest)
			c.mu.Lock()
			delete(c.building, digest)
			c.mu.Unlock()
			close(b.done)
			if b.err != nil {
				return "", b.err
			}
			return path, nil
		}
		c.mu.Unlock()
		select {
		case <-b.done:
			if b.err != nil {
				return "", b.err
			}
		case <-ctx.Done():
			return "", ctx.Err()
		}
	}
}

// Build writes the ext4 image of src to dst (atomically). seed (the image
// digest) fixes the file system's UUID and hash seed.
func Build(ctx context.Context, src, dst, seed string) error {
	fi, err := os.Stat(src)
	if err != nil {
		return fmt.Errorf("rootfs: source: %w", err)
	}
	if !fi.IsDir() {
		return fmt.Errorf("rootfs: source %q is not a directory", src)
	}
	bytes, inodes, err := usage(src)
	if err != nil {
		return fmt.Errorf("rootfs: measure %q: %w", src, err)
	}
	// Room for metadata and a margin; ext4 needs a few MiB at least.
	size := bytes + bytes/4 + inodes*512 + 16<<20
	size = (size + 1<<20 - 1) &^ (1<<20 - 1)
	sum := sha256.Sum256([]byte(seed))
	u := hex.EncodeToString(sum[:16])
	uuid := u[0:8] + "-" + u[8:12] + "-" + u[12:16] + "-" + u[16:20] + "-" + u[20:32]
	tmp := filepath.Join(filepath.Dir(dst), ".tmp-"+filepath.Base(dst))
	_ = os.Remove(tmp)
	args := []string{
		"-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0",
		"-N", strconv.FormatInt(inodes+256, 10),
		"-O", "^has_journal",
		"-U", uuid,
		"-E", "root_owner=0:0,hash_seed=" + uuid + ",lazy_itable_init=0,nodiscard",
		"-L", "vhive-rootfs",
		"-d", src, tmp, strconv.FormatInt(size/1024, 10) + "k",
	}
	mkfs, err := exec.LookPath("mkfs.ext4")
	if err != nil {
		mkfs = "/usr/sbin/mkfs.ext4"
		if _, serr := os.Stat(mkfs); serr != nil {
			return fmt.Errorf("rootfs: mkfs.ext4 not found (apt-get install e2fsprogs): %w", err)
		}
	}
	cmd := exec.CommandContext(ctx, mkfs, args...)
	t := strconv.Itoa(fakeTime)
	cmd.Env = append(os.Environ(), "E2FSPROGS_FAKE_TIME="+t, "SOURCE_DATE_EPOCH="+t, "MKE2FS_DEVICE_SECTSIZE=512")
	if out, err := cmd.CombinedOutput(); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rootfs: mkfs.ext4 -d %s: %w: %s", src, err, strings.TrimSpace(string(out)))
	}
	if err := os.Chmod(tmp, 0o444); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rootfs: %w", err)
	}
	if err := os.Rename(tmp, dst); err != nil {
		os.Remove(tmp)
		return fmt.Errorf("rootfs: %w", err)
	}
	return nil
}

// usage sums file sizes (rounded to blocks) and counts entries.
func usage(root string) (int64, int64, error) {
	var bytes, n int64
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		n++
		if d.Type().IsRegular() {
			fi, err := d.Info()
			if err != nil {
				return err
			}
			bytes += (fi.Size() + 4095) &^ 4095
		} else {
			bytes += 4096
		}
		return nil
	})
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return 0, 0, err
	}
	return bytes, n, nil
}
