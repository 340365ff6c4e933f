package build

import (
	"archive/tar"
	"bytes"
	"context"
	"debug/elf"
	"errors"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
	"github.com/tetratelabs/wazero"
	"github.com/tetratelabs/wazero/api"
	"github.com/tetratelabs/wazero/imports/wasi_snapshot_preview1"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/testutil"
)

func buildHello(t *testing.T, out string) []Image {
	t.Helper()
	imgs, err := BuildFunction(context.Background(), Options{
		Function: "helloworld",
		Targets:  []Target{TargetLinux, TargetWasm},
		OutDir:   out,
	})
	if err != nil {
		t.Fatalf("BuildFunction: %v", err)
	}
	if len(imgs) != 2 {
		t.Fatalf("got %d images, want 2", len(imgs))
	}
	return imgs
}

// layoutImage reads the only image of an OCI layout and checks its ref name.
func layoutImage(t *testing.T, dir, wantRef string) v1.Image {
	t.Helper()
	idx, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		t.Fatalf("read layout %s: %v", dir, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	if len(im.Manifests) != 1 {
		t.Fatalf("layout %s has %d manifests, want 1", dir, len(im.Manifests))
	}
	desc := im.Manifests[0]
	if got := desc.Annotations[RefNameAnnotation]; got != wantRef {
		t.Errorf("%s = %q, want %q", RefNameAnnotation, got, wantRef)
	}
	if desc.MediaType != types.OCIManifestSchema1 {
		t.Errorf("manifest media type %q", desc.MediaType)
	}
	img, err := idx.Image(desc.Digest)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

func onlyLayer(t *testing.T, img v1.Image) v1.Layer {
	t.Helper()
	layers, err := img.Layers()
	if err != nil {
		t.Fatal(err)
	}
	if len(layers) != 1 {
		t.Fatalf("image has %d layers, want 1", len(layers))
	}
	return layers[0]
}

// extract returns the regular files and the modes of all entries of a layer.
func extract(t *testing.T, l v1.Layer) (map[string][]byte, map[string]int64) {
	t.Helper()
	rc, err := l.Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	defer rc.Close()
	files, modes := map[string][]byte{}, map[string]int64{}
	tr := tar.NewReader(rc)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatal(err)
		}
		modes[h.Name] = h.Mode
		if h.Typeflag == tar.TypeReg {
			b, err := io.ReadAll(tr)
			if err != nil {
				t.Fatal(err)
			}
			files[h.Name] = b
		}
	}
	return files, modes
}

