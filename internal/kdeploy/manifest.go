package kdeploy

import (
	"bytes"
	"fmt"
	"os"
	"strconv"

	corev1 "k8s.io/api/core/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"sigs.k8s.io/yaml"
)

// Knative's names, kept on the objects so that tools written for Knative
// (kubectl selectors, dashboards) find them.
const (
	LabelService  = "serving.knative.dev/service"
	LabelRevision = "serving.knative.dev/revision"
	LabelConfig   = "serving.knative.dev/configuration"
	LabelManaged  = "app.kubernetes.io/managed-by"
	ManagedBy     = "vhive"
	// Autoscaling annotations Knative reads; here min-scale (or the older
	// minScale) sets the Deployment's replicas, as there is no autoscaler.
	AnnotationMinScale    = "autoscaling.knative.dev/min-scale"
	AnnotationMinScaleOld = "autoscaling.knative.dev/minScale"
)

// Service is the part of a Knative Service (serving.knative.dev/v1) that
// vhive turns into Kubernetes objects: the revision template.
type Service struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       ServiceSpec       `json:"spec"`
}

// ServiceSpec is a Knative ServiceSpec without traffic splitting.
type ServiceSpec struct {
	Template RevisionTemplate `json:"template"`
	// Traffic is accepted and must route everything to the latest revision
	// (there is only one).
	Traffic []TrafficTarget `json:"traffic,omitempty"`
}

// TrafficTarget is one Knative traffic target.
type TrafficTarget struct {
	LatestRevision *bool  `json:"latestRevision,omitempty"`
	Percent        *int64 `json:"percent,omitempty"`
	RevisionName   string `json:"revisionName,omitempty"`
	Tag            string `json:"tag,omitempty"`
}

// RevisionTemplate is a Knative RevisionTemplateSpec.
type RevisionTemplate struct {
	Metadata metav1.ObjectMeta `json:"metadata"`
	Spec     RevisionSpec      `json:"spec"`
}

// RevisionSpec is a pod spec plus Knative's revision fields.
type RevisionSpec struct {
	corev1.PodSpec              `json:",inline"`
	ContainerConcurrency        *int64 `json:"containerConcurrency,omitempty"`
	TimeoutSeconds              *int64 `json:"timeoutSeconds,omitempty"`
	ResponseStartTimeoutSeconds *int64 `json:"responseStartTimeoutSeconds,omitempty"`
	IdleTimeoutSeconds          *int64 `json:"idleTimeoutSeconds,omitempty"`
}

// ReadService reads and validates a Knative Service manifest.
func ReadService(path string) (*Service, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read Knative Service manifest: %w", err)
	}
	return ParseService(path, b)
}

// ParseService parses the manifest b (named path in errors): one Knative
// Service, strictly (an unknown field is an error naming it), whose
// template has one container carrying GUEST_IMAGE, as vHive's services do.
func ParseService(path string, b []byte) (*Service, error) {
	if n := yamlDocs(b); n != 1 {
		return nil, fmt.Errorf("manifest %q: holds %d YAML documents; want one Knative Service", path, n)
	}
	var s Service
	if err := yaml.UnmarshalStrict(b, &s); err != nil {
		return nil, fmt.Errorf("manifest %q: %w", path, err)
	}
	if s.APIVersion != "serving.knative.dev/v1" || s.Kind != "Service" {
		return nil, fmt.Errorf("manifest %q: apiVersion %q kind %q; want a Knative Service (serving.knative.dev/v1, kind Service)", path, s.APIVersion, s.Kind)
	}
	for _, t := range s.Spec.Traffic {
		if t.RevisionName != "" || (t.Percent != nil && *t.Percent != 100) || t.Tag != "" {
			return nil, fmt.Errorf("manifest %q: traffic splitting and tags are not supported (one revision gets all traffic)", path)
		}
	}
	cs := s.Spec.Template.Spec.Containers
	if len(cs) != 1 {
		return nil, fmt.Errorf("manifest %q: the template has %d containers; want one (the user-container)", path, len(cs))
	}
	c := cs[0]
	if c.Image == "" {
		return nil, fmt.Errorf("manifest %q: the container has no image (vHive's shape: a stub image plus env GUEST_IMAGE)", path)
	}
	if guestImage(c) == "" {
		return nil, fmt.Errorf("manifest %q: the container has no env GUEST_IMAGE (the function's image, which vhive's CRI runs in a sandbox)", path)
	}
	if p := envOf(c, EnvGuestPort); p != "" {
		if n, err := strconv.Atoi(p); err != nil || n < 1 || n > 65535 {
			return nil, fmt.Errorf("manifest %q: GUEST_PORT %q is not a port number", path, p)
		}
	}
	if _, err := s.minScale(); err != nil {
		return nil, fmt.Errorf("manifest %q: %w", path, err)
	}
	return &s, nil
}

// Env names of vHive's function pods (as internal/cri reads them).
const (
	EnvGuestImage = "GUEST_IMAGE"
	EnvGuestPort  = "GUEST_PORT"
	EnvRevision   = "K_REVISION"
)

func envOf(c corev1.Container, name string) string {
	for _, e := range c.Env {
		if e.Name == name {
			return e.Value
		}
	}
	return ""
}

func guestImage(c corev1.Container) string { return envOf(c, EnvGuestImage) }

// minScale is the template's min-scale annotation (-1 when unset).
func (s *Service) minScale() (int32, error) {
	a := s.Spec.Template.Metadata.Annotations
	v, ok := a[AnnotationMinScale]
	if !ok {
		v, ok = a[AnnotationMinScaleOld]
	}
	if !ok {
		return -1, nil
	}
	n, err := strconv.ParseInt(v, 10, 32)
	if err != nil || n < 0 {
		return 0, fmt.Errorf("annotation %s=%q is not a replica count", AnnotationMinScale, v)
	}
	return int32(n), nil
}

// yamlDocs counts the non-empty documents of a YAML stream.
func yamlDocs(b []byte) int {
	n := 0
	for _, d := range bytes.Split(append([]byte("\n"), b...), []byte("\n---")) {
		body := d
		if i := bytes.IndexByte(d, '\n'); i >= 0 {
			body = d[i:] // drop what follows "---" on its line
		} else {
			body = nil
		}
		for _, line := range bytes.Split(body, []byte("\n")) {
			if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
				n++
				break
			}
		}
	}
	return n
}
