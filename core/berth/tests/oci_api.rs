//! End-to-end tests of the OCI distribution API against the real `berth` binary.

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn base_endpoint_and_headers() {
    let dir = TempDir::new("base");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let r = c.get(s.url("/v2/")).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["docker-distribution-api-version"], "registry/2.0");
    assert!(r.headers().contains_key("x-request-id"));
    assert_eq!(c.head(s.url("/v2/")).send().await.unwrap().status(), 200);
    let r = c.get(s.url("/v2/_catalog")).send().await.unwrap();
    assert_eq!(r.json::<serde_json::Value>().await.unwrap(), json!({"repositories": []}));
}

#[tokio::test]
async fn chunked_upload_range_reads_and_cancel() {
    let dir = TempDir::new("chunked");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let data = bytes(7, 300_000);
    let digest = sha256(&data);

    let r = c.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    assert_eq!(r.headers()["range"], "0-0");
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert!(loc.starts_with("/v2/acme/app/blobs/uploads/"));
    let uuid = r.headers()["docker-upload-uuid"].to_str().unwrap().to_string();
    assert!(loc.ends_with(&uuid));

    // Three chunks with Content-Range, checking the status after each.
    let mut off = 0usize;
    for chunk in data[..250_000].chunks(100_000) {
        let r = c
            .patch(s.url(&loc))
            .header("content-type", "application/octet-stream")
            .header("content-range", format!("{}-{}", off, off + chunk.len() - 1))
            .body(chunk.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        off += chunk.len();
        assert_eq!(r.headers()["range"], format!("0-{}", off - 1).as_str());
        let st = c.get(s.url(&loc)).send().await.unwrap();
        assert_eq!(st.status(), 204);
        assert_eq!(st.headers()["range"], format!("0-{}", off - 1).as_str());
    }
    // An out-of-order chunk is refused with 416 and changes nothing.
    let r = c.patch(s.url(&loc)).header("content-range", "5-9").body(vec![0u8; 5]).send().await.unwrap();
    expect_error(r, 416, "BLOB_UPLOAD_INVALID", "out of order chunk").await;
    // Content-Range whose length disagrees with the body.
    let r = c.patch(s.url(&loc)).header("content-range", format!("{}-{}", off, off + 99)).body(vec![0u8; 5]).send().await.unwrap();
    expect_error(r, 416, "BLOB_UPLOAD_INVALID", "short chunk").await;
    // A wrong digest on close is DIGEST_INVALID and the blob never appears.
    let wrong = sha256(b"something else");
    let r = c.put(s.url(&format!("{loc}?digest={wrong}"))).body(data[off..].to_vec()).send().await.unwrap();
    expect_error(r, 400, "DIGEST_INVALID", "wrong digest").await;
    let r = c.head(s.url(&format!("/v2/acme/app/blobs/{wrong}"))).send().await.unwrap();
    assert_eq!(r.status(), 404);

    // Again, properly: PATCH then PUT with the final chunk.
    let r = c.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(s.url(&loc)).body(data[..123_457].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    // A final chunk on PUT with a Content-Range is held to the same order check as
    // a PATCH: placed anywhere but the current offset it is refused, and the
    // session stays usable.
    let put_final = |range: String| {
        c.put(s.url(&format!("{loc}?digest={digest}"))).header("content-range", range).body(data[123_457..].to_vec()).send()
    };
    let r = put_final(format!("{}-{}", 123_456, data.len() - 2)).await.unwrap();
    expect_error(r, 416, "BLOB_UPLOAD_INVALID", "final chunk out of order").await;
    assert_eq!(c.get(s.url(&loc)).send().await.unwrap().headers()["range"], "0-123456");
    let r = put_final(format!("{}-{}", 123_457, data.len() - 1)).await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], format!("/v2/acme/app/blobs/{digest}").as_str());
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    // The finished session is gone.
    let r = c.get(s.url(&loc)).send().await.unwrap();
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN", "finished session").await;

    let blob = format!("/v2/acme/app/blobs/{digest}");
    let r = c.head(s.url(&blob)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-length"], data.len().to_string().as_str());
    assert_eq!(r.headers()["docker-content-digest"], digest.as_str());
    let r = c.get(s.url(&blob)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().to_vec(), data);
    // Ranges.
    let r = c.get(s.url(&blob)).header("range", "bytes=10-19").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.headers()["content-range"], format!("bytes 10-19/{}", data.len()).as_str());
    assert_eq!(r.bytes().await.unwrap().to_vec(), data[10..20].to_vec());
    let r = c.get(s.url(&blob)).header("range", "bytes=-5").send().await.unwrap();
    assert_eq!(r.status(), 206);
    assert_eq!(r.bytes().await.unwrap().to_vec(), data[data.len() - 5..].to_vec());
    let r = c.get(s.url(&blob)).header("range", format!("bytes={}-", data.len())).send().await.unwrap();
    assert_eq!(r.headers()["content-range"], format!("bytes */{}", data.len()).as_str());
    expect_error(r, 416, "RANGE_INVALID", "unsatisfiable range").await;

    // Cancel a session.
    let r = c.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    c.patch(s.url(&loc)).body(vec![1u8; 10]).send().await.unwrap();
    assert_eq!(c.delete(s.url(&loc)).send().await.unwrap().status(), 204);
    expect_error(c.get(s.url(&loc)).send().await.unwrap(), 404, "BLOB_UPLOAD_UNKNOWN", "cancelled").await;
    assert_eq!(s.staged_uploads().await, 0, "staging left behind");
}