func TestBuildFunctionHelloworld(t *testing.T) {
	out := t.TempDir()
	imgs := buildHello(t, out)
	lin, wasm := imgs[0], imgs[1]

	// Linux image, from the layout.
	if lin.Ref != "localhost/vhive/helloworld:latest" || lin.Layout != filepath.Join(out, "helloworld") ||
		lin.Tarball != filepath.Join(out, "helloworld.tar") {
		t.Errorf("linux image = %+v", lin)
	}
	img := layoutImage(t, lin.Layout, lin.Ref)
	if d, _ := img.Digest(); d.String() != lin.Digest {
		t.Errorf("layout digest %s, BuildFunction said %s", d, lin.Digest)
	}
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if cfg.OS != "linux" || cfg.Architecture != "amd64" ||
		strings.Join(cfg.Config.Entrypoint, " ") != "/usr/local/bin/helloworld" ||
		cfg.Config.WorkingDir != "/" || !cfg.Created.Time.Equal(epoch) {
		t.Errorf("config = %+v", cfg)
	}
	if _, ok := cfg.Config.ExposedPorts["50051/tcp"]; !ok {
		t.Errorf("ExposedPorts = %v, want 50051/tcp", cfg.Config.ExposedPorts)
	}
	if len(cfg.Config.Env) != 2 || cfg.Config.Env[0] != "GUEST_PORT=50051" || !strings.HasPrefix(cfg.Config.Env[1], "PATH=") {
		t.Errorf("Env = %v", cfg.Config.Env)
	}
	m, err := img.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	if m.Config.MediaType != types.OCIConfigJSON || m.Layers[0].MediaType != types.OCILayer {
		t.Errorf("media types: config %q, layer %q", m.Config.MediaType, m.Layers[0].MediaType)
	}
	files, modes := extract(t, onlyLayer(t, img))
	bin, ok := files["usr/local/bin/helloworld"]
	if !ok || modes["usr/local/bin/helloworld"] != 0o755 {
		t.Fatalf("layer lacks an executable usr/local/bin/helloworld: %v", modes)
	}
	if modes["tmp/"] != 0o1777 {
		t.Errorf("tmp/ mode %o", modes["tmp/"])
	}
	ef, err := elf.NewFile(bytes.NewReader(bin))
	if err != nil {
		t.Fatalf("binary is not ELF: %v", err)
	}
	for _, p := range ef.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("binary has an interpreter: not statically linked")
		}
	}

	// Linux image, from the tarball: same config and layer blobs.
	tag, err := name.NewTag(lin.Ref)
	if err != nil {
		t.Fatal(err)
	}
	timg, err := tarball.ImageFromPath(lin.Tarball, &tag)
	if err != nil {
		t.Fatalf("read tarball: %v", err)
	}
	tcfg, _ := timg.ConfigName()
	lcfg, _ := img.ConfigName()
	tl, _ := onlyLayer(t, timg).Digest()
	ll, _ := onlyLayer(t, img).Digest()
	if tcfg != lcfg || tl != ll {
		t.Errorf("tarball config/layer %s/%s differ from layout's %s/%s", tcfg, tl, lcfg, ll)
	}

	// The packaged binary serves.
	serveBinary(t, bin)

	// Wasm image.
	if wasm.Ref != "localhost/vhive/helloworld-wasm:latest" || wasm.Layout != filepath.Join(out, "helloworld-wasm") {
		t.Errorf("wasm image = %+v", wasm)
	}
	wimg := layoutImage(t, wasm.Layout, wasm.Ref)
	wcfg, err := wimg.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	if wcfg.OS != "wasip1" || wcfg.Architecture != "wasm" {
		t.Errorf("wasm config os/arch = %s/%s", wcfg.OS, wcfg.Architecture)
	}
	wm, err := wimg.Manifest()
	if err != nil {
		t.Fatal(err)
	}
	wl := onlyLayer(t, wimg)
	if wm.Layers[0].MediaType != WasmLayerMediaType {
		t.Errorf("wasm layer media type %q", wm.Layers[0].MediaType)
	}
	rc, err := wl.Compressed()
	if err != nil {
		t.Fatal(err)
	}
	module, err := io.ReadAll(rc)
	rc.Close()
	if err != nil || !bytes.HasPrefix(module, []byte("\x00asm")) {
		t.Fatalf("wasm layer is not a raw module (%v)", err)
	}
	if wl := wm.Layers[0].Annotations["org.opencontainers.image.title"]; wl != "helloworld.wasm" {
		t.Errorf("wasm layer title = %q", wl)
	}
	if wm.Annotations[WasmModuleAnnotation] != "/helloworld.wasm" || wcfg.Config.Labels[WasmModuleAnnotation] != "/helloworld.wasm" {
		t.Errorf("%s: annotation %q, label %q", WasmModuleAnnotation, wm.Annotations[WasmModuleAnnotation], wcfg.Config.Labels[WasmModuleAnnotation])
	}
	// The docker-archive holds the module as /helloworld.wasm in a tar layer.
	wtag, err := name.NewTag(wasm.Ref)
	if err != nil {
		t.Fatal(err)
	}
	wtimg, err := tarball.ImageFromPath(wasm.Tarball, &wtag)
	if err != nil {
		t.Fatalf("read wasm tarball: %v", err)
	}
	if c, _ := wtimg.ConfigFile(); c == nil || c.OS != "wasip1" || c.Config.Labels[WasmModuleAnnotation] != "/helloworld.wasm" {
		t.Errorf("wasm tarball config = %+v", c)
	}
	tfiles, _ := extract(t, onlyLayer(t, wtimg))
	if !bytes.Equal(tfiles["helloworld.wasm"], module) {
		t.Errorf("wasm tarball's helloworld.wasm (%d bytes) differs from the module (%d bytes)", len(tfiles["helloworld.wasm"]), len(module))
	}
	// One Linux image, one digest: its docker-archive imports under the
	// layout's digest (TestImageServiceImports imports both); the wasm
	// docker-archive is another image (a tar layer), with its own.
	if wasm.TarballDigest == "" || wasm.TarballDigest == wasm.Digest || lin.TarballDigest != lin.Digest {
		t.Errorf("tarball digests: wasm %s (layout %s), linux %s (layout %s)", wasm.TarballDigest, wasm.Digest, lin.TarballDigest, lin.Digest)
	}
	// The packaged module answers through the sdk ABI.
	if got := callWasm(t, module, "wasm"); got != "Hello, wasm!" {
		t.Errorf("wasm helloworld = %q", got)
	}

	// Reproducible: a second build gives the same digests and bytes.
	again := buildHello(t, t.TempDir())
	for i := range imgs {
		if again[i].Digest != imgs[i].Digest || again[i].TarballDigest != imgs[i].TarballDigest {
			t.Errorf("%s: digest %s then %s", imgs[i].Ref, imgs[i].Digest, again[i].Digest)
		}
		a, _ := os.ReadFile(imgs[i].Tarball)
		b, _ := os.ReadFile(again[i].Tarball)
		if !bytes.Equal(a, b) {
			t.Errorf("%s: tarballs differ", imgs[i].Ref)
		}
	}
	// Idempotent in place: rebuilding into the same dir keeps one manifest.
	buildHello(t, out)
	layoutImage(t, lin.Layout, lin.Ref)
}

