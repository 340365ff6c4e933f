package image

import "testing"

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
