// Package orchestrator keeps a pool of instances per deployed function,
// routes each invocation to a free instance (warm) or starts one (cold), stops
// idle instances after their keepalive (scale to zero), and times every stage
// of a cold start with vHive's stage names.
//
// Data flows one way: the daemon's API calls the orchestrator; the
// orchestrator calls the image resolver, the sandbox backends and the
// snapshot store, which never call back.
package orchestrator

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"math"
	"net/http"
	"net/url"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"vhive.dev/vhive/internal/sandbox"
	"vhive.dev/vhive/internal/store"
)

// Image is a resolved function image, as the orchestrator needs it.
type Image struct {
	Ref        string
	Digest     string
	Rootfs     string
	Kind       string // "linux" or "wasm"
	WasmModule string
	Entrypoint []string
	Cmd        []string
	Env        []string
	WorkingDir string
	User       string
	// Labels are the image config's labels; LabelProtocol, LabelPort and
	// LabelReadinessPath give a function's defaults.
	Labels map[string]string
}

// Image labels that say how a function is called, used where the deploy
// request leaves the setting out.
const (
	LabelProtocol      = "dev.vhive.protocol"       // grpc or http
	LabelPort          = "dev.vhive.port"           // the port it listens on
	LabelReadinessPath = "dev.vhive.readiness-path" // http: the readiness GET path
)

// Images resolves image references; the daemon adapts the image service.
type Images interface {
	// Resolve returns the image for ref, pulling it if it is not cached.
	Resolve(ctx context.Context, ref string) (Image, error)
}

// FunctionStore persists functions and live instances.
type FunctionStore interface {
	PutFunction(store.FunctionRecord) error
	DeleteFunction(name string) error
	Functions() ([]store.FunctionRecord, error)
	PutInstance(store.InstanceRecord) error
	DeleteInstance(id string) error
}

// Start modes.
const (
	ModeBoot     = "boot"
	ModeSnapshot = "snapshot"
	ModeLazy     = "lazy"
	ModeReap     = "reap"
)

// Config configures an Orchestrator.
type Config struct {
	Backends map[string]sandbox.Backend
	Images   Images
	Store    FunctionStore
	// Snapshots enables the snapshot start modes; nil means boot only.
	Snapshots SnapshotStore
	Logger    *slog.Logger
	Metrics   *Metrics

	DefaultSandbox      string        // default "gvisor"
	DefaultKeepalive    time.Duration // default 10m
	DefaultMaxInstances int           // default 16
	DefaultStartMode    string        // default "boot"
	DefaultMemoryMiB    int64         // default 256
	// ReadyTimeout bounds how long a new instance may take to accept
	// gRPC connections. Default 30s.
	ReadyTimeout time.Duration
	// QueueTimeout bounds how long a request waits for an instance when
	// max-instances is reached. Default 60s.
	QueueTimeout time.Duration
	// MaxPayload is the largest accepted payload in bytes. Default 1 MiB.
	MaxPayload int
	// ReapInterval is how often idle instances are looked for. Default 1s.
	ReapInterval time.Duration
	// DrainTimeout bounds how long Remove waits for in-flight requests.
	// Default 30s.
	DrainTimeout time.Duration
	// SnapshotWait bounds how long a request that finds every instance
	// busy waits for one being snapshotted rather than start another
	// (further bounded by the function's last cold start). Default 2s;
	// negative: never wait.
	SnapshotWait time.Duration
}

func (c *Config) setDefaults() error {
	if len(c.Backends) == 0 {
		return fmt.Errorf("%w: no sandbox backend configured", ErrInvalid)
	}
	if c.Images == nil || c.Store == nil {
		return fmt.Errorf("%w: Images and Store are required", ErrInvalid)
	}
	if c.Logger == nil {
		c.Logger = slog.Default()
	}
	if c.Metrics == nil {
		m, err := NewMetrics(nil)
		if err != nil {
			return err
		}
		c.Metrics = m
	}
	if c.DefaultSandbox == "" {
		c.DefaultSandbox = "gvisor"
	}
	if c.DefaultKeepalive == 0 {
		c.DefaultKeepalive = 10 * time.Minute
	}
	if c.DefaultMaxInstances == 0 {
		c.DefaultMaxInstances = 16
	}
	if c.DefaultStartMode == "" {
		c.DefaultStartMode = ModeBoot
	}
	if c.DefaultMemoryMiB == 0 {
		c.DefaultMemoryMiB = 256
	}
	if c.ReadyTimeout == 0 {
		c.ReadyTimeout = 30 * time.Second
	}
	if c.QueueTimeout == 0 {
		c.QueueTimeout = 60 * time.Second
	}
	if c.MaxPayload == 0 {
		c.MaxPayload = 1 << 20
	}
	if c.ReapInterval == 0 {
		c.ReapInterval = time.Second
	}
	if c.DrainTimeout == 0 {
		c.DrainTimeout = 30 * time.Second
	}
	if c.SnapshotWait == 0 {
		c.SnapshotWait = 2 * time.Second
	}
	return nil
}

