// Command counter is a stateful function for snapshot tests: it builds a
// table at start-up and answers every call with an incrementing count and a
// checksum recomputed over the table, so a restored instance proves that both
// its counter and its heap continued from the snapshot.
//
// Reply: "count=<n> checksum=<16 hex digits>"; n is 1 on the first call of a
// fresh instance. The table is deterministic, so the checksum is the same in
// every instance (see tableChecksum); if the table was corrupted the call
// fails instead.
package main

import (
	"context"
	"fmt"
	"sync/atomic"

	"vhive.dev/vhive/functions/sdk"
)

// tableWords is the table size: 4 MiB of uint64.
const tableWords = 4 << 20 / 8

type counter struct {
	table []uint64
	sum   uint64 // checksum of table when it was built
	n     atomic.Uint64
}

func newCounter() *counter {
	t := make([]uint64, tableWords)
	x := uint64(0x9e3779b97f4a7c15)
	for i := range t {
		x = splitmix64(x)
		t[i] = x
	}
	return &counter{table: t, sum: checksum(t)}
}

func (c *counter) handle(_ context.Context, _ string) (string, error) {
	n := c.n.Add(1)
	if got := checksum(c.table); got != c.sum {
		return "", fmt.Errorf("counter: table checksum is %016x, built as %016x: state is corrupt", got, c.sum)
	}
	return fmt.Sprintf("count=%d checksum=%016x", n, c.sum), nil
}

// splitmix64 steps the SplitMix64 generator.
func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	z := x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// checksum is an order-dependent FNV-1a style hash over the words.
func checksum(t []uint64) uint64 {
	h := uint64(14695981039346656037)
	for _, v := range t {
		h = (h ^ v) * 1099511628211
	}
	return h
}

func main() { sdk.Run(newCounter().handle) }
