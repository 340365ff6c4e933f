// Package sdktest checks a function handler against the contract of
// vHive's functions in its tests.
package sdktest

import (
	"context"
	"testing"

	"vhive.dev/vhive/functions/sdk"
)

// InputSets checks vHive's input sets on handlers made by newHandler: the
// default payload ("x"), "record" and "replay" get three different replies,
// each the same from another instance. It returns the three replies, in
// that order, for the caller to check their content.
func InputSets(t testing.TB, newHandler func() sdk.Handler) [3]string {
	t.Helper()
	ctx := context.Background()
	a, b := newHandler(), newHandler()
	var out [3]string
	for i, p := range []string{"x", "record", "replay"} {
		ra, err := a(ctx, p)
		if err != nil {
			t.Fatalf("%s: %v", p, err)
		}
		if rb, err := b(ctx, p); err != nil || ra != rb {
			t.Errorf("%s: %q, from another instance %q (%v)", p, ra, rb, err)
		}
		out[i] = ra
		t.Logf("%s: %s", p, ra)
	}
	if out[0] == out[1] || out[1] == out[2] || out[0] == out[2] {
		t.Errorf("input sets do not differ: %q", out)
	}
	return out
}
