#!/usr/bin/env python3
"""Crash safety, proven by killing the server: kill -9 Berth at a random moment
under a mixed load, restart it on the same data directory, and check what it
promises (docs/ARCHITECTURE.md, "Crash safety").

Each round starts `berth serve` (embedded defaults, with the collector and
retention running every second), then runs WORKERS threads, each on repositories
of its own so its acknowledged state is exact: monolithic and chunked uploads,
manifest pushes and tag moves, tag and manifest deletes, cross-repository mounts,
retention runs and collection passes. After a random 0.5–3 s it kills the server
with SIGKILL, restarts it, and checks:
- `fsck` (the API's) is clean: no link or manifest without its bytes, no tag
  without its manifest, every reference count and every tenant's usage equal
  to a recount from scratch;
- every push acknowledged with 201 is there (a tag answers with the digest
  acknowledged last, unless the operation in flight at the kill touched it, in
  which case it answers with the old or the new outcome, and what it answers
  is what later rounds expect), and every blob of it is served and matches its
  digest;
- an upload interrupted by the kill either resumes (its status answers) or is
  unknown, never a 5xx;
- once the upload lifetime has passed, no staging is left behind.
Any 5xx during the load, a panic in the log, or a failed check fails the run.

With --surreal, --garage and --garage-up (binaries), the rounds run in the
scaled-out form: blobs on a Garage S3 store and metadata on a SurrealDB server,
both started here, and the staging check lists the bucket. The rounds take
turns at what is killed: Berth; Berth and the database server together (the
whole deployment losing power, but for Garage); the database server alone,
under load, with Berth left running (its answers are 503 until the server is
back, after which it must serve everything again without a restart).

    tests/crash/crash.py target/debug/berth [--rounds 20] [--workers 12]
    tests/crash/crash.py target/debug/berth --surreal BIN --garage BIN --garage-up BIN
"""
import argparse
import base64
import datetime
import hashlib
import hmac
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
import threading
import time
import urllib.parse
import xml.etree.ElementTree as ET

PASSWORD = "crash-admin-password"
AUTH = "Basic " + base64.b64encode(f"admin:{PASSWORD}".encode()).decode()
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
UPLOAD_TTL = 4


def sha(b):
    return "sha256:" + hashlib.sha256(b).hexdigest()


class Down(Exception):
    """The server went away (the kill); the operation's outcome is unknown."""


# Set while the database server is down: a 503 is then the right answer, and
# the outcome of the operation that got it is unknown, as for a kill.
OUTAGE = threading.Event()


def req(port, method, path, body=None, headers=None, timeout=30):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Authorization": AUTH}
        h.update(headers or {})
        if body is not None:
            h["Content-Length"] = str(len(body))
        c.request(method, path, body=body, headers=h)
        r = c.getresponse()
        if r.status == 503 and OUTAGE.is_set():
            raise Down("503 while the database server is down")
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    except (ConnectionError, OSError, http.client.HTTPException) as e:
        raise Down(str(e))
    finally:
        c.close()


def path_of(loc):
    return loc.split("://", 1)[1].split("/", 1)[1] if "://" in loc else loc.lstrip("/")


