package cri

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/sandbox"
)

// errNotFound marks an unknown container ID.
var errNotFound = errors.New("not found")

// toStatus converts an error to a gRPC status (errors that already are one
// pass through).
func toStatus(err error) error {
	if err == nil {
		return nil
	}
	if _, ok := status.FromError(err); ok {
		return err
	}
	code := codes.Unknown
	switch {
	case errors.Is(err, errNotFound), errors.Is(err, image.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, image.ErrInvalid), errors.Is(err, image.ErrUnsafeLayer):
		code = codes.InvalidArgument
	case errors.Is(err, image.ErrUnavailable):
		code = codes.Unavailable
	case errors.Is(err, context.DeadlineExceeded):
		code = codes.DeadlineExceeded
	case errors.Is(err, context.Canceled):
		code = codes.Canceled
	case errors.Is(err, sandbox.ErrNotSupported):
		code = codes.Unimplemented
	}
	return status.Error(code, err.Error())
}

func (s *Server) lookup(id string) *container {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.containers[id]
}

// guestPort is the port a user-container's function listens on: vHive's
// GUEST_PORT, else Knative's PORT (what Knative tells an HTTP or h2c
// container from its declared port), else DefaultGuestPort.
func guestPort(envs []*runtimeapi.KeyValue) (int, error) {
	for _, key := range []string{EnvGuestPort, EnvPort} {
		v, ok := envValue(envs, key)
		if !ok {
			continue
		}
		n, err := strconv.Atoi(v)
		if err != nil || n <= 0 || n > 65535 {
			return 0, fmt.Errorf("%s=%q is not a port number", key, v)
		}
		return n, nil
	}
	return DefaultGuestPort, nil
}

func envValue(kvs []*runtimeapi.KeyValue, key string) (string, bool) {
	v, ok := "", false
	for _, kv := range kvs {
		if kv.GetKey() == key {
			v, ok = string(kv.GetValue()), true // the last one wins, as in a process env
		}
	}
	return v, ok
}

// mirror rewrites the registry host of ref per Config.RegistryMirrors.
func (s *Server) mirror(ref string) string {
	if len(s.cfg.RegistryMirrors) == 0 {
		return ref
	}
	host, rest, ok := strings.Cut(ref, "/")
	if !ok || !(strings.ContainsAny(host, ".:") || host == "localhost") {
		host, rest = "docker.io", ref
		if !strings.Contains(rest, "/") {
			rest = "library/" + rest
		}
	}
	if m, ok := s.cfg.RegistryMirrors[host]; ok {
		return m + "/" + rest
	}
	if m, ok := s.cfg.RegistryMirrors["*"]; ok {
		return m + "/" + rest
	}
	return ref
}

// imageRef picks the reference to pull for a container image spec: the
// user-specified name, else the image field; an image ID (sha256:...) is
// resolved to one of its names through containerd.
func (s *Server) imageRef(ctx context.Context, spec *runtimeapi.ImageSpec) (string, error) {
	ref := spec.GetUserSpecifiedImage()
	if ref == "" {
		ref = spec.GetImage()
	}
	if ref == "" {
		return "", status.Error(codes.InvalidArgument, "cri: container config has no image")
	}
	if !strings.HasPrefix(ref, "sha256:") && !isHex64(ref) {
		return ref, nil
	}
	st, err := s.img.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: &runtimeapi.ImageSpec{Image: ref}})
	if err != nil {
		return "", err
	}
	img := st.GetImage()
	if img == nil {
		return "", status.Errorf(codes.NotFound, "cri: image %q not found", ref)
	}
	if len(img.GetRepoTags()) > 0 {
		return img.GetRepoTags()[0], nil
	}
	if len(img.GetRepoDigests()) > 0 {
		return img.GetRepoDigests()[0], nil
	}
	return "", status.Errorf(codes.NotFound, "cri: image %q has no name to pull it by", ref)
}

// containerdImageID returns the image ID (config digest) and a repo digest
// containerd reports for spec, as kubelet expects them in container
// statuses; the manifest digest vhive pulled is the fallback.
func (s *Server) containerdImageID(ctx context.Context, spec *runtimeapi.ImageSpec, digest string) (id, ref string) {
	st, err := s.img.ImageStatus(ctx, &runtimeapi.ImageStatusRequest{Image: spec})
	if err != nil || st.GetImage() == nil {
		return digest, digest
	}
	id, ref = st.GetImage().GetId(), st.GetImage().GetId()
	if len(st.GetImage().GetRepoDigests()) > 0 {
		ref = st.GetImage().GetRepoDigests()[0]
	}
	return id, ref
}

func isHex64(s string) bool {
	if len(s) != 64 {
		return false
	}
	for _, c := range s {
		if !strings.ContainsRune("0123456789abcdef", c) {
			return false
		}
	}
	return true
}

