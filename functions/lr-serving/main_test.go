package main

import (
	"strings"
	"testing"

	"vhive.dev/vhive/functions/sdk"
	"vhive.dev/vhive/functions/sdk/sdktest"
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
	out := sdktest.InputSets(t, func() sdk.Handler { return newServer().handle })
	if !strings.HasPrefix(out[1], "lr-serving set=1 reviews=200 ") {
		t.Errorf("record = %q", out[1])
	}
}
