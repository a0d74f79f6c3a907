#!/usr/bin/env python3
"""Berth as a cluster: three replicas, each in a network namespace of its own
(veth pairs on a bridge made here), behind HAProxy, over one SurrealDB server
and one Garage store (real servers, started here), driven by skopeo and docker
through the balancer.

Checks, in order:
  1. an image pushed through the balancer is served by every replica;
  2. a tag pushed, moved and deleted through one replica is seen by the others
     on the next request;
  3. concurrent pushes through the balancer lose no tag, and every replica
     agrees on a tag they all moved;
  4. a replica killed (SIGKILL) in the middle of pushes: the clients retry and
     every push succeeds; nothing is half-visible (every tag's manifest and
     blobs are whole on every replica); restarted, it serves everything;
  5. a replica cut off from the database answers 503 for readiness, writes
     and reads (never stale or corrupt data), the balancer routes around it,
     and once reconnected it serves what was pushed meanwhile;
  6. docker (when an engine answers): push and pull through the balancer.

Run by tests/cluster/run.sh (which builds what it needs); needs root (it
makes network namespaces and iptables rules inside them).
"""

import argparse
import base64
import hashlib
import io
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.error
import urllib.request

NET = "10.231.0"
HOST_IP = f"{NET}.1"
BRIDGE = "bclbr"
ADMIN_PW = "cluster-admin-password"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
ACCEPT = ", ".join([OCI_MANIFEST, "application/vnd.oci.image.index.v1+json",
                    "application/vnd.docker.distribution.manifest.v2+json"])


def sh(*args, check=True, **kw):
    r = subprocess.run(list(args), capture_output=True, text=True, **kw)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(args)}: {r.stdout}{r.stderr}")
    return r


def berth_env(**more):
    """The environment a Berth runs in: this one without the BERTH_*
    variables meant for the tests (Berth refuses unknown ones), with `more`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("BERTH_")}
    env.update(more)
    return env


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


class Http:
    """Basic-auth requests as the platform admin."""

    def __init__(self):
        self.auth = "Basic " + base64.b64encode(f"admin:{ADMIN_PW}".encode()).decode()

    def req(self, method, url, body=None, headers=None, timeout=30):
        h = {"authorization": self.auth}
        h.update(headers or {})
        r = urllib.request.Request(url, data=body, method=method, headers=h)
        try:
            with urllib.request.urlopen(r, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            return e.code, dict(e.headers), e.read()
        except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
            return 0, {}, str(e).encode()


HTTP = Http()


class Cluster:
    def __init__(self, a, work):
        self.a, self.work = a, work
        self.procs = {}
        self.replicas = [f"{NET}.{10 + i}" for i in (1, 2, 3)]
        self.sport = free_port()
        self.lb = f"127.0.0.1:{free_port()}"

    # ----- the network -----

    def net_down(self):
        for i in (1, 2, 3):
            sh("ip", "netns", "del", f"bcl{i}", check=False)
        sh("ip", "link", "del", BRIDGE, check=False)

    def net_up(self):
        self.net_down()
        sh("ip", "link", "add", BRIDGE, "type", "bridge")
        sh("ip", "addr", "add", f"{HOST_IP}/24", "dev", BRIDGE)
        sh("ip", "link", "set", BRIDGE, "up")
        for i in (1, 2, 3):
            ns = f"bcl{i}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", f"bclv{i}", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", f"bclv{i}", "master", BRIDGE, "up")
            sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{NET}.{10 + i}/24", "dev", "eth0")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "eth0", "up")
            sh("ip", "netns", "exec", ns, "ip", "link", "set", "lo", "up")

    # ----- the servers -----

    def spawn(self, name, args, env=None, netns=None):
        log = open(os.path.join(self.work, f"{name}.log"), "ab")
        cmd = (["ip", "netns", "exec", netns] if netns else []) + args
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=log, env=env, start_new_session=True)

    def kill(self, name, sig=signal.SIGKILL):
        p = self.procs.pop(name, None)
        if p and p.poll() is None:
            os.killpg(p.pid, sig)
            p.wait()

    def start_backends(self):
        self.spawn("surreal", [self.a.surreal, "start", "--user", "root", "--pass", "root", "--bind",
                               f"{HOST_IP}:{self.sport}", "--log", "warn", f"surrealkv://{self.work}/db"])
        env_file = os.path.join(self.work, "garage.env")
        with open(env_file, "w") as out:
            self.procs["garage"] = subprocess.Popen([self.a.garage_up, self.a.garage, os.path.join(self.work, "garage"), HOST_IP],
                                                    stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
        g = {}
        for _ in range(600):
            g = dict(l.strip().split("=", 1) for l in open(env_file) if "=" in l)
            if "GARAGE_SECRET" in g:
                break
            time.sleep(0.1)
        else:
            raise RuntimeError("garage did not start")
        with open(os.path.join(self.work, "master.key"), "w") as f:
            f.write(os.urandom(32).hex() + "\n")
        with open(os.path.join(self.work, "berth.toml"), "w") as f:
            f.write(f"""drain_secs = 1
