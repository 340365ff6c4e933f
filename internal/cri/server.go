package cri

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/sandbox"
)

// Container names and env keys of vHive's Knative convention.
const (
	UserContainer = "user-container"
	QueueProxy    = "queue-proxy"
	EnvGuestImage = "GUEST_IMAGE"
	EnvGuestPort  = "GUEST_PORT"
	// EnvPort is Knative's port variable, used when GUEST_PORT is unset.
	EnvPort        = "PORT"
	EnvGuestAddr   = "GUEST_ADDR"
	EnvRevision    = "K_REVISION"
	DefaultHandler = "vhive"
	// DefaultGuestPort is vHive's function port when GUEST_PORT is unset.
	DefaultGuestPort = 50051
)

// ImageGetter resolves an image reference to an unpacked image
// (*image.Service satisfies it).
type ImageGetter interface {
	Pull(ctx context.Context, ref string) (image.Image, error)
}

// FunctionBackend creates the sandbox a Knative user-container's function
// (GUEST_IMAGE) runs in. Every sandbox.Backend satisfies it.
type FunctionBackend interface {
	Create(ctx context.Context, spec sandbox.Spec) (sandbox.Sandbox, error)
}

// Config configures a Server.
type Config struct {
	// StateDir holds state.json and the per-pod and per-container
	// directories (bundles, overlay upper dirs). Required.
	StateDir string
	// ContainerdEndpoint is the stock containerd CRI socket everything not
	// run by vhive is proxied to, e.g. "unix:///run/containerd/containerd.sock"
	// (a bare path is accepted). Required.
	ContainerdEndpoint string
	// RuntimeHandler is the CRI runtime handler (RuntimeClass handler) whose
	// pods run all their containers in vhive; DefaultHandler when empty.
	RuntimeHandler string
	// PodHandler is the containerd runtime handler used for the pod sandbox
	// (pause container) of a vhive-handler pod; "" is containerd's default.
	PodHandler string
	// Images pulls the images vhive runs itself (GUEST_IMAGE and the
	// containers of vhive-handler pods). Required.
	Images ImageGetter
	// Functions runs user-container functions. Nil disables the Knative
	// routing: user-containers are then proxied to containerd like any other.
	Functions FunctionBackend
	// OCIRuntime is the OCI runtime binary (runc, or runsc) that runs the
	// containers of vhive-handler pods. Empty disables the handler: such
	// pods are refused with InvalidArgument.
	OCIRuntime string
	// OCIRuntimeArgs are global flags put before every OCI runtime command
	// (e.g. runsc's "--network=host", "--platform=systrap").
	OCIRuntimeArgs []string
	// RegistryMirrors maps a registry host to the host Images pulls from
	// instead, e.g. {"registry.k8s.io": "127.0.0.1:5000"}; "*" matches all.
	RegistryMirrors map[string]string
	// StreamAddr is where the CRI streaming server (exec into vhive
	// containers) listens; "127.0.0.1:0" (a free loopback port) when empty.
	StreamAddr string
	// Logger; slog.Default() when nil.
	Logger *slog.Logger
}

// Server implements runtimeapi.RuntimeServiceServer and
// runtimeapi.ImageServiceServer. Create it with New, serve with Serve, and
// release it with Close.
type Server struct {
	runtimeapi.UnimplementedRuntimeServiceServer
	runtimeapi.UnimplementedImageServiceServer

	cfg     Config
	log     *slog.Logger
	conn    *grpc.ClientConn
	rt      runtimeapi.RuntimeServiceClient
	img     runtimeapi.ImageServiceClient
	oci     *ociRuntime
	stream  *streamServer
	events  *broadcaster
	store   *stateFile
	podLock keyedMutex

	mu         sync.Mutex
	pods       map[string]*pod       // vhive-handler pods and pods holding a function
	containers map[string]*container // containers vhive runs
	names      map[string]string     // reserved "pod/name/attempt" → container ID
	closed     bool
}

// Compile-time checks.
var (
	_ runtimeapi.RuntimeServiceServer = (*Server)(nil)
	_ runtimeapi.ImageServiceServer   = (*Server)(nil)
	_ ImageGetter                     = (*image.Service)(nil)
	_ FunctionBackend                 = (sandbox.Backend)(nil)
)

