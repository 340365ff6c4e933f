// Package build compiles the example functions and packages them as OCI
// images without Docker, using go-containerregistry.
//
// A Linux image has one gzip layer holding the static binary at
// /usr/local/bin/<name> (plus empty /dev, /etc, /proc, /sys, /tmp mount
// points) and a config with Entrypoint [/usr/local/bin/<name>],
// Env [GUEST_PORT=50051 PATH=...], ExposedPorts 50051/tcp, WorkingDir /,
// OS linux. Its reference is localhost/vhive/<name>:latest.
//
// A wasm image (a wasip1 reactor built with -buildmode=c-shared) has a config
// with OS wasip1 and architecture wasm, and the config label and manifest
// annotation dev.vhive.wasm.module = /<name>.wasm. Its reference is
// localhost/vhive/<name>-wasm:latest. In the OCI layout its only layer has
// media type application/vnd.wasm.content.layer.v1+wasm and the raw module as
// its blob (as containerd's runwasi expects; the layer descriptor's
// org.opencontainers.image.title is <name>.wasm). A docker-archive keeps no
// layer media types, so the image written there instead has one ordinary tar
// layer holding the module at /<name>.wasm, which the label names.
//
// Outputs, under Options.OutDir:
//
//	<name>[-wasm]/      OCI image layout; index.json's descriptor is annotated
//	                    org.opencontainers.image.ref.name=<full reference>
//	                    (and io.containerd.image.name, the same)
//	<name>[-wasm].tar   docker-archive tarball (go-containerregistry's
//	                    tarball.WriteToFile), RepoTags [<full reference>]
//
// A docker-archive holds no manifest; vhive's image service builds the same
// one for it every time (image.FromDockerArchive), which for a Linux image is
// byte for byte the layout's, so both forms import under one digest
// (Image.Digest == Image.TarballDigest).
//
// Every timestamp is fixed (the Unix epoch) and binaries are built with
// -trimpath, so building the same source twice gives the same digests.
package build

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
)

// Target is what a function is compiled for.
type Target string

const (
	// TargetLinux is a static Linux executable serving gRPC (sdk.Run).
	TargetLinux Target = "linux"
	// TargetWasm is a wasip1 reactor module exporting the sdk's wasm ABI.
	TargetWasm Target = "wasm"
)

// Format is an output format for an image.
type Format string

const (
	// FormatLayout is an OCI image layout directory.
	FormatLayout Format = "layout"
	// FormatTar is a docker-archive tarball.
	FormatTar Format = "tar"
)

// WasmLayerMediaType is the media type of the layer holding a raw wasm module.
const WasmLayerMediaType = "application/vnd.wasm.content.layer.v1+wasm"

// WasmModuleAnnotation is the manifest annotation naming the module layer's
// digest in a wasm image.
const WasmModuleAnnotation = "dev.vhive.wasm.module"

// RefNameAnnotation annotates the image in an OCI layout's index.json.
const RefNameAnnotation = "org.opencontainers.image.ref.name"

// GuestPort is the port every Linux function image listens on.
const GuestPort = 50051

// modulePath is the module that holds the functions.
const modulePath = "vhive.dev/vhive"

// Names returns the example functions under functions/, for -all.
func Names() []string {
	return []string{"helloworld", "aes", "fibonacci", "json-serdes", "counter", "lookup", "heavyinit", "image-rotate", "chameleon", "lr-serving"}
}

// ServerNames returns the example functions that serve a protocol of their
// own rather than the sdk's (Linux only): a gRPC service with reflection and
// health, and a Knative-style HTTP server. Their images carry the labels
// that tell vhive deploy how to call them.
func ServerNames() []string { return []string{"echo-grpc", "hello-http"} }

// serverConfig is how a ServerNames function is called.
type serverConfig struct {
	protocol      string
	port          int
	readinessPath string
}

var serverFunctions = map[string]serverConfig{
	"echo-grpc":  {protocol: "grpc", port: GuestPort},
	"hello-http": {protocol: "http", port: 8080, readinessPath: "/healthz"},
}

// Ref returns the image reference of a function built for target, e.g.
// localhost/vhive/helloworld:latest or localhost/vhive/helloworld-wasm:latest.
func Ref(function string, target Target) string {
	return refTag(function, target, "latest")
}

func refTag(function string, target Target, tag string) string {
	return "localhost/vhive/" + imageName(function, target) + ":" + tag
}

func imageName(function string, target Target) string {
	if target == TargetWasm {
		return function + "-wasm"
	}
	return function
}

