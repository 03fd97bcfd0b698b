#!/usr/bin/env bash
# Builds the driver, runs it on a demo pool under a temp dir, and walks one
# volume through create -> publish -> write -> unpublish -> delete with `ctl`.
# Set KEEP_RUNNING=1 to leave the driver running afterwards.
set -euo pipefail
cd "$(dirname "$0")/.."
bash hack/setup.sh
cargo build --release --quiet
bin=target/release/hostpath-csi
demo=$(mktemp -d /tmp/hostpath-csi-demo.XXXXXX)
sock="$demo/csi.sock"
mkdir -p "$demo/pool" "$demo/pods"
"$bin" serve --endpoint "unix://$sock" --nodeid demo-node \
  --datadir "[{\"name\":\"local\",\"path\":\"$demo/pool\"}]" 2>"$demo/driver.log" &
driver=$!
cleanup() {
  if [ "${KEEP_RUNNING:-0}" != 1 ]; then
    kill "$driver" 2>/dev/null || true
    wait "$driver" 2>/dev/null || true
    umount "$demo/pods/"* 2>/dev/null || true
    rm -rf "$demo"
  fi
}
trap cleanup EXIT
for _ in $(seq 100); do [ -S "$sock" ] && break; sleep 0.1; done
ctl() { echo "\$ hostpath-csi ctl $*" >&2; "$bin" ctl --endpoint "unix://$sock" "$@"; }
ctl info
ctl create-volume pvc-demo --size 1Gi
ctl publish pvc-demo "$demo/pods/pvc-demo"
echo "hello from a pod" > "$demo/pods/pvc-demo/hello.txt"
echo "\$ cat $demo/pool/pvc-demo/hello.txt" >&2; cat "$demo/pool/pvc-demo/hello.txt"
ctl stats pvc-demo "$demo/pods/pvc-demo"
ctl create-volume pvc-disk --size 256Mi --block
ctl publish pvc-disk "$demo/pods/pvc-disk" --block
echo "\$ dd to the published block device" >&2
dd if=/dev/urandom of="$demo/pods/pvc-disk" bs=1M count=4 oflag=direct status=none
ctl unpublish pvc-disk "$demo/pods/pvc-disk"
ctl unpublish pvc-demo "$demo/pods/pvc-demo"
ctl list-volumes
ctl delete-volume pvc-disk
ctl delete-volume pvc-demo
echo "demo finished; the driver's log (one line per RPC):" >&2
tail -n 12 "$demo/driver.log" >&2
if [ "${KEEP_RUNNING:-0}" = 1 ]; then
  echo "driver still running (pid $driver) on unix://$sock" >&2
  trap - EXIT
fi
