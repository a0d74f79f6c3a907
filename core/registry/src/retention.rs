//! Retention policies: which tags and untagged manifests a policy deletes, runs
//! (on demand, dry or real, and on a schedule), and their audit records.
//!
//! A policy belongs to a repository or to a namespace (then it applies to each of
//! its repositories that has no policy of its own). Its rules:
//! - `keep_patterns`: tags matching any of these globs are always kept;
//! - `keep_last`: the N most recently pushed tags are kept;
//! - `unpulled_for`: tags neither pulled nor pushed for that long go;
//! - with both `keep_last` and `unpulled_for`, a tag goes only if it is outside
//!   the newest N *and* unpulled for that long; with `keep_last` alone, every tag
//!   outside the newest N goes;
//! - `untagged_older_than`: manifests no tag points at (counting the tags this
//!   run deletes), created longer ago than that, go — except referrers of
//!   manifests that stay and children of indexes that stay.
//!
//! Deleting goes through the same repository actors as the API's deletes (so
//! quotas and the collector see it like any other delete). Every run leaves an
//! audit record of what it deleted and why; a dry run lists exactly what a real
//! run would delete at that moment.

use std::collections::HashSet;

use berth_metadata::{RetentionItem, RetentionRules, RetentionRun};
use berth_oci::{AccountName, Digest, ErrorCode, Reference, RegistryError, RepoName, Tag};
use serde::Deserialize;

use crate::{internal, now_ms, Registry};

/// `[registry.retention]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    /// Run every enabled policy on a schedule.
    pub enabled: bool,
    pub interval_secs: u64,
    /// Audit records older than this many days are removed.
    pub keep_runs_days: u64,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        RetentionConfig { enabled: true, interval_secs: 3600, keep_runs_days: 90 }
    }
}

/// What a policy belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Repository(RepoName),
    Namespace(AccountName),
}

impl Scope {
    /// The stored key: `repo:<name>` or `ns:<namespace>`.
    pub fn key(&self) -> String {
        match self {
            Scope::Repository(r) => format!("repo:{r}"),
            Scope::Namespace(n) => format!("ns:{n}"),
        }
    }

    pub fn parse(key: &str) -> Option<Scope> {
        match key.split_once(':')? {
            ("repo", r) => r.parse().ok().map(Scope::Repository),
            ("ns", n) => n.parse().ok().map(Scope::Namespace),
            _ => None,
        }
    }
}

/// `*` matches any run of characters, `?` one character.
pub fn glob_match(pattern: &str, s: &str) -> bool {
    let (p, s): (Vec<char>, Vec<char>) = (pattern.chars().collect(), s.chars().collect());
    let (mut pi, mut si, mut star, mut mark) = (0, 0, None, 0);
    while si < s.len() {
        if pi < p.len() && (p[pi] == '?' || p[pi] == s[si]) {
            pi += 1;
            si += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = si;
            pi += 1;
        } else if let Some(st) = star {
            pi = st + 1;
            mark += 1;
            si = mark;
        } else {
            return false;
        }
    }
    p[pi..].iter().all(|c| *c == '*')
}

const MAX_SECS: u64 = 100 * 365 * 24 * 3600;

fn bad(detail: String) -> RegistryError {
    RegistryError::new(ErrorCode::InvalidRequest).with_detail(detail)
}

/// Refuse rules that make no sense, with the reason.
pub fn check_rules(r: &RetentionRules) -> Result<(), RegistryError> {
    if r.keep_last.is_none() && r.unpulled_for_secs.is_none() && r.untagged_older_than_secs.is_none() {
        return Err(bad("the policy deletes nothing: set keep_last, unpulled_for or untagged_older_than".into()));
    }
    if r.keep_last.is_some_and(|n| n > 100_000) {
        return Err(bad("keep_last is at most 100000".into()));
    }
    if r.keep_patterns.len() > 32 {
        return Err(bad("at most 32 keep_patterns".into()));
    }
    for p in &r.keep_patterns {
        let ok = !p.is_empty() && p.len() <= 128 && p.chars().all(|c| c.is_ascii_alphanumeric() || "_.-*?".contains(c));
        if !ok {
            return Err(bad(format!("keep pattern {p:?}: 1-128 of [A-Za-z0-9_.-] and the wildcards * and ?")));
        }
    }
    for (what, v) in [("unpulled_for", r.unpulled_for_secs), ("untagged_older_than", r.untagged_older_than_secs)] {
        if v.is_some_and(|s| s == 0 || s > MAX_SECS) {
            return Err(bad(format!("{what} must be from 1 second to 100 years")));
        }
    }
    Ok(())
}