func (s *Server) pull(ctx context.Context, ref string) (image.Image, error) {
	img, err := s.cfg.Images.Pull(ctx, s.mirror(ref))
	if err != nil {
		return img, toStatus(fmt.Errorf("cri: pull image %q: %w", ref, err))
	}
	return img, nil
}

// reserve claims the container name within its pod.
func (s *Server) reserve(podID string, md *runtimeapi.ContainerMetadata, id string) (string, error) {
	key := fmt.Sprintf("%s/%s/%d", podID, md.GetName(), md.GetAttempt())
	s.mu.Lock()
	defer s.mu.Unlock()
	if other, ok := s.names[key]; ok {
		return "", status.Errorf(codes.AlreadyExists, "cri: container name %q (attempt %d) is already used by container %q in pod %q", md.GetName(), md.GetAttempt(), other, podID)
	}
	s.names[key] = id
	return key, nil
}

func (s *Server) release(key string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.names, key)
}

// CreateContainer routes: containers of vhive pods and Knative
// user-containers to vhive, queue-proxy (with GUEST_ADDR/GUEST_PORT) and the
// rest to containerd.
func (s *Server) CreateContainer(ctx context.Context, req *runtimeapi.CreateContainerRequest) (*runtimeapi.CreateContainerResponse, error) {
	podID := req.GetPodSandboxId()
	cfg := req.GetConfig()
	if podID == "" {
		return nil, status.Error(codes.InvalidArgument, "cri: CreateContainer: pod_sandbox_id is empty")
	}
	if cfg.GetMetadata().GetName() == "" {
		return nil, status.Error(codes.InvalidArgument, "cri: CreateContainer: config.metadata.name is empty")
	}
	unlock := s.podLock.lock(podID)
	defer unlock()
	s.mu.Lock()
	p := s.pods[podID]
	s.mu.Unlock()
	name := cfg.GetMetadata().GetName()
	if p != nil {
		return s.createOCI(ctx, p, req)
	}
	if s.cfg.Functions != nil && name == UserContainer {
		if gi, ok := envValue(cfg.GetEnvs(), EnvGuestImage); ok {
			return s.createFunction(ctx, req, gi)
		}
	}
	if name == QueueProxy {
		for _, c := range s.podContainers(podID) {
			if c.Kind != kindFunction {
				continue
			}
			addr, port := splitEndpoint(c.Endpoint)
			fwd := proto.Clone(req).(*runtimeapi.CreateContainerRequest)
			fwd.Config.Envs = append(fwd.Config.Envs,
				&runtimeapi.KeyValue{Key: EnvGuestAddr, Value: []byte(addr)},
				&runtimeapi.KeyValue{Key: EnvGuestPort, Value: []byte(port)})
			s.log.Info("queue-proxy routed to function", "pod", podID, "function", c.ID, "addr", addr, "port", port)
			return s.rt.CreateContainer(ctx, fwd)
		}
	}
	return s.rt.CreateContainer(ctx, req)
}

func splitEndpoint(ep string) (addr, port string) {
	if strings.HasPrefix(ep, "unix://") {
		return ep, ""
	}
	h, p, err := net.SplitHostPort(ep)
	if err != nil {
		return ep, ""
	}
	return h, p
}

func (s *Server) logPath(podCfg *runtimeapi.PodSandboxConfig, cfg *runtimeapi.ContainerConfig) string {
	if cfg.GetLogPath() == "" {
		return ""
	}
	if filepath.IsAbs(cfg.GetLogPath()) {
		return cfg.GetLogPath()
	}
	if podCfg.GetLogDirectory() == "" {
		return ""
	}
	return filepath.Join(podCfg.GetLogDirectory(), cfg.GetLogPath())
}

// add records a new container and announces it.
func (s *Server) add(c *container) error {
	s.mu.Lock()
	s.containers[c.ID] = c
	err := s.saveLocked()
	if err != nil {
		delete(s.containers, c.ID)
	}
	s.mu.Unlock()
	if err != nil {
		return err
	}
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_CREATED_EVENT)
	return nil
}

