package cluster

import (
	"strings"
	"testing"
)

func TestCountCPUList(t *testing.T) {
	for s, want := range map[string]int{"0": 1, "0-1": 2, "0-3,6,8-9": 7} {
		if n, err := countCPUList(s); err != nil || n != want {
			t.Errorf("countCPUList(%q) = %d, %v; want %d", s, n, err, want)
		}
	}
	for _, s := range []string{"", "a", "3-1", "0-"} {
		if _, err := countCPUList(s); err == nil {
			t.Errorf("countCPUList(%q): no error", s)
		}
	}
}

// TestNodeResources: by default each node gets its share of the machine;
// explicit values are kept; kubelet's systemReserved is the rest of the
// machine, so that capacity - systemReserved (its allocatable) is the share.
func TestNodeResources(t *testing.T) {
	m := machine{milliCPU: 2000, memory: 24683748 << 10}
	for _, tc := range []struct {
		cfg              Config
		wantCPU, wantMem int64
		wantErr          string
	}{
		{Config{Nodes: 2}, 1000, (24683748 << 10) / 2 &^ (1<<20 - 1), ""},
		{Config{Nodes: 3}, 666, (24683748 << 10) / 3 &^ (1<<20 - 1), ""},
		{Config{Nodes: 1}, 2000, (24683748 << 10) &^ (1<<20 - 1), ""},
		{Config{Nodes: 3, NodeMilliCPU: 1500, NodeMemory: 4 << 30}, 1500, 4 << 30, ""},
		{Config{Nodes: 1, NodeMilliCPU: 2001}, 0, 0, "NodeMilliCPU 2001m: want 1m..2000m"},
		{Config{Nodes: 1, NodeMilliCPU: -5}, 0, 0, "NodeMilliCPU -5m"},
		{Config{Nodes: 1, NodeMemory: 100 << 30}, 0, 0, "NodeMemory 107374182400 bytes"},
		{Config{Nodes: 1, NodeMemory: 1000}, 0, 0, "NodeMemory 1000 bytes"},
	} {
		c, err := tc.cfg.nodeResources(m)
		if tc.wantErr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Errorf("%+v: error %v, want %q", tc.cfg, err, tc.wantErr)
			}
			continue
		}
		if err != nil || c.NodeMilliCPU != tc.wantCPU || c.NodeMemory != tc.wantMem {
			t.Errorf("%+v: %dm %d bytes (%v), want %dm %d", tc.cfg, c.NodeMilliCPU, c.NodeMemory, err, tc.wantCPU, tc.wantMem)
			continue
		}
		rc, rm := c.systemReserved(m)
		if m.milliCPU-rc != tc.wantCPU || m.memory-rm != tc.wantMem || rc < 0 || rm < 0 {
			t.Errorf("%+v: reserved %dm %d: allocatable %dm %d, want %dm %d", tc.cfg, rc, rm, m.milliCPU-rc, m.memory-rm, tc.wantCPU, tc.wantMem)
		}
	}
}
