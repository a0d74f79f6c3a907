//! casbin policies as code.
//!
//! The model (`policies/model.conf`) is fixed at start. The rules live in
//! SurrealDB (the `policy_rule` table, through [`MetadataAdapter`]) and are seeded
//! from `policies/policy.csv`: on start and whenever the file changes, lines added
//! to the file are added and lines removed from it are withdrawn, while rules
//! added through the API or CLI stay. Every change bumps a version in the
//! database; each node rebuilds its enforcer when it sees a new version, so a
//! change made on one replica reaches all of them without a restart.
//!
//! With the standard model a decision is a few hash lookups through
//! [`crate::rules::RuleIndex`], whatever the number of rules, and is not cached.
//! A directory with a model of its own is evaluated by casbin, which scans every
//! rule: those decisions are cached per (subject, domain, object, action) in a
//! bounded cache that evicts the least used entries (never all at once), emptied
//! by a rebuild; decisions about repositories that do not exist are not cached,
//! so probing random names cannot push the useful ones out.

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use async_trait::async_trait;
use berth_metadata::{Metadata, PolicyRuleRow};
use berth_oci::{ErrorCode, RegistryError};
use casbin::{Adapter, Filter};
use casbin::{CoreApi, DefaultModel, Enforcer, MgmtApi, Model};

use crate::rules::{self, RuleIndex};

/// The default model and policy, used when no `policies/` directory is configured.
pub const DEFAULT_MODEL: &str = include_str!("../../../policies/model.conf");
pub const DEFAULT_POLICY: &str = include_str!("../../../policies/policy.csv");

const MAX_CACHED_DECISIONS: usize = 100_000;

/// An authorization decision, with the rule that decided it when one matched.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The matching rule, `p, …` fields (the deny rule when a deny won).
    pub rule: Option<Vec<String>>,
}

/// Parse casbin CSV (`p, a, b, …` lines, `#` comments) into validated rules.
pub fn parse_rules(text: &str) -> Result<Vec<PolicyRuleRow>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let mut fields: Vec<String> = line.split(',').map(|f| f.trim().to_owned()).collect();
        let ptype = fields.remove(0);
        let rule = validate_rule(&ptype, fields).map_err(|e| format!("line {}: {}", i + 1, e.detail_or_message()))?;
        out.push(rule);
    }
    Ok(out)
}

/// Check a rule's shape: `p` has 5 fields ending in allow|deny with a known
/// action, `g` has 3, `g2` has 2; no field may contain a comma or be blank
/// where a name is required.
pub fn validate_rule(ptype: &str, fields: Vec<String>) -> Result<PolicyRuleRow, RegistryError> {
    let bad = |why: String| RegistryError::new(ErrorCode::InvalidRequest).with_detail(why);
    let fields: Vec<String> = fields.into_iter().map(|f| f.trim().to_owned()).collect();
    if fields.iter().any(|f| f.contains([',', '\n', '\r', '"'])) {
        return Err(bad("rule fields may not contain commas, quotes or newlines".into()));
    }
    let want = match ptype {
        "p" => 5,
        "g" => 3,
        "g2" => 2,
        other => return Err(bad(format!("unknown rule type {other:?} (expected p, g or g2)"))),
    };
    if fields.len() != want {
        return Err(bad(format!("a {ptype} rule has {want} fields, got {}", fields.len())));
    }
    if fields[0].is_empty() || fields[1].is_empty() {
        return Err(bad("subject and role fields may not be empty".into()));
    }
    if ptype == "p" {
        if fields[2].is_empty() {
            return Err(bad("object may not be empty".into()));
        }
        if !matches!(fields[3].as_str(), "pull" | "push" | "delete" | "admin" | "*") {
            return Err(bad(format!("unknown action {:?}", fields[3])));
        }
        if !matches!(fields[4].as_str(), "allow" | "deny") {
            return Err(bad(format!("effect must be allow or deny, got {:?}", fields[4])));
        }
    }
    Ok(PolicyRuleRow { ptype: ptype.to_owned(), fields })
}

