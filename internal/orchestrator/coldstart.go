package orchestrator

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"sort"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/connectivity"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/sandbox"
)

// SnapshotKey identifies the snapshot of one function revision: anything
// that changes what an instance is changes the key.
type SnapshotKey struct {
	Function    string
	ImageDigest string
	Backend     string
	// Config is a hash of the instance configuration (port, env, limits).
	Config string
}

// Snapshot is a committed snapshot.
type Snapshot struct {
	ID  string
	Dir string
	// WorkingSet is where the REAP working-set file lives (it exists when
	// HasWorkingSet).
	WorkingSet    string
	HasWorkingSet bool
}

// SnapshotStore is what the orchestrator needs of the snapshot store.
type SnapshotStore interface {
	// Get returns the usable snapshot for key. It wraps ErrNotFound when
	// there is none; any other error says why the one there is unusable
	// (corrupt, incomplete, incompatible) and the caller boots instead.
	Get(ctx context.Context, key SnapshotKey) (Snapshot, error)
	// Create runs write on a fresh directory and commits it atomically as
	// the snapshot for key. If another Create for key is under way or done,
	// it returns the existing snapshot without calling write.
	Create(ctx context.Context, key SnapshotKey, write func(ctx context.Context, dir string) error) (Snapshot, error)
	// CommitWorkingSet records that the working-set file of snap has been
	// written (REAP record phase finished).
	CommitWorkingSet(ctx context.Context, snap Snapshot) error
	// Verify re-reads every file of snap and checks it against its
	// recorded checksums (whatever was verified before). It returns nil
	// when they are intact and an error wrapping sandbox.ErrBadSnapshot
	// when a file is missing or does not match; any other error (ctx
	// ended) says nothing about the files.
	Verify(ctx context.Context, snap Snapshot) error
	// Invalidate removes a snapshot found unusable, so a fresh one is taken.
	Invalidate(ctx context.Context, key SnapshotKey, why string) error
	// RemoveFunction removes every snapshot of a function.
	RemoveFunction(ctx context.Context, function string) error
}

// coldStart accumulates the stages of one cold start.
type coldStart struct {
	begin  time.Time
	stages []Stage
	memory map[string]int64
}

func (cs *coldStart) add(name string, d time.Duration) {
	cs.stages = append(cs.stages, Stage{Name: name, Duration: d})
}

func (cs *coldStart) time(name string, fn func() error) error {
	t := time.Now()
	err := fn()
	cs.add(name, time.Since(t))
	return err
}

func (f *function) snapshotKey(img Image) SnapshotKey {
	h := sha256.New()
	fmt.Fprintf(h, "port=%d\nmem=%d\ncpu=%g\n", f.spec.Port, f.spec.MemoryMiB, f.spec.CPU)
	if f.spec.Protocol == ProtocolHTTP { // gRPC functions keep the keys they had before protocols
		fmt.Fprintf(h, "protocol=http\n")
	}
	keys := make([]string, 0, len(f.spec.Env))
	for k := range f.spec.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		fmt.Fprintf(h, "env %s=%s\n", k, f.spec.Env[k])
	}
	return SnapshotKey{Function: f.spec.Name, ImageDigest: img.Digest, Backend: f.spec.Sandbox, Config: hex.EncodeToString(h.Sum(nil))[:16]}
}

// processEnv is the environment of spec's instances of img: the image's,
// overridden by the function's, and GUEST_PORT.
func processEnv(spec FunctionSpec, img Image) []string {
	env := append([]string(nil), img.Env...)
	keys := make([]string, 0, len(spec.Env))
	for k := range spec.Env {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		env = setEnv(env, k, spec.Env[k])
	}
	env = setEnv(env, "GUEST_PORT", fmt.Sprint(spec.Port))
	if spec.Protocol == ProtocolHTTP {
		env = setEnv(env, "PORT", fmt.Sprint(spec.Port)) // Knative's contract
	}
	return env
}

func (f *function) sandboxSpec(id string, img Image) sandbox.Spec {
	env := processEnv(f.spec, img)
	args := append(append([]string(nil), img.Entrypoint...), img.Cmd...)
	cwd := img.WorkingDir
	if cwd == "" {
		cwd = "/"
	}
	return sandbox.Spec{
		ID:          id,
		Function:    f.spec.Name,
		ImageDigest: img.Digest,
		Rootfs:      img.Rootfs,
		Process:     sandbox.Process{Args: args, Env: env, Cwd: cwd, User: img.User},
		Port:        f.spec.Port,
		MemoryLimit: f.spec.MemoryMiB << 20,
		CPULimit:    f.spec.CPU,
		WasmModule:  img.WasmModule,
	}
}

