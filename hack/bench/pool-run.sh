#!/usr/bin/env bash
# Runs csi-bench against one driver binary on a fresh pool on its own
# loop-mounted filesystem, then removes everything it made (driver, mounts,
# loop devices, files), also on failure. Needs root.
#
#   hack/bench/pool-run.sh DRIVER FS GIB -- CSI-BENCH-ARGS...
#
# DRIVER is a hostpath-csi binary (`serve` is started with --endpoint,
# --nodeid bench and --datadir naming one pool "local"); FS is xfs (made
# with reflink=1) or ext4; GIB the size of the sparse file under it.
# In CSI-BENCH-ARGS, @MNT@ becomes the filesystem's mount point (e.g.
# `--baseline-dir @MNT@/baseline`) and @WORK@ a scratch directory beside
# it (e.g. `--target-dir @WORK@/targets`); --endpoint and --pid are added.
# Knobs: CSI_BENCH (default target/release/csi-bench), DRIVER_LOG (copy
# the driver's log here), POOL_RUN_HOLD=1 (print the endpoint and pid and
# wait for Enter before the benchmark, to attach a profiler).
set -euo pipefail
if [ "$(id -u)" -ne 0 ]; then
  echo "pool-run needs root (loop devices and mounts)" >&2
  exit 1
fi
driver=$(realpath "$1") fs=$2 gib=$3
shift 3
[ "${1:-}" = "--" ] && shift
bench=$(realpath "${CSI_BENCH:-target/release/csi-bench}")

work=$(mktemp -d /tmp/hpc-pool-run.XXXXXX)
mnt=$work/mnt sock=$work/csi.sock dev="" pid=""
mkdir -p "$mnt" "$work/targets"

cleanup() {
  set +e
  if [ -n "$pid" ]; then
    kill "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null
  fi
  [ -n "${DRIVER_LOG:-}" ] && cp "$work/driver.log" "$DRIVER_LOG" 2>/dev/null
  # Anything still mounted below the scratch directory, deepest first.
  awk -v w="$work/" 'index($5, w) == 1 { print $5 }' /proc/self/mountinfo |
    sort -r | while read -r m; do umount -l "$m"; done
  # Loop devices the driver attached to files in the pool.
  losetup -l -n -O NAME,BACK-FILE | awk -v m="$mnt/" 'index($2, m) == 1 { print $1 }' |
    while read -r d; do losetup -d "$d"; done
  [ -n "$dev" ] && losetup -d "$dev"
  rm -rf "$work"
}
trap cleanup EXIT

truncate -s "${gib}G" "$work/fs.img"
dev=$(losetup --find --show "$work/fs.img")
case "$fs" in
  xfs) mkfs.xfs -q -m reflink=1 "$dev" ;;
  ext4) mkfs.ext4 -q -E lazy_itable_init=0,lazy_journal_init=0 "$dev" ;;
  *) echo "unknown filesystem $fs (xfs or ext4)" >&2; exit 2 ;;
esac
mount "$dev" "$mnt"
mkdir "$mnt/pool"

"$driver" serve --endpoint "unix://$sock" --nodeid bench \
  --datadir "[{\"name\":\"local\",\"path\":\"$mnt/pool\"}]" >"$work/driver.log" 2>&1 &
pid=$!
for _ in $(seq 100); do
  [ -S "$sock" ] && break
  sleep 0.1
done
[ -S "$sock" ] || { echo "driver did not start:" >&2; cat "$work/driver.log" >&2; exit 1; }

args=()
for a in "$@"; do
  a=${a//@MNT@/$mnt}
  args+=("${a//@WORK@/$work}")
done
if [ "${POOL_RUN_HOLD:-}" = 1 ]; then
  echo "driver pid $pid at unix://$sock; Enter to run the benchmark" >&2
  read -r _
fi
"$bench" --endpoint "unix://$sock" --pid "$pid" "${args[@]}"
