package cri

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/image"
)

// FuzzContainerConfig decodes fuzzed bytes as the ContainerConfig of a CRI
// CreateContainer request and turns it into an OCI spec, as CreateContainer
// does for a container of a vhive pod: it must never panic, and a spec it
// returns must run something, in an absolute working directory, with a
// well-formed environment.
func FuzzContainerConfig(f *testing.F) {
	seeds := []*runtimeapi.ContainerConfig{
		{Metadata: &runtimeapi.ContainerMetadata{Name: "c"}, Command: []string{"/bin/sh"}, Args: []string{"-c", "true"}},
		{Metadata: &runtimeapi.ContainerMetadata{Name: "c"}, WorkingDir: "rel/dir", Envs: []*runtimeapi.KeyValue{{Key: "A", Value: []byte("b")}, {Key: "", Value: []byte("x")}, {Key: "B=C", Value: []byte("d")}}},
		{Linux: &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{
			RunAsUser: &runtimeapi.Int64Value{Value: -1}, RunAsGroup: &runtimeapi.Int64Value{Value: 1 << 40},
			Capabilities: &runtimeapi.Capability{AddCapabilities: []string{"ALL", "CAP_NOPE", ""}, DropCapabilities: []string{"all"}},
			Seccomp:      &runtimeapi.SecurityProfile{ProfileType: runtimeapi.SecurityProfile_Localhost, LocalhostRef: "/nonexistent"},
		}}},
		{Mounts: []*runtimeapi.Mount{{ContainerPath: "../../etc", HostPath: "/"}, {ContainerPath: "/x", HostPath: ""}, {ContainerPath: "", HostPath: "/tmp"}}},
		{Linux: &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{RunAsUsername: "nobody:x"}}},
	}
	for _, s := range seeds {
		b, err := proto.Marshal(s)
		if err != nil {
			f.Fatal(err)
		}
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		var cfg runtimeapi.ContainerConfig
		if err := proto.Unmarshal(data, &cfg); err != nil {
			t.Skip("not a ContainerConfig: gRPC refuses it before the server sees it")
		}
		root := t.TempDir()
		rootfs := filepath.Join(root, "rootfs")
		if err := os.MkdirAll(filepath.Join(rootfs, "etc"), 0o755); err != nil {
			t.Fatal(err)
		}
		os.WriteFile(filepath.Join(rootfs, "etc", "passwd"), []byte("root:x:0:0::/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n"), 0o644)
		os.WriteFile(filepath.Join(rootfs, "etc", "group"), []byte("root:x:0:\nnogroup:x:65534:\n"), 0o644)
		p := &pod{ID: strings.Repeat("a", 64), Name: "p", Namespace: "ns", Dir: filepath.Join(root, "pod"), NetNS: "/var/run/netns/none", PausePID: 1,
			Config: &runtimeapi.PodSandboxConfig{Hostname: "h"}}
		img := image.Image{Ref: "localhost/fuzz:1", Rootfs: rootfs, Config: image.Config{Entrypoint: []string{"/bin/true"}}}
		spec, err := buildSpec(p, strings.Repeat("c", 64), &cfg, img, 1, true)
		if err != nil {
			return
		}
		if len(spec.Process.Args) == 0 {
			t.Fatalf("spec without a command from %v", &cfg)
		}
		if !strings.HasPrefix(spec.Process.Cwd, "/") {
			t.Fatalf("working directory %q is not absolute (runtimes refuse it) from %v", spec.Process.Cwd, &cfg)
		}
		for _, e := range spec.Process.Env {
			if k, _, ok := strings.Cut(e, "="); !ok || k == "" {
				t.Fatalf("environment entry %q has no name from %v", e, &cfg)
			}
		}
	})
}
