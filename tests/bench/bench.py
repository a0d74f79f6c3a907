#!/usr/bin/env python3
"""Drive the same workload against several OCI registries and print a comparison.

Run through tests/bench/run.sh, which starts Berth and CNCF Distribution side by
side. Every request loop is bounded; only loopback addresses are used.
"""
import argparse
import base64
import concurrent.futures as cf
import hashlib
import http.client
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.parse

QUICK = os.environ.get("BENCH_QUICK") == "1"
MiB = 1 << 20
BLOB_SIZE = (64 if QUICK else 1024) * MiB
CHUNK = 16 * MiB
N_TAGS = 1000 if QUICK else 10_000
# The catalog's size: the S3 column asks for 100,000 (BENCH_REPOS).
N_REPOS = int(os.environ.get("BENCH_REPOS", "1000" if QUICK else "10000"))
# A catalog walk is repeated up to 10 times, but not past a minute once one
# ran (Distribution on S3 walks the bucket: minutes at 100,000 repositories).
CATALOG_WALKS, CATALOG_SECS = 10, 60
N_PUSHERS = 50
# Single-stream throughput varies run to run on a VM (page cache, host I/O):
# each push and pull figure is the median of REPS runs, each push of a fresh blob.
REPS = int(os.environ.get("BENCH_REPS", "3"))
LAYERS = 5
LAYER_SIZE = 1 * MiB
WRK_SECS = "5s" if QUICK else "10s"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


class AuthConn(http.client.HTTPConnection):
    """A connection that sends the target's Authorization header on every request."""
    authorization = None

    def putrequest(self, method, url, *a, **kw):
        super().putrequest(method, url, *a, **kw)
        if self.authorization:
            self.putheader("Authorization", self.authorization)


class AuthTlsConn(AuthConn, http.client.HTTPSConnection):
    """The same over TLS."""


class Target:
    def __init__(self, spec, credentials=None, ca=None):
        name, rest = spec.split("=", 1)
        url, pid = rest.rsplit(",", 1)
        self.name, self.base, self.pid = name, url, int(pid)
        u = urllib.parse.urlparse(url)
        self.host, self.port = u.hostname, u.port
        # https targets: the certificate checked against the authority `ca`.
        self.tls = None
        if u.scheme == "https":
            import ssl
            self.tls = ssl.create_default_context(cafile=ca)
        self.authorization = None
        if credentials:
            self.authorization = "Basic " + base64.b64encode(credentials.encode()).decode()

    def auth_headers(self):
        return [f"Authorization: {self.authorization}"] if self.authorization else []

    def conn(self):
        if self.tls:
            c = AuthTlsConn(self.host, self.port, timeout=900, blocksize=MiB, context=self.tls)
        else:
            c = AuthConn(self.host, self.port, timeout=900, blocksize=MiB)
        c.authorization = self.authorization
        return c

    def rss(self, field):
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0  # MiB
        return float("nan")


def req(c, method, path, body=None, headers=None):
    c.request(method, path, body=body, headers=headers or {})
    r = c.getresponse()
    data = r.read()
    return r.status, r.headers, data


def path_of(location):
    u = urllib.parse.urlparse(location)
    return u.path + (("?" + u.query) if u.query else "")


def with_digest(loc, digest):
    return loc + ("&" if "?" in loc else "?") + "digest=" + digest


def start_upload(c, repo):
    s, h, d = req(c, "POST", f"/v2/{repo}/blobs/uploads/", headers={"Content-Length": "0"})
    assert s == 202, (s, d)
    return path_of(h["Location"])


def push_bytes(c, repo, data, digest=None):
    """POST a session, then PUT the whole body with its digest (what every client supports)."""
    digest = digest or "sha256:" + hashlib.sha256(data).hexdigest()
    loc = start_upload(c, repo)
    s, _, d = req(c, "PUT", with_digest(loc, digest), body=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    assert s == 201, (s, d)
    return digest


def push_bytes_patched(c, repo, data):
    """The way docker and skopeo push a layer: POST a session, PATCH the whole
    body, then PUT the digest with no body."""
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    loc = start_upload(c, repo)
    s, h, d = req(c, "PATCH", loc, body=data,
                  headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(data))})
    assert s == 202, (s, d)
    s, _, d = req(c, "PUT", with_digest(path_of(h["Location"]), digest), headers={"Content-Length": "0"})
    assert s == 201, (s, d)
    return digest


