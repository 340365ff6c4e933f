#!/usr/bin/env bash
# Runs critest (cri-tools v1.37.0) against (a) a stock containerd and (b)
# vhive's CRI with the `vhive` runtime handler, in the same run, with every
# image served from a loopback registry. Prints the comparison table.
#
#   scripts/critest/run.sh [extra critest flags, e.g. --ginkgo.focus=...]
#
# Needs root. Everything it starts is stopped on exit. Reports and logs go
# to ${VHIVE_CRITEST_OUT:-/tmp/vhive-critest}.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
CACHE=${VHIVE_CACHE:-/var/cache/vhive}
OUT=${VHIVE_CRITEST_OUT:-/tmp/vhive-critest}
RUN=/run/vhive-critest
REGISTRY=${VHIVE_REGISTRY:-127.0.0.1:5000}
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go
export VHIVE_REGISTRY=$REGISTRY
mkdir -p "$OUT" "$RUN" "$CACHE/bin"

bash "$HERE/build.sh"
command -v busybox >/dev/null || DEBIAN_FRONTEND=noninteractive apt-get install -y busybox-static >/dev/null
(cd "$ROOT" && "$GO" build -o "$CACHE/bin/vhive-critest-registry" ./scripts/critest/registry \
  && "$GO" build -o "$OUT/vhive" ./cmd/vhive \
  && "$GO" build -o "$CACHE/bin/vhive-critest-report" ./scripts/critest/report \
  && CGO_ENABLED=0 "$GO" build -o "$CACHE/bin/vhive-critest-nnp" ./scripts/critest/nnp)

pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  bash "$HERE/containerd.sh" stop || true
}
trap cleanup EXIT

"$CACHE/bin/vhive-critest-registry" -addr "$REGISTRY" -nnp "$CACHE/bin/vhive-critest-nnp" >"$OUT/registry.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do grep -q '^ready' "$OUT/registry.log" 2>/dev/null && break; sleep 0.1; done
grep -q '^ready' "$OUT/registry.log" || { cat "$OUT/registry.log"; exit 1; }

CSOCK=$(bash "$HERE/containerd.sh" start)
# critest pulls an image only when the runtime lacks it: drop what an earlier
# run (perhaps of other stand-ins) left, so both runtimes see these images.
"$CACHE/bin/crictl" -r "unix://$CSOCK" rmi -a >/dev/null 2>&1 || true
VSOCK=$RUN/vhive.sock
# The vhive daemon with its CRI server; runc backs the vhive-handler pods.
"$OUT/vhive" daemon --socket "$RUN/vhive-control.sock" --state-dir /var/lib/vhive-critest/vhive --gateway off \
  --sandboxes runc --net-prefix vhcrt --subnet 10.171.0.0/16 \
  --cri-socket "$VSOCK" --cri-containerd "$CSOCK" --cri-function-sandbox none --cri-mirror "*=$REGISTRY" \
  >"$OUT/vhive-cri.log" 2>&1 &
pids+=($!)
for _ in $(seq 100); do [[ -S $VSOCK ]] && break; sleep 0.1; done

critest() {
  local name=$1 sock=$2; shift 2
  echo "== critest against $name"
  "$CACHE/bin/critest" -runtime-endpoint "unix://$sock" -image-endpoint "unix://$sock" \
    -ginkgo.no-color -ginkgo.json-report "$OUT/$name.json" "$@" >"$OUT/$name.log" 2>&1 || true
  grep -E '^(Ran|PASS|FAIL)' "$OUT/$name.log" || tail -5 "$OUT/$name.log"
}
critest containerd "$CSOCK" "$@"
critest vhive "$VSOCK" -runtime-handler vhive "$@"
set -o pipefail
"$CACHE/bin/vhive-critest-report" containerd="$OUT/containerd.json" vhive="$OUT/vhive.json" | tee "$OUT/report.md"