[storage]
backend = "s3"
bucket = "{g['GARAGE_BUCKET']}"
endpoint = "{g['GARAGE_ENDPOINT']}"
region = "{g['GARAGE_REGION']}"
root = "/cluster/"
access_key_id = "{g['GARAGE_KEY_ID']}"
secret_access_key = "{g['GARAGE_SECRET']}"
[metadata]
url = "ws://{HOST_IP}:{self.sport}"
username = "root"
password = "root"
namespace = "berth"
database = "cluster"
# (the watchdog would end a replica cut off for a minute; the test cuts one
# off for less, but each refused query waits out its timeout)
watchdog_secs = 300
[registry]
counter_flush_secs = 1
[auth]
master_key_file = "{self.work}/master.key"
external_url = "http://{self.lb}"
""")

    def start_replica(self, i):
        env = berth_env(BERTH_CONFIG=os.path.join(self.work, "berth.toml"), BERTH_ADMIN_PASSWORD=ADMIN_PW, BERTH_LOG="info")
        self.spawn(f"r{i}", [self.a.berth, "serve", "--listen", "0.0.0.0:5000", "--data-dir", os.path.join(self.work, f"r{i}")],
                   env=env, netns=f"bcl{i}")

    def start_balancer(self):
        servers = "\n".join(f"  server r{i} {ip}:5000 check" for i, ip in enumerate(self.replicas, 1))
        cfg = os.path.join(self.work, "haproxy.cfg")
        with open(cfg, "w") as f:
            f.write(f"""global
  maxconn 4000
defaults
  mode http
  timeout connect 2s
  timeout client 300s
  timeout server 300s
  # A request a replica could not answer (killed mid-request, or out of
  # reach of its database) is tried on another; requests whose body did not
  # fit HAProxy's buffer cannot be, and the client retries them.
  retries 3
  option redispatch
  retry-on all-retryable-errors
frontend fe
  bind {self.lb}
  default_backend be
