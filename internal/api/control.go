// Package api serves the daemon's gRPC services: the control API spoken by
// the CLI (vhive.v1.Control), and the data plane — vHive's FwdGreeter and a
// Greeter gateway that routes by :authority so vSwarm's tools work unchanged.
// It converts errors to gRPC status codes; it holds no state of its own.
package api

import (
	"context"
	"fmt"
	"log/slog"
	"net/http"
	"sort"
	"time"

	"golang.org/x/net/http/httpguts"
	"google.golang.org/grpc"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/orchestrator"
	"vhive.dev/vhive/internal/snapshot"
)

// Images is what the API needs of the image service.
type Images interface {
	Pull(ctx context.Context, ref string) (image.Image, error)
	Import(ctx context.Context, path, ref string) (image.Image, error)
	List(ctx context.Context) ([]image.Image, error)
	Remove(ctx context.Context, refOrDigest string) error
}

// Snapshots is what the API needs of the snapshot store.
type Snapshots interface {
	List(ctx context.Context, function string) ([]snapshot.Info, error)
	Inspect(ctx context.Context, id string) (snapshot.Info, error)
	Remove(ctx context.Context, id string) error
}

// Server implements the gRPC services.
type Server struct {
	vhivepb.UnimplementedControlServer
	orch      *orchestrator.Orchestrator
	images    Images
	snapshots Snapshots
	log       *slog.Logger
}

// New creates the API server. snapshots may be nil (no snapshot support).
func New(orch *orchestrator.Orchestrator, images Images, snapshots Snapshots, log *slog.Logger) (*Server, error) {
	if orch == nil || images == nil {
		return nil, fmt.Errorf("api: orchestrator and image service are required")
	}
	if log == nil {
		log = slog.Default()
	}
	return &Server{orch: orch, images: images, snapshots: snapshots, log: log}, nil
}

// RegisterControl registers the control API on s.
func (s *Server) RegisterControl(g *grpc.Server) {
	vhivepb.RegisterControlServer(g, s)
}

// maxMillis bounds the millisecond fields so that converting them to a
// time.Duration cannot overflow.
const maxMillis = int64(orchestrator.MaxKeepalive / time.Millisecond)

func specFromProto(p *vhivepb.FunctionSpec) (orchestrator.FunctionSpec, error) {
	if ms := p.GetKeepaliveMs(); ms < 0 || ms > maxMillis {
		return orchestrator.FunctionSpec{}, fmt.Errorf("%w: keepalive_ms %d: want 0 (the default) to %d (%s)", orchestrator.ErrInvalid, ms, maxMillis, orchestrator.MaxKeepalive)
	}
	return orchestrator.FunctionSpec{
		Name: p.GetName(), Image: p.GetImage(), Sandbox: p.GetSandbox(), Port: int(p.GetPort()), Env: p.GetEnv(),
		Keepalive: time.Duration(p.GetKeepaliveMs()) * time.Millisecond, MaxInstances: int(p.GetMaxInstances()),
		Concurrency: int(p.GetConcurrency()), StartMode: p.GetStartMode(), MemoryMiB: p.GetMemoryLimitMib(), CPU: p.GetCpuLimit(),
		Protocol: p.GetProtocol(), ReadinessPath: p.GetReadinessPath(),
	}, nil
}

func statusToProto(st orchestrator.FunctionStatus) *vhivepb.FunctionStatus {
	sp := st.Spec
	return &vhivepb.FunctionStatus{
		Spec: &vhivepb.FunctionSpec{
			Name: sp.Name, Image: sp.Image, Sandbox: sp.Sandbox, Port: uint32(sp.Port), Env: sp.Env,
			KeepaliveMs: sp.Keepalive.Milliseconds(), MaxInstances: uint32(sp.MaxInstances), Concurrency: uint32(sp.Concurrency),
			StartMode: sp.StartMode, MemoryLimitMib: sp.MemoryMiB, CpuLimit: sp.CPU,
			Protocol: sp.Protocol, ReadinessPath: sp.ReadinessPath,
		},
		ImageDigest: sp.ImageDigest, Instances: uint32(st.Instances), Busy: uint32(st.Busy),
		CreatedUnixMs: sp.CreatedAt.UnixMilli(), ColdStarts: st.Cold, WarmInvocations: st.Warm,
	}
}

