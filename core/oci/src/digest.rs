//! Content digests (`algorithm:encoded`) and the streaming hasher that produces them.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::digest::common::hazmat::SerializableState;
use sha2::{Digest as _, Sha256, Sha512};

use crate::error::{ErrorCode, RegistryError};

/// The digest algorithms Berth computes and verifies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DigestAlgorithm {
    Sha256,
    Sha512,
}

impl DigestAlgorithm {
    pub fn as_str(self) -> &'static str {
        match self {
            DigestAlgorithm::Sha256 => "sha256",
            DigestAlgorithm::Sha512 => "sha512",
        }
    }

    /// Length of the lowercase hex encoding.
    pub fn hex_len(self) -> usize {
        match self {
            DigestAlgorithm::Sha256 => 64,
            DigestAlgorithm::Sha512 => 128,
        }
    }
}

/// A validated content digest such as `sha256:e3b0…`.
///
/// The encoded part is always lowercase hex of the algorithm's exact length, so two
/// equal contents always have byte-equal digests and a digest is safe to use as a
/// storage key component.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: DigestAlgorithm,
    hex: String,
}

impl Digest {
    pub fn algorithm(&self) -> DigestAlgorithm {
        self.algorithm
    }

    /// The lowercase hex encoding (without the `algorithm:` prefix).
    pub fn hex(&self) -> &str {
        &self.hex
    }

    /// The digest of `bytes` with `algorithm`.
    pub fn of(algorithm: DigestAlgorithm, bytes: &[u8]) -> Digest {
        let mut d = Digester::new(algorithm);
        d.update(bytes);
        d.finish()
    }

    /// sha256 of `bytes`, the canonical digest for content Berth creates itself.
    pub fn sha256(bytes: &[u8]) -> Digest {
        Digest::of(DigestAlgorithm::Sha256, bytes)
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.as_str(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

fn is_algorithm_component(s: &str) -> bool {
    // algorithm-component ::= [a-z0-9]+ ; separators [+._-] between components
    !s.is_empty() && s.split(['+', '.', '_', '-']).all(|c| !c.is_empty() && c.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()))
}

impl FromStr for Digest {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let invalid = |why: &str| RegistryError::new(ErrorCode::DigestInvalid).with_detail(format!("{why}: {s:?}"));
        let (alg, enc) = s.split_once(':').ok_or_else(|| invalid("digest must be algorithm:encoded"))?;
        if !is_algorithm_component(alg) {
            return Err(invalid("malformed digest algorithm"));
        }
        if enc.is_empty() || !enc.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'=' || b == b'_' || b == b'-') {
            return Err(invalid("malformed digest encoding"));
        }
        let algorithm = match alg {
            "sha256" => DigestAlgorithm::Sha256,
            "sha512" => DigestAlgorithm::Sha512,
            _ => return Err(RegistryError::new(ErrorCode::Unsupported).with_detail(format!("unsupported digest algorithm {alg:?}"))),
        };
        if enc.len() != algorithm.hex_len() || !enc.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')) {
            return Err(invalid("digest encoding must be lowercase hex of the algorithm's length"));
        }
        Ok(Digest { algorithm, hex: enc.to_owned() })
    }
}

impl TryFrom<String> for Digest {
    type Error = RegistryError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<Digest> for String {
    fn from(d: Digest) -> String {
        d.to_string()
    }
}

impl Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(|e: RegistryError| serde::de::Error::custom(e.detail_or_message()))
    }
}

/// A streaming hasher for one digest algorithm whose state can be saved and
/// restored, so an upload can resume on another process or after a restart.
#[derive(Clone)]
pub enum Digester {
    Sha256(Sha256),
    Sha512(Sha512),
}

impl Digester {
    pub fn new(algorithm: DigestAlgorithm) -> Self {
        match algorithm {
            DigestAlgorithm::Sha256 => Digester::Sha256(Sha256::new()),
            DigestAlgorithm::Sha512 => Digester::Sha512(Sha512::new()),
        }
    }

    pub fn algorithm(&self) -> DigestAlgorithm {
        match self {
            Digester::Sha256(_) => DigestAlgorithm::Sha256,
            Digester::Sha512(_) => DigestAlgorithm::Sha512,
        }
    }

    pub fn update(&mut self, bytes: &[u8]) {
        match self {
            Digester::Sha256(h) => h.update(bytes),
            Digester::Sha512(h) => h.update(bytes),
        }
    }

    /// The digest of everything fed so far (the hasher itself is left untouched).
    pub fn finish(&self) -> Digest {
        let (algorithm, hex) = match self {
            Digester::Sha256(h) => (DigestAlgorithm::Sha256, hex::encode(h.clone().finalize())),
            Digester::Sha512(h) => (DigestAlgorithm::Sha512, hex::encode(h.clone().finalize())),
        };
        Digest { algorithm, hex }
    }

    /// Serialize the internal state (algorithm tag byte + state bytes).
    pub fn save(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        match self {
            Digester::Sha256(h) => {
                out.push(1);
                out.extend_from_slice(&h.serialize());
            }
            Digester::Sha512(h) => {
                out.push(2);
                out.extend_from_slice(&h.serialize());
            }
        }
        out
    }

    /// Restore a state produced by [`Digester::save`]; `None` if it is not one.
    pub fn restore(saved: &[u8]) -> Option<Self> {
        let (tag, rest) = saved.split_first()?;
        match tag {
            1 => Sha256::deserialize(rest.try_into().ok()?).ok().map(Digester::Sha256),
            2 => Sha512::deserialize(rest.try_into().ok()?).ok().map(Digester::Sha512),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const EMPTY: &str = "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";

    #[test]
    fn parses_and_displays_round_trip() {
        let d: Digest = EMPTY.parse().unwrap();
        assert_eq!(d.algorithm(), DigestAlgorithm::Sha256);
        assert_eq!(d.to_string(), EMPTY);
        assert_eq!(Digest::sha256(b""), d);
    }

    #[test]
    fn rejects_malformed() {
        for bad in [
            "",
            "sha256",
            "sha256:",
            ":abc",
            "sha256:E3B0C44298FC1C149AFBF4C8996FB92427AE41E4649B934CA495991B7852B855",
            "sha256:e3b0",
            "sha256:zzb0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "SHA256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855",
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855/../x",
            "sha--256:abc",
        ] {
            let e = bad.parse::<Digest>().unwrap_err();
            assert_eq!(e.code(), ErrorCode::DigestInvalid, "{bad}");
        }
        let e = "md5:d41d8cd98f00b204e9800998ecf8427e".parse::<Digest>().unwrap_err();
        assert_eq!(e.code(), ErrorCode::Unsupported);
    }

    #[test]
    fn sha512_supported() {
        let d = Digest::of(DigestAlgorithm::Sha512, b"abc");
        assert!(d.to_string().starts_with("sha512:ddaf35a193617aba"));
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
    }

    #[test]
    fn state_survives_save_and_restore() {
        for alg in [DigestAlgorithm::Sha256, DigestAlgorithm::Sha512] {
            let mut a = Digester::new(alg);
            a.update(b"hello ");
            let saved = a.save();
            let mut b = Digester::restore(&saved).unwrap();
            a.update(b"world");
            b.update(b"world");
            assert_eq!(a.finish(), b.finish());
            assert_eq!(a.finish(), Digest::of(alg, b"hello world"));
        }
        assert!(Digester::restore(&[9, 1, 2]).is_none());
        assert!(Digester::restore(&[1, 1, 2]).is_none());
    }
}
