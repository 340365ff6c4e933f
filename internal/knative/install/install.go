// Package install generates Knative Serving's install YAML (what upstream
// releases as serving-core.yaml) from the serving module's own config/core,
// patched in Go for vhive's cluster: no hand-copied YAML.
//
// The serving module zip lacks six files that are symlinks in its repository
// (Go module zips drop symlinks); they are read from the knative.dev/networking
// and knative.dev/caching modules at the versions serving's go.mod requires,
// as tools/knative/go.mod pins them (see Sources). The patches:
//
//   - every ko:// import path (the Deployments' images, the queue sidecar in
//     config-deployment and the caching Image) becomes an image reference in
//     the given registry, <registry>/knative/<command>:<tag>;
//   - config-network: the ingress class, Traefik's by default;
//   - config-domain: the cluster's domain;
//   - config-deployment: the queue-proxy sidecar image and the registry
//     added to registries-skipping-tag-resolving (tags of a loopback
//     registry cannot be resolved to digests by the controller);
//   - config-features: kubernetes.podspec-runtimeclassname enabled, so a
//     Service can name a RuntimeClass (vhive's sandbox kinds);
//   - app.kubernetes.io/version labels set to the release instead of devel.
//
// The CustomResourceDefinitions come first in the output (config/core has a
// Certificate ahead of its CRD); GenerateParts splits them out, as upstream
// releases serving-crds.yaml beside serving-core.yaml, since kubectl cannot
// create a CRD and objects of its kind in one apply.
package install

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"slices"
	"strings"

	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"

	"vhive.dev/vhive/internal/knative/build"
)

// TraefikIngressClass is the Knative ingress class Traefik's knative
// provider implements.
const TraefikIngressClass = "traefik.ingress.networking.knative.dev"

// Release is the Knative release of the pinned serving module (v0.50.0).
const Release = "1.23.0"

// Namespace is where Knative Serving runs.
const Namespace = "knative-serving"

// Sources are the module directories the YAML is read from.
type Sources struct {
	// Serving is knative.dev/serving's module directory (config/core).
	Serving string
	// Networking and Caching are knative.dev/networking's and
	// knative.dev/caching's (config/).
	Networking string
	Caching    string
}

// SourcesFor resolves the module directories the tools/knative module in
// toolsDir pins, downloading them into the module cache if needed.
func SourcesFor(ctx context.Context, toolsDir string) (Sources, []build.Module, error) {
	mods, err := build.ConfigModules(ctx, toolsDir, "go")
	if err != nil {
		return Sources{}, nil, err
	}
	var s Sources
	for _, m := range mods {
		switch m.Path {
		case build.ServingModule:
			s.Serving = m.Dir
		case build.NetworkingModule:
			s.Networking = m.Dir
		case build.CachingModule:
			s.Caching = m.Dir
		}
	}
	return s, mods, nil
}

// linked is a file of config/core that is a symlink in serving's
// repository: where it belongs and where it is read from.
type linked struct {
	core   string // path under config/core
	module string // "networking" or "caching"
	file   string // path under that module's config/
}

func linkedFiles() []linked {
	return []linked{
		{"300-imagecache.yaml", "caching", "image.yaml"},
		{"300-resources/certificate.yaml", "networking", "certificate.yaml"},
		{"300-resources/domain-claim.yaml", "networking", "domain-claim.yaml"},
		{"300-resources/ingress.yaml", "networking", "ingress.yaml"},
		{"300-resources/serverlessservice.yaml", "networking", "serverlessservice.yaml"},
		{"configmaps/network.yaml", "networking", "config-network.yaml"},
	}
}

// Options configures Generate.
type Options struct {
	Sources Sources
	// Registry is the host:port images are pulled from (required).
	Registry string
	// Tag is the images' tag (required), e.g. the serving module version.
	Tag string
	// Images overrides the reference of a command by its ko:// import
	// path (e.g. knative.dev/serving/cmd/queue for vhive's own
	// queue-proxy); the others are Registry/knative/<command>:<Tag>.
	Images map[string]string
	// Domain is the cluster's domain in config-domain (default
	// example.com).
	Domain string
	// IngressClass is config-network's ingress-class (default
	// TraefikIngressClass).
	IngressClass string
	// Version is the Knative release put in app.kubernetes.io/version
	// labels (e.g. 1.23.0); empty keeps the module's "devel".
	Version string
}

// Object is one Kubernetes object of the install YAML.
type Object map[string]any

// Kind is o's kind.
func (o Object) Kind() string { s, _ := o["kind"].(string); return s }

