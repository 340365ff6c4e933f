package wasm

import (
	"fmt"
	"runtime/debug"
)

// RuntimeVersion names what a snapshot depends on: the wazero version this
// binary was built with and the state file version, e.g.
// "wazero v1.12.0, wasm state 1". The daemon stores it with snapshots and
// refuses snapshots taken by another (sandbox.Backend's runtime version).
func RuntimeVersion() string {
	v := "unknown"
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, d := range bi.Deps {
			if d.Path == "github.com/tetratelabs/wazero" {
				v = d.Version
				if d.Replace != nil {
					v = d.Replace.Version
				}
			}
		}
	}
	return fmt.Sprintf("wazero %s, wasm state %d", v, StateVersion)
}
