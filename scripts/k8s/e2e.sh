#!/usr/bin/env bash
# Kubelet end-to-end test of vhive's CRI on loopback: embedded etcd,
# kube-apiserver, kube-scheduler, kube-controller-manager and a kubelet whose
# runtime endpoint is vhive's CRI (`vhive daemon --cri-socket`, in front of a
# private containerd), images from the loopback registry. It checks:
#   (a) a Knative-revision-shaped pod: user-container GUEST_IMAGE runs in a
#       vhive function sandbox (gVisor by default), queue-proxy (a TCP relay
#       stand-in) forwards to GUEST_ADDR:GUEST_PORT; invoked through it;
#   (b) a Deployment of 3 replicas with runtimeClassName vhive;
#   (c) deleting the pods removes their sandboxes, netns and veths.
# Needs root and the binaries of scripts/k8s/build.sh. Prints PASS/FAIL lines;
# exits non-zero on the first failure. Everything it starts is stopped.
#
#   scripts/k8s/e2e.sh            # VHIVE_FUNCTION_RUNTIME=runc to use runc
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VHIVE_CACHE:-/var/cache/vhive}
BIN=$CACHE/bin
D=${VHIVE_E2E_DIR:-/tmp/vhive-k8s-e2e}
REGISTRY=${VHIVE_REGISTRY:-127.0.0.1:5000}
FNRT=${VHIVE_FUNCTION_RUNTIME:-gvisor}
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go
export VHIVE_REGISTRY=$REGISTRY VHIVE_CONTAINERD_DIR=$D/containerd VHIVE_CNI_BRIDGE=vhk8s0 VHIVE_CNI_SUBNET=10.246.0.0/16
ETCD=127.0.0.1:23790
API=https://127.0.0.1:16443
VSOCK=$D/vhive.sock

# kubelet bind-mounts its root dir; the oci backend mounts a netns file.
unmount_all() { awk -v d="$D/" 'index($5, d) == 1 || $5 == substr(d, 1, length(d) - 1) {print $5}' /proc/self/mountinfo | sort -r | xargs -r -n1 umount -l; }
unmount_all
rm -rf "$D"; mkdir -p "$D"/{pki,logs,kubelet,etcd}
bash "$HERE/build.sh"
bash "$ROOT/scripts/critest/build.sh"
(cd "$ROOT" && "$GO" build -o "$BIN/vhive-critest-registry" ./scripts/critest/registry \
  && "$GO" build -o "$D/bin/vhive" ./cmd/vhive)