class Worker:
    """One thread's repositories and what the server acknowledged for them."""

    def __init__(self, i, rng):
        self.i, self.rng = i, rng
        self.repos = [f"crash/w{i}a", f"crash/w{i}b"]
        self.tags = {}          # (repo, tag) -> manifest digest, as acknowledged
        self.manifests = {}     # (repo, digest) -> (manifest bytes, [(digest, size)])
        self.blobs = {}         # (repo, digest) -> size, acknowledged
        self.in_flight = None   # what was being done when the server died
        self.errors = []
        self.uploads = []       # upload locations begun (some interrupted)
        self.gone = set()       # repositories whose delete was acknowledged (until pushed again)

    def check(self, what, status, ok, body=b""):
        if status >= 500:
            self.errors.append(f"worker {self.i}: {what} answered {status}: {body[:200]!r}")
        return status in ok

    def push_blob(self, port, repo, data):
        d = sha(data)
        self.in_flight = ("blob", repo, d)
        if self.rng.random() < 0.5:
            s, _, b = req(port, "POST", f"/v2/{repo}/blobs/uploads/?digest={d}", data, {"Content-Type": "application/octet-stream"})
            if self.check("monolithic upload", s, (201,), b):
                self.blobs[(repo, d)] = len(data)
            return d
        s, h, b = req(port, "POST", f"/v2/{repo}/blobs/uploads/")
        if not self.check("start upload", s, (202,), b):
            return None
        loc = "/" + path_of(h["location"])
        self.uploads.append(loc)
        cut = self.rng.randint(0, len(data))
        for part in (data[:cut], data[cut:]):
            if not part:
                continue
            s, h, b = req(port, "PATCH", loc, part, {"Content-Type": "application/octet-stream"})
            if not self.check("chunk", s, (202,), b):
                return None
            loc = "/" + path_of(h["location"])
        sep = "&" if "?" in loc else "?"
        s, _, b = req(port, "PUT", f"{loc}{sep}digest={d}")
        if self.check("finish upload", s, (201,), b):
            self.blobs[(repo, d)] = len(data)
        return d

    def push_image(self, port):
        repo = self.rng.choice(self.repos)
        self.gone.discard(repo)
        config = json.dumps({"worker": self.i, "n": self.rng.random()}).encode()
        layers = [os.urandom(self.rng.choice([100, 5000, 70_000, 600_000])) for _ in range(self.rng.randint(1, 3))]
        descs = []
        for data in [config] + layers:
            d = self.push_blob(port, repo, data)
            if d is None or (repo, d) not in self.blobs:
                return
            descs.append((d, len(data)))
        m = json.dumps({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": descs[0][0], "size": descs[0][1]},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": d, "size": n} for d, n in descs[1:]],
        }).encode()
        tag = f"t{self.rng.randint(0, 5)}"
        md = sha(m)
        self.in_flight = ("tag", repo, tag, md)
        s, _, b = req(port, "PUT", f"/v2/{repo}/manifests/{tag}", m, {"Content-Type": OCI_MANIFEST})
        if self.check("manifest push", s, (201,), b):
            self.tags[(repo, tag)] = md
            self.manifests[(repo, md)] = (m, descs)

    def delete_tag(self, port):
        if not self.tags:
            return
        repo, tag = self.rng.choice(sorted(self.tags))
        self.in_flight = ("tag", repo, tag, None)
        s, _, b = req(port, "DELETE", f"/api/v1/repositories/{repo}/-/tags/{tag}")
        if self.check("tag delete", s, (204, 200, 404), b):
            self.tags.pop((repo, tag), None)

    def delete_manifest(self, port):
        if not self.manifests:
            return
        repo, md = self.rng.choice(sorted(self.manifests))
        self.in_flight = ("manifest", repo, md)
        s, _, b = req(port, "DELETE", f"/v2/{repo}/manifests/{md}")
        if self.check("manifest delete", s, (202, 404), b):
            self.manifests.pop((repo, md), None)
            for k in [k for k, v in self.tags.items() if k[0] == repo and v == md]:
                self.tags.pop(k)

    def mount(self, port):
        src, dst = self.repos if self.rng.random() < 0.5 else self.repos[::-1]
        have = [d for (r, d) in self.blobs if r == src]
        if not have:
            return
        d = self.rng.choice(have)
        self.gone.discard(dst)
        self.in_flight = ("blob", dst, d)
        s, _, b = req(port, "POST", f"/v2/{dst}/blobs/uploads/?mount={d}&from={src}")
        if self.check("mount", s, (201, 202), b) and s == 201:
            self.blobs[(dst, d)] = self.blobs[(src, d)]

    def retention(self, port):
        repo = self.rng.choice(self.repos)
        self.in_flight = ("repo", repo, None)
        body = json.dumps({"keep_last": 3, "untagged_older_than": "1s", "enabled": True}).encode()
        s, _, b = req(port, "PUT", f"/api/v1/repositories/{repo}/-/retention", body, {"Content-Type": "application/json"})
        self.check("retention policy", s, (200, 404), b)
        # Its runs (scheduled, every second) delete tags: what is acknowledged
        # for this repository is no longer known exactly.
        self.forget(repo)

    def delete_repo(self, port):
        repo = self.rng.choice(self.repos)
        self.in_flight = ("repo", repo, None)
        s, _, b = req(port, "DELETE", f"/api/v1/repositories/{repo}")
        if self.check("repository delete", s, (200, 404), b):
            for table in (self.tags, self.manifests, self.blobs):
                for k in [k for k in table if k[0] == repo]:
                    table.pop(k)
            self.gone.add(repo)

    def forget(self, repo):
        self.gone.discard(repo)
        for k in [k for k in self.tags if k[0] == repo]:
            self.tags.pop(k)
        for k in [k for k in self.manifests if k[0] == repo]:
            self.manifests.pop(k)
        for k in [k for k in self.blobs if k[0] == repo]:
            self.blobs.pop(k)
        self.repos = [r if r != repo else f"{r}x" for r in self.repos]

    def collect(self, port):
        self.in_flight = None
        s, _, b = req(port, "POST", "/api/v1/gc", b'{"dry_run":false}', {"Content-Type": "application/json"}, timeout=120)
        self.check("gc pass", s, (200,), b)

    def run(self, port, stop):
        ops = [self.push_image] * 6 + [self.delete_tag, self.delete_manifest, self.mount, self.mount, self.collect, self.delete_repo] + [self.retention] * (1 if self.i == 0 else 0)
        try:
            while not stop.is_set():
                self.rng.choice(ops)(port)
                self.in_flight = None
        except Down:
            pass
        except Exception as e:  # a harness bug or an answer it cannot read: fail loudly
            self.errors.append(f"worker {self.i}: {type(e).__name__}: {e}")

    def verify(self, port, check):
        """What was acknowledged is there. What the killed operation touched may be
        either way (the server may have committed it without answering); it is
        checked to be one of the two, and what is found becomes the expectation,
        so a later round does not hold the server to a stale one."""
        flight = self.in_flight
        for (repo, tag), md in sorted(self.tags.items()):
            if flight and flight[0] == "repo" and flight[1] == repo:
                continue
            s, h, b = req(port, "GET", f"/v2/{repo}/manifests/{tag}", headers={"Accept": OCI_MANIFEST})
            found = sha(b) if s == 200 else None
            either = None
            if flight and flight[0] == "tag" and flight[1:3] == (repo, tag):
                either = {md, flight[3]}  # a push (its digest) or a delete (None)
            elif flight and flight[0] == "manifest" and flight[1] == repo and flight[2] == md:
                either = {md, None}
            if either is not None:
                check(found in either, f"{repo}:{tag} was {md}, its killed operation {flight}: got {s} {found}")
                if found is None:
                    self.tags.pop((repo, tag))
                else:
                    self.tags[(repo, tag)] = found
                continue
            check(s == 200 and found == md, f"{repo}:{tag} acknowledged as {md}: got {s} {found if s == 200 else b[:120]!r}")
            if s != 200:
                continue
            for d, n in self.manifests.get((repo, md), (b"", []))[1]:
                s, _, data = req(port, "GET", f"/v2/{repo}/blobs/{d}", timeout=60)
                check(s == 200 and sha(data) == d and len(data) == n, f"{repo}@{d}: {s}, {len(data)} bytes")
        for repo in sorted(self.gone):
            if flight and flight[1] == repo:
                continue
            s, _, b = req(port, "GET", f"/v2/{repo}/tags/list")
            check(s == 404, f"{repo} was deleted (acknowledged): its tags list answered {s} {b[:120]!r}")
        if flight and flight[0] == "repo":
            self.forget(flight[1])  # deleted or not, or its retention ran: unknown
        for loc in self.uploads[-3:]:
            s, _, b = req(port, "GET", loc)
            check(s in (204, 404), f"upload status {loc} after the restart: {s} {b[:120]!r}")
        self.in_flight = None


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, data, cfg, log):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env.update({"BERTH_ADMIN_PASSWORD": PASSWORD, "BERTH_LOG": "warn", "BERTH_CONFIG": cfg, "BERTH_UPLOAD_TTL_SECS": str(UPLOAD_TTL)})
    p = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data], env=env,
                         stdout=subprocess.PIPE, stderr=log)
    line = p.stdout.readline().decode()
    if "listening" not in line:
        raise SystemExit(f"berth did not start: {line!r}")
    return p, port