backend be
  balance roundrobin
  option httpchk GET /readyz
  http-check expect status 200
  default-server inter 300ms fall 2 rise 2
{servers}
""")
        self.spawn("haproxy", ["haproxy", "-db", "-f", cfg])

    def url(self, i, path):
        """A replica's URL (i in 1..3), or the balancer's (i = 0)."""
        return f"http://{self.lb if i == 0 else self.replicas[i - 1] + ':5000'}{path}"

    def wait_ready(self, i, want=200, secs=60):
        deadline = time.time() + secs
        while time.time() < deadline:
            if HTTP.req("GET", self.url(i, "/readyz"), timeout=5)[0] == want:
                return
            time.sleep(0.2)
        raise AssertionError(f"replica {i}: /readyz never answered {want} in {secs} s; log:\n{self.log_tail(f'r{i}')}")

    def log_tail(self, name, n=30):
        try:
            return "".join(open(os.path.join(self.work, f"{name}.log"), errors="replace").readlines()[-n:])
        except OSError:
            return ""


# ----- images -----

def gz_layer(seed, size):
    rnd = random.Random(seed)
    data = bytes(rnd.getrandbits(8) for _ in range(size))
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w") as t:
        info = tarfile.TarInfo(f"file-{seed}")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
    import gzip
    return gzip.compress(raw.getvalue(), mtime=0)


def oci_layout(path, seed, layers=2, size=50_000):
    """An OCI image layout at `path` with one image, tag `t`."""
    blobs = os.path.join(path, "blobs", "sha256")
    os.makedirs(blobs, exist_ok=True)

    def put(b):
        d = hashlib.sha256(b).hexdigest()
        with open(os.path.join(blobs, d), "wb") as f:
            f.write(b)
        return {"digest": f"sha256:{d}", "size": len(b)}

    ls = [gz_layer(seed * 100 + n, size) for n in range(layers)]
    diff_ids = []
    import gzip
    for l in ls:
        diff_ids.append("sha256:" + hashlib.sha256(gzip.decompress(l)).hexdigest())
    config = json.dumps({"architecture": "amd64", "os": "linux", "config": {"Env": [f"SEED={seed}"]},
                         "rootfs": {"type": "layers", "diff_ids": diff_ids}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": dict(put(config), mediaType="application/vnd.oci.image.config.v1+json"),
                "layers": [dict(put(l), mediaType="application/vnd.oci.image.layer.v1.tar+gzip") for l in ls]}
    m = json.dumps(manifest).encode()
    desc = dict(put(m), mediaType=OCI_MANIFEST, annotations={"org.opencontainers.image.ref.name": "t"})
    with open(os.path.join(path, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": [desc]}, f)
    with open(os.path.join(path, "oci-layout"), "w") as f:
        f.write('{"imageLayoutVersion": "1.0.0"}')
    return "sha256:" + hashlib.sha256(m).hexdigest()


def skopeo_push(src, dest, retries=0):
    return sh("skopeo", "copy", "--retry-times", str(retries), "--dest-tls-verify=false", "--dest-creds", f"admin:{ADMIN_PW}",
              f"oci:{src}:t", f"docker://{dest}", check=False)


# ----- checks -----

def manifest(c, i, repo, ref):
    st, h, body = HTTP.req("GET", c.url(i, f"/v2/{repo}/manifests/{ref}"), headers={"accept": ACCEPT})
    return st, h.get("Docker-Content-Digest") or h.get("docker-content-digest"), body


def tags(c, i, repo):
    st, _, body = HTTP.req("GET", c.url(i, f"/v2/{repo}/tags/list"))
    assert st == 200, f"tags of {repo} on {i}: {st} {body[:200]}"
    return sorted(json.loads(body)["tags"] or [])


def whole(c, i, repo):
    """Every tag of `repo` on replica i has its manifest and every blob, each
    matching its digest (nothing half-visible). Returns {tag: digest}."""
    out = {}
    for t in tags(c, i, repo):
        st, d, body = manifest(c, i, repo, t)
        assert st == 200, f"replica {i}: {repo}:{t} listed but its manifest answers {st}"
        assert "sha256:" + hashlib.sha256(body).hexdigest() == d, f"replica {i}: {repo}:{t} manifest bytes do not match"
        m = json.loads(body)
        for b in [m["config"]] + m["layers"]:
            bst, _, blob = HTTP.req("GET", c.url(i, f"/v2/{repo}/blobs/{b['digest']}"))
            assert bst == 200, f"replica {i}: {repo}:{t} blob {b['digest']} answers {bst}"
            assert "sha256:" + hashlib.sha256(blob).hexdigest() == b["digest"], f"replica {i}: blob {b['digest']} is corrupt"
        out[t] = d
    return out


def check(name, fn):
    t0 = time.time()
    fn()
    print(f"ok   {name} ({time.time() - t0:.1f} s)", flush=True)


def run(c, a):
    imgs = os.path.join(c.work, "images")
    seeds = iter(range(1, 10_000))

    def image():
        s = next(seeds)
        p = os.path.join(imgs, str(s))
        return p, oci_layout(p, s)

    def through_balancer():
        src, d = image()
        r = skopeo_push(src, f"{c.lb}/library/app:v1")
        assert r.returncode == 0, r.stderr
        for i in (1, 2, 3):
            assert manifest(c, i, "library/app", "v1")[:2] == (200, d), f"replica {i} does not serve what the balancer took"
            assert whole(c, i, "library/app") == {"v1": d}

    def across_replicas():
        for writer in (1, 2, 3):
            src, d = image()
            r = skopeo_push(src, f"{c.replicas[writer - 1]}:5000/library/app:moving")
            assert r.returncode == 0, r.stderr
            for i in (1, 2, 3):
                assert manifest(c, i, "library/app", "moving")[:2] == (200, d), f"pushed through {writer}, stale on {i}"
        st, _, _ = HTTP.req("DELETE", c.url(2, "/v2/library/app/manifests/moving"))
        assert st == 202, st
        for i in (1, 2, 3):
            assert manifest(c, i, "library/app", "moving")[0] == 404, f"deleted through 2, still served by {i}"

    def concurrent():
        n = 4 if a.short else 12
        srcs = [image() for _ in range(n)]
        errors = []

        def push(k):
            for tag in (f"t{k}", "shared"):
                r = skopeo_push(srcs[k][0], f"{c.lb}/library/conc:{tag}", retries=2)
                if r.returncode != 0:
                    errors.append(r.stderr)

        ts = [threading.Thread(target=push, args=(k,)) for k in range(n)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        assert not errors, errors[:2]
        want = sorted([f"t{k}" for k in range(n)] + ["shared"])
        views = [whole(c, i, "library/conc") for i in (1, 2, 3)]
        for i, v in enumerate(views, 1):
            assert sorted(v) == want, f"replica {i} lost tags: {sorted(v)}"
        assert views[0] == views[1] == views[2], "replicas disagree"
        assert views[0]["shared"] in [d for _, d in srcs]

    def killed_mid_push():
        n = 6 if a.short else 16
        srcs = [image() for _ in range(n)]
        done, failed = [], []

        def pusher():
            for k in range(n):
                r = skopeo_push(srcs[k][0], f"{c.lb}/library/kill:k{k}", retries=5)
                (done if r.returncode == 0 else failed).append((k, r.stderr))

        t = threading.Thread(target=pusher)
        t.start()
        while len(done) < 2 and t.is_alive():
            time.sleep(0.05)
        c.kill("r2")
        t.join()
        assert not failed, f"pushes failed although clients retried: {failed[:2]}"
        want = {f"k{k}": d for k, (_, d) in enumerate(srcs)}
        for i in (1, 3):
            assert whole(c, i, "library/kill") == want, f"replica {i} after the kill"
        c.start_replica(2)
        c.wait_ready(2)
        assert whole(c, 2, "library/kill") == want, "the restarted replica"

    def cut_off():
        ns = "bcl3"
        rule = ["OUTPUT", "-p", "tcp", "-d", HOST_IP, "--dport", str(c.sport), "-j", "REJECT", "--reject-with", "tcp-reset"]
        sh("ip", "netns", "exec", ns, "iptables", "-I", *rule)
        try:
            c.wait_ready(3, want=503, secs=30)
            # Reads and writes on the cut-off replica: 503, never stale data
            # (each after the metadata server's query timeout).
            src, d = image()
            st, _, body = manifest(c, 3, "library/app", "v1")
            assert st == 503, f"a read on the cut-off replica answered {st}: {body[:200]}"
            _, _, known = manifest(c, 1, "library/app", "v1")
            st, _, body = HTTP.req("PUT", c.url(3, "/v2/library/app/manifests/copy"), body=known,
                                   headers={"content-type": OCI_MANIFEST})
            assert st == 503, f"a manifest PUT on the cut-off replica answered {st}: {body[:200]}"
            # The balancer routes around it.
            time.sleep(1)
            r = skopeo_push(src, f"{c.lb}/library/cut:v1", retries=3)
            assert r.returncode == 0, r.stderr
        finally:
            sh("ip", "netns", "exec", ns, "iptables", "-D", *rule)
        c.wait_ready(3, secs=60)
        assert manifest(c, 3, "library/cut", "v1")[:2] == (200, d), "reconnected, it does not serve what was pushed meanwhile"
        assert whole(c, 3, "library/cut") == {"v1": d}

    def tokens_everywhere():
        form = (f"grant_type=password&username=admin&password={ADMIN_PW}&service=berth"
                "&scope=repository:library/app:pull&client_id=cluster&access_type=offline").encode()
        for i in (1, 2, 3):
            st, _, body = HTTP.req("POST", c.url(i, "/auth/token"), body=form,
                                   headers={"content-type": "application/x-www-form-urlencoded", "authorization": ""})
            assert st == 200, f"replica {i}: the password grant answered {st}: {body[:300]}"
            token = json.loads(body)["access_token"]
            for j in (1, 2, 3):
                r = urllib.request.Request(c.url(j, "/v2/library/app/tags/list"), headers={"authorization": f"Bearer {token}"})
                with urllib.request.urlopen(r, timeout=10) as resp:
                    assert resp.status == 200, f"a token from replica {i} refused by {j}"

    def docker():
        if sh("docker", "info", check=False).returncode != 0:
            print("skip docker: no engine answers", flush=True)
            return
        rootfs = os.path.join(c.work, "rootfs.tar")
        with tarfile.open(rootfs, "w") as t:
            data = os.urandom(100_000)
            info = tarfile.TarInfo("hello")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        ref = f"{c.lb}/library/dock:v1"
        sh("docker", "import", rootfs, ref)
        sh("docker", "login", c.lb, "-u", "admin", "--password-stdin", input=ADMIN_PW)
        try:
            image_id = sh("docker", "image", "inspect", "-f", "{{.Id}}", ref).stdout.strip()
            sh("docker", "push", ref)
            sh("docker", "rmi", ref)
            sh("docker", "pull", ref)
            assert sh("docker", "image", "inspect", "-f", "{{.Id}}", ref).stdout.strip() == image_id
            for i in (1, 2, 3):
                assert manifest(c, i, "library/dock", "v1")[0] == 200
        finally:
            sh("docker", "rmi", ref, check=False)
            sh("docker", "logout", c.lb, check=False)

    check("an image pushed through the balancer is whole on every replica", through_balancer)
    check("a tag pushed, moved and deleted through one replica is seen by the others at once", across_replicas)
    check("concurrent pushes through the balancer lose no tag; replicas agree", concurrent)
    check("a replica killed mid-push: clients retry, nothing half-visible, restarted it serves all", killed_mid_push)
    check("a replica cut off from the database answers 503, then catches up", cut_off)
    check("a bearer token issued by any replica is honoured by every replica", tokens_everywhere)
    check("docker push and pull through the balancer", docker)


def wrk(url, conns, secs):
    """(req/s, p99 ms) of GETs of `url` as the admin."""
    out = sh("wrk", "-t2", f"-c{conns}", f"-d{secs}s", "--latency", "-H", f"Authorization: {HTTP.auth}",
             "-H", f"Accept: {OCI_MANIFEST}", url).stdout
    import re
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    m = re.search(r"99%\s+([\d.]+)(us|ms|s)", out)
    p99 = float(m.group(1)) * {"us": 0.001, "ms": 1, "s": 1000}[m.group(2)]
    return rps, p99


def bench(c, a):
    """One replica against three behind the balancer, on the same servers:
    manifest GET throughput and p99, and concurrent pushes; with the embedded
    store (no read barrier) beside them for the barrier's cost."""
    imgs = os.path.join(c.work, "images")
    src = os.path.join(imgs, "b")
    oci_layout(src, 1)
    assert skopeo_push(src, f"{c.lb}/bench/app:latest").returncode == 0
    # The embedded default, on the host, for comparison.
    port = free_port()
    env = berth_env(BERTH_ADMIN_PASSWORD=ADMIN_PW, BERTH_LOG="warn")
    c.spawn("embedded", [a.berth, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", os.path.join(c.work, "embedded")], env=env)
    for _ in range(200):
        if HTTP.req("GET", f"http://127.0.0.1:{port}/readyz")[0] == 200:
            break
        time.sleep(0.1)
    assert skopeo_push(src, f"127.0.0.1:{port}/bench/app:latest").returncode == 0
    rows = []
    path = "/v2/bench/app/manifests/latest"
    for name, url in [("embedded store, one process (no barrier)", f"http://127.0.0.1:{port}{path}"),
                      ("SurrealDB server, one replica (barrier)", c.url(1, path)),
                      ("SurrealDB server, three replicas behind HAProxy", c.url(0, path))]:
        rps, p99 = wrk(url, 64, a.secs)
        rows.append((f"manifest GET: {name}", f"{rps:,.0f} req/s", f"p99 {p99:.2f} ms"))
    c.kill("embedded")

    def pushes(dest_of, n=20):
        srcs = []
        for k in range(n):
            p = os.path.join(imgs, f"p{k}")
            oci_layout(p, 1000 + k, layers=3, size=200_000)
            srcs.append(p)
        t0 = time.time()
        ts = [threading.Thread(target=lambda k=k: skopeo_push(srcs[k], dest_of(k), retries=2)) for k in range(n)]
        [t.start() for t in ts]
        [t.join() for t in ts]
        return time.time() - t0

    one = pushes(lambda k: f"{c.replicas[0]}:5000/bench/one:{k}")
    three = pushes(lambda k: f"{c.lb}/bench/three:{k}")
    rows.append(("20 concurrent 3-layer pushes: one replica", f"{one:.1f} s", ""))
    rows.append(("20 concurrent 3-layer pushes: three replicas", f"{three:.1f} s", ""))
    print(f"cpus: {os.cpu_count()}; berth: {a.berth}")
    for r in rows:
        print(" | ".join(r))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--berth", required=True)
    p.add_argument("--surreal", required=True)
    p.add_argument("--garage", required=True)
    p.add_argument("--garage-up", required=True)
    p.add_argument("--short", action="store_true", help="fewer pushes (the form .ci/run runs)")
    p.add_argument("--keep", action="store_true", help="keep the work folder (logs)")
    p.add_argument("--bench", action="store_true", help="measure one replica against three instead of checking")
    p.add_argument("--secs", type=int, default=10, help="seconds per wrk run (--bench)")
    a = p.parse_args()
    work = tempfile.mkdtemp(prefix="berth-cluster.")
    c = Cluster(a, work)
    ok = False
    try:
        c.net_up()
        c.start_backends()
        for i in (1, 2, 3):
            c.start_replica(i)
        for i in (1, 2, 3):
            c.wait_ready(i)
        c.start_balancer()
        deadline = time.time() + 30
        while HTTP.req("GET", c.url(0, "/v2/"))[0] != 200:
            assert time.time() < deadline, "the balancer does not answer"
            time.sleep(0.2)
        if a.bench:
            bench(c, a)
        else:
            run(c, a)
            print("cluster: every check held", flush=True)
        ok = True
    finally:
        if not ok:
            for name in ("r1", "r2", "r3"):
                print(f"--- {name} log (tail) ---\n{c.log_tail(name)}", file=sys.stderr)
        for name in list(c.procs):
            c.kill(name)
        c.net_down()
        if ok and not a.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print(f"logs kept in {work}", file=sys.stderr)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
