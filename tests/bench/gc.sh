#!/usr/bin/env bash
# What garbage collection costs: the time and memory to collect BLOBS (100,000)
# unreferenced blobs, and 50 concurrent 5-layer pushes on a Berth collecting
# every second versus one that never collects (ROUNDS alternating rounds).
#
#   tests/bench/gc.sh              # BLOBS=100000 ROUNDS=5
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
cargo build --release -p berth
BERTH="$CARGO_TARGET_DIR/release/berth"
work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-gc.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
start() { # name port gc-config
  printf '%s\n' "$3" >"$work/$1.toml"
  BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve --config "$work/$1.toml" \
    --listen "127.0.0.1:$2" --data-dir "$work/$1" >"$work/$1.out" 2>"$work/$1.err" &
  pids+=($!)
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$2/v2/" && break; sleep 0.1; done
}
start collecting 5141 $'[registry.gc]\nenabled = true\ninterval_secs = 1\ngrace_secs = 1'
col_pid=${pids[-1]}
start idle 5142 $'[registry.gc]\nenabled = false\ngrace_secs = 1'
idle_pid=${pids[-1]}
python3 tests/bench/gc.py --blobs "${BLOBS:-100000}" --rounds "${ROUNDS:-5}" \
  --collecting "127.0.0.1:5141,$col_pid" --idle "127.0.0.1:5142,$idle_pid"
