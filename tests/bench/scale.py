#!/usr/bin/env python3
"""Memory and start-up against what is stored (tests/bench/scale.sh).

Fills one Berth (embedded defaults) with TAGS tags over REPOS repositories,
each tag its own manifest (so TAGS manifests), through the OCI API; then
measures what the issue's targets name:
- resident memory after the fill, after a restart, and after cold reads;
- start-up: from exec to the first answer, and to `/readyz` 200;
- manifest GET by tag on tags spread over every repository (cold: their
  repositories' states mostly not held), alone and beside 8 pushing clients,
  and on a small hot set, with wrk;
- tags list of one repository and a catalog walk.

    scale.py --berth BIN --work DIR [--repos N] [--tags N]
"""

import argparse
import asyncio
import base64
import hashlib
import itertools
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
USER, PASSWORD = "admin", "bench-admin-password"
AUTH = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()


def status_kib(pid, fields):
    """Memory fields of /proc/PID/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return {l.split(":")[0]: int(l.split()[1]) for l in f if l.split(":")[0] in fields}


def rss_mib(pid, field="VmRSS"):
    return status_kib(pid, (field,)).get(field, float("nan") * 1024) / 1024


class Sampler:
    """Resident memory sampled every 50 ms, the highest kept per phase, split
    into anonymous memory (heap, caches) and file-backed pages (the binary's
    code), so a peak can be put on what the server was doing."""

    def __init__(self, pid):
        self.pid, self.phase, self.peaks = pid, "start", {}
        self.stop = threading.Event()
        threading.Thread(target=self.run, daemon=True).start()

    def run(self):
        while not self.stop.is_set():
            try:
                v = status_kib(self.pid, ("VmRSS", "RssAnon", "RssFile"))
            except (OSError, ValueError, IndexError):
                return
            best = self.peaks.get(self.phase)
            if best is None or v["VmRSS"] > best["VmRSS"]:
                self.peaks[self.phase] = v
            time.sleep(0.05)

    def report(self):
        self.stop.set()
        return {f"peak RSS in {k}: all / anon / file (MiB)": f"{v['VmRSS'] // 1024} / {v['RssAnon'] // 1024} / {v['RssFile'] // 1024}"
                for k, v in self.peaks.items()}


def call(base, method, path, body=None, headers=None):
    h = {"Authorization": AUTH}
    h.update(headers or {})
    r = urllib.request.Request(base + path, data=body, method=method, headers=h)
    try:
        with urllib.request.urlopen(r, timeout=60) as resp:
            return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def push_blob(base, repo, data):
    d = "sha256:" + hashlib.sha256(data).hexdigest()
    s, _, b = call(base, "POST", f"/v2/{repo}/blobs/uploads/?digest={d}", data, {"Content-Type": "application/octet-stream"})
    assert s == 201, (s, b)
    return d


class Server:
    started = []

    def __init__(self, berth, work, port, config=None):
        self.berth, self.work, self.port, self.config = berth, work, port, config
        self.base = f"http://127.0.0.1:{port}"
        self.proc = None

    def start(self):
        """Start; answers (seconds to the first answer, seconds to ready)."""
        env = dict(os.environ, BERTH_ADMIN_PASSWORD=PASSWORD, BERTH_LOG=os.environ.get("BERTH_LOG", "warn"))
        env = {k: v for k, v in env.items() if not (k.startswith("BERTH_") and k not in ("BERTH_ADMIN_PASSWORD", "BERTH_LOG"))}
        err = open(os.path.join(self.work, "berth.err"), "a")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(
            [self.berth, "serve", "--listen", f"127.0.0.1:{self.port}", "--data-dir", os.path.join(self.work, "data")]
            + (["--config", self.config] if self.config else []),
            env=env, stdout=subprocess.DEVNULL, stderr=err)
        Server.started.append(self.proc)
        first = None
        while True:
            assert self.proc.poll() is None, "berth exited; see berth.err"
            try:
                with urllib.request.urlopen(self.base + "/readyz", timeout=5) as r:
                    if first is None:
                        first = time.perf_counter() - t0
                    if r.status == 200:
                        return first, time.perf_counter() - t0
            except urllib.error.HTTPError:
                if first is None:
                    first = time.perf_counter() - t0
            except (urllib.error.URLError, ConnectionError):
                pass
            time.sleep(0.01)

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=120)

    def rss(self, field="VmRSS"):
        return rss_mib(self.proc.pid, field)

    def metric(self, name):
        _, _, b = call(self.base, "GET", "/metrics")
        m = re.search(rf"^{name}(?:\{{[^}}]*\}})? (\S+)$", b.decode(), re.M)
        return float(m.group(1)) if m else float("nan")


def wrk(work, name, base, lua, conns, secs, threads=2):
    path = os.path.join(work, name + ".lua")
    with open(path, "w") as f:
        f.write(lua)
    out = subprocess.run(["wrk", f"-t{threads}", f"-c{conns}", f"-d{secs}", "--latency", "-s", path, base + "/"],
                         capture_output=True, text=True, check=True).stdout
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert not bad, out
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    reqs = int(re.search(r"(\d+) requests in", out).group(1))

    def pct(p):
        m = re.search(rf"\s{p}%\s+([\d.]+)(us|ms|s)\b", out)
        return float(m.group(1)) * {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
    return {"req/s": rps, "requests": reqs, "p50 ms": pct(50), "p99 ms": pct(99)}


async def _drive(host, port, items, conns):
    """Send every request `items` yields over `conns` keep-alive connections,
    each waiting for its answer (201/202) before the next."""
    it = iter(items)

    async def worker():
        reader, writer = await asyncio.open_connection(host, port)
        for method, path, body, ctype in it:
            head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: {AUTH}\r\nContent-Length: {len(body)}\r\n"
            if ctype:
                head += f"Content-Type: {ctype}\r\n"
            writer.write(head.encode() + b"\r\n" + body)
            status = int((await reader.readline()).split()[1])
            length = 0
            while (line := await reader.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            answer = await reader.readexactly(length)
            assert status in (201, 202), (method, path, status, answer[:300])
        writer.close()
    await asyncio.gather(*(worker() for _ in range(conns)))


def drive(base, items, count, conns=32):
    """Send `count` requests (see `_drive`); requests per second."""
    host, port = base.removeprefix("http://").split(":")
    t0 = time.perf_counter()
    asyncio.run(_drive(host, int(port), items, conns))
    return count / (time.perf_counter() - t0)


def repo(i):
    return f"fill/r{i:06d}"


def seed_blobs():
    """The config and layer every filled manifest refers to."""
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []}}).encode()
    return config, hashlib.sha512(b"scale").digest() * 1024


def manifest_head():
    """A filled manifest's JSON without its closing brace (an annotation follows)."""
    config, layer = seed_blobs()
    digest = lambda b: "sha256:" + hashlib.sha256(b).hexdigest()
    return json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                       "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": digest(config), "size": len(config)},
                       "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": digest(layer), "size": len(layer)}]},
                      separators=(",", ":"))[:-1]