func (s *Server) Deploy(ctx context.Context, req *vhivepb.DeployRequest) (*vhivepb.DeployResponse, error) {
	if req.GetSpec() == nil {
		return nil, toStatus(fmt.Errorf("%w: deploy needs a function spec", orchestrator.ErrInvalid))
	}
	spec, err := specFromProto(req.GetSpec())
	if err != nil {
		return nil, toStatus(err)
	}
	st, err := s.orch.Deploy(ctx, spec, req.GetReplace())
	if err != nil {
		return nil, toStatus(err)
	}
	return &vhivepb.DeployResponse{Function: statusToProto(st)}, nil
}

func (s *Server) Invoke(ctx context.Context, req *vhivepb.InvokeRequest) (*vhivepb.InvokeResponse, error) {
	if ms := req.GetTimeoutMs(); ms < 0 || ms > maxMillis {
		return nil, toStatus(fmt.Errorf("%w: timeout_ms %d: want 0 (none) to %d", orchestrator.ErrInvalid, ms, maxMillis))
	}
	if req.GetTimeoutMs() > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, time.Duration(req.GetTimeoutMs())*time.Millisecond)
		defer cancel()
	}
	call := orchestrator.Request{Payload: req.GetPayload(), Method: req.GetMethod(), JSON: req.GetJson()}
	if h := req.GetHttp(); h != nil {
		call.HTTP = &orchestrator.HTTPRequest{Method: h.GetMethod(), Path: h.GetPath(), Header: http.Header{}}
		for _, kv := range h.GetHeaders() {
			if !httpguts.ValidHeaderFieldName(kv.GetName()) || !httpguts.ValidHeaderFieldValue(kv.GetValue()) {
				return nil, toStatus(fmt.Errorf("%w: HTTP header %.80q: not a valid header name and value", orchestrator.ErrInvalid, kv.GetName()+": "+kv.GetValue()))
			}
			call.HTTP.Header.Add(kv.GetName(), kv.GetValue())
		}
	}
	res, err := s.orch.Call(ctx, req.GetFunction(), call)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &vhivepb.InvokeResponse{Payload: res.Payload, ColdStart: res.Cold, InstanceId: res.InstanceID,
		StartMode: res.StartMode, MemoryStats: res.Memory}
	if res.HTTPStatus != 0 {
		out.Http = &vhivepb.HTTPResponse{Status: int32(res.HTTPStatus)}
		for k, vs := range res.HTTPHeader {
			for _, v := range vs {
				out.Http.Headers = append(out.Http.Headers, &vhivepb.Header{Name: k, Value: v})
			}
		}
		sort.Slice(out.Http.Headers, func(i, j int) bool { return out.Http.Headers[i].Name < out.Http.Headers[j].Name })
	}
	for _, st := range res.Stages {
		out.Stages = append(out.Stages, &vhivepb.Stage{Name: st.Name, Micros: st.Duration.Microseconds()})
	}
	return out, nil
}

func (s *Server) ListFunctions(ctx context.Context, _ *vhivepb.ListFunctionsRequest) (*vhivepb.ListFunctionsResponse, error) {
	out := &vhivepb.ListFunctionsResponse{}
	for _, st := range s.orch.List() {
		out.Functions = append(out.Functions, statusToProto(st))
	}
	return out, nil
}

func (s *Server) RemoveFunction(ctx context.Context, req *vhivepb.RemoveFunctionRequest) (*vhivepb.RemoveFunctionResponse, error) {
	if err := s.orch.Remove(ctx, req.GetName()); err != nil {
		return nil, toStatus(err)
	}
	return &vhivepb.RemoveFunctionResponse{}, nil
}

func (s *Server) StopInstances(ctx context.Context, req *vhivepb.StopInstancesRequest) (*vhivepb.StopInstancesResponse, error) {
	n, err := s.orch.StopInstances(ctx, req.GetFunction())
	if err != nil {
		return nil, toStatus(err)
	}
	return &vhivepb.StopInstancesResponse{Stopped: uint32(n)}, nil
}

