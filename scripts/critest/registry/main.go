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

	"github.com/google/go-containerregistry/pkg/registry"

	"vhive.dev/vhive/internal/standin"
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

func baseFiles(bb []byte) []standin.File {
	fs := []standin.File{
		{Path: "bin/", Mode: 0o755}, {Path: "etc/", Mode: 0o755}, {Path: "tmp/", Mode: 0o1777},
		{Path: "root/", Mode: 0o700}, {Path: "var/", Mode: 0o755}, {Path: "var/run/", Mode: 0o755},
		{Path: "var/www/", Mode: 0o755}, {Path: "proc/", Mode: 0o555}, {Path: "sys/", Mode: 0o555},
		{Path: "dev/", Mode: 0o755}, {Path: "usr/", Mode: 0o755}, {Path: "usr/sbin/", Mode: 0o755},
		{Path: "usr/bin/", Mode: 0o755}, {Path: "home/", Mode: 0o755},
		{Path: "bin/busybox", Mode: 0o755, Body: string(bb)},
		{Path: "etc/passwd", Mode: 0o644, Body: passwd},
		{Path: "etc/group", Mode: 0o644, Body: group},
	}
	for _, a := range applets {
		fs = append(fs, standin.File{Path: "bin/" + a, Link: "busybox"})
	}
	// Debian's busybox has no pgrep applet; critest calls it.
	fs = append(fs, standin.File{Path: "bin/pgrep", Mode: 0o755, Body: pgrepScript})
	return fs
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

func specs(nnp []byte) []standin.Image {
	nginx := []standin.File{
		{Path: "usr/sbin/nginx", Mode: 0o755, Body: nginxScript},
		{Path: "usr/share/", Mode: 0o755}, {Path: "usr/share/nginx/", Mode: 0o755}, {Path: "usr/share/nginx/html/", Mode: 0o755},
		{Path: "usr/share/nginx/html/index.html", Mode: 0o644, Body: "<html><body><h1>Welcome to nginx!</h1></body></html>\n"},
	}
	hostnet := append(append([]standin.File{}, nginx...), standin.File{Path: "etc/nginx-port", Mode: 0o644, Body: "12003\n"})
	out := []standin.Image{
		{Repos: []string{"e2e-test-images/busybox:1.29-2", "library/busybox:latest", "library/busybox:1.28"}, Cmd: []string{"sh"}},
		{Repos: []string{"e2e-test-images/nginx:1.14-2", "library/nginx:latest"}, Files: nginx, Cmd: []string{"/usr/sbin/nginx", "-g", "daemon off;"}, Ports: []string{"80/tcp"}},
		{Repos: []string{"k8s-staging-cri-tools/hostnet-nginx-amd64:latest"}, Files: hostnet, Entrypoint: []string{"/bin/sh", "-c", "PORT=12003 exec /usr/sbin/nginx"}, Ports: []string{"12003/tcp"}},
		{Repos: []string{"e2e-test-images/httpd:2.4.39-4"}, Files: []standin.File{
			{Path: "usr/local/", Mode: 0o755}, {Path: "usr/local/bin/", Mode: 0o755},
			{Path: "usr/local/bin/httpd-foreground", Mode: 0o755, Body: httpdScript},
			{Path: "usr/local/apache2/", Mode: 0o755}, {Path: "usr/local/apache2/htdocs/", Mode: 0o755},
			{Path: "usr/local/apache2/htdocs/index.html", Mode: 0o644, Body: "<html><body><h1>It works!</h1></body></html>\n"},
		}, Cmd: []string{"httpd-foreground"}, Ports: []string{"80/tcp"}},
		nonewprivs(nnp),
		{Repos: []string{"pause:3.9", "pause:3.6", "pause:3.10"}, Files: []standin.File{{Path: "pause", Mode: 0o755, Body: pauseScript}}, Entrypoint: []string{"/pause"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-latest:latest", "k8s-staging-cri-tools/test-image-tag:test", "k8s-staging-cri-tools/test-image-tag:all"},
			Files: []standin.File{{Path: "test", Mode: 0o644, Body: "test\n"}}, Cmd: []string{"sh"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-tags:1", "k8s-staging-cri-tools/test-image-tags:2", "k8s-staging-cri-tools/test-image-tags:3"},
			Files: []standin.File{{Path: "tags", Mode: 0o644, Body: "tags\n"}}, Cmd: []string{"sh"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-user-uid:latest"}, User: "1002", Cmd: []string{"sh"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-user-username:latest"}, User: "www-data", Cmd: []string{"sh"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-user-uid-group:latest"}, User: "1003:users", Cmd: []string{"sh"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-user-username-group:latest"}, User: "www-data:users", Cmd: []string{"sh"}},
		{Repos: []string{"k8s-staging-cri-tools/test-image-predefined-group:latest"}, User: "1000", Cmd: []string{"sh"}, Files: []standin.File{
			{Path: "etc/passwd", Mode: 0o644, Body: passwd + "default-user:x:1000:1000:Linux User,,,:/home/default-user:/bin/sh\n"},
			{Path: "etc/group", Mode: 0o644, Body: group + "default-user:x:1000:\ngroup-defined-in-image:x:50000:default-user\n"},
			{Path: "home/default-user/", Mode: 0o755, UID: 1000, GID: 1000},
		}},
	}
	// The kubelet e2e's function (GUEST_IMAGE): an HTTP server on
	// GUEST_PORT answering "Hello, vhive!" (a stand-in for helloworld).
	out = append(out, standin.Image{Repos: []string{"vhive-e2e/hello:1"}, Files: []standin.File{
		{Path: "www/", Mode: 0o755}, {Path: "www/index.html", Mode: 0o644, Body: "Hello, vhive!\n"},
	}, Entrypoint: []string{"/bin/sh", "-c", "exec httpd -f -p ${GUEST_PORT:-50051} -h /www"}})
	for i := 1; i <= 3; i++ {
		out = append(out, standin.Image{Repos: []string{fmt.Sprintf("k8s-staging-cri-tools/test-image-%d:latest", i)},
			Files: []standin.File{{Path: fmt.Sprintf("image-%d", i), Mode: 0o644, Body: fmt.Sprintf("%d\n", i)}}, Cmd: []string{"sh"}})
	}
	return out
}

// nonewprivs runs a setuid-root program printing its effective uid, when
// one is given; else a shell printing it (which cannot tell no_new_privs).
func nonewprivs(nnp []byte) standin.Image {
	s := standin.Image{Repos: []string{"e2e-test-images/nonewprivs:1.3"}, Cmd: []string{"sh", "-c", "echo Effective uid: $(id -u)"}}
	if nnp != nil {
		s.Files = []standin.File{{Path: "usr/local/", Mode: 0o755}, {Path: "usr/local/bin/", Mode: 0o755},
			{Path: "usr/local/bin/nnp", Mode: 0o4755, Body: string(nnp)}}
		s.Cmd = []string{"/usr/local/bin/nnp"}
	}
	return s
}

func pushAll(ctx context.Context, addr string, bb, nnp []byte) error {
	base, err := standin.Layer(baseFiles(bb))
	if err != nil {
		return fmt.Errorf("build base layer: %w", err)
	}
	images := specs(nnp)
	for i := range images {
		images[i].Env = []string{"PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
	}
	return standin.Push(ctx, addr, base, images)
}
