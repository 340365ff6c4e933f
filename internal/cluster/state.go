package cluster

import (
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"time"
)

// state is what Dir/state.json records: everything Up made, written as it
// is made so that Down can undo it after a crash at any point.
type state struct {
	Instance int       `json:"instance"`
	Nodes    int       `json:"nodes"`
	Created  time.Time `json:"created"`
	Ready    bool      `json:"ready"` // Up finished
	// NodeMilliCPU and NodeMemory are each node's allocatable share.
	NodeMilliCPU int64 `json:"node_milli_cpu,omitempty"`
	NodeMemory   int64 `json:"node_memory,omitempty"`
	// Links are host links made (bridge, host veths).
	Links []string `json:"links,omitempty"`
	// Netns are named network namespaces made.
	Netns []string `json:"netns,omitempty"`
	// Cgroups are cgroup directories made (absolute, per hierarchy).
	Cgroups []string `json:"cgroups,omitempty"`
	// Sysctls are the original values of the host sysctls that kubelet or
	// Up may change, restored by Down.
	Sysctls map[string]string `json:"sysctls,omitempty"`
	Procs   []proc            `json:"procs,omitempty"`
}

// Component names of recorded processes.
const (
	Registry          = "registry"
	Etcd              = "etcd"
	APIServer         = "kube-apiserver"
	Scheduler         = "kube-scheduler"
	ControllerManager = "kube-controller-manager"
	Containerd        = "containerd"
	VhiveDaemon       = "vhive-daemon"
	Kubelet           = "kubelet"
	KubeProxy         = "kube-proxy"
)

// proc is a process the cluster started.
type proc struct {
	Component string   `json:"component"`
	Node      string   `json:"node,omitempty"` // "" for the control plane
	PID       int      `json:"pid"`
	StartTime uint64   `json:"start_time"` // /proc/PID/stat field 22: guards against pid reuse
	Args      []string `json:"args"`
	Log       string   `json:"log"`
}

func (p proc) key() string {
	if p.Node == "" {
		return p.Component
	}
	return p.Node + "/" + p.Component
}

// store guards the state and writes it through to disk.
type store struct {
	path string
	mu   sync.Mutex
	st   state
}

func statePath(dir string) string { return filepath.Join(dir, "state.json") }

// loadStore reads Dir/state.json; ok is false when there is none.
func loadStore(dir string) (*store, bool, error) {
	s := &store{path: statePath(dir)}
	b, err := os.ReadFile(s.path)
	if errors.Is(err, os.ErrNotExist) {
		return s, false, nil
	}
	if err != nil {
		return nil, false, fmt.Errorf("cluster: read state: %w", err)
	}
	if err := json.Unmarshal(b, &s.st); err != nil {
		return nil, false, fmt.Errorf("cluster: state %s is corrupt (remove what it names by hand, or cluster down sweeps by name): %w", s.path, err)
	}
	return s, true, nil
}

func (s *store) update(fn func(*state)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	fn(&s.st)
	return s.saveLocked()
}

func (s *store) snapshot() state {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.st
	st.Links = slices.Clone(s.st.Links)
	st.Netns = slices.Clone(s.st.Netns)
	st.Cgroups = slices.Clone(s.st.Cgroups)
	st.Procs = slices.Clone(s.st.Procs)
	return st
}

func (s *store) saveLocked() error {
	b, err := json.MarshalIndent(&s.st, "", "  ")
	if err != nil {
		return fmt.Errorf("cluster: encode state: %w", err)
	}
	tmp := s.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("cluster: write state: %w", err)
	}
	if err := os.Rename(tmp, s.path); err != nil {
		return fmt.Errorf("cluster: write state: %w", err)
	}
	return nil
}

func addUnique(list []string, v string) []string {
	if slices.Contains(list, v) {
		return list
	}
	return append(list, v)
}

// setProc records p, replacing an earlier process of the same component.
func (st *state) setProc(p proc) {
	for i := range st.Procs {
		if st.Procs[i].key() == p.key() {
			st.Procs[i] = p
			return
		}
	}
	st.Procs = append(st.Procs, p)
}

func (st state) findProc(node, component string) (proc, bool) {
	for _, p := range st.Procs {
		if p.Node == node && p.Component == component {
			return p, true
		}
	}
	return proc{}, false
}
