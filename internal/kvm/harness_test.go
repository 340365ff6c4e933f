package kvm

import (
	"bufio"
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/iobuf"
	"vhive.dev/vhive/internal/memory"
	"vhive.dev/vhive/internal/uffd"
)

// The tests and benchmarks re-execute the test binary as the VMM: the
// child creates the VM, registers its guest memory with a userfaultfd,
// sends the uffd with Firecracker's region JSON to the memory manager
// running in the test process, runs the guest and verifies what it read.
// The faulting process (the VMM, whose vCPU faults inside KVM_RUN) is never
// the one serving the faults.

const vmmEnv = "VHIVE_KVM_TEST_VMM"

func TestMain(m *testing.M) {
	if cfg := os.Getenv(vmmEnv); cfg != "" {
		os.Exit(vmmMain(cfg))
	}
	os.Exit(m.Run())
}

// requiresKVM skips the test, naming the reason, when no VM with a vCPU
// can be created here. VHIVE_REQUIRE_KVM=1 turns the skip into a failure
// for machines known to have KVM.
func requiresKVM(t testing.TB) {
	t.Helper()
	if err := Available(); err != nil {
		if os.Getenv("VHIVE_REQUIRE_KVM") != "" {
			t.Fatalf("VHIVE_REQUIRE_KVM is set but: %v", err)
		}
		t.Skipf("needs a usable /dev/kvm: %v", err)
	}
}

// vmmConfig tells the child VMM what to do.
type vmmConfig struct {
	// Socket is the memory manager's (or the floor server's) socket.
	Socket string `json:"socket"`
	// MapImage (no Socket): slot 0 is a private mapping of Image, paged
	// in by the kernel on the guest's faults; no userfaultfd.
	MapImage bool `json:"map_image"`
	// Image is the memory file the guest's output is verified against.
	Image     string     `json:"image"`
	DataPages int        `json:"data_pages"`
	Pattern   Pattern    `json:"pattern"`
	Seed      uint64     `json:"seed"`
	Output    OutputMode `json:"output"`
	// Firecracker: do what Firecracker does — send the handshake and run
	// the guest at once, never reading the manager's ack.
	Firecracker bool `json:"firecracker"`
	// WaitGo: print READY once the VM is built, wait for a line on stdin.
	WaitGo bool `json:"wait_go"`
}

type vmmResult struct {
	AttachNS int64        `json:"attach_ns"` // uffd + handshake (+ ack)
	RunNS    int64        `json:"run_ns"`    // KVM_RUN to the guest's done exit
	Exits    int          `json:"exits"`
	KVMExits int64        `json:"kvm_exits"` // -1: no KVM stats
	GuestPF  int64        `json:"guest_pf"`  // KVM's pf_taken during the run, -1: no stats
	Touched  int          `json:"touched"`   // pages in the guest's list
	Verify   Verification `json:"verify"`
}