// Options says what to build and where.
type Options struct {
	// Function is the function's directory name under functions/ (required).
	// It names the binary and the image.
	Function string
	// Package, if set, is the Go package to build instead of
	// ./functions/<Function>: a path relative to the module root starting
	// with "./" (testdata directories work), e.g. ./internal/x/testdata/probe.
	Package string
	// Tag is the image tag; default "latest".
	Tag string
	// Targets defaults to [TargetLinux].
	Targets []Target
	// Formats defaults to [FormatLayout, FormatTar].
	Formats []Format
	// OutDir defaults to <ModuleDir>/out/images.
	OutDir string
	// ModuleDir is the root of the vhive.dev/vhive module. By default it is
	// found with `go env GOMOD` from the working directory, which works from
	// anywhere inside the repository (including from a package's test).
	ModuleDir string
	// GoCmd is the go command; default "go" from PATH (go test puts
	// GOROOT/bin first in PATH).
	GoCmd string
	// Arch is the GOARCH of Linux images; default runtime.GOARCH.
	Arch string
}

// Image is one built image.
type Image struct {
	Function string
	Target   Target
	Ref      string // e.g. localhost/vhive/helloworld:latest
	// Digest is the manifest digest of the image in the OCI layout ("" unless
	// FormatLayout).
	Digest string
	// TarballDigest is the manifest digest vhive's image service records
	// when it imports the docker-archive ("" unless FormatTar). A
	// docker-archive stores no manifest; the importer builds one the same way
	// every time (image.FromDockerArchive: OCI media types, the archive's
	// config and layer blobs, no annotations). For a Linux image that is
	// byte for byte the layout's manifest, so TarballDigest equals Digest:
	// one image, one digest, however it is imported. A wasm image's
	// docker-archive holds a different image (the module in a tar layer, see
	// the package doc), so its TarballDigest differs from Digest.
	TarballDigest string
	Layout        string // OCI layout directory, "" unless FormatLayout
	Tarball       string // docker-archive file, "" unless FormatTar
}

var (
	validName = regexp.MustCompile(`^[a-z0-9][a-z0-9_-]*$`)
	validTag  = regexp.MustCompile(`^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$`)
)

// withDefaults validates o and fills in the defaults.
func (o Options) withDefaults(ctx context.Context) (Options, error) {
	if !validName.MatchString(o.Function) {
		return o, fmt.Errorf("function name %q is invalid (want a directory name under functions/, e.g. helloworld)", o.Function)
	}
	if o.Tag == "" {
		o.Tag = "latest"
	}
	if !validTag.MatchString(o.Tag) {
		return o, fmt.Errorf("image tag %q is invalid", o.Tag)
	}
	if o.Package != "" && (!strings.HasPrefix(o.Package, "./") || strings.Contains(o.Package, "..")) {
		return o, fmt.Errorf("package %q: want a path inside the module starting with ./", o.Package)
	}
	if len(o.Targets) == 0 {
		o.Targets = []Target{TargetLinux}
	}
	for _, t := range o.Targets {
		if t != TargetLinux && t != TargetWasm {
			return o, fmt.Errorf("target %q is unknown (want %q or %q)", t, TargetLinux, TargetWasm)
		}
		if _, ok := serverFunctions[o.Function]; ok && t == TargetWasm {
			return o, fmt.Errorf("function %q serves its own protocol and builds for %q only", o.Function, TargetLinux)
		}
	}
	if len(o.Formats) == 0 {
		o.Formats = []Format{FormatLayout, FormatTar}
	}
	for _, f := range o.Formats {
		if f != FormatLayout && f != FormatTar {
			return o, fmt.Errorf("format %q is unknown (want %q or %q)", f, FormatLayout, FormatTar)
		}
	}
	if o.GoCmd == "" {
		o.GoCmd = "go"
	}
	if o.Arch == "" {
		o.Arch = runtime.GOARCH
	}
	if o.ModuleDir == "" {
		dir, err := findModuleDir(ctx, o.GoCmd)
		if err != nil {
			return o, err
		}
		o.ModuleDir = dir
	}
	if err := checkModule(o.ModuleDir); err != nil {
		return o, err
	}
	if o.Package == "" {
		o.Package = "./functions/" + o.Function
	}
	src := filepath.Join(o.ModuleDir, filepath.FromSlash(o.Package))
	if matches, _ := filepath.Glob(filepath.Join(src, "*.go")); len(matches) == 0 {
		return o, fmt.Errorf("function %q: no Go files in %s (known: %s)", o.Function, src, strings.Join(append(Names(), ServerNames()...), ", "))
	}
	if o.OutDir == "" {
		o.OutDir = filepath.Join(o.ModuleDir, "out", "images")
	}
	return o, nil
}

func findModuleDir(ctx context.Context, goCmd string) (string, error) {
	out, err := exec.CommandContext(ctx, goCmd, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("find the module root with `%s env GOMOD`: %w", goCmd, err)
	}
	gomod := strings.TrimSpace(string(out))
	if gomod == "" || gomod == os.DevNull {
		return "", fmt.Errorf("not inside the %s module (go env GOMOD is empty): set Options.ModuleDir", modulePath)
	}
	return filepath.Dir(gomod), nil
}

