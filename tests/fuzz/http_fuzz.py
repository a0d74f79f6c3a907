#!/usr/bin/env python3
"""Seeded black-box fuzzing of a real `berth serve` over HTTP.

Starts the given binary on a free loopback port with a temporary data directory,
seeds one image, then sends random and mutated requests: malformed names,
references, digests, upload ids, queries, Range and Content-Range values,
Authorization headers and manifest bodies (valid ones mutated field by field).
Then it drives real upload sessions with random PATCH (in order, out of order,
with and without Content-Range), status, PUT (right and wrong digests, with and
without a final chunk) and cancel sequences, checked against a model of each
session: offsets move only on accepted chunks, a refused chunk changes nothing,
and a blob becomes visible only under the digest of exactly the bytes accepted.
Fails if any answer is a 5xx, if an error answer under /v2/ is not the spec's
JSON error document, if a connection breaks without an answer, if the server
dies, logs a panic or an error, or does not stop cleanly on SIGTERM.

    tests/fuzz/http_fuzz.py target/debug/berth [--requests N] [--sessions N] [--seeds 1,2,3]

Requests that send wrong credentials come from random 127.x.y.z addresses, so
the login throttle (per user and per source) does not lock the fuzzer out.
"""
import argparse
import base64
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

PASSWORD = "fuzz-admin-password"
AUTH = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Target:
    def __init__(self, port):
        self.port = port
        self.source = "127.0.0.1"
        self.headers = None  # of the last answer

    def send(self, method, path, body=None, headers=None):
        c = http.client.HTTPConnection("127.0.0.1", self.port, timeout=30, source_address=(self.source, 0))
        try:
            c.putrequest(method, path, skip_accept_encoding=True)
            headers = headers or {}
            for k, v in headers.items():
                c.putheader(k, v)
            if body is not None:
                c.putheader("Content-Length", str(len(body)))
            c.endheaders(body)
            r = c.getresponse()
            self.headers = r.headers
            return r.status, r.read()
        finally:
            c.close()


