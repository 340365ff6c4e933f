// Package python holds the Python function suite (the REAP paper's
// functions, written for vhive) and its end-to-end tests; see
// docs/functions.md. Each subdirectory is one function built from Debian
// packages by vhive.dev/vhive/internal/debimage (`make images`,
// `go run ./tools/mkimage -python ci|full`); runtime/ is the gRPC server
// every image runs.
//
// The tests build the CI set into the builder's cache, run every function
// through a real daemon on gVisor and runc, and check that a gVisor snapshot
// restore answers exactly as a boot for both input sets.
package python
