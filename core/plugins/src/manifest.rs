//! A plugin module's manifest (`plugin.toml` beside its component): what it
//! is, the sha256 its component must have, the hooks it implements, the host
//! capabilities it is granted (none unless listed), the schema of an instance's
//! configuration, and the limits of one call.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The contract this host speaks (the WIT package in `sdk/wit`).
pub const CONTRACT_PACKAGE: &str = "berth:plugin";
pub const CONTRACT_VERSION: &str = "0.1.0";

/// A hook: the gate before a manifest push commits, or one kind of event.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Hook {
    Gate,
    ManifestPushed,
    ManifestPulled,
    ManifestDeleted,
    TagDeleted,
    BlobUploaded,
    RepositoryCreated,
    RepositoryDeleted,
}

impl Hook {
    pub const ALL: [Hook; 8] = [
        Hook::Gate,
        Hook::ManifestPushed,
        Hook::ManifestPulled,
        Hook::ManifestDeleted,
        Hook::TagDeleted,
        Hook::BlobUploaded,
        Hook::RepositoryCreated,
        Hook::RepositoryDeleted,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Hook::Gate => "gate",
            Hook::ManifestPushed => "manifest-pushed",
            Hook::ManifestPulled => "manifest-pulled",
            Hook::ManifestDeleted => "manifest-deleted",
            Hook::TagDeleted => "tag-deleted",
            Hook::BlobUploaded => "blob-uploaded",
            Hook::RepositoryCreated => "repository-created",
            Hook::RepositoryDeleted => "repository-deleted",
        }
    }
}

impl std::str::FromStr for Hook {
    type Err = String;
    fn from_str(s: &str) -> Result<Hook, String> {
        Hook::ALL
            .into_iter()
            .find(|h| h.name() == s)
            .ok_or_else(|| format!("unknown hook {s:?}: {}", Hook::ALL.iter().map(|h| h.name()).collect::<Vec<_>>().join(", ")))
    }
}

/// What a module may use of the host. Everything is denied unless granted.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Capabilities {
    /// Lines in the registry's log.
    #[serde(default)]
    pub log: bool,
    /// Hosts outbound HTTP may reach: `host`, `host:port`, or `*` for any (an
    /// instance then names its own, within these). Empty: none.
    #[serde(default)]
    pub http: Vec<String>,
    /// Reading the gated manifest and the blobs it references.
    #[serde(default)]
    pub read_image: bool,
    /// The bytes of blobs one gate call may read (default 64 MiB).
    #[serde(default = "default_image_budget")]
    pub image_budget_bytes: u64,
    /// A key-value store of the instance's own.
    #[serde(default)]
    pub kv: bool,
}

fn default_image_budget() -> u64 {
    64 << 20
}

/// The type of one configuration value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ValueType {
    String,
    Integer,
    Boolean,
}

/// One key of an instance's configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigKey {
    #[serde(rename = "type", default = "string_type")]
    pub kind: ValueType,
    #[serde(default)]
    pub required: bool,
    /// Never shown back (a webhook's signing secret).
    #[serde(default)]
    pub secret: bool,
    #[serde(default)]
    pub description: String,
}

fn string_type() -> ValueType {
    ValueType::String
}

/// The limits of one call into the plugin.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Linear memory, in MiB (default 64).
    #[serde(default = "default_memory")]
    pub memory_mib: u64,
    /// Wall-clock time of one call, in ms (default 2,000).
    #[serde(default = "default_timeout")]
    pub timeout_ms: u64,
    /// Instructions' fuel for one call (default: unmetered, the timeout bounds it).
    #[serde(default)]
    pub fuel: Option<u64>,
    /// A gate that fails (trap, timeout, error) lets the push in (`true`) or
    /// refuses it (`false`, the default).
    #[serde(default)]
    pub fail_open: bool,
    /// Consecutive failures after which the instance is switched off until it
    /// is enabled again (default 5).
    #[serde(default = "default_failures")]
    pub max_failures: u32,
    /// Log lines kept from one call (default 50; the rest are counted).
    #[serde(default = "default_log_lines")]
    pub log_lines: u32,
    /// Events an instance's outbox holds at most (default 10,000); events past
    /// it are not queued, and counted as overflow.
    #[serde(default = "default_queue")]
    pub queue: u64,
    /// Deliveries of one event tried at most before it is given up (default
    /// 12: with the backoff, about an hour of retries).
    #[serde(default = "default_attempts")]
    pub max_attempts: u32,
    /// Events delivered to one instance at once (default 4).
    #[serde(default = "default_concurrency")]
    pub concurrency: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            memory_mib: default_memory(),
            timeout_ms: default_timeout(),
            fuel: None,
            fail_open: false,
            max_failures: default_failures(),
            log_lines: default_log_lines(),
            queue: default_queue(),
            max_attempts: default_attempts(),
            concurrency: default_concurrency(),
        }
    }
}