func (s *Server) createOCI(ctx context.Context, p *pod, req *runtimeapi.CreateContainerRequest) (_ *runtimeapi.CreateContainerResponse, retErr error) {
	cfg := req.GetConfig()
	if cfg.GetImage() == nil {
		return nil, status.Error(codes.InvalidArgument, "cri: CreateContainer: config.image is empty")
	}
	id := newID()
	key, err := s.reserve(p.ID, cfg.GetMetadata(), id)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			s.release(key)
		}
	}()
	ref, err := s.imageRef(ctx, cfg.GetImage())
	if err != nil {
		return nil, err
	}
	for _, m := range cfg.GetMounts() {
		if m.GetImage().GetImage() != "" {
			return nil, status.Errorf(codes.Unimplemented, "cri: image volumes (mount %q from image %q) are not supported in vhive pods", m.GetContainerPath(), m.GetImage().GetImage())
		}
	}
	img, err := s.pull(ctx, ref)
	if err != nil {
		return nil, err
	}
	imageID, imageRef := s.containerdImageID(ctx, cfg.GetImage(), img.Digest)
	targetPid := 0
	if t := cfg.GetLinux().GetSecurityContext().GetNamespaceOptions().GetTargetId(); t != "" {
		tc := s.lookup(t)
		if tc == nil || tc.proc == nil {
			return nil, status.Errorf(codes.NotFound, "cri: pid namespace target container %q not found or not started", t)
		}
		targetPid = tc.proc.pid
	}
	spec, err := buildSpec(p, id, cfg, img, targetPid, filepath.Base(s.oci.bin) == "runc")
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "cri: container %q in pod %q: %v", cfg.GetMetadata().GetName(), p.ID, err)
	}
	outer := ""
	if limit := cfg.GetLinux().GetResources().GetMemoryLimitInBytes(); limit > 0 && cgroupV1() {
		outer = strings.TrimSuffix(spec.Linux.CgroupsPath, "/"+filepath.Base(spec.Linux.CgroupsPath)) + "/vhive-" + id[:12]
		if err := setupMemCgroup(outer, limit); err != nil {
			return nil, status.Errorf(codes.Internal, "cri: container %q: %v", id, err)
		}
		defer func() {
			if retErr != nil {
				_ = removeOuterCgroups(outer)
			}
		}()
		spec.Linux.CgroupsPath = outer + "/ctr"
		spec.Linux.Resources.Memory = nil
	}
	dir := filepath.Join(s.cfg.StateDir, "containers", id)
	b, err := prepareBundle(dir, img, spec)
	if err != nil {
		os.RemoveAll(dir)
		return nil, status.Errorf(codes.Internal, "cri: container %q: %v", id, err)
	}
	defer func() {
		if retErr != nil {
			_ = removeContainerDir(dir)
		}
	}()
	c := &container{
		ID: id, PodID: p.ID, Kind: kindOCI, Key: key, Config: cfg, ImageRef: imageRef, ImageID: imageID,
		LogPath: s.logPath(p.Config, cfg), Dir: dir, Cgroup: outer, CreatedAt: time.Now().UnixNano(),
		State: runtimeapi.ContainerState_CONTAINER_CREATED, bundle: b,
	}
	if err := s.add(c); err != nil {
		return nil, toStatus(err)
	}
	return &runtimeapi.CreateContainerResponse{ContainerId: id}, nil
}

func (s *Server) createFunction(ctx context.Context, req *runtimeapi.CreateContainerRequest, guestImage string) (_ *runtimeapi.CreateContainerResponse, retErr error) {
	cfg := req.GetConfig()
	podID := req.GetPodSandboxId()
	if guestImage == "" {
		return nil, status.Errorf(codes.InvalidArgument, "cri: %s in pod %q: env %s is empty", UserContainer, podID, EnvGuestImage)
	}
	if err := checkConfigEnv(cfg); err != nil {
		return nil, err
	}
	port, err := guestPort(cfg.GetEnvs())
	if err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "cri: %s in pod %q: %v", UserContainer, podID, err)
	}
	id := newID()
	key, err := s.reserve(podID, cfg.GetMetadata(), id)
	if err != nil {
		return nil, err
	}
	defer func() {
		if retErr != nil {
			s.release(key)
		}
	}()
	t0 := time.Now()
	img, err := s.pull(ctx, guestImage)
	if err != nil {
		return nil, err
	}
	stages := []stage{{"GetImage", time.Since(t0)}}
	function, _ := envValue(cfg.GetEnvs(), EnvRevision)
	if function == "" {
		function = req.GetSandboxConfig().GetMetadata().GetName()
	}
	env := mergeEnv(img.Config.Env, cfg.GetEnvs())
	if err := checkMergedEnv(env, guestImage); err != nil {
		return nil, status.Errorf(codes.InvalidArgument, "cri: %s in pod %q: %v", UserContainer, podID, err)
	}
	spec := sandbox.Spec{
		ID:          "cri-" + id[:16],
		Function:    function,
		ImageDigest: img.Digest,
		Rootfs:      img.Rootfs,
		Process: sandbox.Process{
			Args: append(append([]string{}, img.Config.Entrypoint...), img.Config.Cmd...),
			Env:  env,
			Cwd:  img.Config.WorkingDir,
			User: img.Config.User,
		},
		Port:       port,
		WasmModule: img.WasmModule,
	}
	if r := cfg.GetLinux().GetResources(); r != nil {
		spec.MemoryLimit = r.GetMemoryLimitInBytes()
		if r.GetCpuQuota() > 0 && r.GetCpuPeriod() > 0 {
			spec.CPULimit = float64(r.GetCpuQuota()) / float64(r.GetCpuPeriod())
		}
	}
	t1 := time.Now()
	sb, err := s.cfg.Functions.Create(ctx, spec)
	stages = append(stages, stage{"CreateSandbox", time.Since(t1)})
	if err != nil {
		return nil, toStatus(fmt.Errorf("cri: create function sandbox for %s=%q in pod %q: %w", EnvGuestImage, guestImage, podID, err))
	}
	defer func() {
		if retErr != nil {
			_ = sb.Stop(context.WithoutCancel(ctx))
		}
	}()
	c := &container{
		ID: id, PodID: podID, Kind: kindFunction, Key: key, Config: cfg, ImageRef: img.Digest, ImageID: img.Digest,
		LogPath: s.logPath(req.GetSandboxConfig(), cfg), Endpoint: sb.Endpoint(),
		CreatedAt: time.Now().UnixNano(), State: runtimeapi.ContainerState_CONTAINER_CREATED, sb: sb, stages: stages,
		podName: req.GetSandboxConfig().GetMetadata().GetName(),
	}
	if err := s.add(c); err != nil {
		return nil, toStatus(err)
	}
	s.log.Info("function sandbox created", "container", id, "pod", podID, "image", guestImage, "endpoint", c.Endpoint)
	return &runtimeapi.CreateContainerResponse{ContainerId: id}, nil
}