class Fuzzer:
    def __init__(self, rng, image):
        self.r = rng
        self.manifest, self.manifest_bytes, digests = image
        self.digests = digests + [
            "sha256:" + "0" * 64, "sha512:" + "a" * 128, "sha256:abc", "md5:" + "0" * 32,
            "sha256:" + "A" * 64, "SHA256:" + "0" * 64, "sha256:" + "0" * 63 + "g", "",
        ]
        self.names = ["fz/app", "fz", "a", "a/b/c/d/e/f", "A/B", "a..b", "a__b", "a--b", "-a", "a/", "/a",
                      "a//b", "x" * 300, "fz/app/blobs", "fz/app/manifests", "_catalog", "v2", "%2e%2e",
                      "fz%2fapp", "fz/app/../app", "%C3%BC", "a%20b"]
        self.refs = ["v1", "latest", "V1", "-bad", "x" * 129, "a.b-c_d", ".x", "_x"] + self.digests
        self.junk = ["", "%", "%zz", "%00", "..", "?", "//", "%5C", "%C3%A9", "%ff%fe", "a" * 5000, "%0d%0a"]

    def pick(self, xs):
        return self.r.choice(xs)

    def name(self):
        n = self.pick(self.names)
        if self.r.random() < 0.2:
            i = self.r.randrange(len(n) + 1)
            n = n[:i] + self.pick(self.junk) + n[i:]
        return n

    def path(self):
        n, k, p = self.name(), self.r.randrange(12), self.pick
        if k == 0:
            return f"/v2/{n}/manifests/{p(self.refs)}"
        if k == 1:
            return f"/v2/{n}/blobs/{p(self.digests)}"
        if k == 2:
            return f"/v2/{n}/blobs/uploads/" + p(["", "?digest=" + p(self.digests), "?digest=",
                                                  f"?mount={p(self.digests)}&from={self.name()}", "?mount=&from=",
                                                  "?" + p(self.junk)])
        if k == 3:
            return f"/v2/{n}/blobs/uploads/" + p(["00000000-0000-0000-0000-000000000000", "zzz", "a" * 100,
                                                  p(self.junk)]) + p(["", "?digest=" + p(self.digests)])
        if k == 4:
            return f"/v2/{n}/tags/list" + p(["", "?n=0", "?n=-1", "?n=99999999999999999999", "?n=abc",
                                            "?last=", "?last=v1&n=1", "?n=" + p(self.junk)])
        if k == 5:
            return "/v2/_catalog" + p(["", "?n=0", "?n=-1", "?n=1&last=zz", "?n=1e3", "?last=" + p(self.junk)])
        if k == 6:
            return f"/v2/{n}/referrers/{p(self.digests)}" + p(["", "?artifactType=", "?artifactType=" + p(self.junk)])
        if k == 7:
            return "/v2/" + p(["", "/", p(self.junk)])
        if k == 8:
            return "/api/v1/" + p(["tenants", "users", "tokens", "policies", "repos", p(self.junk),
                                   "tenants/" + p(self.junk), "repos/" + n])
        if k == 9:
            return "/auth/token?" + p([f"service=berth&scope=repository:{n}:pull", "scope=" + p(self.junk),
                                       "grant_type=password", "", p(self.junk)])
        if k == 10:
            return "/" + p(self.junk)
        return f"/v2/{n}/" + p(self.junk)

    def headers(self):
        h, r, p = {}, self.r.random(), self.pick
        if r < 0.6:
            h["Authorization"] = AUTH
        elif r < 0.8:
            h["Authorization"] = p(["Basic", "Basic !!!", "Bearer", "Bearer a.b.c", "Bearer " + "x" * 5000,
                                    "Basic " + base64.b64encode(b"someone:").decode(),
                                    "Basic " + base64.b64encode(b":").decode(),
                                    "Basic " + base64.b64encode(bytes(range(256))).decode(), "bt_xxx", "Digest x"])
        if self.r.random() < 0.3:
            h["Range"] = p(["bytes=0-0", "bytes=0-", "bytes=-1", "bytes=5-2", "bytes=0-99999999999999999999",
                            "bytes=a-b", "bytes=0-1,2-3", "bytes=", "items=0-1", "bytes=4999-", "bytes=5000-"])
        if self.r.random() < 0.3:
            h["Content-Range"] = p(["0-0", "0-", "-1", "5-2", "0-99999999999999999999", "a-b", "bytes 0-1/2",
                                    "0-4999", "1-10"])
        if self.r.random() < 0.4:
            h["Content-Type"] = p([OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                                   "application/vnd.docker.distribution.manifest.v2+json",
                                   "application/vnd.docker.distribution.manifest.v1+prettyjws",
                                   "application/octet-stream", "", "application/json"])
        if self.r.random() < 0.3:
            h["Accept"] = p(["*/*", "application/vnd.oci.image.index.v1+json", "", "x" * 1000])
        return h

    def mutate(self, o):
        r, p = self.r, self.pick
        if isinstance(o, dict):
            o = dict(o)
            for k in list(o):
                x = r.random()
                if x < 0.1:
                    del o[k]
                elif x < 0.2:
                    o[k] = p([None, 0, -1, 1e308, "", [], {}, "x" * 10, True, 2 ** 70])
                elif x < 0.5:
                    o[k] = self.mutate(o[k])
            if r.random() < 0.1:
                o[p(["subject", "annotations", "artifactType", "manifests", "blobs", "urls"])] = p(
                    [None, {}, [], "x", {"mediaType": "x", "digest": p(self.digests), "size": -1}])
            return o
        if isinstance(o, list):
            o = [self.mutate(x) for x in o]
            return o * r.randrange(3) if r.random() < 0.2 else o
        if isinstance(o, str) and r.random() < 0.3:
            return p(self.digests + ["", o * 3])
        if isinstance(o, int) and not isinstance(o, bool) and r.random() < 0.3:
            return p([-1, 0, 2 ** 63, 2 ** 64, o + 1])
        return o

    def body(self):
        x, mb = self.r.random(), self.manifest_bytes
        if x < 0.3:
            return None
        if x < 0.6:
            return json.dumps(self.mutate(self.manifest)).encode()
        if x < 0.7:
            return mb[:self.r.randrange(len(mb))]
        if x < 0.8:
            return self.r.randbytes(self.r.randrange(100))
        if x < 0.9:
            index = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.index.v1+json",
                     "manifests": [{"digest": sha(mb), "size": len(mb), "mediaType": OCI_MANIFEST}] * 3}
            return json.dumps(self.pick([[], {}, None, 1, "x", {"schemaVersion": 1}, {"schemaVersion": 2}, index])).encode()
        return b"{" * self.r.randrange(1, 200)


