//! Repository names, tags, references and upload ids, validated per the
//! distribution-spec grammar.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ErrorCode, RegistryError};

/// Longest repository name accepted (distribution's limit, which clients expect).
pub const MAX_NAME_LEN: usize = 255;
/// Longest tag (the spec's `{0,127}` after the first character).
pub const MAX_TAG_LEN: usize = 128;

/// A repository name: `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*(\/[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*)*`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RepoName(String);

/// Names order and hash as their text, so maps keyed by name are searched by `&str`.
impl std::borrow::Borrow<str> for RepoName {
    fn borrow(&self) -> &str {
        &self.0
    }
}

fn valid_path_component(c: &str) -> bool {
    // [a-z0-9]+ ( ( '.' | '_' | '__' | '-'+ ) [a-z0-9]+ )*
    let b = c.as_bytes();
    if b.is_empty() || !is_alnum(b[0]) || !is_alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if is_alnum(b[i]) {
            i += 1;
            continue;
        }
        // A separator run: '.', '_', '__' or '-'+, followed by an alphanumeric.
        let start = i;
        match b[i] {
            b'.' => i += 1,
            b'_' => {
                i += 1;
                if i < b.len() && b[i] == b'_' {
                    i += 1;
                }
            }
            b'-' => {
                while i < b.len() && b[i] == b'-' {
                    i += 1;
                }
            }
            _ => return false,
        }
        if i == start || i >= b.len() || !is_alnum(b[i]) {
            return false;
        }
    }
    true
}

fn is_alnum(b: u8) -> bool {
    b.is_ascii_lowercase() || b.is_ascii_digit()
}

impl RepoName {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The first path component (the namespace a tenant owns).
    pub fn namespace(&self) -> &str {
        self.0.split('/').next().unwrap_or(&self.0)
    }
}

impl FromStr for RepoName {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::new(ErrorCode::NameInvalid).with_detail(format!("{why}: {s:?}"));
        if s.is_empty() {
            return Err(bad("repository name is empty"));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(bad("repository name longer than 255 characters"));
        }
        if !s.split('/').all(valid_path_component) {
            return Err(bad("repository name must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*(/…)*"));
        }
        Ok(RepoName(s.to_owned()))
    }
}

/// Longest tenant, user or namespace name.
pub const MAX_ACCOUNT_LEN: usize = 64;

/// Names no tenant or user may take: they mean something to the policy engine.
pub const RESERVED_ACCOUNTS: &[&str] = &["anonymous", "public", "all"];

/// A tenant, user or namespace name: one repository path component
/// (`[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`), at most 64 characters, not reserved.
/// Because it can hold neither `:` nor `*`, it can never be mistaken for a
/// policy role (`role:…`), group (`tenant:…`) or wildcard.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct AccountName(String);

impl AccountName {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for AccountName {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::new(ErrorCode::NameInvalid).with_detail(format!("{why}: {s:?}"));
        if s.is_empty() || s.len() > MAX_ACCOUNT_LEN {
            return Err(bad("name must be 1 to 64 characters"));
        }
        if !valid_path_component(s) {
            return Err(bad("name must match [a-z0-9]+((\\.|_|__|-+)[a-z0-9]+)*"));
        }
        if RESERVED_ACCOUNTS.contains(&s) {
            return Err(bad("name is reserved"));
        }
        Ok(AccountName(s.to_owned()))
    }
}

/// A tag: `[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}`.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Tag(String);

impl Tag {
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl FromStr for Tag {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let b = s.as_bytes();
        let ok = !b.is_empty()
            && b.len() <= MAX_TAG_LEN
            && (b[0].is_ascii_alphanumeric() || b[0] == b'_')
            && b[1..].iter().all(|&c| c.is_ascii_alphanumeric() || c == b'_' || c == b'.' || c == b'-');
        if ok {
            Ok(Tag(s.to_owned()))
        } else {
            Err(RegistryError::new(ErrorCode::ManifestInvalid)
                .with_detail(format!("invalid tag {s:?}: must match [a-zA-Z0-9_][a-zA-Z0-9._-]{{0,127}}")))
        }
    }
}