func setEnv(env []string, k, v string) []string {
	for i, kv := range env {
		if strings.HasPrefix(kv, k+"=") {
			env[i] = k + "=" + v
			return env
		}
	}
	return append(env, k+"="+v)
}

// start runs one cold start: boot, or restore from a snapshot when the
// function's start mode asks for it and a usable snapshot exists.
func (f *function) start(ctx context.Context) (*instance, *coldStart, error) {
	cs := &coldStart{begin: time.Now()}
	var img Image
	err := cs.time("GetImage", func() error {
		var err error
		img, err = f.o.cfg.Images.Resolve(ctx, f.spec.Image)
		return err
	})
	if err != nil {
		return nil, nil, fmt.Errorf("%w: function %q: image %q: %v", ErrStartFailed, f.spec.Name, f.spec.Image, err)
	}
	if img.Digest != f.spec.ImageDigest {
		f.o.log.Warn("image digest changed since deploy; using the current one", "function", f.spec.Name, "deployed", f.spec.ImageDigest, "now", img.Digest)
	}
	be := f.o.cfg.Backends[f.spec.Sandbox]
	id := newInstanceID(f.spec.Name)
	spec := f.sandboxSpec(id, img)
	// Checked at deploy too; the image may have changed since.
	if err := checkExecEnv(spec.Process.Env); err != nil {
		return nil, nil, fmt.Errorf("%w: function %q: image %q: %w", ErrStartFailed, f.spec.Name, f.spec.Image, err)
	}

	var sb sandbox.Sandbox
	mode := ModeBoot
	if f.spec.StartMode != ModeBoot && f.o.cfg.Snapshots != nil {
		sb, mode = f.tryRestore(ctx, cs, be, spec, img)
	}
	if sb == nil {
		mode = ModeBoot
		err = cs.time("CreateSandbox", func() error {
			var err error
			sb, err = be.Create(ctx, spec)
			return err
		})
		if err != nil {
			return nil, nil, fmt.Errorf("%w: function %q: create %s sandbox: %v", ErrStartFailed, f.spec.Name, f.spec.Sandbox, err)
		}
		err = cs.time("StartSandbox", func() error { return sb.Start(ctx) })
		if err != nil {
			f.stopSandbox(sb)
			return nil, nil, fmt.Errorf("%w: function %q: start %s sandbox: %v", ErrStartFailed, f.spec.Name, f.spec.Sandbox, err)
		}
	}
	in := &instance{id: id, sb: sb, startMode: mode, started: time.Now(), persisted: make(chan struct{})}
	// The record a restarted daemon cleans up after is a bbolt commit with
	// fsync (tens of ms after a page cache drop on a busy disk): it is
	// written while the function client connects and the first request
	// runs, and the reply waits for it.
	go func() {
		defer close(in.persisted)
		f.persistInstance(in)
	}()
	err = cs.time("ConnectFuncClient", func() error { return f.connect(ctx, in) })
	if err != nil {
		f.stopSandbox(sb)
		<-in.persisted
		if derr := f.o.cfg.Store.DeleteInstance(id); derr != nil {
			f.o.log.Warn("forget instance", "instance", id, "err", derr)
		}
		// Both classes: an instance killed at its memory limit while
		// starting is reported as out of memory.
		return nil, nil, fmt.Errorf("%w: function %q: %w", ErrStartFailed, f.spec.Name, err)
	}
	f.o.log.Info("instance started", "function", f.spec.Name, "instance", id, "mode", mode, "endpoint", sb.Endpoint())
	return in, cs, nil
}

func (f *function) stopSandbox(sb sandbox.Sandbox) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := sb.Stop(ctx); err != nil {
		f.o.log.Error("stop sandbox after failed start", "function", f.spec.Name, "instance", sb.ID(), "err", err)
	}
}

