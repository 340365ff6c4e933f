package cri

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
)

// RunPodSandbox creates pods of Config.RuntimeHandler as containerd pods of
// Config.PodHandler and remembers them as vhive's; every other pod is
// proxied unchanged.
func (s *Server) RunPodSandbox(ctx context.Context, req *runtimeapi.RunPodSandboxRequest) (_ *runtimeapi.RunPodSandboxResponse, retErr error) {
	md := req.GetConfig().GetMetadata()
	if md.GetName() == "" || md.GetNamespace() == "" || md.GetUid() == "" {
		return nil, status.Errorf(codes.InvalidArgument, "cri: pod sandbox config must have metadata name, namespace and uid (got %v)", md)
	}
	if req.GetRuntimeHandler() != s.cfg.RuntimeHandler {
		return s.rt.RunPodSandbox(ctx, req)
	}
	if s.oci == nil {
		return nil, status.Errorf(codes.InvalidArgument, "cri: runtime handler %q is disabled: the daemon has no OCI runtime configured", req.GetRuntimeHandler())
	}
	fwd := proto.Clone(req).(*runtimeapi.RunPodSandboxRequest)
	fwd.RuntimeHandler = s.cfg.PodHandler
	resp, err := s.rt.RunPodSandbox(ctx, fwd)
	if err != nil {
		return nil, err
	}
	id := resp.GetPodSandboxId()
	defer func() {
		if retErr == nil {
			return
		}
		// Roll back on a fresh context: the request's may be cancelled.
		rctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 30*time.Second)
		defer cancel()
		if _, err := s.rt.StopPodSandbox(rctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: id}); err != nil {
			s.log.Warn("rollback: stop pod sandbox", "pod", id, "err", err)
		}
		if _, err := s.rt.RemovePodSandbox(rctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: id}); err != nil {
			s.log.Warn("rollback: remove pod sandbox", "pod", id, "err", err)
		}
	}()
	netns, pid, err := s.podNamespaces(ctx, id)
	if err != nil {
		return nil, status.Errorf(codes.Internal, "cri: pod %q: %v", id, err)
	}
	dir := filepath.Join(s.cfg.StateDir, "pods", id)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return nil, status.Errorf(codes.Internal, "cri: pod %q: %v", id, err)
	}
	if err := writePodFiles(dir, req.GetConfig()); err != nil {
		os.RemoveAll(dir)
		return nil, status.Errorf(codes.Internal, "cri: pod %q: %v", id, err)
	}
	p := &pod{ID: id, Name: md.GetName(), Namespace: md.GetNamespace(), UID: md.GetUid(), Dir: dir, NetNS: netns, PausePID: pid, Config: req.GetConfig()}
	s.mu.Lock()
	s.pods[id] = p
	err = s.saveLocked()
	if err != nil {
		delete(s.pods, id)
	}
	s.mu.Unlock()
	if err != nil {
		os.RemoveAll(dir)
		return nil, status.Errorf(codes.Internal, "cri: pod %q: %v", id, err)
	}
	s.log.Info("vhive pod created", "pod", id, "name", md.GetNamespace()+"/"+md.GetName(), "netns", netns)
	return resp, nil
}

// podNamespaces reads the pod's network namespace path and pause pid from
// containerd's verbose status.
func (s *Server) podNamespaces(ctx context.Context, id string) (string, int, error) {
	st, err := s.rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: id, Verbose: true})
	if err != nil {
		return "", 0, fmt.Errorf("containerd status: %w", err)
	}
	var info struct {
		Pid         int `json:"pid"`
		RuntimeSpec struct {
			Linux struct {
				Namespaces []struct {
					Type string `json:"type"`
					Path string `json:"path"`
				} `json:"namespaces"`
			} `json:"linux"`
		} `json:"runtimeSpec"`
	}
	raw, ok := st.GetInfo()["info"]
	if !ok {
		return "", 0, errors.New("containerd's verbose pod status has no \"info\"")
	}
	if err := json.Unmarshal([]byte(raw), &info); err != nil {
		return "", 0, fmt.Errorf("decode containerd's pod info: %w", err)
	}
	if info.Pid <= 0 {
		return "", 0, fmt.Errorf("containerd reports no pause pid")
	}
	netns := ""
	for _, n := range info.RuntimeSpec.Linux.Namespaces {
		if n.Type == "network" {
			netns = n.Path
		}
	}
	if netns == "" {
		netns = nsPath(info.Pid, "net") // host-network pods share the pause's (the host's)
	}
	return netns, info.Pid, nil
}

