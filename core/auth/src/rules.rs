//! Berth's standard model (`policies/model.conf`), evaluated through indexes.
//!
//! casbin decides a request by evaluating the matcher (a script) against every
//! `p` rule, and resolves a subject nobody bound to a role by scanning every
//! role node: the cost of an uncached decision grows with the rules (1,000
//! public repositories are 1,000 script runs per decision, and a catalog makes
//! one decision per repository). For the standard model the matcher is known:
//!
//! ```text
//! (p.dom == "*" || p.dom == r.dom) && (p.act == "*" || p.act == r.act)
//!   && keyMatch(r.obj, p.obj) && (p.sub == "*" || g(r.sub, p.sub, r.dom) || g2(r.sub, p.sub))
//! ```
//!
//! so the rules that can match are found by hash lookups: by domain (`*` and
//! the request's), then by object (the exact name, and each prefix of it that a
//! `prefix*` pattern names), at most one lookup per distinct pattern length. The
//! subject's roles are the reachable set of `g` in the request's domain and of
//! `g2`, as casbin's role manager walks them (a name reaches itself; at most 10
//! levels). Among the candidates, in the rules' order, the first matching deny
//! decides (denied) and otherwise the first matching allow (allowed): the effect
//! `some(allow) && !some(deny)`.
//!
//! A policy directory with another model is evaluated by casbin itself
//! ([`is_standard_model`] says which); tests check both give the same decisions.

use std::collections::{HashMap, HashSet};

use crate::policy::Decision;

/// casbin's role manager depth (`DefaultRoleManager::new(10)`).
const MAX_ROLE_DEPTH: usize = 10;

/// Whether `model` is the standard model (comments and blank space aside).
pub fn is_standard_model(model: &str) -> bool {
    normalize(model) == normalize(crate::policy::DEFAULT_MODEL)
}

fn normalize(model: &str) -> String {
    model
        .lines()
        .map(|l| l.split('#').next().unwrap_or(""))
        .flat_map(|l| l.chars().filter(|c| !c.is_whitespace()).chain(std::iter::once('\n')))
        .collect::<String>()
        .split('\n')
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("\n")
}

/// One `p` rule: subject, domain, object, action, effect.
struct Rule {
    fields: Vec<String>,
    effect: Effect,
}

#[derive(Clone, Copy, PartialEq)]
enum Effect {
    Allow,
    Deny,
    /// Any other value: casbin counts it as neither.
    Neither,
}

/// The rules of one `p.dom` value.
#[derive(Default)]
struct Domain {
    /// By object, for objects without `*`.
    exact: HashMap<String, Vec<u32>>,
    /// By the part before the first `*` (casbin's `keyMatch` ignores the rest).
    prefix: HashMap<String, Vec<u32>>,
    /// The lengths of those parts, ascending: the only prefixes worth a lookup.
    prefix_lens: Vec<usize>,
}

/// The loaded rules, indexed.
#[derive(Default)]
pub struct RuleIndex {
    rules: Vec<Rule>,
    domains: HashMap<String, Domain>,
    /// `g, name, role, domain`: domain → name → roles.
    g: HashMap<String, HashMap<String, Vec<String>>>,
    /// `g2, name, group`: name → groups.
    g2: HashMap<String, Vec<String>>,
}

impl RuleIndex {
    /// Index `p` rules (in evaluation order), `g` and `g2` lines.
    pub fn new(p: Vec<Vec<String>>, g: Vec<Vec<String>>, g2: Vec<Vec<String>>) -> RuleIndex {
        let mut index = RuleIndex::default();
        for fields in p {
            if fields.len() < 5 {
                continue;
            }
            let effect = match fields[4].as_str() {
                "allow" => Effect::Allow,
                "deny" => Effect::Deny,
                _ => Effect::Neither,
            };
            let at = index.rules.len() as u32;
            let domain = index.domains.entry(fields[1].clone()).or_default();
            match fields[2].find('*') {
                Some(i) => {
                    domain.prefix.entry(fields[2][..i].to_owned()).or_default().push(at);
                    if let Err(p) = domain.prefix_lens.binary_search(&i) {
                        domain.prefix_lens.insert(p, i);
                    }
                }
                None => domain.exact.entry(fields[2].clone()).or_default().push(at),
            }
            index.rules.push(Rule { fields, effect });
        }
        for f in g.into_iter().filter(|f| f.len() >= 3) {
            let roles = index.g.entry(f[2].clone()).or_default().entry(f[0].clone()).or_default();
            if !roles.contains(&f[1]) {
                roles.push(f[1].clone());
            }
        }
        for f in g2.into_iter().filter(|f| f.len() >= 2) {
            let groups = index.g2.entry(f[0].clone()).or_default();
            if !groups.contains(&f[1]) {
                groups.push(f[1].clone());
            }
        }
        index
    }

