//! Manifest parsing and validation: OCI image manifest and index, Docker schema 2
//! manifest and manifest list, OCI artifacts (`artifactType`, `subject`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::error::{ErrorCode, RegistryError};

pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
pub const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
pub const DOCKER_MANIFEST_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
pub const DOCKER_SCHEMA1: &str = "application/vnd.docker.distribution.manifest.v1+json";
pub const DOCKER_SCHEMA1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
pub const OCI_EMPTY_CONFIG: &str = "application/vnd.oci.empty.v1+json";

/// Largest manifest accepted, in bytes (the spec's recommended minimum limit).
pub const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;

/// A content descriptor as it appears in manifests and in the referrers index.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Descriptor {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub artifact_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub annotations: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub platform: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub urls: Option<Vec<String>>,
}

impl Descriptor {
    /// A foreign (non-distributable) layer lives elsewhere (`urls`); the registry
    /// does not require it to be present.
    pub fn is_foreign(&self) -> bool {
        self.urls.as_ref().is_some_and(|u| !u.is_empty())
            && (self.media_type.contains("foreign") || self.media_type.contains("nondistributable"))
    }
}

/// Whether a manifest is an image/artifact manifest or an index of manifests.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ManifestKind {
    Image,
    Index,
}

/// A validated manifest with the facts the registry needs from it.
#[derive(Clone, Debug, PartialEq)]
pub struct ParsedManifest {
    pub media_type: String,
    pub kind: ManifestKind,
    pub config: Option<Descriptor>,
    /// Layers of an image manifest, or the child manifests of an index.
    pub references: Vec<Descriptor>,
    pub subject: Option<Descriptor>,
    /// `artifactType`, or for an image manifest without one, the config's media type.
    pub artifact_type: Option<String>,
    pub annotations: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Raw {
    schema_version: Option<serde_json::Value>,
    media_type: Option<String>,
    artifact_type: Option<String>,
    config: Option<Descriptor>,
    layers: Option<Vec<Descriptor>>,
    manifests: Option<Vec<Descriptor>>,
    subject: Option<Descriptor>,
    annotations: Option<BTreeMap<String, String>>,
}

fn invalid(detail: impl Into<String>) -> RegistryError {
    RegistryError::new(ErrorCode::ManifestInvalid).with_detail(detail)
}

/// Strip parameters (`; charset=…`) and whitespace from a Content-Type value.
pub fn essence(content_type: &str) -> &str {
    content_type.split(';').next().unwrap_or("").trim()
}

/// Whether Berth accepts manifests of this media type.
pub fn is_manifest_media_type(mt: &str) -> bool {
    matches!(mt, OCI_MANIFEST | OCI_INDEX | DOCKER_MANIFEST | DOCKER_MANIFEST_LIST)
}

impl ParsedManifest {
    /// Parse and validate manifest bytes uploaded with `content_type`.
    pub fn parse(bytes: &[u8], content_type: Option<&str>) -> Result<ParsedManifest, RegistryError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("manifest of {} bytes exceeds the {MAX_MANIFEST_BYTES} byte limit", bytes.len())).with_status(413));
        }
        let header_type = content_type.map(essence).filter(|s| !s.is_empty());
        if matches!(header_type, Some(DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED)) {
            return Err(schema1());
        }
        let value: serde_json::Value = serde_json::from_slice(bytes).map_err(|e| invalid(format!("manifest is not valid JSON: {e}")))?;
        if !value.is_object() {
            return Err(invalid("manifest must be a JSON object"));
        }
        let raw: Raw = serde_json::from_value(value).map_err(|e| invalid(format!("malformed manifest: {e}")))?;
        match raw.schema_version.as_ref().and_then(|v| v.as_i64()) {
            Some(2) => {}
            Some(1) => return Err(schema1()),
            Some(n) => return Err(invalid(format!("unsupported schemaVersion {n}"))),
            None => return Err(invalid("schemaVersion 2 is required")),
        }
        if let (Some(field), Some(header)) = (raw.media_type.as_deref(), header_type) {
            if field != header {
                return Err(invalid(format!("mediaType {field:?} does not match Content-Type {header:?}")));
            }
        }
        let media_type = match raw.media_type.as_deref().or(header_type) {
            Some(mt) => mt.to_owned(),
            // The OCI formats make mediaType optional: tell them apart by shape.
            None if raw.manifests.is_some() => OCI_INDEX.to_owned(),
            None => OCI_MANIFEST.to_owned(),
        };
        let kind = match media_type.as_str() {
            OCI_MANIFEST | DOCKER_MANIFEST => ManifestKind::Image,
            OCI_INDEX | DOCKER_MANIFEST_LIST => ManifestKind::Index,
            DOCKER_SCHEMA1 | DOCKER_SCHEMA1_SIGNED => return Err(schema1()),
            other => return Err(invalid(format!("unsupported manifest media type {other:?}"))),
        };
        let parsed = match kind {
            ManifestKind::Image => {
                if raw.manifests.is_some() {
                    return Err(invalid("an image manifest must not have \"manifests\""));
                }
                let config = raw.config.ok_or_else(|| invalid("an image manifest requires \"config\""))?;
                let layers = match raw.layers {
                    Some(l) => l,
                    None if media_type == OCI_MANIFEST => return Err(invalid("an image manifest requires \"layers\"")),
                    None => return Err(invalid("an image manifest requires \"layers\"")),
                };
                let artifact_type = raw.artifact_type.clone().or_else(|| Some(config.media_type.clone()));
                ParsedManifest {
                    media_type,
                    kind,
                    config: Some(config),
                    references: layers,
                    subject: raw.subject,
                    artifact_type,
                    annotations: raw.annotations,
                }
            }
            ManifestKind::Index => {
                if raw.config.is_some() || raw.layers.is_some() {
                    return Err(invalid("an index must not have \"config\" or \"layers\""));
                }
                let manifests = raw.manifests.ok_or_else(|| invalid("an index requires \"manifests\""))?;
                ParsedManifest {
                    media_type,
                    kind,
                    config: None,
                    references: manifests,
                    subject: raw.subject,
                    artifact_type: raw.artifact_type,
                    annotations: raw.annotations,
                }
            }
        };
        Ok(parsed)
    }

    /// Digests of the blobs this manifest needs present (config and non-foreign layers).
    pub fn required_blobs(&self) -> impl Iterator<Item = &Digest> {
        let layers = match self.kind {
            ManifestKind::Image => &self.references[..],
            ManifestKind::Index => &[][..],
        };
        self.config.iter().chain(layers.iter().filter(|d| !d.is_foreign())).map(|d| &d.digest)
    }

    /// Digests of child manifests this index needs present.
    pub fn required_manifests(&self) -> impl Iterator<Item = &Digest> {
        let children = match self.kind {
            ManifestKind::Index => &self.references[..],
            ManifestKind::Image => &[][..],
        };
        children.iter().map(|d| &d.digest)
    }
}

