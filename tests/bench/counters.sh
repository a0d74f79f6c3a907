#!/usr/bin/env bash
# What pull counting costs the manifest GET path: two release Berths on loopback,
# one counting pulls (the default) and one with `count_pulls = false`, the same
# image in each, wrk against each in alternation (ROUNDS times), medians and ratio.
#
#   tests/bench/counters.sh          # ROUNDS=5 WRK_SECS=10 CONNS=64 by default
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -p berth
BERTH="$CARGO_TARGET_DIR/release/berth"
ROUNDS=${ROUNDS:-5}; WRK_SECS=${WRK_SECS:-10}; CONNS=${CONNS:-64}

work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-counters.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

auth="Authorization: Basic $(printf 'admin:bench-admin-password' | base64)"
start() { # name port count_pulls
  printf '[registry]\ncount_pulls = %s\n' "$3" >"$work/$1.toml"
  BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve --config "$work/$1.toml" \
    --listen "127.0.0.1:$2" --data-dir "$work/$1" >"$work/$1.out" 2>"$work/$1.err" &
  pids+=($!)
  for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$2/v2/" && break; sleep 0.1; done
  # One small image: a config blob, no layers, tagged latest.
  local cfg='{"architecture":"amd64","os":"linux"}'
  local cd="sha256:$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)"
  curl -sf -H "$auth" -X POST --data-binary "$cfg" -H 'Content-Type: application/octet-stream' \
    "http://127.0.0.1:$2/v2/bench/app/blobs/uploads/?digest=$cd" >/dev/null
  local m="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$cd\",\"size\":${#cfg}},\"layers\":[]}"
  curl -sf -H "$auth" -X PUT --data-binary "$m" -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
    "http://127.0.0.1:$2/v2/bench/app/manifests/latest" >/dev/null
}
start counting 5111 true
start off 5112 false

rps() { wrk -t2 -c"$CONNS" -d"${WRK_SECS}s" -H "$auth" "http://127.0.0.1:$1/v2/bench/app/manifests/latest" | awk '/Requests\/sec/ {print $2}'; }
on=(); off=()
for r in $(seq "$ROUNDS"); do
  a=$(rps 5111); b=$(rps 5112)
  on+=("$a"); off+=("$b")
  echo "round $r: counting $a req/s, not counting $b req/s"
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
mon=$(median "${on[@]}"); moff=$(median "${off[@]}")
echo "median: counting $mon req/s, not counting $moff req/s, ratio $(awk -v a="$mon" -v b="$moff" 'BEGIN {printf "%.3f", a/b}')"
sleep 6
pulls=$(curl -s -H "$auth" "http://127.0.0.1:5111/api/v1/repositories/bench/app" | python3 -c 'import json,sys; print(json.load(sys.stdin)["pull_count"])')
echo "pulls counted by the counting server: $pulls"
