package main

import (
	"context"
	"fmt"
	"strings"
	"testing"
)

func TestCounter(t *testing.T) {
	c := newCounter()
	ctx := context.Background()
	var sum string
	for i := 1; i <= 3; i++ {
		got, err := c.handle(ctx, "anything")
		if err != nil {
			t.Fatal(err)
		}
		var n int
		var s string
		if _, err := fmt.Sscanf(got, "count=%d checksum=%s", &n, &s); err != nil {
			t.Fatalf("reply %q does not parse: %v", got, err)
		}
		if n != i {
			t.Errorf("call %d: count=%d", i, n)
		}
		if sum != "" && s != sum {
			t.Errorf("checksum changed between calls: %s then %s", sum, s)
		}
		sum = s
	}
	// A second instance has the same (deterministic) checksum and its own count.
	got, err := newCounter().handle(ctx, "")
	if err != nil || got != "count=1 checksum="+sum {
		t.Errorf("fresh instance = %q, %v", got, err)
	}
	// Corrupt state is reported.
	c.table[len(c.table)/2] ^= 1
	if _, err := c.handle(ctx, ""); err == nil || !strings.Contains(err.Error(), "corrupt") {
		t.Errorf("corrupted table: err = %v", err)
	}
}