def seed_image(t):
    layer, cfg = os.urandom(5000), b'{"architecture":"amd64","os":"linux"}'
    for data in (layer, cfg):
        s, d = t.send("POST", f"/v2/fz/app/blobs/uploads/?digest={sha(data)}", data,
                      {"Authorization": AUTH, "Content-Type": "application/octet-stream"})
        assert s == 201, (s, d)
    man = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
           "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(cfg), "size": len(cfg)},
           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": sha(layer), "size": len(layer)}]}
    mb = json.dumps(man).encode()
    s, d = t.send("PUT", "/v2/fz/app/manifests/v1", mb, {"Authorization": AUTH, "Content-Type": OCI_MANIFEST})
    assert s == 201, (s, d)
    return man, mb, [sha(layer), sha(cfg), sha(mb)]


def upload_sessions(t, rng, sessions, failures):
    """Random PATCH / PUT / status / cancel sequences on real upload sessions,
    checked against a model of each session: offsets move only on accepted
    chunks, a refused chunk changes nothing, and a blob becomes visible only
    under the digest of exactly the bytes accepted."""
    auth = {"Authorization": AUTH}
    for n in range(sessions):
        status, _ = t.send("POST", "/v2/fz/up/blobs/uploads/", b"", auth)
        assert status == 202, status
        loc = t.headers["Location"]
        path = loc[loc.index("/v2/"):]
        data = b""

        def what(op):
            return f"session {n} at {len(data)}: {op}"
        for _ in range(rng.randrange(1, 12)):
            op = rng.random()
            if op < 0.5:
                chunk = rng.randbytes(rng.choice([0, 1, 7, 4096, 65536, rng.randrange(1, 200000)]))
                h = dict(auth, **{"Content-Type": "application/octet-stream"})
                form = rng.random()
                if form < 0.5 and chunk:
                    h["Content-Range"] = f"{len(data)}-{len(data) + len(chunk) - 1}"
                elif form < 0.8:
                    a = rng.choice([0, len(data) + 1, max(len(data) - 1, 0), 10 ** 12])
                    h["Content-Range"] = f"{a}-{a + max(len(chunk), 1) - 1}"
                status, body = t.send("PATCH", path, chunk, h)
                if status >= 500:
                    failures.append(what(f"PATCH {h.get('Content-Range')} -> {status} {body[:200]!r}"))
                    break
                in_order = "Content-Range" not in h or h["Content-Range"] == f"{len(data)}-{len(data) + len(chunk) - 1}"
                if status == 202:
                    if not in_order and chunk:
                        failures.append(what(f"PATCH with Content-Range {h['Content-Range']} accepted"))
                        break
                    data += chunk
                    if data and t.headers.get("Range") != f"0-{len(data) - 1}":
                        failures.append(what(f"PATCH answered Range {t.headers.get('Range')!r}"))
                        break
                elif in_order and chunk:
                    failures.append(what(f"in-order PATCH {h.get('Content-Range')} refused: {status} {body[:200]!r}"))
                    break
            elif op < 0.65:
                status, _ = t.send("GET", path, None, auth)
                rng_h = t.headers.get("Range") or ""
                if status != 204 or (data and rng_h != f"0-{len(data) - 1}"):
                    failures.append(what(f"status {status} Range {rng_h!r}"))
                    break
            elif op < 0.9:
                final = rng.randbytes(rng.choice([0, 0, 10, 5000]))
                good = rng.random() < 0.6
                digest = sha(data + final) if good else sha(data + final + b"x")
                status, body = t.send("PUT", f"{path}{'&' if '?' in path else '?'}digest={digest}", final,
                                      dict(auth, **{"Content-Type": "application/octet-stream"}))
                if status >= 500:
                    failures.append(what(f"PUT -> {status} {body[:200]!r}"))
                    break
                if status == 201 and not good:
                    failures.append(what("PUT with a wrong digest accepted"))
                got, blob = t.send("GET", f"/v2/fz/up/blobs/{digest}", None, auth)
                if good and status == 201 and (got != 200 or blob != data + final):
                    failures.append(what(f"blob after PUT 201: {got}, {len(blob)} bytes, wanted {len(data + final)}"))
                if not good and got == 200:
                    failures.append(what("blob visible under a digest it does not have"))
                if status == 201:
                    break
                if status == 400 and good:
                    failures.append(what(f"PUT with the right digest refused: {body[:200]!r}"))
                    break
                # A refused PUT either ends the session or leaves it as it was.
                if t.send("GET", path, None, auth)[0] == 404:
                    break
            else:
                status, _ = t.send("DELETE", path, None, auth)
                if status != 204:
                    failures.append(what(f"cancel -> {status}"))
                gone, _ = t.send("GET", path, None, auth)
                if gone != 404:
                    failures.append(what(f"status after cancel -> {gone}"))
                break


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--requests", type=int, default=3000, help="requests per seed")
    ap.add_argument("--sessions", type=int, default=100, help="upload sessions per seed")
    ap.add_argument("--seeds", default="1,2")
    a = ap.parse_args()

    port = free_port()
    data = tempfile.mkdtemp(prefix="berth-fuzz.")
    log = open(os.path.join(data, "server.log"), "w+")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env.update(BERTH_ADMIN_PASSWORD=PASSWORD, BERTH_LOG="warn")
    server = subprocess.Popen([a.binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(data, "d")],
                              env=env, stdout=subprocess.PIPE, stderr=log)
    server.stdout.readline()  # the "listening" banner
    t = Target(port)
    failures = []
    try:
        image = seed_image(t)
        for seed in [int(x) for x in a.seeds.split(",")]:
            f = Fuzzer(random.Random(seed), image)
            for i in range(a.requests):
                method = f.pick(["GET", "HEAD", "PUT", "POST", "PATCH", "DELETE", "OPTIONS", "GET", "PUT"])
                path, headers, body = f.path(), f.headers(), f.body()
                if method in ("GET", "HEAD", "DELETE", "OPTIONS") and f.r.random() < 0.8:
                    body = None
                wrong = headers.get("Authorization") not in (None, AUTH)
                t.source = "127.%d.%d.%d" % (f.r.randrange(1, 255), f.r.randrange(256), f.r.randrange(1, 255)) if wrong else "127.0.0.1"
                what = f"seed {seed} #{i}: {method} {path[:160]} {headers} {(body or b'')[:160]!r}"
                try:
                    status, answer = t.send(method, path, body, headers)
                except Exception as e:  # noqa: BLE001 - any broken exchange is a finding
                    failures.append(f"{what}: no answer ({e!r})")
                    if server.poll() is not None:
                        break
                    continue
                if status >= 500:
                    failures.append(f"{what}: {status} {answer[:200]!r}")
                elif status >= 400 and path.startswith("/v2/") and method != "HEAD" and not answer.startswith(b'{"errors":['):
                    failures.append(f"{what}: {status} without the spec's error document: {answer[:200]!r}")
            if server.poll() is None:
                upload_sessions(t, random.Random(seed), a.sessions, failures)
            if server.poll() is not None:
                failures.append(f"server exited with {server.returncode} during seed {seed}")
                break
    finally:
        if server.poll() is None:
            server.send_signal(signal.SIGTERM)
            try:
                if server.wait(timeout=30) != 0:
                    failures.append(f"server exited with {server.returncode} on SIGTERM")
            except subprocess.TimeoutExpired:
                server.kill()
                failures.append("server did not stop within 30 s of SIGTERM")
        log.seek(0)
        for line in log:
            if "panicked" in line or " ERROR " in line:
                failures.append("server log: " + line.strip()[:300])
        log.close()
        shutil.rmtree(data, ignore_errors=True)
    for f in failures[:30]:
        print("FAIL", f)
    print(f"{a.requests} requests x {len(a.seeds.split(','))} seeds: {len(failures)} failures")
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
