package cluster

import (
	"bufio"
	"context"
	"net"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"
)

// helperEnv makes the test binary act as a helper process (TestMain).
const helperEnv = "VHIVE_CLUSTER_TEST_HELPER"

func init() {
	if os.Getenv(helperEnv) == "leader-exit" {
		// Keep the main goroutine on the main thread, so that it can
		// end that thread alone.
		runtime.LockOSThread()
	}
}

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) == "leader-exit" {
		leaderExitHelper()
	}
	os.Exit(m.Run())
}

// leaderExitHelper listens on a kernel-chosen loopback port, prints the
// address, and ends its main thread alone: the process's main pid shows as
// a zombie while another thread keeps serving the socket.
func leaderExitHelper() {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		os.Exit(3)
	}
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			c.Close()
		}
	}()
	os.Stdout.WriteString(l.Addr().String() + "\n")
	for {
		syscall.RawSyscall(syscall.SYS_EXIT, 0, 0, 0)
	}
}

// TestAliveUntilLastThread: a process whose main thread has exited while
// another thread still holds its listening socket is alive, and kill
// returns only once the socket is released. Before alive() looked past the
// main thread's zombie state, it called such a process gone and kill
// returned while the port was still bound.
func TestAliveUntilLastThread(t *testing.T) {
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=leader-exit")
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = cmd.Process.Kill(); _ = cmd.Wait() })
	line, err := bufio.NewReader(out).ReadString('\n')
	if err != nil {
		t.Fatalf("helper: %v", err)
	}
	addr := strings.TrimSpace(line)
	st, err := procStartTime(cmd.Process.Pid)
	if err != nil {
		t.Fatal(err)
	}
	p := proc{Component: "helper", PID: cmd.Process.Pid, StartTime: st}
	for {
		s, _, err := procStat(p.PID)
		if err != nil {
			t.Fatal(err)
		}
		if s == 'Z' {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	c, err := net.Dial("tcp", addr)
	if err != nil {
		t.Fatalf("the helper's other thread no longer serves %s: %v", addr, err)
	}
	c.Close()
	if !p.alive() {
		t.Fatalf("pid %d: main thread a zombie, another thread serving %s: alive() = false", p.PID, addr)
	}
	if err := p.kill(context.Background()); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("tcp", addr)
	if err != nil {
		t.Fatalf("after kill returned, %s is still bound: %v", addr, err)
	}
	l.Close()
}
