// Package sandboxtest is the conformance suite every sandbox backend must
// pass (the idea of containerd's snapshotter testsuite): it drives a
// sandbox.Backend through the contract of internal/sandbox — lifecycle,
// idempotent Stop, exit reporting, stats, concurrency, bad input and, when
// the backend declares it, snapshot/restore.
//
// A backend's test calls
//
//	sandboxtest.Run(t, backend, sandboxtest.Config{Spec: ..., Exiting: ..., Leftovers: ...})
//
// with a function of its own kind (an OCI rootfs, a wasm module) that serves
// on spec.Port. The suite uses real backends: it creates real sandboxes.
package sandboxtest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

// Config tells the suite how to make functions for the backend under test.
type Config struct {
	// Spec returns the spec of a function that serves on its Port (or
	// unix endpoint) until it is killed. id is unique per call. Required.
	Spec func(t testing.TB, id string) sandbox.Spec
	// Exiting returns the spec of a function that writes marker to stderr
	// and exits with status 3 at once. Nil skips the exit case.
	Exiting func(t testing.TB, id, marker string) sandbox.Spec
	// Ping checks once that the function answers at endpoint. Default: a
	// connection (TCP, or unix for "unix://" endpoints) is accepted.
	Ping func(ctx context.Context, endpoint string) error
	// Leftovers lists what instance id still holds on the host (mounts,
	// directories, netns, cgroups, processes). Called after Stop; it must
	// return nothing. Nil skips the check.
	Leftovers func(id string) []string
	// Timeout bounds waiting for a function to answer or exit. Default 30s.
	Timeout time.Duration
}

// Run runs the suite as subtests of t.
func Run(t *testing.T, b sandbox.Backend, cfg Config) {
	if cfg.Spec == nil {
		t.Fatal("sandboxtest: Config.Spec is nil")
	}
	if cfg.Ping == nil {
		cfg.Ping = DialPing
	}
	if cfg.Timeout == 0 {
		cfg.Timeout = 30 * time.Second
	}
	s := &suite{b: b, cfg: cfg}
	t.Run("Capabilities", s.capabilities)
	t.Run("Lifecycle", s.lifecycle)
	t.Run("StopBeforeStart", s.stopBeforeStart)
	t.Run("DuplicateID", s.duplicateID)
	t.Run("BadSpec", s.badSpec)
	t.Run("Exit", s.exit)
	t.Run("Concurrent", s.concurrent)
	t.Run("Snapshot", s.snapshot)
}

// DialPing succeeds when a connection to endpoint is accepted.
func DialPing(ctx context.Context, endpoint string) error {
	var d net.Dialer
	network, addr := "tcp", endpoint
	if p, ok := strings.CutPrefix(endpoint, "unix://"); ok {
		network, addr = "unix", p
	}
	c, err := d.DialContext(ctx, network, addr)
	if err != nil {
		return err
	}
	return c.Close()
}

type suite struct {
	b   sandbox.Backend
	cfg Config
}

func (s *suite) id(t testing.TB, name string) string {
	// Short and unique within this test binary run.
	return fmt.Sprintf("st-%s-%d", name, time.Now().UnixNano()%1_000_000_000)
}

// create makes a sandbox and registers its Stop with t.Cleanup.
func (s *suite) create(t testing.TB, spec sandbox.Spec) sandbox.Sandbox {
	t.Helper()
	sb, err := s.b.Create(context.Background(), spec)
	if err != nil {
		t.Fatalf("Create(%q): %v", spec.ID, err)
	}
	t.Cleanup(func() {
		if err := sb.Stop(context.Background()); err != nil {
			t.Errorf("cleanup Stop(%q): %v", spec.ID, err)
		}
	})
	return sb
}