// tryRestore restores from the function's snapshot if there is a usable one.
// It returns a nil sandbox when the caller must boot; the reason is logged
// and counted.
func (f *function) tryRestore(ctx context.Context, cs *coldStart, be sandbox.Backend, spec sandbox.Spec, img Image) (sandbox.Sandbox, string) {
	restorer, ok := be.(sandbox.Restorer)
	if !ok {
		return nil, ModeBoot
	}
	key := f.snapshotKey(img)
	var snap Snapshot
	err := cs.time("GetSnapshot", func() error {
		var err error
		snap, err = f.o.cfg.Snapshots.Get(ctx, key)
		return err
	})
	if errors.Is(err, ErrNotFound) {
		return nil, ModeBoot // the first cold start boots; a snapshot follows
	}
	if err != nil {
		f.fallback(ctx, key, "unusable", err)
		return nil, ModeBoot
	}
	opts := sandbox.RestoreOptions{WorkingSet: snap.WorkingSet}
	mode := f.spec.StartMode
	switch f.spec.StartMode {
	case ModeSnapshot:
		opts.Mode = sandbox.MemoryEager
	case ModeLazy:
		opts.Mode = sandbox.MemoryLazy
	case ModeReap:
		f.mu.Lock()
		switch {
		case snap.HasWorkingSet:
			opts.Mode, mode = sandbox.MemoryPrefetch, "reap-prefetch"
		case !f.recording:
			f.recording = true
			opts.Mode, mode = sandbox.MemoryRecord, "reap-record"
		default:
			// Another instance is recording; serve this one lazily.
			opts.Mode, mode = sandbox.MemoryLazy, ModeLazy
		}
		f.mu.Unlock()
	}
	var sb sandbox.Sandbox
	err = cs.time("RestoreSandbox", func() error {
		var err error
		sb, err = restorer.Restore(ctx, spec, snap.Dir, opts)
		return err
	})
	if err != nil {
		if opts.Mode == sandbox.MemoryRecord {
			f.mu.Lock()
			f.recording = false
			f.mu.Unlock()
		}
		f.restoreFailed(ctx, key, snap, err)
		return nil, ModeBoot
	}
	return sb, mode
}

// restoreFailed handles a failed Restore: the cold start boots instead. The
// snapshot is removed only when its files are shown to be bad — the backend
// said so (sandbox.ErrBadSnapshot), or they fail their checksums now. A
// fault of the sandbox itself (its process killed mid-restore, the context
// ended) keeps it: the next cold start restores from it again.
func (f *function) restoreFailed(ctx context.Context, key SnapshotKey, snap Snapshot, err error) {
	if errors.Is(err, sandbox.ErrBadSnapshot) {
		f.fallback(ctx, key, "restore-failed", err)
		return
	}
	// Verified even when the request has ended: whether the files are bad
	// does not depend on it, and the check is bounded by their size.
	verr := f.o.cfg.Snapshots.Verify(context.WithoutCancel(ctx), snap)
	if errors.Is(verr, sandbox.ErrBadSnapshot) {
		f.fallback(ctx, key, "restore-failed", fmt.Errorf("%w; then its files failed verification: %w", err, verr))
		return
	}
	files := "verified intact"
	if verr != nil {
		files = fmt.Sprintf("not verified: %v", verr)
	}
	f.o.log.Warn("restore from snapshot failed; booting instead, snapshot kept", "function", f.spec.Name,
		"reason", "restore-failed", "snapshot", snap.ID, "files", files, "err", err)
	f.o.cfg.Metrics.fallback(f.spec.Name, "restore-failed")
}

// fallback removes an unusable snapshot; the cold start boots instead.
func (f *function) fallback(ctx context.Context, key SnapshotKey, reason string, err error) {
	f.o.log.Warn("snapshot not usable; booting instead", "function", f.spec.Name, "reason", reason, "err", err)
	f.o.cfg.Metrics.fallback(f.spec.Name, reason)
	if ierr := f.o.cfg.Snapshots.Invalidate(context.WithoutCancel(ctx), key, fmt.Sprintf("%s: %v", reason, err)); ierr != nil {
		f.o.log.Warn("invalidate snapshot", "function", f.spec.Name, "err", ierr)
	}
}

// afterFirstInvocation implements vHive's snapshot policy: after the first
// successful invocation of a booted instance (a failed one is logged at WARN
// and leaves the snapshot to the next success), pause it, snapshot it and let
// it continue; requests arriving meanwhile wait for it up to a bound
// (snapshotWaitLocked); after the first invocation of a recording instance, write the
// working set. Neither delays the reply that triggered it.
func (f *function) afterFirstInvocation(in *instance) {
	if f.spec.StartMode == ModeBoot || f.o.cfg.Snapshots == nil {
		return
	}
	if rec, ok := in.sb.(sandbox.Recorder); ok && in.startMode == "reap-record" {
		go f.finishRecord(in, rec)
		return
	}
	if in.startMode != ModeBoot {
		return
	}
	snapper, ok := in.sb.(sandbox.Snapshotter)
	if !ok {
		return
	}
	f.mu.Lock()
	if f.snapshotting || in.stopping {
		f.mu.Unlock()
		return
	}
	f.snapshotting = true
	f.snapshotStart = time.Now()
	in.held = true
	f.mu.Unlock()
	go f.takeSnapshot(in, snapper)
}

