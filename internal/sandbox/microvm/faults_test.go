package microvm

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"

	"vhive.dev/vhive/internal/microvm/assets"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/sandbox"
)

// qemuPid reads the pid of instance id's QEMU.
func (e *env) qemuPid(t testing.TB, id string) int {
	t.Helper()
	data, err := os.ReadFile(filepath.Join(e.b.InstanceDir(id), "qemu.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

// leftovers lists what instance id (its QEMU was pid, 0 if it never ran)
// still holds: the process, its directory, sockets and RAM file, a tap or
// bridge in any of the pool's network namespaces.
func (e *env) leftovers(t testing.TB, id string, pid int) []string {
	t.Helper()
	var out []string
	if pid > 0 {
		if st, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid)); err == nil && !strings.Contains(string(st), ") Z ") {
			out = append(out, fmt.Sprintf("QEMU pid %d", pid))
		}
	}
	base := e.b.sockBase(id)
	for _, p := range []string{e.b.InstanceDir(id), base + ".qmp", base + ".agent", e.b.MemoryFile(id)} {
		if _, err := os.Stat(p); err == nil {
			out = append(out, p)
		}
	}
	names, err := netpool.NetnsNames(func(n string) bool { return netpool.OwnName(e.prefix, n) })
	if err != nil {
		t.Fatal(err)
	}
	for _, name := range names {
		ns, err := netns.GetFromName(name)
		if err != nil {
			continue
		}
		h, err := netlink.NewHandleAt(ns)
		ns.Close()
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range []string{tapName} {
			if _, err := h.LinkByName(l); err == nil {
				out = append(out, l+" in netns "+name)
			}
		}
		h.Close()
	}
	return out
}

// stopClean stops sb and fails the test if anything of it is left.
func (e *env) stopClean(t testing.TB, sb sandbox.Sandbox, pid int) {
	t.Helper()
	if err := sb.Stop(context.Background()); err != nil {
		t.Errorf("Stop: %v", err)
	}
	if l := e.leftovers(t, sb.ID(), pid); len(l) > 0 {
		t.Errorf("%s left %v", sb.ID(), l)
	}
}

type guestInfo struct {
	NumCPU      int   `json:"num_cpu"`
	MemTotalKiB int64 `json:"mem_total_kib"`
}

// TestLimitsReachGuest: Spec.CPULimit becomes the guest's vCPU count
// (rounded up: 1.5 cores → 2) and Spec.MemoryLimit its RAM, as the function
// sees them (runtime.NumCPU, /proc/meminfo).
func TestLimitsReachGuest(t *testing.T) {
	e := newEnv(t)
	spec := e.spec("limits")
	spec.CPULimit = 1.5
	spec.MemoryLimit = 192 << 20
	sb := e.start(t, spec)
	var info guestInfo
	if err := json.Unmarshal([]byte(get(t, sb.Endpoint(), "/info")), &info); err != nil {
		t.Fatal(err)
	}
	t.Logf("guest: %d CPUs, MemTotal %d KiB", info.NumCPU, info.MemTotalKiB)
	if info.NumCPU != 2 {
		t.Errorf("guest has %d CPUs, want 2 (CPULimit 1.5 rounded up)", info.NumCPU)
	}
	// MemTotal is the RAM less what the kernel reserves for itself.
	if info.MemTotalKiB > 192<<10 || info.MemTotalKiB < 128<<10 {
		t.Errorf("guest MemTotal %d KiB, want a little less than 192 MiB", info.MemTotalKiB)
	}
	e.stopClean(t, sb, 0)
}

// TestOutOfMemory: a function that allocates beyond its VM's RAM is ended
// by the guest kernel's OOM killer, and the sandbox's Err wraps
// sandbox.ErrOutOfMemory (the daemon's ResourceExhausted) rather than
// reporting a crash; the instance leaves nothing behind.
func TestOutOfMemory(t *testing.T) {
	e := newEnv(t)
	spec := e.spec("oom")
	spec.MemoryLimit = 128 << 20
	sb := e.start(t, spec)
	pid := e.qemuPid(t, spec.ID)
	// Under the RAM size an allocation works; one allocation of twice the
	// RAM is not refused (which would end a Go function with "out of
	// memory" and status 2) but gets the function OOM-killed.
	if got := get(t, sb.Endpoint(), "/alloc?mb=16"); got != "16" {
		t.Fatalf("/alloc?mb=16 = %q", got)
	}
	c := &http.Client{Timeout: 2 * time.Minute}
	resp, err := c.Get("http://" + sb.Endpoint() + "/alloc?mb=256")
	if err == nil {
		resp.Body.Close()
		t.Fatalf("allocating 256 MiB in a 128 MiB guest answered %s", resp.Status)
	}
	t.Logf("/alloc?mb=256: %v", err)
	select {
	case <-sb.Done():
	case <-time.After(2 * time.Minute):
		t.Fatal("the instance still runs after allocating 256 MiB in a 128 MiB guest")
	}
	err = sb.Err()
	t.Logf("Err: %v", err)
	if !errors.Is(err, sandbox.ErrOutOfMemory) {
		t.Errorf("Err = %v, want it to wrap sandbox.ErrOutOfMemory", err)
	}
	e.stopClean(t, sb, pid)
}

// TestGuestKernelPanic: a guest whose kernel panics (here: no init to run)
// fails Start with ErrGuestPanic naming the panic, with the console's
// tail, and Stop leaves nothing behind.
func TestGuestKernelPanic(t *testing.T) {
	e := newEnv(t, func(c *Config) { c.kernelArgs = "rdinit=/no-such-init" })
	ctx := context.Background()
	sb, err := e.b.Create(ctx, e.spec("panic"))
	if err != nil {
		t.Fatal(err)
	}
	err = sb.Start(ctx)
	t.Logf("Start: %v", err)
	if !errors.Is(err, ErrGuestPanic) || !strings.Contains(err.Error(), "Kernel panic - not syncing") {
		t.Errorf("Start = %v, want ErrGuestPanic with the panic line", err)
	}
	if !strings.Contains(err.Error(), "console:") {
		t.Errorf("Start = %v, want the console's tail", err)
	}
	if err := sb.Err(); !errors.Is(err, ErrGuestPanic) {
		t.Errorf("Err = %v, want ErrGuestPanic", err)
	}
	e.stopClean(t, sb, 0)
}

// TestQEMUKilled: QEMU killed with SIGKILL under a running instance ends
// it with an Err naming QEMU's death and the signal; Stop then releases
// everything.
func TestQEMUKilled(t *testing.T) {
	e := newEnv(t)
	sb := e.start(t, e.spec("qemukill"))
	pid := e.qemuPid(t, "qemukill")
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sb.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("Done not closed 30s after QEMU was killed")
	}
	err := sb.Err()
	t.Logf("Err: %v", err)
	if !errors.Is(err, ErrQEMUDied) || !strings.Contains(err.Error(), "signal 9 (killed)") || !strings.Contains(err.Error(), strconv.Itoa(pid)) {
		t.Errorf("Err = %v, want ErrQEMUDied naming pid %d and signal 9", err, pid)
	}
	e.stopClean(t, sb, pid)
}