fn schema1() -> RegistryError {
    invalid("Docker schema 1 manifests are deprecated and not supported; push with a current client (schema 2 or OCI)")
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";

    fn image() -> serde_json::Value {
        serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": D1, "size": 10},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": D2, "size": 20}]
        })
    }

    fn parse(v: &serde_json::Value, ct: Option<&str>) -> Result<ParsedManifest, RegistryError> {
        ParsedManifest::parse(&serde_json::to_vec(v).unwrap(), ct)
    }

    #[test]
    fn parses_image_manifest() {
        let m = parse(&image(), Some(OCI_MANIFEST)).unwrap();
        assert_eq!(m.kind, ManifestKind::Image);
        assert_eq!(m.required_blobs().count(), 2);
        assert_eq!(m.artifact_type.as_deref(), Some("application/vnd.oci.image.config.v1+json"));
    }

    #[test]
    fn parses_index_with_subject() {
        let v = serde_json::json!({
            "schemaVersion": 2,
            "manifests": [{"mediaType": OCI_MANIFEST, "digest": D1, "size": 10, "platform": {"os":"linux","architecture":"amd64"}}],
            "subject": {"mediaType": OCI_MANIFEST, "digest": D2, "size": 5},
            "artifactType": "application/x-sig"
        });
        let m = parse(&v, None).unwrap();
        assert_eq!(m.kind, ManifestKind::Index);
        assert_eq!(m.media_type, OCI_INDEX);
        assert_eq!(m.required_manifests().count(), 1);
        assert_eq!(m.subject.unwrap().digest.to_string(), D2);
    }

    #[test]
    fn rejects_bad_manifests() {
        let mut cases: Vec<(serde_json::Value, Option<&str>)> = vec![];
        let mut v = image();
        v["schemaVersion"] = 1.into();
        cases.push((v, None));
        cases.push((image(), Some(DOCKER_SCHEMA1_SIGNED)));
        cases.push((image(), Some(DOCKER_MANIFEST)));
        let mut v = image();
        v.as_object_mut().unwrap().remove("config");
        cases.push((v, None));
        let mut v = image();
        v["layers"][0]["digest"] = "sha256:short".into();
        cases.push((v, None));
        let mut v = image();
        v["layers"][0]["size"] = (-1).into();
        cases.push((v, None));
        let mut v = image();
        v["mediaType"] = "text/plain".into();
        cases.push((v, None));
        cases.push((serde_json::json!([1, 2]), None));
        cases.push((serde_json::json!({"mediaType": OCI_MANIFEST}), None));
        for (v, ct) in cases {
            let e = parse(&v, ct).unwrap_err();
            assert_eq!(e.code(), ErrorCode::ManifestInvalid, "{v} {ct:?}");
        }
        assert_eq!(ParsedManifest::parse(b"{not json", None).unwrap_err().code(), ErrorCode::ManifestInvalid);
        let big = vec![b' '; MAX_MANIFEST_BYTES + 1];
        assert_eq!(ParsedManifest::parse(&big, None).unwrap_err().status(), 413);
    }

    #[test]
    fn foreign_layers_are_not_required() {
        let mut v = image();
        v["mediaType"] = DOCKER_MANIFEST.into();
        v["layers"][0]["mediaType"] = "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip".into();
        v["layers"][0]["urls"] = serde_json::json!(["https://example.com/layer"]);
        let m = parse(&v, Some(DOCKER_MANIFEST)).unwrap();
        assert_eq!(m.required_blobs().count(), 1);
    }
}
