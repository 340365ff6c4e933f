package cri

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	runtimeapi "k8s.io/cri-api/pkg/apis/runtime/v1"
	utilexec "k8s.io/utils/exec"

	"vhive.dev/vhive/internal/image"
	"vhive.dev/vhive/internal/netpool"
	"vhive.dev/vhive/internal/testutil"
)

func codeOf(err error) codes.Code { return status.Code(err) }

func runVhivePod(t testing.TB, e *testEnv, name string) (string, *runtimeapi.PodSandboxConfig) {
	t.Helper()
	pc := podConfig(t, e, name)
	resp, err := e.rt.RunPodSandbox(context.Background(), &runtimeapi.RunPodSandboxRequest{Config: pc, RuntimeHandler: DefaultHandler})
	if err != nil {
		t.Fatalf("RunPodSandbox: %v", err)
	}
	return resp.GetPodSandboxId(), pc
}

func busybox(name string, cmd ...string) *runtimeapi.ContainerConfig {
	return &runtimeapi.ContainerConfig{
		Metadata: &runtimeapi.ContainerMetadata{Name: name},
		Image:    &runtimeapi.ImageSpec{Image: "docker.io/test/busybox:1"},
		Command:  cmd,
		LogPath:  name + ".log",
		Labels:   map[string]string{"c": name},
	}
}

func containerState(t *testing.T, e *testEnv, id string) *runtimeapi.ContainerStatus {
	t.Helper()
	st, err := e.rt.ContainerStatus(context.Background(), &runtimeapi.ContainerStatusRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("ContainerStatus %q: %v", id, err)
	}
	return st.GetStatus()
}

