//! The scanner: a push gate over an image's manifest and config.
//!
//! Rules (each a finding with a severity; the push is denied when any finding
//! reaches `deny_at`, otherwise allowed with the findings kept beside it):
//! - `secret-in-env` / `secret-in-label` (critical or high): an ENV value or a
//!   label that looks like a cloud key, a private key or a token (built-in
//!   patterns, plus `extra_secret_patterns`, one regular expression per line).
//!   The value itself is never repeated in a finding.
//! - `runs-as-root` (high): the image's user is root (empty, `root` or `0`) in a
//!   repository matching `non_root_repositories` (comma-separated, `*` globs).
//! - `layer-too-large` (medium): a layer over `max_layer_bytes`.
//! - `missing-annotation` (low): a key of `required_annotations`
//!   (comma-separated) absent from the manifest's annotations.
//!
//! Configuration: `deny_at` = info | low | medium | high (default) | critical | never.

use berth_plugin::{export, host, Finding, Plugin, PluginError, Push, Severity, Verdict};
use regex::Regex;
use serde::Deserialize;
use std::collections::BTreeMap;

struct Scanner;

#[derive(Deserialize)]
struct Descriptor {
    digest: String,
    #[serde(default)]
    size: u64,
}

#[derive(Deserialize)]
struct Manifest {
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Vec<Descriptor>,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    labels: Option<BTreeMap<String, String>>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct ImageConfig {
    #[serde(default)]
    config: Option<RunConfig>,
}

/// Built-in secret patterns: (name, severity, expression).
const PATTERNS: &[(&str, Severity, &str)] = &[
    ("an AWS access key id", Severity::Critical, r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    ("a private key", Severity::Critical, r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    ("a GitHub token", Severity::Critical, r"\bgh[pousr]_[A-Za-z0-9]{36,}\b"),
    ("a Slack token", Severity::High, r"\bxox[abprs]-[A-Za-z0-9-]{10,}\b"),
    ("a Google API key", Severity::High, r"\bAIza[0-9A-Za-z_-]{35}\b"),
    ("a JSON web token", Severity::High, r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\b"),
];

/// Variable names that hold secrets whatever their value looks like.
const SECRET_NAMES: &str = r"(?i)^(.*_)?(password|passwd|secret|secret_key|api_key|apikey|access_key|private_key|token|auth_token)$";

fn rank(s: Severity) -> u8 {
    match s {
        Severity::Info => 0,
        Severity::Low => 1,
        Severity::Medium => 2,
        Severity::High => 3,
        Severity::Critical => 4,
    }
}

fn severity_name(s: Severity) -> &'static str {
    ["info", "low", "medium", "high", "critical"][rank(s) as usize]
}

fn list(key: &str) -> Vec<String> {
    host::config(key).unwrap_or_default().split(',').map(str::trim).filter(|s| !s.is_empty()).map(String::from).collect()
}

/// `*` matches any run of characters, including `/`.
fn glob(pattern: &str, text: &str) -> bool {
    let mut parts = pattern.split('*');
    let first = parts.next().unwrap_or("");
    let Some(mut rest) = text.strip_prefix(first) else { return false };
    let parts: Vec<&str> = parts.collect();
    for (i, p) in parts.iter().enumerate() {
        if i == parts.len() - 1 {
            return rest.ends_with(p);
        }
        match rest.find(p) {
            Some(at) => rest = &rest[at + p.len()..],
            None => return false,
        }
    }
    rest.is_empty()
}

struct Rules {
    patterns: Vec<(String, Severity, Regex)>,
    secret_names: Regex,
}

impl Rules {
    fn load() -> Result<Rules, PluginError> {
        let mut patterns = vec![];
        for (name, sev, re) in PATTERNS {
            patterns.push((name.to_string(), *sev, Regex::new(re).map_err(|e| PluginError::Failed(e.to_string()))?));
        }
        for (i, line) in
            host::config("extra_secret_patterns").unwrap_or_default().lines().map(str::trim).filter(|l| !l.is_empty()).enumerate()
        {
            let re = Regex::new(line).map_err(|e| PluginError::InvalidConfig(format!("extra_secret_patterns line {}: {e}", i + 1)))?;
            patterns.push((format!("custom pattern {}", i + 1), Severity::High, re));
        }
        Ok(Rules { patterns, secret_names: Regex::new(SECRET_NAMES).map_err(|e| PluginError::Failed(e.to_string()))? })
    }

    /// The worst secret pattern `value` matches.
    fn secret(&self, value: &str) -> Option<(&str, Severity)> {
        self.patterns.iter().filter(|(_, _, re)| re.is_match(value)).map(|(n, s, _)| (n.as_str(), *s)).max_by_key(|(_, s)| rank(*s))
    }
}

fn finding(rule: &str, severity: Severity, message: String) -> Finding {
    Finding { rule: rule.into(), severity, message }
}

fn scan(push: &Push, rules: &Rules) -> Result<Vec<Finding>, PluginError> {
    let unavailable = |what: &str, e: berth_plugin::HostError| PluginError::Failed(format!("reading the {what}: {e:?}"));
    let body = host::manifest().map_err(|e| unavailable("manifest", e))?;
    let manifest: Manifest = serde_json::from_slice(&body).map_err(|e| PluginError::Failed(format!("manifest: {e}")))?;
    let mut out = vec![];

    for key in list("required_annotations") {
        if !manifest.annotations.contains_key(&key) {
            out.push(finding("missing-annotation", Severity::Low, format!("the manifest has no {key} annotation")));
        }
    }
    if let Some(max) = host::config("max_layer_bytes") {
        let max: u64 = max.trim().parse().map_err(|_| PluginError::InvalidConfig(format!("max_layer_bytes {max:?} is not a number")))?;
        for l in manifest.layers.iter().filter(|l| l.size > max) {
            out.push(finding(
                "layer-too-large",
                Severity::Medium,
                format!("layer {} is {} bytes, over the limit of {max}", l.digest, l.size),
            ));
        }
    }

    // An image (not an index, not an artifact without a runnable config).
    let Some(config) = manifest.config.as_ref().filter(|_| !manifest.layers.is_empty()) else { return Ok(out) };
    let raw = host::blob_all(&config.digest).map_err(|e| unavailable("image config", e))?;
    let image: ImageConfig = serde_json::from_slice(&raw).unwrap_or_default();
    let run = image.config.unwrap_or_default();
    for entry in run.env.unwrap_or_default() {
        let (name, value) = entry.split_once('=').unwrap_or((entry.as_str(), ""));
        if let Some((what, sev)) = rules.secret(value) {
            out.push(finding("secret-in-env", sev, format!("ENV {name} holds what looks like {what}")));
        } else if !value.is_empty() && rules.secret_names.is_match(name) {
            out.push(finding("secret-in-env", Severity::High, format!("ENV {name} sets a secret in the image")));
        }
    }
    for (name, value) in run.labels.unwrap_or_default() {
        if let Some((what, sev)) = rules.secret(&value) {
            out.push(finding("secret-in-label", sev, format!("label {name} holds what looks like {what}")));
        }
    }
    if list("non_root_repositories").iter().any(|p| glob(p, &push.repository)) {
        let user = run.user.unwrap_or_default();
        let name = user.split(':').next().unwrap_or("");
        if name.is_empty() || name == "root" || name == "0" {
            let shown = if user.is_empty() { "no user (root)".to_string() } else { format!("user {user:?}") };
            out.push(finding(
                "runs-as-root",
                Severity::High,
                format!("{} requires a non-root user; the image runs as {shown}", push.repository),
            ));
        }
    }
    Ok(out)
}

impl Plugin for Scanner {
    fn gate(push: Push) -> Result<Verdict, PluginError> {
        let deny_at = match host::config("deny_at").as_deref().map(str::trim) {
            None | Some("high") => Some(Severity::High),
            Some("info") => Some(Severity::Info),
            Some("low") => Some(Severity::Low),
            Some("medium") => Some(Severity::Medium),
            Some("critical") => Some(Severity::Critical),
            Some("never") => None,
            Some(other) => {
                return Err(PluginError::InvalidConfig(format!("deny_at {other:?}: info, low, medium, high, critical or never")))
            }
        };
        let rules = Rules::load()?;
        let mut findings = scan(&push, &rules)?;
        findings.sort_by_key(|f| std::cmp::Reverse(rank(f.severity)));
        if let Some(limit) = deny_at {
            let blocking: Vec<String> = findings
                .iter()
                .filter(|f| rank(f.severity) >= rank(limit))
                .map(|f| format!("{} ({}): {}", f.rule, severity_name(f.severity), f.message))
                .collect();
            if !blocking.is_empty() {
                return Ok(Verdict::Deny(blocking.join("; ")));
            }
        }
        Ok(if findings.is_empty() { Verdict::Allow } else { Verdict::Annotate(findings) })
    }
}

export!(Scanner);

#[cfg(test)]
mod tests {
    use super::glob;

    #[test]
    fn globs() {
        assert!(glob("prod/*", "prod/api"));
        assert!(glob("*", "x/y"));
        assert!(glob("acme/*-secure", "acme/api-secure"));
        assert!(!glob("acme/*-secure", "acme/api"));
        assert!(glob("acme/app", "acme/app"));
        assert!(!glob("acme/app", "acme/apps"));
    }
}
