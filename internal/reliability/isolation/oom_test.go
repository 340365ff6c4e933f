package isolation

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
)

// TestOverMemoryLimitIsOutOfMemory: a function that allocates beyond its
// memory limit (gVisor and runc; microvm, where the limit is the guest's
// RAM and the guest kernel's OOM killer acts, when its assets are built) is
// killed, and the caller is told it ran
// out of memory (ResourceExhausted naming the limit), not that it crashed;
// the metrics count it as oom. The next request starts a fresh instance.
func TestOverMemoryLimitIsOutOfMemory(t *testing.T) {
	bin := shared.Bin(t)
	metrics := nodetest.Port(t)
	sbs := []string{"gvisor", "runc"}
	if _, err := assets.Load(assets.Dir(testutil.CacheDir())); err == nil {
		sbs = append(sbs, "microvm")
	} else {
		t.Logf("microvm not tested: %v", err)
	}
	// A microVM boot takes 5-40 s on this machine's TCG.
	n := nodetest.Start(t, bin, nodetest.Options{NetPrefix: "h3bm", Subnet: "10.188.3.0/24", NoGateway: true,
		Metrics: metrics, Sandboxes: strings.Join(sbs, ","), Args: []string{"--ready-timeout", "3m"}})
	n.Import(t, shared.GoImage(t, "./internal/reliability/isolation/testdata/netprobe"))
	ctx, cancel := context.WithTimeout(context.Background(), 6*time.Minute)
	defer cancel()
	for _, sb := range sbs {
		t.Run(sb, func(t *testing.T) {
			fn := "oom-" + sb
			n.Deploy(t, &vhivepb.FunctionSpec{Name: fn, Image: probeRef, Sandbox: sb, MemoryLimitMib: 128})
			invoke := func(p string) (string, error) {
				r, err := n.Client.Invoke(ctx, &vhivepb.InvokeRequest{Function: fn, Payload: []byte(p)})
				return string(r.GetPayload()), err
			}
			// Under the limit it works: the limit is not what fails.
			if got, err := invoke("alloc 16"); err != nil || got != "allocated" {
				t.Fatalf("alloc 16 MiB under a 128 MiB limit: %q, %v", got, err)
			}
			_, err := invoke("alloc 400")
			st := status.Convert(err)
			if st.Code() != codes.ResourceExhausted || !strings.Contains(st.Message(), "memory limit of 128 MiB") {
				t.Fatalf("alloc 400 MiB under a 128 MiB limit: %v %q, want ResourceExhausted naming the memory limit", st.Code(), st.Message())
			}
			t.Logf("%s: %s", sb, st.Message())
			if v := n.Metric(t, fmt.Sprintf(`vhive_invocations_total{function=%q,kind="oom"}`, fn)); v != 1 {
				t.Errorf("invocations_total kind=oom of %s = %v; want 1", fn, v)
			}
			deadline := time.Now().Add(30 * time.Second)
			for {
				v := n.Metric(t, fmt.Sprintf(`vhive_instance_exits_total{function=%q,reason="oom"}`, fn))
				if v == 1 {
					break
				}
				if time.Now().After(deadline) {
					t.Fatalf("instance_exits_total reason=oom of %s = %v; want 1", fn, v)
				}
				time.Sleep(100 * time.Millisecond)
			}
			if v := n.Metric(t, fmt.Sprintf(`vhive_instance_exits_total{function=%q,reason="crash"}`, fn)); v != 0 {
				t.Errorf("the out-of-memory kill was also counted as %v crashes", v)
			}
			if got, err := invoke("alloc 1"); err != nil || got != "allocated" {
				t.Fatalf("after the kill, a new instance should serve: %q, %v", got, err)
			}
		})
	}
}
