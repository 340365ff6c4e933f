package cluster

import (
	"bytes"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// apiClient speaks to the apiserver as admin (client certificate, CA
// verified): just the few calls Up needs, so the main module does not carry
// client-go.
type apiClient struct {
	base string
	hc   *http.Client
}

func newAPIClient(c Config) (*apiClient, error) {
	pk := filepath.Join(c.Dir, "pki")
	cert, err := tls.LoadX509KeyPair(filepath.Join(pk, "admin.crt"), filepath.Join(pk, "admin.key"))
	if err != nil {
		return nil, fmt.Errorf("cluster: admin certificate: %w", err)
	}
	caPEM, err := os.ReadFile(filepath.Join(pk, "ca.crt"))
	if err != nil {
		return nil, fmt.Errorf("cluster: CA: %w", err)
	}
	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	tr := &http.Transport{TLSClientConfig: &tls.Config{Certificates: []tls.Certificate{cert}, RootCAs: pool, MinVersion: tls.VersionTLS12}}
	return &apiClient{base: c.APIServer(), hc: &http.Client{Transport: tr, Timeout: 10 * time.Second}}, nil
}

func (a *apiClient) do(ctx context.Context, method, path, ctype string, body []byte, out any) error {
	req, err := http.NewRequestWithContext(ctx, method, a.base+path, bytes.NewReader(body))
	if err != nil {
		return fmt.Errorf("cluster: %s %s: %w", method, path, err)
	}
	if ctype != "" {
		req.Header.Set("Content-Type", ctype)
	}
	resp, err := a.hc.Do(req)
	if err != nil {
		return fmt.Errorf("cluster: %s %s: %w", method, path, err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(io.LimitReader(resp.Body, 16<<20))
	if resp.StatusCode/100 != 2 {
		return fmt.Errorf("cluster: %s %s: %s: %s", method, path, resp.Status, strings.TrimSpace(string(b)))
	}
	if out != nil {
		if err := json.Unmarshal(b, out); err != nil {
			return fmt.Errorf("cluster: %s %s: decode: %w", method, path, err)
		}
	}
	return nil
}

// NodeStatus is what the apiserver reports about one node.
type NodeStatus struct {
	Name             string
	Ready            bool
	InternalIP       string
	PodCIDR          string
	ContainerRuntime string // e.g. vhive://containerd-1.6.20~ds1
	KubeletVersion   string
	AllocatableCPU   string // status.allocatable.cpu, e.g. "1" or "500m"
	AllocatableMem   string // status.allocatable.memory, e.g. "12052Mi"
}

type nodeList struct {
	Items []struct {
		Metadata struct {
			Name string `json:"name"`
		} `json:"metadata"`
		Spec struct {
			PodCIDR string `json:"podCIDR"`
		} `json:"spec"`
		Status struct {
			Conditions []struct {
				Type   string `json:"type"`
				Status string `json:"status"`
			} `json:"conditions"`
			Addresses []struct {
				Type    string `json:"type"`
				Address string `json:"address"`
			} `json:"addresses"`
			Allocatable map[string]string `json:"allocatable"`
			NodeInfo    struct {
				ContainerRuntimeVersion string `json:"containerRuntimeVersion"`
				KubeletVersion          string `json:"kubeletVersion"`
			} `json:"nodeInfo"`
		} `json:"status"`
	} `json:"items"`
}

func (a *apiClient) nodes(ctx context.Context) ([]NodeStatus, error) {
	var l nodeList
	if err := a.do(ctx, http.MethodGet, "/api/v1/nodes", "", nil, &l); err != nil {
		return nil, err
	}
	out := make([]NodeStatus, 0, len(l.Items))
	for _, it := range l.Items {
		s := NodeStatus{Name: it.Metadata.Name, PodCIDR: it.Spec.PodCIDR,
			ContainerRuntime: it.Status.NodeInfo.ContainerRuntimeVersion, KubeletVersion: it.Status.NodeInfo.KubeletVersion,
			AllocatableCPU: it.Status.Allocatable["cpu"], AllocatableMem: it.Status.Allocatable["memory"]}
		for _, c := range it.Status.Conditions {
			if c.Type == "Ready" {
				s.Ready = c.Status == "True"
			}
		}
		for _, ad := range it.Status.Addresses {
			if ad.Type == "InternalIP" {
				s.InternalIP = ad.Address
			}
		}
		out = append(out, s)
	}
	return out, nil
}

// setPodCIDR records the node's pod CIDR on its Node object (informative:
// the CNI config already uses it). Set once; the field is immutable.
func (a *apiClient) setPodCIDR(ctx context.Context, node, cidr string) error {
	patch := fmt.Sprintf(`{"spec":{"podCIDR":%q,"podCIDRs":[%q]}}`, cidr, cidr)
	return a.do(ctx, http.MethodPatch, "/api/v1/nodes/"+node, "application/strategic-merge-patch+json", []byte(patch), nil)
}

func (a *apiClient) readyz(ctx context.Context) error {
	return a.do(ctx, http.MethodGet, "/readyz", "", nil, nil)
}

// applyRuntimeClass creates the RuntimeClass "vhive" (deploy/runtimeclass.yaml).
func (a *apiClient) applyRuntimeClass(ctx context.Context) error {
	body := []byte(`{"apiVersion":"node.k8s.io/v1","kind":"RuntimeClass","metadata":{"name":"vhive"},"handler":"vhive"}`)
	err := a.do(ctx, http.MethodPost, "/apis/node.k8s.io/v1/runtimeclasses", "application/json", body, nil)
	if err != nil && strings.Contains(err.Error(), "409 Conflict") {
		return nil
	}
	return err
}
