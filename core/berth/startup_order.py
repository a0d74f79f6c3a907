#!/usr/bin/env python3
"""Regenerate core/berth/startup-order.txt.gz: the code and read-only data `berth
serve` touches from start to idle (then serving a push and a pull), in the order
the linker should place them.

Why: the release binary maps ~40 MiB of code. At start the disk's read-ahead puts
all of it in the page cache and every instruction-fetch fault maps its 64 KiB
neighbourhood (fault-around), so a function touched once anywhere in a window
keeps the whole window resident. build.rs hands this list to lld
(`--symbol-ordering-file`), which packs the start-up code together; idle RSS drops
by ~11 MiB. Names the linker no longer finds are skipped, so a stale list costs
only part of the gain; rerun this after dependency upgrades.

How: run a copy of the release binary with the block device's read-ahead off and
the copy dropped from the page cache, so only pages actually faulted become
resident; read the resident pages off /proc/<pid>/pagemap once it is idle; name
the symbols that overlap them. Needs root (read-ahead, pagemap) and Linux.

    cargo build --release -p berth && sudo core/berth/startup_order.py
"""
import base64
import bisect
import gzip
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "startup-order.txt.gz")
PORT = 5399
IDLE_SECS = 35


def read_ahead_file(path):
    """The sysfs read_ahead_kb of the block device holding `path` (whole disk)."""
    dev = os.stat(path).st_dev
    sys_dev = f"/sys/dev/block/{os.major(dev)}:{os.minor(dev)}"
    real = os.path.realpath(sys_dev)
    for d in (real, os.path.dirname(real)):
        f = os.path.join(d, "queue", "read_ahead_kb")
        if os.path.exists(f):
            return f
    sys.exit(f"no read_ahead_kb for {path} ({real})")


