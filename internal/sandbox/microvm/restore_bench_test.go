package microvm

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"vhive.dev/vhive/internal/sandbox"
)

// BenchmarkRestoreStages restores one snapshot of testfn b.N times (lazy
// memory, one clone at a time) and reports the mean of each restore stage
// in ms/op, and the time to the first reply: ResumeAgent is the agent's handshake (clock, entropy; before
// clones shared one guest address it also re-addressed eth0).
//
//	go test -run XXX -bench RestoreStages -benchtime 5x -timeout 20m ./internal/sandbox/microvm/
func BenchmarkRestoreStages(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	src := e.start(b, e.spec("bench-src"))
	get(b, src.Endpoint(), "/count")
	dir := b.TempDir()
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		b.Fatal(err)
	}
	if err := src.Stop(ctx); err != nil {
		b.Fatal(err)
	}
	sums := map[string]time.Duration{}
	var total time.Duration
	b.ResetTimer()
	for i := range b.N {
		t0 := time.Now()
		rs, err := e.b.Restore(ctx, e.spec(fmt.Sprintf("bench-%d", i)), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
		if err != nil {
			b.Fatal(err)
		}
		// A long timeout: a guest whose ARP cache holds a gateway MAC of
		// the snapshot's netns answers only once the entry expires.
		resp, err := (&http.Client{Timeout: 3 * time.Minute}).Get("http://" + rs.Endpoint() + "/count")
		if err != nil {
			b.Fatal(err)
		}
		resp.Body.Close()
		total += time.Since(t0)
		for k, v := range rs.(sandbox.RestoreReporter).RestoreStats().Stages {
			sums[k] += v
		}
		b.StopTimer()
		if err := rs.Stop(ctx); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	for k, v := range sums {
		b.ReportMetric(float64(v.Microseconds())/1000/float64(b.N), k+"-ms/op")
	}
	b.ReportMetric(float64(total.Microseconds())/1000/float64(b.N), "to-first-reply-ms/op")
}

// BenchmarkPlugTap is the network part of a Create or Restore and of its
// Stop, without a VM: the tap (plugTap, on the cold start's path), the
// netns's nftables table and forwarding switch (natUp, overlapping QEMU's
// start), then their removal (unplugTap).
//
//	go test -run XXX -bench PlugTap -benchtime 50x ./internal/sandbox/microvm/
func BenchmarkPlugTap(b *testing.B) {
	e := newEnv(b)
	ctx := context.Background()
	n, err := e.pool.Get(ctx)
	if err != nil {
		b.Fatal(err)
	}
	defer e.pool.Put(ctx, n)
	var plug, natT, unplug time.Duration
	for range b.N {
		t0 := time.Now()
		tap, err := plugTap(n)
		if err != nil {
			b.Fatal(err)
		}
		t1 := time.Now()
		nat := startNAT(ctx, n)
		if err := nat.wait(); err != nil {
			b.Fatal(err)
		}
		t2 := time.Now()
		tap.Close()
		if err := unplugTap(ctx, n, nat.fwdBefore); err != nil {
			b.Fatal(err)
		}
		plug, natT, unplug = plug+t1.Sub(t0), natT+t2.Sub(t1), unplug+time.Since(t2)
	}
	b.ReportMetric(float64(plug.Microseconds())/1000/float64(b.N), "plug-ms/op")
	b.ReportMetric(float64(natT.Microseconds())/1000/float64(b.N), "nat-ms/op")
	b.ReportMetric(float64(unplug.Microseconds())/1000/float64(b.N), "unplug-ms/op")
}