// Name is o's metadata.name.
func (o Object) Name() string {
	md, _ := o["metadata"].(map[string]any)
	s, _ := md["name"].(string)
	return s
}

// Data is a ConfigMap's data (created if absent).
func (o Object) Data() map[string]any {
	d, ok := o["data"].(map[string]any)
	if !ok {
		d = map[string]any{}
		o["data"] = d
	}
	return d
}

// ImageFor is the reference of the command at a ko:// import path.
func (o Options) ImageFor(importPath string) string {
	if ref, ok := o.Images[importPath]; ok {
		return ref
	}
	return o.Registry + "/knative/" + path.Base(importPath) + ":" + o.Tag
}

// Objects reads, patches and orders the install objects.
func Objects(o Options) ([]Object, error) {
	if o.Registry == "" || o.Tag == "" {
		return nil, errors.New("knative install: registry and tag are required")
	}
	if o.Sources.Serving == "" || o.Sources.Networking == "" || o.Sources.Caching == "" {
		return nil, errors.New("knative install: serving, networking and caching module directories are required")
	}
	if o.Domain == "" {
		o.Domain = "example.com"
	}
	if o.IngressClass == "" {
		o.IngressClass = TraefikIngressClass
	}
	files, err := coreFiles(o.Sources)
	if err != nil {
		return nil, err
	}
	var objs []Object
	for _, f := range files {
		data, err := os.ReadFile(f)
		if err != nil {
			return nil, fmt.Errorf("knative install: %w", err)
		}
		docs, err := decode(data)
		if err != nil {
			return nil, fmt.Errorf("knative install: %s: %w", f, err)
		}
		objs = append(objs, docs...)
	}
	for _, obj := range objs {
		if err := replaceKo(obj, o); err != nil {
			return nil, fmt.Errorf("knative install: %s %s: %w", obj.Kind(), obj.Name(), err)
		}
		if o.Version != "" {
			setVersionLabels(obj, o.Version)
		}
	}
	if err := patchConfigMaps(objs, o); err != nil {
		return nil, err
	}
	// CRDs first, the rest in config/core's order.
	slices.SortStableFunc(objs, func(a, b Object) int {
		ac, bc := a.Kind() == "CustomResourceDefinition", b.Kind() == "CustomResourceDefinition"
		switch {
		case ac && !bc:
			return -1
		case bc && !ac:
			return 1
		}
		return 0
	})
	return objs, nil
}

// Generate is Objects as one multi-document YAML stream, the CRDs first.
// kubectl cannot apply it in one go (it maps every kind before creating the
// CRDs): apply GenerateParts' two streams in turn.
func Generate(o Options) ([]byte, error) {
	crds, core, err := GenerateParts(o)
	if err != nil {
		return nil, err
	}
	return append(crds, core...), nil
}

// GenerateParts is the install YAML as upstream releases it: the
// CustomResourceDefinitions (serving-crds.yaml) and everything else
// (serving-core.yaml). Apply the second once the CRDs are Established.
func GenerateParts(o Options) (crds, core []byte, err error) {
	objs, err := Objects(o)
	if err != nil {
		return nil, nil, err
	}
	var c, r []Object
	for _, obj := range objs {
		if obj.Kind() == "CustomResourceDefinition" {
			c = append(c, obj)
		} else {
			r = append(r, obj)
		}
	}
	if crds, err = marshal(c); err != nil {
		return nil, nil, err
	}
	if core, err = marshal(r); err != nil {
		return nil, nil, err
	}
	return crds, core, nil
}

func marshal(objs []Object) ([]byte, error) {
	var buf bytes.Buffer
	for _, obj := range objs {
		y, err := yaml.Marshal(obj)
		if err != nil {
			return nil, fmt.Errorf("knative install: %s %s: %w", obj.Kind(), obj.Name(), err)
		}
		buf.WriteString("---\n")
		buf.Write(y)
	}
	return buf.Bytes(), nil
}