// A vhive-handler pod runs its containers with runc in the pod's network
// namespace: logs in CRI format, exec, stats, stop, remove, and nothing left.
func TestVhivePodLifecycle(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	podID, pc := runVhivePod(t, e, "life")

	ps, err := e.rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: podID})
	if err != nil {
		t.Fatal(err)
	}
	if got := ps.GetStatus().GetRuntimeHandler(); got != DefaultHandler {
		t.Errorf("pod runtime handler = %q, want %q", got, DefaultHandler)
	}
	podIP := ps.GetStatus().GetNetwork().GetIp()
	if podIP == "" {
		t.Fatal("pod has no IP from containerd's CNI")
	}

	cc := busybox("web", "sh", "-c", "echo hello; echo oops >&2; hostname; exec httpd -f -p 8080 -h /etc")
	cc.Envs = []*runtimeapi.KeyValue{kv("FOO", "bar")}
	cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: cc, SandboxConfig: pc})
	if err != nil {
		t.Fatalf("CreateContainer: %v", err)
	}
	id := cr.GetContainerId()
	if st := containerState(t, e, id); st.GetState() != runtimeapi.ContainerState_CONTAINER_CREATED {
		t.Fatalf("state after create = %v", st.GetState())
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("StartContainer: %v", err)
	}
	st := containerState(t, e, id)
	if st.GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING || st.GetStartedAt() == 0 {
		t.Fatalf("after start: state %v startedAt %d", st.GetState(), st.GetStartedAt())
	}
	logPath := filepath.Join(pc.GetLogDirectory(), "web.log")
	if st.GetLogPath() != logPath {
		t.Errorf("log path = %q, want %q", st.GetLogPath(), logPath)
	}
	waitFor(t, "log lines", func() (bool, error) {
		b, err := os.ReadFile(logPath)
		s := string(b)
		return strings.Contains(s, " stdout F hello\n") && strings.Contains(s, " stderr F oops\n") && strings.Contains(s, " stdout F life\n"), err
	})
	b, _ := os.ReadFile(logPath)
	for _, line := range strings.Split(strings.TrimSpace(string(b)), "\n") {
		f := strings.SplitN(line, " ", 4)
		if len(f) != 4 {
			t.Fatalf("log line %q is not CRI format", line)
		}
		if _, err := time.Parse(time.RFC3339Nano, f[0]); err != nil {
			t.Errorf("log line %q: timestamp: %v", line, err)
		}
	}

	// The container is in the pod's network namespace: reachable at the pod IP.
	waitFor(t, "httpd at the pod IP", func() (bool, error) {
		body, err := httpGet("http://" + podIP + ":8080/hostname")
		return strings.TrimSpace(body) == "life", err
	})

	ex, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: id, Cmd: []string{"sh", "-c", "echo $FOO; exit 3"}, Timeout: 10})
	if err != nil {
		t.Fatalf("ExecSync: %v", err)
	}
	if string(ex.GetStdout()) != "bar\n" || ex.GetExitCode() != 3 {
		t.Errorf("ExecSync = %q exit %d, want \"bar\\n\" exit 3", ex.GetStdout(), ex.GetExitCode())
	}

	// A timed-out exec fails with DeadlineExceeded and its process is gone.
	if _, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: id, Cmd: []string{"sleep", "4321"}, Timeout: 1}); codeOf(err) != codes.DeadlineExceeded {
		t.Errorf("ExecSync past its timeout: %v, want DeadlineExceeded", err)
	}
	waitFor(t, "timed-out exec process gone", func() (bool, error) {
		r, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: id, Cmd: []string{"sh", "-c", "for p in /proc/[0-9]*; do grep -q '(sleep)' $p/stat 2>/dev/null && tr '\\0' ' ' < $p/cmdline; done; true"}, Timeout: 10})
		return err == nil && len(r.GetStdout()) == 0, fmt.Errorf("%q, %v", r.GetStdout(), err)
	})

	stats, err := e.rt.ContainerStats(ctx, &runtimeapi.ContainerStatsRequest{ContainerId: id})
	if err != nil {
		t.Fatalf("ContainerStats: %v", err)
	}
	if stats.GetStats().GetMemory().GetWorkingSetBytes().GetValue() == 0 || stats.GetStats().GetCpu().GetUsageCoreNanoSeconds() == nil {
		t.Errorf("stats empty: %v", stats.GetStats())
	}

	list, err := e.rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{PodSandboxId: podID}})
	if err != nil {
		t.Fatal(err)
	}
	if len(list.GetContainers()) != 1 || list.GetContainers()[0].GetId() != id {
		t.Errorf("ListContainers(pod) = %v, want only %q", list.GetContainers(), id)
	}
	list, err = e.rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{LabelSelector: map[string]string{"c": "nope"}}})
	if err != nil || len(list.GetContainers()) != 0 {
		t.Errorf("ListContainers(label nope) = %v, %v; want none", list.GetContainers(), err)
	}

	if _, err := e.rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: id, Timeout: 10}); err != nil {
		t.Fatalf("StopContainer: %v", err)
	}
	st = containerState(t, e, id)
	if st.GetState() != runtimeapi.ContainerState_CONTAINER_EXITED || st.GetFinishedAt() == 0 || st.GetExitCode() == 0 {
		t.Errorf("after stop: state %v finishedAt %d exit %d", st.GetState(), st.GetFinishedAt(), st.GetExitCode())
	}
	// Stop is idempotent.
	if _, err := e.rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: id}); err != nil {
		t.Errorf("second StopContainer: %v", err)
	}
	dir := filepath.Join(e.state, "containers", id)
	if _, err := os.Stat(dir); err != nil {
		t.Fatalf("container dir before remove: %v", err)
	}
	if _, err := e.rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatalf("RemoveContainer: %v", err)
	}
	if _, err := os.Stat(dir); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("container dir %q still there after remove: %v", dir, err)
	}
	if _, err := e.rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: id}); codeOf(err) != codes.NotFound {
		t.Errorf("status after remove: %v, want NotFound", err)
	}
	if _, err := e.rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: podID}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(e.state, "pods", podID)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("pod dir left after RemovePodSandbox: %v", err)
	}
}

// A container whose process exits reports EXITED with its exit code, and an
// unknown command fails StartContainer with the runtime's reason.
func TestExitCodeAndStartError(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	podID, pc := runVhivePod(t, e, "exit")
	cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("seven", "sh", "-c", "exit 7"), SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "exit", func() (bool, error) {
		st := containerState(t, e, cr.GetContainerId())
		return st.GetState() == runtimeapi.ContainerState_CONTAINER_EXITED, nil
	})
	if st := containerState(t, e, cr.GetContainerId()); st.GetExitCode() != 7 || st.GetReason() != "Error" {
		t.Errorf("exit code %d reason %q, want 7 Error", st.GetExitCode(), st.GetReason())
	}
	// Starting it again is refused.
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.GetContainerId()}); codeOf(err) != codes.FailedPrecondition {
		t.Errorf("restart of an exited container: %v, want FailedPrecondition", err)
	}

	bad, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("bad", "/no/such/binary"), SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	_, err = e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: bad.GetContainerId()})
	if err == nil || !strings.Contains(err.Error(), "/no/such/binary") {
		t.Errorf("start of a missing binary: %v, want an error naming it", err)
	}
	if st := containerState(t, e, bad.GetContainerId()); st.GetState() != runtimeapi.ContainerState_CONTAINER_EXITED || st.GetReason() != "StartError" {
		t.Errorf("after failed start: state %v reason %q", st.GetState(), st.GetReason())
	}
}

