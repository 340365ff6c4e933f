//go:build wasip1

package main

import "vhive.dev/vhive/functions/sdk"

// A wasip1 reactor never runs main: build the tables and register at init
// (run once by _initialize, so the tables are part of a snapshot).
func init() { sdk.Run(newModel().handle) }
