#!/usr/bin/env python3
"""ORAS's Python client (oras-py, the ORAS project's SDK) against a running Berth.

    oras_client.py ADDR REPOSITORY USER TOKEN WORKDIR

Pushes an artifact of two files with a custom config media type (monolithic
uploads), then a signature-like artifact whose subject is the first (chunked
uploads), pulls both back and compares every file byte for byte, lists the
tags, and prints one JSON line for the caller to check against the server:
{"artifact": DIGEST, "artifact_size": N, "referrer": DIGEST, "tags": [...]}.
Exits non-zero on any difference.
"""
import json
import os
import sys

import oras.client
import oras.oci


def main():
    addr, repo, user, token, work = sys.argv[1:6]
    os.chdir(work)  # oras-py takes file paths relative to the working directory
    # Basic credentials on every request, which Berth's /v2/ takes as well as
    # bearer tokens: oras-py's token flow keeps the first token it gets (a pull
    # token from the first HEAD) and sends it again when a push needs a new one.
    # (Its login() goes through a docker engine.)
    client = oras.client.OrasClient(hostname=addr, insecure=True, auth_backend="basic")
    client.auth.set_basic_auth(user, token)

    os.makedirs("in", exist_ok=True)
    files = {"model.bin": os.urandom(3 * 1024 * 1024 + 17), "README.md": b"# an artifact\n"}
    for name, data in files.items():
        with open(os.path.join("in", name), "wb") as f:
            f.write(data)
    target = f"{addr}/{repo}:v1"
    r = client.push(
        target=target,
        files=["in/model.bin:application/vnd.example.model", "in/README.md:text/markdown"],
        manifest_config="in/README.md:application/vnd.example.model.config.v1+json",
        manifest_annotations={"org.opencontainers.image.description": "pushed by oras-py"},
        quiet=True,
    )
    artifact = r.headers["Docker-Content-Digest"]
    head = client.do_request(f"http://{addr}/v2/{repo}/manifests/{artifact}", "HEAD",
                             headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
    size = int(head.headers["Content-Length"])

    # A referrer of the artifact, uploaded in chunks.
    with open("in/signature.json", "wb") as f:
        f.write(json.dumps({"signed": artifact}).encode() * 4000)
    subject = oras.oci.Subject(mediaType="application/vnd.oci.image.manifest.v1+json", digest=artifact, size=size)
    r = client.push(
        target=f"{addr}/{repo}:sig",
        files=["in/signature.json:application/vnd.example.signature"],
        subject=subject,
        do_chunked=True,
        chunk_size=16 * 1024,
        quiet=True,
    )
    referrer = r.headers["Docker-Content-Digest"]
    if r.headers.get("OCI-Subject") != artifact:
        sys.exit(f"push with a subject answered OCI-Subject {r.headers.get('OCI-Subject')!r}, want {artifact}")

    for tag, names in (("v1", files), ("sig", {"signature.json": open("in/signature.json", "rb").read()})):
        out = f"out-{tag}"
        client.pull(target=f"{addr}/{repo}:{tag}", outdir=out)
        for name, data in names.items():
            got = open(os.path.join(out, name), "rb").read()
            if got != data:
                sys.exit(f"{tag}/{name}: pulled {len(got)} bytes differ from the {len(data)} pushed")
    tags = client.get_tags(f"{addr}/{repo}")
    print(json.dumps({"artifact": artifact, "artifact_size": size, "referrer": referrer, "tags": tags}))


if __name__ == "__main__":
    main()