// waitServing pings until the function answers, the sandbox ends or the
// timeout passes.
func (s *suite) waitServing(t testing.TB, sb sandbox.Sandbox) {
	t.Helper()
	deadline := time.Now().Add(s.cfg.Timeout)
	var err error
	for time.Now().Before(deadline) {
		select {
		case <-sb.Done():
			t.Fatalf("sandbox %q ended before serving: %v", sb.ID(), sb.Err())
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		err = s.cfg.Ping(ctx, sb.Endpoint())
		cancel()
		if err == nil {
			return
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatalf("sandbox %q does not answer at %q: %v", sb.ID(), sb.Endpoint(), err)
}

func (s *suite) checkStopped(t testing.TB, sb sandbox.Sandbox) {
	t.Helper()
	select {
	case <-sb.Done():
	default:
		t.Fatalf("Done of %q not closed after Stop returned", sb.ID())
	}
	if sb.Err() == nil {
		t.Errorf("Err of %q is nil after Stop", sb.ID())
	}
	if s.cfg.Leftovers != nil {
		if left := s.cfg.Leftovers(sb.ID()); len(left) > 0 {
			t.Errorf("after Stop, %q left: %v", sb.ID(), left)
		}
	}
}

func (s *suite) capabilities(t *testing.T) {
	if s.b.Name() == "" {
		t.Error("Name() is empty")
	}
	c := s.b.Capabilities()
	_, isRestorer := s.b.(sandbox.Restorer)
	if c.Snapshot && !isRestorer {
		t.Error("Capabilities.Snapshot but the backend does not implement Restorer")
	}
	if (c.LazyMemory || c.REAP) && !c.Snapshot {
		t.Errorf("capabilities %+v: LazyMemory/REAP without Snapshot", c)
	}
	if c.REAP && !c.LazyMemory {
		t.Errorf("capabilities %+v: REAP without LazyMemory", c)
	}
}

func (s *suite) lifecycle(t *testing.T) {
	ctx := context.Background()
	spec := s.cfg.Spec(t, s.id(t, "life"))
	sb := s.create(t, spec)
	if sb.ID() != spec.ID {
		t.Errorf("ID() = %q, want %q", sb.ID(), spec.ID)
	}
	if sb.Err() != nil {
		t.Errorf("Err before Start = %v", sb.Err())
	}
	select {
	case <-sb.Done():
		t.Fatal("Done closed before Start")
	default:
	}
	if _, ok := sb.(sandbox.Snapshotter); s.b.Capabilities().Snapshot && !ok {
		t.Error("Capabilities.Snapshot but the sandbox does not implement Snapshotter")
	}
	if err := sb.Start(ctx); err != nil {
		t.Fatalf("Start: %v", err)
	}
	if sb.Endpoint() == "" {
		t.Fatal("Endpoint is empty")
	}
	s.waitServing(t, sb)
	st, err := sb.Stats(ctx)
	if err != nil {
		t.Fatalf("Stats: %v", err)
	}
	if st.RSS <= 0 || st.PSS <= 0 || st.PSS > st.RSS {
		t.Errorf("Stats = %+v: want 0 < PSS <= RSS", st)
	}
	if sb.Err() != nil {
		t.Errorf("Err while serving = %v", sb.Err())
	}
	if err := sb.Stop(ctx); err != nil {
		t.Fatalf("Stop: %v", err)
	}
	s.checkStopped(t, sb)
	if err := sb.Stop(ctx); err != nil {
		t.Errorf("second Stop: %v", err)
	}
	if err := sb.Start(ctx); err == nil {
		t.Error("Start after Stop succeeded")
	}
	pctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := s.cfg.Ping(pctx, sb.Endpoint()); err == nil {
		t.Errorf("the function still answers at %q after Stop", sb.Endpoint())
	}
}

func (s *suite) stopBeforeStart(t *testing.T) {
	sb := s.create(t, s.cfg.Spec(t, s.id(t, "nostart")))
	if err := sb.Stop(context.Background()); err != nil {
		t.Fatalf("Stop before Start: %v", err)
	}
	s.checkStopped(t, sb)
}

func (s *suite) duplicateID(t *testing.T) {
	ctx := context.Background()
	spec := s.cfg.Spec(t, s.id(t, "dup"))
	sb := s.create(t, spec)
	if dup, err := s.b.Create(ctx, spec); err == nil {
		_ = dup.Stop(ctx)
		t.Fatalf("second Create(%q) succeeded", spec.ID)
	}
	// The failed duplicate must not have damaged the first one.
	if err := sb.Start(ctx); err != nil {
		t.Fatalf("Start after a failed duplicate Create: %v", err)
	}
	s.waitServing(t, sb)
}

func (s *suite) badSpec(t *testing.T) {
	ctx := context.Background()
	for name, mut := range map[string]func(*sandbox.Spec){
		"EmptyID":        func(sp *sandbox.Spec) { sp.ID = "" },
		"SlashID":        func(sp *sandbox.Spec) { sp.ID = "a/../b" },
		"NegativeMemory": func(sp *sandbox.Spec) { sp.MemoryLimit = -1 },
		"NegativeCPU":    func(sp *sandbox.Spec) { sp.CPULimit = -1 },
	} {
		spec := s.cfg.Spec(t, s.id(t, "bad"))
		mut(&spec)
		sb, err := s.b.Create(ctx, spec)
		if err == nil {
			_ = sb.Stop(ctx)
			t.Errorf("%s: Create succeeded", name)
			continue
		}
		if err.Error() == "" {
			t.Errorf("%s: empty error", name)
		}
	}
}

func (s *suite) exit(t *testing.T) {
	if s.cfg.Exiting == nil {
		t.Skip("Config.Exiting is nil")
	}
	ctx := context.Background()
	marker := fmt.Sprintf("marker-%d", time.Now().UnixNano())
	sb := s.create(t, s.cfg.Exiting(t, s.id(t, "exit"), marker))
	if err := sb.Start(ctx); err != nil {
		// Some backends notice the exit already in Start; the error
		// must then carry the marker.
		if !strings.Contains(err.Error(), marker) {
			t.Fatalf("Start: %v (no stderr marker)", err)
		}
		return
	}
	select {
	case <-sb.Done():
	case <-time.After(s.cfg.Timeout):
		t.Fatal("Done not closed after the function exited")
	}
	err := sb.Err()
	if err == nil {
		t.Fatal("Err is nil after the function exited")
	}
	if !strings.Contains(err.Error(), marker) || !strings.Contains(err.Error(), "3") {
		t.Errorf("Err = %q: want the exit status 3 and the stderr marker %q", err, marker)
	}
	if err := sb.Stop(ctx); err != nil {
		t.Fatalf("Stop after exit: %v", err)
	}
	s.checkStopped(t, sb)
}

func (s *suite) concurrent(t *testing.T) {
	const n = 4
	ctx := context.Background()
	sbs := make([]sandbox.Sandbox, n)
	errs := make([]error, n)
	var wg sync.WaitGroup
	base := s.id(t, "conc")
	for i := range n {
		spec := s.cfg.Spec(t, fmt.Sprintf("%s-%d", base, i))
		wg.Add(1)
		go func() {
			defer wg.Done()
			sb, err := s.b.Create(ctx, spec)
			if err != nil {
				errs[i] = err
				return
			}
			sbs[i] = sb
			errs[i] = sb.Start(ctx)
		}()
	}
	wg.Wait()
	for _, sb := range sbs {
		if sb != nil {
			t.Cleanup(func() { _ = sb.Stop(context.Background()) })
		}
	}
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	seen := map[string]bool{}
	for _, sb := range sbs {
		if seen[sb.Endpoint()] {
			t.Errorf("endpoint %q used twice", sb.Endpoint())
		}
		seen[sb.Endpoint()] = true
		s.waitServing(t, sb)
	}
	for i, sb := range sbs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			errs[i] = sb.Stop(ctx)
		}()
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		t.Fatal(err)
	}
	for _, sb := range sbs {
		s.checkStopped(t, sb)
	}
}

func (s *suite) snapshot(t *testing.T) {
	ctx := context.Background()
	caps := s.b.Capabilities()
	r, isRestorer := s.b.(sandbox.Restorer)
	if !caps.Snapshot {
		if isRestorer {
			_, err := r.Restore(ctx, s.cfg.Spec(t, s.id(t, "norestore")), t.TempDir(), sandbox.RestoreOptions{Mode: sandbox.MemoryEager})
			if !errors.Is(err, sandbox.ErrNotSupported) {
				t.Errorf("Restore without Capabilities.Snapshot: %v, want ErrNotSupported", err)
			}
		}
		return
	}
	sb := s.create(t, s.cfg.Spec(t, s.id(t, "snap")))
	if err := sb.Start(ctx); err != nil {
		t.Fatal(err)
	}
	s.waitServing(t, sb)
	dir := t.TempDir()
	if err := sb.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatalf("Snapshot: %v", err)
	}
	s.waitServing(t, sb) // Snapshot leaves the instance running
	mode := sandbox.MemoryEager
	if !caps.EagerRestore && caps.LazyMemory {
		mode = sandbox.MemoryLazy
	}
	rs, err := r.Restore(ctx, s.cfg.Spec(t, s.id(t, "restored")), dir, sandbox.RestoreOptions{Mode: mode})
	if err != nil {
		t.Fatalf("Restore(%s): %v", mode, err)
	}
	t.Cleanup(func() { _ = rs.Stop(context.Background()) })
	if err := rs.Start(ctx); err != nil {
		t.Fatalf("Start of a restored sandbox: %v", err)
	}
	s.waitServing(t, rs)
	if err := rs.Stop(ctx); err != nil {
		t.Fatal(err)
	}
	s.checkStopped(t, rs)
	if !caps.LazyMemory {
		for _, m := range []sandbox.MemoryMode{sandbox.MemoryLazy, sandbox.MemoryRecord, sandbox.MemoryPrefetch} {
			_, err := r.Restore(ctx, s.cfg.Spec(t, s.id(t, "lazy")), dir, sandbox.RestoreOptions{Mode: m})
			if !errors.Is(err, sandbox.ErrNotSupported) {
				t.Errorf("Restore(%s) without LazyMemory: %v, want ErrNotSupported", m, err)
			}
		}
	}
}
