#!/usr/bin/env python3
"""Pushes with and without quota enforcement (run through tests/bench/quota.sh).

On the `--quota` server, tenant `bench` owns namespaces q0…qN and has a storage
limit of 1 TiB; on the `--free` server nobody owns them. Each round pushes 50
images of 5 × 1 MiB fresh layers concurrently into fresh repositories of one
namespace, alternating between the servers.
"""
import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402

ADMIN = "admin:bench-admin-password"


def target(addr, name):
    return bench.Target(f"{name}=http://{addr},0", ADMIN)


def call(t, method, path, body):
    c = t.conn()
    s, _, d = bench.req(c, method, path, body=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    assert s in (200, 201), (method, path, s, d)


def round_(t, ns):
    images = [(i, [os.urandom(bench.LAYER_SIZE) for _ in range(bench.LAYERS)]) for i in range(bench.N_PUSHERS)]

    def push(item):
        i, layers = item
        c = t.conn()
        repo = f"{ns}/img{i}"
        descs = [(bench.push_bytes(c, repo, l), len(l)) for l in layers]
        config = json.dumps({"architecture": "amd64", "os": "linux", "i": i}).encode()
        cd = bench.push_bytes(c, repo, config)
        bench.put_manifest(c, repo, "v1", bench.image_manifest(cd, len(config), descs))

    t0 = time.perf_counter()
    bench.parallel(bench.N_PUSHERS, images, push)
    return time.perf_counter() - t0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--quota", required=True)
    ap.add_argument("--free", required=True)
    a = ap.parse_args()
    q, f = target(a.quota, "quota"), target(a.free, "free")
    call(q, "POST", "/api/v1/tenants", {"name": "bench"})
    call(q, "PUT", "/api/v1/tenants/bench/quota", {"storage_bytes": 1 << 40, "namespaces": 1000})
    for r in range(a.rounds):
        call(q, "POST", "/api/v1/tenants/bench/namespaces", {"name": f"q{r}"})
    on, off = [], []
    for r in range(a.rounds):
        on.append(round_(q, f"q{r}"))
        off.append(round_(f, f"q{r}"))
        print(f"round {r + 1}: with quota {on[-1]:.2f} s, without {off[-1]:.2f} s", flush=True)
    mon, moff = statistics.median(on), statistics.median(off)
    print(f"median: with quota {mon:.2f} s, without {moff:.2f} s, ratio {mon / moff:.3f} (lower is better)")
    # The usage the quota counted: 50 × (5 MiB + config + manifest) per round.
    c = q.conn()
    s, _, d = bench.req(c, "GET", "/api/v1/tenants/bench/quota")
    used = next(i["used"] for i in json.loads(d)["quotas"] if i["resource"] == "storage_bytes")
    print(f"storage counted for tenant bench: {used} bytes ({used / (1 << 20):.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
