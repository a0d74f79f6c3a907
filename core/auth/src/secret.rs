//! Secrets: argon2id password hashes, random token secrets, constant-time
//! comparison, and HS256 bearer tokens (JWT) signed with a rotating key ring.

use std::collections::HashMap;
use std::sync::RwLock;

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use hmac::{KeyInit, Mac};
use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq;

use crate::identity::Grant;

/// Hash a password with argon2id and a random salt (PHC string).
pub fn hash_password(password: &str) -> String {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).expect("16-byte salt encodes");
    Argon2::default().hash_password(password.as_bytes(), &salt).expect("argon2 with default params").to_string()
}

/// Check a password against a PHC string (constant time inside argon2).
pub fn verify_password(password: &str, phc: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(h) => Argon2::default().verify_password(password.as_bytes(), &h).is_ok(),
        Err(_) => false,
    }
}

/// `n` random bytes as URL-safe base64 (no padding).
pub fn random_token(n: usize) -> String {
    let mut b = vec![0u8; n];
    rand::rng().fill_bytes(&mut b);
    URL_SAFE_NO_PAD.encode(b)
}

/// A random password a human can copy.
pub fn random_password() -> String {
    random_token(18)
}

pub fn sha256_hex(s: &[u8]) -> String {
    hex::encode(Sha256::digest(s))
}

/// Constant-time equality of two strings.
pub fn ct_eq(a: &str, b: &str) -> bool {
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

pub fn b64(s: &str) -> String {
    STANDARD.encode(s)
}

type HmacSha256 = hmac::Hmac<Sha256>;

/// The key signing keys are sealed with before they are stored (XChaCha20-
/// Poly1305, the key id as associated data), kept outside the database: a
/// backup of the database alone cannot forge bearer tokens.
pub struct MasterKey([u8; 32]);

impl MasterKey {
    /// Read the key (64 hex digits) from `path`; when the file does not exist and
    /// `create` is set, make one (readable by its owner only).
    pub fn load(path: &std::path::Path, create: bool) -> Result<MasterKey, String> {
        let shown = path.display();
        match std::fs::read_to_string(path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|_| format!("master key {shown}: not 64 hex digits"))?;
                let key: [u8; 32] = bytes.try_into().map_err(|_| format!("master key {shown}: not 64 hex digits (32 bytes)"))?;
                Ok(MasterKey(key))
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && create => {
                if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                    std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
                }
                let mut key = [0u8; 32];
                rand::rng().fill_bytes(&mut key);
                use std::io::Write;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| format!("creating the master key {shown}: {e}"))?;
                f.write_all(format!("{}\n", hex::encode(key)).as_bytes())
                    .and_then(|()| f.sync_all())
                    .map_err(|e| format!("writing the master key {shown}: {e}"))?;
                tracing::info!(file = %shown, "master key generated (keep it out of database backups; every replica needs the same)");
                Ok(MasterKey(key))
            }
            Err(e) => Err(format!("reading the master key {shown}: {e}")),
        }
    }

    #[cfg(test)]
    pub fn from_bytes(key: [u8; 32]) -> MasterKey {
        MasterKey(key)
    }

    /// Seal a signing key's secret: base64 of nonce and ciphertext.
    pub fn seal(&self, kid: &str, secret: &[u8]) -> String {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let cipher = chacha20poly1305::XChaCha20Poly1305::new((&self.0).into());
        let mut nonce = [0u8; 24];
        rand::rng().fill_bytes(&mut nonce);
        let ct = cipher.encrypt((&nonce).into(), Payload { msg: secret, aad: kid.as_bytes() }).expect("sealing in memory cannot fail");
        let mut out = nonce.to_vec();
        out.extend(ct);
        STANDARD.encode(out)
    }

    /// Open what [`MasterKey::seal`] sealed for `kid`; `None` with another
    /// master key, another key id, or altered bytes.
    pub fn open(&self, kid: &str, sealed: &str) -> Option<Vec<u8>> {
        use chacha20poly1305::aead::{Aead, KeyInit as _, Payload};
        let bytes = STANDARD.decode(sealed).ok()?;
        if bytes.len() < 24 {
            return None;
        }
        let (nonce, ct) = bytes.split_at(24);
        let cipher = chacha20poly1305::XChaCha20Poly1305::new((&self.0).into());
        cipher.decrypt(nonce.into(), Payload { msg: ct, aad: kid.as_bytes() }).ok()
    }
}