#[tokio::test]
async fn sha512_digests() {
    let dir = TempDir::new("sha512");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let data = bytes(3, 5000);
    let d512 = {
        use sha2::Digest as _;
        format!("sha512:{}", hex::encode(sha2::Sha512::digest(&data)))
    };
    // Monolithic.
    let r = c.post(s.url(&format!("/v2/x/blobs/uploads/?digest={d512}"))).body(data.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    // Chunked session (hashed as sha256 while streaming) closed with a sha512 digest.
    let r = c.post(s.url("/v2/y/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    c.patch(s.url(&loc)).body(data[..100].to_vec()).send().await.unwrap();
    let r = c.put(s.url(&format!("{loc}?digest={d512}"))).body(data[100..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    for repo in ["x", "y"] {
        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{d512}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.bytes().await.unwrap().to_vec(), data);
    }
}

#[tokio::test]
async fn manifests_by_tag_and_digest() {
    let dir = TempDir::new("manifests");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let repo = "acme/web/api";
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let cd = push_blob(&c, &s, repo, &config).await;
    let layer = bytes(1, 4096);
    let ld = push_blob(&c, &s, repo, &layer).await;
    let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({}));
    let md = put_manifest(&c, &s, repo, "v1", OCI_MANIFEST, &m).await;

    for reference in ["v1", md.as_str()] {
        let r = c.get(s.url(&format!("/v2/{repo}/manifests/{reference}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-type"], OCI_MANIFEST);
        assert_eq!(r.headers()["docker-content-digest"], md.as_str());
        assert_eq!(r.bytes().await.unwrap().to_vec(), m);
        let r = c.head(s.url(&format!("/v2/{repo}/manifests/{reference}"))).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["content-length"], m.len().to_string().as_str());
    }
    // PUT by digest, and a digest that does not match the body.
    let m2 = image_manifest((&cd, config.len()), &[(&ld, layer.len())], json!({"annotations": {"a": "b"}}));
    let d2 = sha256(&m2);
    let d2b = put_manifest(&c, &s, repo, &d2, OCI_MANIFEST, &m2).await;
    assert_eq!(d2, d2b);
    let r = c.put(s.url(&format!("/v2/{repo}/manifests/{md}"))).header("content-type", OCI_MANIFEST).body(m2.clone()).send().await.unwrap();
    expect_error(r, 400, "DIGEST_INVALID", "manifest digest mismatch").await;

    // Unknown blobs and unknown children.
    let missing = sha256(b"missing");
    let bad = image_manifest((&cd, config.len()), &[(&missing, 7)], json!({}));
    let bad_digest = sha256(&bad);
    let r = c.put(s.url(&format!("/v2/{repo}/manifests/bad"))).header("content-type", OCI_MANIFEST).body(bad).send().await.unwrap();
    expect_error(r, 400, "MANIFEST_BLOB_UNKNOWN", "missing layer").await;
    // Refused before anything was stored: its bytes are nowhere on disk.
    assert!(!s.has_blob(&bad_digest).await, "a refused manifest's bytes stay unwritten");
    // A blob of another repository does not count.
    let other = push_blob(&c, &s, "other/repo", b"other layer").await;
    let bad = image_manifest((&cd, config.len()), &[(&other, 11)], json!({}));
    let r = c.put(s.url(&format!("/v2/{repo}/manifests/bad"))).header("content-type", OCI_MANIFEST).body(bad).send().await.unwrap();
    expect_error(r, 400, "MANIFEST_BLOB_UNKNOWN", "layer from another repo").await;
    let index = |children: &[(&str, usize)]| {
        serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_INDEX,
            "manifests": children.iter().map(|(d, n)| json!({"mediaType": OCI_MANIFEST, "digest": d, "size": n,
                "platform": {"architecture": "amd64", "os": "linux"}})).collect::<Vec<_>>()
        }))
        .unwrap()
    };
    let r = c
        .put(s.url(&format!("/v2/{repo}/manifests/multi")))
        .header("content-type", OCI_INDEX)
        .body(index(&[(&missing, 5)]))
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "MANIFEST_BLOB_UNKNOWN", "missing child").await;
    let idx = index(&[(&md, m.len()), (&d2, m2.len())]);
    let id = put_manifest(&c, &s, repo, "multi", OCI_INDEX, &idx).await;
    let r = c.get(s.url(&format!("/v2/{repo}/manifests/multi"))).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert_eq!(r.headers()["docker-content-digest"], id.as_str());

    // Docker schema 2 media types round-trip.
    let mut dm: serde_json::Value = serde_json::from_slice(&m).unwrap();
    dm["mediaType"] = "application/vnd.docker.distribution.manifest.v2+json".into();
    dm["config"]["mediaType"] = "application/vnd.docker.container.image.v1+json".into();
    let dm = serde_json::to_vec(&dm).unwrap();
    put_manifest(&c, &s, repo, "docker", "application/vnd.docker.distribution.manifest.v2+json", &dm).await;
    let r = c.get(s.url(&format!("/v2/{repo}/manifests/docker"))).send().await.unwrap();
    assert_eq!(r.headers()["content-type"], "application/vnd.docker.distribution.manifest.v2+json");

    // Schema 1 and oversize manifests are refused clearly.
    let r = c
        .put(s.url(&format!("/v2/{repo}/manifests/old")))
        .header("content-type", "application/vnd.docker.distribution.manifest.v1+prettyjws")
        .body(r#"{"schemaVersion":1,"name":"x","tag":"old","fsLayers":[]}"#)
        .send()
        .await
        .unwrap();
    expect_error(r, 400, "MANIFEST_INVALID", "schema 1").await;
    let r = c
        .put(s.url(&format!("/v2/{repo}/manifests/huge")))
        .header("content-type", OCI_MANIFEST)
        .body(vec![b' '; 4 * 1024 * 1024 + 1])
        .send()
        .await
        .unwrap();
    expect_error(r, 413, "MANIFEST_INVALID", "oversize").await;

    // Tag delete keeps the manifest; digest delete removes it and its tags.
    let r =
        c.put(s.url(&format!("/v2/{repo}/manifests/v1-alias"))).header("content-type", OCI_MANIFEST).body(m.clone()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(c.delete(s.url(&format!("/v2/{repo}/manifests/v1-alias"))).send().await.unwrap().status(), 202);
    expect_error(c.get(s.url(&format!("/v2/{repo}/manifests/v1-alias"))).send().await.unwrap(), 404, "MANIFEST_UNKNOWN", "deleted tag")
        .await;
    assert_eq!(c.get(s.url(&format!("/v2/{repo}/manifests/{md}"))).send().await.unwrap().status(), 200);
    assert_eq!(c.delete(s.url(&format!("/v2/{repo}/manifests/{md}"))).send().await.unwrap().status(), 202);
    expect_error(c.get(s.url(&format!("/v2/{repo}/manifests/v1"))).send().await.unwrap(), 404, "MANIFEST_UNKNOWN", "tag of deleted").await;
    expect_error(c.delete(s.url(&format!("/v2/{repo}/manifests/{md}"))).send().await.unwrap(), 404, "MANIFEST_UNKNOWN", "twice").await;
    let tags: serde_json::Value = c.get(s.url(&format!("/v2/{repo}/tags/list"))).send().await.unwrap().json().await.unwrap();
    assert_eq!(tags, json!({"name": repo, "tags": ["docker", "multi"]}));
}

#[tokio::test]
async fn referrers_and_subject() {
    let dir = TempDir::new("referrers");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let repo = "sig/app";
    let subject = push_image(&c, &s, repo, "v1", 1, json!({})).await;
    let size = c.head(s.url(&format!("/v2/{repo}/manifests/v1"))).send().await.unwrap().headers()["content-length"]
        .to_str()
        .unwrap()
        .parse::<u64>()
        .unwrap();
    // Two artifacts pointing at the image, of different artifact types.
    let empty = push_blob(&c, &s, repo, b"{}").await;
    let mut digests = vec![];
    for (i, at) in ["application/vnd.example.sig", "application/vnd.example.sbom"].iter().enumerate() {
        let layer = push_blob(&c, &s, repo, format!("artifact {i}").as_bytes()).await;
        let body = serde_json::to_vec(&json!({
            "schemaVersion": 2, "mediaType": OCI_MANIFEST, "artifactType": at,
            "config": {"mediaType": "application/vnd.oci.empty.v1+json", "digest": empty, "size": 2},
            "layers": [{"mediaType": "application/octet-stream", "digest": layer, "size": 10}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": subject, "size": size},
            "annotations": {"n": i.to_string()}
        }))
        .unwrap();
        let d = sha256(&body);
        let r = c.put(s.url(&format!("/v2/{repo}/manifests/{d}"))).header("content-type", OCI_MANIFEST).body(body).send().await.unwrap();
        assert_eq!(r.status(), 201);
        assert_eq!(r.headers()["oci-subject"], subject.as_str());
        digests.push(d);
    }
    let r = c.get(s.url(&format!("/v2/{repo}/referrers/{subject}"))).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], OCI_INDEX);
    assert!(r.headers().get("oci-filters-applied").is_none());
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["schemaVersion"], 2);
    assert_eq!(v["mediaType"], OCI_INDEX);
    let got: Vec<&str> = v["manifests"].as_array().unwrap().iter().map(|m| m["digest"].as_str().unwrap()).collect();
    let mut want = digests.iter().map(String::as_str).collect::<Vec<_>>();
    want.sort();
    assert_eq!(got, want);
    assert!(v["manifests"][0]["artifactType"].is_string());
    assert!(v["manifests"][0]["annotations"]["n"].is_string());

    let r = c.get(s.url(&format!("/v2/{repo}/referrers/{subject}?artifactType=application/vnd.example.sbom"))).send().await.unwrap();
    assert_eq!(r.headers()["oci-filters-applied"], "artifactType");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["manifests"].as_array().unwrap().len(), 1);
    assert_eq!(v["manifests"][0]["digest"], digests[1].as_str());
    assert_eq!(v["manifests"][0]["artifactType"], "application/vnd.example.sbom");

    // No referrers, or an unknown repository: an empty index, never 404.
    for path in [format!("/v2/{repo}/referrers/{}", sha256(b"none")), format!("/v2/nobody/referrers/{subject}")] {
        let r = c.get(s.url(&path)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let v: serde_json::Value = r.json().await.unwrap();
        assert_eq!(v["manifests"], json!([]));
    }
    expect_error(c.get(s.url(&format!("/v2/{repo}/referrers/v1"))).send().await.unwrap(), 400, "DIGEST_INVALID", "tag as referrers digest")
        .await;
}

