//go:build !amd64

package microvm

import "errors"

// installNoHugepageFilter: the filter is written for x86_64 only.
func installNoHugepageFilter() error {
	return errors.New("the no-hugepage seccomp filter is built for x86_64 only")
}
