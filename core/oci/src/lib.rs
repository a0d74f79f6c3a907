//! OCI distribution domain types for Berth.
//!
//! Every identifier that crosses the wire is parsed here, once, into a validated
//! type: [`Digest`], [`RepoName`], [`Tag`], [`Reference`], [`UploadId`]. Manifests are
//! parsed into [`manifest::ParsedManifest`], byte ranges into [`range`] types, and every
//! error the registry can answer with is a row of the [`error::ErrorCode`] table.
//!
//! Architecture invariant: this crate performs no I/O and knows nothing of warp,
//! OpenDAL, SurrealDB or actix. It depends only on serde and the hash functions.

pub mod digest;
pub mod error;
pub mod manifest;
pub mod name;
pub mod range;

pub use digest::{Digest, DigestAlgorithm, Digester};
pub use error::{ErrorCode, RegistryError};
pub use manifest::{Descriptor, ManifestKind, ParsedManifest};
pub use name::{AccountName, Reference, RepoName, Tag, UploadId};