#[tokio::test]
async fn pagination_of_catalog_and_tags() {
    let dir = TempDir::new("pages");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let d = push_image(&c, &s, "p/one", "t00", 1, json!({})).await;
    let m = c.get(s.url(&format!("/v2/p/one/manifests/{d}"))).send().await.unwrap().bytes().await.unwrap().to_vec();
    for i in 1..25 {
        put_manifest(&c, &s, "p/one", &format!("t{i:02}"), OCI_MANIFEST, &m).await;
    }
    for r in ["p/two", "p/three", "a", "z/z"] {
        push_blob(&c, &s, r, b"x").await;
    }
    // Walk tags with n=10 following Link headers.
    let mut url = "/v2/p/one/tags/list?n=10".to_string();
    let mut all = vec![];
    let mut pages = 0;
    loop {
        let r = c.get(s.url(&url)).send().await.unwrap();
        assert_eq!(r.status(), 200);
        let link = r.headers().get("link").map(|l| l.to_str().unwrap().to_string());
        let v: serde_json::Value = r.json().await.unwrap();
        all.extend(v["tags"].as_array().unwrap().iter().map(|t| t.as_str().unwrap().to_string()));
        pages += 1;
        match link {
            Some(l) => url = l.trim_start_matches('<').split('>').next().unwrap().to_string(),
            None => break,
        }
    }
    assert_eq!(pages, 3);
    assert_eq!(all, (0..25).map(|i| format!("t{i:02}")).collect::<Vec<_>>());
    let v: serde_json::Value = c.get(s.url("/v2/p/one/tags/list?n=2&last=t10")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], json!(["t11", "t12"]));
    let v: serde_json::Value = c.get(s.url("/v2/p/one/tags/list?n=0")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["tags"], json!([]));

    let r = c.get(s.url("/v2/_catalog?n=2")).send().await.unwrap();
    assert_eq!(r.headers()["link"], "</v2/_catalog?n=2&last=p/one>; rel=\"next\"");
    let v: serde_json::Value = r.json().await.unwrap();
    assert_eq!(v["repositories"], json!(["a", "p/one"]));
    let v: serde_json::Value = c.get(s.url("/v2/_catalog?n=10&last=p/one")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"], json!(["p/three", "p/two", "z/z"]));

    expect_error(c.get(s.url("/v2/_catalog?n=-1")).send().await.unwrap(), 400, "PAGINATION_NUMBER_INVALID", "n=-1").await;
    expect_error(c.get(s.url("/v2/p/one/tags/list?n=abc")).send().await.unwrap(), 400, "PAGINATION_NUMBER_INVALID", "n=abc").await;
    expect_error(c.get(s.url("/v2/nope/tags/list")).send().await.unwrap(), 404, "NAME_UNKNOWN", "unknown repo tags").await;
}

