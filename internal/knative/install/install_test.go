package install

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"io"
	"strings"
	"testing"
	"time"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// toolsDir is the tools/knative module from this package's directory.
const toolsDir = "../../../tools/knative"

// sources resolves the pinned modules (from the module cache, or the module
// proxy on a fresh machine).
func sources(t *testing.T) Sources {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	s, mods, err := SourcesFor(ctx, toolsDir)
	if err != nil {
		t.Fatalf("resolve the tools/knative modules: %v", err)
	}
	for _, m := range mods {
		t.Logf("%s %s %s", m.Path, m.Version, m.Dir)
	}
	return s
}

const testRegistry = "127.0.0.1:5000"

// TestGenerateServing generates the install YAML from the pinned modules and
// reads it back as kubectl would: every document parses into an object with
// apiVersion, kind and name; every kind serving-core.yaml has is there (its
// CRDs, the four Deployments, the ConfigMaps, the webhooks), the Deployments,
// ConfigMaps and Services decode strictly into their Kubernetes types; no ko:// path is
// left; and the patches are in the ConfigMaps and images.
func TestGenerateServing(t *testing.T) {
	o := Options{Sources: sources(t), Registry: testRegistry, Tag: "v0.50.0", Domain: "vhive.test", Version: "1.23.0"}
	out, err := Generate(o)
	if err != nil {
		t.Fatal(err)
	}
	if bytes.Contains(out, []byte("ko://")) {
		t.Fatalf("ko:// left in the YAML")
	}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(out)))
	var objs []Object
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		var obj Object
		if err := yaml.UnmarshalStrict(doc, &obj); err != nil {
			t.Fatalf("document %d: %v\n%s", len(objs), err, doc)
		}
		if obj["apiVersion"] == nil || obj.Kind() == "" || obj.Name() == "" {
			t.Fatalf("document %d lacks apiVersion, kind or name:\n%s", len(objs), doc)
		}
		// Typed, strictly: a patch must not leave a field Kubernetes
		// would reject (a ConfigMap's data values are strings).
		var typed any
		switch obj.Kind() {
		case "Deployment":
			typed = &appsv1.Deployment{}
		case "ConfigMap":
			typed = &corev1.ConfigMap{}
		case "Service":
			typed = &corev1.Service{}
		}
		if typed != nil {
			if err := yaml.UnmarshalStrict(doc, typed); err != nil {
				t.Errorf("%s %s: %v", obj.Kind(), obj.Name(), err)
			}
		}
		objs = append(objs, obj)
	}
	find := func(kind, name string) Object {
		t.Helper()
		for _, obj := range objs {
			if obj.Kind() == kind && obj.Name() == name {
				return obj
			}
		}
		t.Fatalf("no %s %s among %d objects", kind, name, len(objs))
		return nil
	}
	find("Namespace", Namespace)
	// The CRDs: serving's own and the five from networking and caching
	// (symlinks in serving's repository).
	for _, crd := range []string{
		"services.serving.knative.dev", "configurations.serving.knative.dev", "revisions.serving.knative.dev",
		"routes.serving.knative.dev", "domainmappings.serving.knative.dev",
		"podautoscalers.autoscaling.internal.knative.dev", "metrics.autoscaling.internal.knative.dev",
		"ingresses.networking.internal.knative.dev", "serverlessservices.networking.internal.knative.dev",
		"certificates.networking.internal.knative.dev", "clusterdomainclaims.networking.internal.knative.dev",
		"images.caching.internal.knative.dev",
	} {
		find("CustomResourceDefinition", crd)
	}
	// CRDs come before any other object.
	for i := 1; i < len(objs); i++ {
		if objs[i].Kind() == "CustomResourceDefinition" && objs[i-1].Kind() != "CustomResourceDefinition" {
			t.Fatalf("CRD %s after %s %s", objs[i].Name(), objs[i-1].Kind(), objs[i-1].Name())
		}
	}
	for _, cm := range []string{"config-autoscaler", "config-defaults", "config-deployment", "config-domain",
		"config-features", "config-gc", "config-leader-election", "config-logging", "config-network",
		"config-observability", "config-tracing", "config-certmanager"} {
		find("ConfigMap", cm)
	}
	find("ValidatingWebhookConfiguration", "validation.webhook.serving.knative.dev")
	find("MutatingWebhookConfiguration", "webhook.serving.knative.dev")
	find("ServiceAccount", "controller")
	find("ClusterRole", "knative-serving-admin")
	for _, d := range []string{"controller", "activator", "autoscaler", "webhook"} {
		dep := find("Deployment", d)
		spec := dep["spec"].(map[string]any)["template"].(map[string]any)["spec"].(map[string]any)
		c := spec["containers"].([]any)[0].(map[string]any)
		if want := testRegistry + "/knative/" + d + ":v0.50.0"; c["image"] != want {
			t.Errorf("deployment %s image %v, want %s", d, c["image"], want)
		}
		labels := dep["metadata"].(map[string]any)["labels"].(map[string]any)
		if labels["app.kubernetes.io/version"] != "1.23.0" {
			t.Errorf("deployment %s version label %v", d, labels["app.kubernetes.io/version"])
		}
	}
	queue := testRegistry + "/knative/queue:v0.50.0"
	if img := find("Image", "queue-proxy")["spec"].(map[string]any)["image"]; img != queue {
		t.Errorf("caching Image queue-proxy: %v, want %s", img, queue)
	}
	data := func(cm string) map[string]any { return find("ConfigMap", cm).Data() }
	if got := data("config-network")["ingress-class"]; got != TraefikIngressClass {
		t.Errorf("ingress-class %v", got)
	}
	if got, ok := data("config-domain")["vhive.test"]; !ok || got != "" {
		t.Errorf("config-domain has no vhive.test: %v", data("config-domain"))
	}
	dep := data("config-deployment")
	if dep["queue-sidecar-image"] != queue {
		t.Errorf("queue-sidecar-image %v", dep["queue-sidecar-image"])
	}
	skip, _ := dep["registries-skipping-tag-resolving"].(string)
	if !strings.Contains(","+skip+",", ","+testRegistry+",") || !strings.Contains(skip, "ko.local") {
		t.Errorf("registries-skipping-tag-resolving %q", skip)
	}
	if got := data("config-features")["kubernetes.podspec-runtimeclassname"]; got != "enabled" {
		t.Errorf("kubernetes.podspec-runtimeclassname %v", got)
	}
	t.Logf("%d objects, %d bytes", len(objs), len(out))
}

