//! Plugin instances (a module bound to a scope, with its configuration), each
//! instance's key-value store (its outbox and delivery log are in [`crate::outbox`]). Findings of gates live on their manifest rows
//! ([`crate::ManifestRow::findings`]), written in the commit's transaction.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::{one, rows, Metadata, Result};

pub(crate) const SCHEMA: &str = r#"
DEFINE TABLE IF NOT EXISTS plugin_instance SCHEMALESS;
DEFINE TABLE IF NOT EXISTS plugin_kv SCHEMALESS;
"#;

/// A plugin instance, as stored.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PluginInstanceRow {
    pub id: String,
    pub module: String,
    /// `platform`, `tenant:<name>` or `namespace:<name>`.
    pub scope: String,
    pub hooks: Vec<String>,
    pub config: BTreeMap<String, String>,
    #[serde(default)]
    pub allow_hosts: Vec<String>,
    pub enabled: bool,
    pub updated_ms: i64,
    /// Who set it last.
    pub by: String,
}

/// One finding of a gate, kept with the manifest it judged.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct FindingRow {
    pub plugin: String,
    pub rule: String,
    /// info, low, medium, high or critical.
    pub severity: String,
    pub message: String,
}

impl Metadata {
    pub async fn put_plugin_instance(&self, row: &PluginInstanceRow) -> Result<()> {
        let mut v = serde_json::to_value(row).map_err(|e| crate::MetadataError::Corrupt(e.to_string()))?;
        if let Some(o) = v.as_object_mut() {
            let id = o.remove("id").unwrap_or_default();
            o.insert("instance".into(), id);
        }
        self.db
            .query("UPSERT type::record('plugin_instance', $id) CONTENT $row RETURN NONE")
            .bind(("id", row.id.clone()))
            .bind(("row", v))
            .await?
            .check()?;
        Ok(())
    }

    /// Remove an instance with everything that is its: its key-value store,
    /// its outbox, its delivery log and its lease (one transaction, retried when
    /// it meets the delivery worker's writes).
    pub async fn delete_plugin_instance(&self, id: &str) -> Result<()> {
        self.run(|| {
            self.db
                .query(
                    "BEGIN TRANSACTION;
                     DELETE type::record('plugin_instance', $id) RETURN NONE; DELETE plugin_kv WHERE instance = $id RETURN NONE;
                     DELETE outbox WHERE instance = $id RETURN NONE; DELETE plugin_delivery WHERE instance = $id RETURN NONE;
                     DELETE type::record('outbox_lease', $id) RETURN NONE;
                     COMMIT TRANSACTION;",
                )
                .bind(("id", id.to_owned()))
        })
        .await?;
        Ok(())
    }

    pub async fn plugin_instances(&self) -> Result<Vec<PluginInstanceRow>> {
        let mut r = self
            .db
            .query("SELECT instance AS id, module, scope, hooks, config, allow_hosts, enabled, updated_ms, by FROM plugin_instance ORDER BY id")
            .await?
            .check()?;
        rows(&mut r, 0)
    }

    pub async fn plugin_kv_get(&self, instance: &str, key: &str) -> Result<Option<Vec<u8>>> {
        let mut r = self
            .db
            .query("SELECT VALUE value FROM ONLY type::record('plugin_kv', [$i, $k])")
            .bind(("i", instance.to_owned()))
            .bind(("k", key.to_owned()))
            .await?
            .check()?;
        let hexed: Option<String> = one(&mut r, 0)?;
        hexed.map(|h| hex_decode(&h)).transpose()
    }

    pub async fn plugin_kv_set(&self, instance: &str, key: &str, value: &[u8]) -> Result<()> {
        self.db
            .query("UPSERT type::record('plugin_kv', [$i, $k]) CONTENT { instance: $i, value: $v } RETURN NONE")
            .bind(("i", instance.to_owned()))
            .bind(("k", key.to_owned()))
            .bind(("v", value.iter().map(|b| format!("{b:02x}")).collect::<String>()))
            .await?
            .check()?;
        Ok(())
    }

    /// The findings kept with a manifest.
    pub async fn manifest_findings(&self, repo: &berth_oci::RepoName, digest: &berth_oci::Digest) -> Result<Vec<FindingRow>> {
        let mut r = self
            .db
            .query("SELECT VALUE findings OR [] FROM type::record('manifest', [$repo, $digest])")
            .bind(("repo", repo.to_string()))
            .bind(("digest", digest.to_string()))
            .await?
            .check()?;
        // One row (or none): the record's list. (`FROM ONLY` or `RETURN … .findings`
        // would unwrap a list of one.)
        Ok(rows::<Vec<FindingRow>>(&mut r, 0)?.into_iter().next().unwrap_or_default())
    }
}

fn hex_decode(h: &str) -> Result<Vec<u8>> {
    (0..h.len())
        .step_by(2)
        .map(|i| {
            h.get(i..i + 2)
                .and_then(|b| u8::from_str_radix(b, 16).ok())
                .ok_or_else(|| crate::MetadataError::Corrupt("plugin_kv value".into()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::mem;

    #[tokio::test]
    async fn instances_and_kv_round_trip() {
        let md = mem().await;
        let row = PluginInstanceRow {
            id: "hook-1".into(),
            module: "webhook".into(),
            scope: "tenant:acme".into(),
            hooks: vec!["manifest-pushed".into()],
            config: BTreeMap::from([("url".into(), "http://127.0.0.1:9/x".into())]),
            allow_hosts: vec!["127.0.0.1".into()],
            enabled: true,
            updated_ms: 5,
            by: "mia".into(),
        };
        md.put_plugin_instance(&row).await.unwrap();
        assert_eq!(md.plugin_instances().await.unwrap(), vec![row.clone()]);
        assert_eq!(md.plugin_kv_get("hook-1", "k").await.unwrap(), None);
        md.plugin_kv_set("hook-1", "k", &[0, 1, 255]).await.unwrap();
        assert_eq!(md.plugin_kv_get("hook-1", "k").await.unwrap(), Some(vec![0, 1, 255]));
        // Findings live on their manifest row, written with its commit.
        let repo: berth_oci::RepoName = "acme/app".parse().unwrap();
        let mut m = crate::tests::row(&repo, b"m");
        assert_eq!(md.manifest_findings(&repo, &m.digest).await.unwrap(), vec![]);
        m.findings = vec![FindingRow { plugin: "scan".into(), rule: "r".into(), severity: "low".into(), message: "x".into() }];
        md.commit_manifest(&crate::Guard::any(), &m, None, false, &[]).await.unwrap();
        assert_eq!(md.manifest_findings(&repo, &m.digest).await.unwrap(), m.findings);
        md.delete_plugin_instance("hook-1").await.unwrap();
        assert!(md.plugin_instances().await.unwrap().is_empty());
        assert_eq!(md.plugin_kv_get("hook-1", "k").await.unwrap(), None, "its store goes with it");
    }
}