// GetContainerEvents streams created/started/stopped/deleted for vhive
// containers.
func TestContainerEvents(t *testing.T) {
	e := newEnv(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	stream, err := e.rt.GetContainerEvents(ctx, &runtimeapi.GetEventsRequest{})
	if err != nil {
		t.Fatal(err)
	}
	podID, pc := runVhivePod(t, e, "events")
	cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("ev", "true"), SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	id := cr.GetContainerId()
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "exit", func() (bool, error) {
		return containerState(t, e, id).GetState() == runtimeapi.ContainerState_CONTAINER_EXITED, nil
	})
	if _, err := e.rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: id}); err != nil {
		t.Fatal(err)
	}
	want := []runtimeapi.ContainerEventType{
		runtimeapi.ContainerEventType_CONTAINER_CREATED_EVENT,
		runtimeapi.ContainerEventType_CONTAINER_STARTED_EVENT,
		runtimeapi.ContainerEventType_CONTAINER_STOPPED_EVENT,
		runtimeapi.ContainerEventType_CONTAINER_DELETED_EVENT,
	}
	var got []runtimeapi.ContainerEventType
	for len(got) < len(want) {
		ev, err := stream.Recv()
		if err != nil {
			t.Fatalf("events after %v: %v", got, err)
		}
		if ev.GetContainerId() != id {
			continue // containerd's pause container etc.
		}
		got = append(got, ev.GetContainerEventType())
		if ev.GetPodSandboxStatus().GetId() != podID || len(ev.GetContainersStatuses()) != 1 {
			t.Errorf("event %v lacks pod %q or status", ev.GetContainerEventType(), podID)
		}
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("events = %v, want %v", got, want)
		}
	}
}

// vHive's Knative routing: user-container with GUEST_IMAGE runs in a vhive
// function sandbox (oci backend, runc, netpool netns); queue-proxy is
// created by containerd with GUEST_ADDR/GUEST_PORT pointing at it; removing
// the pod tears the sandbox and its netns down.
func TestKnativeRouting(t *testing.T) {
	knativeRouting(t, newEnv(t))
}

