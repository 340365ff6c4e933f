package main

import (
	"context"
	"fmt"
	"math"
	"strings"
	"testing"
)

func TestSets(t *testing.T) {
	s := newSerdes()
	for set, payload := range map[int]string{1: "record", 2: "replay"} {
		got, err := s.handle(context.Background(), payload)
		if err != nil {
			t.Fatal(err)
		}
		want := fmt.Sprintf("json-serdes set=%d records=%d ", set, map[int]int{1: 100, 2: 1000}[set])
		if !strings.HasPrefix(got, want) {
			t.Errorf("%s = %q, want prefix %q", payload, got, want)
		}
		if again, _ := newSerdes().handle(context.Background(), payload); again != got {
			t.Errorf("%s differs between instances: %q vs %q", payload, got, again)
		}
	}
	// A corrupted set (here: a NaN score cannot be encoded) is an error.
	s.sets[0].Records[3].Score = math.NaN()
	if _, err := s.handle(context.Background(), "record"); err == nil {
		t.Error("a set that cannot be encoded did not fail")
	}
}

func TestCanonical(t *testing.T) {
	s := newSerdes()
	for in, want := range map[string]string{
		`{"b": 1, "a": [true, null, "x"]}`: `{"a":[true,null,"x"],"b":1}`,
		` 12345678901234567890 `:           `12345678901234567890`,
		`{"n": 1.50, "s": "\u00e9\n"}`:     `{"n":1.50,"s":"é\n"}`,
		`[]`:                               `[]`,
	} {
		got, err := s.handle(context.Background(), in)
		if err != nil || got != want {
			t.Errorf("handle(%s) = %s, %v; want %s", in, got, err, want)
		}
	}
	for _, bad := range []string{"", "{", `{"a":1} {"b":2}`, "hello"} {
		if _, err := s.handle(context.Background(), bad); err == nil {
			t.Errorf("handle(%q) succeeded", bad)
		}
	}
}

func BenchmarkReplay(b *testing.B) {
	s := newSerdes()
	for b.Loop() {
		if _, err := s.handle(context.Background(), "replay"); err != nil {
			b.Fatal(err)
		}
	}
}

// FuzzCanonical: a reply is itself a document whose canonical form is the
// reply (idempotence), and no input panics.
func FuzzCanonical(f *testing.F) {
	for _, s := range []string{`{"b":1,"a":[true,null]}`, `1.50`, `"\u00e9"`, `[{"x":{}}]`, `{`, ``} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, in string) {
		out, err := canonical(in)
		if err != nil {
			return
		}
		again, err := canonical(out)
		if err != nil || again != out {
			t.Fatalf("canonical(%q) = %q, but canonical of that = %q, %v", in, out, again, err)
		}
	})
}