// copyAssets copies the kernel and initramfs into a temporary cache and
// returns a manifest naming the copies (the real cache is never touched).
func copyAssets(t *testing.T) *assets.Manifest {
	t.Helper()
	dir := t.TempDir()
	m := *testAssets
	for _, f := range []*string{&m.Vmlinuz, &m.Initramfs} {
		data, err := os.ReadFile(*f)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, filepath.Base(*f))
		if err := os.WriteFile(p, data, 0o644); err != nil {
			t.Fatal(err)
		}
		*f = p
	}
	return &m
}

// TestBadAssets: a missing, truncated or altered kernel or initramfs is
// refused by New with an error naming the file and the digest mismatch;
// one that cannot be checked fails Start naming it; a corrupt rootfs disk fails Start naming the disk's mount, with the
// console's tail, and leaves nothing behind.
func TestBadAssets(t *testing.T) {
	for _, tc := range []struct {
		name string
		mut  func(t *testing.T, m *assets.Manifest)
		want []string
	}{
		{"missing-kernel", func(t *testing.T, m *assets.Manifest) { os.Remove(m.Vmlinuz) }, []string{"kernel", "no such file"}},
		{"truncated-kernel", func(t *testing.T, m *assets.Manifest) {
			if err := os.Truncate(m.Vmlinuz, 1<<20); err != nil {
				t.Fatal(err)
			}
		}, []string{"kernel", "is corrupt", "1048576 bytes"}},
		{"flipped-initramfs", func(t *testing.T, m *assets.Manifest) { flipByte(t, m.Initramfs, 4096) }, []string{"initramfs", "is corrupt"}},
		{"missing-initramfs", func(t *testing.T, m *assets.Manifest) { os.Remove(m.Initramfs) }, []string{"initramfs", "no such file"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			m := copyAssets(t)
			tc.mut(t, m)
			e := newEnv(t) // for its pool and a valid Root
			cfg := e.b.cfg
			cfg.Assets = m
			_, err := New(context.Background(), cfg)
			t.Logf("New: %v", err)
			if err == nil {
				t.Fatal("New accepted the bad asset")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("New = %v, want it to say %q", err, w)
				}
			}
		})
	}
	// A kernel the manifest has no digest for (New cannot check it) that
	// does not start: Start names it.
	t.Run("truncated-kernel-unchecked", func(t *testing.T) {
		m := copyAssets(t)
		if err := os.Truncate(m.Vmlinuz, 4<<20); err != nil {
			t.Fatal(err)
		}
		m.VmlinuzSHA256 = ""
		e := newEnv(t, func(c *Config) { c.Assets = m })
		ctx := context.Background()
		sb, err := e.b.Create(ctx, e.spec("badkernel"))
		if err != nil {
			t.Fatal(err)
		}
		err = sb.Start(ctx)
		t.Logf("Start: %v", err)
		if err == nil || !strings.Contains(err.Error(), "the kernel did not start") || !strings.Contains(err.Error(), m.Vmlinuz) {
			t.Errorf("Start = %v, want it to say that the kernel %s did not start", err, m.Vmlinuz)
		}
		e.stopClean(t, sb, 0)
	})
	t.Run("corrupt-rootfs", func(t *testing.T) {
		e := newEnv(t)
		ctx := context.Background()
		disk, err := e.b.rootfs.Get(ctx, testDigest, testRootfs)
		if err != nil {
			t.Fatal(err)
		}
		// The ext4 superblock's magic (offset 1024 + 0x38): the guest
		// cannot mount the disk.
		flipByte(t, disk, 1024+0x38)
		sb, err := e.b.Create(ctx, e.spec("badroot"))
		if err != nil {
			t.Fatal(err)
		}
		err = sb.Start(ctx)
		t.Logf("Start: %v", err)
		if err == nil || !strings.Contains(err.Error(), "/dev/vda") || !strings.Contains(err.Error(), disk) || !strings.Contains(err.Error(), "console:") {
			t.Errorf("Start = %v, want a failure to mount the image disk %s naming it, with the console's tail", err, disk)
		}
		e.stopClean(t, sb, 0)
	})
}