/// A tag as the rules see it.
#[derive(Clone, Debug)]
pub struct TagFact {
    pub name: Tag,
    pub pushed_ms: i64,
    pub last_pulled_ms: Option<i64>,
}

/// `90d`, `12h`, `30m`, `45s`: the largest unit that divides exactly.
pub fn human_secs(s: u64) -> String {
    for (unit, n) in [("w", 604_800), ("d", 86_400), ("h", 3_600), ("m", 60)] {
        if s >= n && s.is_multiple_of(n) {
            return format!("{}{unit}", s / n);
        }
    }
    format!("{s}s")
}

/// The tags the rules delete, each with its reason.
pub fn doomed_tags(r: &RetentionRules, tags: &[TagFact], now_ms: i64) -> Vec<(Tag, String)> {
    let mut by_push: Vec<&TagFact> = tags.iter().collect();
    by_push.sort_by(|a, b| b.pushed_ms.cmp(&a.pushed_ms).then_with(|| a.name.cmp(&b.name)));
    let newest: HashSet<&Tag> = by_push.iter().take(r.keep_last.unwrap_or(u32::MAX) as usize).map(|t| &t.name).collect();
    let mut out = vec![];
    for t in by_push {
        if r.keep_patterns.iter().any(|p| glob_match(p, t.name.as_str())) {
            continue;
        }
        let outside = r.keep_last.map(|n| (!newest.contains(&t.name), n));
        let stale = r.unpulled_for_secs.map(|d| {
            let last = t.pushed_ms.max(t.last_pulled_ms.unwrap_or(0));
            (last < now_ms.saturating_sub((d as i64).saturating_mul(1000)), d)
        });
        let reason = match (outside, stale) {
            (Some((true, n)), None) => format!("not among the {n} most recently pushed tags"),
            (None, Some((true, d))) => format!("neither pulled nor pushed for {}", human_secs(d)),
            (Some((true, n)), Some((true, d))) => {
                format!("not among the {n} most recently pushed tags, and neither pulled nor pushed for {}", human_secs(d))
            }
            _ => continue,
        };
        out.push((t.name.clone(), reason));
    }
    out
}

impl Registry {
    pub async fn retention_policy(&self, scope: &Scope) -> Result<Option<berth_metadata::RetentionPolicy>, RegistryError> {
        self.meta.retention(&scope.key()).await.map_err(|e| internal("read retention policy", e))
    }

    /// Set (replace) a scope's policy; the caller checked the rules.
    pub async fn set_retention_policy(
        &self,
        scope: &Scope,
        rules: RetentionRules,
        enabled: bool,
    ) -> Result<berth_metadata::RetentionPolicy, RegistryError> {
        let p = berth_metadata::RetentionPolicy { scope: scope.key(), rules, enabled, updated_ms: now_ms() };
        self.meta.put_retention(&p).await.map_err(|e| internal("store retention policy", e))?;
        Ok(p)
    }

    /// `false` if the scope had none.
    pub async fn delete_retention_policy(&self, scope: &Scope) -> Result<bool, RegistryError> {
        self.meta.delete_retention(&scope.key()).await.map_err(|e| internal("delete retention policy", e))
    }

    /// Every recorded run, newest first.
    pub async fn retention_runs(&self) -> Result<Vec<RetentionRun>, RegistryError> {
        self.meta.retention_runs(None, usize::MAX >> 1).await.map_err(|e| internal("list retention runs", e))
    }