/// Render rules as casbin CSV.
pub fn export_rules(rules: &[PolicyRuleRow]) -> String {
    let mut s = String::new();
    for r in rules {
        s.push_str(&r.ptype);
        for f in &r.fields {
            s.push_str(", ");
            s.push_str(f);
        }
        s.push('\n');
    }
    s
}

/// Where an adapter reads rules from.
enum Source {
    Db(Metadata),
    Rules(Vec<PolicyRuleRow>),
}

/// A casbin adapter over Berth's metadata store (or, for offline policy tests, a
/// fixed list of rules).
pub struct MetadataAdapter {
    source: Source,
}

impl MetadataAdapter {
    pub fn new(meta: Metadata) -> Self {
        MetadataAdapter { source: Source::Db(meta) }
    }

    pub fn fixed(rules: Vec<PolicyRuleRow>) -> Self {
        MetadataAdapter { source: Source::Rules(rules) }
    }

    fn err(e: impl std::fmt::Display) -> casbin::Error {
        casbin::Error::AdapterError(casbin::error::AdapterError(e.to_string().into()))
    }

    async fn change(&mut self, add: Vec<PolicyRuleRow>, remove: Vec<PolicyRuleRow>) -> casbin::Result<bool> {
        match &mut self.source {
            Source::Db(meta) => {
                meta.change_policy(&add, &remove, None).await.map_err(Self::err)?;
            }
            Source::Rules(rules) => {
                rules.retain(|r| !remove.contains(r));
                rules.extend(add);
            }
        }
        Ok(true)
    }
}

fn row(ptype: &str, rule: Vec<String>) -> PolicyRuleRow {
    PolicyRuleRow { ptype: ptype.to_owned(), fields: rule }
}

#[async_trait]
impl Adapter for MetadataAdapter {
    async fn load_policy(&mut self, m: &mut dyn Model) -> casbin::Result<()> {
        let rules = match &self.source {
            Source::Db(meta) => meta.policy_rules().await.map_err(Self::err)?,
            Source::Rules(r) => r.clone(),
        };
        let derived = derived_rules(&rules);
        for r in rules.into_iter().chain(derived) {
            let sec = if r.ptype.starts_with('g') { "g" } else { "p" };
            if let Some(ast) = m.get_mut_model().get_mut(sec).and_then(|s| s.get_mut(&r.ptype)) {
                ast.get_mut_policy().insert(r.fields);
            }
        }
        Ok(())
    }

    async fn load_filtered_policy<'a>(&mut self, m: &mut dyn Model, _f: Filter<'a>) -> casbin::Result<()> {
        self.load_policy(m).await
    }

    async fn save_policy(&mut self, m: &mut dyn Model) -> casbin::Result<()> {
        let mut all = Vec::new();
        for sec in ["p", "g"] {
            if let Some(map) = m.get_model().get(sec) {
                for (ptype, ast) in map {
                    all.extend(ast.get_policy().iter().map(|f| row(ptype, f.clone())));
                }
            }
        }
        let existing = match &self.source {
            Source::Db(meta) => meta.policy_rules().await.map_err(Self::err)?,
            Source::Rules(r) => r.clone(),
        };
        self.change(all, existing).await.map(|_| ())
    }

    async fn clear_policy(&mut self) -> casbin::Result<()> {
        let existing = match &self.source {
            Source::Db(meta) => meta.policy_rules().await.map_err(Self::err)?,
            Source::Rules(r) => r.clone(),
        };
        self.change(Vec::new(), existing).await.map(|_| ())
    }

    fn is_filtered(&self) -> bool {
        false
    }

    async fn add_policy(&mut self, _sec: &str, ptype: &str, rule: Vec<String>) -> casbin::Result<bool> {
        self.change(vec![row(ptype, rule)], Vec::new()).await
    }

    async fn add_policies(&mut self, _sec: &str, ptype: &str, rules: Vec<Vec<String>>) -> casbin::Result<bool> {
        self.change(rules.into_iter().map(|r| row(ptype, r)).collect(), Vec::new()).await
    }

    async fn remove_policy(&mut self, _sec: &str, ptype: &str, rule: Vec<String>) -> casbin::Result<bool> {
        self.change(Vec::new(), vec![row(ptype, rule)]).await
    }

    async fn remove_policies(&mut self, _sec: &str, ptype: &str, rules: Vec<Vec<String>>) -> casbin::Result<bool> {
        self.change(Vec::new(), rules.into_iter().map(|r| row(ptype, r)).collect()).await
    }

    async fn remove_filtered_policy(
        &mut self,
        _sec: &str,
        ptype: &str,
        field_index: usize,
        field_values: Vec<String>,
    ) -> casbin::Result<bool> {
        let existing = match &self.source {
            Source::Db(meta) => meta.policy_rules().await.map_err(Self::err)?,
            Source::Rules(r) => r.clone(),
        };
        let gone: Vec<PolicyRuleRow> = existing
            .into_iter()
            .filter(|r| {
                r.ptype == ptype
                    && field_values.iter().enumerate().all(|(i, v)| v.is_empty() || r.fields.get(field_index + i).is_some_and(|f| f == v))
            })
            .collect();
        let any = !gone.is_empty();
        self.change(Vec::new(), gone).await?;
        Ok(any)
    }
}