    /// The subject's roles and groups, for deciding many requests of one subject.
    pub fn subject<'a>(&'a self, sub: &'a str) -> Subject<'a> {
        Subject { index: self, sub, groups: reach(sub, |n| self.g2.get(n)), roles: HashMap::new() }
    }

    /// Decide one request.
    pub fn decide(&self, sub: &str, dom: &str, obj: &str, act: &str) -> Decision {
        self.subject(sub).decide(dom, obj, act)
    }

    /// The rules that can match `dom` and `obj`, in evaluation order.
    fn candidates(&self, dom: &str, obj: &str) -> Vec<u32> {
        let mut out = Vec::new();
        for key in ["*", dom] {
            let Some(d) = self.domains.get(key) else { continue };
            if let Some(v) = d.exact.get(obj) {
                out.extend_from_slice(v);
            }
            if !d.prefix.is_empty() {
                for &end in d.prefix_lens.iter().take_while(|&&l| l <= obj.len()).filter(|&&l| obj.is_char_boundary(l)) {
                    if let Some(v) = d.prefix.get(&obj[..end]) {
                        out.extend_from_slice(v);
                    }
                }
            }
            if dom == "*" {
                break;
            }
        }
        out.sort_unstable();
        out.dedup();
        out
    }
}

/// Everything `start` reaches through `next` (itself included), at most
/// [`MAX_ROLE_DEPTH`] steps away.
fn reach<'a>(start: &'a str, next: impl Fn(&str) -> Option<&'a Vec<String>>) -> HashSet<&'a str> {
    let mut seen: HashSet<&'a str> = HashSet::from([start]);
    let mut frontier = vec![start];
    for _ in 0..MAX_ROLE_DEPTH {
        let mut following = Vec::new();
        for name in frontier {
            for role in next(name).into_iter().flatten() {
                if seen.insert(role.as_str()) {
                    following.push(role.as_str());
                }
            }
        }
        if following.is_empty() {
            break;
        }
        frontier = following;
    }
    seen
}

/// One subject's decisions: its `g2` groups, and its roles per domain as asked.
pub struct Subject<'a> {
    index: &'a RuleIndex,
    sub: &'a str,
    groups: HashSet<&'a str>,
    roles: HashMap<String, HashSet<&'a str>>,
}

