package main

import (
	"context"
	"math/big"
	"strings"
	"testing"
)

func TestFibonacci(t *testing.T) {
	ctx := context.Background()
	for in, want := range map[string]string{
		"0": "fib(0) = 0", "1": "fib(1) = 1", "2": "fib(2) = 1", "10": "fib(10) = 55",
		"93": "fib(93) = 12200160415121876738", "100": "fib(100) = 354224848179261915075",
	} {
		if got, err := handle(ctx, in); err != nil || got != want {
			t.Errorf("handle(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	// Cassini: fib(m)^2 - fib(m-1)*fib(m+1) = (-1)^(m-1); at m = 10001 it is 1.
	a, b, c := fib(10000), fib(10001), fib(10002)
	lhs := new(big.Int).Sub(new(big.Int).Mul(b, b), new(big.Int).Mul(a, c))
	if lhs.Cmp(big.NewInt(1)) != 0 {
		t.Errorf("Cassini identity fails at 10000: %s", lhs)
	}
	rec, err := handle(ctx, "record")
	if err != nil || rec != "fib(10000) = "+a.String() {
		t.Errorf("record = %.40q..., %v", rec, err)
	}
	if rep, _ := handle(ctx, "replay"); !strings.HasPrefix(rep, "fib(20000) = ") {
		t.Errorf("replay = %.40q...", rep)
	}
	for _, bad := range []string{"", "-1", "100001", "ten", "1e3"} {
		if _, err := handle(ctx, bad); err == nil || !strings.Contains(err.Error(), `"`+bad+`"`) {
			t.Errorf("handle(%q) error = %v, want one naming the payload", bad, err)
		}
	}
}

func BenchmarkFibonacciRecord(b *testing.B) {
	for b.Loop() {
		if _, err := handle(context.Background(), "record"); err != nil {
			b.Fatal(err)
		}
	}
}