// FunctionSpec is a function as deployed. Zero values take defaults.
type FunctionSpec struct {
	Name         string
	Image        string
	Sandbox      string
	Port         int
	Env          map[string]string
	Keepalive    time.Duration
	MaxInstances int
	Concurrency  int
	StartMode    string
	MemoryMiB    int64
	CPU          float64
	// Protocol is how the function is called: ProtocolGRPC (any gRPC
	// service) or ProtocolHTTP (an HTTP/1.1 server on Port, told in $PORT).
	Protocol string
	// ReadinessPath, for HTTP functions, is the GET path that answers
	// 2xx/3xx once the function is ready; empty: the port accepting
	// connections is enough.
	ReadinessPath string
	CreatedAt     time.Time
	ImageDigest   string // filled in by Deploy
}

// Protocols.
const (
	ProtocolGRPC = "grpc"
	ProtocolHTTP = "http"
)

// FunctionStatus reports a function and its pool.
type FunctionStatus struct {
	Spec      FunctionSpec
	Instances int
	Busy      int
	Cold      uint64
	Warm      uint64
}

// InstanceInfo describes a live instance.
type InstanceInfo struct {
	ID        string
	Function  string
	Sandbox   string
	StartMode string
	Endpoint  string
	Started   time.Time
	InFlight  int
	Stats     sandbox.Stats
}

// Result is the outcome of one invocation.
type Result struct {
	// Payload is SayHello's message, the method's serialized reply, or the
	// HTTP response body.
	Payload    []byte
	HTTPStatus int         // HTTP functions
	HTTPHeader http.Header // HTTP functions
	Cold       bool
	InstanceID string
	StartMode  string
	Stages     []Stage // cold starts only, in order, ending with Total
	Memory     map[string]int64
}

var nameRE = regexp.MustCompile(`^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$`)

// Bounds of a function spec: a request beyond them is refused as invalid,
// so that no value can overflow a conversion or exhaust the node by itself.
const (
	MaxPoolSize     = 1024    // max-instances and concurrency
	MinMemoryMiB    = 16      // smallest memory limit a function can start in
	MaxMemoryMiB    = 1 << 20 // 1 TiB
	MaxCPU          = 1024    // cores
	MaxKeepalive    = 365 * 24 * time.Hour
	MaxEnvVars      = 1024
	MaxEnvBytes     = 256 << 10 // sum of len(key)+len(value)+2 over the environment
	MaxImageRefSize = 4096
	// MaxEnvString is the longest environment string "KEY=VALUE" with its
	// terminating NUL that Linux's execve accepts (MAX_ARG_STRLEN: 32 pages
	// of 4 KiB): a longer one makes every exec of the function fail.
	MaxEnvString = 128 << 10
)

// Orchestrator runs function pools.
type Orchestrator struct {
	cfg Config
	log *slog.Logger

	mu        sync.Mutex
	functions map[string]*function

	stop     chan struct{}
	stopOnce sync.Once
	wg       sync.WaitGroup
}

// New creates an orchestrator and reloads the functions persisted in the
// store. Instances are not restored: a restarted daemon starts with empty
// pools (the backends' Cleanup removes what a previous run left).
func New(ctx context.Context, cfg Config) (*Orchestrator, error) {
	if err := cfg.setDefaults(); err != nil {
		return nil, err
	}
	o := &Orchestrator{cfg: cfg, log: cfg.Logger, functions: map[string]*function{}, stop: make(chan struct{})}
	recs, err := cfg.Store.Functions()
	if err != nil {
		return nil, fmt.Errorf("load functions: %w", err)
	}
	for _, r := range recs {
		spec := specFromRecord(r)
		o.functions[spec.Name] = newFunction(o, spec)
		o.log.Info("function restored from state", "function", spec.Name, "image", spec.Image, "sandbox", spec.Sandbox)
	}
	o.wg.Add(1)
	go o.reapLoop()
	return o, nil
}