    /// What `rules` delete in `repo` now: tags first, then untagged manifests.
    pub async fn retention_plan(&self, repo: &RepoName, r: &RetentionRules) -> Result<Vec<RetentionItem>, RegistryError> {
        let now = now_ms();
        let infos = self.meta.tag_infos(repo).await.map_err(|e| internal("list tags", e))?;
        let facts: Vec<TagFact> =
            infos.iter().map(|t| TagFact { name: t.name.clone(), pushed_ms: t.pushed_ms, last_pulled_ms: t.last_pulled_ms }).collect();
        let doomed = doomed_tags(r, &facts, now);
        let doomed_names: HashSet<&Tag> = doomed.iter().map(|(t, _)| t).collect();
        let item =
            |kind: &str, name: String, reason: String| RetentionItem { repository: repo.to_string(), kind: kind.into(), name, reason };
        let mut items: Vec<RetentionItem> = doomed.iter().map(|(t, why)| item("tag", t.to_string(), why.clone())).collect();
        let Some(d) = r.untagged_older_than_secs else { return Ok(items) };
        let cutoff = now.saturating_sub((d as i64).saturating_mul(1000));
        let still_tagged: HashSet<Digest> = infos.iter().filter(|t| !doomed_names.contains(&t.name)).map(|t| t.digest.clone()).collect();
        let Some(state) = self.peek(repo).await? else { return Ok(items) };
        let mut going: HashSet<Digest> = {
            let s = state.read().unwrap();
            s.manifests
                .values()
                .filter(|m| !still_tagged.contains(&m.row.digest) && m.row.created_ms < cutoff)
                .map(|m| m.row.digest.clone())
                .collect()
        };
        // Referrers (signatures, SBOMs) of a manifest that stays stay with it.
        loop {
            let s = state.read().unwrap();
            let keep: Vec<Digest> = going
                .iter()
                .filter(|d| s.manifests[*d].row.subject.as_ref().is_some_and(|sub| s.manifests.contains_key(sub) && !going.contains(sub)))
                .cloned()
                .collect();
            if keep.is_empty() {
                break;
            }
            for d in keep {
                going.remove(&d);
            }
        }
        // Children of indexes that stay are needed by them.
        let going_list: Vec<Digest> = going.iter().cloned().collect();
        for child in self.index_children(repo, &going_list).await? {
            going.remove(&child);
        }
        let mut going: Vec<Digest> = going.into_iter().collect();
        going.sort();
        items.extend(
            going.into_iter().map(|d| item("manifest", d.to_string(), format!("untagged for longer than {}", human_secs(d_secs(r))))),
        );
        Ok(items)
    }

    /// Run a policy over its scope (a repository, or each repository of a
    /// namespace without a policy of its own); record the run unless it is a
    /// scheduled run that found nothing.
    pub async fn run_retention(&self, scope: &Scope, r: &RetentionRules, by: &str, dry_run: bool) -> Result<RetentionRun, RegistryError> {
        let started = now_ms();
        let repos: Vec<RepoName> = match scope {
            Scope::Repository(repo) => {
                if !self.repo_exists(repo).await? {
                    return Err(RegistryError::new(ErrorCode::NameUnknown).with_detail(format!("repository {repo} is unknown")));
                }
                vec![repo.clone()]
            }
            Scope::Namespace(ns) => {
                let mut out = vec![];
                for repo in self.index.repo_names().into_iter().filter(|r| r.namespace() == ns.as_str()) {
                    let own = self.meta.retention(&Scope::Repository(repo.clone()).key()).await.map_err(|e| internal("read policy", e))?;
                    if own.is_none() {
                        out.push(repo);
                    }
                }
                out
            }
        };
        let mut run =
            RetentionRun { scope: scope.key(), started_ms: started, finished_ms: 0, dry_run, by: by.into(), items: vec![], errors: vec![] };
        for repo in repos {
            let plan = match self.retention_plan(&repo, r).await {
                Ok(p) => p,
                Err(e) => {
                    run.errors.push(format!("{repo}: {}", e.detail_or_message()));
                    continue;
                }
            };
            for it in plan {
                if !dry_run {
                    let reference = match it.kind.as_str() {
                        "tag" => it.name.parse::<Tag>().map(Reference::Tag),
                        _ => it.name.parse::<Digest>().map(Reference::Digest),
                    };
                    let result = match reference {
                        Ok(reference) => self.delete_manifest(&repo, &reference, by).await,
                        Err(e) => Err(e),
                    };
                    match result {
                        Ok(()) => {}
                        // Deleted meanwhile (by someone else, or with its tags): gone either way.
                        Err(e) if e.code() == ErrorCode::ManifestUnknown => continue,
                        Err(e) => {
                            run.errors.push(format!("{repo} {} {}: {}", it.kind, it.name, e.detail_or_message()));
                            continue;
                        }
                    }
                }
                run.items.push(it);
            }
        }
        run.finished_ms = now_ms();
        self.metrics.retention_run(&run);
        if by != SCHEDULE || !run.items.is_empty() || !run.errors.is_empty() {
            self.meta.record_retention_run(&run).await.map_err(|e| internal("record retention run", e))?;
        }
        if !run.items.is_empty() {
            tracing::info!(scope = %run.scope, by, dry_run, deleted = run.items.len(), "retention run");
        }
        Ok(run)
    }