// knativeRouting is TestKnativeRouting on e, whatever its function backend.
func knativeRouting(t *testing.T, e *testEnv) {
	t.Helper()
	ctx := context.Background()
	pc := podConfig(t, e, "kn")
	pr, err := e.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: pc})
	if err != nil {
		t.Fatal(err)
	}
	podID := pr.GetPodSandboxId()
	uc := busybox(UserContainer, "sleep", "1000")
	uc.Command = nil
	uc.Envs = []*runtimeapi.KeyValue{kv(EnvGuestImage, "docker.io/test/fn:1"), kv(EnvGuestPort, "50051"), kv(EnvRevision, "hello-00001")}
	ucr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: uc, SandboxConfig: pc})
	if err != nil {
		t.Fatalf("create user-container: %v", err)
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: ucr.GetContainerId()}); err != nil {
		t.Fatalf("start user-container: %v", err)
	}
	info, err := e.rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: ucr.GetContainerId(), Verbose: true})
	if err != nil {
		t.Fatal(err)
	}
	if info.GetStatus().GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Fatalf("user-container state %v", info.GetStatus().GetState())
	}
	c := e.srv.lookup(ucr.GetContainerId())
	if c == nil || c.Kind != kindFunction {
		t.Fatalf("user-container is not a vhive function container: %+v", c)
	}
	addr, port := splitEndpoint(c.Endpoint)
	if port != "50051" {
		t.Fatalf("function endpoint %q: port %q, want 50051", c.Endpoint, port)
	}
	waitFor(t, "function answers at its endpoint", func() (bool, error) {
		body, err := httpGet("http://" + c.Endpoint + "/index.html")
		return strings.TrimSpace(body) == "fn-ok", err
	})

	// As kubelet does, pull the queue-proxy image through the CRI first.
	if _, err := e.img.PullImage(ctx, &runtimeapi.PullImageRequest{Image: &runtimeapi.ImageSpec{Image: "docker.io/test/busybox:1"}, SandboxConfig: pc}); err != nil {
		t.Fatalf("PullImage: %v", err)
	}
	qp := busybox(QueueProxy, "sh", "-c", "echo addr=$GUEST_ADDR port=$GUEST_PORT; sleep 1000")
	qpr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: qp, SandboxConfig: pc})
	if err != nil {
		t.Fatalf("create queue-proxy: %v", err)
	}
	if e.srv.lookup(qpr.GetContainerId()) != nil {
		t.Fatal("queue-proxy was run by vhive; want containerd")
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: qpr.GetContainerId()}); err != nil {
		t.Fatalf("start queue-proxy: %v", err)
	}
	want := "addr=" + addr + " port=50051"
	waitFor(t, "queue-proxy env in its log", func() (bool, error) {
		b, err := os.ReadFile(filepath.Join(pc.GetLogDirectory(), QueueProxy+".log"))
		return strings.Contains(string(b), want), err
	})
	// Both containers are listed, vhive's and containerd's.
	list, err := e.rt.ListContainers(ctx, &runtimeapi.ListContainersRequest{Filter: &runtimeapi.ContainerFilter{PodSandboxId: podID}})
	if err != nil || len(list.GetContainers()) != 2 {
		t.Fatalf("ListContainers = %v, %v; want 2", list.GetContainers(), err)
	}
	if _, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: ucr.GetContainerId(), Cmd: []string{"true"}}); codeOf(err) != codes.Unimplemented {
		t.Errorf("ExecSync in a function sandbox: %v, want Unimplemented", err)
	}

	if _, err := e.rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: podID}); err != nil {
		t.Fatal(err)
	}
	select {
	case <-c.sb.Done():
	case <-time.After(30 * time.Second):
		t.Fatal("function sandbox still running after StopPodSandbox")
	}
	if st := containerState(t, e, ucr.GetContainerId()); st.GetState() != runtimeapi.ContainerState_CONTAINER_EXITED {
		t.Errorf("user-container after pod stop: %v", st.GetState())
	}
	if _, err := e.rt.RemovePodSandbox(ctx, &runtimeapi.RemovePodSandboxRequest{PodSandboxId: podID}); err != nil {
		t.Fatal(err)
	}
	if e.srv.lookup(ucr.GetContainerId()) != nil {
		t.Error("user-container record left after RemovePodSandbox")
	}
	// The netpool keeps its one pre-created netns; the function's was
	// returned to the pool, so exactly the pool's Size remains.
	left, err := netpool.Leftovers(e.prefix)
	if err != nil {
		t.Fatal(err)
	}
	if len(left) > 2 { // one netns + one host veth
		t.Errorf("netns/veths left after pod removal: %v", left)
	}
}