func (s *Server) podContainers(podID string) []*container {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []*container
	for _, c := range s.containers {
		if c.PodID == podID {
			out = append(out, c)
		}
	}
	return out
}

// StopPodSandbox stops vhive's containers of the pod, then the pod.
func (s *Server) StopPodSandbox(ctx context.Context, req *runtimeapi.StopPodSandboxRequest) (*runtimeapi.StopPodSandboxResponse, error) {
	if req.GetPodSandboxId() == "" {
		return nil, status.Error(codes.InvalidArgument, "cri: StopPodSandbox: pod_sandbox_id is empty")
	}
	for _, c := range s.podContainers(req.GetPodSandboxId()) {
		if err := s.stop(ctx, c, 0); err != nil {
			return nil, toStatus(err)
		}
	}
	return notFoundOK(s.rt.StopPodSandbox(ctx, req))
}

// RemovePodSandbox removes vhive's containers of the pod, then the pod.
func (s *Server) RemovePodSandbox(ctx context.Context, req *runtimeapi.RemovePodSandboxRequest) (*runtimeapi.RemovePodSandboxResponse, error) {
	id := req.GetPodSandboxId()
	if id == "" {
		return nil, status.Error(codes.InvalidArgument, "cri: RemovePodSandbox: pod_sandbox_id is empty")
	}
	for _, c := range s.podContainers(id) {
		if err := s.remove(ctx, c); err != nil {
			return nil, toStatus(err)
		}
	}
	resp, err := notFoundOK(s.rt.RemovePodSandbox(ctx, req))
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	p, ok := s.pods[id]
	if ok {
		delete(s.pods, id)
		err = s.saveLocked()
	}
	s.mu.Unlock()
	if ok {
		os.RemoveAll(p.Dir)
	}
	if err != nil {
		return nil, toStatus(err)
	}
	return resp, nil
}

func (s *Server) isVhivePod(id string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.pods[id]
	return ok
}

// PodSandboxStatus reports containerd's status, with vhive's runtime handler
// and container statuses for vhive pods.
func (s *Server) PodSandboxStatus(ctx context.Context, req *runtimeapi.PodSandboxStatusRequest) (*runtimeapi.PodSandboxStatusResponse, error) {
	resp, err := s.rt.PodSandboxStatus(ctx, req)
	if err != nil {
		return nil, err
	}
	if s.isVhivePod(req.GetPodSandboxId()) && resp.GetStatus() != nil {
		resp.Status.RuntimeHandler = s.cfg.RuntimeHandler
	}
	for _, c := range s.podContainers(resp.GetStatus().GetId()) {
		resp.ContainersStatuses = append(resp.ContainersStatuses, s.containerStatus(c))
	}
	return resp, nil
}

// ListPodSandbox lists containerd's pods with vhive's runtime handler set on
// vhive pods.
func (s *Server) ListPodSandbox(ctx context.Context, req *runtimeapi.ListPodSandboxRequest) (*runtimeapi.ListPodSandboxResponse, error) {
	resp, err := s.rt.ListPodSandbox(ctx, req)
	if err != nil {
		return nil, err
	}
	for _, p := range resp.GetItems() {
		if s.isVhivePod(p.GetId()) {
			p.RuntimeHandler = s.cfg.RuntimeHandler
		}
	}
	return resp, nil
}

// Everything else about pods goes to containerd.

func (s *Server) PortForward(ctx context.Context, req *runtimeapi.PortForwardRequest) (*runtimeapi.PortForwardResponse, error) {
	return s.rt.PortForward(ctx, req)
}

func (s *Server) PodSandboxStats(ctx context.Context, req *runtimeapi.PodSandboxStatsRequest) (*runtimeapi.PodSandboxStatsResponse, error) {
	return s.rt.PodSandboxStats(ctx, req)
}