func (s *Server) ListInstances(ctx context.Context, req *vhivepb.ListInstancesRequest) (*vhivepb.ListInstancesResponse, error) {
	infos, err := s.orch.Instances(ctx, req.GetFunction(), req.GetStats())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &vhivepb.ListInstancesResponse{}
	for _, in := range infos {
		out.Instances = append(out.Instances, &vhivepb.InstanceInfo{
			Id: in.ID, Function: in.Function, Sandbox: in.Sandbox, StartMode: in.StartMode, Endpoint: in.Endpoint,
			StartedUnixMs: in.Started.UnixMilli(), InFlight: uint32(in.InFlight), RssBytes: in.Stats.RSS, PssBytes: in.Stats.PSS,
		})
	}
	return out, nil
}

func imageToProto(img image.Image) *vhivepb.ImageInfo {
	return &vhivepb.ImageInfo{Ref: img.Ref, Digest: img.Digest, Size: img.Size, Rootfs: img.Rootfs,
		CreatedUnixMs: img.Created.UnixMilli(), Kind: img.Kind}
}

func (s *Server) PullImage(ctx context.Context, req *vhivepb.PullImageRequest) (*vhivepb.ImageInfo, error) {
	img, err := s.images.Pull(ctx, req.GetRef())
	if err != nil {
		return nil, toStatus(err)
	}
	return imageToProto(img), nil
}

func (s *Server) ImportImage(ctx context.Context, req *vhivepb.ImportImageRequest) (*vhivepb.ImageInfo, error) {
	img, err := s.images.Import(ctx, req.GetPath(), req.GetRef())
	if err != nil {
		return nil, toStatus(err)
	}
	return imageToProto(img), nil
}

func (s *Server) ListImages(ctx context.Context, _ *vhivepb.ListImagesRequest) (*vhivepb.ListImagesResponse, error) {
	imgs, err := s.images.List(ctx)
	if err != nil {
		return nil, toStatus(err)
	}
	out := &vhivepb.ListImagesResponse{}
	for _, img := range imgs {
		out.Images = append(out.Images, imageToProto(img))
	}
	return out, nil
}

func (s *Server) RemoveImage(ctx context.Context, req *vhivepb.RemoveImageRequest) (*vhivepb.RemoveImageResponse, error) {
	if err := s.images.Remove(ctx, req.GetRef()); err != nil {
		return nil, toStatus(err)
	}
	return &vhivepb.RemoveImageResponse{}, nil
}

func snapshotToProto(si snapshot.Info) *vhivepb.SnapshotInfo {
	return &vhivepb.SnapshotInfo{Id: si.ID, Function: si.Function, Backend: si.Backend, ImageDigest: si.ImageDigest,
		CreatedUnixMs: si.Created.UnixMilli(), DiskBytes: si.DiskBytes, WorkingSet: si.WorkingSet, Modes: si.Modes,
		Restore: si.Restore, Details: si.Details, Path: si.Path}
}

func (s *Server) noSnapshots() error {
	return toStatus(fmt.Errorf("%w: this daemon has no snapshot store", orchestrator.ErrUnsupported))
}

func (s *Server) ListSnapshots(ctx context.Context, req *vhivepb.ListSnapshotsRequest) (*vhivepb.ListSnapshotsResponse, error) {
	if s.snapshots == nil {
		return nil, s.noSnapshots()
	}
	list, err := s.snapshots.List(ctx, req.GetFunction())
	if err != nil {
		return nil, toStatus(err)
	}
	out := &vhivepb.ListSnapshotsResponse{}
	for _, si := range list {
		out.Snapshots = append(out.Snapshots, snapshotToProto(si))
	}
	return out, nil
}

func (s *Server) InspectSnapshot(ctx context.Context, req *vhivepb.InspectSnapshotRequest) (*vhivepb.SnapshotInfo, error) {
	if s.snapshots == nil {
		return nil, s.noSnapshots()
	}
	si, err := s.snapshots.Inspect(ctx, req.GetId())
	if err != nil {
		return nil, toStatus(err)
	}
	return snapshotToProto(si), nil
}

func (s *Server) RemoveSnapshot(ctx context.Context, req *vhivepb.RemoveSnapshotRequest) (*vhivepb.RemoveSnapshotResponse, error) {
	if s.snapshots == nil {
		return nil, s.noSnapshots()
	}
	if err := s.snapshots.Remove(ctx, req.GetId()); err != nil {
		return nil, toStatus(err)
	}
	return &vhivepb.RemoveSnapshotResponse{}, nil
}
