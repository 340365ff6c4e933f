package memory

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"vhive.dev/vhive/internal/uffd"
)

// The tests re-execute the test binary as the sandbox process: it maps
// guest memory, attaches it to the manager under test over the real
// handshake and touches it, verifying every byte against the memory file.
// The peer must be a separate process: a Go process must never serve its
// own faults.

const childEnv = "VHIVE_MEMORY_TEST_CHILD"

// serverEnv makes the re-executed test binary a standalone page server
// (ServeOne) for the RestoreConfig in the variable, so that a test can kill
// the manager's process.
const serverEnv = "VHIVE_MEMORY_TEST_SERVER"

func TestMain(m *testing.M) {
	if cfg := os.Getenv(childEnv); cfg != "" {
		os.Exit(childMain(cfg))
	}
	if cfg := os.Getenv(serverEnv); cfg != "" {
		var rc RestoreConfig
		if err := json.Unmarshal([]byte(cfg), &rc); err != nil {
			fmt.Fprintln(os.Stderr, "server config:", err)
			os.Exit(2)
		}
		st, err := ServeOne(context.Background(), rc, nil)
		if err != nil {
			fmt.Fprintln(os.Stderr, "server:", err)
			os.Exit(1)
		}
		json.NewEncoder(os.Stdout).Encode(st) // what the restore measured, for the test
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// op is one step of the child's access pattern, on pages [Page, Page+N).
type op struct {
	Kind string `json:"k"` // read, write, writefirst, dontneed, hammer, together, waitgone, notify, waitstdin, exit
	Page uint64 `json:"p"`
	N    uint64 `json:"n"`
}

type childConfig struct {
	Socket  string `json:"socket"`
	MemFile string `json:"mem_file"`
	Size    uint64 `json:"size"`   // bytes mapped
	Offset  uint64 `json:"offset"` // of the mapping in the memory file
	Ops     []op   `json:"ops"`
	// Bench: after attaching, read one byte per page of Ops and report the
	// elapsed time of attach + touch; no verification.
	Bench bool `json:"bench"`
	// WaitGo: print "READY" and wait for a line on stdin before attaching.
	WaitGo bool `json:"wait_go"`
	// Firecracker: behave like Firecracker instead of using Attach — two
	// regions with the mapping's halves swapped in the file, only the
	// deprecated page_size_kib set, and no waiting for the manager's ack.
	Firecracker bool `json:"firecracker"`
	// NoRemoveEvents (with Firecracker): create the userfaultfd without
	// UFFD_FEATURE_EVENT_REMOVE.
	NoRemoveEvents bool `json:"no_remove_events"`
}

type childResult struct {
	Touched    int    `json:"touched"` // page reads verified
	Mismatches int    `json:"mismatches"`
	First      string `json:"first,omitempty"` // first mismatch
	AttachNS   int64  `json:"attach_ns"`
	TouchNS    int64  `json:"touch_ns"`
	Sink       byte   `json:"sink"` // keeps the bench's loads alive
}

func childMain(cfgJSON string) int {
	var cfg childConfig
	if err := json.Unmarshal([]byte(cfgJSON), &cfg); err != nil {
		fmt.Fprintln(os.Stderr, "child config:", err)
		return 2
	}
	res, err := runChild(cfg)
	if err != nil {
		fmt.Fprintln(os.Stderr, "child:", err)
		return 2
	}
	json.NewEncoder(os.Stdout).Encode(res)
	return 0
}

func runChild(cfg childConfig) (childResult, error) {
	var res childResult
	ps := uint64(os.Getpagesize())
	f, err := os.Open(cfg.MemFile)
	if err != nil {
		return res, err
	}
	defer f.Close()
	mem, err := unix.Mmap(-1, 0, int(cfg.Size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS|unix.MAP_NORESERVE)
	if err != nil {
		return res, err
	}
	stdin := bufio.NewReader(os.Stdin)
	if cfg.WaitGo {
		fmt.Println("READY")
		if _, err := stdin.ReadString('\n'); err != nil {
			return res, err
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	t0 := time.Now()
	var gone <-chan struct{}
	fileOff := func(p uint64) uint64 { return cfg.Offset + p*ps }
	if cfg.Firecracker {
		half := cfg.Size / 2
		fileOff = func(p uint64) uint64 { return (p*ps + half) % cfg.Size }
		features := uffd.FeatureEventRemove
		if cfg.NoRemoveEvents {
			features = 0
		}
		u, err := uffd.New(features)
		if err != nil {
			return res, err
		}
		defer u.Close()
		base := uint64(uintptr(unsafe.Pointer(&mem[0])))
		if err := u.Register(uintptr(base), uintptr(cfg.Size)); err != nil {
			return res, err
		}
		conn, err := net.DialUnix("unix", nil, &net.UnixAddr{Name: cfg.Socket, Net: "unix"})
		if err != nil {
			return res, err
		}
		defer conn.Close()
		regions := []Region{
			{BaseHostVirtAddr: base, Size: half, Offset: half, PageSizeKiB: ps},
			{BaseHostVirtAddr: base + half, Size: half, Offset: 0, PageSizeKiB: ps},
		}
		if err := SendHandshake(conn, u.Int(), regions); err != nil {
			return res, err
		}
	} else {
		c, err := Attach(ctx, cfg.Socket, mem, cfg.Offset)
		if err != nil {
			return res, err
		}
		defer c.Close()
		gone = c.ManagerGone()
	}
	res.AttachNS = int64(time.Since(t0))

	// state per page: 0 = memory file, 1 = zero (dontneed), 2 = written.
	state := make([]byte, cfg.Size/ps)
	want := make([]byte, ps)
	fill := func(p uint64) {
		switch state[p] {
		case 0:
			n, _ := f.ReadAt(want, int64(fileOff(p)))
			clear(want[n:])
		case 1:
			clear(want)
		case 2:
			for i := range want {
				want[i] = byte(p*7 + uint64(i)/512 + 1)
			}
		}
	}
	verify := func(p uint64) {
		fill(p)
		res.Touched++
		if got := mem[p*ps : (p+1)*ps]; !bytes.Equal(got, want) {
			res.Mismatches++
			if res.First == "" {
				i := 0
				for got[i] == want[i] {
					i++
				}
				res.First = fmt.Sprintf("page %d byte %d: got %#x want %#x (state %d)", p, i, got[i], want[i], state[p])
			}
		}
	}
	t1 := time.Now()
	var sink byte
	for _, o := range cfg.Ops {
		n := max(o.N, 1)
		switch o.Kind {
		case "read":
			for p := o.Page; p < o.Page+n; p++ {
				if cfg.Bench {
					sink += mem[p*ps]
					res.Touched++
					continue
				}
				verify(p)
			}
		case "write":
			for p := o.Page; p < o.Page+n; p++ {
				verify(p) // faults the page in (read fault) first
				state[p] = 2
				fill(p)
				copy(mem[p*ps:], want)
				verify(p)
			}
		case "writefirst": // a write fault on a missing page
			for p := o.Page; p < o.Page+n; p++ {
				fill(p)
				mem[p*ps+100] = want[100] // store without a load first
				verify(p)
			}
		case "dontneed":
			if err := unix.Madvise(mem[o.Page*ps:(o.Page+n)*ps], unix.MADV_DONTNEED); err != nil {
				return res, fmt.Errorf("madvise: %w", err)
			}
			for p := o.Page; p < o.Page+n; p++ {
				state[p] = 1
			}
		case "hammer":
			// o.N reads of random pages by 4 goroutines while another
			// drops random ranges: every byte must be the file's or zero
			// (a read racing a drop may see both, never anything else).
			bad, first := hammer(mem, f, fileOff, ps, o.N)
			res.Touched += int(o.N)
			res.Mismatches += bad
			if res.First == "" {
				res.First = first
			}
		case "together":
			// Two OS threads fault on each page of the range at once,
			// each released by a line on stdin (see together).
			if err := together(mem, ps, o.Page, n, stdin, verify); err != nil {
				return res, err
			}
		case "waitgone":
			select {
			case <-gone:
				fmt.Println("GONE")
			case <-time.After(time.Minute):
				fmt.Println("NOT GONE")
			}
		case "notify":
			fmt.Println("NOTIFY")
		case "waitstdin":
			stdin.ReadString('\n')
		case "exit":
			os.Exit(3)
		default:
			return res, fmt.Errorf("unknown op %q", o.Kind)
		}
	}
	res.TouchNS = int64(time.Since(t1))
	res.Sink = sink
	return res, nil
}

// child is a running sandbox-process stand-in.
type child struct {
	cmd    *exec.Cmd
	stdout *bufio.Reader
	stdin  io.WriteCloser
	stderr bytes.Buffer
}

func startChild(t testing.TB, cfg childConfig) *child {
	t.Helper()
	b, err := json.Marshal(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c := &child{cmd: exec.Command(os.Args[0], "-test.run=^$")}
	c.cmd.Env = append(os.Environ(), childEnv+"="+string(b))
	c.cmd.Stderr = &c.stderr
	out, err := c.cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	c.stdout = bufio.NewReader(out)
	if c.stdin, err = c.cmd.StdinPipe(); err != nil {
		t.Fatal(err)
	}
	if err := c.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if c.cmd.ProcessState == nil {
			c.cmd.Process.Kill() // only the process this test started
			c.cmd.Wait()
		}
	})
	return c
}

// line reads the child's next stdout line, failing the test if none comes
// within a minute (the child is hung: that is the bug being tested for).
func (c *child) line(t testing.TB) string {
	t.Helper()
	ch := make(chan string, 1)
	go func() {
		s, _ := c.stdout.ReadString('\n')
		ch <- s
	}()
	select {
	case s := <-ch:
		return strings.TrimSpace(s)
	case <-time.After(time.Minute):
		t.Fatalf("child %d: no output within a minute (hung?); stderr: %s", c.cmd.Process.Pid, c.stderr.String())
		return ""
	}
}

// wait waits for the child to exit, at most a minute.
func (c *child) wait(t testing.TB) *os.ProcessState {
	t.Helper()
	done := make(chan struct{})
	go func() {
		c.cmd.Wait()
		close(done)
	}()
	select {
	case <-done:
		return c.cmd.ProcessState
	case <-time.After(time.Minute):
		t.Fatalf("child %d did not exit within a minute (hung?); stderr: %s", c.cmd.Process.Pid, c.stderr.String())
		return nil
	}
}

// result reads the child's result line and waits for a clean exit.
func (c *child) result(t testing.TB) childResult {
	t.Helper()
	l := c.line(t)
	st := c.wait(t)
	if !st.Success() {
		t.Fatalf("child exited with %v; stderr: %s", st, c.stderr.String())
	}
	var r childResult
	if err := json.Unmarshal([]byte(l), &r); err != nil {
		t.Fatalf("child result %q: %v; stderr: %s", l, err, c.stderr.String())
	}
	return r
}

func killedBySIGKILL(st *os.ProcessState) bool {
	ws, ok := st.Sys().(syscall.WaitStatus)
	return ok && ws.Signaled() && ws.Signal() == syscall.SIGKILL
}

func hammer(mem []byte, f *os.File, fileOff func(uint64) uint64, ps, reads uint64) (int, string) {
	pages := uint64(len(mem)) / ps
	var wg sync.WaitGroup
	var mu sync.Mutex
	bad, first := 0, ""
	done := make(chan struct{})
	for g := range 4 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 7))
			got, want := make([]byte, ps), make([]byte, ps)
			for range reads / 4 {
				p := r.Uint64N(pages)
				copy(got, mem[p*ps:(p+1)*ps])
				n, _ := f.ReadAt(want, int64(fileOff(p)))
				clear(want[n:])
				for i := range got {
					if got[i] != want[i] && got[i] != 0 {
						mu.Lock()
						bad++
						if first == "" {
							first = fmt.Sprintf("hammer: page %d byte %d: got %#x want %#x or 0", p, i, got[i], want[i])
						}
						mu.Unlock()
						break
					}
				}
			}
		}()
	}
	var dropper sync.WaitGroup
	dropper.Add(1)
	go func() {
		defer dropper.Done()
		r := rand.New(rand.NewPCG(99, 7))
		for {
			select {
			case <-done:
				return
			default:
			}
			p, n := r.Uint64N(pages-8), 1+r.Uint64N(8)
			unix.Madvise(mem[p*ps:(p+n)*ps], unix.MADV_DONTNEED)
			time.Sleep(50 * time.Microsecond)
		}
	}()
	wg.Wait()
	close(done)
	dropper.Wait()
	return bad, first
}

