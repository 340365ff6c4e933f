#!/usr/bin/env bash
# Builds crictl and critest (sigs.k8s.io/cri-tools v1.37.0) into
# ${VHIVE_CACHE:-/var/cache/vhive}/bin. Idempotent: an existing binary is kept.
set -euo pipefail
CACHE=${VHIVE_CACHE:-/var/cache/vhive}
VERSION=v1.37.0
GO=${GO:-go}
command -v "$GO" >/dev/null || GO=/usr/local/go/bin/go
mkdir -p "$CACHE/bin"
if [[ ! -x $CACHE/bin/crictl ]]; then
  echo "building crictl $VERSION"
  GOBIN=$CACHE/bin CGO_ENABLED=0 "$GO" install "sigs.k8s.io/cri-tools/cmd/crictl@$VERSION"
fi
if [[ ! -x $CACHE/bin/critest ]]; then
  echo "building critest $VERSION"
  dir=$(GOFLAGS=-mod=mod "$GO" mod download -json "sigs.k8s.io/cri-tools@$VERSION" | sed -n 's/^\t"Dir": "\(.*\)",$/\1/p')
  [[ -d $dir ]] || { echo "cri-tools $VERSION not in module cache" >&2; exit 1; }
  (cd "$dir" && CGO_ENABLED=0 "$GO" test -c -o "$CACHE/bin/critest.tmp" ./cmd/critest)
  mv "$CACHE/bin/critest.tmp" "$CACHE/bin/critest"
fi
echo "crictl and critest in $CACHE/bin"