/// What a manifest URL points at: a tag or a digest.
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub enum Reference {
    Tag(Tag),
    Digest(Digest),
}

impl FromStr for Reference {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        if s.contains(':') {
            s.parse().map(Reference::Digest)
        } else {
            s.parse().map(Reference::Tag)
        }
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Reference::Tag(t) => f.write_str(t.as_str()),
            Reference::Digest(d) => fmt::Display::fmt(d, f),
        }
    }
}

/// The id of an upload session (a UUID, canonical hyphenated lowercase).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct UploadId(uuid::Uuid);

impl UploadId {
    pub fn random() -> Self {
        UploadId(uuid::Uuid::new_v4())
    }
}

impl FromStr for UploadId {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        // Only the canonical form, so an id is a safe storage key component.
        match uuid::Uuid::try_parse(s) {
            Ok(u) if u.hyphenated().to_string() == s => Ok(UploadId(u)),
            _ => Err(RegistryError::new(ErrorCode::BlobUploadUnknown).with_detail(format!("malformed upload id {s:?}"))),
        }
    }
}

macro_rules! string_like {
    ($($t:ty),*) => {$(
        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { fmt::Display::fmt(&self.0, f) }
        }
        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { fmt::Display::fmt(&self.0, f) }
        }
        impl TryFrom<String> for $t {
            type Error = RegistryError;
            fn try_from(s: String) -> Result<Self, RegistryError> { s.parse() }
        }
        impl From<$t> for String {
            fn from(v: $t) -> String { v.to_string() }
        }
    )*};
}
string_like!(RepoName, Tag, UploadId, AccountName);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_names() {
        for good in ["acme", "a-b", "team_1", "x.y"] {
            assert_eq!(good.parse::<AccountName>().unwrap().as_str(), good);
        }
        for bad in ["", "Acme", "a/b", "role:admin", "*", "anonymous", "a:b", "-a", &"a".repeat(65)] {
            assert_eq!(bad.parse::<AccountName>().unwrap_err().code(), ErrorCode::NameInvalid, "{bad}");
        }
    }

    #[test]
    fn repo_names() {
        for good in ["a", "library/alpine", "acme/web/api", "a.b_c__d---e/f0", "x1/y2/z3/w4/v5/u6/t7/s8/r9", &"a".repeat(255)] {
            assert!(good.parse::<RepoName>().is_ok(), "{good}");
        }
        for bad in ["", "A", "a/", "/a", "a//b", "a..b", "a___b", "-a", "a-", "a.", "a/../b", "a b", "a%2fb", "ünïcode", &"a".repeat(256)]
        {
            let e = bad.parse::<RepoName>().unwrap_err();
            assert_eq!(e.code(), ErrorCode::NameInvalid, "{bad}");
        }
        assert_eq!("acme/web/api".parse::<RepoName>().unwrap().namespace(), "acme");
    }

    #[test]
    fn tags() {
        for good in ["latest", "v1.0.0", "_x", "A-b.c_d", &"t".repeat(128)] {
            assert!(good.parse::<Tag>().is_ok(), "{good}");
        }
        for bad in ["", ".x", "-x", "a/b", "a:b", "a+b", &"t".repeat(129)] {
            assert!(bad.parse::<Tag>().is_err(), "{bad}");
        }
    }

    #[test]
    fn references() {
        assert!(matches!("latest".parse::<Reference>().unwrap(), Reference::Tag(_)));
        let d = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
        assert!(matches!(d.parse::<Reference>().unwrap(), Reference::Digest(_)));
        assert_eq!("sha256:nothex".parse::<Reference>().unwrap_err().code(), ErrorCode::DigestInvalid);
    }

    #[test]
    fn upload_ids() {
        let id = UploadId::random();
        assert_eq!(id.to_string().parse::<UploadId>().unwrap(), id);
        for bad in ["", "x", "../../etc", "6F9619FF-8B86-D011-B42D-00CF4FC964FF", "6f9619ff8b86d011b42d00cf4fc964ff"] {
            assert_eq!(bad.parse::<UploadId>().unwrap_err().code(), ErrorCode::BlobUploadUnknown, "{bad}");
        }
    }
}
