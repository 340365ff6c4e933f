package daemon

import (
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/metadata"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"

	"vhive.dev/vhive/api/proto/helloworld"
	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/echo-grpc/echopb"
	"vhive.dev/vhive/internal/testutil"
)

// protocolSandboxes is runc, plus gvisor where runsc is built.
func protocolSandboxes(t *testing.T, cfg *Config) []string {
	sbs := []string{"runc"}
	p := os.Getenv("VHIVE_RUNSC")
	if p == "" {
		p = testutil.CacheDir() + "/bin/runsc"
	}
	if _, err := os.Stat(p); err == nil {
		cfg.RunscPath = p
		sbs = append(sbs, "gvisor")
	} else {
		t.Logf("runsc not at %s: gvisor not covered in this run (%v)", p, err)
	}
	cfg.Sandboxes = sbs
	return sbs
}

// TestProtocols deploys the example functions that serve their own
// protocol — echo-grpc (its own gRPC service, reflection, health) and
// hello-http (Knative-style, $PORT) — from their image labels alone, and
// calls them through the control API (a method by JSON and by raw bytes, an
// HTTP request) and through the gateway (a unary and a streaming RPC relayed
// as raw frames, an HTTP request, vHive's Greeter), on every sandbox here.
func TestProtocols(t *testing.T) {
	echoImg := shared.Function(t, "echo-grpc", false)
	webImg := shared.Function(t, "hello-http", false)
	hello := shared.Helloworld(t)
	cfg := baseConfig(t, t.TempDir())
	sbs := protocolSandboxes(t, &cfg)
	td := startDaemon(t, cfg)
	echoRef := td.importImage(t, echoImg).Ref
	webRef := td.importImage(t, webImg).Ref
	helloRef := td.importImage(t, hello).Ref
	ctx := context.Background()

	for _, sb := range sbs {
		t.Run(sb, func(t *testing.T) {
			echo, web := "echo-"+sb, "web-"+sb
			td.deploy(t, &vhivepb.FunctionSpec{Name: echo, Image: echoRef, Sandbox: sb})
			td.deploy(t, &vhivepb.FunctionSpec{Name: web, Image: webRef, Sandbox: sb})
			ls, err := td.client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
			if err != nil {
				t.Fatal(err)
			}
			for _, f := range ls.Functions {
				s := f.GetSpec()
				switch s.GetName() {
				case echo:
					if s.GetProtocol() != "grpc" || s.GetPort() != 50051 {
						t.Errorf("%s: protocol %q port %d, want grpc 50051", echo, s.GetProtocol(), s.GetPort())
					}
				case web:
					if s.GetProtocol() != "http" || s.GetPort() != 8080 || s.GetReadinessPath() != "/healthz" {
						t.Errorf("%s: protocol %q port %d readiness %q, want http 8080 /healthz (the image's labels)", web, s.GetProtocol(), s.GetPort(), s.GetReadinessPath())
					}
				}
			}

			// A method by JSON, resolved with the function's reflection: cold.
			cold, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: echo, Method: "echo.v1.Echo/Say", Json: true, Payload: []byte(`{"text":"hi"}`)})
			if err != nil {
				t.Fatalf("Say by JSON: %v", err)
			}
			var got struct {
				Text   string `json:"text"`
				Served string `json:"served"`
			}
			if err := json.Unmarshal(cold.Payload, &got); err != nil || got.Text != "hi" || got.Served != "1" {
				t.Fatalf("Say by JSON replied %s (%v), want text hi, served 1", cold.Payload, err)
			}
			if !cold.ColdStart || len(cold.Stages) == 0 || cold.Stages[len(cold.Stages)-1].Name != "Total" {
				t.Fatalf("first call: cold=%v stages %v, want a cold start's stages", cold.ColdStart, cold.Stages)
			}
			// The same by raw bytes: warm.
			req, _ := proto.Marshal(&echopb.SayRequest{Text: "raw"})
			warm, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: echo, Method: "/echo.v1.Echo/Say", Payload: req})
			if err != nil {
				t.Fatalf("Say by raw bytes: %v", err)
			}
			var rep echopb.SayReply
			if err := proto.Unmarshal(warm.Payload, &rep); err != nil || rep.GetText() != "raw" || rep.GetServed() != 2 || warm.ColdStart {
				t.Fatalf("Say by raw bytes: %v (%v), cold=%v; want text raw, served 2, warm", &rep, err, warm.ColdStart)
			}
			// The function's own error passes through.
			freq, _ := proto.Marshal(&echopb.FailRequest{Code: int32(codes.PermissionDenied), Message: "not you"})
			_, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: echo, Method: "echo.v1.Echo/Fail", Payload: freq})
			if st, _ := status.FromError(err); st.Code() != codes.PermissionDenied || st.Message() != "not you" {
				t.Fatalf("Fail: %v, want PermissionDenied \"not you\"", err)
			}
			_, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: echo, Method: "echo.v1.Echo/Nope", Json: true, Payload: []byte(`{}`)})
			if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "Nope") {
				t.Fatalf("unknown method by JSON: %v, want InvalidArgument naming it", err)
			}

			// HTTP through the control API.
			hr, err := td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: web, Http: &vhivepb.HTTPRequest{Path: "/?name=vhive"}})
			if err != nil || string(hr.Payload) != "Hello, vhive!" || hr.GetHttp().GetStatus() != 200 || !hr.ColdStart {
				t.Fatalf("HTTP GET: %+v, %v; want a cold 200 Hello, vhive!", hr, err)
			}
			hr, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: web, Payload: []byte("posted")})
			if err != nil || string(hr.Payload) != "Hello, posted!" || hr.ColdStart {
				t.Fatalf("HTTP POST: %+v, %v", hr, err)
			}
			hr, err = td.client.Invoke(ctx, &vhivepb.InvokeRequest{Function: web, Http: &vhivepb.HTTPRequest{Path: "/status/503"}})
			if err != nil || hr.GetHttp().GetStatus() != 503 {
				t.Fatalf("HTTP 503 from the function: %+v, %v; want its response, not an error", hr, err)
			}

			// The gateway: gRPC relayed by :authority.
			conn, err := grpc.NewClient("passthrough:///"+td.gateway, grpc.WithTransportCredentials(insecure.NewCredentials()),
				grpc.WithAuthority(echo+".default.example.com"))
			if err != nil {
				t.Fatal(err)
			}
			defer conn.Close()
			ec := echopb.NewEchoClient(conn)
			var hdr metadata.MD
			r, err := ec.Say(ctx, &echopb.SayRequest{Text: "gw"}, grpc.Header(&hdr))
			if err != nil || r.GetText() != "gw" {
				t.Fatalf("gateway Say: %v, %v", r, err)
			}
			if v := hdr.Get("x-vhive-cold-start"); len(v) != 1 || v[0] != "false" {
				t.Fatalf("gateway cold-start header %v", v)
			}
			stream, err := ec.Count(ctx, &echopb.CountRequest{To: 5})
			if err != nil {
				t.Fatal(err)
			}
			var ns []int32
			for {
				m, err := stream.Recv()
				if err == io.EOF {
					break
				}
				if err != nil {
					t.Fatalf("gateway Count: %v", err)
				}
				ns = append(ns, m.GetN())
			}
			if len(ns) != 5 || ns[0] != 1 || ns[4] != 5 {
				t.Fatalf("gateway Count streamed %v, want 1..5", ns)
			}
			_, err = ec.Fail(ctx, &echopb.FailRequest{Code: int32(codes.Unimplemented), Message: "Method not found!"})
			if st, _ := status.FromError(err); st.Code() != codes.Unimplemented || st.Message() != "Method not found!" {
				t.Fatalf("gateway Fail: %v", err)
			}

			// The gateway: HTTP relayed by Host.
			hreq, _ := http.NewRequest(http.MethodGet, "http://"+td.gateway+"/?name=gw", nil)
			hreq.Host = web + ".default.example.com"
			resp, err := http.DefaultClient.Do(hreq)
			if err != nil {
				t.Fatal(err)
			}
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.StatusCode != 200 || string(body) != "Hello, gw!" || resp.Header.Get("X-Vhive-Cold-Start") != "false" {
				t.Fatalf("gateway HTTP: %d %q cold-start %q", resp.StatusCode, body, resp.Header.Get("X-Vhive-Cold-Start"))
			}
		})
	}

	// vHive's Greeter, relayed like any method; a cold start through the
	// gateway says so.
	td.deploy(t, &vhivepb.FunctionSpec{Name: "hello", Image: helloRef, Sandbox: "runc"})
	conn, err := grpc.NewClient("passthrough:///"+td.gateway, grpc.WithTransportCredentials(insecure.NewCredentials()), grpc.WithAuthority("hello"))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	var hdr metadata.MD
	rep, err := helloworld.NewGreeterClient(conn).SayHello(ctx, &helloworld.HelloRequest{Name: "gw"}, grpc.Header(&hdr))
	if err != nil || rep.GetMessage() != "Hello, gw!" {
		t.Fatalf("gateway SayHello: %v, %v", rep, err)
	}
	if v := hdr.Get("x-vhive-cold-start"); len(v) != 1 || v[0] != "true" {
		t.Fatalf("cold-start header of a cold call: %v", v)
	}

	// An address instead of a name: an error that says how to name one.
	byAddr, err := grpc.NewClient("passthrough:///"+td.gateway, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer byAddr.Close()
	_, err = helloworld.NewGreeterClient(byAddr).SayHello(ctx, &helloworld.HelloRequest{Name: "x"})
	if status.Code(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "name the function") {
		t.Fatalf("gateway by address: %v, want InvalidArgument saying how to name a function", err)
	}
	resp, err := http.Get("http://" + td.gateway + "/")
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusBadRequest || !strings.Contains(string(body), "name the function") {
		t.Fatalf("HTTP gateway by address: %d %q", resp.StatusCode, body)
	}
}
