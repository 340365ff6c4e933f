#!/usr/bin/env bash
# Builds kubelet, kube-apiserver, kube-scheduler, kube-controller-manager,
# kubectl, kube-proxy (k8s.io/kubernetes v1.37.2) and vhive-etcd (embedded etcd v3.7.3)
# from the tools/k8s module into ${VHIVE_CACHE:-/var/cache/vhive}/bin.
# Idempotent: an existing binary is kept. kubelet alone takes ~13 min cold.
set -euo pipefail
CACHE=${VHIVE_CACHE:-/var/cache/vhive}
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go
cd "$(dirname "$0")/../../tools/k8s"
mkdir -p "$CACHE/bin"
LDFLAGS="-s -w -X k8s.io/component-base/version.gitVersion=v1.37.2 -X k8s.io/component-base/version.gitMajor=1 -X k8s.io/component-base/version.gitMinor=37"
for pkg in vhive.dev/vhive/tools/k8s/cmd/vhive-etcd \
  k8s.io/kubernetes/cmd/kube-apiserver k8s.io/kubernetes/cmd/kubectl \
  k8s.io/kubernetes/cmd/kube-scheduler k8s.io/kubernetes/cmd/kube-controller-manager \
  k8s.io/kubernetes/cmd/kubelet k8s.io/kubernetes/cmd/kube-proxy; do
  name=${pkg##*/}
  if [[ -x $CACHE/bin/$name ]]; then continue; fi
  echo "$(date -u +%T) building $name"
  CGO_ENABLED=0 "$GO" build -trimpath -ldflags "$LDFLAGS" -o "$CACHE/bin/$name.tmp" "$pkg"
  mv "$CACHE/bin/$name.tmp" "$CACHE/bin/$name"
done
echo "kubernetes binaries in $CACHE/bin"