func specFromRecord(r store.FunctionRecord) FunctionSpec {
	return FunctionSpec{Name: r.Name, Image: r.Image, ImageDigest: r.ImageDigest, Sandbox: r.Sandbox, Port: r.Port,
		Env: r.Env, Keepalive: r.Keepalive, MaxInstances: r.MaxInst, Concurrency: r.Concurrency,
		StartMode: r.StartMode, MemoryMiB: r.MemoryMiB, CPU: r.CPU, CreatedAt: r.Created,
		Protocol: cmpOr(r.Protocol, ProtocolGRPC), ReadinessPath: r.ReadinessPath}
}

func cmpOr(v, def string) string {
	if v == "" {
		return def
	}
	return v
}

func recordFromSpec(s FunctionSpec) store.FunctionRecord {
	return store.FunctionRecord{Name: s.Name, Image: s.Image, ImageDigest: s.ImageDigest, Sandbox: s.Sandbox, Port: s.Port,
		Env: s.Env, Keepalive: s.Keepalive, MaxInst: s.MaxInstances, Concurrency: s.Concurrency,
		StartMode: s.StartMode, MemoryMiB: s.MemoryMiB, CPU: s.CPU, Created: s.CreatedAt,
		Protocol: s.Protocol, ReadinessPath: s.ReadinessPath}
}

