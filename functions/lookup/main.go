// Command lookup is a memory-heavy function for the REAP benchmarks, shaped
// like vHive's lr_serving: at start-up it builds 48 MiB of model tables
// (pseudo-random float64, 1536 chunks of 32 KiB), and each call scores a
// payload-derived feature vector against a payload-dependent subset of the
// chunks, so the pages a call touches depend on its payload:
//
//	record  chunks with i%10 in [0,6): 60% of the table
//	replay  chunks with i%10 in [1,7): 60%, 5/6 of it shared with record
//	other   chunks with (i+h)%10 in [0,6), h = FNV-1a(payload) % 10
//
// Reply: "lookup subset=<record|replay|hash> chunks=<k>/1536 touched_mib=<x>
// score=<s>". For a given payload the reply is the same in every instance.
package main

import (
	"context"
	"fmt"
	"hash/fnv"
	"math"

	"vhive.dev/vhive/functions/sdk"
)

const (
	tableBytes  = 48 << 20
	chunkFloats = 4096 // 32 KiB: eight 4 KiB pages
	numChunks   = tableBytes / 8 / chunkFloats
)

type model struct {
	table []float64
}

func newModel() *model {
	t := make([]float64, tableBytes/8)
	x := uint64(42)
	for i := range t {
		x = splitmix64(x)
		t[i] = unit(x)
	}
	return &model{table: t}
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	z := x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

// unit maps x to [-1, 1).
func unit(x uint64) float64 { return float64(x>>11)/(1<<52) - 1 }

// subset returns the subset's name and the chunk selector for payload.
func subset(payload string) (string, func(i int) bool) {
	switch payload {
	case "record":
		return "record", func(i int) bool { return i%10 < 6 }
	case "replay":
		return "replay", func(i int) bool { return i%10 >= 1 && i%10 < 7 }
	}
	h := fnv.New64a()
	h.Write([]byte(payload))
	off := int(h.Sum64() % 10)
	return "hash", func(i int) bool { return (i+off)%10 < 6 }
}

// features is the payload's feature vector, one weight per chunk element.
func features(payload string) []float64 {
	h := fnv.New64a()
	h.Write([]byte(payload))
	x := h.Sum64()
	f := make([]float64, chunkFloats)
	for i := range f {
		x = splitmix64(x)
		f[i] = unit(x)
	}
	return f
}

func (m *model) handle(_ context.Context, payload string) (string, error) {
	name, sel := subset(payload)
	feat := features(payload)
	var sum float64
	chunks := 0
	for c := range numChunks {
		if !sel(c) {
			continue
		}
		chunks++
		row := m.table[c*chunkFloats : (c+1)*chunkFloats]
		for j, w := range row {
			sum += w * feat[j]
		}
	}
	score := 1 / (1 + math.Exp(-sum/float64(chunks*chunkFloats)*1000))
	return fmt.Sprintf("lookup subset=%s chunks=%d/%d touched_mib=%.1f score=%.6f",
		name, chunks, numChunks, float64(chunks*chunkFloats*8)/(1<<20), score), nil
}

func main() { sdk.Run(newModel().handle) }
