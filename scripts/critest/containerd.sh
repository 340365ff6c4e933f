#!/usr/bin/env bash
# Starts or stops a private stock containerd (Debian's 1.6) for critest and
# the kubelet e2e: its own root, state and socket under $DIR, the CRI plugin
# with restrict_oom_score_adj (lowering oom_score_adj is refused here), a CNI
# bridge network of its own, and registry mirrors that send registry.k8s.io,
# k8s.gcr.io, gcr.io and docker.io to the loopback registry at $REGISTRY.
#
#   containerd.sh start   # idempotent; prints the socket path
#   containerd.sh stop    # also deletes its CNI bridge
set -euo pipefail
DIR=${VHIVE_CONTAINERD_DIR:-/run/vhive-critest/containerd}
REGISTRY=${VHIVE_REGISTRY:-127.0.0.1:5000}
SUBNET=${VHIVE_CNI_SUBNET:-10.244.0.0/16}
BRIDGE=${VHIVE_CNI_BRIDGE:-vhcri0}
SOCK=$DIR/containerd.sock
PIDFILE=$DIR/containerd.pid

install() {
  if ! command -v containerd >/dev/null || [[ ! -x /usr/lib/cni/bridge ]]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y containerd containernetworking-plugins >/dev/null
  fi
  # The package enables a system containerd; ours must not share its socket.
  command -v systemctl >/dev/null && systemctl disable --now containerd >/dev/null 2>&1 || true
}

configure() {
  mkdir -p "$DIR"/{root,state,cni,certs.d,opt}
  cat >"$DIR/config.toml" <<TOML
version = 2
root = "$DIR/root"
state = "$DIR/state"
[grpc]
  address = "$SOCK"
[debug]
  level = "warn"
[plugins."io.containerd.internal.v1.opt"]
  path = "$DIR/opt"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "registry.k8s.io/pause:3.9"
  restrict_oom_score_adj = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".containerd]
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni"
  [plugins."io.containerd.grpc.v1.cri".registry]
    config_path = "$DIR/certs.d"
TOML
  cat >"$DIR/cni/10-vhive-critest.conflist" <<JSON
{
  "cniVersion": "0.4.0",
  "name": "vhive-critest",
  "plugins": [
    {"type": "bridge", "bridge": "$BRIDGE", "isGateway": true, "ipMasq": false, "hairpinMode": true,
     "ipam": {"type": "host-local", "ranges": [[{"subnet": "$SUBNET"}]], "routes": [{"dst": "0.0.0.0/0"}],
              "dataDir": "$DIR/cni-ipam"}},
    {"type": "portmap", "capabilities": {"portMappings": true}},
    {"type": "loopback"}
  ]
}
JSON
  for host in registry.k8s.io k8s.gcr.io gcr.io docker.io; do
    mkdir -p "$DIR/certs.d/$host"
    cat >"$DIR/certs.d/$host/hosts.toml" <<TOML
server = "https://$host"
[host."http://$REGISTRY"]
  capabilities = ["pull", "resolve"]
  skip_verify = true
TOML
  done
}

start() {
  install
  configure
  if [[ -f $PIDFILE ]] && kill -0 "$(cat "$PIDFILE")" 2>/dev/null; then
    echo "$SOCK"; return
  fi
  containerd --config "$DIR/config.toml" >"$DIR/containerd.log" 2>&1 &
  echo $! >"$PIDFILE"
  for _ in $(seq 100); do
    [[ -S $SOCK ]] && { echo "$SOCK"; return; }
    kill -0 "$(cat "$PIDFILE")" 2>/dev/null || { tail -20 "$DIR/containerd.log" >&2; exit 1; }
    sleep 0.1
  done
  echo "containerd did not create $SOCK; log: $DIR/containerd.log" >&2; exit 1
}

stop() {
  [[ -f $PIDFILE ]] || return 0
  pid=$(cat "$PIDFILE")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  rm -f "$PIDFILE"
  # The bridge is this containerd's alone; its pods are gone with it.
  ip link del "$BRIDGE" 2>/dev/null || true
}

case ${1:-} in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
