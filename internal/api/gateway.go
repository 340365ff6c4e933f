package api

import (
	"context"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httputil"
	"strconv"
	"strings"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"

	"vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/orchestrator"
)

// ColdStartHeader is set to "true" or "false" on every gateway reply so
// that load generators can count cold starts.
const ColdStartHeader = "x-vhive-cold-start"

// Gateway is the data plane on one port: vHive's FwdGreeter, and a
// transparent relay of any gRPC method (raw frames, never decoded) or HTTP
// request to the function named by the request's :authority or Host,
// starting instances as needed. gRPC (HTTP/2 with its preface) and HTTP/1.1
// connections are told apart by their first bytes.
type Gateway struct {
	s    *Server
	grpc *grpc.Server
	http *http.Server
}

// NewGateway creates the data plane.
func (s *Server) NewGateway() *Gateway {
	g := &Gateway{s: s}
	g.grpc = grpc.NewServer(grpc.ForceServerCodecV2(orchestrator.RawCodec{}), grpc.UnknownServiceHandler(g.relayGRPC))
	helloworld.RegisterFwdGreeterServer(g.grpc, &fwdGreeter{s: s})
	g.http = &http.Server{Handler: http.HandlerFunc(g.relayHTTP), ReadHeaderTimeout: 30 * time.Second,
		ErrorLog: slog.NewLogLogger(s.log.Handler(), slog.LevelWarn)}
	return g
}

// Serve serves the gateway on l until Stop or GracefulStop.
func (g *Gateway) Serve(l net.Listener) error {
	d := newDemux(l)
	errc := make(chan error, 2)
	go func() { errc <- g.grpc.Serve(d.h2) }()
	go func() { errc <- g.http.Serve(d.h1) }()
	// Closing either side (Stop, GracefulStop) closes the listener; the
	// servers' own stops end their connections.
	err := d.run()
	<-errc
	<-errc
	return err
}

// GracefulStop lets requests in flight finish.
func (g *Gateway) GracefulStop() {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	_ = g.http.Shutdown(ctx)
	g.grpc.GracefulStop()
}

// Stop closes every connection now.
func (g *Gateway) Stop() {
	_ = g.http.Close()
	g.grpc.Stop()
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

// functionFor names the function a request is for, refusing an address.
func functionFor(authority string) (string, error) {
	host := authority
	if h, _, err := net.SplitHostPort(authority); err == nil {
		host = h
	}
	host = strings.Trim(host, "[]")
	if net.ParseIP(host) != nil || host == "" {
		return "", fmt.Errorf("%w: the gateway routes by the request's :authority (Host): %q is an address, not a function; "+
			"name the function as <function>.<namespace>.<domain> or <function> (grpcurl -authority fn.default.example.com, "+
			"grpc.WithAuthority(\"fn\"), curl -H 'Host: fn')", orchestrator.ErrInvalid, authority)
	}
	return FunctionFromAuthority(authority), nil
}

// relayGRPC relays one gRPC call of any method and kind (unary or
// streaming) to the function, frame by frame.
func (g *Gateway) relayGRPC(_ any, ss grpc.ServerStream) error {
	ctx := ss.Context()
	method, ok := grpc.MethodFromServerStream(ss)
	if !ok {
		return status.Error(codes.Internal, "gateway: no method in the stream")
	}
	md, _ := metadata.FromIncomingContext(ctx)
	var authority string
	if v := md.Get(":authority"); len(v) > 0 {
		authority = v[0]
	}
	fn, err := functionFor(authority)
	if err != nil {
		return toStatus(err)
	}
	out := metadata.MD{}
	for k, v := range md {
		switch k {
		case ":authority", "content-type", "user-agent", "te", "grpc-timeout", "grpc-encoding", "grpc-accept-encoding":
			continue
		}
		out[k] = v
	}
	_, err = g.s.orch.Relay(ctx, fn, func(ctx context.Context, t orchestrator.Target) error {
		if t.Conn == nil {
			return fmt.Errorf("%w: function %q is an HTTP function: send it HTTP/1.1 requests", orchestrator.ErrInvalid, fn)
		}
		_ = ss.SetHeader(metadata.Pairs(ColdStartHeader, strconv.FormatBool(t.Cold)))
		ctx, cancel := context.WithCancel(metadata.NewOutgoingContext(ctx, out))
		defer cancel()
		cs, err := t.Conn.NewStream(ctx, &grpc.StreamDesc{ServerStreams: true, ClientStreams: true}, method, grpc.ForceCodecV2(orchestrator.RawCodec{}))
		if err != nil {
			return err
		}
		upErr := make(chan error, 1)
		go func() {
			for {
				var f orchestrator.Frame
				if err := ss.RecvMsg(&f); err != nil {
					if errors.Is(err, io.EOF) {
						upErr <- cs.CloseSend()
					} else {
						cancel() // the caller went away
						upErr <- err
					}
					return
				}
				if err := cs.SendMsg(&f); err != nil {
					// The function ended the call; RecvMsg below says how.
					upErr <- nil
					return
				}
			}
		}()
		if hdr, err := cs.Header(); err == nil && len(hdr) > 0 {
			delete(hdr, "content-type")
			_ = ss.SetHeader(hdr)
		}
		for {
			var f orchestrator.Frame
			err := cs.RecvMsg(&f)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				ss.SetTrailer(cs.Trailer())
				return err
			}
			if err := ss.SendMsg(&f); err != nil {
				return fmt.Errorf("relay to the caller: %w", err)
			}
		}
		ss.SetTrailer(cs.Trailer())
		return nil
	})
	return toStatus(err)
}

// relayHTTP relays one HTTP request to an HTTP function.
func (g *Gateway) relayHTTP(w http.ResponseWriter, r *http.Request) {
	fn, err := functionFor(r.Host)
	if err != nil {
		writeHTTPError(w, err)
		return
	}
	var proxyErr error
	_, err = g.s.orch.Relay(r.Context(), fn, func(ctx context.Context, t orchestrator.Target) error {
		if t.URL == nil {
			return fmt.Errorf("%w: function %q is a gRPC function: call its methods over gRPC", orchestrator.ErrInvalid, fn)
		}
		rp := &httputil.ReverseProxy{
			Rewrite: func(pr *httputil.ProxyRequest) {
				pr.SetURL(t.URL)
				pr.Out.Host = pr.In.Host
			},
			Transport:    t.Transport,
			ErrorHandler: func(_ http.ResponseWriter, _ *http.Request, err error) { proxyErr = err },
		}
		w.Header().Set(ColdStartHeader, strconv.FormatBool(t.Cold))
		rp.ServeHTTP(w, r.WithContext(ctx))
		return proxyErr
	})
	if err != nil {
		writeHTTPError(w, err)
	}
}

// writeHTTPError answers a request the gateway could not relay with the
// HTTP status of the error's class.
func writeHTTPError(w http.ResponseWriter, err error) {
	code := http.StatusInternalServerError
	switch status.Code(toStatus(err)) {
	case codes.NotFound:
		code = http.StatusNotFound
	case codes.InvalidArgument:
		code = http.StatusBadRequest
	case codes.Unavailable, codes.ResourceExhausted:
		code = http.StatusServiceUnavailable
	case codes.DeadlineExceeded:
		code = http.StatusGatewayTimeout
	case codes.Canceled:
		code = 499
	}
	w.Header().Del(ColdStartHeader)
	http.Error(w, "vhive gateway: "+err.Error(), code)
}