/// The roles that may push in their own tenant, and so through a push share.
pub const PUSH_ROLES: [&str; 3] = ["tenant-admin", "maintainer", "developer"];

/// The group of a tenant's members who may push in it (developer and up): the
/// subject of push shares to that tenant. Its membership is never stored: it is
/// derived from the role bindings whenever the policy loads ([`derived_rules`]),
/// so a role granted or withdrawn by any means moves it too.
pub fn pushers_group(tenant: &str) -> String {
    format!("{PUSHERS_PREFIX}{tenant}")
}

const PUSHERS_PREFIX: &str = "tenant-pushers:";

/// `g2, <user>, tenant-pushers:<tenant>` for every `g, <user>, role:<r>, <tenant>`
/// whose role may push.
pub fn derived_rules(rules: &[PolicyRuleRow]) -> Vec<PolicyRuleRow> {
    rules
        .iter()
        .filter(|r| r.ptype == "g" && r.fields.len() == 3)
        .filter(|r| r.fields[1].strip_prefix("role:").is_some_and(|role| PUSH_ROLES.contains(&role)))
        .map(|r| row("g2", vec![r.fields[0].clone(), pushers_group(&r.fields[2])]))
        .collect()
}

fn is_derived(r: &PolicyRuleRow) -> bool {
    r.ptype == "g2" && r.fields.get(1).is_some_and(|g| g.starts_with(PUSHERS_PREFIX))
}

/// Build an enforcer for `model` over `adapter`.
pub async fn build_enforcer(model: &str, adapter: MetadataAdapter) -> Result<Enforcer, String> {
    let m = DefaultModel::from_str(model).await.map_err(|e| format!("policy model: {e}"))?;
    let mut e = Enforcer::new(m, adapter).await.map_err(|e| format!("loading policy: {e}"))?;
    // casbin's default logger (its `explain` needs the `logging` feature) keeps a
    // terminal-logging thread and a 4,096-slot channel (420 KiB, touched) per
    // enforcer; replacing it ends that thread and frees the channel.
    e.set_logger(Box::new(TracingLog));
    Ok(e)
}

/// casbin's log: its policy-management events go to `tracing` (target `casbin`,
/// debug level); decisions are logged by the registry where it makes them.
struct TracingLog;

impl casbin::Logger for TracingLog {
    fn enable_log(&mut self, _enabled: bool) {}

    fn is_enabled(&self) -> bool {
        false
    }

    fn print_enforce_log(&self, _rvals: Vec<String>, _authorized: bool, _cached: bool) {}

    fn print_mgmt_log(&self, d: &casbin::EventData) {
        tracing::debug!(target: "casbin", event = %d, "policy management");
    }

    fn print_explain_log(&self, _rules: Vec<String>) {}

    fn print_status_log(&self, _enabled: bool) {}
}