// Bad input gets a clear gRPC code and leaves nothing behind.
func TestBadInput(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	if _, err := e.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: &runtimeapi.PodSandboxConfig{}, RuntimeHandler: DefaultHandler}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("pod without metadata: %v, want InvalidArgument", err)
	}
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: "x", Config: &runtimeapi.ContainerConfig{}}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("container without metadata: %v, want InvalidArgument", err)
	}
	// Stop and remove are idempotent: unknown IDs are not an error.
	if _, err := e.rt.StopContainer(ctx, &runtimeapi.StopContainerRequest{ContainerId: "no-such-container"}); err != nil {
		t.Errorf("stop unknown container: %v, want success", err)
	}
	if _, err := e.rt.StopPodSandbox(ctx, &runtimeapi.StopPodSandboxRequest{PodSandboxId: "no-such-pod"}); err != nil {
		t.Errorf("stop unknown pod: %v, want success", err)
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: "no-such-container"}); codeOf(err) != codes.NotFound {
		t.Errorf("start unknown container: %v, want NotFound", err)
	}
	if _, err := e.rt.ContainerStatus(ctx, &runtimeapi.ContainerStatusRequest{ContainerId: "no-such-container"}); codeOf(err) != codes.NotFound {
		t.Errorf("status of unknown container: %v, want NotFound", err)
	}

	podID, pc := runVhivePod(t, e, "bad")
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("dup", "true"), SandboxConfig: pc}); err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("dup", "true"), SandboxConfig: pc}); codeOf(err) != codes.AlreadyExists {
		t.Errorf("duplicate name: %v, want AlreadyExists", err)
	}
	noimg := busybox("noimg", "true")
	noimg.Image = nil
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: noimg, SandboxConfig: pc}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("no image: %v, want InvalidArgument", err)
	}
	missing := busybox("missing", "true")
	missing.Image = &runtimeapi.ImageSpec{Image: "docker.io/test/nope:1"}
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: missing, SandboxConfig: pc}); codeOf(err) != codes.NotFound {
		t.Errorf("unknown image: %v, want NotFound", err)
	}

	// Knative pod with an unpullable GUEST_IMAGE: NotFound, no sandbox left.
	kpc := podConfig(t, e, "badkn")
	kp, err := e.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: kpc})
	if err != nil {
		t.Fatal(err)
	}
	uc := busybox(UserContainer)
	uc.Envs = []*runtimeapi.KeyValue{kv(EnvGuestImage, "docker.io/test/nope:1")}
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: kp.GetPodSandboxId(), Config: uc, SandboxConfig: kpc}); codeOf(err) != codes.NotFound {
		t.Errorf("unpullable GUEST_IMAGE: %v, want NotFound", err)
	}
	uc.Envs = []*runtimeapi.KeyValue{kv(EnvGuestImage, "docker.io/test/fn:1"), kv(EnvGuestPort, "http")}
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: kp.GetPodSandboxId(), Config: uc, SandboxConfig: kpc}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("GUEST_PORT=http: %v, want InvalidArgument", err)
	}
	// An environment string no exec accepts (MAX_ARG_STRLEN: 128 KiB with
	// "KEY=" and the NUL) is refused naming the variable and the limit, in
	// a container and in a function's user container.
	tooLong := func(what string, err error) {
		t.Helper()
		if codeOf(err) != codes.InvalidArgument || !strings.Contains(err.Error(), `"BIG"`) || !strings.Contains(err.Error(), "131072") {
			t.Errorf("%s: %v, want InvalidArgument naming BIG and the limit of 131072 bytes", what, err)
		}
	}
	big := busybox("bigenv", "true")
	big.Envs = []*runtimeapi.KeyValue{kv("BIG", strings.Repeat("b", 128<<10-len("BIG")-1))}
	_, err = e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: big, SandboxConfig: pc})
	tooLong("container env one byte over the limit", err)
	uc.Envs = []*runtimeapi.KeyValue{kv(EnvGuestImage, "docker.io/test/fn:1"), kv("BIG", strings.Repeat("b", 128<<10))}
	_, err = e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: kp.GetPodSandboxId(), Config: uc, SandboxConfig: kpc})
	tooLong("function env of 128 KiB", err)
	for _, c := range e.srv.mine() {
		if c.PodID == kp.GetPodSandboxId() {
			t.Errorf("container %q left after failed creates", c.ID)
		}
	}
	ents, _ := os.ReadDir(filepath.Join(e.state, "containers"))
	if len(ents) != 1 { // only "dup"
		t.Errorf("container dirs = %d, want 1 (dup)", len(ents))
	}
}

// With containerd down every proxied call is Unavailable, and the handler is
// refused when no OCI runtime is configured.
func TestContainerdDownAndDisabledHandler(t *testing.T) {
	e := newEnv(t, func(c *Config) {
		c.ContainerdEndpoint = filepath.Join(t.TempDir(), "no-containerd.sock")
		c.OCIRuntime = ""
	})
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	if _, err := e.rt.Version(ctx, &runtimeapi.VersionRequest{}); codeOf(err) != codes.Unavailable {
		t.Errorf("Version with containerd down: %v, want Unavailable", err)
	}
	if _, err := e.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podConfig(t, e, "down")}); codeOf(err) != codes.Unavailable {
		t.Errorf("RunPodSandbox with containerd down: %v, want Unavailable", err)
	}
	_, err := e.rt.RunPodSandbox(ctx, &runtimeapi.RunPodSandboxRequest{Config: podConfig(t, e, "off"), RuntimeHandler: DefaultHandler})
	if codeOf(err) != codes.InvalidArgument || !strings.Contains(err.Error(), "no OCI runtime") {
		t.Errorf("vhive handler without OCI runtime: %v, want InvalidArgument naming it", err)
	}
}