// StartContainer starts a vhive container or proxies.
func (s *Server) StartContainer(ctx context.Context, req *runtimeapi.StartContainerRequest) (*runtimeapi.StartContainerResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.StartContainer(ctx, req)
	}
	s.mu.Lock()
	if c.State != runtimeapi.ContainerState_CONTAINER_CREATED {
		st := c.State
		s.mu.Unlock()
		return nil, status.Errorf(codes.FailedPrecondition, "cri: container %q is %s, not CONTAINER_CREATED", c.ID, st)
	}
	c.State = runtimeapi.ContainerState_CONTAINER_UNKNOWN // starting
	s.mu.Unlock()
	logs, err := newLogWriter(c.LogPath)
	if err != nil {
		s.finish(c, 128, "StartError", err.Error())
		return nil, status.Errorf(codes.Internal, "cri: start container %q: %v", c.ID, err)
	}
	s.mu.Lock()
	c.logs = logs
	c.done = make(chan struct{})
	s.mu.Unlock()
	switch c.Kind {
	case kindOCI:
		proc, err := s.oci.start(ctx, c.ID, c.Dir, logs, c.Config.GetStdin())
		if err != nil {
			if proc != nil {
				go func() { <-proc.done; _ = s.oci.forceDelete(context.Background(), c.ID) }()
			}
			s.finish(c, 128, "StartError", err.Error())
			return nil, status.Error(codes.Unknown, err.Error())
		}
		s.mu.Lock()
		c.proc = proc
		s.mu.Unlock()
		var oom *oomWatch
		if c.Config.GetLinux().GetResources().GetMemoryLimitInBytes() > 0 && c.Cgroup == "" {
			if oom, err = s.oci.watchOOM(c.ID); err != nil {
				s.log.Warn("no OOM detection", "container", c.ID, "err", err)
			}
		}
		s.running(c)
		go func() {
			<-proc.done
			reason := "Completed"
			if proc.exit != 0 {
				reason = "Error"
			}
			if (oom != nil && oom.stop()) || (c.Cgroup != "" && proc.exit == 137 && oomKilled(c.Cgroup)) {
				reason = "OOMKilled"
			}
			msg := ""
			if proc.err != nil {
				msg = proc.err.Error()
			}
			s.finish(c, proc.exit, reason, msg)
		}()
	case kindFunction:
		t0 := time.Now()
		if err := c.sb.Start(ctx); err != nil {
			logs.message("vhive: start function sandbox: %v", err)
			_ = c.sb.Stop(context.WithoutCancel(ctx))
			s.finish(c, 128, "StartError", err.Error())
			return nil, toStatus(fmt.Errorf("cri: start function sandbox of container %q: %w", c.ID, err))
		}
		logs.message("vhive: function sandbox %s started, endpoint %s", c.sb.ID(), c.sb.Endpoint())
		// The node-local stages of the cold start (µs, vHive's names).
		attrs := []any{"container", c.ID, "pod", c.podName, "sandbox", c.sb.ID(), "endpoint", c.sb.Endpoint()}
		for _, st := range append(c.stages, stage{"StartSandbox", time.Since(t0)}) {
			attrs = append(attrs, st.name+"_us", st.d.Microseconds())
		}
		s.log.Info("function sandbox started", attrs...)
		s.running(c)
		go func() {
			<-c.sb.Done()
			exit, reason, msg := int32(0), "Completed", ""
			if err := c.sb.Err(); err != nil {
				exit, reason, msg = 1, "Error", err.Error()
				logs.message("vhive: function sandbox exited: %v", err)
			}
			s.finish(c, exit, reason, msg)
		}()
	}
	return &runtimeapi.StartContainerResponse{}, nil
}

