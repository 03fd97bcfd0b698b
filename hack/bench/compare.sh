#!/usr/bin/env bash
# Before/after: runs the csi-bench workloads against two hostpath-csi
# binaries, each on a fresh pool (hack/bench/pool-run.sh), one workload at
# a time, old then new, so each pair is measured close together.
#
#   hack/bench/compare.sh OLD_BIN NEW_BIN OUT_DIR [STEP...]
#
# STEPs (default: all but storm-ext4): w1-ext4 w1-xfs w2-dir w2-block list
# storm storm-ext4.
# Each run's JSON line goes to OUT_DIR/results.jsonl (with "driver" and
# "step" added), its table and messages to OUT_DIR/<step>-<driver>.log.
# Knobs: COMPARE_LOCK=FILE runs each run under `flock FILE` (released
# between runs); ROUNDS (default 1) repeats the pairs, alternating order;
# PRETOUCH_MIB (default 4096); STORM_ARGS overrides the storm's sizes.
set -euo pipefail
cd "$(dirname "$0")/../.."
old=$(realpath "$1") new=$(realpath "$2") out=$3
shift 3
steps=("$@")
[ ${#steps[@]} -gt 0 ] || steps=(w1-ext4 w1-xfs w2-dir w2-block list storm)
mkdir -p "$out"
out=$(realpath "$out")
pretouch=${PRETOUCH_MIB:-4096}

# One step: filesystem, size (GiB), csi-bench arguments.
step_args() {
  case "$1" in
    w1-ext4) echo "ext4 8 --baseline-dir @MNT@/baseline w1 -n 4000 -c 16" ;;
    w1-xfs) echo "xfs 8 --baseline-dir @MNT@/baseline w1 -n 4000 -c 16" ;;
    w2-dir) echo "xfs 8 w2 -k 1000 -c 8 --target-dir @WORK@/targets" ;;
    w2-block) echo "xfs 8 --block w2 -k 500 -c 8 --target-dir @WORK@/targets" ;;
    list) echo "xfs 16 list --count 20000 --page 100 -c 16" ;;
    storm) echo "xfs 32 storm ${STORM_ARGS:-} --target-dir @WORK@/targets" ;;
    # On ext4 the clones are real copies (no reflink): the heavy lane works.
    storm-ext4) echo "ext4 40 storm ${STORM_ARGS:-} --target-dir @WORK@/targets" ;;
    *) echo "unknown step $1" >&2; exit 2 ;;
  esac
}

run_one() { # step label binary
  local step=$1 label=$2 bin=$3 fs gib
  read -r fs gib rest <<<"$(step_args "$step")"
  local log="$out/$step-$label.log" lock=()
  [ -n "${COMPARE_LOCK:-}" ] && lock=(flock "$COMPARE_LOCK")
  echo "== $step $label: pool-run.sh $bin $fs $gib -- --pretouch-mib $pretouch $rest" >>"$log"
  local rc=0
  # shellcheck disable=SC2086 # $rest is a word list on purpose
  "${lock[@]}" hack/bench/pool-run.sh "$bin" "$fs" "$gib" -- --pretouch-mib "$pretouch" $rest \
    >"$out/.line" 2>>"$log" || rc=$?
  tail -n 30 "$log" >&2
  python3 - "$out/.line" "$label" "$step" "$rc" >>"$out/results.jsonl" <<'EOF'
import json, sys
path, label, step, rc = sys.argv[1:]
for line in open(path):
    line = line.strip()
    if line.startswith("{"):
        r = json.loads(line)
        r.update(driver=label, step=step, exit=int(rc))
        print(json.dumps(r))
EOF
  rm -f "$out/.line"
}

for round in $(seq "${ROUNDS:-1}"); do
  for step in "${steps[@]}"; do
    if [ $((round % 2)) -eq 1 ]; then
      run_one "$step" old "$old"
      run_one "$step" new "$new"
    else
      run_one "$step" new "$new"
      run_one "$step" old "$old"
    fi
  done
done