// normalize validates spec and fills in defaults.
func (o *Orchestrator) normalize(spec *FunctionSpec) error {
	if !nameRE.MatchString(spec.Name) {
		return fmt.Errorf("%w: function name %q: use 1-63 lower-case letters, digits and '-'", ErrInvalid, spec.Name)
	}
	if strings.TrimSpace(spec.Image) == "" {
		return fmt.Errorf("%w: function %q: an image is required", ErrInvalid, spec.Name)
	}
	if len(spec.Image) > MaxImageRefSize || strings.ContainsFunc(spec.Image, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
		return fmt.Errorf("%w: function %q: image reference %.80q: control characters, spaces or more than %d bytes", ErrInvalid, spec.Name, spec.Image, MaxImageRefSize)
	}
	if spec.Sandbox == "" {
		spec.Sandbox = o.cfg.DefaultSandbox
	}
	be, ok := o.cfg.Backends[spec.Sandbox]
	if !ok {
		return fmt.Errorf("%w: sandbox %q is not available on this node (have: %s)", ErrInvalid, spec.Sandbox, strings.Join(o.backendNames(), ", "))
	}
	switch spec.Protocol {
	case "":
		spec.Protocol = ProtocolGRPC
	case ProtocolGRPC, ProtocolHTTP:
	default:
		return fmt.Errorf("%w: protocol %q: want grpc or http", ErrInvalid, spec.Protocol)
	}
	if spec.ReadinessPath != "" {
		if spec.Protocol != ProtocolHTTP {
			return fmt.Errorf("%w: a readiness path is for HTTP functions; gRPC functions are probed with the gRPC health service", ErrInvalid)
		}
		if !strings.HasPrefix(spec.ReadinessPath, "/") || len(spec.ReadinessPath) > 1024 ||
			strings.ContainsFunc(spec.ReadinessPath, func(r rune) bool { return r < 0x21 || r == 0x7f }) {
			return fmt.Errorf("%w: readiness path %.80q: want an absolute path without spaces or control characters, at most 1024 bytes", ErrInvalid, spec.ReadinessPath)
		}
	}
	if spec.Protocol == ProtocolHTTP && spec.Sandbox == "wasm" {
		return fmt.Errorf("%w: sandbox wasm serves gRPC functions only", ErrUnsupported)
	}
	if spec.Port == 0 {
		spec.Port = 50051
		if spec.Protocol == ProtocolHTTP {
			spec.Port = 8080 // Knative's default $PORT
		}
	}
	if spec.Port < 1 || spec.Port > 65535 {
		return fmt.Errorf("%w: port %d out of range", ErrInvalid, spec.Port)
	}
	if spec.Keepalive == 0 {
		spec.Keepalive = o.cfg.DefaultKeepalive
	}
	if spec.Keepalive < 0 {
		return fmt.Errorf("%w: keepalive %s is negative", ErrInvalid, spec.Keepalive)
	}
	if spec.Keepalive > MaxKeepalive {
		return fmt.Errorf("%w: keepalive %s exceeds the limit of %s", ErrInvalid, spec.Keepalive, MaxKeepalive)
	}
	if spec.MaxInstances == 0 {
		spec.MaxInstances = o.cfg.DefaultMaxInstances
	}
	if spec.MaxInstances < 0 || spec.MaxInstances > MaxPoolSize {
		return fmt.Errorf("%w: max-instances %d: want 1-%d", ErrInvalid, spec.MaxInstances, MaxPoolSize)
	}
	if spec.Concurrency == 0 {
		spec.Concurrency = 1
	}
	if spec.Concurrency < 0 || spec.Concurrency > MaxPoolSize {
		return fmt.Errorf("%w: concurrency %d: want 1-%d", ErrInvalid, spec.Concurrency, MaxPoolSize)
	}
	if spec.MemoryMiB == 0 {
		spec.MemoryMiB = o.cfg.DefaultMemoryMiB
	}
	if spec.MemoryMiB < MinMemoryMiB || spec.MemoryMiB > MaxMemoryMiB {
		return fmt.Errorf("%w: memory limit %d MiB: want %d-%d MiB", ErrInvalid, spec.MemoryMiB, MinMemoryMiB, MaxMemoryMiB)
	}
	if math.IsNaN(spec.CPU) || spec.CPU < 0 || spec.CPU > MaxCPU {
		return fmt.Errorf("%w: cpu limit %v: want 0 (the default) to %d cores", ErrInvalid, spec.CPU, MaxCPU)
	}
	if spec.StartMode == "" {
		spec.StartMode = o.cfg.DefaultStartMode
	}
	caps := be.Capabilities()
	switch spec.StartMode {
	case ModeBoot:
	case ModeSnapshot:
		if !caps.Snapshot || o.cfg.Snapshots == nil {
			return fmt.Errorf("%w: start mode %q needs snapshots, which sandbox %q does not support", ErrUnsupported, spec.StartMode, spec.Sandbox)
		}
	case ModeLazy, ModeReap:
		if !caps.Snapshot || !caps.LazyMemory || o.cfg.Snapshots == nil || (spec.StartMode == ModeReap && !caps.REAP) {
			why := "lazily served snapshot memory"
			if caps.EagerRestore {
				why += " (its restore reads the whole memory image eagerly)"
			}
			return fmt.Errorf("%w: start mode %q needs %s, which sandbox %q does not support", ErrUnsupported, spec.StartMode, why, spec.Sandbox)
		}
	default:
		return fmt.Errorf("%w: unknown start mode %q (boot, snapshot, lazy, reap)", ErrInvalid, spec.StartMode)
	}
	if len(spec.Env) > MaxEnvVars {
		return fmt.Errorf("%w: environment of %d variables exceeds the limit of %d", ErrInvalid, len(spec.Env), MaxEnvVars)
	}
	envBytes := 0
	for k, v := range spec.Env {
		if k == "" || strings.ContainsAny(k, "=\x00") {
			return fmt.Errorf("%w: environment variable name %.80q: want a non-empty name without '=' or NUL", ErrInvalid, k)
		}
		if strings.ContainsRune(v, 0) {
			return fmt.Errorf("%w: environment variable %.80q: its value holds a NUL byte", ErrInvalid, k)
		}
		if n := len(k) + len(v) + 2; n > MaxEnvString {
			return fmt.Errorf("%w: environment variable %.80q: %s", ErrInvalid, k, envStringTooLong(n))
		}
		envBytes += len(k) + len(v) + 2
	}
	if envBytes > MaxEnvBytes {
		return fmt.Errorf("%w: environment of %d bytes exceeds the limit of %d bytes", ErrInvalid, envBytes, MaxEnvBytes)
	}
	return nil
}

