//go:build wasip1

package main

import "vhive.dev/vhive/functions/sdk"

func init() { sdk.Run(handle) }
