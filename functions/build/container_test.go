package build

import (
	"archive/tar"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/opencontainers/runtime-spec/specs-go"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"

	pb "vhive.dev/vhive/api/proto/helloworld"
	"vhive.dev/vhive/internal/testutil"
)

// TestLinuxImageRuns unpacks the packaged helloworld image into a bundle
// built from its config alone and runs it as a real runc and gVisor (runsc)
// container (host network, loopback): it must answer, then exit on SIGTERM.
func TestLinuxImageRuns(t *testing.T) {
	testutil.RequiresRoot(t)
	t.Run("runc", func(t *testing.T) { runImage(t, testutil.RuncPath(t)) })
	t.Run("runsc", func(t *testing.T) { runImage(t, testutil.RunscPath(t), "--network=host") })
}

func runImage(t *testing.T, runtime string, globalFlags ...string) {
	ctx := context.Background()
	out := t.TempDir()
	imgs, err := BuildFunction(ctx, Options{Function: "helloworld", Formats: []Format{FormatLayout}, OutDir: out})
	if err != nil {
		t.Fatal(err)
	}
	img := layoutImage(t, imgs[0].Layout, imgs[0].Ref)
	cfg, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	bundle := t.TempDir()
	rootfs := filepath.Join(bundle, "rootfs")
	rc, err := onlyLayer(t, img).Uncompressed()
	if err != nil {
		t.Fatal(err)
	}
	err = untar(rc, rootfs)
	rc.Close()
	if err != nil {
		t.Fatal(err)
	}

	_, port, err := net.SplitHostPort(testutil.Port(t))
	if err != nil {
		t.Fatal(err)
	}
	env := []string{}
	for _, e := range cfg.Config.Env {
		if strings.HasPrefix(e, "GUEST_PORT=") {
			e = "GUEST_PORT=" + port // the image's default is 50051
		}
		env = append(env, e)
	}
	spec := &specs.Spec{
		Version:  specs.Version,
		Hostname: "helloworld",
		Root:     &specs.Root{Path: "rootfs", Readonly: true},
		Process: &specs.Process{
			Args: cfg.Config.Entrypoint, Env: env, Cwd: cfg.Config.WorkingDir,
			NoNewPrivileges: true,
		},
		Mounts: []specs.Mount{
			{Destination: "/proc", Type: "proc", Source: "proc"},
			{Destination: "/dev", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "mode=755", "size=65536k"}},
			{Destination: "/sys", Type: "sysfs", Source: "sysfs", Options: []string{"nosuid", "noexec", "nodev", "ro"}},
			{Destination: "/tmp", Type: "tmpfs", Source: "tmpfs", Options: []string{"nosuid", "nodev", "mode=1777"}},
		},
		Linux: &specs.Linux{Namespaces: []specs.LinuxNamespace{
			{Type: specs.PIDNamespace}, {Type: specs.IPCNamespace}, {Type: specs.UTSNamespace}, {Type: specs.MountNamespace},
		}},
	}
	b, err := json.Marshal(spec)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(bundle, "config.json"), b, 0o644); err != nil {
		t.Fatal(err)
	}

	state := t.TempDir()
	id := fmt.Sprintf("vhive-fnbuild-%d-%d", os.Getpid(), time.Now().UnixNano())
	global := append([]string{"--root", state}, globalFlags...)
	runcCmd := func(args ...string) ([]byte, error) {
		return exec.Command(runtime, append(global, args...)...).CombinedOutput()
	}
	logf, err := os.Create(filepath.Join(bundle, "stdio.log"))
	if err != nil {
		t.Fatal(err)
	}
	defer logf.Close()
	run := exec.Command(runtime, append(global, "run", "--detach", "--bundle", bundle, id)...)
	run.Stdout, run.Stderr = logf, logf
	t.Cleanup(func() {
		if b, err := runcCmd("delete", "--force", id); err != nil && !strings.Contains(string(b), "does not exist") {
			t.Errorf("%s delete %s: %v: %s", runtime, id, err, b)
		}
		// runsc bind-mounts a network namespace at <root>/null-netns and
		// leaves it there.
		nullNS := filepath.Join(state, "null-netns")
		if _, err := os.Stat(nullNS); err == nil {
			if err := unix.Unmount(nullNS, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
				t.Errorf("unmount %s: %v", nullNS, err)
			}
		}
	})
	if err := run.Run(); err != nil {
		log, _ := os.ReadFile(logf.Name())
		t.Fatalf("%s run: %v: %s", runtime, err, log)
	}

	conn, err := grpc.NewClient("127.0.0.1:"+port, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	cctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	r, err := pb.NewGreeterClient(conn).SayHello(cctx, &pb.HelloRequest{Name: "runc"}, grpc.WaitForReady(true))
	if err != nil || r.GetMessage() != "Hello, runc!" {
		log, _ := os.ReadFile(logf.Name())
		t.Fatalf("SayHello in %s: %v, %v (container output: %s)", runtime, r, err, log)
	}

	if b, err := runcCmd("kill", id, "TERM"); err != nil {
		t.Fatalf("%s kill: %v: %s", runtime, err, b)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		b, err := runcCmd("state", id)
		if err != nil {
			t.Fatalf("%s state: %v: %s", runtime, err, b)
		}
		var st specs.State
		if err := json.Unmarshal(b, &st); err != nil {
			t.Fatalf("%s state %q: %v", runtime, b, err)
		}
		if st.Status == specs.StateStopped {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("container still %s 30 s after SIGTERM", st.Status)
		}
		time.Sleep(50 * time.Millisecond)
	}
	log, _ := os.ReadFile(logf.Name())
	if !strings.Contains(string(log), "function listening") || !strings.Contains(string(log), "function stopped") {
		t.Errorf("container log lacks start/stop lines: %s", log)
	}
}

// untar extracts a layer of plain directories and regular files.
func untar(r io.Reader, dir string) error {
	tr := tar.NewReader(r)
	for {
		h, err := tr.Next()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
			if err := os.Chmod(p, os.FileMode(h.Mode&0o777)|modeBits(h.Mode)); err != nil {
				return err
			}
		case tar.TypeReg:
			f, err := os.OpenFile(p, os.O_CREATE|os.O_WRONLY|os.O_TRUNC, os.FileMode(h.Mode&0o777))
			if err != nil {
				return err
			}
			_, err = io.Copy(f, tr)
			if cerr := f.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		default:
			return fmt.Errorf("unexpected entry %q of type %q", h.Name, h.Typeflag)
		}
	}
}

func modeBits(m int64) os.FileMode {
	if m&0o1000 != 0 {
		return os.ModeSticky
	}
	return 0
}