func (s *Server) ListPodSandboxStats(ctx context.Context, req *runtimeapi.ListPodSandboxStatsRequest) (*runtimeapi.ListPodSandboxStatsResponse, error) {
	return s.rt.ListPodSandboxStats(ctx, req)
}

func (s *Server) ListPodSandboxMetrics(ctx context.Context, req *runtimeapi.ListPodSandboxMetricsRequest) (*runtimeapi.ListPodSandboxMetricsResponse, error) {
	return s.rt.ListPodSandboxMetrics(ctx, req)
}

func (s *Server) ListMetricDescriptors(ctx context.Context, req *runtimeapi.ListMetricDescriptorsRequest) (*runtimeapi.ListMetricDescriptorsResponse, error) {
	return s.rt.ListMetricDescriptors(ctx, req)
}

func (s *Server) UpdateRuntimeConfig(ctx context.Context, req *runtimeapi.UpdateRuntimeConfigRequest) (*runtimeapi.UpdateRuntimeConfigResponse, error) {
	return s.rt.UpdateRuntimeConfig(ctx, req)
}

// RuntimeVersion is the version vhive's CRI reports. Version appends the
// proxied runtime's name and version as semver build metadata, so kubelet
// (which parses it) shows e.g. vhive://0.1.0+containerd-1.6.20.ds1.
const RuntimeVersion = "0.1.0"

// Version reports vhive over containerd's CRI API version.
func (s *Server) Version(ctx context.Context, req *runtimeapi.VersionRequest) (*runtimeapi.VersionResponse, error) {
	resp, err := s.rt.Version(ctx, req)
	if err != nil {
		return nil, err
	}
	resp.RuntimeVersion = RuntimeVersion + "+" + semverMeta(resp.GetRuntimeName()+"-"+resp.GetRuntimeVersion())
	resp.RuntimeName = "vhive"
	return resp, nil
}

// semverMeta maps s to semver build-metadata characters ([0-9A-Za-z-.]).
func semverMeta(s string) string {
	b := []byte(s)
	for i, c := range b {
		if !(c >= '0' && c <= '9' || c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c == '-' || c == '.') {
			b[i] = '.'
		}
	}
	out := string(b)
	for strings.Contains(out, "..") {
		out = strings.ReplaceAll(out, "..", ".")
	}
	return strings.Trim(out, ".")
}

// Status reports containerd's status plus vhive's runtime handler.
func (s *Server) Status(ctx context.Context, req *runtimeapi.StatusRequest) (*runtimeapi.StatusResponse, error) {
	resp, err := s.rt.Status(ctx, req)
	if err != nil {
		return nil, err
	}
	if s.oci != nil {
		resp.RuntimeHandlers = append(resp.RuntimeHandlers, &runtimeapi.RuntimeHandler{
			Name:     s.cfg.RuntimeHandler,
			Features: &runtimeapi.RuntimeHandlerFeatures{},
		})
	}
	return resp, nil
}

func (s *Server) RuntimeConfig(ctx context.Context, req *runtimeapi.RuntimeConfigRequest) (*runtimeapi.RuntimeConfigResponse, error) {
	return s.rt.RuntimeConfig(ctx, req)
}

func (s *Server) UpdatePodSandboxResources(ctx context.Context, req *runtimeapi.UpdatePodSandboxResourcesRequest) (*runtimeapi.UpdatePodSandboxResourcesResponse, error) {
	return s.rt.UpdatePodSandboxResources(ctx, req)
}

func (s *Server) CheckpointPod(ctx context.Context, req *runtimeapi.CheckpointPodRequest) (*runtimeapi.CheckpointPodResponse, error) {
	if s.isVhivePod(req.GetPodSandboxId()) {
		return nil, status.Errorf(codes.Unimplemented, "cri: checkpointing vhive pod %q is not implemented", req.GetPodSandboxId())
	}
	return s.rt.CheckpointPod(ctx, req)
}

func (s *Server) RestorePod(ctx context.Context, req *runtimeapi.RestorePodRequest) (*runtimeapi.RestorePodResponse, error) {
	return s.rt.RestorePod(ctx, req)
}

// The Stream* list calls are not offered: kubelet falls back to the List*
// calls on Unimplemented, and merging two streams would need paging state.