// TestGenerateImageOverride: a ko:// path given its own reference (vhive's
// queue-proxy later) takes it everywhere, the sidecar setting included.
func TestGenerateImageOverride(t *testing.T) {
	const ours = "127.0.0.1:5000/vhive/queue-proxy:knative"
	o := Options{Sources: sources(t), Registry: testRegistry, Tag: "v0.50.0",
		Images: map[string]string{"knative.dev/serving/cmd/queue": ours}}
	objs, err := Objects(o)
	if err != nil {
		t.Fatal(err)
	}
	var n int
	for _, obj := range objs {
		switch {
		case obj.Kind() == "ConfigMap" && obj.Name() == "config-deployment":
			if obj.Data()["queue-sidecar-image"] != ours {
				t.Errorf("queue-sidecar-image %v", obj.Data()["queue-sidecar-image"])
			}
			n++
		case obj.Kind() == "Image" && obj.Name() == "queue-proxy":
			if obj["spec"].(map[string]any)["image"] != ours {
				t.Errorf("Image queue-proxy %v", obj["spec"])
			}
			n++
		}
	}
	if n != 2 {
		t.Fatalf("found %d of config-deployment and Image queue-proxy", n)
	}
}

// TestOptionsRequired: no registry, tag or sources is an error, not YAML
// with empty image references.
func TestOptionsRequired(t *testing.T) {
	s := Sources{Serving: "a", Networking: "b", Caching: "c"}
	for _, o := range []Options{{Sources: s, Tag: "v1"}, {Sources: s, Registry: "r"}, {Registry: "r", Tag: "v1"}} {
		if _, err := Generate(o); err == nil {
			t.Errorf("Generate(%+v) succeeded", o)
		}
	}
}