class Backends:
    """A SurrealDB server and a Garage node for the scaled-out form. Garage
    stays up across the rounds; the database server is killed and started
    again in the rounds that say so."""

    def __init__(self, a, work):
        self.a, self.work = a, work
        self.sport = sport = free_port()
        self.db = None
        self.start_db(wait=False)
        env_file = os.path.join(work, "garage.env")
        with open(env_file, "w") as out:
            self.garage = subprocess.Popen([a.garage_up, a.garage, os.path.join(work, "garage")],
                                           stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
        self.g = {}
        for _ in range(600):
            self.g = dict(l.strip().split("=", 1) for l in open(env_file) if "=" in l)
            if "GARAGE_SECRET" in self.g and up(sport):
                break
            time.sleep(0.1)
        else:
            self.stop()
            raise SystemExit("the SurrealDB server or Garage did not start")
        key = os.path.join(work, "master.key")
        with open(key, "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        g = self.g
        self.config = f"""[storage]
backend = "s3"
bucket = "{g['GARAGE_BUCKET']}"
endpoint = "{g['GARAGE_ENDPOINT']}"
region = "{g['GARAGE_REGION']}"
root = "/crash/"
access_key_id = "{g['GARAGE_KEY_ID']}"
secret_access_key = "{g['GARAGE_SECRET']}"
[metadata]
url = "ws://127.0.0.1:{sport}"
username = "root"
password = "root"
namespace = "berth"
database = "crash"
[auth]
master_key_file = "{key}"
"""

    def staged(self):
        """The keys under the store's uploads/ (ListObjectsV2, signed with SigV4)."""
        g = self.g
        url = urllib.parse.urlsplit(g["GARAGE_ENDPOINT"])
        query = urllib.parse.urlencode(sorted({"list-type": "2", "prefix": "crash/uploads/", "max-keys": "100"}.items()),
                                       quote_via=urllib.parse.quote)
        path = f"/{g['GARAGE_BUCKET']}"
        now = datetime.datetime.now(datetime.timezone.utc)
        stamp, day = now.strftime("%Y%m%dT%H%M%SZ"), now.strftime("%Y%m%d")
        empty = hashlib.sha256(b"").hexdigest()
        headers = {"host": url.netloc, "x-amz-content-sha256": empty, "x-amz-date": stamp}
        signed = ";".join(sorted(headers))
        canonical = "\n".join(["GET", path, query, "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)), signed, empty])
        scope = f"{day}/{g['GARAGE_REGION']}/s3/aws4_request"
        to_sign = "\n".join(["AWS4-HMAC-SHA256", stamp, scope, hashlib.sha256(canonical.encode()).hexdigest()])
        k = ("AWS4" + g["GARAGE_SECRET"]).encode()
        for part in (day, g["GARAGE_REGION"], "s3", "aws4_request"):
            k = hmac.new(k, part.encode(), hashlib.sha256).digest()
        sig = hmac.new(k, to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (f"AWS4-HMAC-SHA256 Credential={g['GARAGE_KEY_ID']}/{scope}, "
                                    f"SignedHeaders={signed}, Signature={sig}")
        c = http.client.HTTPConnection(url.netloc, timeout=30)
        try:
            c.request("GET", f"{path}?{query}", headers=headers)
            r = c.getresponse()
            body = r.read()
        finally:
            c.close()
        if r.status != 200:
            raise SystemExit(f"listing the bucket: {r.status} {body[:300]!r}")
        ns = {"s3": "http://s3.amazonaws.com/doc/2006-03-01/"}
        return [e.text for e in ET.fromstring(body).findall("s3:Contents/s3:Key", ns)]

    def start_db(self, wait=True):
        """The SurrealDB server, on its port and data folder (again after a kill)."""
        self.db = subprocess.Popen(
            [self.a.surreal, "start", "--user", "root", "--pass", "root", "--bind", f"127.0.0.1:{self.sport}",
             "--log", "warn", f"surrealkv://{self.work}/db"],
            stdout=subprocess.DEVNULL, stderr=open(os.path.join(self.work, "surreal.log"), "ab"), start_new_session=True)
        deadline = time.time() + 60
        while wait and not up(self.sport):
            if time.time() > deadline or self.db.poll() is not None:
                raise SystemExit(f"the SurrealDB server did not start again; see {self.work}/surreal.log")
            time.sleep(0.1)

    def kill_db(self):
        kill(self.db)

    def stop(self):
        kill(self.db)
        kill(self.garage)


def kill(p):
    if p and p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def up(port):
    try:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
        c.request("GET", "/health")
        ok = c.getresponse().status == 200
        c.close()
        return ok
    except (ConnectionError, OSError, http.client.HTTPException):
        return False


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--workers", type=int, default=12)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--surreal", help="the SurrealDB server binary: metadata on a server (with --garage, --garage-up)")
    ap.add_argument("--garage", help="the Garage binary: blobs on S3")
    ap.add_argument("--garage-up", help="berth-testkit's garage-up binary")
    a = ap.parse_args()
    scaled = [a.surreal, a.garage, a.garage_up]
    if any(scaled) and not all(scaled):
        ap.error("--surreal, --garage and --garage-up go together")
    rng = random.Random(a.seed)
    work = tempfile.mkdtemp(prefix="berth-crash-")
    data = os.path.join(work, "data")
    cfg = os.path.join(work, "berth.toml")
    backends = Backends(a, work) if all(scaled) else None
    with open(cfg, "w") as f:
        f.write("[registry]\nupload_sweep_secs = 1\n[registry.gc]\ninterval_secs = 1\ngrace_secs = 1\n[registry.retention]\ninterval_secs = 1\n")
        if backends:
            f.write(backends.config)
    log_path = os.path.join(work, "berth.log")
    log = open(log_path, "ab")
    workers = [Worker(i, random.Random(rng.random())) for i in range(a.workers)]
    failures = []
    try:
        for rnd in range(1, a.rounds + 1):
            server, port = start(a.binary, data, cfg, log)
            stop = threading.Event()
            threads = [threading.Thread(target=w.run, args=(port, stop), daemon=True) for w in workers]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.5, 3.0))
            killed = ("Berth", "Berth and the database", "the database")[(rnd - 1) % 3] if backends else "Berth"
            if killed != "the database":
                server.send_signal(signal.SIGKILL)
                server.wait()
            if killed != "Berth":
                # Down for a second, then back (as a supervisor would restart it).
                OUTAGE.set()
                backends.kill_db()
                time.sleep(1)
                backends.start_db()
            stop.set()
            for t in threads:
                t.join(timeout=60)
            OUTAGE.clear()
            if killed != "the database":
                server, port = start(a.binary, data, cfg, log)
            else:
                # The same Berth, which must find the server again on its own.
                deadline = time.time() + 60
                while req(port, "GET", "/readyz")[0] != 200:
                    if time.time() > deadline:
                        raise SystemExit("berth never became ready again after the database server came back")
                    time.sleep(0.2)
            problems = []

            def check(ok, what):
                if not ok:
                    problems.append(what)
            for w in workers:
                problems.extend(w.errors)
                w.errors = []
                w.verify(port, check)
            s, _, b = req(port, "POST", "/api/v1/fsck", b'{"repair":false}', {"Content-Type": "application/json"}, timeout=300)
            report = json.loads(b) if s == 200 else {}
            check(s == 200 and report.get("clean"), f"fsck after the restart: {s} {json.dumps(report)[:2000]}")
            # Interrupted uploads expire and their staging goes.
            time.sleep(UPLOAD_TTL + 2.5)
            if backends:
                staged = backends.staged()
            else:
                staged = os.listdir(os.path.join(data, "blobs", "uploads")) if os.path.isdir(os.path.join(data, "blobs", "uploads")) else []
            check(not staged, f"staging left after the upload lifetime: {staged[:5]}")
            server.send_signal(signal.SIGTERM)
            server.wait(timeout=60)
            acked = sum(len(w.tags) for w in workers)
            print(f"round {rnd}: {killed} killed under load, restarted; {acked} acknowledged tags checked, fsck "
                  f"{'clean' if report.get('clean') else 'NOT clean'}, {len(problems)} problems", flush=True)
            failures.extend(f"round {rnd}: {p}" for p in problems)
            if problems:
                break
        log.close()
        with open(log_path, "rb") as f:
            text = f.read().decode(errors="replace")
        for line in text.splitlines():
            if "panicked" in line:
                failures.append(f"log: {line}")
    finally:
        log.close()
        if backends:
            backends.stop()
    if failures:
        print("\n".join(failures[:50]))
        print(f"log: {log_path}")
        sys.exit(1)
    shutil.rmtree(work, ignore_errors=True)
    print(f"crash harness{' (S3 and a SurrealDB server)' if backends else ''}: {a.rounds} rounds, every check held")


if __name__ == "__main__":
    main()
