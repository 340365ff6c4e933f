package microvm

import (
	"context"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"
)

// TestCleanupAfterCrash: a second backend on the same Root (a restarted
// daemon) kills the QEMU a first one left running and removes its
// directory, sockets and RAM file.
func TestCleanupAfterCrash(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	sb := e.start(t, e.spec("crashed"))
	data, err := os.ReadFile(filepath.Join(e.b.InstanceDir("crashed"), "qemu.pid"))
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(data)))
	if err != nil {
		t.Fatal(err)
	}
	mem := e.b.MemoryFile("crashed")
	if _, err := os.Stat(mem); err != nil {
		t.Fatalf("RAM file of a running instance: %v", err)
	}
	b2, err := New(ctx, e.b.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := b2.Cleanup(ctx); err != nil {
		t.Fatal(err)
	}
	select {
	case <-sb.Done():
	case <-time.After(30 * time.Second):
		t.Fatalf("QEMU pid %d still runs after Cleanup", pid)
	}
	for _, p := range []string{e.b.InstanceDir("crashed"), mem, e.b.sockBase("crashed") + ".qmp"} {
		if _, err := os.Stat(p); !os.IsNotExist(err) {
			t.Errorf("%s left after Cleanup (%v)", p, err)
		}
	}
	if err := sb.Stop(ctx); err != nil {
		t.Errorf("Stop of the cleaned-up instance: %v", err)
	}
}
