// Package mountinfo reads the mount table of the calling thread's mount
// namespace (/proc/thread-self/mountinfo):
// which mount points lie in a directory, for cleanups that must unmount
// them and tests that check none is left.
package mountinfo

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strings"
)

// Under returns the mount points at dir or below it, in mount-table order
// (a parent before what is mounted on it; a point mounted twice is listed
// twice). dir should be absolute.
func Under(dir string) ([]string, error) {
	ms, err := All()
	if err != nil {
		return nil, err
	}
	dir = filepath.Clean(dir)
	var out []string
	for _, m := range ms {
		if m.Point == dir || strings.HasPrefix(m.Point, dir+"/") || dir == "/" {
			out = append(out, m.Point)
		}
	}
	return out, nil
}

// Mount is one line of the mount table.
type Mount struct {
	Point  string // mount point, as the process's root sees it
	FSType string // e.g. "nsfs", "tmpfs"
	Root   string // what of its file system is mounted there
}

// All returns the whole mount table in mount-table order. A mount hidden
// under a later mount on the same point or on a directory above it is
// listed too, with its own point.
func All() ([]Mount, error) {
	f, err := os.Open("/proc/thread-self/mountinfo")
	if err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	defer f.Close()
	var out []Mount
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 5 {
			continue
		}
		m := Mount{Point: Unescape(fields[4]), Root: Unescape(fields[3])}
		// Optional fields end with "-", then the file system type.
		for i := 6; i+1 < len(fields); i++ {
			if fields[i] == "-" {
				m.FSType = fields[i+1]
				break
			}
		}
		out = append(out, m)
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("read mountinfo: %w", err)
	}
	return out, nil
}

// Unescape undoes the octal escapes mountinfo writes for a space, tab,
// newline or backslash in a path (\040, \011, \012, \134); anything else
// is kept as it is.
func Unescape(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			var v byte
			ok := true
			for _, c := range []byte(s[i+1 : i+4]) {
				if c < '0' || c > '7' {
					ok = false
					break
				}
				v = v*8 + (c - '0')
			}
			if ok {
				b.WriteByte(v)
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}
