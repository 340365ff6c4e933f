package invoker

import (
	"context"
	"io"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"vhive.dev/vhive/functions/echo-grpc/echopb"
)

type echoServer struct {
	echopb.UnimplementedEchoServer
}

func (echoServer) Say(ctx context.Context, req *echopb.SayRequest) (*echopb.SayReply, error) {
	md, _ := metadata.FromIncomingContext(ctx)
	if a := md.Get(":authority"); len(a) != 1 || a[0] != "echo.default" {
		return nil, status.Errorf(codes.InvalidArgument, "authority %v", a)
	}
	if req.GetText() != "load" {
		return nil, status.Errorf(codes.InvalidArgument, "text %q", req.GetText())
	}
	_ = grpc.SetHeader(ctx, metadata.Pairs(ColdStartHeader, "true"))
	return &echopb.SayReply{Text: req.GetText()}, nil
}

// TestMethodAndHTTPRequests: with Method the invoker calls that method with
// the serialized request as it is (not SayHello); with HTTP it sends the
// HTTP request with the endpoint's hostname as Host, counting a 5xx as
// failed.
func TestMethodAndHTTPRequests(t *testing.T) {
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	s := grpc.NewServer()
	echopb.RegisterEchoServer(s, echoServer{})
	go func() { _ = s.Serve(lis) }()
	defer s.Stop()
	req, _ := proto.Marshal(&echopb.SayRequest{Text: "load"})
	res, err := Run(context.Background(), Config{
		Endpoints: []Endpoint{{Hostname: "echo.default"}}, RPS: 20, Duration: 200 * time.Millisecond,
		Addr: lis.Addr().String(), Method: "echo.v1.Echo/Say", Request: req,
	})
	if err != nil {
		t.Fatal(err)
	}
	if len(res.Records) == 0 {
		t.Fatal("no requests issued")
	}
	for _, r := range res.Records {
		if r.Code != codes.OK || !r.Cold {
			t.Fatalf("method request: %+v, want OK with the cold-start header seen", r)
		}
	}

	hl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	hs := &http.Server{Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		b, _ := io.ReadAll(r.Body)
		if r.Host != "web.default" || r.Method != http.MethodPost || r.URL.Path != "/run" || string(b) != "body" || r.Header.Get("X-Test") != "1" {
			w.WriteHeader(http.StatusServiceUnavailable)
			return
		}
		w.Header().Set(ColdStartHeader, "false")
		io.WriteString(w, "ok")
	})}
	go func() { _ = hs.Serve(hl) }()
	defer hs.Close()
	for _, c := range []struct {
		path string
		want codes.Code
	}{{"/run", codes.OK}, {"/other", codes.Unavailable}} {
		res, err = Run(context.Background(), Config{
			Endpoints: []Endpoint{{Hostname: "web.default"}}, RPS: 20, Duration: 150 * time.Millisecond, Addr: hl.Addr().String(),
			HTTP: &HTTPRequest{Path: c.path, Body: []byte("body"), Header: http.Header{"X-Test": {"1"}}},
		})
		if err != nil {
			t.Fatal(err)
		}
		if len(res.Records) == 0 {
			t.Fatal("no HTTP requests issued")
		}
		for _, r := range res.Records {
			if r.Code != c.want || (c.want != codes.OK && !strings.Contains(r.Error, "503")) {
				t.Fatalf("HTTP %s: %+v, want %s", c.path, r, c.want)
			}
		}
	}
	if _, err := Run(context.Background(), Config{Endpoints: []Endpoint{{Hostname: "x"}}, RPS: 1, Duration: time.Second, Port: 80,
		Method: "nomethod"}); err == nil || !strings.Contains(err.Error(), "package.Service/Method") {
		t.Fatalf("bad method: %v", err)
	}
}
