package microvm

import (
	"encoding/json"
	"testing"
)

// TestBootAnswers boots testfn in a microVM and checks that it answers at
// the netpool's guest address with the spec's process settings applied.
func TestBootAnswers(t *testing.T) {
	e := newEnv(t)
	spec := e.spec("boot")
	spec.Process.Env = []string{"FOO=bar"}
	spec.Process.User = "fn"
	spec.Process.Cwd = "/home/fn"
	sb := e.start(t, spec)
	if got := get(t, sb.Endpoint(), "/count"); got != "1" {
		t.Fatalf("/count = %q", got)
	}
	var info struct {
		Env []string
		Cwd string
		UID int
		GID int
	}
	if err := json.Unmarshal([]byte(get(t, sb.Endpoint(), "/info")), &info); err != nil {
		t.Fatal(err)
	}
	if info.UID != 1000 || info.GID != 1000 || info.Cwd != "/home/fn" {
		t.Errorf("info = %+v, want uid 1000, gid 1000, cwd /home/fn", info)
	}
	env := map[string]bool{}
	for _, kv := range info.Env {
		env[kv] = true
	}
	if !env["FOO=bar"] || !env["GUEST_PORT=8080"] {
		t.Errorf("env = %v, want FOO=bar and GUEST_PORT=8080", info.Env)
	}
}