    /// Run every enabled policy once (what the schedule does).
    pub async fn run_all_retention(&self) {
        let policies = match self.meta.retention_policies().await {
            Ok(p) => p,
            Err(e) => {
                tracing::warn!(error = %e, "listing retention policies failed");
                return;
            }
        };
        for p in policies.into_iter().filter(|p| p.enabled) {
            let Some(scope) = Scope::parse(&p.scope) else { continue };
            match self.run_retention(&scope, &p.rules, SCHEDULE, false).await {
                Ok(_) => {}
                // A policy whose repository is gone has nothing to do.
                Err(e) if e.code() == ErrorCode::NameUnknown => {}
                Err(e) => tracing::warn!(scope = %p.scope, error = %e.detail_or_message(), "retention run failed"),
            }
        }
        let keep_ms = (self.config.retention.keep_runs_days as i64).saturating_mul(86_400_000);
        if let Err(e) = self.meta.prune_retention_runs(now_ms().saturating_sub(keep_ms)).await {
            tracing::warn!(error = %e, "pruning retention records failed");
        }
    }
}

fn d_secs(r: &RetentionRules) -> u64 {
    r.untagged_older_than_secs.unwrap_or(0)
}

/// Who the schedule's runs are by.
pub const SCHEDULE: &str = "schedule";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob_match("latest", "latest"));
        assert!(glob_match("v*", "v1.2.3"));
        assert!(glob_match("v*", "v"));
        assert!(!glob_match("v*", "release-v1"));
        assert!(glob_match("*-rc?", "1.0-rc1"));
        assert!(!glob_match("*-rc?", "1.0-rc10"));
        assert!(glob_match("*", ""));
        assert!(glob_match("a*b*c", "aXXbYYc"));
        assert!(!glob_match("a*b*c", "aXXbYY"));
    }

    fn fact(name: &str, pushed_ms: i64, pulled: Option<i64>) -> TagFact {
        TagFact { name: name.parse().unwrap(), pushed_ms, last_pulled_ms: pulled }
    }

    #[test]
    fn rules_pick_tags() {
        let day = 86_400_000;
        let now = 100 * day;
        let tags = vec![
            fact("latest", day, None),
            fact("v1", 2 * day, None),
            fact("b1", 3 * day, Some(99 * day)),
            fact("b2", 4 * day, None),
            fact("b3", 98 * day, None),
            fact("b4", 99 * day, None),
        ];
        let names = |v: Vec<(Tag, String)>| v.into_iter().map(|(t, _)| t.to_string()).collect::<Vec<_>>();
        let keep = vec!["latest".to_string(), "v*".to_string()];
        // Keep the newest two (b4, b3) and the patterns: b1 and b2 go.
        let r = RetentionRules { keep_last: Some(2), keep_patterns: keep.clone(), ..Default::default() };
        assert_eq!(names(doomed_tags(&r, &tags, now)), ["b2", "b1"]);
        // Unpulled for 30 days: b2 (never pulled, pushed day 4) goes; b1 was pulled yesterday.
        let r = RetentionRules { unpulled_for_secs: Some(30 * 86_400), keep_patterns: keep.clone(), ..Default::default() };
        assert_eq!(names(doomed_tags(&r, &tags, now)), ["b2"]);
        // Both: outside the newest two and unpulled.
        let r = RetentionRules { keep_last: Some(2), unpulled_for_secs: Some(30 * 86_400), keep_patterns: keep, ..Default::default() };
        assert_eq!(names(doomed_tags(&r, &tags, now)), ["b2"]);
        // No patterns: latest and v1 are old and unpulled too.
        let r = RetentionRules { keep_last: Some(2), ..Default::default() };
        assert_eq!(names(doomed_tags(&r, &tags, now)), ["b2", "b1", "v1", "latest"]);
        assert!(doomed_tags(&RetentionRules { untagged_older_than_secs: Some(1), ..Default::default() }, &tags, now).is_empty());
    }

    #[test]
    fn rules_are_checked() {
        assert!(check_rules(&RetentionRules::default()).is_err());
        assert!(check_rules(&RetentionRules { keep_last: Some(3), ..Default::default() }).is_ok());
        assert!(check_rules(&RetentionRules { keep_last: Some(1_000_000), ..Default::default() }).is_err());
        let p = |s: &str| RetentionRules { keep_last: Some(1), keep_patterns: vec![s.into()], ..Default::default() };
        assert!(check_rules(&p("v*")).is_ok());
        assert!(check_rules(&p("")).is_err());
        assert!(check_rules(&p("a/b")).is_err());
        assert!(check_rules(&RetentionRules { unpulled_for_secs: Some(0), ..Default::default() }).is_err());
        assert_eq!(human_secs(90 * 86_400), "90d");
        assert_eq!(human_secs(14 * 86_400), "2w");
        assert_eq!(human_secs(3_601), "3601s");
        assert_eq!(Scope::parse("repo:acme/app"), Some(Scope::Repository("acme/app".parse().unwrap())));
        assert_eq!(Scope::parse("ns:acme").map(|s| s.key()), Some("ns:acme".into()));
        assert_eq!(Scope::parse("team:x"), None);
    }
}
