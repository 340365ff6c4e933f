package cluster

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
)

// machine is what kubelet reports as a node's capacity: every node sees the
// whole machine.
type machine struct {
	milliCPU int64 // online CPUs × 1000
	memory   int64 // MemTotal less pre-allocated huge pages, bytes
}

// readMachine reads the machine's CPUs (/sys/devices/system/cpu/online, as
// kubelet's cAdvisor counts them) and memory (/proc/meminfo MemTotal, less
// the huge pages kubelet subtracts from allocatable memory).
func readMachine() (machine, error) {
	var m machine
	cpus := runtime.NumCPU()
	if b, err := os.ReadFile("/sys/devices/system/cpu/online"); err == nil {
		if n, err := countCPUList(strings.TrimSpace(string(b))); err == nil {
			cpus = n
		}
	}
	m.milliCPU = int64(cpus) * 1000
	b, err := os.ReadFile("/proc/meminfo")
	if err != nil {
		return m, fmt.Errorf("cluster: machine memory: %w", err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) == 3 && f[0] == "MemTotal:" && f[2] == "kB" {
			kb, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				return m, fmt.Errorf("cluster: /proc/meminfo MemTotal %q: %w", f[1], err)
			}
			m.memory = kb << 10
		}
	}
	if m.memory == 0 {
		return m, fmt.Errorf("cluster: no MemTotal in /proc/meminfo")
	}
	dirs, _ := filepath.Glob("/sys/kernel/mm/hugepages/hugepages-*kB")
	for _, d := range dirs {
		kb, err1 := strconv.ParseInt(strings.TrimSuffix(strings.TrimPrefix(filepath.Base(d), "hugepages-"), "kB"), 10, 64)
		nb, err2 := os.ReadFile(filepath.Join(d, "nr_hugepages"))
		n, err3 := strconv.ParseInt(strings.TrimSpace(string(nb)), 10, 64)
		if err1 == nil && err2 == nil && err3 == nil {
			m.memory -= n * kb << 10
		}
	}
	return m, nil
}

// countCPUList counts the CPUs of a kernel CPU list such as "0-3,6,8-9".
func countCPUList(s string) (int, error) {
	n := 0
	for _, part := range strings.Split(s, ",") {
		lo, hi, isRange := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("cpu list %q: %w", s, err)
		}
		b := a
		if isRange {
			if b, err = strconv.Atoi(hi); err != nil || b < a {
				return 0, fmt.Errorf("cpu list %q: bad range %q", s, part)
			}
		}
		n += b - a + 1
	}
	return n, nil
}

// nodeResources fills in NodeMilliCPU and NodeMemory (default: the
// machine's share of each node, memory rounded down to a MiB) and checks
// that one node fits the machine.
func (c Config) nodeResources(m machine) (Config, error) {
	if c.NodeMilliCPU == 0 {
		c.NodeMilliCPU = m.milliCPU / int64(c.Nodes)
	}
	if c.NodeMemory == 0 {
		c.NodeMemory = m.memory / int64(c.Nodes) &^ (1<<20 - 1)
	}
	if c.NodeMilliCPU < 1 || c.NodeMilliCPU > m.milliCPU {
		return c, fmt.Errorf("cluster: NodeMilliCPU %dm: want 1m..%dm (the machine's CPUs)", c.NodeMilliCPU, m.milliCPU)
	}
	if c.NodeMemory < 1<<20 || c.NodeMemory > m.memory {
		return c, fmt.Errorf("cluster: NodeMemory %d bytes: want 1Mi..%d bytes (the machine's memory)", c.NodeMemory, m.memory)
	}
	return c, nil
}

// systemReserved is what kubelet must hold back from the machine it sees
// so that the node's allocatable is its share: allocatable = capacity -
// systemReserved - kubeReserved (none) - evictionHard (0%), and memory
// less pre-allocated huge pages, which m.memory already excludes.
func (c Config) systemReserved(m machine) (milliCPU, memory int64) {
	return m.milliCPU - c.NodeMilliCPU, m.memory - c.NodeMemory
}
