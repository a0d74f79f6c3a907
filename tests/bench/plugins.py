#!/usr/bin/env python3
"""Manifest PUT latency with no gate, an allow-all gate and the scanner (run through plugins.sh)."""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402

ADMIN = "admin:bench-admin-password"
SETTINGS = {
    "none": None,
    "allow-all": {"module": "allow", "scope": "platform", "hooks": ["gate"], "config": {"mode": "allow"}},
    "scanner": {"module": "scanner", "scope": "platform", "hooks": ["gate"], "config": {"required_annotations": "org.opencontainers.image.source"}},
}


def call(t, method, path, body=None):
    c = t.conn()
    data = json.dumps(body).encode() if body is not None else None
    s, _, d = bench.req(c, method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    assert s in (200, 204, 404), (method, path, s, d)


def use(t, setting):
    call(t, "DELETE", "/api/v1/plugins/instances/bench-gate")
    if SETTINGS[setting]:
        call(t, "PUT", "/api/v1/plugins/instances/bench-gate", SETTINGS[setting])


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--target", required=True)
    ap.add_argument("--puts", type=int, default=500)
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    t = bench.Target(a.target, ADMIN)
    c = t.conn()
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": ["PATH=/bin"], "User": "app"}}).encode()
    cd = bench.push_bytes(c, "bench/app", config)
    layer = os.urandom(4096)
    ld = bench.push_bytes(c, "bench/app", layer)
    lat = {s: [] for s in SETTINGS}
    n = 0
    for rnd in range(a.rounds):
        for setting in SETTINGS:
            use(t, setting)
            c = t.conn()
            for _ in range(a.puts):
                n += 1
                m = json.loads(bench.image_manifest(cd, len(config), [(ld, len(layer))]))
                m["annotations"] = {"n": str(n)}
                body = json.dumps(m).encode()
                t0 = time.perf_counter()
                bench.put_manifest(c, "bench/app", f"t{n}", body)
                lat[setting].append((time.perf_counter() - t0) * 1000)
    base50, base99 = pct(lat["none"], 0.5), pct(lat["none"], 0.99)
    print(f"manifest PUT latency, {a.rounds} rounds x {a.puts} per setting (ms):")
    for s, xs in lat.items():
        p50, p99 = pct(xs, 0.5), pct(xs, 0.99)
        print(f"  {s:10s} p50 {p50:6.2f}  p99 {p99:6.2f}  mean {statistics.mean(xs):6.2f}  (adds p50 {p50 - base50:+.2f}, p99 {p99 - base99:+.2f})")


if __name__ == "__main__":
    sys.exit(main())
