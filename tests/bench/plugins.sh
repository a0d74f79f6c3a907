#!/usr/bin/env bash
# What plugin gates cost a manifest push: one release Berth, the same sequence of
# manifest PUTs (one client, distinct manifests over pushed blobs) with no gate,
# with an allow-all gate (the hostile fixture in its `allow` mode) and with the
# scanner (reading each image's config), in alternating rounds; p50 and p99 per
# setting and what each adds.
#
#   tests/bench/plugins.sh        # PUTS=500 ROUNDS=3
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
cargo build --release -p berth
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml \
  --target-dir "$CARGO_TARGET_DIR/wasm-plugins"
BERTH="$CARGO_TARGET_DIR/release/berth"
WASM="$CARGO_TARGET_DIR/wasm-plugins/wasm32-wasip2/release"

work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-plugins.XXXXXX")
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve --listen 127.0.0.1:5171 \
  --data-dir "$work/data" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:5171/v2/" && break; sleep 0.1; done

export BERTH_SERVER=http://127.0.0.1:5171 BERTH_USER=admin BERTH_PASSWORD=bench-admin-password BERTH_CREDENTIALS="$work/none.json"
"$BERTH" plugin install plugins/scanner --component "$WASM/berth_scanner.wasm"
mkdir -p "$work/allow"
printf 'name = "allow"\nversion = "0.1.0"\nhooks = ["gate"]\n[config.mode]\n' >"$work/allow/plugin.toml"
"$BERTH" plugin install "$work/allow" --component "$WASM/berth_hostile.wasm"
python3 tests/bench/plugins.py --target "b=http://127.0.0.1:5171,$pid" --puts "${PUTS:-500}" --rounds "${ROUNDS:-3}"