def fill(srv, work, repos, tags):
    base = srv.base
    config, layer = seed_blobs()
    cd, ld = push_blob(base, "fill/seed", config), push_blob(base, "fill/seed", layer)
    figures = {}
    # Each repository mounts the two blobs from the seed (two links each).
    mounts = (("POST", f"/v2/{repo(i // 2)}/blobs/uploads/?mount={cd if i % 2 == 0 else ld}&from=fill/seed", b"", None)
              for i in range(2 * repos))
    t0 = time.perf_counter()
    figures["fill: blob mounts (req/s)"] = round(drive(base, mounts, 2 * repos))
    # Tag t of repository r points at its own manifest (an annotation makes each
    # distinct). A repository's tags are pushed together, as a pipeline pushes a
    # release's tags: the clients' requests interleave over a few repositories.
    head = manifest_head()
    per_repo = tags // repos
    puts = (("PUT", f"/v2/{repo(i // per_repo)}/manifests/t{i % per_repo:04d}", f'{head},"annotations":{{"n":"{i}"}}}}'.encode(), OCI_MANIFEST)
            for i in range(tags))
    figures["fill: manifest PUT (req/s)"] = round(drive(base, puts, tags))
    figures["fill: whole (s)"] = round(time.perf_counter() - t0, 1)
    return figures


