package image

import (
	"errors"
	"strings"
)

// Reasons a tar entry name is refused by cleanEntryPath.
var (
	errEmptyName    = errors.New("empty name")
	errNULInName    = errors.New("name contains a NUL byte")
	errAbsolutePath = errors.New("absolute path")
	errDotDot       = errors.New(`path contains a ".." component`)
)

// cleanEntryPath turns a tar entry name (or hard-link target) into a clean
// path relative to the rootfs: "." and empty components are dropped, a
// leading "./" is accepted, and the result never starts with "/" and never
// contains "..". The rootfs itself is ".". Absolute names and ".."
// components are refused rather than reinterpreted: a legitimate layer never
// has them, so their presence marks a hostile or broken layer.
func cleanEntryPath(name string) (string, error) {
	if name == "" {
		return "", errEmptyName
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", errNULInName
	}
	if name[0] == '/' {
		return "", errAbsolutePath
	}
	parts := strings.Split(name, "/")
	out := parts[:0]
	for _, p := range parts {
		switch p {
		case "", ".":
			continue
		case "..":
			return "", errDotDot
		}
		out = append(out, p)
	}
	if len(out) == 0 {
		return ".", nil
	}
	return strings.Join(out, "/"), nil
}
