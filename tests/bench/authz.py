#!/usr/bin/env python3
"""Authorization cost at scale (issue 17, item 5): a release Berth holding
10,000 repositories in 10 tenants with 1,000 public-repository rules; catalog,
tag and repository listings as an anonymous client and as a tenant user, from
4 concurrent clients. Prints p50 / p99 / max per case (target: p99 < 50 ms)."""
import argparse, base64, hashlib, http.client, json, threading, time

ap = argparse.ArgumentParser()
ap.add_argument("--addr", required=True)
ap.add_argument("--tenants", type=int, default=10)
ap.add_argument("--repos", type=int, default=1000, help="per tenant")
ap.add_argument("--public", type=int, default=100, help="public repositories per tenant")
ap.add_argument("--requests", type=int, default=100, help="per client and case")
ap.add_argument("--clients", type=int, default=4)
a = ap.parse_args()
host, port = a.addr.split(":")
ADMIN = "Basic " + base64.b64encode(b"admin:bench-admin-password").decode()
DEV = "Basic " + base64.b64encode(b"dev:dev-password-123").decode()


def req(conn, method, path, body=None, auth=ADMIN, ctype="application/json"):
    headers = {"Authorization": auth} if auth else {}
    if body is not None:
        headers["Content-Type"] = ctype
    conn.request(method, path, body=body, headers=headers)
    r = conn.getresponse()
    data = r.read()
    return r.status, data


def setup():
    c = http.client.HTTPConnection(host, int(port))
    for t in range(a.tenants):
        st, d = req(c, "POST", "/api/v1/tenants", json.dumps({"name": f"t{t}"}))
        assert st in (201, 409), d
    st, d = req(c, "POST", "/api/v1/tenants/t0/users", json.dumps({"name": "dev", "password": "dev-password-123", "role": "developer"}))
    assert st in (201, 409), d

    def fill(t):
        c = http.client.HTTPConnection(host, int(port))
        for i in range(a.repos):
            repo = f"t{t}/r{i}"
            blob = json.dumps({"repo": repo}).encode()
            dg = "sha256:" + hashlib.sha256(blob).hexdigest()
            st, d = req(c, "POST", f"/v2/{repo}/blobs/uploads/?digest={dg}", blob, ctype="application/octet-stream")
            assert st == 201, (st, d)
            m = json.dumps({"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": dg, "size": len(blob)},
                            "layers": []}).encode()
            st, d = req(c, "PUT", f"/v2/{repo}/manifests/v1", m, ctype="application/vnd.oci.image.manifest.v1+json")
            assert st == 201, (st, d)
            if i < a.public:
                st, d = req(c, "PATCH", f"/api/v1/repositories/{repo}", json.dumps({"public": True}))
                assert st == 200, (st, d)
    started = time.time()
    threads = [threading.Thread(target=fill, args=(t,)) for t in range(a.tenants)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    print(f"setup: {a.tenants * a.repos} repositories, {a.tenants * a.public} public rules in {time.time() - started:.0f} s", flush=True)


CASES = [
    ("catalog, tenant user, first page", DEV, "/v2/_catalog?n=100", 200),
    ("catalog, tenant user, past its tenant", DEV, "/v2/_catalog?n=100&last=t5/r500", 200),
    ("catalog, admin, a deep page", ADMIN, "/v2/_catalog?n=100&last=t7/r300", 200),
    ("tags, tenant user, own repository", DEV, "/v2/t0/r700/tags/list", 200),
    ("tags, anonymous, public repository", None, "/v2/t3/r5/tags/list", 200),
    ("tags, anonymous, private repository", None, "/v2/t3/r500/tags/list", 401),
    ("public repositories, anonymous (compat API)", None, "/registry/v1/repositories/public", 200),
    ("repositories, tenant user (API)", DEV, "/api/v1/repositories?limit=50", 200),
    ("repositories, tenant user, keyword (API)", DEV, "/api/v1/repositories?limit=50&keyword=r99", 200),
    ("repositories, admin, a deep page (API)", ADMIN, "/api/v1/repositories?limit=50&offset=9000", 200),
    ("repositories, admin, by pulls (API)", ADMIN, "/api/v1/repositories?limit=50&sort=pulls&order=desc", 200),
]


def measure(name, auth, path, want):
    times, errors = [], []
    lock = threading.Lock()

    def client():
        c = http.client.HTTPConnection(host, int(port))
        mine = []
        for _ in range(a.requests):
            t0 = time.perf_counter()
            st, d = req(c, "GET", path, auth=auth)
            mine.append(time.perf_counter() - t0)
            if st != want:
                errors.append((st, d[:200]))
        with lock:
            times.extend(mine)

    # Warm up (the user's password verification is cached after the first).
    c = http.client.HTTPConnection(host, int(port))
    for _ in range(3):
        req(c, "GET", path, auth=auth)
    threads = [threading.Thread(target=client) for _ in range(a.clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    times.sort()
    pct = lambda p: times[min(len(times) - 1, int(len(times) * p))] * 1000
    flag = "" if pct(0.99) < 50 else "  <-- over 50 ms"
    print(f"{name:45s} {len(times)} requests  p50 {pct(0.5):7.2f} ms  p99 {pct(0.99):7.2f} ms  max {times[-1] * 1000:7.2f} ms{flag}", flush=True)
    if errors:
        print(f"   {len(errors)} unexpected answers, e.g. {errors[0]}")


setup()
for case in CASES:
    measure(*case)