func (s *Server) running(c *container) {
	s.mu.Lock()
	c.State = runtimeapi.ContainerState_CONTAINER_RUNNING
	c.StartedAt = time.Now().UnixNano()
	_ = s.saveLocked()
	s.mu.Unlock()
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT)
}

// finish records that c's process ended (once).
func (s *Server) finish(c *container, exit int32, reason, msg string) {
	s.mu.Lock()
	if c.State == runtimeapi.ContainerState_CONTAINER_EXITED {
		s.mu.Unlock()
		return
	}
	c.State = runtimeapi.ContainerState_CONTAINER_EXITED
	c.FinishedAt = time.Now().UnixNano()
	if c.StartedAt == 0 {
		c.StartedAt = c.FinishedAt
	}
	c.ExitCode, c.Reason, c.Message = exit, reason, msg
	_ = s.saveLocked()
	done := c.done
	s.mu.Unlock()
	if c.logs != nil {
		_ = c.logs.close()
	}
	if done != nil {
		close(done)
	}
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT)
}

// stop ends c's process: SIGTERM, then SIGKILL after timeout (seconds).
func (s *Server) stop(ctx context.Context, c *container, timeout int64) error {
	s.mu.Lock()
	st, done := c.State, c.done
	s.mu.Unlock()
	switch st {
	case runtimeapi.ContainerState_CONTAINER_CREATED:
		// Never started: nothing runs. A created function sandbox is stopped.
		if c.Kind == kindFunction && c.sb != nil {
			if err := c.sb.Stop(ctx); err != nil {
				return fmt.Errorf("cri: stop function sandbox of container %q: %w", c.ID, err)
			}
		}
		return nil
	case runtimeapi.ContainerState_CONTAINER_RUNNING:
	default:
		return nil
	}
	switch c.Kind {
	case kindFunction:
		if err := c.sb.Stop(ctx); err != nil {
			return fmt.Errorf("cri: stop function sandbox of container %q: %w", c.ID, err)
		}
	case kindOCI:
		if timeout > 0 {
			if err := s.oci.kill(ctx, c.ID, unix.SIGTERM, false); err == nil {
				t := time.NewTimer(time.Duration(timeout) * time.Second)
				select {
				case <-done:
				case <-t.C:
				case <-ctx.Done():
				}
				t.Stop()
			}
		}
		select {
		case <-done:
			return nil
		default:
		}
		if err := s.oci.kill(ctx, c.ID, unix.SIGKILL, true); err != nil {
			select {
			case <-done: // exited meanwhile
				return nil
			default:
			}
			s.log.Warn("kill container", "container", c.ID, "err", err)
		}
	}
	select {
	case <-done:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("cri: stop container %q: %w", c.ID, ctx.Err())
	}
}

// notFoundOK makes a stop or remove of something already gone succeed, as
// the CRI requires of these idempotent calls (containerd 1.6 says NotFound).
func notFoundOK[T any](resp *T, err error) (*T, error) {
	if status.Code(err) == codes.NotFound {
		return new(T), nil
	}
	return resp, err
}

func (s *Server) StopContainer(ctx context.Context, req *runtimeapi.StopContainerRequest) (*runtimeapi.StopContainerResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return notFoundOK(s.rt.StopContainer(ctx, req))
	}
	if err := s.stop(ctx, c, req.GetTimeout()); err != nil {
		return nil, toStatus(err)
	}
	return &runtimeapi.StopContainerResponse{}, nil
}

// destroy stops c and releases everything it holds (not its record).
func (s *Server) destroy(ctx context.Context, c *container) error {
	var errs []error
	if err := s.stop(ctx, c, 0); err != nil {
		errs = append(errs, err)
	}
	switch c.Kind {
	case kindOCI:
		if s.oci != nil {
			errs = append(errs, s.oci.forceDelete(ctx, c.ID))
		}
		errs = append(errs, removeContainerDir(c.Dir))
		if c.Cgroup != "" {
			errs = append(errs, removeOuterCgroups(c.Cgroup))
		}
	case kindFunction:
		if c.sb != nil {
			errs = append(errs, c.sb.Stop(ctx))
		}
	}
	return errors.Join(errs...)
}

