// Command registry serves stand-ins for the images critest (and the kubelet
// end-to-end test) pull, from an in-memory OCI registry on loopback
// (go-containerregistry's pkg/registry). The machine cannot reach
// registry.k8s.io, gcr.io or docker.io; containerd is configured with
// mirrors for them that point here, so the repository paths below are the
// original ones without the registry host.
//
// Every image is built here from the host's static busybox
// (/bin/busybox from Debian's busybox-static): a busybox root with the
// applets linked in /bin, the usual /etc/passwd and /etc/group, plus a few
// files per image (a shell "nginx" serving a page with busybox httpd, users
// and groups critest checks). They are stand-ins: the fidelity limits are
// listed in docs/critest.md.
package main

import (
	"archive/tar"
	"bytes"
	"context"
	"flag"
	"fmt"
	"io"
	"log"
	"log/slog"
	"net"
	"net/http"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func main() {
	if err := run(); err != nil {
		fmt.Fprintln(os.Stderr, "registry:", err)
		os.Exit(1)
	}
}

func run() error {
	addr := flag.String("addr", "127.0.0.1:5000", "listen address (loopback)")
	busybox := flag.String("busybox", "/bin/busybox", "static busybox binary the images are built from")
	nnpPath := flag.String("nnp", "", "static binary for the nonewprivs image (scripts/critest/nnp); optional")
	flag.Parse()
	bb, err := os.ReadFile(*busybox)
	if err != nil {
		return fmt.Errorf("read busybox %q (apt-get install busybox-static): %w", *busybox, err)
	}
	l, err := net.Listen("tcp", *addr)
	if err != nil {
		return fmt.Errorf("listen on %s: %w", *addr, err)
	}
	quiet := log.New(io.Discard, "", 0)
	srv := &http.Server{Handler: registry.New(registry.Logger(quiet)), ReadHeaderTimeout: 10 * time.Second}
	errc := make(chan error, 1)
	go func() { errc <- srv.Serve(l) }()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var nnp []byte
	if *nnpPath != "" {
		if nnp, err = os.ReadFile(*nnpPath); err != nil {
			return fmt.Errorf("read -nnp %q: %w", *nnpPath, err)
		}
	}
	if err := pushAll(ctx, l.Addr().String(), bb, nnp); err != nil {
		srv.Close()
		return err
	}
	slog.Info("registry ready", "addr", l.Addr().String())
	fmt.Println("ready")
	select {
	case <-ctx.Done():
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		return srv.Shutdown(sctx)
	case err := <-errc:
		return err
	}
}

type file struct {
	path string
	mode int64
	body string
	link string // symlink target
	uid  int
	gid  int
}

const passwd = `root:x:0:0:root:/root:/bin/sh
daemon:x:1:1:daemon:/usr/sbin:/bin/false
bin:x:2:2:bin:/bin:/bin/false
sys:x:3:3:sys:/dev:/bin/false
sync:x:4:100:sync:/bin:/bin/sync
mail:x:8:8:mail:/var/spool/mail:/bin/false
www-data:x:33:33:www-data:/var/www:/bin/false
operator:x:37:37:Operator:/var:/bin/false
nobody:x:65534:65534:nobody:/home:/bin/false
`

const group = `root:x:0:
daemon:x:1:
bin:x:2:
sys:x:3:
adm:x:4:
tty:x:5:
disk:x:6:
lp:x:7:
mail:x:8:
kmem:x:9:
wheel:x:10:root
cdrom:x:11:
dialout:x:18:
floppy:x:19:
video:x:28:
audio:x:29:
tape:x:32:
www-data:x:33:
operator:x:37:
staff:x:50:
users:x:100:
nogroup:x:65534:
`

var applets = []string{"sh", "ash", "echo", "sleep", "cat", "ls", "id", "top", "ps", "pidof", "hostname", "httpd",
	"wget", "nc", "grep", "test", "[", "true", "false", "env", "touch", "mkdir", "rm", "head", "tail", "date",
	"kill", "mount", "stat", "wc", "printf", "seq", "tee", "which", "whoami", "uname", "sed", "awk", "find",
	"ip", "ifconfig", "brctl", "netstat", "nslookup", "ping", "chmod", "chown", "cp", "mv", "ln", "dd", "sync", "du", "df",
	"readlink", "realpath", "timeout", "xargs", "sort", "uniq", "cut", "tr", "basename", "dirname", "yes", "vi",
	"groups", "su", "setpriv", "nsenter", "unshare", "sysctl", "free", "uptime", "usleep", "pwd"}

func baseFiles(bb []byte) []file {
	fs := []file{
		{path: "bin/", mode: 0o755}, {path: "etc/", mode: 0o755}, {path: "tmp/", mode: 0o1777},
		{path: "root/", mode: 0o700}, {path: "var/", mode: 0o755}, {path: "var/run/", mode: 0o755},
		{path: "var/www/", mode: 0o755}, {path: "proc/", mode: 0o555}, {path: "sys/", mode: 0o555},
		{path: "dev/", mode: 0o755}, {path: "usr/", mode: 0o755}, {path: "usr/sbin/", mode: 0o755},
		{path: "usr/bin/", mode: 0o755}, {path: "home/", mode: 0o755},
		{path: "bin/busybox", mode: 0o755, body: string(bb)},
		{path: "etc/passwd", mode: 0o644, body: passwd},
		{path: "etc/group", mode: 0o644, body: group},
	}
	for _, a := range applets {
		fs = append(fs, file{path: "bin/" + a, link: "busybox"})
	}
	// Debian's busybox has no pgrep applet; critest calls it.
	fs = append(fs, file{path: "bin/pgrep", mode: 0o755, body: pgrepScript})
	return fs
}

func layer(files []file) (v1.Layer, error) {
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, f := range files {
		h := &tar.Header{Name: f.path, Mode: f.mode, Uid: f.uid, Gid: f.gid, ModTime: time.Unix(0, 0)}
		switch {
		case f.link != "":
			h.Typeflag, h.Linkname, h.Mode = tar.TypeSymlink, f.link, 0o777
		case f.path[len(f.path)-1] == '/':
			h.Typeflag = tar.TypeDir
		default:
			h.Typeflag, h.Size = tar.TypeReg, int64(len(f.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			return nil, err
		}
		if h.Typeflag == tar.TypeReg {
			if _, err := io.WriteString(tw, f.body); err != nil {
				return nil, err
			}
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	b := buf.Bytes()
	return tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil })
}

type spec struct {
	repos      []string // repository:tag without registry host
	files      []file   // added in a second layer
	entrypoint []string
	cmd        []string
	user       string
	ports      []string
}

const nginxScript = `#!/bin/sh
# Stand-in for nginx: busybox httpd, with the process named nginx and its pid
# in /var/run/nginx.pid as the real image has.
echo $$ > /var/run/nginx.pid
echo "nginx stand-in listening on :${PORT:-80}"
httpd -f -p ${PORT:-80} -h /usr/share/nginx/html
`

const httpdScript = `#!/bin/sh
echo "httpd stand-in listening on :80"
httpd -f -v -p 80 -h /usr/local/apache2/htdocs
`

const pgrepScript = `#!/bin/sh
# pgrep stand-in: pids of the processes whose name (comm) contains $1.
found=1
for d in /proc/[0-9]*; do
  pid=${d#/proc/}
  [ "$pid" = "$$" ] && continue
  read -r comm < "$d/comm" 2>/dev/null || continue
  case $comm in *"$1"*) echo "$pid"; found=0 ;; esac
done
exit $found
`

const pauseScript = `#!/bin/sh
trap 'exit 0' TERM INT
exec tail -f /dev/null
`

func specs(nnp []byte) []spec {
	nginx := []file{
		{path: "usr/sbin/nginx", mode: 0o755, body: nginxScript},
		{path: "usr/share/", mode: 0o755}, {path: "usr/share/nginx/", mode: 0o755}, {path: "usr/share/nginx/html/", mode: 0o755},
		{path: "usr/share/nginx/html/index.html", mode: 0o644, body: "<html><body><h1>Welcome to nginx!</h1></body></html>\n"},
	}
	hostnet := append(append([]file{}, nginx...), file{path: "etc/nginx-port", mode: 0o644, body: "12003\n"})
	out := []spec{
		{repos: []string{"e2e-test-images/busybox:1.29-2", "library/busybox:latest", "library/busybox:1.28"}, cmd: []string{"sh"}},
		{repos: []string{"e2e-test-images/nginx:1.14-2", "library/nginx:latest"}, files: nginx, cmd: []string{"/usr/sbin/nginx", "-g", "daemon off;"}, ports: []string{"80/tcp"}},
		{repos: []string{"k8s-staging-cri-tools/hostnet-nginx-amd64:latest"}, files: hostnet, entrypoint: []string{"/bin/sh", "-c", "PORT=12003 exec /usr/sbin/nginx"}, ports: []string{"12003/tcp"}},
		{repos: []string{"e2e-test-images/httpd:2.4.39-4"}, files: []file{
			{path: "usr/local/", mode: 0o755}, {path: "usr/local/bin/", mode: 0o755},
			{path: "usr/local/bin/httpd-foreground", mode: 0o755, body: httpdScript},
			{path: "usr/local/apache2/", mode: 0o755}, {path: "usr/local/apache2/htdocs/", mode: 0o755},
			{path: "usr/local/apache2/htdocs/index.html", mode: 0o644, body: "<html><body><h1>It works!</h1></body></html>\n"},
		}, cmd: []string{"httpd-foreground"}, ports: []string{"80/tcp"}},
		nonewprivs(nnp),
		{repos: []string{"pause:3.9", "pause:3.6", "pause:3.10"}, files: []file{{path: "pause", mode: 0o755, body: pauseScript}}, entrypoint: []string{"/pause"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-latest:latest", "k8s-staging-cri-tools/test-image-tag:test", "k8s-staging-cri-tools/test-image-tag:all"},
			files: []file{{path: "test", mode: 0o644, body: "test\n"}}, cmd: []string{"sh"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-tags:1", "k8s-staging-cri-tools/test-image-tags:2", "k8s-staging-cri-tools/test-image-tags:3"},
			files: []file{{path: "tags", mode: 0o644, body: "tags\n"}}, cmd: []string{"sh"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-user-uid:latest"}, user: "1002", cmd: []string{"sh"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-user-username:latest"}, user: "www-data", cmd: []string{"sh"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-user-uid-group:latest"}, user: "1003:users", cmd: []string{"sh"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-user-username-group:latest"}, user: "www-data:users", cmd: []string{"sh"}},
		{repos: []string{"k8s-staging-cri-tools/test-image-predefined-group:latest"}, user: "1000", cmd: []string{"sh"}, files: []file{
			{path: "etc/passwd", mode: 0o644, body: passwd + "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"},
			{path: "etc/group", mode: 0o644, body: group + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"},
			{path: "home/default-user/", mode: 0o755, uid: 1000, gid: 1000},
		}},
	}
	// The kubelet e2e's function (GUEST_IMAGE): an HTTP server on
	// GUEST_PORT answering "Hello, vhive!" (a stand-in for helloworld).
	out = append(out, spec{repos: []string{"vhive-e2e/hello:1"}, files: []file{
		{path: "www/", mode: 0o755}, {path: "www/index.html", mode: 0o644, body: "Hello, vhive!\n"},
	}, entrypoint: []string{"/bin/sh", "-c", "exec httpd -f -p ${GUEST_PORT:-50051} -h /www"}})
	for i := 1; i <= 3; i++ {
		out = append(out, spec{repos: []string{fmt.Sprintf("k8s-staging-cri-tools/test-image-%d:latest", i)},
			files: []file{{path: fmt.Sprintf("image-%d", i), mode: 0o644, body: fmt.Sprintf("%d\n", i)}}, cmd: []string{"sh"}})
	}
	return out
}

// nonewprivs runs a setuid-root program printing its effective uid, when
// one is given; else a shell printing it (which cannot tell no_new_privs).
func nonewprivs(nnp []byte) spec {
	s := spec{repos: []string{"e2e-test-images/nonewprivs:1.3"}, cmd: []string{"sh", "-c", "echo Effective uid: $(id -u)"}}
	if nnp != nil {
		s.files = []file{{path: "usr/local/", mode: 0o755}, {path: "usr/local/bin/", mode: 0o755},
			{path: "usr/local/bin/nnp", mode: 0o4755, body: string(nnp)}}
		s.cmd = []string{"/usr/local/bin/nnp"}
	}
	return s
}

func pushAll(ctx context.Context, addr string, bb, nnp []byte) error {
	base, err := layer(baseFiles(bb))
	if err != nil {
		return fmt.Errorf("build base layer: %w", err)
	}
	for _, s := range specs(nnp) {
		img, err := mutate.AppendLayers(empty.Image, base)
		if err != nil {
			return err
		}
		if len(s.files) > 0 {
			l, err := layer(s.files)
			if err != nil {
				return fmt.Errorf("build layer for %s: %w", s.repos[0], err)
			}
			if img, err = mutate.AppendLayers(img, l); err != nil {
				return err
			}
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return err
		}
		cf = cf.DeepCopy()
		cf.Architecture, cf.OS = "amd64", "linux"
		cf.Config.Entrypoint = s.entrypoint
		cf.Config.Cmd = s.cmd
		cf.Config.User = s.user
		cf.Config.Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
		if len(s.ports) > 0 {
			cf.Config.ExposedPorts = map[string]struct{}{}
			for _, p := range s.ports {
				cf.Config.ExposedPorts[p] = struct{}{}
			}
		}
		if img, err = mutate.ConfigFile(img, cf); err != nil {
			return err
		}
		for _, r := range s.repos {
			ref, err := name.ParseReference(addr+"/"+r, name.Insecure)
			if err != nil {
				return fmt.Errorf("reference %q: %w", r, err)
			}
			if err := remote.Write(ref, img, remote.WithContext(ctx)); err != nil {
				return fmt.Errorf("push %s: %w", ref, err)
			}
		}
	}
	return nil
}