// envStringTooLong says why an environment string of n bytes (with its NUL)
// is refused.
func envStringTooLong(n int) string {
	return fmt.Sprintf("KEY=VALUE is %d bytes with its terminating NUL, over Linux's limit of %d bytes (128 KiB, MAX_ARG_STRLEN) for one exec string", n, MaxEnvString)
}

// checkExecEnv refuses an environment ("KEY=VALUE" strings) holding a string
// that execve refuses, naming the variable.
func checkExecEnv(env []string) error {
	for _, kv := range env {
		if n := len(kv) + 1; n > MaxEnvString {
			k, _, _ := strings.Cut(kv, "=")
			return fmt.Errorf("environment variable %.80q set by the image's config: %s; set a shorter value in the function's env to override it", k, envStringTooLong(n))
		}
	}
	return nil
}

func (o *Orchestrator) backendNames() []string {
	var names []string
	for n := range o.cfg.Backends {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// Deploy registers a function (or replaces it when replace is set). The image
// is resolved (pulled if needed) so that a bad reference fails here, not at
// the first invocation.
func (o *Orchestrator) Deploy(ctx context.Context, spec FunctionSpec, replace bool) (FunctionStatus, error) {
	asked := spec
	if err := o.normalize(&spec); err != nil {
		return FunctionStatus{}, err
	}
	o.mu.Lock()
	_, exists := o.functions[spec.Name]
	o.mu.Unlock()
	if exists && !replace {
		return FunctionStatus{}, fmt.Errorf("%w: function %q (use --replace to redeploy)", ErrAlreadyExists, spec.Name)
	}
	img, err := o.cfg.Images.Resolve(ctx, spec.Image)
	if err != nil {
		return FunctionStatus{}, fmt.Errorf("function %q: image %q: %w", spec.Name, spec.Image, err)
	}
	wantWasm := spec.Sandbox == "wasm"
	if wantWasm != (img.Kind == "wasm") {
		return FunctionStatus{}, fmt.Errorf("%w: image %q is a %s image; sandbox %q needs a %s image", ErrInvalid, spec.Image, img.Kind, spec.Sandbox, map[bool]string{true: "wasm", false: "linux"}[wantWasm])
	}
	if labelled, ok, err := withImageLabels(asked, img.Labels); err != nil {
		return FunctionStatus{}, fmt.Errorf("function %q: image %q: %w", spec.Name, spec.Image, err)
	} else if ok {
		if err := o.normalize(&labelled); err != nil {
			return FunctionStatus{}, fmt.Errorf("function %q with the labels of image %q: %w", spec.Name, spec.Image, err)
		}
		spec = labelled
	}
	// The image's own environment joins the function's: a string of it
	// that no exec accepts is refused here, not at every cold start.
	if err := checkExecEnv(processEnv(spec, img)); err != nil {
		return FunctionStatus{}, fmt.Errorf("%w: function %q: image %q: %w", ErrInvalid, spec.Name, spec.Image, err)
	}
	spec.ImageDigest = img.Digest
	spec.CreatedAt = time.Now().UTC()

	if exists {
		// The record stays until PutFunction below overwrites it: a crash
		// in between leaves the old function, never none.
		if err := o.remove(ctx, spec.Name, false); err != nil && !errors.Is(err, ErrNotFound) {
			return FunctionStatus{}, fmt.Errorf("replace function %q: %w", spec.Name, err)
		}
	}
	o.mu.Lock()
	defer o.mu.Unlock()
	if _, ok := o.functions[spec.Name]; ok {
		return FunctionStatus{}, fmt.Errorf("%w: function %q was deployed concurrently", ErrAlreadyExists, spec.Name)
	}
	if err := o.cfg.Store.PutFunction(recordFromSpec(spec)); err != nil {
		return FunctionStatus{}, err
	}
	f := newFunction(o, spec)
	o.functions[spec.Name] = f
	o.log.Info("function deployed", "function", spec.Name, "image", spec.Image, "digest", img.Digest, "sandbox", spec.Sandbox, "mode", spec.StartMode)
	return f.status(), nil
}

// withImageLabels fills the protocol, port and readiness path the deploy
// request left out from the image's labels; ok reports whether any was.
func withImageLabels(spec FunctionSpec, labels map[string]string) (FunctionSpec, bool, error) {
	used := false
	if v := labels[LabelProtocol]; v != "" && spec.Protocol == "" {
		spec.Protocol, used = v, true
	}
	if v := labels[LabelPort]; v != "" && spec.Port == 0 {
		p, err := strconv.ParseUint(v, 10, 16)
		if err != nil || p == 0 {
			return spec, false, fmt.Errorf("%w: label %s=%q is not a port", ErrInvalid, LabelPort, v)
		}
		spec.Port, used = int(p), true
	}
	if v := labels[LabelReadinessPath]; v != "" && spec.ReadinessPath == "" && (spec.Protocol == ProtocolHTTP) {
		spec.ReadinessPath, used = v, true
	}
	return spec, used, nil
}

func (o *Orchestrator) get(name string) (*function, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	f, ok := o.functions[name]
	if !ok {
		return nil, fmt.Errorf("%w: function %q is not deployed", ErrNotFound, name)
	}
	return f, nil
}

// Remove deletes a function: new requests fail with ErrNotFound, in-flight
// requests get up to DrainTimeout to finish, then every instance stops and
// the function's snapshots are removed.
func (o *Orchestrator) Remove(ctx context.Context, name string) error {
	return o.remove(ctx, name, true)
}

// remove takes the function out of service; with deleteRecord it also
// deletes its record (Deploy's replace overwrites the record instead).
func (o *Orchestrator) remove(ctx context.Context, name string, deleteRecord bool) error {
	o.mu.Lock()
	f, ok := o.functions[name]
	if ok {
		delete(o.functions, name)
	}
	o.mu.Unlock()
	if !ok {
		return fmt.Errorf("%w: function %q is not deployed", ErrNotFound, name)
	}
	if deleteRecord {
		if err := o.cfg.Store.DeleteFunction(name); err != nil {
			return err
		}
	}
	f.shutdown(ctx, o.cfg.DrainTimeout)
	o.cfg.Metrics.forget(name)
	if o.cfg.Snapshots != nil {
		if err := o.cfg.Snapshots.RemoveFunction(ctx, name); err != nil {
			o.log.Warn("removing snapshots of function", "function", name, "err", err)
		}
	}
	o.log.Info("function removed", "function", name)
	return nil
}

// List reports every function, sorted by name.
func (o *Orchestrator) List() []FunctionStatus {
	o.mu.Lock()
	fs := make([]*function, 0, len(o.functions))
	for _, f := range o.functions {
		fs = append(fs, f)
	}
	o.mu.Unlock()
	out := make([]FunctionStatus, 0, len(fs))
	for _, f := range fs {
		out = append(out, f.status())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].Spec.Name < out[j].Spec.Name })
	return out
}

