//! The storage key layout, drawn once. No other module builds a key.
//!
//! ```text
//! <root>/
//! ├── blobs/
//! │   └── <algorithm>/<first two hex>/<hex>      immutable, verified content (blobs and manifests)
//! ├── uploads/
//! │   └── <upload id>/
//! │       ├── data-<generation>                   staging file, appended to (backends that append)
//! │       └── part-<offset, 20 digits>            one object per chunk (backends that cannot append)
//! └── .tmp/                                       atomic-write scratch (filesystem backend only)
//! ```
//!
//! Keys are built only from validated [`Digest`]s and [`UploadId`]s, so no key can
//! escape its directory.

use berth_oci::{Digest, UploadId};

/// `blobs/<alg>/<aa>/<hex>`
pub fn blob(digest: &Digest) -> String {
    let hex = digest.hex();
    format!("blobs/{}/{}/{}", digest.algorithm().as_str(), &hex[..2], hex)
}

/// `uploads/<id>/` — everything staged for one upload session.
pub fn upload_dir(id: &UploadId) -> String {
    format!("uploads/{id}/")
}

/// `uploads/<id>/data-<generation>` — the append-mode staging file.
pub fn upload_data(id: &UploadId, generation: u32) -> String {
    format!("uploads/{id}/data-{generation}")
}

/// `uploads/<id>/part-<offset>` — one chunk in parts mode.
pub fn upload_part(id: &UploadId, offset: u64) -> String {
    format!("uploads/{id}/part-{offset:020}")
}

/// Scratch directory for atomic writes, relative to a filesystem root.
pub const TMP_DIR: &str = ".tmp";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys() {
        let d = Digest::sha256(b"");
        assert_eq!(blob(&d), "blobs/sha256/e3/e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
        let id: UploadId = "6f9619ff-8b86-d011-b42d-00cf4fc964ff".parse().unwrap();
        assert_eq!(upload_data(&id, 2), "uploads/6f9619ff-8b86-d011-b42d-00cf4fc964ff/data-2");
        assert_eq!(upload_part(&id, 42), "uploads/6f9619ff-8b86-d011-b42d-00cf4fc964ff/part-00000000000000000042");
        assert!(upload_part(&id, 42).starts_with(&upload_dir(&id)));
    }
}