def push_file_monolithic(t, repo, path, digest):
    c = t.conn()
    t0 = time.perf_counter()
    loc = start_upload(c, repo)
    with open(path, "rb") as f:
        s, _, d = req(c, "PUT", with_digest(loc, digest), body=f,
                      headers={"Content-Type": "application/octet-stream", "Content-Length": str(BLOB_SIZE)})
    assert s == 201, (s, d)
    return time.perf_counter() - t0


def push_file_chunked(t, repo, path, digest):
    c = t.conn()
    t0 = time.perf_counter()
    loc = start_upload(c, repo)
    with open(path, "rb") as f:
        off = 0
        while off < BLOB_SIZE:
            chunk = f.read(CHUNK)
            s, h, d = req(c, "PATCH", loc, body=chunk, headers={
                "Content-Type": "application/octet-stream", "Content-Length": str(len(chunk)),
                "Content-Range": f"{off}-{off + len(chunk) - 1}"})
            assert s == 202, (s, d)
            loc = path_of(h["Location"])
            off += len(chunk)
    s, _, d = req(c, "PUT", with_digest(loc, digest), headers={"Content-Length": "0"})
    assert s == 201, (s, d)
    return time.perf_counter() - t0


def pull_blob(t, repo, digest):
    c = t.conn()
    buf = bytearray(8 * MiB)
    view = memoryview(buf)
    t0 = time.perf_counter()
    c.request("GET", f"/v2/{repo}/blobs/{digest}")
    r = c.getresponse()
    assert r.status == 200, r.status
    total = 0
    while True:
        n = r.readinto(view)
        if not n:
            break
        total += n
    assert total == BLOB_SIZE, total
    return time.perf_counter() - t0


def image_manifest(config_digest, config_len, layers):
    return json.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config_digest, "size": config_len},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n} for d, n in layers],
    }, separators=(",", ":")).encode()


def push_small_image(c, repo, seed):
    config = json.dumps({"architecture": "amd64", "os": "linux", "seed": seed}).encode()
    cd = push_bytes(c, repo, config)
    layer = hashlib.sha256(str(seed).encode()).digest() * 64
    ld = push_bytes(c, repo, layer)
    return image_manifest(cd, len(config), [(ld, len(layer))])


def put_manifest(c, repo, ref, body):
    s, h, d = req(c, "PUT", f"/v2/{repo}/manifests/{ref}", body=body,
                  headers={"Content-Type": OCI_MANIFEST, "Content-Length": str(len(body))})
    assert s == 201, (s, d)


