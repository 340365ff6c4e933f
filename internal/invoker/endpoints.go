// Package invoker is an open-loop load generator with vSwarm's invoker
// semantics: one request per tick at a fixed rate, round-robin over the
// endpoints, never waiting for replies before issuing the next request. It
// calls helloworld.Greeter/SayHello, the data plane of every vHive and
// vSwarm function, and records per-request latency, gRPC status and
// whether the request hit a cold start.
//
// It also holds the deployer side of vSwarm's tools: reading the
// functions.json the deployer takes and writing the endpoints.json the
// invoker reads.
package invoker

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"strings"
)

// Endpoint is one entry of vSwarm's endpoints.json.
type Endpoint struct {
	Hostname string `json:"hostname"`
	Eventing bool   `json:"eventing"`
	Matchers any    `json:"matchers"`
	// Address, a vhive extension (vSwarm's tools ignore it), is the
	// host:port to dial for this endpoint, e.g. its Kubernetes Service's
	// ClusterIP:80, with Hostname sent as the :authority.
	Address string `json:"address,omitempty"`
}

// ReadEndpoints parses an endpoints.json file. Every endpoint must have a
// hostname; eventing endpoints are refused (vhive has no eventing broker).
func ReadEndpoints(path string) ([]Endpoint, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read endpoints file: %w", err)
	}
	return ParseEndpoints(path, b)
}

// ParseEndpoints parses the contents b of the endpoints file named path
// (used in errors) and validates every endpoint.
func ParseEndpoints(path string, b []byte) ([]Endpoint, error) {
	var eps []Endpoint
	if err := json.Unmarshal(b, &eps); err != nil {
		return nil, fmt.Errorf("parse endpoints file %q: %w (want a JSON array of {\"hostname\": ..., \"eventing\": false, \"matchers\": null})", path, err)
	}
	if len(eps) == 0 {
		return nil, fmt.Errorf("endpoints file %q lists no endpoints", path)
	}
	for i, e := range eps {
		if strings.TrimSpace(e.Hostname) == "" {
			return nil, fmt.Errorf("endpoints file %q: endpoint %d has no hostname", path, i)
		}
		if e.Address != "" {
			if _, _, err := net.SplitHostPort(e.Address); err != nil {
				return nil, fmt.Errorf("endpoints file %q: endpoint %q: address %q: want host:port: %w", path, e.Hostname, e.Address, err)
			}
		}
		if e.Eventing {
			return nil, fmt.Errorf("endpoints file %q: endpoint %q is an eventing endpoint; vhive invokes serving endpoints only", path, e.Hostname)
		}
	}
	return eps, nil
}

// WriteEndpoints writes eps as vSwarm's endpoints.json.
func WriteEndpoints(path string, eps []Endpoint) error {
	b, err := json.MarshalIndent(eps, "", "  ")
	if err != nil {
		return fmt.Errorf("encode endpoints: %w", err)
	}
	if err := os.WriteFile(path, append(b, '\n'), 0o644); err != nil {
		return fmt.Errorf("write endpoints file: %w", err)
	}
	return nil
}