func (f *function) takeSnapshot(in *instance, snapper sandbox.Snapshotter) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	defer func() {
		f.mu.Lock()
		f.snapshotting = false
		in.held = false
		f.broadcast()
		f.mu.Unlock()
	}()
	// Wait for requests already on the instance to finish: snapshots are
	// taken at a quiescent point.
	for {
		f.mu.Lock()
		busy, ch, stopping := in.inflight, f.changed, in.stopping
		f.mu.Unlock()
		if stopping {
			return
		}
		if busy == 0 {
			break
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return
		}
	}
	img, err := f.o.cfg.Images.Resolve(ctx, f.spec.Image)
	if err != nil {
		f.o.log.Warn("snapshot skipped: image", "function", f.spec.Name, "err", err)
		return
	}
	key := f.snapshotKey(img)
	t := time.Now()
	snap, err := f.o.cfg.Snapshots.Create(ctx, key, func(ctx context.Context, dir string) error {
		return snapper.Snapshot(ctx, dir)
	})
	if err != nil {
		f.o.log.Warn("snapshot failed", "function", f.spec.Name, "instance", in.id, "err", err)
		return
	}
	f.o.log.Info("snapshot taken", "function", f.spec.Name, "instance", in.id, "snapshot", snap.ID, "took", time.Since(t))
}

func (f *function) finishRecord(in *instance, rec sandbox.Recorder) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	defer func() {
		f.mu.Lock()
		f.recording = false
		f.mu.Unlock()
	}()
	if err := rec.FinishRecord(ctx); err != nil {
		f.o.log.Warn("REAP record: writing the working set failed", "function", f.spec.Name, "instance", in.id, "err", err)
		return
	}
	img, err := f.o.cfg.Images.Resolve(ctx, f.spec.Image)
	if err != nil {
		return
	}
	snap, err := f.o.cfg.Snapshots.Get(ctx, f.snapshotKey(img))
	if err != nil {
		f.o.log.Warn("REAP record: snapshot vanished", "function", f.spec.Name, "err", err)
		return
	}
	if err := f.o.cfg.Snapshots.CommitWorkingSet(ctx, snap); err != nil {
		f.o.log.Warn("REAP record: commit working set", "function", f.spec.Name, "err", err)
		return
	}
	f.o.log.Info("REAP working set recorded", "function", f.spec.Name, "instance", in.id)
}

// connect dials the function's gRPC server and waits until it accepts
// connections, the sandbox exits, or ReadyTimeout passes.
func (f *function) connect(ctx context.Context, in *instance) error {
	ctx, cancel := context.WithTimeout(ctx, f.o.cfg.ReadyTimeout)
	defer cancel()
	ep := in.sb.Endpoint()
	network, addr, target := "tcp", ep, "passthrough:///"+ep
	if p, ok := strings.CutPrefix(ep, "unix://"); ok {
		network, addr, target = "unix", p, ep
	}
	// Poll until the function listens: a refused connection costs
	// microseconds, where gRPC's reconnect backoff would cost a second.
	// A dial also ends when the sandbox does: an address nobody answers
	// for (a gVisor sandbox that exited takes its netstack, and so its ARP
	// replies, with it) would otherwise block until ReadyTimeout.
	dialCtx, stopDial := context.WithCancel(ctx)
	defer stopDial()
	go func() {
		select {
		case <-in.sb.Done():
			stopDial()
		case <-dialCtx.Done():
		}
	}()
	exited := func() error {
		if errors.Is(in.sb.Err(), sandbox.ErrOutOfMemory) {
			return fmt.Errorf("%w: instance %q was killed at its memory limit of %d MiB before its function listened on %s: %v", ErrOutOfMemory, in.id, f.spec.MemoryMiB, ep, in.sb.Err())
		}
		return fmt.Errorf("instance %q exited before its function listened on %s: %v", in.id, ep, in.sb.Err())
	}
	var d net.Dialer
	for {
		c, err := d.DialContext(dialCtx, network, addr)
		if err == nil {
			c.Close()
			break
		}
		select {
		case <-in.sb.Done(): // first: a dial cut short by the exit
			return exited()
		default:
		}
		select {
		case <-in.sb.Done():
			return exited()
		case <-ctx.Done():
			return fmt.Errorf("instance %q: function never listened on %s within %s (last error: %v)", in.id, ep, f.o.cfg.ReadyTimeout, err)
		case <-time.After(time.Millisecond):
		}
	}
	if f.spec.Protocol == ProtocolHTTP {
		return f.connectHTTP(ctx, in, network, addr)
	}
	conn, err := grpc.NewClient(target,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		// The instance is on this node: never through the daemon's
		// $HTTPS_PROXY, which is for pulling images.
		grpc.WithNoProxy(),
		grpc.WithStatsHandler(answerTracker{}),
		grpc.WithConnectParams(grpc.ConnectParams{
			Backoff:           backoff.Config{BaseDelay: 5 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 200 * time.Millisecond},
			MinConnectTimeout: time.Second,
		}))
	if err != nil {
		return fmt.Errorf("instance %q: gRPC client for %s: %w", in.id, ep, err)
	}
	conn.Connect()
	for st := conn.GetState(); st != connectivity.Ready; st = conn.GetState() {
		if !conn.WaitForStateChange(ctx, st) {
			conn.Close()
			return fmt.Errorf("instance %q: gRPC connection to %s not ready within %s (state %s)", in.id, ep, f.o.cfg.ReadyTimeout, st)
		}
	}
	if err := f.waitHealthy(ctx, in, conn); err != nil {
		conn.Close()
		return err
	}
	in.conn = conn
	in.client = helloworld.NewGreeterClient(conn)
	return nil
}