#[tokio::test]
async fn cross_repository_mount_and_blob_delete() {
    let dir = TempDir::new("mount");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let d = push_blob(&c, &s, "src/repo", b"shared layer").await;
    let r = c.post(s.url(&format!("/v2/dst/repo/blobs/uploads/?mount={d}&from=src/repo"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(r.headers()["location"], format!("/v2/dst/repo/blobs/{d}").as_str());
    assert_eq!(c.get(s.url(&format!("/v2/dst/repo/blobs/{d}"))).send().await.unwrap().bytes().await.unwrap().as_ref(), b"shared layer");
    // Not mountable: unknown source, blob not in source, invalid source name.
    for from in ["nowhere", "dst/repo", "Bad..Name"] {
        let other = sha256(from.as_bytes());
        let r = c.post(s.url(&format!("/v2/third/blobs/uploads/?mount={other}&from={from}"))).send().await.unwrap();
        assert_eq!(r.status(), 202, "{from}");
        assert!(r.headers()["location"].to_str().unwrap().starts_with("/v2/third/blobs/uploads/"));
    }
    // Blob delete unlinks from one repository only.
    assert_eq!(c.delete(s.url(&format!("/v2/dst/repo/blobs/{d}"))).send().await.unwrap().status(), 202);
    expect_error(c.get(s.url(&format!("/v2/dst/repo/blobs/{d}"))).send().await.unwrap(), 404, "BLOB_UNKNOWN", "deleted").await;
    expect_error(c.delete(s.url(&format!("/v2/dst/repo/blobs/{d}"))).send().await.unwrap(), 404, "BLOB_UNKNOWN", "twice").await;
    assert_eq!(c.get(s.url(&format!("/v2/src/repo/blobs/{d}"))).send().await.unwrap().status(), 200);
    // A digest that exists elsewhere is not readable through a repository without it.
    push_blob(&c, &s, "third", b"third's own").await;
    expect_error(c.get(s.url(&format!("/v2/third/blobs/{d}"))).send().await.unwrap(), 404, "BLOB_UNKNOWN", "guessing").await;
}

#[tokio::test]
async fn concurrent_pushes_of_one_tag_are_atomic() {
    let dir = TempDir::new("race");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let repo = "race/app";
    let config = b"{}".to_vec();
    let cd = push_blob(&c, &s, repo, &config).await;
    let mut manifests = vec![];
    for i in 0..16u64 {
        let layer = bytes(i, 100);
        let ld = push_blob(&c, &s, repo, &layer).await;
        manifests.push(image_manifest((&cd, 2), &[(&ld, 100)], json!({})));
    }
    let tasks: Vec<_> = manifests
        .iter()
        .cloned()
        .map(|m| {
            let c = c.clone();
            let url = s.url(&format!("/v2/{repo}/manifests/latest"));
            tokio::spawn(async move {
                let r = c.put(url).header("content-type", OCI_MANIFEST).body(m).send().await.unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    // The tag points at exactly one of the pushed manifests, served whole.
    let r = c.get(s.url(&format!("/v2/{repo}/manifests/latest"))).send().await.unwrap();
    let d = r.headers()["docker-content-digest"].to_str().unwrap().to_string();
    let body = r.bytes().await.unwrap().to_vec();
    assert_eq!(sha256(&body), d);
    assert!(manifests.contains(&body));
    for m in &manifests {
        assert_eq!(c.head(s.url(&format!("/v2/{repo}/manifests/{}", sha256(m)))).send().await.unwrap().status(), 200);
    }
}

#[tokio::test]
async fn resumable_upload_across_restart_and_durable_metadata() {
    let dir = TempDir::new("restart");
    let data = bytes(9, 200_000);
    let digest = sha256(&data);
    let c = client();
    let mut s = Server::start_in(dir.path(), &[]);
    let manifest = push_image(&c, &s, "keep/me", "v1", 4, json!({})).await;
    let r = c.post(s.url("/v2/keep/me/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(s.url(&loc)).header("content-range", "0-99999").body(data[..100_000].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let port = s.addr.clone();
    s.stop();

    // Same data dir, same port: the client resumes where it was (on a new connection).
    let s = Server::start_at(dir.path(), &port, &[]);
    let c = client();
    let st = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(st.status(), 204);
    assert_eq!(st.headers()["range"], "0-99999");
    let r = c.patch(s.url(&loc)).header("content-range", "100000-149999").body(data[100_000..150_000].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let r = c.put(s.url(&format!("{loc}?digest={digest}"))).body(data[150_000..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 201);
    assert_eq!(c.get(s.url(&format!("/v2/keep/me/blobs/{digest}"))).send().await.unwrap().bytes().await.unwrap().to_vec(), data);
    // What was pushed before the restart is still there.
    let r = c.get(s.url("/v2/keep/me/manifests/v1")).send().await.unwrap();
    assert_eq!(r.headers()["docker-content-digest"], manifest.as_str());
    let v: serde_json::Value = c.get(s.url("/v2/_catalog")).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["repositories"], json!(["keep/me"]));
}

#[tokio::test]
async fn abandoned_uploads_expire() {
    let dir = TempDir::new("expire");
    let cfg = dir.path().join("berth.toml");
    std::fs::write(&cfg, "[registry]\nupload_ttl_secs = 1\nupload_sweep_secs = 1\n").unwrap();
    let s = Server::start_in(dir.path(), &[("BERTH_CONFIG", cfg.to_str().unwrap())]);
    let c = client();
    let r = c.post(s.url("/v2/e/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    assert_eq!(c.patch(s.url(&loc)).body(vec![7u8; 1000]).send().await.unwrap().status(), 202);
    assert_eq!(s.staged_uploads().await, 1);
    let mut gone = false;
    for _ in 0..50 {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        if c.get(s.url(&loc)).send().await.unwrap().status() == 404 && s.staged_uploads().await == 0 {
            gone = true;
            break;
        }
    }
    assert!(gone, "session and staging should expire");
}

/// A full disk: the chunk that finds it is told so (`507`, not an opaque `500`),
/// nothing of that chunk is kept, the session stays where it was, and once
/// there is room again the upload goes on and the registry serves as before.
/// Runs where the test may mount a small tmpfs (as root), on the filesystem
/// store (`BERTH_TEST_STORAGE=s3` puts blobs elsewhere).
#[tokio::test]
async fn a_full_disk_is_told_and_keeps_nothing() {
    if std::env::var("BERTH_TEST_STORAGE").as_deref() == Ok("s3") {
        return;
    }
    let dir = TempDir::new("full");
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let mount = std::process::Command::new("mount").args(["-t", "tmpfs", "-o", "size=40m", "tmpfs"]).arg(&data).output();
    if !mount.is_ok_and(|o| o.status.success()) {
        eprintln!("skipped: no tmpfs can be mounted here (needs root)");
        return;
    }
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(data.clone());
    let mut s = Server::start_in(&data, &[]);
    let c = client();
    push_image(&c, &s, "full/disk", "v1", 5, json!({})).await;

    // 64 MiB in 1 MiB chunks into 40 MiB: one chunk finds the disk full.
    let big = bytes(3, 64 << 20);
    let r = c.post(s.url("/v2/full/disk/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let patch = |offset: usize| {
        let end = offset + (1 << 20);
        c.patch(s.url(&loc)).header("content-range", format!("{offset}-{}", end - 1)).body(big[offset..end].to_vec()).send()
    };
    let mut offset = 0;
    let refused = loop {
        assert!(offset < big.len(), "64 MiB fitted in a 40 MiB disk");
        let r = patch(offset).await.unwrap();
        if r.status() != 202 {
            break r;
        }
        offset += 1 << 20;
    };
    assert_eq!(refused.status(), 507);
    let body: serde_json::Value = refused.json().await.unwrap();
    assert_eq!(body["errors"][0]["code"], "UNAVAILABLE", "{body}");
    assert!(body["errors"][0]["detail"].as_str().unwrap().contains("storage is full"), "{body}");
    // The session is where the last acknowledged chunk left it.
    let st = c.get(s.url(&loc)).send().await.unwrap();
    assert_eq!(st.status(), 204);
    assert_eq!(st.headers()["range"], format!("0-{}", offset - 1).as_str());
    assert_eq!(c.get(s.url("/v2/full/disk/manifests/v1")).send().await.unwrap().status(), 200);

    // Room again (the operator grows the disk): the upload resumes and completes.
    let grown = std::process::Command::new("mount").args(["-o", "remount,size=200m"]).arg(&data).status().unwrap();
    assert!(grown.success());
    while offset < big.len() {
        let r = patch(offset).await.unwrap();
        assert_eq!(r.status(), 202, "{:?}", r.text().await);
        offset += 1 << 20;
    }
    let d = sha256(&big);
    assert_eq!(c.put(s.url(&format!("{loc}?digest={d}"))).send().await.unwrap().status(), 201);
    let got = c.get(s.url(&format!("/v2/full/disk/blobs/{d}"))).send().await.unwrap().bytes().await.unwrap();
    assert!(got == big, "the blob reads back as pushed");
    s.stop();
}

#[tokio::test]
async fn bad_input_gets_spec_errors() {
    let dir = TempDir::new("bad");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    push_image(&c, &s, "ok/repo", "v1", 1, json!({})).await;
    let d = sha256(b"x");
    let uuid = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
    type Case = (&'static str, String, Vec<(&'static str, &'static str)>, Vec<u8>, u16, &'static str);
    let cases: Vec<Case> = vec![
        ("GET", "/v2/UPPER/tags/list".into(), vec![], vec![], 400, "NAME_INVALID"),
        ("GET", "/v2/a..b/manifests/latest".into(), vec![], vec![], 400, "NAME_INVALID"),
        ("GET", format!("/v2/{}/tags/list", "a".repeat(256)), vec![], vec![], 400, "NAME_INVALID"),
        // Neither a tag nor a digest: unknown to a GET (as Distribution and the
        // OCI conformance suite expect), an invalid tag to a PUT.
        ("GET", "/v2/ok/repo/manifests/bad!tag".into(), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("DELETE", "/v2/ok/repo/manifests/bad!tag".into(), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/ok/repo/manifests/bad!tag".into(), vec![("content-type", OCI_MANIFEST)], b"{}".to_vec(), 400, "TAG_INVALID"),
        ("GET", "/v2/ok/repo/manifests/sha256:123".into(), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/ok/repo/manifests/sha256:123".into(), vec![("content-type", OCI_MANIFEST)], b"{}".to_vec(), 400, "DIGEST_INVALID"),
        ("GET", "/v2/ok/repo/manifests/md5:d41d8cd98f00b204e9800998ecf8427e".into(), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("PUT", "/v2/ok/repo/manifests/md5:d41d8cd98f00b204e9800998ecf8427e".into(), vec![("content-type", OCI_MANIFEST)], b"{}".to_vec(), 400, "UNSUPPORTED"),
        ("GET", "/v2/ok/repo/manifests/nope".into(), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/no/repo/manifests/v1".into(), vec![], vec![], 404, "NAME_UNKNOWN"),
        ("GET", format!("/v2/ok/repo/blobs/{d}"), vec![], vec![], 404, "BLOB_UNKNOWN"),
        ("GET", "/v2/ok/repo/blobs/sha256:zz".into(), vec![], vec![], 400, "DIGEST_INVALID"),
        ("GET", "/v2/ok/repo/blobs/uploads/not-a-uuid".into(), vec![], vec![], 404, "BLOB_UPLOAD_UNKNOWN"),
        ("GET", format!("/v2/ok/repo/blobs/uploads/{uuid}"), vec![], vec![], 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PATCH", format!("/v2/ok/repo/blobs/uploads/{uuid}"), vec![], b"abc".to_vec(), 404, "BLOB_UPLOAD_UNKNOWN"),
        ("PUT", format!("/v2/ok/repo/blobs/uploads/{uuid}?digest={d}"), vec![], vec![], 404, "BLOB_UPLOAD_UNKNOWN"),
        ("DELETE", format!("/v2/ok/repo/blobs/uploads/{uuid}"), vec![], vec![], 404, "BLOB_UPLOAD_UNKNOWN"),
        ("POST", "/v2/ok/repo/blobs/uploads/?digest=sha256:nothex".into(), vec![], b"x".to_vec(), 400, "DIGEST_INVALID"),
        ("POST", format!("/v2/ok/repo/blobs/uploads/?digest={}", sha256(b"y")), vec![], b"x".to_vec(), 400, "DIGEST_INVALID"),
        ("POST", "/v2/ok/repo/blobs/uploads/?mount=garbage&from=ok/repo".into(), vec![], vec![], 400, "DIGEST_INVALID"),
        ("PUT", "/v2/ok/repo/manifests/v2".into(), vec![("content-type", OCI_MANIFEST)], b"{not json".to_vec(), 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/ok/repo/manifests/v2".into(), vec![("content-type", OCI_MANIFEST)], vec![], 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/ok/repo/manifests/v2".into(), vec![("content-type", OCI_MANIFEST)], b"[]".to_vec(), 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/ok/repo/manifests/v2".into(), vec![("content-type", "text/plain")], br#"{"schemaVersion":2,"config":{"mediaType":"a","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":1},"layers":[]}"#.to_vec(), 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/ok/repo/manifests/v2".into(), vec![("content-type", OCI_MANIFEST)], br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a","digest":"sha256:00","size":1},"layers":[]}"#.to_vec(), 400, "MANIFEST_INVALID"),
        ("PUT", "/v2/ok/repo/manifests/v2".into(), vec![("content-type", OCI_MANIFEST)], br#"{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{"mediaType":"a","digest":"sha256:0000000000000000000000000000000000000000000000000000000000000000","size":-5},"layers":[]}"#.to_vec(), 400, "MANIFEST_INVALID"),
        ("PUT", format!("/v2/ok/repo/manifests/{}", "t".repeat(129)), vec![("content-type", OCI_MANIFEST)], b"{}".to_vec(), 400, "TAG_INVALID"),
        ("GET", format!("/v2/ok/repo/manifests/{}", "t".repeat(129)), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("DELETE", "/v2/ok/repo/manifests/nope".into(), vec![], vec![], 404, "MANIFEST_UNKNOWN"),
        ("GET", "/v2/_catalog?n=x".into(), vec![], vec![], 400, "PAGINATION_NUMBER_INVALID"),
        ("GET", "/v2/ok/repo".into(), vec![], vec![], 404, "UNSUPPORTED"),
        ("GET", "/v3/".into(), vec![], vec![], 404, "UNSUPPORTED"),
        ("POST", "/v2/ok/repo/manifests/v1".into(), vec![], vec![], 405, "UNSUPPORTED"),
        ("PATCH", "/v2/_catalog".into(), vec![], vec![], 405, "UNSUPPORTED"),
    ];
    for (method, path, headers, body, status, code) in cases {
        let mut rb = c.request(method.parse().unwrap(), s.url(&path));
        for (k, v) in headers {
            rb = rb.header(k, v);
        }
        let r = rb.body(body).send().await.unwrap();
        expect_error(r, status, code, &format!("{method} {path}")).await;
    }
    // Malformed Content-Range and PUT without digest on a live session.
    let r = c.post(s.url("/v2/ok/repo/blobs/uploads/")).send().await.unwrap();
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(s.url(&loc)).header("content-range", "banana").body("x").send().await.unwrap();
    expect_error(r, 416, "BLOB_UPLOAD_INVALID", "bad content-range").await;
    let r = c.put(s.url(&loc)).send().await.unwrap();
    expect_error(r, 400, "DIGEST_INVALID", "put without digest").await;
    // A session belongs to its repository.
    let id = loc.rsplit('/').next().unwrap();
    let r = c.get(s.url(&format!("/v2/ok/other/blobs/uploads/{id}"))).send().await.unwrap();
    expect_error(r, 404, "BLOB_UPLOAD_UNKNOWN", "session of another repo").await;
    // Request heads no HTTP client would send get a 400 and a closed connection.
    for head in [
        &b"GET /v2/ HTTP/1.1\r\nHost: x\r\nbad header line\r\n\r\n"[..],
        b"GET /v2/ HTTP/1.1\r\nHo st: x\r\n\r\n",
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",
    ] {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        tcp.write_all(head).await.unwrap();
        let mut answer = Vec::new();
        tcp.read_to_end(&mut answer).await.unwrap();
        assert!(answer.starts_with(b"HTTP/1.1 400 "), "{:?} -> {:?}", String::from_utf8_lossy(head), String::from_utf8_lossy(&answer));
    }
    // The server is still healthy after all of that.
    assert_eq!(c.get(s.url("/v2/ok/repo/manifests/v1")).send().await.unwrap().status(), 200);
}

/// One pusher cannot keep memory: annotations (up to a manifest's size each,
/// at the pusher's choice) are not held by the read index. 100 manifests with
/// 1 MiB of annotations each leave the resident memory where it was (held in the
/// index they took 100 MiB and more), while the referrers listing still gives
/// every referrer's annotations, before and after a restart.
#[test]
fn annotations_do_not_stay_resident() {
    let dir = TempDir::new("annotations");
    // The metadata engine's own memory (its write buffers and block cache, which
    // hold what was just written) is bounded by configuration: small here, so
    // that what is measured is what Berth keeps.
    let config = format!("[metadata]\nurl = \"surrealkv://{}/data/meta\"\ncache_mib = 4\nmemtable_mib = 4\n", dir.path().display());
    let mut s = Server::start_configured(&dir, &config);
    let c = client();
    let subject = block_on(async {
        let subject = push_image(&c, &s, "library/big", "v1", 1, json!({})).await;
        let config = b"{}".to_vec();
        let cd = push_blob(&c, &s, "library/big", &config).await;
        let layer = bytes(7, 512);
        let ld = push_blob(&c, &s, "library/big", &layer).await;
        // Settle the allocator first: memory is read after it has been quiet.
        tokio::time::sleep(std::time::Duration::from_secs(5)).await;
        let before = metric(&s, "berth_process_resident_memory_bytes").await;
        for i in 0..100u64 {
            // Distinct text each time (no sharing), 1 MiB per manifest.
            let note: String = bytes(1000 + i, 768 * 1024).iter().map(|b| char::from(b'a' + b % 26)).collect();
            let mut extra = json!({"annotations": {"note": note, "n": i.to_string()}});
            if i < 3 {
                extra["subject"] = json!({"mediaType": OCI_MANIFEST, "digest": subject, "size": 1});
            }
            let m = image_manifest((&cd, config.len()), &[(&ld, layer.len())], extra);
            assert!(m.len() > 700 * 1024);
            put_manifest(&c, &s, "library/big", &format!("a{i}"), OCI_MANIFEST, &m).await;
        }
        tokio::time::sleep(std::time::Duration::from_secs(6)).await;
        let after = metric(&s, "berth_process_resident_memory_bytes").await;
        let grown = (after - before) / (1024.0 * 1024.0);
        assert!(grown < 48.0, "resident memory grew by {grown:.0} MiB after 100 manifests of 1 MiB annotations");
        subject
    });
    let check = |s: &Server| {
        block_on(async {
            let r: serde_json::Value =
                c.get(s.url(&format!("/v2/library/big/referrers/{subject}"))).send().await.unwrap().json().await.unwrap();
            let list = r["manifests"].as_array().unwrap();
            assert_eq!(list.len(), 3, "{r}");
            let mut ns: Vec<&str> = list.iter().map(|m| m["annotations"]["n"].as_str().unwrap()).collect();
            ns.sort();
            assert_eq!(ns, ["0", "1", "2"]);
            assert!(list.iter().all(|m| m["annotations"]["note"].as_str().unwrap().len() == 768 * 1024));
        })
    };
    check(&s);
    s.stop();
    let s = Server::start_configured(&dir, &config);
    check(&s);
}

/// The read index holds repositories' states within a budget and loads the
/// others when asked for (`registry.index_cache_bytes`). With room for a few
/// states only, 40 repositories pushed and read concurrently, their tags
/// moved and deleted, listed by the catalog, the tags list and the
/// management API, and read again after a restart: every answer is what was
/// stored, while the states held stay few.
#[test]
fn a_bounded_index_serves_everything_stored() {
    const REPOS: u64 = 40;
    let dir = TempDir::new("bounded-index");
    let config = "[registry]\nindex_cache_bytes = 65536\n";
    let mut s = Server::start_configured(&dir, config);
    let c = client();
    let pushed: Vec<Vec<String>> = block_on(async {
        let pushes = (0..REPOS).map(|i| {
            let (c, s) = (&c, &s);
            async move {
                let repo = format!("library/r{i:02}");
                let mut digests = vec![];
                for t in 0..3 {
                    digests.push(push_image(c, s, &repo, &format!("v{t}"), i * 10 + t, json!({})).await);
                }
                digests
            }
        });
        futures::future::join_all(pushes).await
    });
    let check = |s: &Server, pushed: &[Vec<String>]| {
        block_on(async {
            let reads = (0..REPOS).map(|i| {
                let (c, s, want) = (&c, s, &pushed[i as usize]);
                async move {
                    let repo = format!("library/r{i:02}");
                    for (t, d) in want.iter().enumerate() {
                        let r = c.get(s.url(&format!("/v2/{repo}/manifests/v{t}"))).header("accept", OCI_MANIFEST).send().await.unwrap();
                        assert_eq!(r.status(), 200, "{repo}:v{t}");
                        let body = r.bytes().await.unwrap();
                        assert_eq!(&sha256(&body), d, "{repo}:v{t}");
                        let m: serde_json::Value = serde_json::from_slice(&body).unwrap();
                        let layer = m["layers"][0]["digest"].as_str().unwrap();
                        let r = c.get(s.url(&format!("/v2/{repo}/blobs/{layer}"))).send().await.unwrap();
                        assert_eq!(r.status(), 200, "{repo} blob");
                        assert_eq!(sha256(&r.bytes().await.unwrap()), layer);
                    }
                    let tags: serde_json::Value =
                        c.get(s.url(&format!("/v2/{repo}/tags/list"))).send().await.unwrap().json().await.unwrap();
                    assert_eq!(tags["tags"], json!(["v0", "v1", "v2"]), "{repo}");
                    let v: serde_json::Value =
                        c.get(s.url(&format!("/api/v1/repositories/{repo}"))).send().await.unwrap().json().await.unwrap();
                    assert_eq!(v["tag_count"], 3, "{repo}: {v}");
                }
            });
            futures::future::join_all(reads).await;
            let cat: serde_json::Value = c.get(s.url("/v2/_catalog?n=1000")).send().await.unwrap().json().await.unwrap();
            assert_eq!(cat["repositories"].as_array().unwrap().len(), REPOS as usize);
            // Once no request holds one, a few states of 40 are held (each
            // weighs about 12 KiB against the 64 KiB budget): read one after
            // the other, each load drops what is beyond the budget.
            for i in 0..REPOS {
                let r = c.head(s.url(&format!("/v2/library/r{i:02}/manifests/v0"))).header("accept", OCI_MANIFEST).send().await.unwrap();
                assert_eq!(r.status(), 200);
            }
            let held = metric(s, "berth_index_states").await;
            assert!((1.0..12.0).contains(&held), "{held} states held");
        })
    };
    check(&s, &pushed);
    // Changes to repositories whose states were dropped: a tag deleted, a tag
    // moved, a manifest deleted, a repository deleted.
    let mut pushed = pushed;
    block_on(async {
        let r = c.delete(s.url("/v2/library/r00/manifests/v1")).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let r = c.get(s.url("/v2/library/r00/manifests/v1")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 404);
        // Pushed again as it was, for the checks below.
        pushed[0][1] = push_image(&c, &s, "library/r00", "v1", 1, json!({})).await;
        pushed[1][2] = push_image(&c, &s, "library/r01", "v2", 999, json!({})).await;
        let gone = push_image(&c, &s, "library/gone", "v0", 5, json!({})).await;
        for i in 2..REPOS {
            // Touch every other repository so the two below are dropped.
            let r = c.head(s.url(&format!("/v2/library/r{i:02}/manifests/v0"))).header("accept", OCI_MANIFEST).send().await.unwrap();
            assert_eq!(r.status(), 200);
        }
        let r = c.delete(s.url(&format!("/v2/library/gone/manifests/{gone}"))).send().await.unwrap();
        assert_eq!(r.status(), 202);
        let r = c.get(s.url("/v2/library/gone/manifests/v0")).header("accept", OCI_MANIFEST).send().await.unwrap();
        assert_eq!(r.status(), 404);
        let r = c.delete(s.url("/api/v1/repositories/library/gone")).send().await.unwrap();
        assert!(r.status().is_success(), "{}", r.status());
        let r = c.get(s.url("/v2/library/gone/tags/list")).send().await.unwrap();
        assert_eq!(r.status(), 404);
    });
    check(&s, &pushed);
    s.stop();
    let s = Server::start_configured(&dir, config);
    let before = block_on(async {
        assert_eq!(metric(&s, "berth_index_states").await, 0.0, "states were loaded at start");
        // A repository read once is served by point reads and holds nothing;
        // one read again is loaded and held.
        let head = |i: u64, t: usize| {
            let r = c.head(s.url(&format!("/v2/library/r{i:02}/manifests/v{t}"))).header("accept", OCI_MANIFEST);
            async move { r.send().await.unwrap() }
        };
        for i in 0..REPOS {
            if i % 2 == 0 {
                let r = head(i, 2).await;
                assert_eq!(r.status(), 200);
                assert_eq!(r.headers()["docker-content-digest"].to_str().unwrap(), pushed[i as usize][2]);
            } else {
                assert_eq!(head(i, 7).await.status(), 404, "an unknown tag, read cold");
            }
        }
        assert_eq!(metric(&s, "berth_index_states").await, 0.0, "repositories read once were loaded");
        for i in 0..REPOS {
            assert_eq!(head(i, 2).await.status(), 200);
        }
        assert!(metric(&s, "berth_index_states").await >= 1.0, "no repository read again was loaded");
        metric(&s, "berth_process_resident_memory_bytes").await
    });
    check(&s, &pushed);
    // 120 manifests read cold and cached: what they weigh, not the I/O
    // buffers they were read into (up to 4 MiB each, huge pages where the
    // kernel gives them: that was 240 MiB here).
    let grown = (block_on(metric(&s, "berth_process_resident_memory_bytes")) - before) / (1024.0 * 1024.0);
    assert!(grown < 64.0, "resident memory grew by {grown:.0} MiB reading 120 small manifests");
}

/// A client that goes away in the middle of a chunk leaves the session as it
/// was before the chunk, free for the next request: the client resumes from
/// the offset the status gives (the lease its request held is given back
/// whether the request ended on the broken body or was dropped, and a request
/// that comes while the server still winds the broken one up waits for it).
/// While a chunk is really being written, another writer is refused.
#[tokio::test]
async fn a_chunk_abandoned_mid_way_leaves_the_session_resumable() {
    use tokio::io::AsyncWriteExt;
    let dir = TempDir::new("abandoned-chunk");
    let s = Server::start_in(dir.path(), &[]);
    let c = client();
    let data = bytes(11, 200_000);
    let r = c.post(s.url("/v2/acme/app/blobs/uploads/")).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let loc = r.headers()["location"].to_str().unwrap().to_string();
    let r = c.patch(s.url(&loc)).header("content-range", "0-99999").body(data[..100_000].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202);
    let half_a_chunk = || async {
        let mut tcp = tokio::net::TcpStream::connect(&s.addr).await.unwrap();
        let head = format!(
            "PATCH {loc} HTTP/1.1\r\nHost: {}\r\nAuthorization: {}\r\nContent-Type: application/octet-stream\r\nContent-Range: 100000-199999\r\nContent-Length: 100000\r\n\r\n",
            s.addr,
            basic("admin", ADMIN_PASSWORD)
        );
        tcp.write_all(head.as_bytes()).await.unwrap();
        tcp.write_all(&data[100_000..150_000]).await.unwrap();
        tcp.flush().await.unwrap();
        tcp
    };
    // A chunk still arriving holds the session: a second writer is refused
    // (after waiting for it in vain), and the offset has not moved.
    let held = half_a_chunk().await;
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    let r = c.patch(s.url(&loc)).header("content-range", "100000-199999").body(data[100_000..].to_vec()).send().await.unwrap();
    expect_error(r, 416, "BLOB_UPLOAD_INVALID", "a second writer").await;
    drop(held);
    for round in 0..3 {
        // Half a chunk, then the connection goes away.
        let tcp = half_a_chunk().await;
        tokio::time::sleep(std::time::Duration::from_millis(200 * round)).await;
        drop(tcp);
        // The session answers, at the offset before the abandoned chunk.
        let st = c.get(s.url(&loc)).send().await.unwrap();
        assert_eq!(st.status(), 204, "round {round}");
        assert_eq!(st.headers()["range"], "0-99999", "round {round}: the session moved past its last whole chunk");
    }
    let r = c.patch(s.url(&loc)).header("content-range", "100000-199999").body(data[100_000..].to_vec()).send().await.unwrap();
    assert_eq!(r.status(), 202, "{}", r.text().await.unwrap());
    let d = sha256(&data);
    let r = c.put(s.url(&format!("{loc}?digest={d}"))).send().await.unwrap();
    assert_eq!(r.status(), 201);
    let got = c.get(s.url(&format!("/v2/acme/app/blobs/{d}"))).send().await.unwrap().bytes().await.unwrap();
    assert_eq!(sha256(&got), d);
}