func checkModule(dir string) error {
	b, err := os.ReadFile(filepath.Join(dir, "go.mod"))
	if err != nil {
		return fmt.Errorf("module dir %s: %w", dir, err)
	}
	first, _, _ := strings.Cut(string(b), "\n")
	if strings.TrimSpace(first) != "module "+modulePath {
		return fmt.Errorf("module dir %s holds %q, not module %s", dir, strings.TrimSpace(first), modulePath)
	}
	return nil
}

// BuildFunction compiles o.Function for each target and writes its images
// in each format under o.OutDir, replacing earlier outputs. It returns one
// Image per target.
func BuildFunction(ctx context.Context, o Options) ([]Image, error) {
	o, err := o.withDefaults(ctx)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(o.OutDir, 0o755); err != nil {
		return nil, fmt.Errorf("create output dir: %w", err)
	}
	var images []Image
	for _, t := range o.Targets {
		img, err := buildTarget(ctx, o, t)
		if err != nil {
			return images, err
		}
		images = append(images, img)
	}
	return images, nil
}

func buildTarget(ctx context.Context, o Options, t Target) (Image, error) {
	tmp, err := os.MkdirTemp(o.OutDir, ".build-"+o.Function+"-")
	if err != nil {
		return Image{}, fmt.Errorf("function %q: %w", o.Function, err)
	}
	defer os.RemoveAll(tmp)
	bin := filepath.Join(tmp, o.Function)
	if err := buildBinary(ctx, o, t, bin); err != nil {
		return Image{}, err
	}
	data, err := os.ReadFile(bin)
	if err != nil {
		return Image{}, fmt.Errorf("function %q: %w", o.Function, err)
	}
	res := Image{Function: o.Function, Target: t, Ref: refTag(o.Function, t, o.Tag)}
	for _, f := range o.Formats {
		img, err := newImage(o.Function, t, o.Arch, data, f == FormatTar)
		if err != nil {
			return Image{}, fmt.Errorf("function %q (%s): package image: %w", o.Function, t, err)
		}
		d, err := formatDigest(img, f)
		if err != nil {
			return Image{}, fmt.Errorf("function %q (%s): image digest: %w", o.Function, t, err)
		}
		switch f {
		case FormatLayout:
			res.Digest = d
			res.Layout = filepath.Join(o.OutDir, imageName(o.Function, t))
			err = writeLayout(res.Layout, res.Ref, img)
		case FormatTar:
			res.TarballDigest = d
			res.Tarball = filepath.Join(o.OutDir, imageName(o.Function, t)+".tar")
			err = writeTarball(res.Tarball, res.Ref, img)
		}
		if err != nil {
			return Image{}, fmt.Errorf("function %q (%s): write %s: %w", o.Function, t, f, err)
		}
	}
	return res, nil
}

// BuildBinary compiles o.Function for t into the file out without packaging
// it: a static Linux executable (CGO_ENABLED=0) or a wasip1 reactor module.
// Targets, Formats, OutDir and Tag of o are ignored.
func BuildBinary(ctx context.Context, o Options, t Target, out string) error {
	o.Targets, o.Formats = []Target{t}, nil
	o, err := o.withDefaults(ctx)
	if err != nil {
		return err
	}
	return buildBinary(ctx, o, t, out)
}

func buildBinary(ctx context.Context, o Options, t Target, out string) error {
	out, err := filepath.Abs(out)
	if err != nil {
		return err
	}
	args := []string{"build", "-trimpath", "-buildvcs=false", "-ldflags=-s -w", "-o", out}
	env := append(os.Environ(), "CGO_ENABLED=0")
	switch t {
	case TargetLinux:
		env = append(env, "GOOS=linux", "GOARCH="+o.Arch)
	case TargetWasm:
		env = append(env, "GOOS=wasip1", "GOARCH=wasm")
		args = append(args, "-buildmode=c-shared")
	default:
		return fmt.Errorf("target %q is unknown", t)
	}
	args = append(args, o.Package)
	cmd := exec.CommandContext(ctx, o.GoCmd, args...)
	cmd.Dir = o.ModuleDir
	cmd.Env = env
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("function %q: go build for %s: %w\n%s", o.Function, t, err, b)
	}
	// go build -o of a non-main package writes a package archive.
	magic := map[Target]string{TargetLinux: "\x7fELF", TargetWasm: "\x00asm"}[t]
	f, err := os.Open(out)
	if err != nil {
		return fmt.Errorf("function %q: %w", o.Function, err)
	}
	defer f.Close()
	head := make([]byte, 4)
	if _, err := io.ReadFull(f, head); err != nil || string(head) != magic {
		return fmt.Errorf("function %q: %s is not a main package (go build made no %s executable)", o.Function, o.Package, t)
	}
	return nil
}