func vmmMain(cfgJSON string) int {
	var cfg vmmConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "vmm config:", err)
		return 2
	}
	res, err := runVMM(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "vmm:", err)
		return 2
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func runVMM(cfg vmmConfig) (vmmResult, error) {
	var res vmmResult
	pages, err := cfg.Pattern.Pages(cfg.DataPages, cfg.Seed)
	if err != nil {
		return res, err
	}
	res.Touched = len(pages)
	f, err := os.Open(cfg.Image)
	if err != nil {
		return res, err
	}
	defer f.Close()
	gc := GuestConfig{DataPages: cfg.DataPages, Pages: pages, Output: cfg.Output}
	if cfg.MapImage {
		gc.Image = f
	}
	g, err := NewGuest(gc)
	if err != nil {
		return res, err
	}
	defer g.Close()
	if cfg.WaitGo {
		fmt.Println("READY")
		if _, err := bufio.NewReader(os.Stdin).ReadString('\n'); err != nil {
			return res, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	t0 := time.Now()
	switch {
	case cfg.MapImage:
	case cfg.Firecracker:
		done, err := firecrackerHandshake(cfg.Socket, g.Memory())
		if err != nil {
			return res, err
		}
		defer done()
	default:
		c, err := memory.Attach(ctx, cfg.Socket, g.Memory(), 0)
		if err != nil {
			return res, err
		}
		defer c.Close()
	}
	t1 := time.Now()
	st, err := g.Run()
	if err != nil {
		return res, err
	}
	res.AttachNS, res.RunNS, res.Exits = int64(t1.Sub(t0)), int64(st.Elapsed), st.Exits
	res.KVMExits, res.GuestPF = st.KVMExits, st.PageFaults
	if res.Verify, err = g.Verify(f); err != nil {
		return res, err
	}
	return res, nil
}

// firecrackerHandshake does what Firecracker's snapshot load with a Uffd
// memory backend does: a userfaultfd (non-blocking, close-on-exec,
// UFFD_FEATURE_EVENT_REMOVE) registered in MISSING mode over the guest
// memory, then ONE message on the backend socket — the JSON array of
// regions with Firecracker's field names (page_size, and the deprecated
// page_size_kib that despite its name holds bytes too) with the uffd as
// SCM_RIGHTS —
// and the vCPU resumes at once: Firecracker never reads a reply. done
// closes the connection and the uffd.
func firecrackerHandshake(sock string, mem []byte) (done func(), err error) {
	u, err := uffd.New(uffd.FeatureEventRemove)
	if err != nil {
		return nil, err
	}
	base := uint64(uintptr(unsafe.Pointer(&mem[0])))
	if err := u.Register(uintptr(base), uintptr(len(mem))); err != nil {
		u.Close()
		return nil, err
	}
	conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		u.Close()
		return nil, err
	}
	regions := []memory.Region{{BaseHostVirtAddr: base, Size: uint64(len(mem)), Offset: 0, PageSize: PageSize, PageSizeKiB: PageSize}}
	if err := memory.SendHandshake(conn, u.Int(), regions); err != nil {
		conn.Close()
		u.Close()
		return nil, err
	}
	return func() { conn.Close(); u.Close() }, nil
}

// floorServe is the raw floor of a REAP restore, a page server with
// nothing but the work: it accepts one VMM on ln, takes its handshake (the
// region JSON and the uffd), preads the whole WS file (format v1, see
// package memory; O_DIRECT when direct) into buf, allocated and faulted
// before timing, installs each run with one UFFDIO_COPY (DONTWAKE) and the
// region with one UFFDIO_WAKE, acks, and waits for the VMM to hang up. No
// checksum, no bookkeeping, no fault service (a fault outside the WS would
// hang the VMM: the WS must cover the guest's pages).
func floorServe(ln *net.UnixListener, memSize uint64, wsPath string, buf []byte, direct bool) error {
	conn, err := ln.AcceptUnix()
	if err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	defer conn.Close()
	payload, oob := make([]byte, 64<<10), make([]byte, unix.CmsgSpace(4))
	n, oobn, _, _, err := conn.ReadMsgUnix(payload, oob)
	if err != nil {
		return fmt.Errorf("floor: handshake: %w", err)
	}
	msgs, err := unix.ParseSocketControlMessage(oob[:oobn])
	if err != nil || len(msgs) != 1 {
		return fmt.Errorf("floor: handshake control message: %d messages, %v", len(msgs), err)
	}
	fds, err := unix.ParseUnixRights(&msgs[0])
	if err != nil || len(fds) != 1 {
		return fmt.Errorf("floor: handshake fds: %v, %v", fds, err)
	}
	u, err := uffd.Wrap(fds[0])
	if err != nil {
		unix.Close(fds[0])
		return fmt.Errorf("floor: %w", err)
	}
	defer u.Close()
	regions, err := memory.ParseRegions(payload[:n], memSize)
	if err != nil || len(regions) != 1 {
		return fmt.Errorf("floor: %d regions: %v", len(regions), err)
	}
	reg := regions[0]

	flags := unix.O_RDONLY | unix.O_CLOEXEC
	if direct {
		flags |= unix.O_DIRECT
	}
	fd, err := unix.Open(wsPath, flags, 0)
	if err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	defer unix.Close(fd)
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	if st.Size > int64(len(buf)) {
		return fmt.Errorf("floor: WS file of %d bytes, buffer of %d", st.Size, len(buf))
	}
	if got, err := unix.Pread(fd, buf[:st.Size], 0); err != nil || int64(got) != st.Size {
		return fmt.Errorf("floor: pread %s: %d of %d bytes: %v", wsPath, got, st.Size, err)
	}
	le := binary.LittleEndian
	if string(buf[:8]) != "VHIVEWS\x00" {
		return fmt.Errorf("floor: %s is not a working-set file", wsPath)
	}
	nRuns, src := le.Uint64(buf[16:]), le.Uint64(buf[32:])
	for i := range nRuns {
		off, l := le.Uint64(buf[64+16*i:]), le.Uint64(buf[64+16*i+8:])
		dst := reg.BaseHostVirtAddr + off - reg.Offset
		if _, err := u.Copy(uintptr(dst), uintptr(unsafe.Pointer(&buf[src])), l, uffd.ModeDontWake); err != nil {
			return fmt.Errorf("floor: UFFDIO_COPY run %d: %w", i, err)
		}
		src += l
	}
	if err := u.Wake(uintptr(reg.BaseHostVirtAddr), reg.Size); err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	if _, err := conn.Write([]byte("ok\n")); err != nil {
		return fmt.Errorf("floor: ack: %w", err)
	}
	io.Copy(io.Discard, conn) // until the VMM hangs up
	return nil
}

// vmm is a running child VMM.
type vmm struct {
	cmd    *exec.Cmd
	stdout *bufio.Reader
	stdin  io.WriteCloser
	stderr bytes.Buffer
}

func startVMM(t testing.TB, cfg vmmConfig) *vmm {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	v := &vmm{cmd: exec.Command(os.Args[0], "-test.run=^$")}
	v.cmd.Env = append(os.Environ(), vmmEnv+"="+string(b))
	v.cmd.Stderr = &v.stderr
	out, err := v.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	v.stdout = bufio.NewReader(out)
	if v.stdin, err = v.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := v.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if v.cmd.ProcessState == nil {
			v.cmd.Process.Kill() // only the process this test started
			v.cmd.Wait()
		}
	})
	if cfg.WaitGo {
		if l := v.line(t); l != "READY" {
			t.Fatalf("vmm said %q; stderr: %s", l, v.stderr.String())
		}
	}
	return v
}