// New validates its config.
func TestNewValidates(t *testing.T) {
	ctx := context.Background()
	for name, cfg := range map[string]Config{
		"no state dir":  {ContainerdEndpoint: "/x.sock", Images: nopImages{}},
		"no containerd": {StateDir: t.TempDir(), Images: nopImages{}},
		"no images":     {StateDir: t.TempDir(), ContainerdEndpoint: "/x.sock"},
		"tcp endpoint":  {StateDir: t.TempDir(), ContainerdEndpoint: "tcp://127.0.0.1:1", Images: nopImages{}},
		"bad runtime":   {StateDir: t.TempDir(), ContainerdEndpoint: "/x.sock", Images: nopImages{}, OCIRuntime: "/no/such/runc"},
	} {
		if _, err := New(ctx, cfg); err == nil {
			t.Errorf("%s: New succeeded", name)
		}
	}
}

// A restarted server removes the containers the previous one left running
// and keeps its vhive pods.
func TestRestartCleansUp(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	podID, pc := runVhivePod(t, e, "restart")
	cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("long", "sleep", "1000"), SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	id := cr.GetContainerId()
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: id}); err != nil {
		t.Fatal(err)
	}
	pid := e.srv.lookup(id).proc.pid
	// A second server on the same state dir stands for the daemon after a
	// crash of the first.
	s2, err := New(ctx, e.srv.cfg)
	if err != nil {
		t.Fatalf("New after crash: %v", err)
	}
	defer s2.Close(ctx)
	if _, err := os.Stat(filepath.Join(e.state, "containers", id)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("container dir left after restart: %v", err)
	}
	waitFor(t, "old container process gone", func() (bool, error) {
		_, err := os.Stat(filepath.Join("/proc", strconv.Itoa(pid)))
		return errors.Is(err, os.ErrNotExist), err
	})
	if !s2.isVhivePod(podID) {
		t.Error("vhive pod record lost across restart")
	}
	if s2.lookup(id) != nil {
		t.Error("container record kept across restart")
	}
}

type nopImages struct{}

func (nopImages) Pull(context.Context, string) (image.Image, error) {
	return image.Image{}, errors.New("no images here")
}

// Streaming exec (kubectl/crictl exec) into a vhive container goes through
// the CRI streaming server; crictl is the real client.
func TestStreamingExec(t *testing.T) {
	e := newEnv(t)
	crictl := filepath.Join(testutil.CacheDir(), "bin", "crictl")
	if _, err := os.Stat(crictl); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("crictl missing (scripts/critest/build.sh builds it): %v", err)
		}
		t.Skipf("crictl missing (scripts/critest/build.sh builds it): %v", err)
	}
	ctx := context.Background()
	podID, pc := runVhivePod(t, e, "stream")
	cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: busybox("sh", "sleep", "1000"), SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
		t.Fatal(err)
	}
	resp, err := e.rt.Exec(ctx, &runtimeapi.ExecRequest{ContainerId: cr.GetContainerId(), Cmd: []string{"true"}, Stdout: true})
	if err != nil || !strings.HasPrefix(resp.GetUrl(), "http://127.0.0.1:") {
		t.Fatalf("Exec = %v, %v; want a loopback URL", resp, err)
	}
	cmd := exec.Command(crictl, "--runtime-endpoint", "unix://"+e.sock, "exec", cr.GetContainerId(), "sh", "-c", "echo streamed; cat /etc/hostname; exit 4")
	var stderr strings.Builder
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	// crictl exits 1 and reports the command's exit code on stderr.
	if err == nil || !strings.Contains(stderr.String(), "exit code 4") {
		t.Errorf("crictl exec: %v, stderr %q; want the command's exit code 4 reported", err, stderr.String())
	}
	if string(out) != "streamed\nstream\n" {
		t.Errorf("crictl exec output %q", out)
	}
	// With a tty (crictl needs a terminal for -t, so the streaming
	// runtime is called directly): the output comes through the pty.
	var ttyOut bytesBuffer
	if err := e.srv.stream.Exec(ctx, cr.GetContainerId(), []string{"sh", "-c", "test -t 1 && echo tty"}, nil, &ttyOut, nil, true, nil); err != nil {
		t.Errorf("tty exec: %v", err)
	}
	// `test -t 1` proves stdout is a terminal; the line discipline adds
	// one "\r" per newline, and a second one when the output passes through
	// runc's console relay before the pty has gone raw (timing-dependent).
	if got := ttyOut.String(); strings.ReplaceAll(got, "\r", "") != "tty\n" || !strings.Contains(got, "\r\n") {
		t.Errorf("tty exec output %q, want \"tty\\r\\n\" (one or two \\r)", got)
	}
	err = e.srv.stream.Exec(ctx, cr.GetContainerId(), []string{"sh", "-c", "exit 5"}, nil, &ttyOut, nil, true, nil)
	var ce utilexec.CodeExitError
	if !errors.As(err, &ce) || ce.Code != 5 {
		t.Errorf("tty exec exit: %v, want code 5", err)
	}

	// Attach to a shell reading its stdin (stdin once): what the client
	// writes runs, its output comes back, and closing stdin ends the shell.
	sh := busybox("attached", "sh")
	sh.Stdin, sh.StdinOnce = true, true
	ar, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: sh, SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: ar.GetContainerId()}); err != nil {
		t.Fatal(err)
	}
	att := exec.Command(crictl, "--runtime-endpoint", "unix://"+e.sock, "attach", "-i", ar.GetContainerId())
	att.Stdin = strings.NewReader("echo attached-$((6*7))\n")
	out, err = att.Output()
	if err != nil || !strings.Contains(string(out), "attached-42") {
		t.Errorf("crictl attach = %q, %v; want attached-42", out, err)
	}
	waitFor(t, "shell exits after stdin closes", func() (bool, error) {
		return containerState(t, e, ar.GetContainerId()).GetState() == runtimeapi.ContainerState_CONTAINER_EXITED, nil
	})
}

