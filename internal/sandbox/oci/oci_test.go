package oci

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

var runtimes = []string{RuntimeRunc, RuntimeGVisor}

func TestBootServeStop(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			ctx := context.Background()
			spec := e.spec("boot-" + rt)
			spec.Process.Env = []string{"FOO=bar", "GUEST_PORT=1"}
			spec.Process.Cwd = "/home/fn"
			spec.Process.User = "fn:fngroup"
			sb := e.start(t, spec)
			ep := sb.Endpoint()
			if got := get(t, ep, "/count"); got != "1" {
				t.Fatalf("first /count = %q", got)
			}
			if got := get(t, ep, "/count"); got != "2" {
				t.Fatalf("second /count = %q", got)
			}
			var info struct {
				Env      []string
				Cwd      string
				UID, GID int
			}
			if err := json.Unmarshal([]byte(get(t, ep, "/info")), &info); err != nil {
				t.Fatal(err)
			}
			if !slices.Contains(info.Env, "FOO=bar") || !slices.Contains(info.Env, "GUEST_PORT=8080") || slices.Contains(info.Env, "GUEST_PORT=1") {
				t.Errorf("env %v: want FOO=bar and GUEST_PORT=8080 only", info.Env)
			}
			if info.Cwd != "/home/fn" || info.UID != 1000 || info.GID != 2000 {
				t.Errorf("cwd %q uid %d gid %d, want /home/fn 1000 2000", info.Cwd, info.UID, info.GID)
			}
			st, err := sb.Stats(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if st.RSS < 1<<20 || st.PSS <= 0 || st.PSS > st.RSS {
				t.Errorf("stats %+v: want RSS >= 1 MiB and 0 < PSS <= RSS", st)
			}
			t.Logf("%s stats: RSS %d KiB, PSS %d KiB", rt, st.RSS>>10, st.PSS>>10)
			if extra := sb.(*Sandbox).extra; rt == RuntimeGVisor && len(extra) == 0 {
				t.Error("no gofer process found for the gVisor sandbox (Stats would miss it)")
			}
			if sb.Err() != nil {
				t.Fatalf("Err while running: %v", sb.Err())
			}
			if err := sb.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if err := sb.Stop(ctx); err != nil {
				t.Fatalf("second Stop: %v", err)
			}
			select {
			case <-sb.Done():
			default:
				t.Fatal("Done not closed after Stop")
			}
			if !errors.Is(sb.Err(), ErrStopped) {
				t.Errorf("Err after Stop = %v, want ErrStopped", sb.Err())
			}
			e.assertClean(t, spec.ID)
		})
	}
}

func TestExitAtOnce(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			ctx := context.Background()
			spec := e.spec("exit-" + rt)
			spec.Process.Env = []string{"TESTFN_EXIT=3", "TESTFN_STDERR=the-marker-" + rt}
			sb := e.start(t, spec)
			select {
			case <-sb.Done():
			case <-time.After(20 * time.Second):
				t.Fatal("Done not closed after the process exited")
			}
			msg := fmt.Sprint(sb.Err())
			if !strings.Contains(msg, "exited with status 3") || !strings.Contains(msg, "the-marker-"+rt) {
				t.Errorf("Err = %q: want the exit status 3 and the stderr marker", msg)
			}
			if err := sb.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			if errors.Is(sb.Err(), ErrStopped) {
				t.Errorf("Err after Stop of an exited sandbox became ErrStopped: %v", sb.Err())
			}
			e.assertClean(t, spec.ID)
		})
	}
}

func TestStopBeforeStart(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			ctx := context.Background()
			sb, err := e.b.Create(ctx, e.spec("created-"+rt))
			if err != nil {
				t.Fatal(err)
			}
			if err := sb.Stop(ctx); err != nil {
				t.Fatal(err)
			}
			<-sb.Done()
			e.assertClean(t, "created-"+rt)
		})
	}
}

func TestBadSpec(t *testing.T) {
	e := newEnv(t, RuntimeRunc)
	ctx := context.Background()
	good := e.spec("bad")
	for name, mut := range map[string]func(*sandbox.Spec){
		"ID":       func(s *sandbox.Spec) { s.ID = "../x" },
		"Rootfs":   func(s *sandbox.Spec) { s.Rootfs = "relative" },
		"NoRootfs": func(s *sandbox.Spec) { s.Rootfs = "/nonexistent/rootfs" },
		"Args":     func(s *sandbox.Spec) { s.Process.Args = nil },
		"Port":     func(s *sandbox.Spec) { s.Port = 0 },
		"Memory":   func(s *sandbox.Spec) { s.MemoryLimit = -1 },
		"User":     func(s *sandbox.Spec) { s.Process.User = "nobody-here" },
		"Cwd":      func(s *sandbox.Spec) { s.Process.Cwd = "relative" },
	} {
		s := good
		mut(&s)
		if _, err := e.b.Create(ctx, s); err == nil {
			t.Errorf("%s: Create succeeded", name)
		} else {
			t.Logf("%s: %v", name, err)
		}
	}
}

// TestRuntimeFailure: the runtime itself fails (an entrypoint missing from
// the image). Create or Start must fail or the sandbox must end with an
// error naming the binary, and nothing may be left behind.
func TestRuntimeFailure(t *testing.T) {
	for _, rt := range runtimes {
		t.Run(rt, func(t *testing.T) {
			e := newEnv(t, rt)
			ctx := context.Background()
			s := e.spec("noentry-" + rt)
			s.Process.Args = []string{"/bin/nonexistent"}
			sb, err := e.b.Create(ctx, s)
			if err == nil {
				err = sb.Start(ctx)
				if err == nil {
					select {
					case <-sb.Done():
						err = sb.Err()
					case <-time.After(20 * time.Second):
					}
				}
				if serr := sb.Stop(ctx); serr != nil {
					t.Errorf("Stop: %v", serr)
				}
			}
			if err == nil {
				t.Fatal("a missing entrypoint did not fail")
			}
			t.Logf("%s: %v", rt, err)
			if !strings.Contains(err.Error(), "nonexistent") {
				t.Errorf("error %q does not name the missing binary", err)
			}
			e.assertClean(t, s.ID)
		})
	}
}

func TestRuntimeVersion(t *testing.T) {
	for _, rt := range runtimes {
		e := newEnv(t, rt)
		v, err := e.b.RuntimeVersion(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		want := "runc version"
		if rt == RuntimeGVisor {
			want = "runsc version"
		}
		if !strings.HasPrefix(v, want) {
			t.Errorf("%s: RuntimeVersion = %q, want prefix %q", rt, v, want)
		}
		if v2, err := e.b.RuntimeVersion(context.Background()); err != nil || v2 != v {
			t.Errorf("%s: second RuntimeVersion = %q, %v", rt, v2, err)
		}
	}
}
