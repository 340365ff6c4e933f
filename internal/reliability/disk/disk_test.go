// Package disk holds the full-disk tests of docs/reliability.md §2: a real
// `vhive daemon` whose state directory is a small loop-mounted ext4 file
// system, filled up while it runs.
package disk

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/status"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
	"vhive.dev/vhive/internal/nodetest"
	"vhive.dev/vhive/internal/testutil"
)

// Test resources of this package (issue 13, helper H13a).
const (
	diskPrefix = "h13d"
	diskSubnet = "10.187.3.0/24"
	fsMiB      = 320
	enospc     = "no space left on device"
)

var shared nodetest.Shared

func TestMain(m *testing.M) {
	code := m.Run()
	shared.Cleanup()
	os.Exit(code)
}

// smallFS creates a fsMiB ext4 file system in a file, loop-mounts it on a
// new directory and returns that directory; it is unmounted (and the loop
// device detached) when the test ends, also on failure.
func smallFS(t *testing.T) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "state.ext4")
	if err := os.WriteFile(img, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, fsMiB<<20); err != nil {
		t.Fatal(err)
	}
	// -m 0: no blocks reserved for root (the daemon runs as root).
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", "-m", "0", img).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v\n%s", err, out)
	}
	mnt, err := os.MkdirTemp("", "h13d")
	if err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-o", "loop", img, mnt).CombinedOutput(); err != nil {
		os.Remove(mnt)
		t.Fatalf("mount -o loop %s: %v\n%s", img, err, out)
	}
	t.Cleanup(func() {
		// The loop device was set up with autoclear: unmounting
		// detaches it. A busy mount is detached lazily.
		if out, err := exec.Command("umount", mnt).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v %s; detaching lazily", mnt, err, out)
			_ = exec.Command("umount", "-l", mnt).Run()
		}
		os.Remove(mnt)
		if out, _ := exec.Command("losetup", "-j", img).Output(); len(strings.TrimSpace(string(out))) > 0 {
			t.Errorf("loop device still attached: %s", out)
		}
	})
	return mnt
}

func avail(t *testing.T, dir string) int64 {
	t.Helper()
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Bavail) * st.Bsize
}