/// Evaluate one request against an enforcer.
pub fn decide(e: &Enforcer, sub: &str, dom: &str, obj: &str, act: &str) -> Decision {
    match e.enforce_ex((sub, dom, obj, act)) {
        Ok((allowed, rules)) => Decision { allowed, rule: rules.into_iter().next() },
        Err(err) => {
            tracing::error!(error = %err, "policy evaluation failed; denying");
            Decision { allowed: false, rule: None }
        }
    }
}

struct Loaded {
    enforcer: Enforcer,
    /// The indexed evaluator, for the standard model.
    index: Option<RuleIndex>,
    version: u64,
    /// Sorted.
    rules: Vec<PolicyRuleRow>,
}

type Key = (String, String, String, &'static str);

/// The live policy of a running registry.
pub struct Policy {
    meta: Metadata,
    model: String,
    /// The seed file watched for changes, if any.
    seed_path: Option<PathBuf>,
    seed_text: tokio::sync::Mutex<String>,
    loaded: RwLock<Arc<Loaded>>,
    /// casbin's decisions, for a model other than the standard one.
    cache: quick_cache::sync::Cache<Key, Decision>,
    rebuild_lock: tokio::sync::Mutex<()>,
}

impl Policy {
    /// Load the model, apply the seed policy to the stored rules, build the enforcer.
    pub async fn open(meta: Metadata, policy_dir: Option<PathBuf>) -> Result<Policy, String> {
        let (model, seed_text, seed_path) = match &policy_dir {
            Some(dir) => {
                let model = std::fs::read_to_string(dir.join("model.conf"))
                    .map_err(|e| format!("reading {}: {e}", dir.join("model.conf").display()))?;
                let path = dir.join("policy.csv");
                let seed = std::fs::read_to_string(&path).map_err(|e| format!("reading {}: {e}", path.display()))?;
                (model, seed, Some(path))
            }
            None => (DEFAULT_MODEL.to_owned(), DEFAULT_POLICY.to_owned(), None),
        };
        // Fail early and clearly on a broken model or seed (this empty enforcer
        // stands in until the first rebuild below).
        let enforcer = build_enforcer(&model, MetadataAdapter::fixed(Vec::new())).await?;
        let seed = parse_rules(&seed_text).map_err(|e| format!("policy.csv: {e}"))?;
        let policy = Policy {
            meta,
            model,
            seed_path,
            seed_text: tokio::sync::Mutex::new(seed_text),
            loaded: RwLock::new(Arc::new(Loaded { enforcer, index: None, version: 0, rules: Vec::new() })),
            cache: quick_cache::sync::Cache::new(MAX_CACHED_DECISIONS),
            rebuild_lock: tokio::sync::Mutex::new(()),
        };
        policy.apply_seed(&seed).await?;
        policy.rebuild().await?;
        Ok(policy)
    }

    /// Bring the stored rules in line with a (new) seed file.
    async fn apply_seed(&self, seed: &[PolicyRuleRow]) -> Result<(), String> {
        let state = self.meta.policy_state().await.map_err(|e| e.to_string())?;
        let old: BTreeSet<&PolicyRuleRow> = state.seed.iter().collect();
        let new: BTreeSet<&PolicyRuleRow> = seed.iter().collect();
        let add: Vec<PolicyRuleRow> = new.difference(&old).map(|r| (*r).clone()).collect();
        let remove: Vec<PolicyRuleRow> = old.difference(&new).map(|r| (*r).clone()).collect();
        if add.is_empty() && remove.is_empty() && state.version > 0 {
            return Ok(());
        }
        self.meta.change_policy(&add, &remove, Some(seed)).await.map_err(|e| e.to_string())?;
        tracing::info!(added = add.len(), removed = remove.len(), "policy seed applied");
        Ok(())
    }

    /// Reload the rules from the store and swap in a new enforcer.
    pub async fn rebuild(&self) -> Result<(), String> {
        let _g = self.rebuild_lock.lock().await;
        let state = self.meta.policy_state().await.map_err(|e| e.to_string())?;
        let enforcer = build_enforcer(&self.model, MetadataAdapter::new(self.meta.clone())).await?;
        let mut rules: Vec<PolicyRuleRow> = enforcer.get_named_policy("p").into_iter().map(|f| row("p", f)).collect();
        for g in ["g", "g2"] {
            rules.extend(enforcer.get_named_grouping_policy(g).into_iter().map(|f| row(g, f)));
        }
        // Listed (and exported) are the rules as stored, not what loading derived.
        rules.retain(|r| !is_derived(r));
        rules.sort();
        let index = rules::is_standard_model(&self.model).then(|| {
            RuleIndex::new(
                enforcer.get_named_policy("p"),
                enforcer.get_named_grouping_policy("g"),
                enforcer.get_named_grouping_policy("g2"),
            )
        });
        *self.loaded.write().unwrap() = Arc::new(Loaded { enforcer, index, version: state.version, rules });
        self.cache.clear();
        tracing::debug!(version = state.version, "policy loaded");
        Ok(())
    }

    /// One reload tick: pick up changes from other replicas and from the seed file.
    pub async fn poll(&self) -> Result<(), String> {
        if let Some(path) = &self.seed_path {
            if let Ok(text) = tokio::fs::read_to_string(path).await {
                let mut current = self.seed_text.lock().await;
                if *current != text {
                    match parse_rules(&text) {
                        Ok(seed) => {
                            self.apply_seed(&seed).await?;
                            *current = text;
                            tracing::info!(path = %path.display(), "policy file changed; reloaded");
                        }
                        Err(e) => tracing::error!(path = %path.display(), error = %e, "policy file invalid; keeping the current policy"),
                    }
                }
            }
        }
        let state = self.meta.policy_state().await.map_err(|e| e.to_string())?;
        if state.version != self.version() {
            self.rebuild().await?;
        }
        Ok(())
    }

    pub fn version(&self) -> u64 {
        self.loaded.read().unwrap().version
    }

    /// Decide a request about an object that exists (or is not a repository).
    pub fn check(&self, sub: &str, dom: &str, obj: &str, act: &'static str) -> Decision {
        self.check_object(sub, dom, obj, act, || true)
    }

    /// Decide a request; `known`: whether the object exists, so that casbin's
    /// decision about it may be cached (see the module's notes; asked only then).
    pub fn check_object(&self, sub: &str, dom: &str, obj: &str, act: &'static str, known: impl FnOnce() -> bool) -> Decision {
        let loaded = self.loaded.read().unwrap().clone();
        if let Some(index) = &loaded.index {
            return index.decide(sub, dom, obj, act);
        }
        let key: Key = (sub.to_owned(), dom.to_owned(), obj.to_owned(), act);
        if let Some(d) = self.cache.get(&key) {
            return d;
        }
        let d = decide(&loaded.enforcer, sub, dom, obj, act);
        // Only cache if no rebuild happened meanwhile.
        if known() && Arc::ptr_eq(&loaded, &self.loaded.read().unwrap()) {
            self.cache.insert(key, d.clone());
        }
        d
    }

    /// Decide many requests of one subject (a listing): with the standard model
    /// its roles are resolved once. `list` is handed a checker of
    /// (domain, object, action).
    pub fn for_subject<T>(&self, sub: &str, list: impl FnOnce(&mut dyn FnMut(&str, &str, &'static str) -> bool) -> T) -> T {
        let loaded = self.loaded.read().unwrap().clone();
        match &loaded.index {
            Some(index) => {
                let mut subject = index.subject(sub);
                list(&mut |dom, obj, act| subject.decide(dom, obj, act).allowed)
            }
            None => list(&mut |dom, obj, act| self.check(sub, dom, obj, act).allowed),
        }
    }

    pub fn rules(&self) -> Vec<PolicyRuleRow> {
        self.loaded.read().unwrap().rules.clone()
    }

    /// The objects a public rule (`p, *, <domain>, <object>, pull, allow`, what
    /// [`crate::Auth::is_public`] looks for) names, each with its domains.
    pub fn public_objects(&self) -> HashMap<String, Vec<String>> {
        let mut out: HashMap<String, Vec<String>> = HashMap::new();
        for r in &self.loaded.read().unwrap().rules {
            let f = &r.fields;
            if r.ptype == "p" && f.len() == 5 && f[0] == "*" && f[3] == "pull" && f[4] == "allow" {
                out.entry(f[2].clone()).or_default().push(f[1].clone());
            }
        }
        out
    }

    /// Whether exactly this rule is stored (without copying the rules).
    pub fn has_rule(&self, rule: &PolicyRuleRow) -> bool {
        self.loaded.read().unwrap().rules.binary_search(rule).is_ok()
    }

    /// Push shares written before pushing through a share needed a pushing role
    /// named every member (`tenant:<t>`); they now name the pushers' group.
    pub async fn upgrade_push_shares(&self) -> Result<(), String> {
        let old: Vec<PolicyRuleRow> = self
            .rules()
            .into_iter()
            .filter(|r| r.ptype == "p" && r.fields[0].starts_with("tenant:") && matches!(r.fields[3].as_str(), "push" | "delete"))
            .collect();
        if old.is_empty() {
            return Ok(());
        }
        let new: Vec<PolicyRuleRow> = old
            .iter()
            .map(|r| {
                let mut f = r.fields.clone();
                f[0] = pushers_group(&f[0]["tenant:".len()..]);
                row("p", f)
            })
            .collect();
        tracing::info!(rules = old.len(), "push shares now grant push only to the other tenant's pushing roles");
        self.change(&new, &old).await
    }

    /// Add and remove rules (validated by the caller), then reload.
    pub async fn change(&self, add: &[PolicyRuleRow], remove: &[PolicyRuleRow]) -> Result<(), String> {
        let mut adapter = MetadataAdapter::new(self.meta.clone());
        adapter.change(add.to_vec(), remove.to_vec()).await.map_err(|e| e.to_string())?;
        self.rebuild().await
    }
}

/// One row of a policy test table.
#[derive(Debug)]
pub struct Expectation {
    pub line: usize,
    pub request: [String; 4],
    pub allow: bool,
}

/// Parse a test table: fixture rules (`p`, `g`, `g2` lines) and expectations
/// (`subject, domain, object, action, allow|deny`).
pub fn parse_table(text: &str) -> Result<(Vec<PolicyRuleRow>, Vec<Expectation>), String> {
    let mut fixtures = Vec::new();
    let mut expectations = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let mut f: Vec<String> = l.split(',').map(|s| s.trim().to_owned()).collect();
        if matches!(f[0].as_str(), "p" | "g" | "g2") {
            let ptype = f.remove(0);
            fixtures.push(validate_rule(&ptype, f).map_err(|e| format!("line {}: {}", i + 1, e.detail_or_message()))?);
            continue;
        }
        if f.len() != 5 {
            return Err(format!("line {}: expected subject, domain, object, action, allow|deny", i + 1));
        }
        let allow = match f[4].as_str() {
            "allow" => true,
            "deny" => false,
            other => return Err(format!("line {}: expected allow or deny, got {other:?}", i + 1)),
        };
        expectations.push(Expectation { line: i + 1, request: [f[0].clone(), f[1].clone(), f[2].clone(), f[3].clone()], allow });
    }
    Ok((fixtures, expectations))
}

/// Run a test table against `model` + `rules`; returns one line per mismatch.
pub async fn run_table(model: &str, rules: Vec<PolicyRuleRow>, table: &str) -> Result<(usize, Vec<String>), String> {
    let (fixtures, expectations) = parse_table(table)?;
    let mut all = rules;
    all.extend(fixtures);
    let e = build_enforcer(model, MetadataAdapter::fixed(all)).await?;
    // A running registry decides the standard model through the index: the
    // table holds for both evaluators.
    let index = rules::is_standard_model(model)
        .then(|| RuleIndex::new(e.get_named_policy("p"), e.get_named_grouping_policy("g"), e.get_named_grouping_policy("g2")));
    let mut failures = Vec::new();
    for x in &expectations {
        let [s, d, o, a] = &x.request;
        let got = decide(&e, s, d, o, a);
        if let Some(indexed) = index.as_ref().map(|i| i.decide(s, d, o, a)).filter(|i| i.allowed != got.allowed) {
            failures.push(format!(
                "line {}: {s}, {d}, {o}, {a}: casbin and the index disagree ({} vs {})",
                x.line, got.allowed, indexed.allowed
            ));
        }
        if got.allowed != x.allow {
            failures.push(format!(
                "line {}: {s}, {d}, {o}, {a}: expected {}, got {} (rule: {})",
                x.line,
                if x.allow { "allow" } else { "deny" },
                if got.allowed { "allow" } else { "deny" },
                got.rule.map(|r| r.join(", ")).unwrap_or_else(|| "none matched".into())
            ));
        }
    }
    Ok((expectations.len(), failures))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn default_policy_table_passes() {
        let rules = parse_rules(DEFAULT_POLICY).unwrap();
        let table = include_str!("../../../policies/tests/default.csv");
        let (n, failures) = run_table(DEFAULT_MODEL, rules, table).await.unwrap();
        assert!(n > 20);
        assert!(failures.is_empty(), "{failures:#?}");
    }

    #[tokio::test]
    async fn a_wrong_expectation_is_reported() {
        let rules = parse_rules(DEFAULT_POLICY).unwrap();
        let (_, failures) = run_table(DEFAULT_MODEL, rules, "anonymous, acme, acme/app, push, allow\n").await.unwrap();
        assert_eq!(failures.len(), 1);
    }

    /// A policy directory with a model of its own is decided by casbin, with a
    /// cache: decisions about objects that exist are kept, those about names
    /// that do not exist are not (probing random names fills nothing); the
    /// standard model is decided through the index and caches nothing.
    #[tokio::test]
    async fn only_decisions_about_existing_objects_are_cached() {
        let dir = tempfile::tempdir().unwrap();
        // The same rules in another order: not the standard text, so casbin decides.
        let model = DEFAULT_MODEL.replace(
            "(p.dom == \"*\" || p.dom == r.dom) && (p.act == \"*\" || p.act == r.act)",
            "(p.act == \"*\" || p.act == r.act) && (p.dom == \"*\" || p.dom == r.dom)",
        );
        assert_ne!(model, DEFAULT_MODEL);
        std::fs::write(dir.path().join("model.conf"), &model).unwrap();
        std::fs::write(dir.path().join("policy.csv"), DEFAULT_POLICY).unwrap();
        let meta = Metadata::connect(&berth_metadata::MetadataConfig::new("mem://")).await.unwrap();
        let custom = Policy::open(meta, Some(dir.path().to_owned())).await.unwrap();
        assert!(custom.loaded.read().unwrap().index.is_none());
        for i in 0..50 {
            let d = custom.check_object("anonymous", "", &format!("nobody/guess{i}"), "pull", || false);
            assert!(!d.allowed);
        }
        assert_eq!(custom.cache.len(), 0, "decisions about names that do not exist were cached");
        assert!(custom.check_object("anonymous", "library", "library/nginx", "pull", || true).allowed);
        assert!(!custom.check_object("anonymous", "library", "library/nginx", "push", || true).allowed);
        assert_eq!(custom.cache.len(), 2);
        assert!(custom.check_object("anonymous", "library", "library/nginx", "pull", || unreachable!("asked again")).allowed);

        let meta = Metadata::connect(&berth_metadata::MetadataConfig::new("mem://")).await.unwrap();
        let standard = Policy::open(meta, None).await.unwrap();
        assert!(standard.loaded.read().unwrap().index.is_some());
        assert!(
            standard.check_object("anonymous", "library", "library/nginx", "pull", || unreachable!("the index needs no cache")).allowed
        );
        assert_eq!(standard.cache.len(), 0);
    }

    #[test]
    fn rule_validation() {
        assert!(parse_rules("p, a, b, c, pull, allow\ng, u, role:x, t\ng2, u, tenant:t\n").is_ok());
        for bad in ["p, a, b, c, fly, allow", "p, a, b, c, pull, maybe", "p, a, b", "g, u, r", "x, a, b", "p, , b, c, pull, allow"] {
            assert!(parse_rules(bad).is_err(), "{bad}");
        }
    }
}
