//go:build wasip1

package main

import "vhive.dev/vhive/functions/sdk"

// A wasip1 reactor never runs main: do the start-up work and register at init
// (run once by _initialize).
func init() { sdk.Run(mustFromEnv().handle) }
