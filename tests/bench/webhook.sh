#!/usr/bin/env bash
# What a webhook subscribed to pulls costs the manifest GET path: one release
# Berth, one small image, wrk against its manifest in alternating rounds with
# no plugin instance and with the webhook plugin taking `manifest-pulled` and
# POSTing to a local receiver (keep-alive, answers 204), each measured after a
# warm-up burst (subscribing fills the queue once). Medians, the ratio, and what
# the webhook delivered meanwhile (and what overflowed its queue).
#
#   tests/bench/webhook.sh        # ROUNDS=5 WRK_SECS=10 CONNS=64
#   SETTLE=15 tests/bench/webhook.sh
#     seconds idle after each warm-up burst (default 2): subscribing admits a
#     queue's worth of pull events at once, and writing them takes seconds of
#     one core (about 1 ms per outbox row on the embedded store)
#   RECEIVER=stall tests/bench/webhook.sh
#     the receiver takes each POST and never answers: the queue stays full and
#     the worker waits, so what is left is the cost of announcing pulls alone.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/berth/target}"
command -v wrk >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null; }
cargo build --release -p berth
cargo build --release --target wasm32-wasip2 --manifest-path plugins/Cargo.toml \
  --target-dir "$CARGO_TARGET_DIR/wasm-plugins"
BERTH="$CARGO_TARGET_DIR/release/berth"
WASM="$CARGO_TARGET_DIR/wasm-plugins/wasm32-wasip2/release"
ROUNDS=${ROUNDS:-5}; WRK_SECS=${WRK_SECS:-10}; CONNS=${CONNS:-64}
PORT=5181; RX=5182

work=$(mktemp -d "${BENCH_DIR:-/tmp}/berth-webhook.XXXXXX")
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

# The receiver: HTTP/1.1 keep-alive, counts what it is sent.
cat >"$work/rx.py" <<'EOF'
import http.server, sys, threading, time
stall = len(sys.argv) > 2 and sys.argv[2] == "stall"
n = 0
lock = threading.Lock()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_POST(self):
        global n
        self.rfile.read(int(self.headers.get("content-length", 0)))
        with lock:
            n += 1
        if stall:
            time.sleep(3600)
        self.send_response(204)
        self.end_headers()
    def do_GET(self):
        body = str(n).encode()
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *a):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
EOF
# It stands in for a service on another machine: scheduled SCHED_IDLE, it takes
# only CPU the registry leaves (its own cost is not the registry's).
chrt --idle 0 python3 "$work/rx.py" "$RX" "${RECEIVER:-answer}" & pids+=($!)

printf '[registry]\ncounter_flush_secs = 1\n' >"$work/berth.toml"
BERTH_ADMIN_PASSWORD=bench-admin-password BERTH_LOG=warn "$BERTH" serve --config "$work/berth.toml" \
  --listen "127.0.0.1:$PORT" --data-dir "$work/data" >"$work/out" 2>"$work/err" &
pids+=($!)
for _ in $(seq 100); do curl -s -o /dev/null "http://127.0.0.1:$PORT/v2/" && break; sleep 0.1; done
auth="Authorization: Basic $(printf 'admin:bench-admin-password' | base64)"
cfg='{"architecture":"amd64","os":"linux"}'
cd="sha256:$(printf '%s' "$cfg" | sha256sum | cut -d' ' -f1)"
curl -sf -H "$auth" -X POST --data-binary "$cfg" -H 'Content-Type: application/octet-stream' \
  "http://127.0.0.1:$PORT/v2/bench/app/blobs/uploads/?digest=$cd" >/dev/null
m="{\"schemaVersion\":2,\"mediaType\":\"application/vnd.oci.image.manifest.v1+json\",\"config\":{\"mediaType\":\"application/vnd.oci.image.config.v1+json\",\"digest\":\"$cd\",\"size\":${#cfg}},\"layers\":[]}"
curl -sf -H "$auth" -X PUT --data-binary "$m" -H 'Content-Type: application/vnd.oci.image.manifest.v1+json' \
  "http://127.0.0.1:$PORT/v2/bench/app/manifests/latest" >/dev/null

export BERTH_SERVER="http://127.0.0.1:$PORT" BERTH_USER=admin BERTH_PASSWORD=bench-admin-password BERTH_CREDENTIALS="$work/none.json"
"$BERTH" plugin install plugins/webhook --component "$WASM/berth_webhook.wasm" >/dev/null
api="http://127.0.0.1:$PORT/api/v1/plugins/instances/bench-hook"
subscribe() {
  curl -sf -H "$auth" -X PUT -H 'Content-Type: application/json' "$api" \
    -d "{\"module\":\"webhook\",\"scope\":\"platform\",\"hooks\":[\"manifest-pulled\"],\"config\":{\"url\":\"http://127.0.0.1:$RX/hook\",\"secret\":\"s\"},\"allow_hosts\":[\"127.0.0.1\"]}" >/dev/null
}
unsubscribe() { curl -s -o /dev/null -H "$auth" -X DELETE "$api"; }
rps() { wrk -t2 -c"$CONNS" -d"${WRK_SECS}s" -H "$auth" "http://127.0.0.1:$PORT/v2/bench/app/manifests/latest" | awk '/Requests\/sec/ {print $2}'; }
# Steady state: a backlog fills the queue (10,000 outbox rows written at once)
# within a second of subscribing; a warm-up burst pays that before measuring.
warm() { wrk -t2 -c"$CONNS" -d3s -H "$auth" "http://127.0.0.1:$PORT/v2/bench/app/manifests/latest" >/dev/null; sleep "${SETTLE:-2}"; }
queue() {
  curl -s -H "$auth" "$api" | python3 -c '
import json, sys
q = json.load(sys.stdin)["queue"]
print("delivered %(delivered)s, queued %(depth)s, overflow %(overflow)s, lag %(lag_ms)s ms" % q)'
}

none=(); hooked=()
for r in $(seq "$ROUNDS"); do
  unsubscribe; warm
  a=$(rps)
  subscribe; warm
  b=$(rps)
  sleep 1.5  # the last batch of pull events is written
  echo "round $r: no plugin $a req/s, webhook on pulls $b req/s; webhook: $(queue)"
  none+=("$a"); hooked+=("$b")
done
median() { printf '%s\n' "$@" | sort -n | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
mn=$(median "${none[@]}"); mh=$(median "${hooked[@]}")
echo "median: no plugin $mn req/s, webhook on pulls $mh req/s, ratio $(awk -v a="$mh" -v b="$mn" 'BEGIN {printf "%.3f", a/b}')"
echo "the receiver got $(curl -s "http://127.0.0.1:$RX/") POSTs in all"
