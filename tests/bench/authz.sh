#!/usr/bin/env bash
# Authorization cost at scale: a release Berth with 10,000 repositories and
# 1,000 public-repository rules; listings as anonymous and as a tenant user,
# p50 / p99 / max (tests/bench/authz.py).
#
#   tests/bench/authz.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
cargo build --release -p berth
BERTH="$CARGO_TARGET_DIR/release/berth"

work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-authz.XXXXXX")
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

port=5131
BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve --listen "127.0.0.1:$port" \
  --data-dir "$work/data" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
python3 tests/bench/authz.py --addr "127.0.0.1:$port" "$@"
