package api

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"

	"google.golang.org/grpc"
	"google.golang.org/grpc/metadata"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/orchestrator"
)

// ColdStartHeader is set to "true" or "false" on every gateway reply so
// that load generators can count cold starts.
const ColdStartHeader = "x-vhive-cold-start"

// RegisterGateway registers the data plane on g: vHive's FwdGreeter and a
// Greeter that routes each call to the function named by its :authority.
func (s *Server) RegisterGateway(g *grpc.Server) {
	helloworld.RegisterFwdGreeterServer(g, &fwdGreeter{s: s})
	helloworld.RegisterGreeterServer(g, &gateway{s: s})
}

type fwdGreeter struct {
	helloworld.UnimplementedFwdGreeterServer
	s *Server
}

// FwdHello invokes function id. As in vHive, a function that is not yet
// deployed is deployed on the fly from the request's image with the
// daemon's defaults.
func (f *fwdGreeter) FwdHello(ctx context.Context, req *helloworld.FwdHelloReq) (*helloworld.FwdHelloResp, error) {
	if _, err := f.s.orch.Function(req.GetId()); err != nil && req.GetImage() != "" {
		_, derr := f.s.orch.Deploy(ctx, orchestrator.FunctionSpec{Name: req.GetId(), Image: req.GetImage()}, false)
		if derr != nil && !errors.Is(derr, orchestrator.ErrAlreadyExists) {
			return nil, toStatus(derr)
		}
	}
	res, err := f.s.orch.Invoke(ctx, req.GetId(), []byte(req.GetPayload()))
	if err != nil {
		return nil, toStatus(err)
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs(ColdStartHeader, strconv.FormatBool(res.Cold)))
	return &helloworld.FwdHelloResp{IsColdStart: res.Cold, Payload: string(res.Payload)}, nil
}

type gateway struct {
	helloworld.UnimplementedGreeterServer
	s *Server
}

// FunctionFromAuthority maps an :authority to a function name: the host part
// without port, first DNS label ("helloworld.default.example.com:80" →
// "helloworld").
func FunctionFromAuthority(authority string) string {
	host := authority
	if h, _, err := net.SplitHostPort(authority); err == nil {
		host = h
	}
	name, _, _ := strings.Cut(host, ".")
	return name
}

func (g *gateway) SayHello(ctx context.Context, req *helloworld.HelloRequest) (*helloworld.HelloReply, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	var authority string
	if v := md.Get(":authority"); len(v) > 0 {
		authority = v[0]
	}
	fn := FunctionFromAuthority(authority)
	if fn == "" {
		return nil, toStatus(fmt.Errorf("%w: no function in :authority %q", orchestrator.ErrInvalid, authority))
	}
	res, err := g.s.orch.Invoke(ctx, fn, []byte(req.GetName()))
	if err != nil {
		return nil, toStatus(err)
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs(ColdStartHeader, strconv.FormatBool(res.Cold)))
	return &helloworld.HelloReply{Message: string(res.Payload)}, nil
}
