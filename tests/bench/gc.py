#!/usr/bin/env python3
"""What garbage collection costs (run through tests/bench/gc.sh).

1. Collecting N unreferenced blobs, on the server that collects only when
   asked: push N small blobs into repositories, delete the repositories, wait
   out the grace period, time `POST /api/v1/gc` passes until nothing is left,
   and note the server's RSS.
2. Pushes while the collector runs continuously versus idle: 50 concurrent
   5-layer pushes on a server collecting every second (with garbage to collect)
   and on one that never collects, alternating; then pulls of those images (8
   clients) and manifest GET p99; medians and ratios.
"""
import argparse
import concurrent.futures as cf
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import bench  # noqa: E402
from quota import round_  # noqa: E402  (the same 50-push round)

ADMIN = "admin:bench-admin-password"


def target(addr, name, pid):
    return bench.Target(f"{name}=http://{addr},{pid}", ADMIN)


def call(t, method, path, body=None):
    c = t.conn()
    data = json.dumps(body).encode() if body is not None else None
    s, _, d = bench.req(c, method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
    assert s in (200, 201, 204), (method, path, s, d)
    return json.loads(d) if d else None


def fill(t, n, prefix):
    """n distinct small blobs in repositories of 1,000 each."""
    def push(i):
        c = t.conn()
        bench.push_bytes(c, f"{prefix}/r{i // 1000:04d}", b"gc-%d-%s" % (i, prefix.encode()))
    with cf.ThreadPoolExecutor(8) as ex:
        list(ex.map(push, range(n)))
    return (n + 999) // 1000


def reads(t, ns):
    """Right after a push round into `ns`: every image pulled whole by 8 clients
    (MB/s), then 1,000 manifest GETs one after another (p99, ms)."""
    def pull(i):
        c = t.conn()
        s, _, body = bench.req(c, "GET", f"/v2/{ns}/img{i}/manifests/v1", headers={"Accept": bench.OCI_MANIFEST})
        assert s == 200, s
        m = json.loads(body)
        n = len(body)
        for d in [m["config"]] + m["layers"]:
            s, _, b = bench.req(c, "GET", f"/v2/{ns}/img{i}/blobs/{d['digest']}")
            assert s == 200 and len(b) == d["size"], (s, len(b))
            n += len(b)
        return n
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(8) as ex:
        total = sum(ex.map(pull, range(bench.N_PUSHERS)))
    mbps = total / (time.perf_counter() - t0) / 1e6
    c = t.conn()
    lat = []
    for k in range(1000):
        t1 = time.perf_counter()
        s, _, _ = bench.req(c, "GET", f"/v2/{ns}/img{k % bench.N_PUSHERS}/manifests/v1", headers={"Accept": bench.OCI_MANIFEST})
        lat.append((time.perf_counter() - t1) * 1000)
        assert s == 200, s
    lat.sort()
    return mbps, lat[989]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--blobs", type=int, default=100_000)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--collecting", required=True)   # addr,pid: collects every second
    ap.add_argument("--idle", required=True)          # addr,pid: never collects
    a = ap.parse_args()
    (ca, cp), (ia, ip) = a.collecting.split(","), a.idle.split(",")
    col, idle = target(ca, "collecting", int(cp)), target(ia, "idle", int(ip))

    t0 = time.perf_counter()
    repos = fill(idle, a.blobs, "gc")
    print(f"pushed {a.blobs} blobs into {repos} repositories in {time.perf_counter() - t0:.1f} s", flush=True)
    rss_before = idle.rss("VmRSS")
    for r in range(repos):
        call(idle, "DELETE", f"/api/v1/repositories/gc/r{r:04d}")
    time.sleep(2.5)  # the grace period (1 s) for links and for bytes
    t0 = time.perf_counter()
    passes, deleted, reclaimed = 0, 0, 0
    while True:
        rep = call(idle, "POST", "/api/v1/gc", {"dry_run": False})
        passes += 1
        deleted += rep["blobs_deleted"]
        reclaimed += rep["bytes_reclaimed"]
        if rep["blobs_deleted"] == 0 and rep["links_removed"] == 0:
            break
    took = time.perf_counter() - t0
    print(f"collected {deleted} blobs ({reclaimed} bytes) in {took:.1f} s over {passes} passes "
          f"({deleted / took:.0f} blobs/s); RSS {rss_before:.0f} MiB before, {idle.rss('VmRSS'):.0f} after, peak {idle.rss('VmHWM'):.0f} MiB", flush=True)

    # Pushes with the collector running every second (and garbage for it) vs idle.
    on, off, ron, roff = [], [], [], []
    for r in range(a.rounds):
        fill(col, 2000, f"junk{r}")
        for k in range(2):
            call(col, "DELETE", f"/api/v1/repositories/junk{r}/r{k:04d}")
        on.append(round_(col, f"p{r}"))
        off.append(round_(idle, f"p{r}"))
        ron.append(reads(col, f"p{r}"))
        roff.append(reads(idle, f"p{r}"))
        print(f"round {r + 1}: pushes collecting {on[-1]:.2f} s, idle {off[-1]:.2f} s; pulls {ron[-1][0]:.0f} vs {roff[-1][0]:.0f} MB/s; "
              f"manifest GET p99 {ron[-1][1]:.2f} vs {roff[-1][1]:.2f} ms", flush=True)
    mon, moff = statistics.median(on), statistics.median(off)
    print(f"50 concurrent 5-layer pushes, median: collecting {mon:.2f} s, idle {moff:.2f} s, ratio {mon / moff:.3f} (lower is better)")
    pon, poff = statistics.median(x[0] for x in ron), statistics.median(x[0] for x in roff)
    gon, goff = statistics.median(x[1] for x in ron), statistics.median(x[1] for x in roff)
    print(f"pulls (8 clients, every image whole), median: collecting {pon:.0f} MB/s, idle {poff:.0f} MB/s, ratio {pon / poff:.3f} (higher is better)")
    print(f"manifest GET p99, median: collecting {gon:.2f} ms, idle {goff:.2f} ms, ratio {gon / goff:.3f} (lower is better)")
    st = call(col, "GET", "/api/v1/gc")
    print(f"collector totals: {st['passes']} passes, {st['links_removed']} links, {st['blobs_deleted']} blobs, {st['bytes_reclaimed']} bytes")


if __name__ == "__main__":
    sys.exit(main())