/// The claims of a Berth bearer token.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    /// The user name, or empty for an anonymous token.
    pub sub: String,
    pub aud: String,
    pub exp: i64,
    pub nbf: i64,
    pub iat: i64,
    pub jti: String,
    pub access: Vec<Grant>,
    /// The registry access token this bearer token was minted from, if any:
    /// revoking it revokes the bearer token too.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tid: Option<String>,
    /// The password epoch of the user when minted from their password: a
    /// password change (a new epoch) makes the token invalid.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pe: Option<i64>,
}

#[derive(Serialize, Deserialize)]
struct Header {
    alg: String,
    typ: String,
    kid: String,
}

/// Why a bearer token was refused (never shown in detail to the client).
#[derive(Debug, PartialEq, thiserror::Error)]
pub enum JwtError {
    #[error("malformed token")]
    Malformed,
    #[error("unknown signing key")]
    UnknownKey,
    #[error("bad signature")]
    BadSignature,
    #[error("token expired or not yet valid")]
    Expired,
    #[error("token is for another service")]
    WrongAudience,
}

/// Signing keys by id; the current one signs, all verify.
pub struct KeyRing {
    inner: RwLock<Keys>,
}

struct Keys {
    current: String,
    secrets: HashMap<String, Vec<u8>>,
}

impl KeyRing {
    /// `keys` are `(kid, secret)`; the last one is current.
    pub fn new(keys: Vec<(String, Vec<u8>)>) -> Self {
        let current = keys.last().map(|(k, _)| k.clone()).unwrap_or_default();
        KeyRing { inner: RwLock::new(Keys { current, secrets: keys.into_iter().collect() }) }
    }

    /// Make `kid` the signing key (older keys keep verifying).
    pub fn rotate(&self, kid: String, secret: Vec<u8>) {
        let mut k = self.inner.write().unwrap();
        k.secrets.insert(kid.clone(), secret);
        k.current = kid;
    }

    /// Replace the whole ring (the last key is current): keys not given stop
    /// verifying at once.
    pub fn replace(&self, keys: Vec<(String, Vec<u8>)>) {
        let Some(current) = keys.last().map(|(k, _)| k.clone()) else { return };
        *self.inner.write().unwrap() = Keys { current, secrets: keys.into_iter().collect() };
    }

    /// The key ids that verify (for tests and status).
    pub fn kids(&self) -> Vec<String> {
        let mut k: Vec<String> = self.inner.read().unwrap().secrets.keys().cloned().collect();
        k.sort();
        k
    }

    pub fn forget(&self, kid: &str) {
        let mut k = self.inner.write().unwrap();
        if k.current != kid {
            k.secrets.remove(kid);
        }
    }

    fn mac(secret: &[u8], data: &[u8]) -> HmacSha256 {
        let mut m = <HmacSha256 as KeyInit>::new_from_slice(secret).expect("hmac accepts any key length");
        m.update(data);
        m
    }

