//! Who is asking and what for: principals, actions and token scopes.

use std::fmt;
use std::str::FromStr;

use berth_oci::{AccountName, ErrorCode, RegistryError, RepoName};
use serde::{Deserialize, Serialize};

/// The policy subject of anonymous requests.
pub const ANONYMOUS: &str = "anonymous";

/// An action on a repository (or, for `Admin`, on a tenant).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Action {
    Pull,
    Push,
    Delete,
    Admin,
}

impl Action {
    pub const ALL: [Action; 4] = [Action::Pull, Action::Push, Action::Delete, Action::Admin];
    /// The actions a repository scope can carry.
    pub const REPOSITORY: [Action; 3] = [Action::Pull, Action::Push, Action::Delete];

    pub fn as_str(self) -> &'static str {
        match self {
            Action::Pull => "pull",
            Action::Push => "push",
            Action::Delete => "delete",
            Action::Admin => "admin",
        }
    }
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Action {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        match s {
            "pull" => Ok(Action::Pull),
            "push" => Ok(Action::Push),
            "delete" => Ok(Action::Delete),
            "admin" => Ok(Action::Admin),
            _ => Err(RegistryError::new(ErrorCode::InvalidRequest)
                .with_detail(format!("unknown action {s:?} (expected pull, push, delete or admin)"))),
        }
    }
}

/// An authenticated subject.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Principal {
    Anonymous,
    User(AccountName),
}

impl Principal {
    /// The casbin subject.
    pub fn subject(&self) -> &str {
        match self {
            Principal::Anonymous => ANONYMOUS,
            Principal::User(u) => u.as_str(),
        }
    }

    pub fn user(&self) -> Option<&AccountName> {
        match self {
            Principal::Anonymous => None,
            Principal::User(u) => Some(u),
        }
    }
}

/// What a registry access token may be used for: pulling, pushing (and
/// deleting), the management API. A token minted by a token never has more.
pub const TOKEN_SCOPES: [&str; 3] = ["pull", "push", "manage"];

/// How a request proved who it is.
#[derive(Clone, Debug, PartialEq)]
pub enum Credential {
    /// No credentials.
    None,
    /// Basic auth with the user's password.
    Password,
    /// Basic auth with a registry access token (`bt_…`).
    AccessToken { id: String, scopes: Vec<String>, expires_ms: i64 },
    /// A bearer token: only what its `access` claim lists is allowed.
    Bearer(Vec<Grant>),
}

impl Credential {
    /// Whether the credential carries a token scope (a password carries all).
    pub fn has_scope(&self, scope: &str) -> bool {
        match self {
            Credential::Password => true,
            Credential::AccessToken { scopes, .. } => scopes.iter().any(|s| s == scope),
            Credential::None | Credential::Bearer(_) => false,
        }
    }
}

/// The token scope an action needs.
pub fn scope_for(action: Action) -> &'static str {
    match action {
        Action::Pull => "pull",
        Action::Push | Action::Delete => "push",
        Action::Admin => "manage",
    }
}

/// The outcome of authentication.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub principal: Principal,
    pub credential: Credential,
}

impl Identity {
    pub fn anonymous() -> Self {
        Identity { principal: Principal::Anonymous, credential: Credential::None }
    }

    /// Whether the credential may list the catalog: a password or an access
    /// token that may pull; a bearer token only with a `registry:catalog:*`
    /// grant; nobody anonymously (the challenge names the scope).
    pub fn may_list_catalog(&self) -> bool {
        match &self.credential {
            Credential::None => false,
            Credential::Password | Credential::AccessToken { .. } => self.credential.has_scope("pull"),
            Credential::Bearer(grants) => grants.iter().any(|g| g.kind == "registry" && g.name == "catalog"),
        }
    }

    /// Whether the credential itself (not policy) permits `action` on `repo`.
    pub fn credential_allows(&self, repo: &RepoName, action: Action) -> bool {
        match &self.credential {
            Credential::None | Credential::Password => true,
            Credential::AccessToken { .. } => self.credential.has_scope(scope_for(action)),
            Credential::Bearer(grants) => {
                grants.iter().any(|g| g.kind == "repository" && g.name == repo.as_str() && g.actions.iter().any(|a| a == action.as_str()))
            }
        }
    }
}

/// One entry of a bearer token's `access` claim (docker's token format).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    #[serde(rename = "type")]
    pub kind: String,
    pub name: String,
    pub actions: Vec<String>,
}

/// A requested scope: `repository:<name>:<actions>` or `registry:catalog:*`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Scope {
    Repository(RepoName, Vec<Action>),
    Catalog,
}

impl FromStr for Scope {
    type Err = RegistryError;
    fn from_str(s: &str) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::new(ErrorCode::InvalidRequest).with_detail(format!("{why}: {s:?}"));
        let (kind, rest) = s.split_once(':').ok_or_else(|| bad("scope must be type:name:actions"))?;
        let (name, actions) = rest.rsplit_once(':').ok_or_else(|| bad("scope must be type:name:actions"))?;
        match kind {
            "repository" => {
                let repo: RepoName = name.parse()?;
                let mut list = Vec::new();
                for a in actions.split(',').filter(|a| !a.is_empty()) {
                    if a == "*" {
                        list.extend(Action::REPOSITORY);
                    } else {
                        let action: Action = a.parse()?;
                        if action == Action::Admin {
                            return Err(bad("admin is not a repository scope action"));
                        }
                        list.push(action);
                    }
                }
                list.sort();
                list.dedup();
                Ok(Scope::Repository(repo, list))
            }
            "registry" if name == "catalog" => Ok(Scope::Catalog),
            _ => Err(bad("unsupported scope type")),
        }
    }
}

/// The scope string a challenge names for `action` on `repo`.
pub fn challenge_scope(repo: &RepoName, action: Action) -> String {
    // docker asks for pull together with push so one token serves a whole push.
    match action {
        Action::Push => format!("repository:{repo}:pull,push"),
        a => format!("repository:{repo}:{a}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scopes() {
        assert_eq!(
            "repository:acme/app:push,pull".parse::<Scope>().unwrap(),
            Scope::Repository("acme/app".parse().unwrap(), vec![Action::Pull, Action::Push])
        );
        assert_eq!(
            "repository:a:*".parse::<Scope>().unwrap(),
            Scope::Repository("a".parse().unwrap(), vec![Action::Pull, Action::Push, Action::Delete])
        );
        assert_eq!("registry:catalog:*".parse::<Scope>().unwrap(), Scope::Catalog);
        for bad in ["", "repository", "repository:a", "repository:A:pull", "repository:a:fly", "repository:a:admin", "x:y:z"] {
            assert!(bad.parse::<Scope>().is_err(), "{bad}");
        }
    }

    #[test]
    fn bearer_grants_limit_actions() {
        let repo: RepoName = "acme/app".parse().unwrap();
        let id = Identity {
            principal: Principal::User("alice".parse().unwrap()),
            credential: Credential::Bearer(vec![Grant {
                kind: "repository".into(),
                name: "acme/app".into(),
                actions: vec!["pull".into()],
            }]),
        };
        assert!(id.credential_allows(&repo, Action::Pull));
        assert!(!id.credential_allows(&repo, Action::Push));
        assert!(!id.credential_allows(&"acme/other".parse().unwrap(), Action::Pull));
    }
}
