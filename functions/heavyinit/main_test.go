package main

import (
	"context"
	"crypto/sha256"
	"fmt"
	"strings"
	"testing"
)

func TestHeavy(t *testing.T) {
	h := newHeavy(4, 2)
	// Independent digest: two chained SHA-256 passes over the heap.
	var d [sha256.Size]byte
	for range 2 {
		s := sha256.New()
		s.Write(d[:])
		for _, c := range h.heap {
			s.Write(c)
		}
		s.Sum(d[:0])
	}
	if d != h.digest {
		t.Fatalf("digest %x, want %x", h.digest, d)
	}
	a, err := h.handle(context.Background(), "record")
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(a, "heavyinit heap_mib=4 rounds=2 init_ms=") || !strings.Contains(a, fmt.Sprintf("digest=%x ", d)) {
		t.Errorf("reply = %q", a)
	}
	b, _ := newHeavy(4, 2).handle(context.Background(), "record")
	if a[strings.Index(a, "digest="):] != b[strings.Index(b, "digest="):] {
		t.Errorf("instances differ: %q vs %q", a, b)
	}
	c, _ := h.handle(context.Background(), "replay")
	if c[strings.Index(c, "probe="):] == a[strings.Index(a, "probe="):] {
		t.Error("the probe does not depend on the payload")
	}
}

func TestFromEnv(t *testing.T) {
	t.Setenv("HEAVYINIT_HEAP_MIB", "2")
	t.Setenv("HEAVYINIT_ROUNDS", "0")
	h, err := fromEnv()
	if err != nil || len(h.heap) != 2 || h.rounds != 0 {
		t.Fatalf("fromEnv = %+v, %v", h, err)
	}
	for name, v := range map[string]string{"HEAVYINIT_HEAP_MIB": "0", "HEAVYINIT_ROUNDS": "lots"} {
		t.Run(name, func(t *testing.T) {
			t.Setenv(name, v)
			if _, err := fromEnv(); err == nil || !strings.Contains(err.Error(), name) {
				t.Errorf("%s=%s: err = %v, want one naming the variable", name, v, err)
			}
		})
	}
}

// BenchmarkStartup measures the default start-up work (160 MiB, 1 round).
func BenchmarkStartup(b *testing.B) {
	for b.Loop() {
		newHeavy(160, 1)
	}
}

// BenchmarkStartupFloor is the floor for BenchmarkStartup: allocating the
// same 160 MiB and touching every page once.
func BenchmarkStartupFloor(b *testing.B) {
	for b.Loop() {
		heap := make([][]byte, 160)
		for i := range heap {
			c := make([]byte, chunkBytes)
			for j := 0; j < len(c); j += 4096 {
				c[j] = 1
			}
			heap[i] = c
		}
	}
}