// line reads the child's next stdout line, failing if none comes within a
// minute (the guest hangs on an unserved fault: the bug being tested for).
func (v *vmm) line(t testing.TB) string {
	t.Helper()
	ch := make(chan string, 1)
	go func() {
		s, _ := v.stdout.ReadString('\n')
		ch <- s
	}()
	select {
	case s := <-ch:
		return strings.TrimSpace(s)
	case <-time.After(time.Minute):
		t.Fatalf("vmm %d: no output within a minute (guest hung?); stderr: %s", v.cmd.Process.Pid, v.stderr.String())
		return ""
	}
}

func (v *vmm) goNow(t testing.TB) {
	t.Helper()
	if _, err := v.stdin.Write([]byte("go\n")); err != nil {
		t.Fatal(err)
	}
}

// result reads the child's result and waits for it to exit cleanly.
func (v *vmm) result(t testing.TB) vmmResult {
	t.Helper()
	l := v.line(t)
	if err := v.cmd.Wait(); err != nil {
		t.Fatalf("vmm: %v; stderr: %s", err, v.stderr.String())
	}
	var r vmmResult
	if err := json.Unmarshal([]byte(l), &r); err != nil {
		t.Fatalf("vmm result %q: %v; stderr: %s", l, err, v.stderr.String())
	}
	return r
}

// fixture is a memory file of a toucher snapshot and a manager to serve it.
type fixture struct {
	dir       string
	image     string
	dataPages int
	mgr       *memory.Manager
	mu        sync.Mutex
	n         int
}

