#!/usr/bin/env bash
# Property-based fuzzing of the management API from its own OpenAPI document
# (schemathesis): a fresh `berth serve`, a tenant, then generated requests to
# every operation as the platform admin; any 5xx fails, and so does an ERROR or
# a panic in the server's log.
#
#   tests/fuzz/api_schemathesis.sh BERTH_BINARY VENV [SEED] [MAX_EXAMPLES]
set -euo pipefail
berth=$1; venv=$2; seed=${3:-1}; examples=${4:-40}
# Only what this script sets reaches the server (it refuses unknown BERTH_* variables).
for v in $(compgen -e | grep '^BERTH_' || true); do unset "$v"; done
work=$(mktemp -d /tmp/berth-st.XXXXXX)
port=$((20000 + RANDOM % 20000))
pid=
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT
BERTH_ADMIN_PASSWORD=schemathesis-admin BERTH_LOG=warn BERTH_POLICY_DIR="$(dirname "$0")/../../policies" \
  "$berth" serve --listen "127.0.0.1:$port" --data-dir "$work/data" >"$work/out" 2>"$work/err" &
pid=$!
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$port/v2/" && break; sleep 0.1; done
kill -0 "$pid" 2>/dev/null || { echo "berth did not start:"; cat "$work/err"; exit 1; }
curl -sf -u admin:schemathesis-admin -X POST -H 'Content-Type: application/json' -d '{"name":"acme"}' \
  "http://127.0.0.1:$port/api/v1/tenants" >/dev/null
# From the scratch folder: schemathesis keeps a cache in its working directory.
(cd "$work" && "$venv/bin/st" run "http://127.0.0.1:$port/api/v1/openapi.json" --origin "http://127.0.0.1:$port" \
  -a admin:schemathesis-admin -c not_a_server_error --max-examples "$examples" -w 2 --seed "$seed" --no-color 2>&1 | tail -5)
if grep -E "ERROR|panicked" "$work/err"; then
  echo "server logged errors"; exit 1
fi