// waitHealthy waits until a gRPC function reports SERVING on the standard
// health service (grpc.health.v1, the server as a whole); a function that
// serves no health service is ready once it accepts connections.
func (f *function) waitHealthy(ctx context.Context, in *instance, conn *grpc.ClientConn) error {
	hc := healthpb.NewHealthClient(conn)
	for {
		resp, err := hc.Check(ctx, &healthpb.HealthCheckRequest{})
		switch {
		case status.Code(err) == codes.Unimplemented:
			return nil
		case err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING:
			return nil
		}
		select {
		case <-in.sb.Done():
			return fmt.Errorf("instance %q exited before it reported healthy: %v", in.id, in.sb.Err())
		case <-ctx.Done():
			return fmt.Errorf("instance %q: not SERVING on the gRPC health service within %s (last: %v, %v)", in.id, f.o.cfg.ReadyTimeout, resp.GetStatus(), err)
		case <-time.After(2 * time.Millisecond):
		}
	}
}

// connectHTTP makes the HTTP client of an HTTP function and, with a
// readiness path, waits until a GET of it answers 2xx or 3xx.
func (f *function) connectHTTP(ctx context.Context, in *instance, network, addr string) error {
	var d net.Dialer
	tr := &http.Transport{
		DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
			return d.DialContext(ctx, network, addr)
		},
		MaxIdleConnsPerHost: f.spec.Concurrency,
		IdleConnTimeout:     f.spec.Keepalive,
	}
	host := addr
	if network == "unix" {
		host = "localhost"
	}
	in.url = &url.URL{Scheme: "http", Host: host}
	in.transport = tr
	if f.spec.ReadinessPath == "" {
		return nil
	}
	probe := in.url.JoinPath()
	probe.Path, probe.RawQuery, _ = strings.Cut(f.spec.ReadinessPath, "?")
	var last string
	for {
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, probe.String(), nil)
		if err != nil {
			return fmt.Errorf("%w: readiness path %q: %v", ErrInvalid, f.spec.ReadinessPath, err)
		}
		resp, err := tr.RoundTrip(req)
		if err == nil {
			_, _ = io.Copy(io.Discard, io.LimitReader(resp.Body, 64<<10))
			resp.Body.Close()
			if resp.StatusCode >= 200 && resp.StatusCode < 400 {
				return nil
			}
			last = resp.Status
		} else {
			last = err.Error()
		}
		select {
		case <-in.sb.Done():
			tr.CloseIdleConnections()
			return fmt.Errorf("instance %q exited before GET %s answered: %v", in.id, f.spec.ReadinessPath, in.sb.Err())
		case <-ctx.Done():
			tr.CloseIdleConnections()
			return fmt.Errorf("instance %q: GET %s did not answer 2xx/3xx within %s (last: %s)", in.id, f.spec.ReadinessPath, f.o.cfg.ReadyTimeout, last)
		case <-time.After(2 * time.Millisecond):
		}
	}
}