// together makes two OS threads fault on each page of [first, first+n)
// at once. It prints the threads' ids ("TIDS a b"); then, for each page,
// releases the first thread on a line on stdin and the second on another
// line (the test checks in between that the first is blocked in the
// fault), verifies the page once both have read it and prints "DONE".
//
// The threads fault inside write(2) (copying a byte of the page into a
// pipe), not with a load: a goroutine blocked in a system call has given
// up its P, so the other goroutines still run however many threads are
// blocked. Each thread has its own pipe: a pipe's writers copy under its
// lock, one would block on that lock instead of the fault. And the threads
// block SIGURG, the runtime's preemption signal (sent to a goroutine that
// ran too long, it may land once the goroutine is in the system call): a
// pending signal ends the fault's wait at once, and the kernel retries a
// fault in a system call, queueing and withdrawing an event each time, so
// the page server would read a varying number of events for the thread.
func together(mem []byte, ps, first, n uint64, stdin *bufio.Reader, verify func(uint64)) error {
	type thread struct {
		tid   int
		ready chan error
		page  chan uint64
		pipe  [2]int
	}
	var threads [2]*thread
	for i := range threads {
		th := &thread{ready: make(chan error, 1), page: make(chan uint64)}
		if err := unix.Pipe2(th.pipe[:], unix.O_CLOEXEC); err != nil {
			return fmt.Errorf("together: pipe: %w", err)
		}
		defer unix.Close(th.pipe[0])
		defer unix.Close(th.pipe[1])
		threads[i] = th
	}
	var urg unix.Sigset_t
	sig, bits := uint(unix.SIGURG)-1, uint(8*unsafe.Sizeof(urg.Val[0]))
	urg.Val[sig/bits] |= 1 << (sig % bits)
	done := make(chan error, len(threads))
	for _, th := range threads {
		go func() {
			runtime.LockOSThread() // the thread the test watches; the goroutine never unlocks it
			if err := unix.PthreadSigmask(unix.SIG_BLOCK, &urg, nil); err != nil {
				th.ready <- fmt.Errorf("together: block SIGURG: %w", err)
				return
			}
			th.tid = unix.Gettid()
			th.ready <- nil
			var b [1]byte
			for p := range th.page {
				if _, err := unix.Write(th.pipe[1], mem[p*ps:p*ps+1]); err != nil {
					done <- fmt.Errorf("together: write page %d to a pipe: %w", p, err)
					continue
				}
				if _, err := unix.Read(th.pipe[0], b[:]); err != nil {
					done <- fmt.Errorf("together: read the pipe: %w", err)
					continue
				}
				done <- nil
			}
		}()
	}
	for _, th := range threads {
		if err := <-th.ready; err != nil {
			return err
		}
	}
	defer func() {
		for _, th := range threads {
			close(th.page)
		}
	}()
	fmt.Printf("TIDS %d %d\n", threads[0].tid, threads[1].tid)
	for p := first; p < first+n; p++ {
		for _, th := range threads {
			if _, err := stdin.ReadString('\n'); err != nil {
				return fmt.Errorf("together: stdin: %w", err)
			}
			th.page <- p
		}
		for range threads {
			if err := <-done; err != nil {
				return err
			}
		}
		verify(p)
		fmt.Println("DONE")
	}
	return nil
}