def resident_offsets(pid, path):
    """(permissions, file offset) of every resident page `pid` maps from `path`."""
    pages = []
    with open(f"/proc/{pid}/pagemap", "rb") as pm:
        for line in open(f"/proc/{pid}/maps"):
            f = line.split()
            if len(f) < 6 or f[5] != path:
                continue
            lo, hi = (int(x, 16) for x in f[0].split("-"))
            pm.seek(lo // 4096 * 8)
            data = pm.read((hi - lo) // 4096 * 8)
            for i in range(len(data) // 8):
                if struct.unpack_from("<Q", data, i * 8)[0] >> 63:
                    pages.append((f[1], int(f[2], 16) + i * 4096))
    return pages


def sections(binary):
    out = subprocess.run(["readelf", "-S", "-W", binary], capture_output=True, text=True, check=True).stdout
    secs = []
    for line in out.splitlines():
        m = re.match(r"\s*\[\s*\d+\]\s+(\S+)\s+\S+\s+([0-9a-f]+)\s+([0-9a-f]+)\s+([0-9a-f]+)", line)
        if m and int(m.group(2), 16):
            secs.append((int(m.group(3), 16), int(m.group(4), 16), int(m.group(2), 16)))
    return secs


def main():
    # Where cargo put the release binary (CARGO_TARGET_DIR, cargo config, or ./target).
    meta = subprocess.run(["cargo", "metadata", "--format-version", "1", "--no-deps"], cwd=HERE,
                          capture_output=True, text=True, check=True).stdout
    built = os.path.join(json.loads(meta)["target_directory"], "release", "berth")
    if not os.path.exists(built):
        sys.exit(f"{built} is missing: run `cargo build --release -p berth` first")
    work = tempfile.mkdtemp(prefix="berth-order.")
    binary = os.path.join(work, "berth")
    shutil.copy(built, binary)
    os.sync()
    fd = os.open(binary, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    ra = read_ahead_file(binary)
    saved = open(ra).read().strip()
    proc = None
    try:
        open(ra, "w").write("0")
        # As a first start usually runs: with an administrator to create.
        env = dict(os.environ, BERTH_LOG="warn", BERTH_ADMIN_PASSWORD="startup-order-probe-password")
        env.pop("BERTH_CONFIG", None)
        proc = subprocess.Popen([binary, "serve", "--listen", f"127.0.0.1:{PORT}", "--data-dir", os.path.join(work, "data")],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{PORT}/v2/", timeout=1)
                break
            except urllib.error.HTTPError:
                break  # 401: up
            except OSError:
                time.sleep(0.1)
        # Idle as long as a first start usually stays idle: the periodic tasks
        # (session expiry, the metadata engine's node heartbeat) run meanwhile.
        time.sleep(IDLE_SECS)
        idle_pages = resident_offsets(proc.pid, binary)
        # Then what every registry serves: a login, a push and a pull. Their code
        # goes right after the start-up code, so serving keeps few pages resident too.
        serve_a_push_and_pull(env["BERTH_ADMIN_PASSWORD"])
        time.sleep(1)
        served_pages = resident_offsets(proc.pid, binary)
    finally:
        open(ra, "w").write(saved)
        if proc:
            proc.terminate()
            proc.wait()

    secs = sections(binary)
    syms = []
    nm = subprocess.run(["nm", "-S", "--defined-only", binary], capture_output=True, text=True, check=True).stdout
    for line in nm.splitlines():
        p = line.split()
        if len(p) == 4 and p[2] in "tTrR":
            syms.append((int(p[0], 16), int(p[1], 16), p[3]))
    syms.sort()
    starts = [s[0] for s in syms]

    def touched_by(pages):
        touched = set()
        for _, off in pages:
            va = next((a + off - o for o, size, a in secs if o <= off < o + size), None)
            if va is None:
                continue
            i = max(bisect.bisect_right(starts, va) - 1, 0)
            while i < len(syms) and syms[i][0] < va + 4096:
                a, size, name = syms[i]
                if a + size > va:
                    touched.add((a, name))
                i += 1
        return touched

    at_idle = touched_by(idle_pages)
    serving = touched_by(served_pages) - at_idle
    names = [n for _, n in sorted(at_idle)] + [n for _, n in sorted(serving)]
    with gzip.GzipFile(OUT, "wb", compresslevel=9, mtime=0) as f:
        f.write(("\n".join(names) + "\n").encode())
    shutil.rmtree(work, ignore_errors=True)
    print(f"{len(idle_pages)} resident pages at idle, {len(served_pages)} after serving; "
          f"{len(at_idle)} + {len(serving)} symbols -> {OUT}")


def serve_a_push_and_pull(password):
    """Log in, push a blob and an image manifest, pull both, list tags and catalog."""
    base = f"http://127.0.0.1:{PORT}"
    auth = "Basic " + base64.b64encode(f"admin:{password}".encode()).decode()

    def call(method, path, body=b"", headers=None):
        r = urllib.request.Request(base + path, data=body if method in ("POST", "PUT", "PATCH") else None,
                                   method=method, headers={"Authorization": auth, **(headers or {})})
        with urllib.request.urlopen(r, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()

    call("GET", "/v2/")
    blobs = []
    for data in (b'{"architecture":"amd64","os":"linux"}', os.urandom(64 * 1024)):
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        _, h, _ = call("POST", "/v2/probe/app/blobs/uploads/")
        loc = urllib.parse.urlparse(h["Location"])
        target = loc.path + (f"?{loc.query}&" if loc.query else "?") + "digest=" + digest
        call("PUT", target, data, {"Content-Type": "application/octet-stream"})
        blobs.append((digest, len(data)))
    manifest = json.dumps({
        "schemaVersion": 2,
        "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blobs[0][0], "size": blobs[0][1]},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blobs[1][0], "size": blobs[1][1]}],
    }).encode()
    call("PUT", "/v2/probe/app/manifests/v1", manifest, {"Content-Type": "application/vnd.oci.image.manifest.v1+json"})
    call("GET", "/v2/probe/app/manifests/v1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    call("HEAD", "/v2/probe/app/manifests/v1", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    for digest, _ in blobs:
        call("GET", f"/v2/probe/app/blobs/{digest}")
    call("GET", "/v2/probe/app/tags/list")
    call("GET", "/v2/_catalog")


if __name__ == "__main__":
    main()