pids=()
fwd=$(cat /proc/sys/net/ipv4/ip_forward)
cleanup() {
  set +e
  if [[ -n ${KUBECTL:-} ]]; then
    $KUBECTL delete deployment vhive-web --wait=false >/dev/null 2>&1
    $KUBECTL delete pod --all --grace-period=1 --wait=true --timeout=60s >/dev/null 2>&1
  fi
  for ((i=${#pids[@]}-1; i>=0; i--)); do kill "${pids[i]}" 2>/dev/null; wait "${pids[i]}" 2>/dev/null; done
  bash "$ROOT/scripts/critest/containerd.sh" stop
  unmount_all
  # kubelet's (now empty) QoS cgroups.
  for c in /sys/fs/cgroup/*/kubepods; do [ -d "$c" ] && find "$c" -depth -type d -exec rmdir {} + 2>/dev/null; done
  echo "$fwd" >/proc/sys/net/ipv4/ip_forward
}
trap cleanup EXIT
start() { # name cmd...
  local name=$1; shift
  "$@" >"$D/logs/$name.log" 2>&1 &
  pids+=($!)
}
fail() { echo "FAIL: $*"; exit 1; }
pass() { echo "PASS: $*"; }
waitfor() { # what timeout-seconds cmd...
  local what=$1 t=$2; shift 2
  for _ in $(seq $((t * 2))); do "$@" >/dev/null 2>&1 && return 0; sleep 0.5; done
  fail "$what (after ${t}s)"
}

# Queue-proxy in the CNI pod network reaches the function's netns address
# through the host.
echo 1 >/proc/sys/net/ipv4/ip_forward

start registry "$BIN/vhive-critest-registry" -addr "$REGISTRY"
waitfor "registry ready" 30 grep -q '^ready' "$D/logs/registry.log"
CSOCK=$(bash "$ROOT/scripts/critest/containerd.sh" start)
start vhive-cri "$D/bin/vhive" daemon --socket "$D/vhive-control.sock" --state-dir "$D/vhive" --gateway off \
  --sandboxes "$FNRT" --net-prefix vhk8s --subnet 10.170.0.0/16 --net-pool-size 2 \
  --cri-socket "$VSOCK" --cri-containerd "$CSOCK" --cri-function-sandbox "$FNRT" --cri-mirror "*=$REGISTRY"
waitfor "vhive CRI socket" 30 test -S "$VSOCK"

# PKI: a service-account key pair and a static admin token.
openssl genrsa -out "$D/pki/sa.key" 2048 2>/dev/null
openssl rsa -in "$D/pki/sa.key" -pubout -out "$D/pki/sa.pub" 2>/dev/null
TOKEN=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
echo "$TOKEN,admin,admin,system:masters" >"$D/pki/tokens.csv"
cat >"$D/kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters: [{name: e2e, cluster: {server: $API, insecure-skip-tls-verify: true}}]
users: [{name: admin, user: {token: $TOKEN}}]
contexts: [{name: e2e, context: {cluster: e2e, user: admin}}]
current-context: e2e
EOF
KUBECTL="$BIN/kubectl --kubeconfig $D/kubeconfig"

start etcd "$BIN/vhive-etcd" -data-dir "$D/etcd" -listen-client "http://$ETCD" -listen-peer http://127.0.0.1:23800
start apiserver "$BIN/kube-apiserver" --etcd-servers "http://$ETCD" --bind-address 127.0.0.1 --secure-port 16443 \
  --advertise-address 127.0.0.1 --endpoint-reconciler-type none --service-cluster-ip-range 10.97.0.0/16 \
  --service-account-issuer https://kubernetes.default.svc --service-account-key-file "$D/pki/sa.pub" \
  --service-account-signing-key-file "$D/pki/sa.key" --token-auth-file "$D/pki/tokens.csv" \
  --authorization-mode AlwaysAllow --cert-dir "$D/pki" --disable-admission-plugins ServiceAccount
waitfor "apiserver ready" 120 $KUBECTL get --raw /readyz
pass "apiserver ready"
start scheduler "$BIN/kube-scheduler" --kubeconfig "$D/kubeconfig" --leader-elect=false --bind-address 127.0.0.1 --secure-port 16459
start controller-manager "$BIN/kube-controller-manager" --kubeconfig "$D/kubeconfig" --leader-elect=false \
  --bind-address 127.0.0.1 --secure-port 16457 --controllers deployment,replicaset,garbagecollector,namespace \
  --service-account-private-key-file "$D/pki/sa.key"

cat >"$D/kubelet.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
failCgroupV1: false
cgroupDriver: cgroupfs
failSwapOn: false
containerRuntimeEndpoint: unix://$VSOCK
address: 127.0.0.1
port: 16250
readOnlyPort: 0
healthzPort: 16248
authentication: {anonymous: {enabled: true}, webhook: {enabled: false}}
authorization: {mode: AlwaysAllow}
evictionHard: {memory.available: "0%", nodefs.available: "0%", imagefs.available: "0%", nodefs.inodesFree: "0%"}
imageGCHighThresholdPercent: 100
localStorageCapacityIsolation: false
resolvConf: /etc/resolv.conf
EOF
start kubelet "$BIN/kubelet" --kubeconfig "$D/kubeconfig" --config "$D/kubelet.yaml" --root-dir "$D/kubelet" \
  --hostname-override vhive-node --node-ip 127.0.0.1
waitfor "node Ready" 180 sh -c "$KUBECTL get node vhive-node -o jsonpath='{.status.conditions[?(@.type==\"Ready\")].status}' | grep -q True"
pass "node vhive-node Ready (kubelet on vhive's CRI)"
# No node-lifecycle controller runs here to lift the not-ready taint.
$KUBECTL taint nodes vhive-node node.kubernetes.io/not-ready- >/dev/null 2>&1 || true

# (a) Knative-revision-shaped pod.
GUEST_IMAGE="registry.k8s.io/vhive-e2e/hello:1" envsubst '${GUEST_IMAGE}' <"$ROOT/deploy/knative-revision-pod.yaml" | $KUBECTL apply -f - >/dev/null
waitfor "revision pod Ready" 180 $KUBECTL wait pod helloworld-00001-deployment --for=condition=Ready --timeout=5s
POD_IP=$($KUBECTL get pod helloworld-00001-deployment -o jsonpath='{.status.podIP}')
reply=""
for _ in $(seq 60); do reply=$(wget -qO- -T 2 "http://$POD_IP:8012/index.html" 2>/dev/null || true); [[ $reply == "Hello, vhive!" ]] && break; sleep 0.5; done
[[ $reply == "Hello, vhive!" ]] || fail "invoke through queue-proxy at $POD_IP:8012: got '$reply'"
pass "invoked the function through queue-proxy ($POD_IP:8012 -> vhive sandbox): $reply"
grep -q 'queue-proxy routed to function' "$D/logs/vhive-cri.log" || fail "vhive-cri did not route queue-proxy"

# (b) Deployment of 3 replicas in vhive (RuntimeClass vhive).
$KUBECTL apply -f "$ROOT/deploy/runtimeclass.yaml" -f "$ROOT/deploy/vhive-deployment.yaml" >/dev/null
waitfor "3 vhive replicas available" 240 sh -c "$KUBECTL get deployment vhive-web -o jsonpath='{.status.availableReplicas}' | grep -qx 3"
pass "deployment vhive-web: 3/3 replicas available with runtimeClassName vhive"
for ip in $($KUBECTL get pods -l app=vhive-web -o jsonpath='{.items[*].status.podIP}'); do
  wget -qO- -T 2 "http://$ip/" | grep -q 'Welcome to nginx' || fail "replica at $ip does not serve"
done
pass "every replica serves HTTP on its pod IP"
n=$(ls "$D/vhive/cri/containers" | wc -l)
[[ $n -ge 3 ]] || fail "expected >= 3 vhive containers on disk, found $n"

# (c) Deleting pods tears everything down.
$KUBECTL delete deployment vhive-web --wait=true >/dev/null
$KUBECTL delete pod helloworld-00001-deployment --grace-period=1 --wait=true --timeout=120s >/dev/null
waitfor "vhive containers removed" 120 sh -c "[ -z \"\$(ls $D/vhive/cri/containers)\" ]"
waitfor "pod sandboxes removed (kubelet's GC)" 180 sh -c "[ -z \"\$($BIN/crictl -r unix://$VSOCK pods -q 2>/dev/null)\" ]"
left=$(ls /var/run/netns | grep -c '^vhk8s-' || true)
[[ $left -le 2 ]] || fail "function netns left: $left (pool size 2)"
veths=$(ip -o link show master vhk8s0 2>/dev/null | wc -l)
[[ $veths -eq 0 ]] || fail "$veths pod veths left on the CNI bridge"
pass "pods deleted: vhive containers, function sandbox, pod sandboxes and their veths gone; netpool back to its $left spare netns"
echo "ALL PASSED"
