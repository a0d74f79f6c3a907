#!/usr/bin/env bash
# Berth vs the reference registry (CNCF Distribution, Debian's docker-registry),
# side by side on loopback, one run. Prints a table of figures and ratios.
#
#   tests/bench/run.sh            # full run (1 GiB blob, 10,000 tags/repos)
#   BENCH_QUICK=1 tests/bench/run.sh   # a smaller smoke run
#   BENCH_REPOS=100000 tests/bench/run.sh   # the catalog at 100,000 repositories
#   BENCH_BERTH_CONFIG=berth.toml tests/bench/run.sh   # Berth with a config file
#   (for example `[storage]` with `backend = "fs"`, `root = …`, `direct_io = false`)
#   BENCH_STORAGE=s3 tests/bench/run.sh   # both registries' blobs on one Garage
#   (S3, started here; a release build of Garage 2.5.0 is cached in
#   ~/.cache/berth/garage), each under a prefix of the same bucket; Distribution
#   with redirects off, so both stream blobs through themselves
#   BENCH_TLS=1 tests/bench/run.sh   # both registries serve HTTPS themselves
#   (a certificate from an authority made here with openssl; the clients verify it)
#   BENCH_DIR=/mnt/bench tests/bench/run.sh   # both registries' data there (default
#   /tmp; the other scripts here take it too). Push figures depend on the
#   filesystem (docs/PERFORMANCE.md, "What a push costs in metadata"): the test
#   machines' root is ext4 without a journal; a journaled one from an image:
#   truncate -s 16G /work/bench.img && mkfs.ext4 -q /work/bench.img &&
#   mkdir -p /mnt/bench && mount -o loop /work/bench.img /mnt/bench
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

# BENCH_BERTH_BIN: a release binary built already (else it is built here).
if [ -n "${BENCH_BERTH_BIN:-}" ]; then
  BERTH="$BENCH_BERTH_BIN"
else
  cargo build --release -p berth
  BERTH="$CARGO_TARGET_DIR/release/berth"
fi

work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-bench.XXXXXX")
echo "data under $work ($(findmnt -no FSTYPE,SOURCE -T "$work"))"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

BERTH_PORT=${BERTH_PORT:-5101}
DIST_PORT=${DIST_PORT:-5102}

dist_storage="  filesystem:
    rootdirectory: $work/dist"
if [ "${BENCH_STORAGE:-fs}" = s3 ]; then
  garage_root="$HOME/.cache/berth/garage"
  if [ ! -x "$garage_root/bin/garage" ]; then
    CARGO_TARGET_DIR="$HOME/.cache/berth/garage-target" cargo install --locked garage --version 2.5.0 \
      --no-default-features --features bundled-libs,sqlite --root "$garage_root"
  fi
  cargo build --release -p berth-testkit --bin garage-up
  "$CARGO_TARGET_DIR/release/garage-up" "$garage_root/bin/garage" "$work/garage" >"$work/garage.env" &
  pids+=($!)
  for _ in $(seq 300); do grep -q '^GARAGE_SECRET=' "$work/garage.env" && break; sleep 0.1; done
  # shellcheck disable=SC1091
  . "$work/garage.env"
  echo "storage: S3 on Garage at $GARAGE_ENDPOINT"
  BENCH_BERTH_CONFIG="$work/berth.toml"
  cat >"$BENCH_BERTH_CONFIG" <<TOML
[storage]
backend = "s3"
bucket = "$GARAGE_BUCKET"
endpoint = "$GARAGE_ENDPOINT"
region = "$GARAGE_REGION"
root = "/berth/"
access_key_id = "$GARAGE_KEY_ID"
secret_access_key = "$GARAGE_SECRET"
TOML
  dist_storage="  s3:
    accesskey: $GARAGE_KEY_ID
    secretkey: $GARAGE_SECRET
    region: $GARAGE_REGION
    regionendpoint: $GARAGE_ENDPOINT
    bucket: $GARAGE_BUCKET
    rootdirectory: /distribution
    secure: false
    v4auth: true
  redirect:
    disable: true"
fi

scheme=http dist_tls="" curl_ca=() bench_ca=()
if [ "${BENCH_TLS:-0}" = 1 ]; then
  scheme=https
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 -subj "/CN=bench CA" \
    -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign -keyout "$work/ca.key" -out "$work/ca.crt" 2>/dev/null
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=127.0.0.1 \
    -keyout "$work/tls.key" -out "$work/tls.csr" 2>/dev/null
  printf 'subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n' >"$work/tls.ext"
  openssl x509 -req -in "$work/tls.csr" -CA "$work/ca.crt" -CAkey "$work/ca.key" -set_serial 1 -days 2 \
    -extfile "$work/tls.ext" -out "$work/tls.crt" 2>/dev/null
  export BERTH_TLS_CERTIFICATE="$work/tls.crt" BERTH_TLS_KEY="$work/tls.key"
  dist_tls="  tls:
    certificate: $work/tls.crt
    key: $work/tls.key"
  curl_ca=(--cacert "$work/ca.crt") bench_ca=(--ca "$work/ca.crt")
  echo "TLS: both registries serve HTTPS (ECDSA P-256 certificate)"
fi

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
$dist_storage
  delete:
    enabled: true
http:
  addr: 127.0.0.1:$DIST_PORT
$dist_tls
YML
# AWS_CA_BUNDLE (set on some machines) makes Distribution's S3 client refuse to start.
env -u AWS_CA_BUNDLE docker-registry serve "$work/dist.yml" >"$work/dist.out" 2>&1 &
pids+=($!); dist_pid=$!

for url in "$scheme://127.0.0.1:$BERTH_PORT/v2/" "$scheme://127.0.0.1:$DIST_PORT/v2/"; do
  for _ in $(seq 100); do curl -s "${curl_ca[@]}" -o /dev/null "$url" && break; sleep 0.1; done
done

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "single-core SHA-256 (openssl speed -evp sha256, 16 KiB blocks):"
openssl speed -evp sha256 -seconds 2 2>/dev/null | awk '/^sha256/ {print "  " $NF " (kB/s)"}'

python3 tests/bench/bench.py \
  --work "$work" "${bench_ca[@]}" \
  --target "berth=$scheme://127.0.0.1:$BERTH_PORT,$berth_pid" \
  --credentials "berth=admin:bench-admin-password" \
  --target "distribution=$scheme://127.0.0.1:$DIST_PORT,$dist_pid"