// New validates cfg, opens the state directory, removes the containers a
// previous run left behind, and connects (lazily) to containerd.
func New(ctx context.Context, cfg Config) (*Server, error) {
	if cfg.StateDir == "" {
		return nil, errors.New("cri: Config.StateDir is empty")
	}
	if cfg.ContainerdEndpoint == "" {
		return nil, errors.New("cri: Config.ContainerdEndpoint is empty")
	}
	if cfg.Images == nil {
		return nil, errors.New("cri: Config.Images is nil")
	}
	if cfg.RuntimeHandler == "" {
		cfg.RuntimeHandler = DefaultHandler
	}
	if cfg.Logger == nil {
		cfg.Logger = slog.Default()
	}
	if cfg.OCIRuntime != "" {
		p, err := exec.LookPath(cfg.OCIRuntime)
		if err != nil {
			return nil, fmt.Errorf("cri: OCI runtime %q: %w", cfg.OCIRuntime, err)
		}
		cfg.OCIRuntime = p
	}
	dir, err := filepath.Abs(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("cri: state dir %q: %w", cfg.StateDir, err)
	}
	cfg.StateDir = dir
	for _, d := range []string{dir, filepath.Join(dir, "pods"), filepath.Join(dir, "containers"), filepath.Join(dir, "runtime")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, fmt.Errorf("cri: create %q: %w", d, err)
		}
	}
	target := cfg.ContainerdEndpoint
	if strings.HasPrefix(target, "/") {
		target = "unix://" + target
	}
	if !strings.HasPrefix(target, "unix://") {
		return nil, fmt.Errorf("cri: ContainerdEndpoint %q: want unix:///path or /path", cfg.ContainerdEndpoint)
	}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(16<<20)))
	if err != nil {
		return nil, fmt.Errorf("cri: containerd endpoint %q: %w", cfg.ContainerdEndpoint, err)
	}
	s := &Server{
		cfg:        cfg,
		log:        cfg.Logger.With("component", "cri"),
		conn:       conn,
		rt:         runtimeapi.NewRuntimeServiceClient(conn),
		img:        runtimeapi.NewImageServiceClient(conn),
		events:     newBroadcaster(),
		store:      &stateFile{path: filepath.Join(dir, "state.json")},
		pods:       map[string]*pod{},
		containers: map[string]*container{},
		names:      map[string]string{},
	}
	if cfg.OCIRuntime != "" {
		s.oci = &ociRuntime{bin: cfg.OCIRuntime, args: cfg.OCIRuntimeArgs, root: filepath.Join(dir, "runtime"), log: s.log}
	}
	if err := s.recover(ctx); err != nil {
		conn.Close()
		return nil, err
	}
	if s.oci != nil {
		addr := cfg.StreamAddr
		if addr == "" {
			addr = "127.0.0.1:0"
		}
		ss, err := newStreamServer(s, addr)
		if err != nil {
			conn.Close()
			return nil, err
		}
		s.stream = ss
	}
	return s, nil
}

// Register adds both CRI services to g.
func (s *Server) Register(g *grpc.Server) {
	runtimeapi.RegisterRuntimeServiceServer(g, s)
	runtimeapi.RegisterImageServiceServer(g, s)
}

// Serve serves the CRI on l until ctx is cancelled or the listener fails.
// On return the gRPC server is stopped (in-flight calls finish first).
func (s *Server) Serve(ctx context.Context, l net.Listener) error {
	g := grpc.NewServer(grpc.MaxRecvMsgSize(16 << 20))
	s.Register(g)
	errc := make(chan error, 1)
	go func() { errc <- g.Serve(l) }()
	select {
	case <-ctx.Done():
		g.GracefulStop()
		<-errc
		return nil
	case err := <-errc:
		return fmt.Errorf("cri: serve on %s: %w", l.Addr(), err)
	}
}

// Listen creates the unix socket path (0600), replacing a stale one.
func Listen(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return nil, fmt.Errorf("cri: socket dir for %q: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
		return nil, fmt.Errorf("cri: remove stale socket %q: %w", path, err)
	}
	l, err := net.Listen("unix", path)
	if err != nil {
		return nil, fmt.Errorf("cri: listen on %q: %w", path, err)
	}
	if err := os.Chmod(path, 0o600); err != nil {
		l.Close()
		return nil, fmt.Errorf("cri: chmod %q: %w", path, err)
	}
	return l, nil
}

// Close stops every container vhive runs (their pods stay in containerd),
// saves the state and closes the containerd connection.
func (s *Server) Close(ctx context.Context) error {
	s.mu.Lock()
	if s.closed {
		s.mu.Unlock()
		return nil
	}
	s.closed = true
	cs := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		cs = append(cs, c)
	}
	s.mu.Unlock()
	var errs []error
	for _, c := range cs {
		if err := s.destroy(ctx, c); err != nil {
			errs = append(errs, err)
		}
	}
	s.mu.Lock()
	for _, c := range cs {
		delete(s.containers, c.ID)
	}
	errs = append(errs, s.saveLocked())
	s.mu.Unlock()
	if s.oci != nil {
		// runsc keeps a "null-netns" bind mount in its root; nothing of
		// ours runs any more.
		_ = unix.Unmount(filepath.Join(s.oci.root, "null-netns"), unix.MNT_DETACH)
	}
	s.events.close()
	if s.stream != nil {
		errs = append(errs, s.stream.close(ctx))
	}
	errs = append(errs, s.conn.Close())
	return errors.Join(errs...)
}

func newID() string {
	b := make([]byte, 32)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}

// keyedMutex serialises work per key (a pod ID).
type keyedMutex struct {
	mu sync.Mutex
	m  map[string]*keyedEntry
}

type keyedEntry struct {
	mu   sync.Mutex
	refs int
}

func (k *keyedMutex) lock(key string) (unlock func()) {
	k.mu.Lock()
	if k.m == nil {
		k.m = map[string]*keyedEntry{}
	}
	e := k.m[key]
	if e == nil {
		e = &keyedEntry{}
		k.m[key] = e
	}
	e.refs++
	k.mu.Unlock()
	e.mu.Lock()
	return func() {
		e.mu.Unlock()
		k.mu.Lock()
		e.refs--
		if e.refs == 0 {
			delete(k.m, key)
		}
		k.mu.Unlock()
	}
}