fn default_memory() -> u64 {
    64
}
fn default_timeout() -> u64 {
    2000
}
fn default_failures() -> u32 {
    5
}
fn default_log_lines() -> u32 {
    50
}
fn default_queue() -> u64 {
    10_000
}
fn default_attempts() -> u32 {
    12
}
fn default_concurrency() -> u32 {
    4
}

/// `plugin.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PluginManifest {
    /// Lowercase letters, digits and `-`; unique among installed modules.
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    /// The component, relative to the manifest.
    pub file: String,
    /// Its sha256 (hex): a component that does not match is refused.
    pub sha256: String,
    /// The hooks the module implements.
    pub hooks: Vec<Hook>,
    #[serde(default)]
    pub capabilities: Capabilities,
    #[serde(default)]
    pub config: BTreeMap<String, ConfigKey>,
    #[serde(default)]
    pub limits: Limits,
}

impl PluginManifest {
    pub fn parse(text: &str) -> Result<PluginManifest, String> {
        let m: PluginManifest = toml::from_str(text).map_err(|e| e.to_string())?;
        m.check()?;
        Ok(m)
    }

    fn check(&self) -> Result<(), String> {
        let name_ok = !self.name.is_empty()
            && self.name.len() <= 64
            && self.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !self.name.starts_with('-');
        if !name_ok {
            return Err(format!("name {:?}: lowercase letters, digits and -, at most 64", self.name));
        }
        if self.sha256.len() != 64 || !self.sha256.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
            return Err(format!("sha256 {:?}: 64 lowercase hex digits", self.sha256));
        }
        if self.file.contains("..") || self.file.starts_with('/') {
            return Err(format!("file {:?}: a path beside plugin.toml", self.file));
        }
        if self.hooks.is_empty() {
            return Err("hooks: at least one".into());
        }
        let l = &self.limits;
        if !(1..=4096).contains(&l.memory_mib) {
            return Err(format!("limits.memory_mib {}: 1 to 4096", l.memory_mib));
        }
        if !(10..=600_000).contains(&l.timeout_ms) {
            return Err(format!("limits.timeout_ms {}: 10 to 600000", l.timeout_ms));
        }
        if l.max_failures == 0 {
            return Err("limits.max_failures: at least 1".into());
        }
        if !(1..=1_000_000).contains(&l.queue) {
            return Err(format!("limits.queue {}: 1 to 1000000", l.queue));
        }
        if !(1..=100).contains(&l.max_attempts) {
            return Err(format!("limits.max_attempts {}: 1 to 100", l.max_attempts));
        }
        if !(1..=64).contains(&l.concurrency) {
            return Err(format!("limits.concurrency {}: 1 to 64", l.concurrency));
        }
        for h in &self.capabilities.http {
            host_pattern(h)?;
        }
        for k in self.config.keys() {
            config_key(k)?;
        }
        Ok(())
    }

    /// Check an instance's configuration against the schema: every key known,
    /// every required key present, every value of its type.
    pub fn check_config(&self, config: &BTreeMap<String, String>) -> Result<(), String> {
        for (k, v) in config {
            let Some(spec) = self.config.get(k) else {
                let known: Vec<&str> = self.config.keys().map(String::as_str).collect();
                return Err(format!("config key {k:?} is not one of {}'s: {}", self.name, known.join(", ")));
            };
            let ok = match spec.kind {
                ValueType::String => v.len() <= 64 * 1024,
                ValueType::Integer => v.parse::<i64>().is_ok(),
                ValueType::Boolean => v == "true" || v == "false",
            };
            if !ok {
                return Err(format!("config key {k:?}: expected {:?}", spec.kind).to_lowercase());
            }
        }
        for (k, spec) in &self.config {
            if spec.required && !config.contains_key(k) {
                return Err(format!("config key {k:?} is required by {}", self.name));
            }
        }
        Ok(())
    }
}