func newFixture(t testing.TB, dataPages int) *fixture {
	t.Helper()
	requiresKVM(t)
	fx := &fixture{dir: t.TempDir(), dataPages: dataPages}
	fx.image = filepath.Join(fx.dir, "mem")
	if err := WriteImage(fx.image, dataPages, 7); err != nil {
		t.Fatal(err)
	}
	mgr, err := memory.NewManager(memory.Config{Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { mgr.Close() })
	fx.mgr = mgr
	return fx
}

func (fx *fixture) wsPath() string { return filepath.Join(fx.dir, "ws") }

// restore serves one restore of image in mode to a child VMM built from
// cfg (Socket, Image and DataPages filled in) and returns what the child
// and the manager measured. go is called right after the manager starts.
func (fx *fixture) restore(t testing.TB, mode memory.Mode, image string, cfg vmmConfig) (vmmResult, memory.Stats) {
	t.Helper()
	return fx.restoreFrom(t, mode, image, fx.wsPath(), false, cfg)
}

// restoreWS is restore of the fixture's image with the working set at ws.
func (fx *fixture) restoreWS(t testing.TB, mode memory.Mode, ws string, cfg vmmConfig) (vmmResult, memory.Stats) {
	t.Helper()
	return fx.restoreFrom(t, mode, fx.image, ws, false, cfg)
}

// restoreAsFirecracker is a prefetch (REAP) restore as Firecracker runs
// one: the VMM resumes the vCPU right after the handshake, never waiting
// for an ack, and the manager serves faults while the working set streams
// in (memory.RestoreConfig.EarlyResume).
func (fx *fixture) restoreAsFirecracker(t testing.TB, cfg vmmConfig) (vmmResult, memory.Stats) {
	t.Helper()
	cfg.Firecracker = true
	return fx.restoreFrom(t, memory.ModePrefetch, fx.image, fx.wsPath(), true, cfg)
}

func (fx *fixture) restoreFrom(t testing.TB, mode memory.Mode, image, ws string, early bool, cfg vmmConfig) (vmmResult, memory.Stats) {
	t.Helper()
	fx.mu.Lock()
	fx.n++
	id := fmt.Sprintf("r%d", fx.n)
	fx.mu.Unlock()
	cfg.Socket = filepath.Join(fx.dir, id+".sock")
	cfg.DataPages, cfg.WaitGo = fx.dataPages, true
	if cfg.Image == "" {
		cfg.Image = fx.image
	}
	v := startVMM(t, cfg)
	r, err := fx.mgr.Start(context.Background(), memory.RestoreConfig{
		ID: id, SocketPath: cfg.Socket, MemoryFile: image, Mode: mode, WorkingSet: ws, EarlyResume: early,
	})
	if err != nil {
		t.Fatal(err)
	}
	v.goNow(t)
	res := v.result(t)
	select {
	case <-r.Done():
	case <-time.After(time.Minute):
		t.Fatal("manager still serving a minute after the VMM exited")
	}
	if err := r.Close(); err != nil {
		t.Fatal(err)
	}
	if err := r.Err(); err != nil && !errors.Is(err, context.Canceled) {
		t.Fatalf("serving failed: %v", err)
	}
	return res, r.Stats()
}

// floor runs one VMM (cfg's Socket, Image, DataPages filled in) against
// floorServe with the fixture's WS file, buf being floorServe's buffer.
func (fx *fixture) floor(t testing.TB, cfg vmmConfig, buf []byte, direct bool) vmmResult {
	t.Helper()
	cfg.Socket = filepath.Join(fx.dir, "floor.sock")
	cfg.Image, cfg.DataPages, cfg.WaitGo = fx.image, fx.dataPages, true
	os.Remove(cfg.Socket)
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: cfg.Socket, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	v := startVMM(t, cfg)
	errc := make(chan error, 1)
	go func() { errc <- floorServe(ln, MemorySize(fx.dataPages), fx.wsPath(), buf, direct) }()
	v.goNow(t)
	res := v.result(t)
	if err := <-errc; err != nil {
		t.Fatal(err)
	}
	return res
}

// mapped runs one VMM whose slot 0 is a private mapping of the image.
func (fx *fixture) mapped(t testing.TB, cfg vmmConfig) vmmResult {
	t.Helper()
	cfg.Image, cfg.DataPages, cfg.WaitGo, cfg.MapImage = fx.image, fx.dataPages, true, true
	v := startVMM(t, cfg)
	v.goNow(t)
	return v.result(t)
}

// floorBuffer allocates and faults floorServe's buffer for the fixture's
// WS file (before timing, as the manager's buffer pool is warm).
func (fx *fixture) floorBuffer(t testing.TB) []byte {
	t.Helper()
	fi, err := os.Stat(fx.wsPath())
	if err != nil {
		t.Fatal(err)
	}
	// The same kind of buffer as the manager's pool (iobuf).
	buf, err := iobuf.Alloc(int(fi.Size()))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { iobuf.Free(buf) })
	return buf
}
