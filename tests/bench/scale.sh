#!/usr/bin/env bash
# Memory and start-up against what is stored: a release Berth with embedded
# defaults, filled through the OCI API with TAGS tags (each its own manifest)
# over REPOS repositories, then restarted and read (tests/bench/scale.py).
#
#   tests/bench/scale.sh                       # 1,000,000 tags, 100,000 repositories
#   SCALE_REPOS=10000 SCALE_TAGS=100000 tests/bench/scale.sh   # a smaller fill
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -p berth
work=$(mktemp -d "${SCALE_WORK:-/tmp}/berth-scale.XXXXXX")
trap 'rm -rf "$work"' EXIT
python3 tests/bench/scale.py --berth "$CARGO_TARGET_DIR/release/berth" --work "$work" \
  --repos "${SCALE_REPOS:-100000}" --tags "${SCALE_TAGS:-1000000}" "$@"
