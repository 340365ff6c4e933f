package input

import (
	"context"
	"crypto/sha256"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/build"
)

// maxEnvString is Linux's MAX_ARG_STRLEN: the longest "KEY=VALUE" string,
// with its NUL, that execve accepts.
const maxEnvString = 128 << 10

// withImageEnv writes a copy of the OCI layout src whose image config adds
// env, named ref, and returns its path.
func withImageEnv(t *testing.T, src, ref string, env ...string) string {
	t.Helper()
	p, err := layout.FromPath(src)
	if err != nil {
		t.Fatal(err)
	}
	idx, err := p.ImageIndex()
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil || len(im.Manifests) != 1 {
		t.Fatalf("layout %s: %v, %v", src, im, err)
	}
	img, err := idx.Image(im.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cfg := *cf.Config.DeepCopy()
	cfg.Env = append(cfg.Env, env...)
	img, err = mutate.Config(img, cfg)
	if err != nil {
		t.Fatal(err)
	}
	dst := filepath.Join(t.TempDir(), "layout")
	out, err := layout.Write(dst, empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := out.AppendImage(img, layout.WithAnnotations(map[string]string{build.RefNameAnnotation: ref})); err != nil {
		t.Fatal(err)
	}
	return dst
}

// TestDeployEnvStringLimit: an environment string longer than an exec
// accepts (Linux's MAX_ARG_STRLEN, 128 KiB with "KEY=" and the NUL) is
// refused at deploy with InvalidArgument naming the variable and the limit —
// from the function's env or from the image's config — and nothing is
// stored; a value exactly at the limit deploys and the function runs with it.
func TestDeployEnvStringLimit(t *testing.T) {
	n, _ := daemonNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	c := n.Client
	probe := shared.GoImage(t, "./internal/reliability/input/testdata/envprobe")
	const ref, bigRef = "localhost/vhive/envprobe:test", "localhost/vhive/envprobe-bigenv:test"
	const key, imageKey = "BIG_VALUE", "IMAGE_BIG"
	imageBig := strings.Repeat("i", maxEnvString-len(imageKey)-1) // one byte over with its NUL
	for _, l := range []string{probe, withImageEnv(t, probe, bigRef, imageKey+"="+imageBig)} {
		if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: l}); err != nil {
			t.Fatalf("import %s: %v", l, err)
		}
	}
	atLimit := strings.Repeat("v", maxEnvString-len(key)-2)
	answer := func(v string) string { return fmt.Sprintf("%d sha256:%x", len(v), sha256.Sum256([]byte(v))) }

	refused := func(what string, spec *vhivepb.FunctionSpec, name string, words ...string) {
		t.Helper()
		_, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: spec})
		if err == nil {
			if _, err := c.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: spec.Name}); err != nil {
				t.Errorf("remove %s: %v", spec.Name, err)
			}
		}
		st := status.Convert(err)
		if st.Code() != codes.InvalidArgument || !strings.Contains(st.Message(), fmt.Sprintf("%q", name)) || !strings.Contains(st.Message(), fmt.Sprint(maxEnvString)) {
			t.Fatalf("%s: got %v %q, want InvalidArgument naming %s and the limit %d", what, st.Code(), st.Message(), name, maxEnvString)
		}
		for _, w := range words {
			if !strings.Contains(st.Message(), w) {
				t.Fatalf("%s: error %q does not name %q", what, st.Message(), w)
			}
		}
		ls, err := c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range ls.Functions {
			if f.Spec.GetName() == spec.Name {
				t.Fatalf("%s: the refused function is stored: %v", what, f)
			}
		}
	}
	refused("a value one byte over the limit",
		&vhivepb.FunctionSpec{Name: "env-over", Image: ref, Sandbox: "runc", Env: map[string]string{key: atLimit + "v"}}, key)
	refused("a 128 KiB value",
		&vhivepb.FunctionSpec{Name: "env-over", Image: ref, Sandbox: "runc", Env: map[string]string{key: strings.Repeat("v", maxEnvString)}}, key)
	refused("an image whose config sets a string over the limit",
		&vhivepb.FunctionSpec{Name: "env-image", Image: bigRef, Sandbox: "runc"}, imageKey, bigRef)

	run := func(what string, spec *vhivepb.FunctionSpec, payload, want string) {
		t.Helper()
		if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: spec}); err != nil {
			t.Fatalf("%s: deploy: %v", what, err)
		}
		defer func() {
			if _, err := c.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: spec.Name}); err != nil {
				t.Errorf("remove %s: %v", spec.Name, err)
			}
		}()
		r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: spec.Name, Payload: []byte(payload)})
		if err != nil || string(r.Payload) != want {
			t.Fatalf("%s: invoke = %v, %v; want %q", what, r, err, want)
		}
	}
	run("a value at the limit", &vhivepb.FunctionSpec{Name: "env-max", Image: ref, Sandbox: "runc", Env: map[string]string{key: atLimit}}, key, answer(atLimit))
	// The function's env overrides the image's oversize variable.
	run("the image's variable overridden", &vhivepb.FunctionSpec{Name: "env-image", Image: bigRef, Sandbox: "runc", Env: map[string]string{imageKey: "short"}}, imageKey, answer("short"))
}
