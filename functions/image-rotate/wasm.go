//go:build wasip1

package main

import "vhive.dev/vhive/functions/sdk"

// A wasip1 reactor never runs main: build and register at init.
func init() { sdk.Run(mustNew().handle) }
