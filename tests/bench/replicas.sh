#!/usr/bin/env bash
# One Berth replica against three behind HAProxy, over one SurrealDB server and
# Garage (release builds), with the embedded default beside them: manifest GET
# req/s and p99, and 20 concurrent pushes. The cluster is tests/cluster's.
#   tests/bench/replicas.sh            # BENCH_SECS=10 per wrk run
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
garage="$HOME/.cache/berth/garage/bin/garage"
if [ ! -x "$garage" ] && [ -n "${BENCH_DEBUG_GARAGE:-}" ]; then
  garage="$HOME/.cache/berth/garage-debug/bin/garage"   # manifest GETs never reach it; pushes do
  echo "Garage: the unoptimized build (BENCH_DEBUG_GARAGE)"
elif [ ! -x "$garage" ]; then
  CARGO_TARGET_DIR="$HOME/.cache/berth/garage-target" cargo install --locked garage --version 2.5.0 \
    --no-default-features --features bundled-libs,sqlite --root "$HOME/.cache/berth/garage"
fi
# The release SurrealDB server (not the tests' unoptimized one): about 30 minutes
# to build on 2 cores, once.
surreal="$HOME/.cache/berth/surreal/bin/surreal"
[ -x "$surreal" ] || CARGO_TARGET_DIR="$HOME/.cache/berth/surreal-target" cargo install --locked --path tools/surreal-server --root "$HOME/.cache/berth/surreal"
cargo build --release -p berth -p berth-testkit --bins
exec python3 tests/cluster/cluster.py --bench --secs "${BENCH_SECS:-10}" --berth "$CARGO_TARGET_DIR/release/berth" \
  --surreal "$surreal" --garage "$garage" --garage-up "$CARGO_TARGET_DIR/release/garage-up"