// serveBinary runs a packaged Linux function and calls it once.
func serveBinary(t *testing.T, bin []byte) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "helloworld")
	if err := os.WriteFile(path, bin, 0o755); err != nil {
		t.Fatal(err)
	}
	_, port, err := net.SplitHostPort(testutil.Port(t))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(path)
	cmd.Env = []string{"GUEST_PORT=" + port}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	conn, err := grpc.NewClient("127.0.0.1:"+port, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	r, err := pb.NewGreeterClient(conn).SayHello(ctx, &pb.HelloRequest{Name: "oci"}, grpc.WaitForReady(true))
	if err != nil || r.GetMessage() != "Hello, oci!" {
		t.Errorf("packaged helloworld: %v, %v", r, err)
	}
}

// callWasm instantiates a reactor module with wazero and calls its handler
// once through the sdk ABI.
func callWasm(t *testing.T, module []byte, payload string) string {
	t.Helper()
	ctx := context.Background()
	rt := wazero.NewRuntime(ctx)
	defer rt.Close(ctx)
	wasi_snapshot_preview1.MustInstantiate(ctx, rt)
	mod, err := rt.InstantiateWithConfig(ctx, module, wazero.NewModuleConfig().WithStartFunctions().
		WithSysNanotime().WithSysWalltime())
	if err != nil {
		t.Fatalf("instantiate: %v", err)
	}
	call := func(fn string, args ...uint64) uint64 {
		res, err := mod.ExportedFunction(fn).Call(ctx, args...)
		if err != nil {
			t.Fatalf("%s: %v", fn, err)
		}
		if len(res) == 0 {
			return 0
		}
		return res[0]
	}
	call("_initialize")
	ptr := uint32(call("vhive_alloc", api.EncodeI32(int32(len(payload)))))
	mod.Memory().Write(ptr, []byte(payload))
	packed := call("vhive_handle", uint64(ptr), api.EncodeI32(int32(len(payload))))
	out, _ := mod.Memory().Read(uint32(packed>>32), uint32(packed))
	if st := call("vhive_status"); st != 0 {
		t.Errorf("vhive_status = %d: %s", st, out)
	}
	return string(out)
}

// TestBuildFunctionPackage packages a package other than functions/<name>
// under its own tag.
func TestBuildFunctionPackage(t *testing.T) {
	out := t.TempDir()
	imgs, err := BuildFunction(context.Background(), Options{
		Function: "echo", Package: "./functions/sdk/testdata/echo", Tag: "test",
		Formats: []Format{FormatLayout}, OutDir: out,
	})
	if err != nil {
		t.Fatal(err)
	}
	img := layoutImage(t, imgs[0].Layout, "localhost/vhive/echo:test")
	files, _ := extract(t, onlyLayer(t, img))
	if _, ok := files["usr/local/bin/echo"]; !ok || imgs[0].Layout != filepath.Join(out, "echo") {
		t.Errorf("image %+v lacks usr/local/bin/echo", imgs[0])
	}
}

func TestBuildFunctionBadOptions(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		o    Options
		want string
	}{
		{Options{Function: ""}, `function name ""`},
		{Options{Function: "../etc"}, `function name "../etc"`},
		{Options{Function: "nosuchfunction"}, `function "nosuchfunction": no Go files`},
		{Options{Function: "sdk", OutDir: t.TempDir()}, "./functions/sdk is not a main package"},
		{Options{Function: "helloworld", Tag: "a:b"}, `image tag "a:b"`},
		{Options{Function: "x", Package: "/etc"}, `package "/etc"`},
		{Options{Function: "x", Package: "./functions/../.."}, `package "./functions/../.."`},
		{Options{Function: "helloworld", Targets: []Target{"arm"}}, `target "arm"`},
		{Options{Function: "helloworld", Formats: []Format{"zip"}}, `format "zip"`},
		{Options{Function: "helloworld", ModuleDir: t.TempDir()}, "go.mod"},
	} {
		_, err := BuildFunction(ctx, tc.o)
		if err == nil || !strings.Contains(err.Error(), tc.want) {
			t.Errorf("BuildFunction(%+v) = %v, want an error containing %q", tc.o, err, tc.want)
		}
	}
}
