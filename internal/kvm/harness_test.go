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
	// Socket is the memory manager's socket; empty: no userfaultfd, the
	// floor (FloorWS) puts the pages in.
	Socket string `json:"socket"`
	// Image is the memory file the guest's output is verified against.
	Image     string     `json:"image"`
	DataPages int        `json:"data_pages"`
	Pattern   Pattern    `json:"pattern"`
	Seed      uint64     `json:"seed"`
	Output    OutputMode `json:"output"`
	// Firecracker: do what Firecracker does — send the handshake and run
	// the guest at once, never reading the manager's ack.
	Firecracker bool `json:"firecracker"`
	// FloorWS (no Socket): read this working-set file (O_DIRECT when
	// FloorDirect) and copy its runs into guest memory, no userfaultfd.
	FloorWS     string `json:"floor_ws"`
	FloorDirect bool   `json:"floor_direct"`
	// WaitGo: print READY once the VM is built, wait for a line on stdin.
	WaitGo bool `json:"wait_go"`
}

type vmmResult struct {
	AttachNS int64        `json:"attach_ns"` // uffd + handshake (+ ack), or the floor's read + copy
	RunNS    int64        `json:"run_ns"`    // KVM_RUN to the guest's done exit
	Exits    int          `json:"exits"`
	Touched  int          `json:"touched"` // pages in the guest's list
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
	g, err := NewGuest(cfg.DataPages, pages, cfg.Output)
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
	case cfg.Socket == "":
		if err := floorLoad(g.Memory(), cfg.FloorWS, cfg.FloorDirect); err != nil {
			return res, err
		}
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
	f, err := os.Open(cfg.Image)
	if err != nil {
		return res, err
	}
	defer f.Close()
	if res.Verify, err = g.Verify(f); err != nil {
		return res, err
	}
	return res, nil
}

// firecrackerHandshake does what Firecracker's snapshot load with a Uffd
// memory backend does: a userfaultfd (non-blocking, close-on-exec,
// UFFD_FEATURE_EVENT_REMOVE) registered in MISSING mode over the guest
// memory, then ONE message on the backend socket — the JSON array of
// regions (page_size_kib, which holds bytes) with the uffd as SCM_RIGHTS —
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
	regions := []memory.Region{{BaseHostVirtAddr: base, Size: uint64(len(mem)), Offset: 0, PageSizeKiB: PageSize}}
	if err := memory.SendHandshake(conn, u.Int(), regions); err != nil {
		conn.Close()
		u.Close()
		return nil, err
	}
	return func() { conn.Close(); u.Close() }, nil
}

// floorLoad is the raw floor of a REAP restore without userfaultfd: one
// pread of the whole working-set file (format v1, see package memory) into
// a buffer, then a copy of each run to its place in guest memory. No
// checksum, no second process.
func floorLoad(mem []byte, wsPath string, direct bool) error {
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
	buf, err := unix.Mmap(-1, 0, int(st.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("floor: %w", err)
	}
	defer unix.Munmap(buf)
	if n, err := unix.Pread(fd, buf, 0); err != nil || int64(n) != st.Size {
		return fmt.Errorf("floor: pread %s: %d of %d bytes: %v", wsPath, n, st.Size, err)
	}
	le := binary.LittleEndian
	if string(buf[:8]) != "VHIVEWS\x00" {
		return fmt.Errorf("floor: %s is not a working-set file", wsPath)
	}
	nRuns, src := le.Uint64(buf[16:]), le.Uint64(buf[32:])
	for i := range nRuns {
		off, n := le.Uint64(buf[64+16*i:]), le.Uint64(buf[64+16*i+8:])
		copy(mem[off:off+n], buf[src:src+n])
		src += n
	}
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
		ID: id, SocketPath: cfg.Socket, MemoryFile: image, Mode: mode, WorkingSet: fx.wsPath(),
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
