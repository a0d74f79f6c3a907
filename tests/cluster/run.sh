#!/usr/bin/env bash
# The cluster test: three Berth replicas in network namespaces behind HAProxy,
# over one SurrealDB server and one Garage store (see cluster.py for what it
# checks). Installs and builds what it needs, cached outside the clone:
#
#   tests/cluster/run.sh            # the full form
#   tests/cluster/run.sh --short    # fewer pushes (what .ci/run runs)
#
# Needs root (network namespaces, iptables inside them). BERTH_TEST_SURREAL and
# BERTH_TEST_GARAGE, when set, name binaries already built (.ci/run sets them).
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"

need=()
command -v skopeo >/dev/null || need+=(skopeo)
command -v haproxy >/dev/null || need+=(haproxy)
command -v iptables >/dev/null || need+=(iptables)
command -v ip >/dev/null || need+=(iproute2)
if [ ${#need[@]} -gt 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# Both unoptimized, as .ci/run builds them: the checks are of correctness.
surreal="${BERTH_TEST_SURREAL:-$HOME/.cache/berth/surreal-debug/bin/surreal}"
if [ ! -x "$surreal" ]; then
  CARGO_TARGET_DIR="$HOME/.cache/berth/surreal-debug-target" CARGO_PROFILE_DEV_DEBUG=0 cargo install --locked --debug \
    --path tools/surreal-server --root "$HOME/.cache/berth/surreal-debug"
  surreal="$HOME/.cache/berth/surreal-debug/bin/surreal"
fi
garage="${BERTH_TEST_GARAGE:-$HOME/.cache/berth/garage-debug/bin/garage}"
if [ ! -x "$garage" ]; then
  CARGO_TARGET_DIR="$HOME/.cache/berth/garage-target" CARGO_PROFILE_DEV_DEBUG=0 cargo install --locked --debug \
    garage --version 2.5.0 --no-default-features --features bundled-libs,sqlite --root "$HOME/.cache/berth/garage-debug"
  garage="$HOME/.cache/berth/garage-debug/bin/garage"
fi

cargo build -p berth -p berth-testkit --bins
exec python3 tests/cluster/cluster.py --berth "$CARGO_TARGET_DIR/debug/berth" --surreal "$surreal" \
  --garage "$garage" --garage-up "$CARGO_TARGET_DIR/debug/garage-up" "$@"
