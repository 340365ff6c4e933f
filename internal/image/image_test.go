package image

import (
	"context"
	"errors"
	"testing"
	"time"
)

func TestInsecureRegistriesUsePlainHTTP(t *testing.T) {
	e := newEnv(t, func(o *Options) { o.InsecureRegistries = []string{"registry.internal:5000"} })
	for ref, want := range map[string]string{
		"registry.internal:5000/fn/a:v1": "http",
		"registry.internal/fn/a:v1":      "https", // another host (no port)
		"example.com/fn/a:v1":            "https",
		"127.0.0.1:5000/fn/a:v1":         "http", // loopback always
		"localhost:5000/fn/a:v1":         "http",
	} {
		r, err := e.svc.parseRef(ref)
		if err != nil {
			t.Fatalf("parseRef(%q): %v", ref, err)
		}
		if got := r.Context().Registry.Scheme(); got != want {
			t.Errorf("%s: scheme %s, want %s", ref, got, want)
		}
	}
}

func TestKeyedMutex(t *testing.T) {
	var k keyedMutex
	ctx := context.Background()
	unlockA, err := k.lock(ctx, "a")
	if err != nil {
		t.Fatal(err)
	}
	// Another key is independent.
	unlockB, err := k.lock(ctx, "b")
	if err != nil {
		t.Fatalf("lock b while a is held: %v", err)
	}
	unlockB()
	// The same key waits; a cancelled wait gives up with the context error.
	cctx, cancel := context.WithTimeout(ctx, 20*time.Millisecond)
	defer cancel()
	if _, err := k.lock(cctx, "a"); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("second lock of a held key: err = %v, want DeadlineExceeded", err)
	}
	got := make(chan struct{})
	go func() {
		u, err := k.lock(ctx, "a")
		if err == nil {
			u()
		}
		close(got)
	}()
	select {
	case <-got:
		t.Fatal("lock of a held key succeeded")
	case <-time.After(20 * time.Millisecond):
	}
	unlockA()
	<-got
	k.mu.Lock()
	defer k.mu.Unlock()
	if len(k.locks) != 0 {
		t.Errorf("%d lock entries left after all unlocks", len(k.locks))
	}
}