// fill leaves about free bytes available on the file system of dir by
// growing the ballast file (fallocate); free 0 fills it completely.
func fill(t *testing.T, ballast string, free int64) {
	t.Helper()
	f, err := os.OpenFile(ballast, os.O_CREATE|os.O_WRONLY, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(0); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	n := avail(t, filepath.Dir(ballast)) - free
	if free == 0 {
		n -= 1 << 20 // the extent tree needs room too; the rest is written below
	}
	if n > 0 {
		if err := unix.Fallocate(int(f.Fd()), 0, 0, n); err != nil {
			t.Fatalf("fallocate %d bytes: %v", n, err)
		}
	}
	if free == 0 {
		// Whatever fallocate's rounding left: write until ENOSPC.
		buf := make([]byte, 4096)
		for {
			if _, err := f.Write(buf); err != nil {
				break
			}
		}
	}
	_ = f.Sync()
}

// TestFullDisk: with the state dir on a small ext4 file system that runs
// full, an image import and snapshots (gVisor checkpoint, wasm memory) that
// do not fit fail with an error naming ENOSPC and leave no partial file;
// the daemon keeps serving the functions it has, warm and cold; once space
// is freed the next snapshot and import succeed, and a restart finds
// everything.
func TestFullDisk(t *testing.T) {
	testutil.RequiresRoot(t)
	testutil.RunscPath(t)
	work := t.TempDir()
	hello := shared.Helloworld(t)
	counter := shared.Function(t, "counter", false)
	counterW := shared.Function(t, "counter", true)
	big := nodetest.Variant(t, hello, filepath.Join(work, "big"), "localhost/h13/big:t", 32<<20, 13)

	mnt := smallFS(t)
	state := filepath.Join(mnt, "state")
	ballast := filepath.Join(mnt, "ballast")
	d := nodetest.Start(t, shared.Bin(t), nodetest.Options{StateDir: state, Sandboxes: "runc,gvisor,wasm", NetPrefix: diskPrefix, Subnet: diskSubnet,
		Log: filepath.Join(work, "daemon.log"), NoGateway: true})
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("daemon log tail:\n%s", d.LogTail(6000))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	c := d.Client
	for _, p := range []string{hello, counter, counterW} {
		if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: p}); err != nil {
			t.Fatalf("import %s: %v", p, err)
		}
	}
	deploy := func(name, image, sb, mode string) {
		t.Helper()
		if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: name, Image: image, Sandbox: sb, StartMode: mode}}); err != nil {
			t.Fatalf("deploy %s: %v", name, err)
		}
	}
	invoke := func(name, want, wantMode string) *vhivepb.InvokeResponse {
		t.Helper()
		r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte("x")})
		if err != nil {
			t.Fatalf("invoke %s: %v", name, err)
		}
		if !strings.HasPrefix(string(r.Payload), want) || (wantMode != "" && r.StartMode != wantMode) {
			t.Fatalf("invoke %s = %q in mode %s, want %q… in mode %s", name, r.Payload, r.StartMode, want, wantMode)
		}
		return r
	}
	stop := func(name string) {
		t.Helper()
		if _, err := c.StopInstances(ctx, &vhivepb.StopInstancesRequest{Function: name}); err != nil {
			t.Fatal(err)
		}
	}
	snapshots := func(name string) []*vhivepb.SnapshotInfo {
		t.Helper()
		ls, err := c.ListSnapshots(ctx, &vhivepb.ListSnapshotsRequest{Function: name})
		if err != nil {
			t.Fatal(err)
		}
		return ls.Snapshots
	}
	deploy("hello", "localhost/vhive/helloworld:latest", "runc", "boot")
	deploy("hello-g", "localhost/vhive/helloworld:latest", "gvisor", "boot")
	deploy("cnt-g", "localhost/vhive/counter:latest", "gvisor", "snapshot")
	deploy("cnt-w", "localhost/vhive/counter-wasm:latest", "wasm", "lazy")
	invoke("hello", "Hello, x!", "boot")
	invoke("hello-g", "Hello, x!", "boot")
	// The wasm module is compiled (and cached) before the disk is full:
	// a boot-mode twin of cnt-w warms the cache without a snapshot.
	deploy("cnt-wb", "localhost/vhive/counter-wasm:latest", "wasm", "boot")
	invoke("cnt-wb", "count=1 ", "boot")
	images0, _ := c.ListImages(ctx, &vhivepb.ListImagesRequest{})
	t.Logf("state dir %s on a %d MiB ext4; %d MiB free before the ballast", state, fsMiB, avail(t, mnt)>>20)

	// 1. Import of an image that does not fit: 4 MiB free for 32 MiB.
	fill(t, ballast, 4<<20)
	_, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: big})
	t.Logf("import with %d KiB free: %v", avail(t, mnt)>>10, err)
	if err == nil || !strings.Contains(err.Error(), enospc) {
		t.Fatalf("import that does not fit: %v; want an error naming %q", err, enospc)
	}
	if ents, _ := os.ReadDir(filepath.Join(state, "images", "tmp")); len(ents) > 0 {
		t.Errorf("the failed import left %d entries in images/tmp", len(ents))
	}
	images1, _ := c.ListImages(ctx, &vhivepb.ListImagesRequest{})
	if len(images1.Images) != len(images0.Images) {
		t.Errorf("images after the failed import: %d, before: %d", len(images1.Images), len(images0.Images))
	}
	digestDirs, _ := os.ReadDir(filepath.Join(state, "images", "digests", "sha256"))
	if len(digestDirs) != 3 {
		t.Errorf("%d digest directories after the failed import, want the 3 imported images", len(digestDirs))
	}

	// 2. Snapshots that do not fit: the gVisor checkpoint and the wasm
	// memory file are written after the first reply and fail; the
	// replies are unaffected, nothing partial remains.
	for _, name := range []string{"cnt-g", "cnt-w"} {
		fill(t, ballast, 2<<20)
		logBefore := fileSize(d.Log)
		invoke(name, "count=1 ", "boot")
		line := waitLog(t, d.Log, logBefore, "snapshot failed", name)
		t.Logf("%s snapshot with 2 MiB free: %s", name, line)
		if !strings.Contains(line, enospc) {
			t.Errorf("%s: snapshot failure %q does not name %q", name, line, enospc)
		}
		if s := snapshots(name); len(s) != 0 {
			t.Errorf("%s: a snapshot that did not fit is listed: %v", name, s)
		}
		if l := partial(state); len(l) > 0 {
			t.Errorf("%s: partial snapshot files visible: %v", name, l)
		}
	}

	// 3. Completely full: existing functions keep serving, warm and cold.
	fill(t, ballast, 0)
	t.Logf("disk full: %d bytes free", avail(t, mnt))
	for _, name := range []string{"hello", "hello-g"} {
		invoke(name, "Hello, x!", "")
	}
	for _, name := range []string{"hello", "cnt-wb"} {
		stop(name)
		_, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: name, Payload: []byte("x")})
		t.Logf("cold start of %s on a full disk: %v", name, err)
		if err != nil && !strings.Contains(err.Error(), enospc) {
			t.Errorf("cold start of %s on a full disk failed without naming ENOSPC: %v (%s)", name, err, status.Code(err))
		}
	}
	// A deploy and an import on a full disk fail naming ENOSPC, or (if
	// the database had free pages) the deploy succeeds and is listed.
	nfns := 5
	_, err = c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "late", Image: "localhost/vhive/helloworld:latest", Sandbox: "runc"}})
	t.Logf("deploy on a full disk: %v", err)
	if err == nil {
		nfns++
	} else if !strings.Contains(err.Error(), enospc) {
		t.Errorf("deploy on a full disk failed without naming ENOSPC: %v", err)
	}
	// Deploys with large environments until the state database must grow
	// and cannot: that deploy fails naming ENOSPC and stores nothing.
	bigEnv := map[string]string{"PAD1": strings.Repeat("p", 100<<10), "PAD2": strings.Repeat("q", 100<<10)}
	grew := false
	for i := 0; i < 64 && !grew; i++ {
		name := fmt.Sprintf("pad%d", i)
		_, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: name, Image: "localhost/vhive/helloworld:latest", Sandbox: "runc", Env: bigEnv}})
		switch {
		case err == nil:
			nfns++
		case strings.Contains(err.Error(), enospc):
			t.Logf("deploy %s with a 200 KiB environment on a full disk: %v", name, err)
			grew = true
		default:
			t.Fatalf("deploy %s on a full disk: %v; want success or an error naming ENOSPC", name, err)
		}
	}
	if !grew {
		t.Errorf("64 deploys of 200 KiB each never ran out of space")
	}
	if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: big}); err == nil || !strings.Contains(err.Error(), enospc) {
		t.Errorf("import on a full disk: %v; want an error naming ENOSPC", err)
	}
	if fs, err := c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{}); err != nil || len(fs.Functions) != nfns {
		t.Errorf("functions on a full disk: %v, %v", fs, err)
	}
	if !d.Alive() {
		t.Fatal("the daemon died on a full disk")
	}
	// A daemon restarted while the disk is full comes up and serves.
	d.Restart(t)
	c = d.Client
	if fs, err := c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{}); err != nil || len(fs.Functions) != nfns {
		t.Fatalf("functions after a restart on a full disk: %v, %v", fs, err)
	}
	if r, err := c.Invoke(ctx, &vhivepb.InvokeRequest{Function: "hello", Payload: []byte("x")}); err != nil && !strings.Contains(err.Error(), enospc) {
		t.Errorf("cold start after a restart on a full disk: %v", err)
	} else {
		t.Logf("cold start after a restart on a full disk: %q, %v", r.GetPayload(), err)
	}

	// 4. Space freed: the next snapshot of each succeeds and is used, the
	// import succeeds.
	if err := os.Remove(ballast); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, mode string }{{"cnt-g", "snapshot"}, {"cnt-w", "lazy"}} {
		stop(tc.name)
		invoke(tc.name, "count=1 ", "boot")
		for deadline := time.Now().Add(90 * time.Second); len(snapshots(tc.name)) == 0; time.Sleep(100 * time.Millisecond) {
			if time.Now().After(deadline) {
				t.Fatalf("%s: no snapshot 90s after space was freed", tc.name)
			}
		}
		stop(tc.name)
		invoke(tc.name, "count=2 ", tc.mode)
	}
	if _, err := c.ImportImage(ctx, &vhivepb.ImportImageRequest{Path: big}); err != nil {
		t.Fatalf("import after space was freed: %v", err)
	}
	// The database that ran out of space takes writes again.
	if _, err := c.Deploy(ctx, &vhivepb.DeployRequest{Spec: &vhivepb.FunctionSpec{Name: "after", Image: "localhost/vhive/helloworld:latest", Sandbox: "runc"}}); err != nil {
		t.Fatalf("deploy after space was freed: %v", err)
	}
	nfns++
	invoke("after", "Hello, x!", "boot")
	if l := partial(state); len(l) > 0 {
		t.Errorf("partial files: %v", l)
	}

	// 5. A restart on the same state finds every function, image and
	// snapshot, and restores from the snapshots.
	d.Restart(t)
	c = d.Client
	if fs, err := c.ListFunctions(ctx, &vhivepb.ListFunctionsRequest{}); err != nil || len(fs.Functions) != nfns {
		t.Fatalf("functions after restart: %v, %v", fs, err)
	}
	if im, err := c.ListImages(ctx, &vhivepb.ListImagesRequest{}); err != nil || len(im.Images) != 4 {
		t.Fatalf("images after restart: %v, %v", im, err)
	}
	invoke("cnt-g", "count=2 ", "snapshot")
	invoke("cnt-w", "count=2 ", "lazy")
	if err := d.Stop(); err != nil {
		t.Error(err)
	}
	if l := nodetest.Snapshot(state, diskPrefix); l.Count() != 0 {
		t.Errorf("after a clean shutdown: %+v", l)
	}
}

func fileSize(p string) int64 {
	fi, err := os.Stat(p)
	if err != nil {
		return 0
	}
	return fi.Size()
}

// waitLog waits for a log line after offset containing every word.
func waitLog(t *testing.T, path string, offset int64, words ...string) string {
	t.Helper()
	for deadline := time.Now().Add(90 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		b, _ := os.ReadFile(path)
		if int64(len(b)) > offset {
			for _, line := range strings.Split(string(b[offset:]), "\n") {
				ok := true
				for _, w := range words {
					ok = ok && strings.Contains(line, w)
				}
				if ok {
					return line
				}
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no log line with %q within 90s", words)
		}
	}
}

// partial lists temporaries in the image and snapshot stores.
func partial(state string) []string {
	var out []string
	if ents, err := os.ReadDir(filepath.Join(state, "images", "tmp")); err == nil {
		for _, e := range ents {
			out = append(out, "images/tmp/"+e.Name())
		}
	}
	ents, _ := os.ReadDir(filepath.Join(state, "snapshots"))
	for _, e := range ents {
		if strings.HasPrefix(e.Name(), ".") {
			out = append(out, "snapshots/"+e.Name())
		}
	}
	return out
}
