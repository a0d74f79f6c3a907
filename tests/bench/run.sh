#!/usr/bin/env bash
# Berth vs the reference registry (CNCF Distribution, Debian's docker-registry),
# side by side on loopback, one run. Prints a table of figures and ratios.
#
#   tests/bench/run.sh            # full run (1 GiB blob, 10,000 tags/repos)
#   BENCH_QUICK=1 tests/bench/run.sh   # a smaller smoke run
#   BENCH_BERTH_CONFIG=berth.toml tests/bench/run.sh   # Berth with a config file
#   (for example `[storage]` with `backend = "fs"`, `root = …`, `direct_io = false`)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"

need=()
command -v docker-registry >/dev/null || need+=(docker-registry)
command -v wrk >/dev/null || need+=(wrk)
command -v curl >/dev/null || need+=(curl)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

cargo build --release -p berth
BERTH="$CARGO_TARGET_DIR/release/berth"

work=$(mktemp -d /tmp/berth-bench.XXXXXX)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

BERTH_PORT=${BERTH_PORT:-5101}
DIST_PORT=${DIST_PORT:-5102}

BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve ${BENCH_BERTH_CONFIG:+--config "$BENCH_BERTH_CONFIG"} --listen "127.0.0.1:$BERTH_PORT" --data-dir "$work/berth" >"$work/berth.out" 2>"$work/berth.err" &
pids+=($!); berth_pid=$!

cat >"$work/dist.yml" <<YML
version: 0.1
log:
  level: warn
  accesslog:
    disabled: true
storage:
  cache:
    blobdescriptor: inmemory
  filesystem:
    rootdirectory: $work/dist
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$DIST_PORT
YML
docker-registry serve "$work/dist.yml" >"$work/dist.out" 2>&1 &
pids+=($!); dist_pid=$!

for url in "http://127.0.0.1:$BERTH_PORT/v2/" "http://127.0.0.1:$DIST_PORT/v2/"; do
  for _ in $(seq 100); do curl -s -o /dev/null "$url" && break; sleep 0.1; done
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "single-core SHA-256 (openssl speed -evp sha256, 16 KiB blocks):"
openssl speed -evp sha256 -seconds 2 2>/dev/null | awk '/^sha256/ {print "  " $NF " (kB/s)"}'

python3 tests/bench/bench.py \
  --work "$work" \
  --target "berth=http://127.0.0.1:$BERTH_PORT,$berth_pid" \
  --credentials "berth=admin:bench-admin-password" \
  --target "distribution=http://127.0.0.1:$DIST_PORT,$dist_pid"