// bytesBuffer is a bytes.Buffer with a no-op Close (an io.WriteCloser).
type bytesBuffer struct{ bytes.Buffer }

func (*bytesBuffer) Close() error { return nil }

// Seccomp (RuntimeDefault on, nil off, Localhost from a file), privileged
// capabilities bounded by the daemon's, and OOMKilled as the exit reason.
func TestSecurityAndOOM(t *testing.T) {
	e := newEnv(t)
	ctx := context.Background()
	podID, pc := runVhivePod(t, e, "sec")
	run := func(name string, mut func(*runtimeapi.ContainerConfig), cmd ...string) string {
		t.Helper()
		cc := busybox(name, cmd...)
		cc.Linux = &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{}}
		mut(cc)
		cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: cc, SandboxConfig: pc})
		if err != nil {
			t.Fatalf("create %s: %v", name, err)
		}
		if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
			t.Fatalf("start %s: %v", name, err)
		}
		return cr.GetContainerId()
	}
	seccompMode := func(id string) string {
		t.Helper()
		r, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: id, Cmd: []string{"grep", "^Seccomp:", "/proc/self/status"}, Timeout: 10})
		if err != nil {
			t.Fatal(err)
		}
		return strings.Join(strings.Fields(string(r.GetStdout())), " ")
	}
	def := run("def", func(c *runtimeapi.ContainerConfig) { c.Linux.SecurityContext.Seccomp = &runtimeapi.SecurityProfile{} }, "sleep", "100")
	if got := seccompMode(def); got != "Seccomp: 2" {
		t.Errorf("RuntimeDefault: %q, want Seccomp: 2", got)
	}
	unc := run("unc", func(c *runtimeapi.ContainerConfig) {}, "sleep", "100")
	if got := seccompMode(unc); got != "Seccomp: 0" {
		t.Errorf("no profile: %q, want Seccomp: 0", got)
	}
	prof := filepath.Join(t.TempDir(), "no-chmod.json")
	if err := os.WriteFile(prof, []byte(`{"defaultAction":"SCMP_ACT_ALLOW","syscalls":[{"names":["chmod","fchmodat","fchmodat2"],"action":"SCMP_ACT_ERRNO"}]}`), 0o644); err != nil {
		t.Fatal(err)
	}
	loc := run("loc", func(c *runtimeapi.ContainerConfig) {
		c.Linux.SecurityContext.Seccomp = &runtimeapi.SecurityProfile{ProfileType: runtimeapi.SecurityProfile_Localhost, LocalhostRef: prof}
	}, "sleep", "100")
	r, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: loc, Cmd: []string{"chmod", "400", "/tmp"}, Timeout: 10})
	if err != nil || r.GetExitCode() == 0 || !strings.Contains(string(r.GetStderr()), "Operation not permitted") {
		t.Errorf("chmod under a profile denying it: %v exit %d stderr %q", err, r.GetExitCode(), r.GetStderr())
	}
	// Privileged: every capability the daemon has (CAP_SYS_RESOURCE may be
	// missing here), so the container starts.
	priv := run("priv", func(c *runtimeapi.ContainerConfig) { c.Linux.SecurityContext.Privileged = true }, "sleep", "100")
	if st := containerState(t, e, priv); st.GetState() != runtimeapi.ContainerState_CONTAINER_RUNNING {
		t.Errorf("privileged container: %v", st.GetState())
	}
	// RunAsGroup without a user is refused.
	cc := busybox("grp", "true")
	cc.Linux = &runtimeapi.LinuxContainerConfig{SecurityContext: &runtimeapi.LinuxContainerSecurityContext{RunAsGroup: &runtimeapi.Int64Value{Value: 5}}}
	if _, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID, Config: cc, SandboxConfig: pc}); codeOf(err) != codes.InvalidArgument {
		t.Errorf("RunAsGroup without RunAsUser: %v, want InvalidArgument", err)
	}
	// A process over its memory limit is OOM-killed: exit 137, OOMKilled.
	oom := run("oom", func(c *runtimeapi.ContainerConfig) {
		c.Linux.Resources = &runtimeapi.LinuxContainerResources{MemoryLimitInBytes: 16 << 20}
	}, "sh", "-c", "x=a; while :; do x=$x$x; done")
	waitFor(t, "OOM kill", func() (bool, error) {
		return containerState(t, e, oom).GetState() == runtimeapi.ContainerState_CONTAINER_EXITED, nil
	})
	if st := containerState(t, e, oom); st.GetExitCode() != 137 || st.GetReason() != "OOMKilled" {
		t.Errorf("over the memory limit: exit %d reason %q, want 137 OOMKilled", st.GetExitCode(), st.GetReason())
	}
}

