//! The `/v2/` path grammar, parsed by hand into a [`Route`].
//!
//! Repository names may contain any number of `/`-separated components (including
//! ones named `blobs` or `manifests`), so a path is matched from its end: the last
//! segment is the reference, digest or upload id, and what precedes it decides
//! the endpoint.

use berth_oci::{Digest, ErrorCode, Reference, RegistryError, RepoName, UploadId};

/// One OCI endpoint, with its validated parameters.
#[derive(Debug, PartialEq)]
pub enum Route {
    Base,
    Catalog,
    Tags(RepoName),
    Manifest(RepoName, Reference),
    /// `…/manifests/<ref>` whose reference is neither a valid tag nor a digest:
    /// unknown to a GET, HEAD or DELETE (404, as Distribution and the OCI
    /// conformance suite expect), an invalid tag to a PUT (400).
    BadReference(RepoName, RegistryError),
    Blob(RepoName, Digest),
    Uploads(RepoName),
    Upload(RepoName, UploadId),
    Referrers(RepoName, Digest),
}

impl Route {
    /// A short label for logs and metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Route::Base => "base",
            Route::Catalog => "catalog",
            Route::Tags(_) => "tags",
            Route::Manifest(..) | Route::BadReference(..) => "manifest",
            Route::Blob(..) => "blob",
            Route::Uploads(_) => "uploads",
            Route::Upload(..) => "upload",
            Route::Referrers(..) => "referrers",
        }
    }
}

fn not_found(path: &str) -> RegistryError {
    RegistryError::new(ErrorCode::Unsupported).with_status(404).with_detail(format!("no such endpoint: /v2/{path}"))
}

/// Decode `%XX` escapes (clients may escape the `:` of a digest).
pub fn percent_decode(s: &str) -> Option<String> {
    if !s.contains('%') {
        return Some(s.to_owned());
    }
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = s.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// Parse the part of the path after `/v2/`.
pub fn parse(path: &str) -> Result<Route, RegistryError> {
    if path.is_empty() {
        return Ok(Route::Base);
    }
    if path == "_catalog" {
        return Ok(Route::Catalog);
    }
    let name = |s: &str| s.parse::<RepoName>();
    if let Some(n) = path.strip_suffix("/tags/list") {
        return Ok(Route::Tags(name(n)?));
    }
    let (rest, last) = path.rsplit_once('/').ok_or_else(|| not_found(path))?;
    let last = percent_decode(last).ok_or_else(|| not_found(path))?;
    if let Some(n) = rest.strip_suffix("/manifests") {
        let repo = name(n)?;
        return Ok(match last.parse() {
            Ok(r) => Route::Manifest(repo, r),
            Err(e) => Route::BadReference(repo, e),
        });
    }
    if let Some(n) = rest.strip_suffix("/blobs/uploads") {
        let repo = name(n)?;
        if last.is_empty() {
            return Ok(Route::Uploads(repo));
        }
        return Ok(Route::Upload(repo, last.parse()?));
    }
    if let Some(n) = rest.strip_suffix("/blobs") {
        let repo = name(n)?;
        if last == "uploads" {
            return Ok(Route::Uploads(repo));
        }
        return Ok(Route::Blob(repo, last.parse()?));
    }
    if let Some(n) = rest.strip_suffix("/referrers") {
        let repo = name(n)?;
        return Ok(Route::Referrers(repo, last.parse()?));
    }
    Err(not_found(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    fn repo(s: &str) -> RepoName {
        s.parse().unwrap()
    }

    #[test]
    fn table() {
        let id = "6f9619ff-8b86-d011-b42d-00cf4fc964ff";
        let cases: Vec<(String, Route)> = vec![
            ("".into(), Route::Base),
            ("_catalog".into(), Route::Catalog),
            ("a/tags/list".into(), Route::Tags(repo("a"))),
            ("a/b/c/manifests/latest".into(), Route::Manifest(repo("a/b/c"), "latest".parse().unwrap())),
            (format!("x/manifests/{D}"), Route::Manifest(repo("x"), D.parse().unwrap())),
            (format!("x/manifests/{}", D.replace(':', "%3A")), Route::Manifest(repo("x"), D.parse().unwrap())),
            (format!("x/blobs/{D}"), Route::Blob(repo("x"), D.parse().unwrap())),
            // Components named like endpoints belong to the name.
            (format!("blobs/blobs/{D}"), Route::Blob(repo("blobs"), D.parse().unwrap())),
            ("manifests/manifests/manifests".into(), Route::Manifest(repo("manifests"), "manifests".parse().unwrap())),
            ("manifests/manifests/manifests/v1".into(), Route::Manifest(repo("manifests/manifests"), "v1".parse().unwrap())),
            ("x/blobs/uploads/".into(), Route::Uploads(repo("x"))),
            ("x/blobs/uploads".into(), Route::Uploads(repo("x"))),
            (format!("x/blobs/uploads/{id}"), Route::Upload(repo("x"), id.parse().unwrap())),
            (format!("x/y/referrers/{D}"), Route::Referrers(repo("x/y"), D.parse().unwrap())),
        ];
        for (path, want) in cases {
            assert_eq!(parse(&path).unwrap(), want, "{path}");
        }
    }

    #[test]
    fn errors() {
        let cases = [
            ("Upper/tags/list", ErrorCode::NameInvalid),
            ("a//b/manifests/x", ErrorCode::NameInvalid),
            ("a/blobs/sha256:abc", ErrorCode::DigestInvalid),
            ("a/blobs/uploads/not-a-uuid", ErrorCode::BlobUploadUnknown),
            ("a/referrers/latest", ErrorCode::DigestInvalid),
            ("a", ErrorCode::Unsupported),
            ("a/b/c", ErrorCode::Unsupported),
            ("a/manifests/%zz", ErrorCode::Unsupported),
        ];
        for (path, code) in cases {
            assert_eq!(parse(path).unwrap_err().code(), code, "{path}");
        }
        // A reference that is neither a tag nor a digest still names the repository.
        for path in ["a/manifests/sha256:xyz", "a/manifests/bad:tag", "a/manifests/.."] {
            match parse(path) {
                Ok(Route::BadReference(r, _)) => assert_eq!(r, repo("a"), "{path}"),
                other => panic!("{path}: {other:?}"),
            }
        }
    }
}
