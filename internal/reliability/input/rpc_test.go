package input

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
)

// wantCode checks an RPC's error: one of codes, with a message holding word.
func wantCode(t *testing.T, n *nodetest.Node, what string, err error, word string, want ...codes.Code) {
	t.Helper()
	if !n.Alive() {
		t.Fatalf("%s: the daemon died:\n%s", what, n.LogTail(8192))
	}
	st := status.Convert(err)
	ok := false
	for _, c := range want {
		ok = ok || st.Code() == c
	}
	if !ok || !strings.Contains(strings.ToLower(st.Message()), strings.ToLower(word)) {
		t.Errorf("%s: got %v %q, want %v naming %q", what, st.Code(), st.Message(), want, word)
	}
}

// TestHostileRequests sends bad requests to every RPC but Deploy (which
// FuzzControlDeploy covers): unknown names, path tricks, oversized and
// malformed values. Each must be refused naming what is wrong, the daemon
// must live, and nothing stored may change — also after a restart.
func TestHostileRequests(t *testing.T) {
	n, digest := daemonNode(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	c := n.Client
	// The node is shared with the package's other tests, which may have
	// imported images of their own: nothing stored may change from here.
	imagesBefore := storedImages(ctx, t, c)

	// A file next to the state dir that path tricks would reach.
	canary := filepath.Join(filepath.Dir(n.StateDir), "canary")
	if err := os.WriteFile(canary, []byte("keep me"), 0o600); err != nil {
		t.Fatal(err)
	}

	_, err := c.Deploy(ctx, &vhivepb.DeployRequest{})
	wantCode(t, n, "deploy without a spec", err, "spec", codes.InvalidArgument)

	for _, fn := range []string{"", "nope", "../keep", "keep\x00", strings.Repeat("k", 1<<16)} {
		_, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte("x")})
		wantCode(t, n, "invoke "+trunc(fn), err, "function", codes.NotFound)
		_, err = c.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: fn})
		wantCode(t, n, "remove function "+trunc(fn), err, "function", codes.NotFound)
		_, err = c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: fn})
		if fn != "" {
			wantCode(t, n, "stop instances "+trunc(fn), err, "function", codes.NotFound)
		}
		_, err = c.ListInstances(ctx, &vhivepb.ListInstancesRequest{Function: fn})
		if fn != "" {
			wantCode(t, n, "list instances "+trunc(fn), err, "function", codes.NotFound)
		}
	}
	// Payload sizes: the daemon's limit (1 MiB) is checked before any
	// instance starts; beyond gRPC's 4 MiB message limit gRPC refuses.
	for _, size := range []int{1<<20 + 1, 4<<20 - 64} {
		_, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: "keep", Payload: bytes.Repeat([]byte("p"), size)})
		wantCode(t, n, "invoke with a payload of "+itoa(size)+" bytes", err, "payload", codes.InvalidArgument)
	}
	_, err = c.Invoke(ctx, &vhivepb.InvokeRequest{Function: "keep", Payload: bytes.Repeat([]byte("p"), 5<<20)})
	wantCode(t, n, "invoke with a payload of 5 MiB", err, "message", codes.ResourceExhausted)
	for _, ms := range []int64{-1, 1 << 62} {
		_, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: "keep", TimeoutMs: ms})
		wantCode(t, n, "invoke with timeout_ms "+itoa(int(ms)), err, "timeout_ms", codes.InvalidArgument)
	}

	for _, id := range []string{"", ".", "..", "../canary", "../../canary", "/etc", "a/../../canary", "x\x00", ".trash", strings.Repeat("s", 5000)} {
		_, err := c.InspectSnapshot(ctx, &vhivepb.InspectSnapshotRequest{Id: id})
		wantCode(t, n, "inspect snapshot "+trunc(id), err, "", codes.NotFound, codes.InvalidArgument)
		_, err = c.RemoveSnapshot(ctx, &vhivepb.RemoveSnapshotRequest{Id: id})
		wantCode(t, n, "remove snapshot "+trunc(id), err, "", codes.NotFound, codes.InvalidArgument)
	}
	for _, fn := range []string{"../", "..", "/"} {
		ls, err := c.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: fn})
		if err == nil && len(ls.Snapshots) != 0 {
			t.Errorf("list snapshots of %q: %d snapshots, want none", fn, len(ls.Snapshots))
		}
	}

	for _, ref := range []string{"", " ", "UPPER", "a b", "x\x00", "sha256:zz", "../../canary", strings.Repeat("r", 5000), "localhost/vhive/none:latest", "sha256:" + strings.Repeat("0", 64)} {
		_, err := c.RemoveImage(ctx, &vhivepb.RemoveImageRequest{Ref: ref})
		wantCode(t, n, "remove image "+trunc(ref), err, "", codes.NotFound, codes.InvalidArgument)
	}
	_, err = c.RemoveImage(ctx, &vhivepb.RemoveImageRequest{Ref: helloRef})
	wantCode(t, n, "remove the image a function uses", err, `used by function "keep"`, codes.FailedPrecondition)

	for _, ref := range []string{"", " ", "a b", "x\x00", "UPPER/Case", "@@@"} {
		_, err := c.PullImage(ctx, &vhivepb.PullImageRequest{Ref: ref})
		wantCode(t, n, "pull "+trunc(ref), err, "", codes.InvalidArgument)
	}
	// Loopback only, refusing every connection.
	reg, err := refusedAddr()
	if err != nil {
		t.Fatal(err)
	}
	_, err = c.PullImage(ctx, &vhivepb.PullImageRequest{Ref: reg + "/none:1"})
	wantCode(t, n, "pull from a registry that is not there", err, reg, codes.Unavailable, codes.NotFound)

	empty := t.TempDir()
	notTar := filepath.Join(empty, "not.tar")
	os.WriteFile(notTar, bytes.Repeat([]byte("garbage\n"), 1000), 0o600)
	for _, p := range []string{"", "relative/dir", "/nonexistent/x", empty, notTar, "/etc/passwd", canary, "/proc/self/status", "/dev/null"} {
		_, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: p})
		wantCode(t, n, "import "+trunc(p), err, "", codes.InvalidArgument, codes.NotFound)
	}
	_, err = c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: shared.Helloworld(t), Ref: "Bad Ref!"})
	wantCode(t, n, "import under a bad ref", err, "ref", codes.InvalidArgument)

	if b, err := os.ReadFile(canary); err != nil || string(b) != "keep me" {
		t.Fatalf("canary next to the state dir: %q, %v", b, err)
	}
	checkStored := func(when string) {
		t.Helper()
		ls, err := c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{})
		if err != nil || len(ls.Functions) != 1 || ls.Functions[0].Spec.Name != "keep" {
			t.Fatalf("%s: functions %v, %v; want only keep", when, ls.GetFunctions(), err)
		}
		if got := storedImages(ctx, t, c); got != imagesBefore || !strings.Contains(got, helloRef+"@"+digest+"\n") {
			t.Fatalf("%s: images\n%s\nwant, as before the bad requests (with %s@%s),\n%s", when, got, helloRef, digest, imagesBefore)
		}
	}
	checkStored("after the bad requests")
	if n.LogContains("panic") {
		t.Fatalf("the daemon's log mentions a panic:\n%s", n.LogTail(8192))
	}
	// What is stored is what a restarted daemon finds.
	n.Restart(t)
	c = n.Client
	checkStored("after a restart")
}

func trunc(s string) string {
	if len(s) > 40 {
		return strings.ToValidUTF8(s[:40], "?") + "…"
	}
	return s
}

func itoa(n int) string { return strconv.Itoa(n) }

// storedImages lists the daemon's images as sorted "ref@digest" lines.
func storedImages(ctx context.Context, t *testing.T, c vhivepb.ControlClient) string {
	t.Helper()
	im, err := c.ListImages(ctx, &vhivepb.ListImagesRequest{})
	if err != nil {
		t.Fatalf("list images: %v", err)
	}
	lines := make([]string, 0, len(im.Images))
	for _, i := range im.Images {
		lines = append(lines, i.Ref+"@"+i.Digest+"\n")
	}
	sort.Strings(lines)
	return strings.Join(lines, "")
}