impl Subject<'_> {
    pub fn decide(&mut self, dom: &str, obj: &str, act: &str) -> Decision {
        let index = self.index;
        let candidates = index.candidates(dom, obj);
        if candidates.is_empty() {
            return Decision { allowed: false, rule: None };
        }
        if !self.roles.contains_key(dom) {
            let by_name = index.g.get(dom);
            let roles = reach(self.sub, |n| by_name.and_then(|m| m.get(n)));
            self.roles.insert(dom.to_owned(), roles);
        }
        let roles = &self.roles[dom];
        let mut allow = None;
        for at in candidates {
            let rule = &index.rules[at as usize];
            let f = &rule.fields;
            let matches =
                (f[3] == "*" || f[3] == act) && (f[0] == "*" || roles.contains(f[0].as_str()) || self.groups.contains(f[0].as_str()));
            if !matches {
                continue;
            }
            match rule.effect {
                Effect::Deny => return Decision { allowed: false, rule: Some(f.clone()) },
                Effect::Allow if allow.is_none() => allow = Some(at),
                _ => {}
            }
        }
        match allow {
            Some(at) => Decision { allowed: true, rule: Some(index.rules[at as usize].fields.clone()) },
            None => Decision { allowed: false, rule: None },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::{build_enforcer, decide, MetadataAdapter, DEFAULT_MODEL};
    use berth_metadata::PolicyRuleRow;
    use casbin::MgmtApi;

    #[test]
    fn the_standard_model_is_recognized() {
        assert!(is_standard_model(DEFAULT_MODEL));
        let spaced = DEFAULT_MODEL.replace(" && ", "  &&  ").replace("[matchers]", "# note\n[matchers]");
        assert!(is_standard_model(&spaced));
        let other = DEFAULT_MODEL.replace("keyMatch(r.obj, p.obj)", "keyMatch2(r.obj, p.obj)");
        assert!(!is_standard_model(&other));
    }

    /// A small deterministic generator (no dependency for it).
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, from: &[&'a str]) -> &'a str {
            from[(self.next() % from.len() as u64) as usize]
        }
    }

    /// The indexed evaluator decides as casbin does, over random policies of
    /// the shapes Berth writes and some it does not (user subjects, deny rules,
    /// roles of roles, patterns at every depth, odd effects).
    #[tokio::test]
    async fn decisions_match_casbin() {
        let users = ["alice", "bob", "carol", "anonymous", "role:dev", "tenant:acme"];
        let subs =
            ["*", "alice", "bob", "role:dev", "role:reader", "role:admin", "tenant:acme", "tenant:beta", "tenant-pushers:acme", "group:x"];
        let doms = ["*", "acme", "beta", "", "library"];
        let objs =
            ["*", "acme/*", "acme/web/*", "acme/web/api", "acme/web", "beta/app", "beta/*", "library/*", "library/nginx", "acme", "acm*"];
        let acts = ["*", "pull", "push", "delete", "admin"];
        let efts = ["allow", "allow", "allow", "deny", "maybe"];
        let req_objs = ["acme/web/api", "acme/web", "acme", "acme/other", "beta/app", "library/nginx", "*", "zeta/x", "acm", ""];
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let mut compared = 0;
        for round in 0..40 {
            let mut rules = Vec::new();
            for _ in 0..(5 + rng.next() % 25) {
                let fields = vec![rng.pick(&subs), rng.pick(&doms), rng.pick(&objs), rng.pick(&acts), rng.pick(&efts)];
                rules.push(PolicyRuleRow { ptype: "p".into(), fields: fields.into_iter().map(String::from).collect() });
            }
            for _ in 0..(rng.next() % 12) {
                let (name, role, dom) = (rng.pick(&users), rng.pick(&subs[1..]), rng.pick(&doms[1..]));
                rules.push(PolicyRuleRow { ptype: "g".into(), fields: vec![name.into(), role.into(), dom.into()] });
            }
            for _ in 0..(rng.next() % 6) {
                let (name, group) = (rng.pick(&users), rng.pick(&subs[1..]));
                rules.push(PolicyRuleRow { ptype: "g2".into(), fields: vec![name.into(), group.into()] });
            }
            rules.sort();
            rules.dedup();
            let e = build_enforcer(DEFAULT_MODEL, MetadataAdapter::fixed(rules)).await.unwrap();
            let index = RuleIndex::new(e.get_named_policy("p"), e.get_named_grouping_policy("g"), e.get_named_grouping_policy("g2"));
            for sub in users {
                for dom in doms {
                    for obj in req_objs {
                        for act in &acts[1..] {
                            let want = decide(&e, sub, dom, obj, act);
                            let got = index.decide(sub, dom, obj, act);
                            let what = format!(
                                "round {round}: ({sub}, {dom}, {obj}, {act}) over {:?} / roles {:?}",
                                e.get_policy(),
                                e.get_all_roles()
                            );
                            assert_eq!(got.allowed, want.allowed, "{what}");
                            if got.allowed {
                                // Both name the first allow that matched.
                                assert_eq!(got.rule, want.rule, "{what}");
                            } else {
                                // casbin names the first rule it noted (an allow
                                // before the deny, when one matched first); the index
                                // names the deny that decided. Either both name one or neither.
                                assert_eq!(got.rule.is_some(), want.rule.is_some(), "{what}");
                                if let Some(r) = &got.rule {
                                    assert_eq!(r[4], "deny", "{what}");
                                }
                            }
                            compared += 1;
                        }
                    }
                }
            }
        }
        assert!(compared > 20_000, "{compared}");
    }
}