def beside_writes(srv, work, repos, per_repo, secs):
    """Cold manifest GETs (4 clients) while 8 clients PUT manifests, moving
    existing tags; the PUT rate, and the pull-count flushes that failed."""
    head = manifest_head()
    stamp, done = time.time_ns(), [0]
    stop = time.monotonic() + secs + 3

    def puts():
        for i in itertools.count():
            if time.monotonic() > stop:
                return
            done[0] += 1
            body = f'{head},"annotations":{{"w":"{stamp}-{i}"}}}}'.encode()
            yield "PUT", f"/v2/{repo(i % repos)}/manifests/t{(i // repos) % per_repo:04d}", body, OCI_MANIFEST

    log = os.path.join(work, "berth.err")
    failed_before = open(log, errors="replace").read().count("writing pull counters failed")
    rate = [0.0]

    def write():
        t0 = time.perf_counter()
        drive(srv.base, puts(), 0, conns=8)
        rate[0] = done[0] / (time.perf_counter() - t0)
    writer = threading.Thread(target=write)
    writer.start()
    time.sleep(1)
    cold = wrk(work, "beside", srv.base, get_lua(repos, per_repo, repos), 4, f"{secs}s", threads=2)
    writer.join()
    # Counts of the reads are written within a flush interval (5 s).
    time.sleep(6)
    failed = open(log, errors="replace").read().count("writing pull counters failed") - failed_before
    return {
        "manifest GET, any repository, 4 conns, beside 8 pushing (req/s)": round(cold["req/s"]),
        "the same: p50 / p99 (ms)": f"{cold['p50 ms']:.2f} / {cold['p99 ms']:.2f}",
        "manifest PUT beside it, 8 conns (req/s)": round(rate[0]),
        "pull-count flushes that failed": failed,
    }