// coreFiles lists config/core's YAML files, the linked ones included, in
// the order ko resolve -R reads them (a walk in lexical order).
func coreFiles(s Sources) ([]string, error) {
	core := filepath.Join(s.Serving, "config", "core")
	byRel := map[string]string{}
	err := filepath.WalkDir(core, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() || !strings.HasSuffix(p, ".yaml") {
			return nil
		}
		rel, err := filepath.Rel(core, p)
		if err != nil {
			return err
		}
		byRel[filepath.ToSlash(rel)] = p
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("knative install: serving config: %w", err)
	}
	for _, l := range linkedFiles() {
		if _, ok := byRel[l.core]; ok {
			continue // a module that keeps it
		}
		dir := s.Networking
		if l.module == "caching" {
			dir = s.Caching
		}
		p := filepath.Join(dir, "config", l.file)
		if _, err := os.Stat(p); err != nil {
			return nil, fmt.Errorf("knative install: %s (for config/core/%s): %w", l.file, l.core, err)
		}
		byRel[l.core] = p
	}
	rels := make([]string, 0, len(byRel))
	for r := range byRel {
		rels = append(rels, r)
	}
	// Lexical walk order: a directory's entries sort by name with the
	// directory itself, so compare path elements one by one.
	slices.SortFunc(rels, func(a, b string) int {
		return slices.Compare(strings.Split(a, "/"), strings.Split(b, "/"))
	})
	files := make([]string, len(rels))
	for i, r := range rels {
		files[i] = byRel[r]
	}
	return files, nil
}

// decode splits a YAML stream into objects, skipping empty documents.
func decode(data []byte) ([]Object, error) {
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(data)))
	var objs []Object
	for {
		doc, err := r.Read()
		if errors.Is(err, io.EOF) {
			return objs, nil
		}
		if err != nil {
			return nil, err
		}
		var obj Object
		if err := yaml.Unmarshal(doc, &obj); err != nil {
			return nil, err
		}
		if len(obj) == 0 {
			continue
		}
		if obj.Kind() == "" {
			return nil, fmt.Errorf("a document without a kind: %.80q", doc)
		}
		objs = append(objs, obj)
	}
}

// replaceKo replaces every string value that is a ko:// import path.
func replaceKo(obj Object, o Options) error {
	var walk func(v any) (any, error)
	walk = func(v any) (any, error) {
		switch t := v.(type) {
		case map[string]any:
			for k, e := range t {
				n, err := walk(e)
				if err != nil {
					return nil, err
				}
				t[k] = n
			}
		case []any:
			for i, e := range t {
				n, err := walk(e)
				if err != nil {
					return nil, err
				}
				t[i] = n
			}
		case string:
			if p, ok := strings.CutPrefix(t, "ko://"); ok {
				if p == "" {
					return nil, errors.New("an empty ko:// path")
				}
				return o.ImageFor(p), nil
			}
		}
		return v, nil
	}
	_, err := walk(map[string]any(obj))
	return err
}

// setVersionLabels sets every app.kubernetes.io/version label that says
// devel (the object's and its pod template's) to version.
func setVersionLabels(obj Object, version string) {
	var walk func(v any)
	walk = func(v any) {
		switch t := v.(type) {
		case map[string]any:
			for k, e := range t {
				if k == "labels" {
					if l, ok := e.(map[string]any); ok && l["app.kubernetes.io/version"] == "devel" {
						l["app.kubernetes.io/version"] = version
					}
				}
				walk(e)
			}
		case []any:
			for _, e := range t {
				walk(e)
			}
		}
	}
	walk(map[string]any(obj))
}

// patchConfigMaps applies the ConfigMap patches; each ConfigMap must be
// there.
func patchConfigMaps(objs []Object, o Options) error {
	cm := func(name string) (Object, error) {
		for _, obj := range objs {
			md, _ := obj["metadata"].(map[string]any)
			if obj.Kind() == "ConfigMap" && obj.Name() == name && md["namespace"] == Namespace {
				return obj, nil
			}
		}
		return nil, fmt.Errorf("knative install: no ConfigMap %s/%s in serving's config", Namespace, name)
	}
	network, err := cm("config-network")
	if err != nil {
		return err
	}
	network.Data()["ingress-class"] = o.IngressClass

	domain, err := cm("config-domain")
	if err != nil {
		return err
	}
	domain.Data()[o.Domain] = ""

	deployment, err := cm("config-deployment")
	if err != nil {
		return err
	}
	d := deployment.Data()
	d["queue-sidecar-image"] = o.ImageFor(build.ServingModule + "/cmd/queue")
	skip := []string{"kind.local", "ko.local", "dev.local"}
	if s, ok := d["registries-skipping-tag-resolving"].(string); ok && s != "" {
		skip = strings.Split(s, ",")
	}
	if !slices.Contains(skip, o.Registry) {
		skip = append(skip, o.Registry)
	}
	d["registries-skipping-tag-resolving"] = strings.Join(skip, ",")

	features, err := cm("config-features")
	if err != nil {
		return err
	}
	features.Data()["kubernetes.podspec-runtimeclassname"] = "enabled"
	return nil
}