// Function reports one function.
func (o *Orchestrator) Function(name string) (FunctionStatus, error) {
	f, err := o.get(name)
	if err != nil {
		return FunctionStatus{}, err
	}
	return f.status(), nil
}

// FunctionsUsingImage lists the functions deployed from the image digest.
func (o *Orchestrator) FunctionsUsingImage(digest string) []string {
	o.mu.Lock()
	defer o.mu.Unlock()
	var names []string
	for _, f := range o.functions {
		if f.spec.ImageDigest == digest {
			names = append(names, f.spec.Name)
		}
	}
	sort.Strings(names)
	return names
}

// Invoke runs one request on function name: SayHello with payload as the
// name (vHive's functions; an HTTP function gets payload as the body of a
// POST to /, or a GET of / when it is empty).
func (o *Orchestrator) Invoke(ctx context.Context, name string, payload []byte) (Result, error) {
	return o.Call(ctx, name, Request{Payload: payload})
}

// Request is one invocation's request.
type Request struct {
	// Payload is SayHello's name, the method's serialized request message
	// (or its protobuf JSON, with JSON), or the HTTP request body.
	Payload []byte
	// Method is a gRPC function's unary method, "/pkg.Service/Method";
	// empty: helloworld.Greeter/SayHello.
	Method string
	// JSON: Payload and the reply are protobuf JSON, converted with the
	// function's server reflection.
	JSON bool
	// HTTP is an HTTP function's request line and headers.
	HTTP *HTTPRequest
}

// HTTPRequest is an HTTP function's request without its body.
type HTTPRequest struct {
	Method string // default GET, or POST with a payload
	Path   string // path and query, default "/"
	Header http.Header
}