// The vhive handler with gVisor (runsc --network=host in the pod's netns):
// the container runs in a gVisor sandbox with the pod's IP and hostname.
func TestVhivePodGVisor(t *testing.T) {
	runsc := testutil.RunscPath(t)
	e := newEnv(t, func(c *Config) {
		c.OCIRuntime = runsc
		c.OCIRuntimeArgs = []string{"--network=host", "--platform=systrap", "--ignore-cgroups"}
	})
	ctx := context.Background()
	podID, pc := runVhivePod(t, e, "gvisor")
	ps, err := e.rt.PodSandboxStatus(ctx, &runtimeapi.PodSandboxStatusRequest{PodSandboxId: podID})
	if err != nil {
		t.Fatal(err)
	}
	podIP := ps.GetStatus().GetNetwork().GetIp()
	cr, err := e.rt.CreateContainer(ctx, &runtimeapi.CreateContainerRequest{PodSandboxId: podID,
		Config: busybox("g", "sh", "-c", "hostname; exec httpd -f -p 8080 -h /etc"), SandboxConfig: pc})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := e.rt.StartContainer(ctx, &runtimeapi.StartContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
		t.Fatalf("start under runsc: %v", err)
	}
	waitfor := func(what string, cond func() (bool, error)) { t.Helper(); waitFor(t, what, cond) }
	waitfor("hostname in the log", func() (bool, error) {
		b, err := os.ReadFile(filepath.Join(pc.GetLogDirectory(), "g.log"))
		return strings.Contains(string(b), " stdout F gvisor\n"), err
	})
	waitfor("httpd in gVisor at the pod IP", func() (bool, error) {
		body, err := httpGet("http://" + podIP + ":8080/hostname")
		return strings.TrimSpace(body) == "gvisor", err
	})
	r, err := e.rt.ExecSync(ctx, &runtimeapi.ExecSyncRequest{ContainerId: cr.GetContainerId(), Cmd: []string{"sh", "-c", "dmesg | head -1"}, Timeout: 10})
	if err != nil || !strings.Contains(string(r.GetStdout()), "gVisor") {
		t.Errorf("dmesg in the container = %q, %v; want gVisor's", r.GetStdout(), err)
	}
	if _, err := e.rt.RemoveContainer(ctx, &runtimeapi.RemoveContainerRequest{ContainerId: cr.GetContainerId()}); err != nil {
		t.Fatal(err)
	}
}