func (s *Server) remove(ctx context.Context, c *container) error {
	if err := s.destroy(ctx, c); err != nil {
		return err
	}
	s.mu.Lock()
	delete(s.containers, c.ID)
	delete(s.names, c.Key)
	err := s.saveLocked()
	s.mu.Unlock()
	s.emit(c, runtimeapi.ContainerEventType_CONTAINER_DELETED_EVENT)
	return err
}

func (s *Server) RemoveContainer(ctx context.Context, req *runtimeapi.RemoveContainerRequest) (*runtimeapi.RemoveContainerResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return notFoundOK(s.rt.RemoveContainer(ctx, req))
	}
	if err := s.remove(ctx, c); err != nil {
		return nil, toStatus(err)
	}
	return &runtimeapi.RemoveContainerResponse{}, nil
}

func (s *Server) containerStatus(c *container) *runtimeapi.ContainerStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	cfg := c.Config
	st := &runtimeapi.ContainerStatus{
		Id:          c.ID,
		Metadata:    cfg.GetMetadata(),
		State:       c.State,
		CreatedAt:   c.CreatedAt,
		StartedAt:   c.StartedAt,
		FinishedAt:  c.FinishedAt,
		ExitCode:    c.ExitCode,
		Image:       cfg.GetImage(),
		ImageRef:    c.ImageRef,
		ImageId:     c.ImageID,
		Reason:      c.Reason,
		Message:     c.Message,
		Labels:      cfg.GetLabels(),
		Annotations: cfg.GetAnnotations(),
		Mounts:      cfg.GetMounts(),
		LogPath:     c.LogPath,
	}
	if st.State == runtimeapi.ContainerState_CONTAINER_UNKNOWN && c.StartedAt == 0 {
		st.State = runtimeapi.ContainerState_CONTAINER_CREATED // starting
	}
	if r := cfg.GetLinux().GetResources(); r != nil {
		st.Resources = &runtimeapi.ContainerResources{Linux: r}
	}
	return st
}

func (s *Server) ContainerStatus(ctx context.Context, req *runtimeapi.ContainerStatusRequest) (*runtimeapi.ContainerStatusResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.ContainerStatus(ctx, req)
	}
	resp := &runtimeapi.ContainerStatusResponse{Status: s.containerStatus(c)}
	if req.GetVerbose() {
		pid := 0
		if c.proc != nil {
			pid = c.proc.pid
		}
		resp.Info = map[string]string{"info": fmt.Sprintf(`{"pid":%d,"kind":%q,"endpoint":%q,"sandboxID":%q}`, pid, c.Kind, c.Endpoint, c.PodID)}
	}
	return resp, nil
}

func matchContainer(c *runtimeapi.Container, f *runtimeapi.ContainerFilter) bool {
	if f == nil {
		return true
	}
	if f.GetId() != "" && !strings.HasPrefix(c.GetId(), f.GetId()) {
		return false
	}
	if f.GetPodSandboxId() != "" && !strings.HasPrefix(c.GetPodSandboxId(), f.GetPodSandboxId()) {
		return false
	}
	if f.GetState() != nil && f.GetState().GetState() != c.GetState() {
		return false
	}
	for k, v := range f.GetLabelSelector() {
		if c.GetLabels()[k] != v {
			return false
		}
	}
	return true
}

func (s *Server) mine() []*container {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]*container, 0, len(s.containers))
	for _, c := range s.containers {
		out = append(out, c)
	}
	return out
}

// ListContainers merges containerd's containers with vhive's.
func (s *Server) ListContainers(ctx context.Context, req *runtimeapi.ListContainersRequest) (*runtimeapi.ListContainersResponse, error) {
	resp, err := s.rt.ListContainers(ctx, req)
	if err != nil {
		return nil, err
	}
	for _, c := range s.mine() {
		st := s.containerStatus(c)
		item := &runtimeapi.Container{
			Id: c.ID, PodSandboxId: c.PodID, Metadata: st.Metadata, Image: st.Image, ImageRef: st.ImageRef,
			ImageId: st.ImageId, State: st.State, CreatedAt: st.CreatedAt, Labels: st.Labels, Annotations: st.Annotations,
		}
		if matchContainer(item, req.GetFilter()) {
			resp.Containers = append(resp.Containers, item)
		}
	}
	return resp, nil
}

