package daemon

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protodesc"
	"google.golang.org/protobuf/types/descriptorpb"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/functions/echo-grpc/echopb"
)

// vhiveCLI runs the vhive binary against td and returns its stdout.
func vhiveCLI(t *testing.T, td *testDaemon, args ...string) string {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, shared.Bin(t), args...)
	cmd.Env = append(os.Environ(), "VHIVE_SOCKET="+td.cfg.Socket)
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		t.Fatalf("vhive %s: %v\nstdout:\n%s\nstderr:\n%s", strings.Join(args, " "), err, stdout.String(), stderr.String())
	}
	return stdout.String()
}

// TestCLIRequests drives the CLI's request options against a real daemon:
// vhive invoke with a method by JSON (server reflection), by raw bytes and
// by --protoset, an HTTP request; vhive bench coldstart and vhive invoker
// calling a method; the cold/warm report for every kind.
func TestCLIRequests(t *testing.T) {
	echoImg := shared.Function(t, "echo-grpc", false)
	webImg := shared.Function(t, "hello-http", false)
	td := startDaemon(t, runcConfig(t, t.TempDir()))
	td.importImage(t, echoImg)
	td.importImage(t, webImg)
	td.deploy(t, &vhivepb.FunctionSpec{Name: "echo", Image: "localhost/vhive/echo-grpc:latest", Sandbox: "runc"})
	td.deploy(t, &vhivepb.FunctionSpec{Name: "web", Image: "localhost/vhive/hello-http:latest", Sandbox: "runc"})
	dir := t.TempDir()

	out := vhiveCLI(t, td, "invoke", "echo", "--method", "echo.v1.Echo/Say", "--data", `{"text":"json"}`)
	if !strings.Contains(out, `"text":"json"`) || !strings.Contains(out, "cold (boot)") || !strings.Contains(out, "FuncInvocation") {
		t.Fatalf("invoke by JSON printed:\n%s\nwant the JSON reply, a cold report and the stage table", out)
	}

	raw, _ := proto.Marshal(&echopb.SayRequest{Text: "bytes"})
	reqFile := filepath.Join(dir, "req.bin")
	if err := os.WriteFile(reqFile, raw, 0o600); err != nil {
		t.Fatal(err)
	}
	out = vhiveCLI(t, td, "invoke", "echo", "--method", "/echo.v1.Echo/Say", "--data-file", reqFile)
	if !strings.Contains(out, "bytes") || !strings.Contains(out, "warm invocation") {
		t.Fatalf("invoke by raw bytes printed:\n%s", out)
	}

	set := &descriptorpb.FileDescriptorSet{File: []*descriptorpb.FileDescriptorProto{protodesc.ToFileDescriptorProto(echopb.File_echopb_echo_proto)}}
	b, _ := proto.Marshal(set)
	protoset := filepath.Join(dir, "echo.protoset")
	if err := os.WriteFile(protoset, b, 0o600); err != nil {
		t.Fatal(err)
	}
	out = vhiveCLI(t, td, "invoke", "echo", "--method", "echo.v1.Echo/Say", "--data", `{"text":"set"}`, "--protoset", protoset)
	if !strings.Contains(out, `"text":"set"`) {
		t.Fatalf("invoke with --protoset printed:\n%s", out)
	}

	out = vhiveCLI(t, td, "invoke", "web", "--path", "/?name=cli", "-H", "Accept: text/plain")
	if !strings.Contains(out, "HTTP 200 OK") || !strings.Contains(out, "Hello, cli!") || !strings.Contains(out, "cold (boot)") {
		t.Fatalf("invoke of the HTTP function printed:\n%s", out)
	}

	out = vhiveCLI(t, td, "ls")
	if !strings.Contains(out, "http:8080/healthz") || !strings.Contains(out, "grpc:50051") {
		t.Fatalf("ls printed:\n%s\nwant each function's protocol", out)
	}

	// bench: the same request options, the usual CSVs.
	benchOut := filepath.Join(dir, "bench")
	vhiveCLI(t, td, "bench", "coldstart", "--functions", "echo-grpc", "--sandbox", "runc", "--modes", "boot", "--iterations", "1",
		"--with-cache", "--no-progress", "--no-plots", "--out", benchOut, "--method", "echo.v1.Echo/Say", "--data", `{"text":"bench"}`)
	csvs, _ := filepath.Glob(filepath.Join(benchOut, "*.csv"))
	if len(csvs) == 0 {
		t.Fatalf("bench wrote no CSV in %s", benchOut)
	}

	// invoker: a method through the gateway, types by reflection there.
	eps := filepath.Join(dir, "endpoints.json")
	if err := os.WriteFile(eps, []byte(`[{"hostname":"echo.default.example.com"}]`), 0o600); err != nil {
		t.Fatal(err)
	}
	out = vhiveCLI(t, td, "invoker", "-endpointsFile", eps, "-addr", td.gateway, "-rps", "5", "-time", "1", "-no-progress",
		"-latf", filepath.Join(dir, "lat.csv"), "-reqf", filepath.Join(dir, "req.csv"),
		"-method", "echo.v1.Echo/Say", "-data", `{"text":"load"}`)
	req, err := os.ReadFile(filepath.Join(dir, "req.csv"))
	if err != nil {
		t.Fatal(err)
	}
	if strings.Count(string(req), "\n") < 2 || strings.Contains(string(req), "Unimplemented") || strings.Contains(string(req), "Unavailable") {
		t.Fatalf("invoker requests:\n%s\nreport:\n%s", req, out)
	}
}