def wrk(url, conns, script=None, headers=()):
    args = ["wrk", "-t2", f"-c{conns}", f"-d{WRK_SECS}", "--latency"]
    for h in headers:
        args += ["-H", h]
    if script:
        args += ["-s", script]
    out = subprocess.run(args + [url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    p99 = re.search(r"99%\s+([\d.]+)(us|ms|s)\b", out)
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[p99.group(2)]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    assert not non2xx, out
    return rps, float(p99.group(1)) * scale


def settle(t, limit=60.0):
    """Let the work earlier phases left behind finish before a timed phase: dirty
    pages written back, and the registry's own background work (a store's
    compactions) over, i.e. under 5 % of a core for a second, at most `limit`
    seconds. Returns the seconds it took."""
    t0 = time.perf_counter()
    os.sync()
    tick = os.sysconf("SC_CLK_TCK")

    def cpu():
        with open(f"/proc/{t.pid}/stat") as f:
            parts = f.read().rsplit(")", 1)[1].split()
        return (int(parts[11]) + int(parts[12])) / tick
    while time.perf_counter() - t0 < limit:
        before = cpu()
        time.sleep(1)
        if cpu() - before < 0.05:
            break
    return round(time.perf_counter() - t0, 1)


def parallel(n_workers, items, fn):
    with cf.ThreadPoolExecutor(n_workers) as ex:
        list(ex.map(fn, items))


def make_blob(path, seed):
    h = hashlib.sha256()
    with open(path, "wb") as f:
        block = hashlib.sha512(seed).digest() * (MiB // 64)
        for i in range(BLOB_SIZE // MiB):
            b = bytes(x ^ (i & 0xFF) for x in block[:64]) + block[64:]
            f.write(b)
            h.update(b)
    return "sha256:" + h.hexdigest()


def bench(t, work, blobs):
    r = {}
    r["idle RSS (MiB)"] = t.rss("VmRSS")
    mono, chunked = blobs[:REPS], blobs[REPS:]
    # Alternate the two modes so neither always runs on a warmer machine.
    t_mono, t_chunked = [], []
    for i in range(REPS):
        t_mono.append(push_file_monolithic(t, "bench/mono", *mono[i]))
        t_chunked.append(push_file_chunked(t, "bench/chunked", *chunked[i]))
    r["push 1 blob monolithic (MB/s)"] = BLOB_SIZE / statistics.median(t_mono) / 1e6
    r["push 1 blob, 16 MiB chunks (MB/s)"] = BLOB_SIZE / statistics.median(t_chunked) / 1e6
    # The first pull of each freshly pushed blob, then five more pulls of one of
    # them: a popular blob's steady state (served from the page cache, if the
    # registry lets it get there).
    t_pull = [pull_blob(t, "bench/mono", mono[i][1]) for i in range(REPS)]
    r["pull 1 blob, first pull after push (MB/s)"] = BLOB_SIZE / statistics.median(t_pull) / 1e6
    t_again = [pull_blob(t, "bench/mono", mono[0][1]) for _ in range(5)]
    r["pull 1 blob, repeated (MB/s)"] = BLOB_SIZE / statistics.median(t_again) / 1e6
    r["_samples"] = {
        "first pull MB/s": [round(BLOB_SIZE / x / 1e6) for x in t_pull],
        "repeated pull MB/s": [round(BLOB_SIZE / x / 1e6) for x in t_again],
        "push mono MB/s": [round(BLOB_SIZE / x / 1e6) for x in t_mono],
        "push chunked MB/s": [round(BLOB_SIZE / x / 1e6) for x in t_chunked],
    }

    c = t.conn()
    m = push_small_image(c, "bench/app", 1)
    put_manifest(c, "bench/app", "latest", m)
    rps, p99 = wrk(f"{t.base}/v2/bench/app/manifests/latest", 64, headers=[f"Accept: {OCI_MANIFEST}"] + t.auth_headers())
    r["manifest GET by tag, 64 conns (req/s)"] = rps
    r["manifest GET by tag, 64 conns p99 (ms)"] = p99

    m = push_small_image(c, "bench/put", 2)
    script = os.path.join(work, f"put-{t.name}.lua")
    with open(script, "w") as f:
        f.write('wrk.method = "PUT"\n')
        f.write(f"wrk.body = {json.dumps(m.decode())}\n")
        f.write(f'wrk.headers["Content-Type"] = "{OCI_MANIFEST}"\n')
        if t.authorization:
            f.write(f'wrk.headers["Authorization"] = "{t.authorization}"\n')
        f.write('request = function() return wrk.format(nil, "/v2/bench/put/manifests/t" .. math.random(1, 1000000000)) end\n')
    rps, p99 = wrk(f"{t.base}/", 16, script=script)
    r["manifest PUT (tag), 16 conns (req/s)"] = rps

    # 10,000 tags on one repository.
    m = push_small_image(c, "bench/tags", 3)
    conns = {}

    def put_tag(i):
        import threading
        k = threading.get_ident()
        if k not in conns:
            conns[k] = t.conn()
        put_manifest(conns[k], "bench/tags", f"tag{i:05d}", m)
    parallel(8, range(N_TAGS), put_tag)

    def list_tags():
        t0 = time.perf_counter()
        s, _, d = req(c, "GET", "/v2/bench/tags/tags/list")
        assert s == 200 and len(json.loads(d)["tags"]) == N_TAGS, (s, len(d))
        return time.perf_counter() - t0
    r[f"tags list, {N_TAGS} tags (ms)"] = statistics.median(list_tags() for _ in range(20)) * 1000

    # 10,000 repositories in the catalog.
    conns.clear()

    def make_repo(i):
        import threading
        k = threading.get_ident()
        if k not in conns:
            conns[k] = t.conn()
        push_bytes(conns[k], f"cat/r{i:05d}", b"x")
    parallel(16 if N_REPOS > 10_000 else 8, range(N_REPOS), make_repo)

    def walk_catalog():
        t0 = time.perf_counter()
        path, seen = "/v2/_catalog?n=1000", 0
        for _ in range(1000):
            s, h, d = req(c, "GET", path)
            assert s == 200, (s, d)
            seen += len(json.loads(d)["repositories"])
            link = h.get("Link")
            if not link:
                break
            path = path_of(link.split(";")[0].strip("<> "))
        assert seen >= N_REPOS, seen
        return time.perf_counter() - t0
    walks, t_walks = [], time.perf_counter()
    while len(walks) < CATALOG_WALKS and (not walks or time.perf_counter() - t_walks < CATALOG_SECS):
        walks.append(walk_catalog())
    r[f"catalog, {N_REPOS} repos, pages of 1000 (ms)"] = statistics.median(walks) * 1000
    r["_samples"]["catalog walks"] = len(walks)

    # 50 concurrent pushes of 5-layer images: the median of REPS rounds, each of
    # fresh layers into fresh repositories; each blob whole in one PUT, then
    # again the way docker and skopeo send it (PATCH, then an empty PUT).
    def push_round(rnd, push):
        images = [(i, [os.urandom(LAYER_SIZE) for _ in range(LAYERS)]) for i in range(N_PUSHERS)]

        def push_image(item):
            i, layers = item
            cc = t.conn()
            repo = f"conc{rnd}/img{i}"
            descs = [(push(cc, repo, l), len(l)) for l in layers]
            config = json.dumps({"architecture": "amd64", "os": "linux", "i": i}).encode()
            cd = push(cc, repo, config)
            put_manifest(cc, repo, "v1", image_manifest(cd, len(config), descs))
        t0 = time.perf_counter()
        parallel(N_PUSHERS, images, push_image)
        return time.perf_counter() - t0
    for label, push, tag in (("", push_bytes, "m"), (", PATCH then PUT", push_bytes_patched, "p")):
        r["_samples"][f"settled before {N_PUSHERS} pushes{label} s"] = settle(t)
        t_conc = [push_round(f"{tag}{rnd}", push) for rnd in range(REPS)]
        r[f"{N_PUSHERS} concurrent 5-layer pushes{label} (s)"] = statistics.median(t_conc)
        r["_samples"][f"{N_PUSHERS} pushes{label} s"] = [round(x, 3) for x in t_conc]
    r["peak RSS (MiB)"] = t.rss("VmHWM")
    # What the process keeps once the load is over.
    time.sleep(5)
    r["RSS 5 s after the load (MiB)"] = t.rss("VmRSS")
    return r


HIGHER_IS_BETTER = lambda k: "/s)" in k


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--target", action="append", required=True)
    ap.add_argument("--credentials", action="append", default=[], help="name=user:password (Basic auth for that target)")
    ap.add_argument("--ca", help="the certificate authority of https targets")
    a = ap.parse_args()
    creds = dict(c.split("=", 1) for c in a.credentials)
    targets = [Target(s, creds.get(s.split("=", 1)[0]), a.ca) for s in a.target]
    print(f"generating {2 * REPS} blobs of {BLOB_SIZE // MiB} MiB …", flush=True)
    blobs = []
    for i in range(2 * REPS):
        p = os.path.join(a.work, f"blob-{i}.bin")
        blobs.append((p, make_blob(p, b"blob%d" % i)))
    results = {}
    for t in targets:
        print(f"benchmarking {t.name} at {t.base} …", flush=True)
        results[t.name] = bench(t, a.work, blobs)
        # Each target's figures as soon as it is done (a long run cut short keeps them).
        print(json.dumps({k: v for k, v in results[t.name].items() if not k.startswith("_")}, indent=1), flush=True)
        with open(os.path.join(a.work, "..", "berth-bench-last.json"), "w") as f:
            json.dump(results, f, indent=1)
    names = [t.name for t in targets]
    keys = [k for k in results[names[0]] if not k.startswith("_")]
    w = max(len(k) for k in keys)
    print()
    print(f"| {'metric':<{w}} | " + " | ".join(f"{n:>12}" for n in names) + f" | {names[0]}/{names[1]} |")
    print(f"|{'-' * (w + 2)}|" + "|".join("-" * 14 for _ in names) + f"|{'-' * (len(names[0]) + len(names[1]) + 3)}|")
    for k in keys:
        vals = [results[n][k] for n in names]
        ratio = vals[0] / vals[1] if vals[1] else float("nan")
        better = "higher is better" if HIGHER_IS_BETTER(k) else "lower is better"
        print(f"| {k:<{w}} | " + " | ".join(f"{v:>12.1f}" for v in vals) + f" | {ratio:>6.2f}× ({better}) |")
    print()
    for n in names:
        print(f"{n} samples: {results[n]['_samples']}")


if __name__ == "__main__":
    sys.exit(main())