fn config_key(k: &str) -> Result<(), String> {
    let ok = !k.is_empty() && k.len() <= 64 && k.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(format!("config key {k:?}: lowercase letters, digits and _"))
    }
}

/// `*`, `host` or `host:port`.
pub fn host_pattern(p: &str) -> Result<(), String> {
    if p == "*" {
        return Ok(());
    }
    let (host, port) = match p.rsplit_once(':') {
        Some((h, port)) => (h, Some(port)),
        None => (p, None),
    };
    let host_ok = !host.is_empty() && host.len() <= 253 && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-');
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok_and(|n| n > 0));
    if host_ok && port_ok {
        Ok(())
    } else {
        Err(format!("http host {p:?}: *, a host name or address, optionally with :port"))
    }
}

/// Whether `host:port` is covered by `patterns`.
pub fn host_allowed(patterns: &[String], host: &str, port: u16) -> bool {
    let host = host.to_ascii_lowercase();
    patterns.iter().any(|p| {
        if p == "*" {
            return true;
        }
        match p.rsplit_once(':') {
            Some((h, pp)) if pp.parse::<u16>().is_ok() => h.eq_ignore_ascii_case(&host) && pp.parse::<u16>() == Ok(port),
            _ => p.eq_ignore_ascii_case(&host),
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
name = "scanner"
version = "0.1.0"
file = "scanner.wasm"
sha256 = "0000000000000000000000000000000000000000000000000000000000000000"
hooks = ["gate"]
[capabilities]
read_image = true
[config.deny_at]
description = "severity"
[config.max_layer_bytes]
type = "integer"
[limits]
timeout_ms = 500
"#;

    #[test]
    fn manifests_parse_and_are_checked() {
        let m = PluginManifest::parse(GOOD).unwrap();
        assert_eq!(m.hooks, [Hook::Gate]);
        assert!(m.capabilities.read_image && !m.capabilities.kv && m.capabilities.http.is_empty());
        assert_eq!((m.limits.timeout_ms, m.limits.memory_mib, m.limits.fail_open), (500, 64, false));
        let bad = |from: &str, to: &str| PluginManifest::parse(&GOOD.replace(from, to)).unwrap_err();
        assert!(bad("name = \"scanner\"", "name = \"Scanner!\"").contains("name"));
        assert!(bad("hooks = [\"gate\"]", "hooks = [\"gates\"]").contains("unknown variant"));
        assert!(bad("hooks = [\"gate\"]", "hooks = []").contains("hooks"));
        assert!(bad("read_image = true", "read_image = true\nfilesystem = true").contains("unknown field"));
        assert!(bad("sha256 = \"0000", "sha256 = \"zz00").contains("sha256"));
        assert!(bad("file = \"scanner.wasm\"", "file = \"../x.wasm\"").contains("file"));
        assert!(bad("timeout_ms = 500", "timeout_ms = 0").contains("timeout_ms"));
        assert!(bad("read_image = true", "http = [\"a b\"]").contains("http host"));
    }

    #[test]
    fn instance_config_is_checked_against_the_schema() {
        let m = PluginManifest::parse(GOOD).unwrap();
        let c = |pairs: &[(&str, &str)]| pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<BTreeMap<_, _>>();
        assert!(m.check_config(&c(&[("deny_at", "high"), ("max_layer_bytes", "100")])).is_ok());
        assert!(m.check_config(&c(&[("max_layer_bytes", "lots")])).unwrap_err().contains("integer"));
        assert!(m.check_config(&c(&[("colour", "red")])).unwrap_err().contains("not one of"));
    }

    #[test]
    fn hosts() {
        let p = vec!["hooks.example.com".to_string(), "127.0.0.1:9000".to_string()];
        assert!(host_allowed(&p, "HOOKS.example.com", 443));
        assert!(host_allowed(&p, "127.0.0.1", 9000));
        assert!(!host_allowed(&p, "127.0.0.1", 9001));
        assert!(!host_allowed(&p, "169.254.169.254", 80));
        assert!(host_allowed(&["*".to_string()], "anything", 1));
        assert!(!host_allowed(&[], "anything", 1));
    }
}