func (s *Server) stats(ctx context.Context, c *container) (*runtimeapi.ContainerStats, error) {
	st := s.containerStatus(c)
	now := time.Now().UnixNano()
	out := &runtimeapi.ContainerStats{
		Attributes: &runtimeapi.ContainerAttributes{Id: c.ID, Metadata: st.Metadata, Labels: st.Labels, Annotations: st.Annotations},
		Cpu:        &runtimeapi.CpuUsage{Timestamp: now},
		Memory:     &runtimeapi.MemoryUsage{Timestamp: now},
	}
	if st.State != runtimeapi.ContainerState_CONTAINER_RUNNING {
		return out, nil
	}
	switch c.Kind {
	case kindOCI:
		ost, err := s.oci.stats(ctx, c.ID)
		if err != nil {
			return nil, toStatus(fmt.Errorf("cri: stats of container %q: %w", c.ID, err))
		}
		ws := ost.MemoryUsage
		if ost.InactiveFile < ws {
			ws -= ost.InactiveFile
		}
		out.Cpu.UsageCoreNanoSeconds = &runtimeapi.UInt64Value{Value: ost.CPUTotal}
		out.Memory.WorkingSetBytes = &runtimeapi.UInt64Value{Value: ws}
		out.Memory.UsageBytes = &runtimeapi.UInt64Value{Value: ost.MemoryUsage}
		out.WritableLayer = &runtimeapi.FilesystemUsage{Timestamp: now, FsId: &runtimeapi.FilesystemIdentifier{Mountpoint: filepath.Join(c.Dir, "upper")}, UsedBytes: &runtimeapi.UInt64Value{Value: dirSize(filepath.Join(c.Dir, "upper"))}}
	case kindFunction:
		ss, err := c.sb.Stats(ctx)
		if err != nil {
			return nil, toStatus(fmt.Errorf("cri: stats of function container %q: %w", c.ID, err))
		}
		out.Memory.WorkingSetBytes = &runtimeapi.UInt64Value{Value: uint64(ss.RSS)}
		out.Memory.RssBytes = &runtimeapi.UInt64Value{Value: uint64(ss.RSS)}
	}
	return out, nil
}

func dirSize(dir string) uint64 {
	var n uint64
	_ = filepath.WalkDir(dir, func(_ string, d os.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			if fi, err := d.Info(); err == nil {
				n += uint64(fi.Size())
			}
		}
		return nil
	})
	return n
}

func (s *Server) ContainerStats(ctx context.Context, req *runtimeapi.ContainerStatsRequest) (*runtimeapi.ContainerStatsResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.ContainerStats(ctx, req)
	}
	st, err := s.stats(ctx, c)
	if err != nil {
		return nil, err
	}
	return &runtimeapi.ContainerStatsResponse{Stats: st}, nil
}

func (s *Server) ListContainerStats(ctx context.Context, req *runtimeapi.ListContainerStatsRequest) (*runtimeapi.ListContainerStatsResponse, error) {
	resp, err := s.rt.ListContainerStats(ctx, req)
	if err != nil {
		return nil, err
	}
	f := req.GetFilter()
	for _, c := range s.mine() {
		if f.GetId() != "" && !strings.HasPrefix(c.ID, f.GetId()) {
			continue
		}
		if f.GetPodSandboxId() != "" && !strings.HasPrefix(c.PodID, f.GetPodSandboxId()) {
			continue
		}
		match := true
		for k, v := range f.GetLabelSelector() {
			if c.Config.GetLabels()[k] != v {
				match = false
			}
		}
		if !match {
			continue
		}
		st, err := s.stats(ctx, c)
		if err != nil {
			continue // exited meanwhile
		}
		resp.Stats = append(resp.Stats, st)
	}
	return resp, nil
}

func (s *Server) UpdateContainerResources(ctx context.Context, req *runtimeapi.UpdateContainerResourcesRequest) (*runtimeapi.UpdateContainerResourcesResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.UpdateContainerResources(ctx, req)
	}
	if c.Kind != kindOCI {
		return nil, status.Errorf(codes.Unimplemented, "cri: container %q runs in a function sandbox, whose resources cannot be updated", c.ID)
	}
	r := req.GetLinux()
	if r == nil {
		return &runtimeapi.UpdateContainerResourcesResponse{}, nil
	}
	args := []string{"update"}
	if r.GetMemoryLimitInBytes() > 0 && c.Cgroup != "" {
		if err := setupMemCgroup(c.Cgroup, r.GetMemoryLimitInBytes()); err != nil {
			return nil, status.Errorf(codes.Internal, "cri: update memory of container %q: %v", c.ID, err)
		}
	} else if r.GetMemoryLimitInBytes() > 0 {
		args = append(args, "--memory", strconv.FormatInt(r.GetMemoryLimitInBytes(), 10))
	}
	if r.GetCpuQuota() != 0 {
		args = append(args, "--cpu-quota", strconv.FormatInt(r.GetCpuQuota(), 10))
	}
	if r.GetCpuPeriod() > 0 {
		args = append(args, "--cpu-period", strconv.FormatInt(r.GetCpuPeriod(), 10))
	}
	if r.GetCpuShares() > 0 {
		args = append(args, "--cpu-share", strconv.FormatInt(r.GetCpuShares(), 10))
	}
	if r.GetCpusetCpus() != "" {
		args = append(args, "--cpuset-cpus", r.GetCpusetCpus())
	}
	if len(args) > 1 {
		s.mu.Lock()
		running := c.State == runtimeapi.ContainerState_CONTAINER_RUNNING
		s.mu.Unlock()
		if running {
			if _, err := s.oci.output(ctx, append(args, c.ID)...); err != nil {
				return nil, status.Errorf(codes.Unknown, "cri: update resources of container %q: %v", c.ID, err)
			}
		}
	}
	s.mu.Lock()
	if c.Config.Linux == nil {
		c.Config.Linux = &runtimeapi.LinuxContainerConfig{}
	}
	c.Config.Linux.Resources = r
	_ = s.saveLocked()
	s.mu.Unlock()
	return &runtimeapi.UpdateContainerResourcesResponse{}, nil
}

