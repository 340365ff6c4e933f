package main

import (
	"context"
	"strings"
	"testing"
)

// The model really learns: held-out reviews are classified well.
func TestModelAccuracy(t *testing.T) {
	s := newServer()
	test := dataset(999, 1000)
	correct := 0
	for _, r := range test {
		if (s.m.score(r.words) >= 0.5) == (r.label == 1) {
			correct++
		}
	}
	if correct < 850 {
		t.Errorf("held-out accuracy %d/1000, want ≥ 850", correct)
	}
	t.Logf("held-out accuracy %d/1000", correct)
}

func TestHandle(t *testing.T) {
	a, b := newServer(), newServer()
	seen := map[string]bool{}
	for _, p := range []string{"x", "record", "replay"} {
		ra, err := a.handle(context.Background(), p)
		if err != nil {
			t.Fatal(err)
		}
		if rb, _ := b.handle(context.Background(), p); ra != rb {
			t.Errorf("%s: %q vs %q", p, ra, rb)
		}
		seen[ra] = true
		t.Log(ra)
	}
	if len(seen) != 3 {
		t.Error("input sets do not differ")
	}
	if r, _ := a.handle(context.Background(), "record"); !strings.HasPrefix(r, "lr-serving set=1 reviews=200 ") {
		t.Errorf("record = %q", r)
	}
}
