package main

import (
	"context"
	"testing"
)

func TestHandle(t *testing.T) {
	for in, want := range map[string]string{
		"world": "Hello, world!", "record": "Hello, record!", "": "Hello, !",
	} {
		got, err := handle(context.Background(), in)
		if err != nil || got != want {
			t.Errorf("handle(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