func (s *Server) ReopenContainerLog(ctx context.Context, req *runtimeapi.ReopenContainerLogRequest) (*runtimeapi.ReopenContainerLogResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.ReopenContainerLog(ctx, req)
	}
	s.mu.Lock()
	running := c.State == runtimeapi.ContainerState_CONTAINER_RUNNING
	s.mu.Unlock()
	if !running {
		return nil, status.Errorf(codes.FailedPrecondition, "cri: container %q is not running", c.ID)
	}
	if err := c.logs.reopen(); err != nil {
		return nil, status.Errorf(codes.Internal, "cri: reopen log of container %q: %v", c.ID, err)
	}
	return &runtimeapi.ReopenContainerLogResponse{}, nil
}

func (s *Server) ExecSync(ctx context.Context, req *runtimeapi.ExecSyncRequest) (*runtimeapi.ExecSyncResponse, error) {
	c := s.lookup(req.GetContainerId())
	if c == nil {
		return s.rt.ExecSync(ctx, req)
	}
	if len(req.GetCmd()) == 0 {
		return nil, status.Error(codes.InvalidArgument, "cri: ExecSync: cmd is empty")
	}
	if c.Kind != kindOCI {
		return nil, status.Errorf(codes.Unimplemented, "cri: container %q runs in a function sandbox; exec is not supported there", c.ID)
	}
	s.mu.Lock()
	running := c.State == runtimeapi.ContainerState_CONTAINER_RUNNING
	s.mu.Unlock()
	if !running {
		return nil, status.Errorf(codes.FailedPrecondition, "cri: container %q is not running", c.ID)
	}
	out, errOut, exit, err := s.oci.execSync(ctx, c.ID, req.GetCmd(), time.Duration(req.GetTimeout())*time.Second)
	if err != nil {
		return nil, toStatus(err)
	}
	return &runtimeapi.ExecSyncResponse{Stdout: out, Stderr: errOut, ExitCode: exit}, nil
}

func (s *Server) CheckpointContainer(ctx context.Context, req *runtimeapi.CheckpointContainerRequest) (*runtimeapi.CheckpointContainerResponse, error) {
	if c := s.lookup(req.GetContainerId()); c != nil {
		return nil, status.Errorf(codes.Unimplemented, "cri: checkpointing vhive container %q through the CRI is not implemented", c.ID)
	}
	return s.rt.CheckpointContainer(ctx, req)
}

// Image service: proxied to containerd.

func (s *Server) ListImages(ctx context.Context, req *runtimeapi.ListImagesRequest) (*runtimeapi.ListImagesResponse, error) {
	return s.img.ListImages(ctx, req)
}

func (s *Server) ImageStatus(ctx context.Context, req *runtimeapi.ImageStatusRequest) (*runtimeapi.ImageStatusResponse, error) {
	return s.img.ImageStatus(ctx, req)
}

func (s *Server) PullImage(ctx context.Context, req *runtimeapi.PullImageRequest) (*runtimeapi.PullImageResponse, error) {
	return s.img.PullImage(ctx, req)
}

func (s *Server) RemoveImage(ctx context.Context, req *runtimeapi.RemoveImageRequest) (*runtimeapi.RemoveImageResponse, error) {
	return s.img.RemoveImage(ctx, req)
}

func (s *Server) ImageFsInfo(ctx context.Context, req *runtimeapi.ImageFsInfoRequest) (*runtimeapi.ImageFsInfoResponse, error) {
	return s.img.ImageFsInfo(ctx, req)
}

// StreamImages is not proxied (containerd 1.6 lacks it).
func (s *Server) StreamImages(req *runtimeapi.StreamImagesRequest, stream grpc.ServerStreamingServer[runtimeapi.StreamImagesResponse]) error {
	return status.Error(codes.Unimplemented, "cri: StreamImages is not implemented; use ListImages")
}