func flipByte(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xff
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestSnapshotCompatibility: a snapshot taken with another QEMU version,
// accelerator, kernel, initramfs or machine (RAM, vCPUs, devices), or
// whose metadata lacks those (an older snapshot), is refused before any
// QEMU starts: the Restore error wraps sandbox.ErrBadSnapshot and names the
// field with the snapshot's and the current value. A spec asking for other
// limits than the snapshot's is refused the same way.
func TestSnapshotCompatibility(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	src := e.start(t, e.spec("compat-src"))
	dir := t.TempDir()
	if err := src.(sandbox.Snapshotter).Snapshot(ctx, dir); err != nil {
		t.Fatal(err)
	}
	e.stopClean(t, src, 0)
	orig, err := os.ReadFile(filepath.Join(dir, SnapshotMeta))
	if err != nil {
		t.Fatal(err)
	}
	var meta map[string]any
	if err := json.Unmarshal(orig, &meta); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"qemu_version", "kernel_sha256", "initramfs_sha256", "machine", "accel"} {
		if s, _ := meta[k].(string); s == "" {
			t.Fatalf("snapshot metadata has no %s: %s", k, orig)
		}
	}
	cur := func(k string) string { return meta[k].(string) }
	for _, tc := range []struct {
		name string
		mut  func(m map[string]any)
		spec func(s *sandbox.Spec)
		want []string
	}{
		{"qemu-version", func(m map[string]any) { m["qemu_version"] = "QEMU emulator version 9.9.9" },
			nil, []string{"qemu_version", "9.9.9", cur("qemu_version")}},
		{"kernel", func(m map[string]any) { m["kernel_sha256"] = strings.Repeat("ab", 32) },
			nil, []string{"kernel_sha256", strings.Repeat("ab", 32), cur("kernel_sha256")}},
		{"initramfs", func(m map[string]any) { m["initramfs_sha256"] = strings.Repeat("cd", 32) },
			nil, []string{"initramfs_sha256", strings.Repeat("cd", 32), cur("initramfs_sha256")}},
		{"accel", func(m map[string]any) { m["accel"] = "kvm" }, nil, []string{"accel", `"kvm"`, `"tcg"`}},
		{"machine", func(m map[string]any) {
			m["machine"] = strings.Replace(cur("machine"), "virtio-serial-device", "virtio-serial-device,max_ports=2", 1)
		}, nil, []string{"machine", "virtio-serial-device,max_ports=2", `"virtio-serial-device"`}},
		{"older-snapshot", func(m map[string]any) { delete(m, "kernel_sha256"); delete(m, "machine") },
			nil, []string{"kernel_sha256", "(none)"}},
		{"spec-cpus", nil, func(s *sandbox.Spec) { s.CPULimit = 2 }, []string{"cpus", `"1"`, `"2"`}},
		{"spec-memory", nil, func(s *sandbox.Spec) { s.MemoryLimit = 512 << 20 }, []string{"memory_mib", `"256"`, `"512"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := t.TempDir()
			for _, f := range []string{SnapshotState, SnapshotMemory} {
				if err := os.Link(filepath.Join(dir, f), filepath.Join(d, f)); err != nil {
					t.Fatal(err)
				}
			}
			m := map[string]any{}
			for k, v := range meta {
				m[k] = v
			}
			if tc.mut != nil {
				tc.mut(m)
			}
			data, err := json.Marshal(m)
			if err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(d, SnapshotMeta), data, 0o644); err != nil {
				t.Fatal(err)
			}
			spec := e.spec("compat-" + tc.name)
			if tc.spec != nil {
				tc.spec(&spec)
			}
			sb, err := e.b.Restore(ctx, spec, d, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
			if err == nil {
				sb.Stop(ctx)
				t.Fatal("Restore accepted an incompatible snapshot")
			}
			t.Logf("Restore: %v", err)
			if !errors.Is(err, sandbox.ErrBadSnapshot) {
				t.Errorf("Restore = %v, want it to wrap sandbox.ErrBadSnapshot", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("Restore = %v, want it to say %q", err, w)
				}
			}
			if l := e.leftovers(t, spec.ID, 0); len(l) > 0 {
				t.Errorf("the refused restore left %v", l)
			}
		})
	}
	// The unchanged metadata still restores.
	rs, err := e.b.Restore(ctx, e.spec("compat-ok"), dir, sandbox.RestoreOptions{Mode: sandbox.MemoryLazy})
	if err != nil {
		t.Fatal(err)
	}
	if got := get(t, rs.Endpoint(), "/count"); got != "1" {
		t.Errorf("restored /count = %q, want 1", got)
	}
	e.stopClean(t, rs, 0)
}
