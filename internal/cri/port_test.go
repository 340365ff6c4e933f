package cri

import (
	"strings"
	"testing"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// TestGuestPort: a Knative-shaped user-container that declares only its
// port (Knative's PORT, from a port named h2c or http1) is reached there;
// vHive's GUEST_PORT wins when both are set.
func TestGuestPort(t *testing.T) {
	kv := func(pairs ...string) []*runtimeapi.KeyValue {
		var out []*runtimeapi.KeyValue
		for i := 0; i < len(pairs); i += 2 {
			out = append(out, &runtimeapi.KeyValue{Key: pairs[i], Value: []byte(pairs[i+1])})
		}
		return out
	}
	for _, c := range []struct {
		envs []*runtimeapi.KeyValue
		want int
		err  string
	}{
		{nil, DefaultGuestPort, ""},
		{kv("PORT", "8080"), 8080, ""},
		{kv("PORT", "8080", "GUEST_PORT", "50051"), 50051, ""},
		{kv("PORT", "http"), 0, `PORT="http"`},
		{kv("GUEST_PORT", "70000"), 0, `GUEST_PORT="70000"`},
	} {
		got, err := guestPort(c.envs)
		if c.err != "" {
			if err == nil || !strings.Contains(err.Error(), c.err) {
				t.Errorf("guestPort(%v) = %d, %v; want an error naming %s", c.envs, got, err, c.err)
			}
			continue
		}
		if err != nil || got != c.want {
			t.Errorf("guestPort(%v) = %d, %v; want %d", c.envs, got, err, c.want)
		}
	}
}
