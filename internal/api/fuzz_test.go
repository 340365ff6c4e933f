package api

import (
	"strings"
	"testing"
)

// FuzzParseControlTarget: any --socket / VHIVE_SOCKET value parses or is
// refused without panicking, and what parses prints back to itself.
func FuzzParseControlTarget(f *testing.F) {
	for _, s := range []string{"/run/vhive/vhive.sock", "unix:///tmp/x.sock", "tcp://127.0.0.1:3335", "tcp://[::1]:1", "tcp://host", "tcp://:1", "http://x", "", "tcp://"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		ct, err := ParseControlTarget(s)
		if err != nil {
			return
		}
		if ct.Network != "unix" && ct.Network != "tcp" {
			t.Fatalf("%q: network %q", s, ct.Network)
		}
		again, err := ParseControlTarget(ct.String())
		if err != nil && ct.Address != "" {
			t.Fatalf("%q parsed to %+v, whose String %q does not parse: %v", s, ct, ct.String(), err)
		}
		if err == nil && again != ct && ct.Address != "" && !strings.Contains(ct.Address, "://") {
			t.Fatalf("%q: %+v reparses as %+v", s, ct, again)
		}
	})
}

// FuzzFunctionFromAuthority: the gateway maps any :authority to a function
// name without panicking; the name is one DNS label (no dot).
func FuzzFunctionFromAuthority(f *testing.F) {
	for _, s := range []string{"helloworld.default.example.com:80", "hello", "[::1]:80", "a.b", ":80", "", "..", "x:y:z"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if name := FunctionFromAuthority(s); strings.Contains(name, ".") || len(name) > len(s) {
			t.Fatalf("%q -> %q", s, name)
		}
	})
}

// FuzzTokenCheck: token validation never panics and accepts only what a
// token file may hold.
func FuzzTokenCheck(f *testing.F) {
	for _, s := range []string{"0123456789abcdef", "short", "with space 0123456789", "\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		if _, err := NewTokenAuth([]byte(s)); err == nil && (len(s) < MinTokenLen || strings.ContainsFunc(s, func(r rune) bool { return r <= ' ' || r > '~' })) {
			t.Fatalf("token %q accepted", s)
		}
	})
}
