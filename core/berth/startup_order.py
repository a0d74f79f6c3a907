#!/usr/bin/env python3
"""Regenerate core/berth/startup-order.txt.gz: the code and read-only data `berth
serve` touches from start to idle, in the order the linker should place them.

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
import bisect
import gzip
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
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "startup-order.txt.gz")
PORT = 5399


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
        time.sleep(3)  # idle
        pages = resident_offsets(proc.pid, binary)
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
    names = [n for _, n in sorted(touched)]
    with gzip.GzipFile(OUT, "wb", compresslevel=9, mtime=0) as f:
        f.write(("\n".join(names) + "\n").encode())
    shutil.rmtree(work, ignore_errors=True)
    print(f"{len(pages)} resident pages, {len(names)} symbols -> {OUT}")


if __name__ == "__main__":
    main()
