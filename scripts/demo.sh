#!/usr/bin/env bash
# The vhive demo: start a daemon, deploy helloworld in gVisor and in runc,
# invoke each cold then warm and print the stage breakdown; wasm with REAP;
# a microVM boot and snapshot restore (DEMO_MICROVM=0 leaves it out); then stop.
# Run through `make demo`, which builds everything this needs.
set -euo pipefail
cd "$(dirname "$0")/.."

VHIVE=${VHIVE:-bin/vhive}
WORK=${DEMO_DIR:-$(mktemp -d /tmp/vhive-demo.XXXXXX)}
SOCK=$WORK/vhive.sock
export VHIVE_SOCKET=$SOCK

"$VHIVE" daemon --state-dir "$WORK/state" --gateway 127.0.0.1:0 --net-prefix vhdemo \
	--log-level warn >"$WORK/daemon.log" 2>&1 &
DAEMON=$!
stop() {
	kill -TERM "$DAEMON" 2>/dev/null || true
	wait "$DAEMON" 2>/dev/null || true
	echo "daemon stopped; log: $WORK/daemon.log"
}
trap stop EXIT

for _ in $(seq 1 100); do [ -S "$SOCK" ] && break; sleep 0.1; done
[ -S "$SOCK" ] || { echo "daemon did not start:"; cat "$WORK/daemon.log"; exit 1; }

step() { printf '\n\033[1m$ %s\033[0m\n' "$*"; "$@"; }

step "$VHIVE" images import out/images/helloworld
step "$VHIVE" deploy helloworld --image localhost/vhive/helloworld:latest --sandbox gvisor
step "$VHIVE" invoke helloworld --payload world
step "$VHIVE" invoke helloworld --payload again
step "$VHIVE" deploy hello-runc --image localhost/vhive/helloworld:latest --sandbox runc
step "$VHIVE" invoke hello-runc --payload world
step "$VHIVE" invoke hello-runc --payload again
if [ -d out/images/helloworld-wasm ] && "$VHIVE" images import out/images/helloworld-wasm >/dev/null 2>&1 &&
	"$VHIVE" deploy hello-wasm --image localhost/vhive/helloworld-wasm:latest --sandbox wasm --start-mode reap >/dev/null 2>&1; then
	echo; echo "# wasm with REAP: boot, then snapshot; the next cold starts restore (record, then prefetch)"
	step "$VHIVE" invoke hello-wasm --payload boot
	sleep 1
	for i in 1 2; do
		"$VHIVE" instances hello-wasm --stop >/dev/null
		step "$VHIVE" invoke hello-wasm --payload "restore-$i"
		sleep 0.5
	done
fi
if [ -n "${DEMO_MICROVM:-1}" ] && [ "${DEMO_MICROVM:-1}" != 0 ] &&
	"$VHIVE" deploy hello-mvm --image localhost/vhive/helloworld:latest --sandbox microvm --start-mode snapshot >/dev/null 2>"$WORK/mvm.err"; then
	echo; echo "# microvm (a Linux guest kernel under QEMU, TCG here): boot, then the snapshot taken after it; the next cold start restores"
	step "$VHIVE" invoke hello-mvm --payload boot
	for _ in $(seq 1 120); do
		"$VHIVE" snapshots ls hello-mvm 2>/dev/null | grep -q '^1 snapshot' && break
		sleep 0.5
	done
	step "$VHIVE" snapshots ls hello-mvm
	"$VHIVE" instances hello-mvm --stop >/dev/null
	step "$VHIVE" invoke hello-mvm --payload restored
elif [ "${DEMO_MICROVM:-1}" != 0 ]; then
	echo; echo "# microvm skipped: $(cat "$WORK/mvm.err")"
fi
step "$VHIVE" ls
step "$VHIVE" instances --stats