    pub fn sign(&self, claims: &Claims) -> String {
        let k = self.inner.read().unwrap();
        let header = Header { alg: "HS256".into(), typ: "JWT".into(), kid: k.current.clone() };
        let h = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&header).expect("header json"));
        let c = URL_SAFE_NO_PAD.encode(serde_json::to_vec(claims).expect("claims json"));
        let input = format!("{h}.{c}");
        let secret = k.secrets.get(&k.current).expect("current key present");
        let sig = URL_SAFE_NO_PAD.encode(Self::mac(secret, input.as_bytes()).finalize().into_bytes());
        format!("{input}.{sig}")
    }

    /// Verify signature, lifetime (with `leeway_secs`) and audience.
    pub fn verify(&self, token: &str, audience: &str, now: i64, leeway_secs: i64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(c), Some(s), None) = (parts.next(), parts.next(), parts.next(), parts.next()) else {
            return Err(JwtError::Malformed);
        };
        let header: Header =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(h).map_err(|_| JwtError::Malformed)?).map_err(|_| JwtError::Malformed)?;
        if header.alg != "HS256" {
            return Err(JwtError::Malformed);
        }
        let sig = URL_SAFE_NO_PAD.decode(s).map_err(|_| JwtError::Malformed)?;
        {
            let k = self.inner.read().unwrap();
            let secret = k.secrets.get(&header.kid).ok_or(JwtError::UnknownKey)?;
            let input_len = h.len() + 1 + c.len();
            Self::mac(secret, &token.as_bytes()[..input_len]).verify_slice(&sig).map_err(|_| JwtError::BadSignature)?;
        }
        let claims: Claims =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(c).map_err(|_| JwtError::Malformed)?).map_err(|_| JwtError::Malformed)?;
        if claims.exp + leeway_secs < now || claims.nbf - leeway_secs > now {
            return Err(JwtError::Expired);
        }
        if claims.aud != audience {
            return Err(JwtError::WrongAudience);
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claims(exp: i64) -> Claims {
        Claims {
            iss: "berth".into(),
            sub: "alice".into(),
            aud: "berth".into(),
            exp,
            nbf: 0,
            iat: 0,
            jti: "j".into(),
            access: vec![Grant { kind: "repository".into(), name: "a/b".into(), actions: vec!["pull".into()] }],
            tid: None,
            pe: None,
        }
    }

    #[test]
    fn passwords() {
        let h = hash_password("s3cret");
        assert!(h.starts_with("$argon2id$"));
        assert!(verify_password("s3cret", &h));
        assert!(!verify_password("s3cre", &h));
        assert!(!verify_password("s3cret", "not a hash"));
    }

    #[test]
    fn jwt_round_trip_and_rejections() {
        let ring = KeyRing::new(vec![("k1".into(), vec![1; 32])]);
        let t = ring.sign(&claims(100));
        assert_eq!(ring.verify(&t, "berth", 50, 0).unwrap(), claims(100));
        assert_eq!(ring.verify(&t, "berth", 101, 0), Err(JwtError::Expired));
        assert_eq!(ring.verify(&t, "other", 50, 0), Err(JwtError::WrongAudience));
        // A flipped claim byte breaks the signature.
        let mut parts: Vec<String> = t.split('.').map(String::from).collect();
        let forged = claims(1_000_000);
        parts[1] = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&forged).unwrap());
        assert_eq!(ring.verify(&parts.join("."), "berth", 50, 0), Err(JwtError::BadSignature));
        assert_eq!(ring.verify("a.b", "berth", 50, 0), Err(JwtError::Malformed));
        assert_eq!(ring.verify("!!.!!.!!", "berth", 50, 0), Err(JwtError::Malformed));
        // A token signed by another key ring is unknown here.
        let other = KeyRing::new(vec![("k9".into(), vec![2; 32])]);
        assert_eq!(ring.verify(&other.sign(&claims(100)), "berth", 50, 0), Err(JwtError::UnknownKey));
        // Rotation: new tokens use the new key, old ones still verify.
        ring.rotate("k2".into(), vec![3; 32]);
        let t2 = ring.sign(&claims(100));
        assert!(t2 != t);
        assert!(ring.verify(&t, "berth", 50, 0).is_ok());
        assert!(ring.verify(&t2, "berth", 50, 0).is_ok());
        ring.forget("k1");
        assert_eq!(ring.verify(&t, "berth", 50, 0), Err(JwtError::UnknownKey));
    }

    #[test]
    fn sealed_keys_open_only_with_their_master_key_and_id() {
        let m = MasterKey::from_bytes([7; 32]);
        let sealed = m.seal("k1", &[1, 2, 3]);
        assert!(!sealed.contains("010203"));
        assert_eq!(m.open("k1", &sealed), Some(vec![1, 2, 3]));
        assert_eq!(m.open("k2", &sealed), None, "bound to its key id");
        assert_eq!(MasterKey::from_bytes([8; 32]).open("k1", &sealed), None, "another master key");
        assert_eq!(m.open("k1", "AAAA"), None);
        let ring = KeyRing::new(vec![("a".into(), vec![1; 32]), ("b".into(), vec![2; 32])]);
        ring.replace(vec![("c".into(), vec![3; 32])]);
        assert_eq!(ring.kids(), ["c"]);
    }

    #[test]
    fn constant_time_eq() {
        assert!(ct_eq("abc", "abc"));
        assert!(!ct_eq("abc", "abd"));
        assert!(!ct_eq("abc", "ab"));
    }
}
