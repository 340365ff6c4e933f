package invoker

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"google.golang.org/grpc"

	vhivepb "vhive.dev/vhive/api/proto/vhive"
)

// recordingControl records what the deployer asks of the daemon; the real
// daemon is exercised by internal/bench's e2e smoke test.
type recordingControl struct {
	mu       sync.Mutex
	deployed []*vhivepb.FunctionSpec
	imported []string
}

func (r *recordingControl) Deploy(_ context.Context, in *vhivepb.DeployRequest, _ ...grpc.CallOption) (*vhivepb.DeployResponse, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.deployed = append(r.deployed, in.GetSpec())
	return &vhivepb.DeployResponse{}, nil
}

func (r *recordingControl) ImportImage(_ context.Context, in *vhivepb.ImportImageRequest, _ ...grpc.CallOption) (*vhivepb.ImageInfo, error) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.imported = append(r.imported, in.GetPath())
	return &vhivepb.ImageInfo{Ref: "localhost/vhive/aes:latest"}, nil
}

func TestDeployFunctions(t *testing.T) {
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "aes.tar"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	fj := filepath.Join(dir, "functions.json")
	body := `{"functions": [
		{"name": "helloworld", "file": "localhost/vhive/helloworld:latest", "count": 2},
		{"name": "aes", "file": "aes.tar", "count": 3},
		{"name": "idle", "file": "localhost/vhive/idle:latest", "count": 0}]}`
	if err := os.WriteFile(fj, []byte(body), 0o644); err != nil {
		t.Fatal(err)
	}
	fns, err := ReadFunctions(fj)
	if err != nil {
		t.Fatal(err)
	}
	rc := &recordingControl{}
	eps, err := DeployFunctions(context.Background(), rc, fns, DeployOptions{
		FuncPath: dir, Sandbox: "runc", StartMode: "snapshot", Domain: "default.127.0.0.1.nip.io", Concurrency: 3,
	})
	if err != nil {
		t.Fatal(err)
	}
	var hosts []string
	for _, e := range eps {
		hosts = append(hosts, e.Hostname)
	}
	want := []string{
		"helloworld-0.default.127.0.0.1.nip.io", "helloworld-1.default.127.0.0.1.nip.io",
		"aes-0.default.127.0.0.1.nip.io", "aes-1.default.127.0.0.1.nip.io", "aes-2.default.127.0.0.1.nip.io",
	}
	if !slices.Equal(hosts, want) {
		t.Errorf("endpoints %v, want %v", hosts, want)
	}
	if len(rc.imported) != 1 || rc.imported[0] != filepath.Join(dir, "aes.tar") {
		t.Errorf("imported %v: want aes.tar once", rc.imported)
	}
	if len(rc.deployed) != 5 {
		t.Fatalf("deployed %d functions", len(rc.deployed))
	}
	for _, s := range rc.deployed {
		if s.GetSandbox() != "runc" || s.GetStartMode() != "snapshot" {
			t.Errorf("spec %v", s)
		}
		if strings.HasPrefix(s.GetName(), "aes") && s.GetImage() != "localhost/vhive/aes:latest" {
			t.Errorf("aes deployed from %q", s.GetImage())
		}
	}
	if Hostname("f-0", "") != "f-0" {
		t.Error("empty domain must give the bare name")
	}
}

func TestReadFunctionsErrors(t *testing.T) {
	dir := t.TempDir()
	for name, body := range map[string]string{
		"empty":    `{"functions": []}`,
		"noname":   `{"functions": [{"file": "x", "count": 1}]}`,
		"dotname":  `{"functions": [{"name": "a.b", "file": "x", "count": 1}]}`,
		"nofile":   `{"functions": [{"name": "a", "count": 1}]}`,
		"negative": `{"functions": [{"name": "a", "file": "x", "count": -1}]}`,
		"twice":    `{"functions": [{"name": "a", "file": "x", "count": 1}, {"name": "a", "file": "y", "count": 1}]}`,
		"unknown":  `{"functions": [{"name": "a", "file": "x", "count": 1, "yaml": "z"}]}`,
	} {
		p := filepath.Join(dir, name+".json")
		if err := os.WriteFile(p, []byte(body), 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := ReadFunctions(p); err == nil {
			t.Errorf("%s: want error", name)
		}
	}
	// A path-looking file that does not exist is an error, not an image ref.
	_, err := DeployFunctions(context.Background(), &recordingControl{}, []FunctionEntry{{Name: "a", File: "./missing.tar", Count: 1}}, DeployOptions{FuncPath: dir})
	if err == nil || !strings.Contains(err.Error(), "missing.tar") {
		t.Errorf("missing image path: %v", err)
	}
}
