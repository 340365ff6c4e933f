// Command heavyinit starts slowly on purpose, for the gVisor boot-versus-
// restore crossover: before it listens it fills a large heap
// ($HEAVYINIT_HEAP_MIB, default 160 MiB, in 1 MiB chunks of pseudo-random
// bytes) and hashes all of it $HEAVYINIT_ROUNDS times (default 1, chained
// SHA-256). Restoring a snapshot skips all of that work.
//
// Each call reads one word from every chunk at a payload-dependent offset
// (touching a page per MiB of heap). Reply: "heavyinit heap_mib=<n> rounds=<r>
// init_ms=<time the start-up work took> digest=<hex> probe=<hex>"; digest and
// probe are the same in every instance for the same settings and payload.
package main

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"fmt"
	"hash/fnv"
	"log/slog"
	"os"
	"strconv"
	"time"

	"vhive.dev/vhive/functions/sdk"
)

const chunkBytes = 1 << 20

type heavy struct {
	heap    [][]byte
	rounds  int
	digest  [sha256.Size]byte
	initDur time.Duration
}

func newHeavy(mib, rounds int) *heavy {
	start := time.Now()
	h := &heavy{heap: make([][]byte, mib), rounds: rounds}
	x := uint64(7)
	for i := range h.heap {
		c := make([]byte, chunkBytes)
		for j := 0; j < len(c); j += 8 {
			x = splitmix64(x)
			binary.LittleEndian.PutUint64(c[j:], x)
		}
		h.heap[i] = c
	}
	for range rounds {
		s := sha256.New()
		s.Write(h.digest[:])
		for _, c := range h.heap {
			s.Write(c)
		}
		s.Sum(h.digest[:0])
	}
	h.initDur = time.Since(start)
	return h
}

func splitmix64(x uint64) uint64 {
	x += 0x9e3779b97f4a7c15
	z := x
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}

func (h *heavy) handle(_ context.Context, payload string) (string, error) {
	f := fnv.New64a()
	f.Write([]byte(payload))
	off := int(f.Sum64()%(chunkBytes/8)) * 8
	var probe uint64
	for _, c := range h.heap {
		probe ^= binary.LittleEndian.Uint64(c[off:])
	}
	return fmt.Sprintf("heavyinit heap_mib=%d rounds=%d init_ms=%d digest=%x probe=%016x",
		len(h.heap), h.rounds, h.initDur.Milliseconds(), h.digest, probe), nil
}

// envInt reads an integer setting in [lo, hi], def when unset.
func envInt(name string, def, lo, hi int) (int, error) {
	v := os.Getenv(name)
	if v == "" {
		return def, nil
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < lo || n > hi {
		return 0, fmt.Errorf("%s=%q: want an integer in [%d, %d]", name, v, lo, hi)
	}
	return n, nil
}

// fromEnv builds the function from $HEAVYINIT_HEAP_MIB and $HEAVYINIT_ROUNDS.
func fromEnv() (*heavy, error) {
	mib, err := envInt("HEAVYINIT_HEAP_MIB", 160, 1, 4096)
	if err != nil {
		return nil, err
	}
	rounds, err := envInt("HEAVYINIT_ROUNDS", 1, 0, 100)
	if err != nil {
		return nil, err
	}
	return newHeavy(mib, rounds), nil
}

func mustFromEnv() *heavy {
	h, err := fromEnv()
	if err != nil {
		slog.Error("heavyinit: bad setting", "err", err)
		os.Exit(1)
	}
	slog.Info("heavyinit: start-up work done", "heap_mib", len(h.heap), "rounds", h.rounds, "took", h.initDur)
	return h
}

func main() { sdk.Run(mustFromEnv().handle) }
