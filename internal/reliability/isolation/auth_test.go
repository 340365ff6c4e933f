package isolation

import (
	"context"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/api"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
)

const token = "h3b-test-token-0123456789abcdef"

func writeToken(t *testing.T, dir, tok string, mode os.FileMode) string {
	t.Helper()
	p := filepath.Join(dir, "token")
	if err := os.WriteFile(p, []byte(tok+"\n"), mode); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(p, mode); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestControlTCPToken: on TCP the control API refuses every call without the
// token (or with another) as Unauthenticated, and serves the CLI that has it
// (--token-file or VHIVE_TOKEN, --socket tcp:// or VHIVE_SOCKET); the unix
// socket stays 0600.
func TestControlTCPToken(t *testing.T) {
	bin := shared.Bin(t)
	tokFile := writeToken(t, t.TempDir(), token, 0o600)
	addr := nodetest.Port(t)
	n := nodetest.Start(t, bin, nodetest.Options{NetPrefix: "h3bt", Subnet: "10.188.5.0/24", NoGateway: true,
		Args: []string{"--control-tcp", addr, "--control-token-file", tokFile}})
	if fi, err := os.Stat(n.Socket); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("unix control socket mode %v, %v; want 0600", fi.Mode(), err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()

	call := func(opts ...grpc.DialOption) error {
		conn, err := grpc.NewClient("passthrough:///"+addr, append(opts, grpc.WithTransportCredentials(insecure.NewCredentials()))...)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		c := vhivepb.NewControlClient(conn)
		_, err = c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
		if err == nil {
			// A call that changes state must be refused just the same.
			_, err = c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "x", Image: "y"}})
			if status.Code(err) == codes.InvalidArgument || status.Code(err) == codes.NotFound || status.Code(err) == codes.Unavailable {
				err = nil // it reached the handler: authenticated
			}
		}
		return err
	}
	for name, opts := range map[string][]grpc.DialOption{
		"no token":                 nil,
		"wrong token":              {grpc.WithPerRPCCredentials(api.TokenCredentials{Token: "h3b-test-token-0123456789abcdeX"})},
		"token prefix":             {grpc.WithPerRPCCredentials(api.TokenCredentials{Token: token[:len(token)-1]})},
		"token with a suffix":      {grpc.WithPerRPCCredentials(api.TokenCredentials{Token: token + "0"})},
		"token without the scheme": {grpc.WithPerRPCCredentials(rawHeader(token))},
	} {
		if err := call(opts...); status.Code(err) != codes.Unauthenticated {
			t.Errorf("%s: got %v, want Unauthenticated", name, err)
		}
	}
	if err := call(grpc.WithPerRPCCredentials(api.TokenCredentials{Token: token})); err != nil {
		t.Fatalf("with the token: %v", err)
	}
	// Nothing an unauthenticated call sent was stored.
	ls, err := n.Client.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
	if err != nil || len(ls.Functions) != 0 {
		t.Fatalf("functions after the refused calls: %v, %v", ls.GetFunctions(), err)
	}

	cli := func(env []string, args ...string) (string, error) {
		cmd := exec.CommandContext(ctx, bin, args...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.CombinedOutput()
		return string(out), err
	}
	out, err := cli([]string{"VHIVE_TOKEN="}, "--socket", "tcp://"+addr, "ls")
	if err == nil || !strings.Contains(out, "Unauthenticated") {
		t.Errorf("vhive ls over TCP without a token: %v %q, want an Unauthenticated error", err, out)
	}
	for name, run := range map[string]func() (string, error){
		"--token-file": func() (string, error) { return cli(nil, "--socket", "tcp://"+addr, "--token-file", tokFile, "ls") },
		"VHIVE_TOKEN":  func() (string, error) { return cli([]string{"VHIVE_TOKEN=" + token}, "--socket", "tcp://"+addr, "ls") },
		"VHIVE_SOCKET+VHIVE_TOKEN": func() (string, error) {
			return cli([]string{"VHIVE_SOCKET=tcp://" + addr, "VHIVE_TOKEN=" + token}, "ls")
		},
	} {
		if out, err := run(); err != nil {
			t.Errorf("vhive ls over TCP with %s: %v\n%s", name, err, out)
		}
	}
	if out, err := cli(nil, "--socket", "tcp://"+addr, "--token-file", tokFile, "deployer", "-h"); err != nil {
		t.Errorf("vhive deployer -h: %v\n%s", err, out)
	}
}

type rawHeader string

func (r rawHeader) GetRequestMetadata(context.Context, ...string) (map[string]string, error) {
	return map[string]string{api.TokenHeader: string(r)}, nil
}
func (rawHeader) RequireTransportSecurity() bool { return false }

// TestControlTCPRefusedWithoutToken: the daemon does not start a TCP control
// API without a token unless told to (--control-tcp-insecure), nor with a
// token file others can read or a token too short to be one.
func TestControlTCPRefusedWithoutToken(t *testing.T) {
	testutil.RequiresRoot(t)
	bin := shared.Bin(t)
	dir := t.TempDir()
	addr := nodetest.Port(t)
	cases := map[string]struct {
		args []string
		want string
	}{
		"no token file":        {[]string{"--control-tcp", addr}, "--control-token-file"},
		"readable token file":  {[]string{"--control-tcp", addr, "--control-token-file", writeToken(t, t.TempDir(), token, 0o644)}, "chmod 600"},
		"short token":          {[]string{"--control-tcp", addr, "--control-token-file", writeToken(t, t.TempDir(), "short", 0o600)}, "too short"},
		"missing token file":   {[]string{"--control-tcp", addr, "--control-token-file", filepath.Join(dir, "none")}, "no such file"},
		"token file, no TCP":   {[]string{"--control-token-file", writeToken(t, t.TempDir(), token, 0o600)}, "--control-tcp"},
		"tcp:// as the socket": {[]string{"--socket", "tcp://" + addr}, "--control-tcp"},
	}
	for name, c := range cases {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		args := append([]string{"daemon", "--state-dir", filepath.Join(dir, "state"), "--gateway", "off", "--sandboxes", "runc",
			"--net-prefix", "h3bu", "--subnet", "10.188.6.0/24"}, c.args...)
		if !strings.Contains(strings.Join(c.args, " "), "--socket") {
			args = append(args, "--socket", filepath.Join(dir, "s.sock"))
		}
		out, err := exec.CommandContext(ctx, bin, args...).CombinedOutput()
		cancel()
		if err == nil || !strings.Contains(string(out), c.want) {
			t.Errorf("%s: daemon exited with %v, output %q; want a refusal naming %q", name, err, out, c.want)
		}
	}
	// Explicitly insecure: it starts, and serves TCP without a token.
	n := nodetest.Start(t, bin, nodetest.Options{NetPrefix: "h3bu", Subnet: "10.188.6.0/24", NoGateway: true,
		Args: []string{"--control-tcp", addr, "--control-tcp-insecure"}})
	if !n.LogContains("WITHOUT authentication") {
		t.Errorf("the insecure TCP control API is not logged as such:\n%s", n.LogTail(2048))
	}
	conn, err := grpc.NewClient("passthrough:///"+addr, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if _, err := vhivepb.NewControlClient(conn).ListFunctions(context.Background(), &vhivepb.ListFunctionsRequest{}); err != nil {
		t.Fatalf("insecure TCP control API: %v", err)
	}
}
