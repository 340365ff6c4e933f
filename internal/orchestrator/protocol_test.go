package orchestrator

import (
	"encoding/json"
	"errors"
	"testing"

	"vhive.dev/vhive/internal/store"
)

// TestOldRecordIsGRPC: a function record written before protocols existed
// (no protocol field) reads back as a gRPC function, and a new record keeps
// its protocol and readiness path.
func TestOldRecordIsGRPC(t *testing.T) {
	old := []byte(`{"name":"aes","image":"localhost/vhive/aes:latest","image_digest":"sha256:ab","sandbox":"gvisor","port":50051,"keepalive":600000000000,"max_instances":16,"concurrency":1,"start_mode":"boot","created":"2026-01-02T03:04:05Z"}`)
	var rec store.FunctionRecord
	if err := json.Unmarshal(old, &rec); err != nil {
		t.Fatal(err)
	}
	if s := specFromRecord(rec); s.Protocol != ProtocolGRPC || s.ReadinessPath != "" || s.Port != 50051 {
		t.Fatalf("old record: protocol %q readiness %q port %d, want grpc, none, 50051", s.Protocol, s.ReadinessPath, s.Port)
	}
	spec := FunctionSpec{Name: "web", Image: "x", Protocol: ProtocolHTTP, Port: 8080, ReadinessPath: "/healthz"}
	b, err := json.Marshal(recordFromSpec(spec))
	if err != nil {
		t.Fatal(err)
	}
	var back store.FunctionRecord
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	if s := specFromRecord(back); s.Protocol != ProtocolHTTP || s.ReadinessPath != "/healthz" || s.Port != 8080 {
		t.Fatalf("http record round trip: %+v", s)
	}
}

func TestWithImageLabels(t *testing.T) {
	labels := map[string]string{LabelProtocol: "http", LabelPort: "8080", LabelReadinessPath: "/healthz"}
	s, used, err := withImageLabels(FunctionSpec{}, labels)
	if err != nil || !used || s.Protocol != "http" || s.Port != 8080 || s.ReadinessPath != "/healthz" {
		t.Fatalf("labels only: %+v, %v, %v", s, used, err)
	}
	// The deploy request wins over the labels.
	s, _, err = withImageLabels(FunctionSpec{Protocol: "grpc", Port: 9000}, labels)
	if err != nil || s.Protocol != "grpc" || s.Port != 9000 || s.ReadinessPath != "" {
		t.Fatalf("explicit settings: %+v, %v", s, err)
	}
	if _, _, err := withImageLabels(FunctionSpec{}, map[string]string{LabelPort: "http"}); !errors.Is(err, ErrInvalid) {
		t.Fatalf("bad port label: %v", err)
	}
}

func TestNormalizeMethod(t *testing.T) {
	for in, want := range map[string]string{
		"aes.Aes/ShowEncryption":        "/aes.Aes/ShowEncryption",
		"/fibonacci.Greeter/SayHello":   "/fibonacci.Greeter/SayHello",
		"/grpc.health.v1.Health/Check":  "/grpc.health.v1.Health/Check",
		"helloworld.Greeter/SayHello/x": "",
		"Greeter":                       "",
		"/":                             "",
		"a b/C":                         "",
	} {
		got, err := NormalizeMethod(in)
		if want == "" {
			if !errors.Is(err, ErrInvalid) {
				t.Errorf("NormalizeMethod(%q) = %q, %v; want ErrInvalid", in, got, err)
			}
			continue
		}
		if err != nil || got != want {
			t.Errorf("NormalizeMethod(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
}
