package invoker

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"

	"google.golang.org/grpc"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// FunctionEntry is one entry of vSwarm's deployer input
// {"functions":[{"name","file","count"}]}. Here File is an image reference
// (e.g. localhost/vhive/helloworld:latest) or the path of an image (OCI
// layout directory or tarball), relative to the deployer's -funcPath.
type FunctionEntry struct {
	Name  string `json:"name"`
	File  string `json:"file"`
	Count int    `json:"count"`
}

type functionsFile struct {
	Functions []FunctionEntry `json:"functions"`
}

// ReadFunctions parses a deployer functions.json.
func ReadFunctions(path string) ([]FunctionEntry, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("read functions file: %w", err)
	}
	return ParseFunctions(path, b)
}

// ParseFunctions parses the contents b of the functions file named path
// (used in errors) and validates every entry.
func ParseFunctions(path string, b []byte) ([]FunctionEntry, error) {
	var ff functionsFile
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&ff); err != nil {
		return nil, fmt.Errorf("parse functions file %q: %w (want {\"functions\": [{\"name\": ..., \"file\": ..., \"count\": N}]})", path, err)
	}
	if dec.More() {
		return nil, fmt.Errorf("parse functions file %q: data after the JSON object", path)
	}
	if len(ff.Functions) == 0 {
		return nil, fmt.Errorf("functions file %q lists no functions", path)
	}
	seen := map[string]bool{}
	for i, f := range ff.Functions {
		switch {
		case f.Name == "":
			return nil, fmt.Errorf("functions file %q: function %d has no name", path, i)
		case strings.ContainsAny(f.Name, "./: "):
			return nil, fmt.Errorf("functions file %q: function name %q must be a DNS label (no dots, slashes, colons or spaces)", path, f.Name)
		case f.File == "":
			return nil, fmt.Errorf("functions file %q: function %q has no file (an image ref or image path)", path, f.Name)
		case f.Count < 0:
			return nil, fmt.Errorf("functions file %q: function %q has count %d", path, f.Name, f.Count)
		case seen[f.Name]:
			return nil, fmt.Errorf("functions file %q: function %q listed twice", path, f.Name)
		}
		seen[f.Name] = true
	}
	return ff.Functions, nil
}

// DeployControl is the part of the control API the deployer uses;
// vhivepb.ControlClient satisfies it.
type DeployControl interface {
	Deploy(ctx context.Context, in *vhivepb.DeployRequest, opts ...grpc.CallOption) (*vhivepb.DeployResponse, error)
	ImportImage(ctx context.Context, in *vhivepb.ImportImageRequest, opts ...grpc.CallOption) (*vhivepb.ImageInfo, error)
}

var _ DeployControl = vhivepb.ControlClient(nil)

// DeployOptions configures DeployFunctions.
type DeployOptions struct {
	// FuncPath is the directory relative image paths are resolved in.
	FuncPath string
	// Sandbox and StartMode of every deployed function ("" for the daemon's
	// defaults).
	Sandbox   string
	StartMode string
	// Domain is appended to each function name to form the endpoint
	// hostname (<name>-<i>.<Domain>); empty gives bare names. The vhive
	// gateway routes by the first label, so both work with `vhive invoker
	// -addr`.
	Domain string
	// Concurrency is how many deployments run at once (default 1).
	Concurrency int
	// Replace redeploys functions that already exist.
	Replace bool
	Logger  *slog.Logger
}

// Hostname is the endpoint hostname of a deployed function.
func Hostname(name, domain string) string {
	if domain == "" {
		return name
	}
	return name + "." + domain
}

// resolveImage returns the image reference for f, importing it first when
// File names an image on disk.
func resolveImage(ctx context.Context, c DeployControl, f FunctionEntry, funcPath string) (string, error) {
	p := f.File
	if !filepath.IsAbs(p) && funcPath != "" {
		p = filepath.Join(funcPath, p)
	}
	if _, err := os.Stat(p); err != nil {
		if strings.HasPrefix(f.File, ".") || strings.HasPrefix(f.File, "/") || strings.HasSuffix(f.File, ".tar") {
			return "", fmt.Errorf("function %q: image path %q: %w", f.Name, p, err)
		}
		return f.File, nil // an image reference
	}
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", fmt.Errorf("function %q: image path %q: %w", f.Name, p, err)
	}
	info, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: abs})
	if err != nil {
		return "", fmt.Errorf("function %q: import image %q: %w", f.Name, abs, err)
	}
	if info.GetRef() != "" {
		return info.GetRef(), nil
	}
	if info.GetDigest() != "" {
		return info.GetDigest(), nil
	}
	return "", fmt.Errorf("function %q: the daemon imported %q but returned neither a ref nor a digest", f.Name, abs)
}

// DeployFunctions deploys Count copies of each function, named
// <name>-0 … <name>-<Count-1> as vSwarm's deployer does, and returns their
// endpoints in order. Each image is resolved (and imported) once per entry.
// On error the functions deployed so far stay deployed; the error names
// the one that failed.
func DeployFunctions(ctx context.Context, c DeployControl, fns []FunctionEntry, opts DeployOptions) ([]Endpoint, error) {
	if opts.Concurrency < 1 {
		opts.Concurrency = 1
	}
	if opts.Logger == nil {
		opts.Logger = slog.New(slog.DiscardHandler)
	}
	type job struct {
		name, image string
		idx         int
	}
	var jobs []job
	for _, f := range fns {
		if f.Count == 0 {
			opts.Logger.Warn("function has count 0; nothing deployed", "function", f.Name)
			continue
		}
		img, err := resolveImage(ctx, c, f, opts.FuncPath)
		if err != nil {
			return nil, err
		}
		for i := range f.Count {
			jobs = append(jobs, job{name: f.Name + "-" + strconv.Itoa(i), image: img, idx: len(jobs)})
		}
	}
	eps := make([]Endpoint, len(jobs))
	errs := make([]error, len(jobs))
	sem := make(chan struct{}, opts.Concurrency)
	var wg sync.WaitGroup
	for _, j := range jobs {
		sem <- struct{}{}
		wg.Go(func() {
			defer func() { <-sem }()
			_, err := c.Deploy(ctx, &vhivepb.DeployRequest{
				Spec:    &vhivepb.FunctionSpec{Name: j.name, Image: j.image, Sandbox: opts.Sandbox, StartMode: opts.StartMode},
				Replace: opts.Replace,
			})
			if err != nil {
				errs[j.idx] = fmt.Errorf("deploy function %q (image %q): %w", j.name, j.image, err)
				return
			}
			eps[j.idx] = Endpoint{Hostname: Hostname(j.name, opts.Domain)}
			opts.Logger.Info("deployed", "function", j.name, "image", j.image)
		})
	}
	wg.Wait()
	for _, err := range errs {
		if err != nil {
			return nil, err
		}
	}
	return eps, nil
}