def get_lua(repos, per_repo, spread):
    """Manifest GETs by tag, repositories chosen at random among `spread`."""
    return f"""
local n = 0
function setup(thread)
  thread:set("id", n)
  n = n + 1
end
function init(args)
  math.randomseed(os.time() * 16 + id)
end
local h = {{ ["Authorization"] = "{AUTH}", ["Accept"] = "{OCI_MANIFEST}" }}
request = function()
  local r = math.random(0, {spread} - 1)
  local t = math.random(0, {per_repo} - 1)
  return wrk.format("GET", string.format("/v2/fill/r%06d/manifests/t%04d", r, t), h)
end
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--berth", required=True)
    ap.add_argument("--work", required=True)
    ap.add_argument("--port", type=int, default=5141)
    ap.add_argument("--repos", type=int, default=100_000)
    ap.add_argument("--tags", type=int, default=1_000_000)
    ap.add_argument("--secs", type=int, default=20)
    ap.add_argument("--filled", action="store_true", help="WORK holds a filled registry already: measure only")
    ap.add_argument("--fill-only", action="store_true", help="fill WORK and stop (measure later with --filled)")
    ap.add_argument("--config", help="a Berth configuration file")
    a = ap.parse_args()
    assert a.tags % a.repos == 0, "tags must be a multiple of repos"
    per_repo = a.tags // a.repos
    r = {"repositories": a.repos, "tags (each its own manifest)": a.tags}
    srv = Server(a.berth, a.work, a.port, a.config)
    if not a.filled:
        first, ready = srv.start()
        r["start, empty: first answer / ready (s)"] = f"{first:.2f} / {ready:.2f}"
        r.update(fill(srv, a.work, a.repos, a.tags))
        time.sleep(5)
        r["RSS after the fill (MiB)"] = round(srv.rss())
        r["peak RSS during the fill (MiB)"] = round(srv.rss("VmHWM"))
        r["states held after the fill"] = int(srv.metric("berth_index_states"))
        srv.stop()
        if a.fill_only:
            print(json.dumps(r, indent=1))
            return

    first, ready = srv.start()
    r["start, filled: first answer / ready (s)"] = f"{first:.2f} / {ready:.2f}"
    r["RSS after the restart (MiB)"] = round(srv.rss())
    sampler = Sampler(srv.proc.pid)
    # Tags of any repository at random: with the default budget most
    # repositories' states are not held (cold), a few clients, then many.
    for conns in (4, 16):
        sampler.phase = f"cold reads, {conns} conns"
        cold = wrk(a.work, "cold", srv.base, get_lua(a.repos, per_repo, a.repos), conns, f"{a.secs}s", threads=min(2, conns))
        r[f"manifest GET, any repository, {conns} conns (req/s)"] = round(cold["req/s"])
        r[f"manifest GET, any repository, {conns} conns: p50 / p99 (ms)"] = f"{cold['p50 ms']:.2f} / {cold['p99 ms']:.2f}"
    # The same cold reads while 8 clients push: each PUT moves an existing tag
    # to a manifest of its own (tags stay as filled), spread over every
    # repository, as CI pipelines pushing across a registry do.
    sampler.phase = "cold reads beside writes"
    r.update(beside_writes(srv, a.work, a.repos, per_repo, a.secs))
    r["states held after it"] = int(srv.metric("berth_index_states"))
    hot_set = min(100, a.repos)
    sampler.phase = "hot reads"
    wrk(a.work, "warm", srv.base, get_lua(a.repos, per_repo, hot_set), 64, "3s")
    hot = wrk(a.work, "hot", srv.base, get_lua(a.repos, per_repo, hot_set), 64, f"{a.secs}s")
    r[f"manifest GET, {hot_set} hot repositories, 64 conns (req/s)"] = round(hot["req/s"])
    r[f"manifest GET, {hot_set} hot repositories: p50 / p99 (ms)"] = f"{hot['p50 ms']:.2f} / {hot['p99 ms']:.2f}"
    # The same machine's figure for one manifest, as the reference for the hot set.
    sampler.phase = "one manifest"
    one = wrk(a.work, "one", srv.base, get_lua(1, 1, 1), 64, f"{a.secs}s")
    r["manifest GET, one manifest, 64 conns (req/s)"] = round(one["req/s"])

    sampler.phase = "listings"
    t0 = time.perf_counter()
    s, _, b = call(srv.base, "GET", f"/v2/{repo(a.repos // 2)}/tags/list")
    assert s == 200 and len(json.loads(b)["tags"]) == per_repo, (s, b[:200])
    r["tags list of one repository, read once (ms)"] = round((time.perf_counter() - t0) * 1000, 2)
    t0, path, seen = time.perf_counter(), "/v2/_catalog?n=1000", 0
    while path:
        s, h, b = call(srv.base, "GET", path)
        assert s == 200, (s, b[:200])
        seen += len(json.loads(b)["repositories"])
        link = h.get("link")
        path = link.split(";")[0].strip("<> ").replace(srv.base, "") if link else None
    assert seen == a.repos + 1, seen  # and fill/seed
    r[f"catalog walk, {seen} repositories in pages of 1000 (ms)"] = round((time.perf_counter() - t0) * 1000)
    r["RSS at the end of the reads (MiB)"] = round(srv.rss())
    # Once quiet, Berth hands the allocator's free pages back (main.rs).
    time.sleep(6)
    r["RSS 6 s later (MiB)"] = round(srv.rss())
    r["peak RSS since the restart (MiB)"] = round(srv.rss("VmHWM"))
    r.update(sampler.report())
    srv.stop()
    width = max(len(k) for k in r)
    for k, v in r.items():
        print(f"{k:<{width}}  {v}")
    with open(os.path.join(a.work, "scale.json"), "w") as f:
        json.dump(r, f, indent=1)


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        # A failed run leaves no server holding the port and the store.
        for p in Server.started:
            if p.poll() is None:
                p.kill()
