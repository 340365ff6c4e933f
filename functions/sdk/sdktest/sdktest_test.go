package sdktest

import (
	"context"
	"fmt"
	"strings"
	"testing"

	"vhive.dev/vhive/functions/sdk"
)

// recorder is a testing.TB that keeps what InputSets reports.
type recorder struct {
	testing.TB
	errs []string
}

func (r *recorder) Helper()                      {}
func (r *recorder) Logf(string, ...any)          {}
func (r *recorder) Errorf(f string, args ...any) { r.errs = append(r.errs, fmt.Sprintf(f, args...)) }

func TestInputSets(t *testing.T) {
	instances := 0
	for name, c := range map[string]struct {
		newHandler func() sdk.Handler
		want       string // in the one report; "" for none
	}{
		"good": {func() sdk.Handler {
			return func(_ context.Context, p string) (string, error) { return "set " + p, nil }
		}, ""},
		"per instance": {func() sdk.Handler {
			instances++
			n := instances
			return func(_ context.Context, p string) (string, error) { return fmt.Sprintf("%s from %d", p, n), nil }
		}, "from another instance"},
		"ignores the payload": {func() sdk.Handler {
			return func(context.Context, string) (string, error) { return "same", nil }
		}, "do not differ"},
	} {
		r := &recorder{TB: t}
		out := InputSets(r, c.newHandler)
		switch {
		case c.want == "" && (len(r.errs) != 0 || out != [3]string{"set x", "set record", "set replay"}):
			t.Errorf("%s: reports %q, replies %q", name, r.errs, out)
		case c.want != "" && (len(r.errs) == 0 || !strings.Contains(strings.Join(r.errs, "\n"), c.want)):
			t.Errorf("%s: reports %q, want one saying %q", name, r.errs, c.want)
		}
	}
}
