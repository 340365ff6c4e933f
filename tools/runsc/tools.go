//go:build tools

// Package tools pins the gVisor module that provides runsc. It is a separate
// module so the main go.mod does not carry gVisor's dependency graph.
package tools

import _ "gvisor.dev/gvisor/runsc"
