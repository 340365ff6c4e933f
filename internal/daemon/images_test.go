package daemon

import (
	"context"
	"strings"
	"testing"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// TestRemoveImageInUse removes, through the control API of a real daemon, an
// image two deployed functions use: the refusal is FailedPrecondition and
// names the image and both functions; once they are removed the image goes.
func TestRemoveImageInUse(t *testing.T) {
	probe := shared.Probe(t)
	td := startDaemon(t, daemonConfig(t, t.TempDir()))
	im := td.importImage(t, probe)
	ctx := context.Background()
	const ref = "localhost/vhive/probe:test"
	for _, fn := range []string{"users-b", "users-a"} {
		td.deploy(t, &vhivepb.FunctionSpec{Name: fn, Image: ref, Sandbox: "runc"})
	}

	for _, arg := range []string{ref, im.GetDigest()} {
		_, err := td.client.RemoveImage(ctx, &vhivepb.RemoveImageRequest{Ref: arg})
		st, _ := status.FromError(err)
		if st.Code() != codes.FailedPrecondition {
			t.Fatalf("rm %s while used: %v, want FailedPrecondition", arg, err)
		}
		if want := `is used by functions "users-a", "users-b": remove them first (vhive rm)`; !strings.Contains(st.Message(), want) ||
			!strings.Contains(st.Message(), im.GetDigest()) {
			t.Errorf("rm %s while used: message %q does not name the digest and say %q", arg, st.Message(), want)
		}
	}
	ls, err := td.client.ListImages(ctx, &vhivepb.ListImagesRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if imgs := ls.GetImages(); len(imgs) != 1 || imgs[0].GetRef() != ref || imgs[0].GetDigest() != im.GetDigest() {
		t.Fatalf("refused rm changed the images: %v", imgs)
	}

	for _, fn := range []string{"users-a", "users-b"} {
		if _, err := td.client.RemoveFunction(ctx, &vhivepb.RemoveFunctionRequest{Name: fn}); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := td.client.RemoveImage(ctx, &vhivepb.RemoveImageRequest{Ref: ref}); err != nil {
		t.Fatalf("rm after the functions are gone: %v", err)
	}
}
