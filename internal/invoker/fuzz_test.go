package invoker

import (
	"strings"
	"testing"
)

// Whatever the bytes, the parsers return entries that satisfy their
// invariants or an error naming the file; they never panic.
func FuzzParseFunctions(f *testing.F) {
	f.Add([]byte(`{"functions":[{"name":"helloworld","file":"localhost/vhive/helloworld:latest","count":2}]}`))
	f.Add([]byte(`{"functions":[{"name":"a","file":"x","count":-1}]}`))
	f.Add([]byte(`{"functions":[]}`))
	f.Add([]byte(`[]`))
	f.Fuzz(func(t *testing.T, b []byte) {
		fns, err := ParseFunctions("functions.json", b)
		if err != nil {
			if !strings.Contains(err.Error(), "functions.json") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		seen := map[string]bool{}
		for _, fn := range fns {
			if fn.Name == "" || fn.File == "" || fn.Count < 0 || seen[fn.Name] || strings.ContainsAny(fn.Name, "./: ") {
				t.Fatalf("invalid entry accepted: %+v", fn)
			}
			seen[fn.Name] = true
		}
	})
}

func FuzzParseEndpoints(f *testing.F) {
	f.Add([]byte(`[{"hostname":"helloworld-0.default.127.0.0.1.nip.io","eventing":false,"matchers":null}]`))
	f.Add([]byte(`[{"hostname":"x","eventing":true}]`))
	f.Add([]byte(`{}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		eps, err := ParseEndpoints("endpoints.json", b)
		if err != nil {
			if !strings.Contains(err.Error(), "endpoints.json") {
				t.Fatalf("error does not name the file: %v", err)
			}
			return
		}
		if len(eps) == 0 {
			t.Fatal("no endpoints accepted")
		}
		for _, e := range eps {
			if strings.TrimSpace(e.Hostname) == "" || e.Eventing {
				t.Fatalf("invalid endpoint accepted: %+v", e)
			}
		}
	})
}
