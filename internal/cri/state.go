package cri

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"time"

	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"

	"vhive.dev/vhive/internal/sandbox"
)

const stateVersion = 1

// pod is a vhive-handler pod: its sandbox lives in containerd, its
// containers in vhive.
type pod struct {
	ID        string `json:"id"`
	Name      string `json:"name"`
	Namespace string `json:"namespace"`
	UID       string `json:"uid"`
	Dir       string `json:"dir"`
	// NetNS is the path of the pod's network namespace (from containerd).
	NetNS string `json:"netns"`
	// PausePID is the pid of the pod's pause process; its IPC, UTS and PID
	// namespaces are joined by the pod's containers.
	PausePID int `json:"pausePid"`
	// Config is the PodSandboxConfig kubelet sent.
	Config *runtimeapi.PodSandboxConfig `json:"config"`
}

// Container kinds.
const (
	kindFunction = "function" // a user-container run through FunctionBackend
	kindOCI      = "oci"      // a container of a vhive-handler pod
)

// container is a container vhive runs. Exported fields are persisted.
type container struct {
	ID          string                       `json:"id"`
	PodID       string                       `json:"podId"`
	Kind        string                       `json:"kind"`
	Key         string                       `json:"key"` // reserved name key
	Config      *runtimeapi.ContainerConfig  `json:"config"`
	ImageRef    string                       `json:"imageRef"`         // repo digest (or ID) of the image
	ImageID     string                       `json:"imageId"`          // containerd image ID, or the manifest digest
	LogPath     string                       `json:"logPath"`          // absolute; "" when kubelet gave none
	Cgroup      string                       `json:"cgroup,omitempty"` // outer memory cgroup (cgroup v1, limited containers)
	Dir         string                       `json:"dir"`
	Endpoint    string                       `json:"endpoint,omitempty"` // function sandbox endpoint
	CreatedAt   int64                        `json:"createdAt"`
	StartedAt   int64                        `json:"startedAt"`
	FinishedAt  int64                        `json:"finishedAt"`
	ExitCode    int32                        `json:"exitCode"`
	Reason      string                       `json:"reason,omitempty"`
	Message     string                       `json:"message,omitempty"`
	State       runtimeapi.ContainerState    `json:"state"`
	PodSandboxC *runtimeapi.PodSandboxConfig `json:"podConfig,omitempty"`

	// Runtime only, guarded by Server.mu where noted.
	sb     sandbox.Sandbox // kindFunction
	proc   *ociProc        // kindOCI, once started
	bundle *ociBundle      // kindOCI
	logs   *logWriter      // kindOCI and kindFunction
	done   chan struct{}   // closed when the process has exited (after start)
	// kindFunction: the cold-start stages of CreateContainer, logged with
	// StartSandbox when the container starts.
	stages  []stage
	podName string // kindFunction: the pod's name, for the stage log
}

// stage is one timed step of a function container's cold start (vHive's
// stage names: GetImage, CreateSandbox, StartSandbox).
type stage struct {
	name string
	d    time.Duration
}

type stateDoc struct {
	Version    int                   `json:"version"`
	Pods       map[string]*pod       `json:"pods"`
	Containers map[string]*container `json:"containers"`
}

// stateFile writes state.json atomically.
type stateFile struct {
	mu   sync.Mutex
	path string
}

func (f *stateFile) save(doc stateDoc) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	b, err := json.MarshalIndent(doc, "", "  ")
	if err != nil {
		return fmt.Errorf("cri: encode state: %w", err)
	}
	tmp := f.path + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return fmt.Errorf("cri: write state %q: %w", tmp, err)
	}
	if err := os.Rename(tmp, f.path); err != nil {
		return fmt.Errorf("cri: write state %q: %w", f.path, err)
	}
	return nil
}

func (f *stateFile) load() (stateDoc, error) {
	doc := stateDoc{Version: stateVersion, Pods: map[string]*pod{}, Containers: map[string]*container{}}
	b, err := os.ReadFile(f.path)
	if errors.Is(err, os.ErrNotExist) {
		return doc, nil
	}
	if err != nil {
		return doc, fmt.Errorf("cri: read state %q: %w", f.path, err)
	}
	if err := json.Unmarshal(b, &doc); err != nil {
		return doc, fmt.Errorf("cri: decode state %q: %w", f.path, err)
	}
	if doc.Version != stateVersion {
		return doc, fmt.Errorf("cri: state %q has version %d, want %d", f.path, doc.Version, stateVersion)
	}
	if doc.Pods == nil {
		doc.Pods = map[string]*pod{}
	}
	if doc.Containers == nil {
		doc.Containers = map[string]*container{}
	}
	return doc, nil
}

// saveLocked persists pods and containers; s.mu must be held.
func (s *Server) saveLocked() error {
	return s.store.save(stateDoc{Version: stateVersion, Pods: s.pods, Containers: s.containers})
}

// recover loads state.json, removes every container a previous run left
// (their processes died with it or are killed now) and keeps the pods.
func (s *Server) recover(ctx context.Context) error {
	doc, err := s.store.load()
	if err != nil {
		return err
	}
	var errs []error
	for id, c := range doc.Containers {
		s.log.Info("removing container left by a previous run", "container", id, "kind", c.Kind)
		if c.Kind == kindOCI && s.oci != nil {
			if err := s.oci.forceDelete(ctx, id); err != nil {
				errs = append(errs, err)
			}
		}
		if c.Dir != "" {
			if err := removeContainerDir(c.Dir); err != nil {
				errs = append(errs, err)
			}
		}
		if c.Cgroup != "" {
			errs = append(errs, removeOuterCgroups(c.Cgroup))
		}
	}
	for id, p := range doc.Pods {
		s.pods[id] = p
	}
	s.mu.Lock()
	errs = append(errs, s.saveLocked())
	s.mu.Unlock()
	// Leftover directories no record names (a crash between mkdir and save).
	entries, _ := os.ReadDir(filepath.Join(s.cfg.StateDir, "containers"))
	for _, e := range entries {
		if _, ok := doc.Containers[e.Name()]; !ok {
			if s.oci != nil {
				_ = s.oci.forceDelete(ctx, e.Name())
			}
			errs = append(errs, removeContainerDir(filepath.Join(s.cfg.StateDir, "containers", e.Name())))
		}
	}
	return errors.Join(errs...)
}