// Call runs one request on function name.
func (o *Orchestrator) Call(ctx context.Context, name string, req Request) (Result, error) {
	if len(req.Payload) > o.cfg.MaxPayload {
		return Result{}, fmt.Errorf("%w: payload of %d bytes exceeds the limit of %d bytes (daemon flag --max-payload)", ErrInvalid, len(req.Payload), o.cfg.MaxPayload)
	}
	f, err := o.get(name)
	if err != nil {
		return Result{}, err
	}
	var res Result
	c, err := f.callFor(req, &res)
	if err != nil {
		return Result{}, err
	}
	if err := f.do(ctx, c, &res); err != nil {
		return Result{}, err
	}
	return res, nil
}

// Target is an instance as a relay reaches it: the gRPC connection of a gRPC
// function, or the base URL and transport of an HTTP one. Cold is set when
// the relay's request started it.
type Target struct {
	Cold      bool
	Conn      *grpc.ClientConn
	URL       *url.URL
	Transport http.RoundTripper
}

// Relay runs fn on an instance of function name, started cold if none is
// free: the gateway's transparent relay of any gRPC method or HTTP request.
// fn must make its requests with the context it is given: the error of a
// request the function answered is the function's (a FunctionError for a
// gRPC status), one without an answer is the instance's.
func (o *Orchestrator) Relay(ctx context.Context, name string, fn func(ctx context.Context, t Target) error) (Result, error) {
	f, err := o.get(name)
	if err != nil {
		return Result{}, err
	}
	var res Result
	err = f.do(ctx, func(ctx context.Context, in *instance, cold bool) (metadata.MD, time.Duration, error) {
		return nil, 0, fn(ctx, Target{Cold: cold, Conn: in.conn, URL: in.url, Transport: in.transport})
	}, &res)
	return res, err
}

// StopInstances stops every idle and busy instance of function name (all
// functions if name is empty) after their in-flight requests finish.
func (o *Orchestrator) StopInstances(ctx context.Context, name string) (int, error) {
	var fs []*function
	if name != "" {
		f, err := o.get(name)
		if err != nil {
			return 0, err
		}
		fs = append(fs, f)
	} else {
		o.mu.Lock()
		for _, f := range o.functions {
			fs = append(fs, f)
		}
		o.mu.Unlock()
	}
	n := 0
	for _, f := range fs {
		n += f.stopAll(ctx, o.cfg.DrainTimeout)
	}
	return n, nil
}

// Instances lists live instances of name (all if empty), measuring memory
// when stats is set.
func (o *Orchestrator) Instances(ctx context.Context, name string, stats bool) ([]InstanceInfo, error) {
	var fs []*function
	if name != "" {
		f, err := o.get(name)
		if err != nil {
			return nil, err
		}
		fs = append(fs, f)
	} else {
		o.mu.Lock()
		for _, f := range o.functions {
			fs = append(fs, f)
		}
		o.mu.Unlock()
	}
	var out []InstanceInfo
	for _, f := range fs {
		out = append(out, f.instanceInfos(ctx, stats)...)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].ID < out[j].ID })
	return out, nil
}

// Close stops every instance and the background loop. Functions stay in the
// store.
func (o *Orchestrator) Close(ctx context.Context) error {
	o.stopOnce.Do(func() { close(o.stop) })
	o.wg.Wait()
	o.mu.Lock()
	fs := make([]*function, 0, len(o.functions))
	for _, f := range o.functions {
		fs = append(fs, f)
	}
	o.mu.Unlock()
	var wg sync.WaitGroup
	for _, f := range fs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			f.stopAll(ctx, 5*time.Second)
		}()
	}
	wg.Wait()
	return nil
}

func (o *Orchestrator) reapLoop() {
	defer o.wg.Done()
	t := time.NewTicker(o.cfg.ReapInterval)
	defer t.Stop()
	for {
		select {
		case <-o.stop:
			return
		case now := <-t.C:
			o.mu.Lock()
			fs := make([]*function, 0, len(o.functions))
			for _, f := range o.functions {
				fs = append(fs, f)
			}
			o.mu.Unlock()
			for _, f := range fs {
				f.reapIdle(now)
			}
		}
	}
}

func newInstanceID(function string) string {
	var b [4]byte
	_, _ = rand.Read(b[:])
	return function + "-" + hex.EncodeToString(b[:])
}
