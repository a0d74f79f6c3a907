#!/usr/bin/env bash
# What quota enforcement costs pushes: two release Berths on loopback. In one the
# pushing tenant has a storage limit (every chunk reserved through its quota
# actor, every link settled); in the other the same pushes go to namespaces no
# tenant owns (no quota applies). 50 concurrent pushes of 5-layer images into
# each, in alternation (ROUNDS times); medians and ratio.
#
#   tests/bench/quota.sh          # ROUNDS=5 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
cargo build --release -p berth
BERTH="$CARGO_TARGET_DIR/release/berth"

work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-quota.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

for port in 5121 5122; do
  BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve --listen "127.0.0.1:$port" \
    --data-dir "$work/$port" >"$work/$port.out" 2>"$work/$port.err" &
  pids+=($!)
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
done
python3 tests/bench/quota.py --rounds "${ROUNDS:-5}" --quota 127.0.0.1:5121 --free 127.0.0.1:5122
