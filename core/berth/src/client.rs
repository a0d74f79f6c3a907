//! The administration subcommands: thin clients of the management API
//! (`/api/v1`), plus `berth policy test`, which runs a policy test table offline
//! against the model and policy files.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, Subcommand};
use serde_json::{json, Value};

/// Where the server is and who is asking.
#[derive(Args, Clone)]
pub struct Conn {
    /// Berth's URL [env: BERTH_SERVER] [default: http://127.0.0.1:5000]
    #[arg(long, global = true)]
    pub server: Option<String>,
    /// User to log in as [env: BERTH_USER] [default: admin]
    #[arg(long, global = true)]
    pub login: Option<String>,
    /// Password or registry access token [env: BERTH_PASSWORD]
    #[arg(long, global = true)]
    pub password: Option<String>,
}

#[derive(Subcommand)]
pub enum PolicyCmd {
    /// List the live rules.
    List,
    /// Print the live rules as casbin CSV.
    Export,
    /// Add a rule, e.g. `berth policy add p role:auditor '*' '*' pull allow`.
    Add { ptype: String, fields: Vec<String> },
    /// Remove a rule.
    Remove { ptype: String, fields: Vec<String> },
    /// Decide one request against the live policy and show the matching rule.
    Check {
        #[arg(long)]
        user: String,
        /// The tenant owning the object ("" for platform objects).
        #[arg(long, default_value = "")]
        tenant: String,
        #[arg(long)]
        object: String,
        #[arg(long)]
        action: String,
    },
    /// Run a test table (fixture rules + expectations) against the policy files; exits 1 on any mismatch.
    Test {
        file: PathBuf,
        /// Directory with model.conf and policy.csv [default: ./policies, else built-in]
        #[arg(long)]
        policy_dir: Option<PathBuf>,
    },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Issue a registry access token for `docker login` (default 12 h).
    Issue {
        /// Lifetime in seconds.
        #[arg(long)]
        expires_in: Option<u64>,
        #[arg(long, default_value = "")]
        description: String,
    },
    /// List your tokens (never their secrets).
    List,
    /// Revoke a token by id.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum TenantCmd {
    /// Create a tenant (and its namespace of the same name).
    Create {
        name: String,
    },
    List,
    /// Give a tenant another namespace.
    AddNamespace {
        tenant: String,
        namespace: String,
    },
}

#[derive(Subcommand)]
pub enum UserCmd {
    /// Create a user in a tenant with a role (tenant-admin, maintainer, developer, reader).
    Create {
        name: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        role: String,
        /// The new user's password (read from stdin when absent).
        #[arg(long)]
        new_password: Option<String>,
    },
    List,
}

#[derive(Subcommand)]
pub enum RepoCmd {
    /// Allow anonymous pull.
    Public { name: String },
    /// Withdraw anonymous pull.
    Private { name: String },
    /// Share with another tenant (pull, or pull+push with --push).
    Share {
        name: String,
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        push: bool,
        /// Seconds until the share lapses.
        #[arg(long)]
        expires_in: Option<u64>,
    },
    Unshare {
        name: String,
        #[arg(long)]
        tenant: String,
    },
}

struct Client {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

impl Client {
    fn new(c: &Conn) -> Result<Self> {
        let env = |k: &str| std::env::var(k).ok();
        let base = c.server.clone().or_else(|| env("BERTH_SERVER")).unwrap_or_else(|| "http://127.0.0.1:5000".into());
        let user = c.login.clone().or_else(|| env("BERTH_USER")).unwrap_or_else(|| "admin".into());
        let password = c
            .password
            .clone()
            .or_else(|| env("BERTH_PASSWORD"))
            .ok_or_else(|| anyhow!("no credentials: pass --password or set BERTH_PASSWORD"))?;
        Ok(Client { http: reqwest::Client::new(), base: base.trim_end_matches('/').to_owned(), user, password })
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<(u16, String)> {
        let mut rq = self.http.request(method, format!("{}/api/v1/{path}", self.base)).basic_auth(&self.user, Some(&self.password));
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        let resp = rq.send().await.with_context(|| format!("connecting to {}", self.base))?;
        let status = resp.status().as_u16();
        let text = resp.text().await?;
        if status >= 400 {
            let detail = serde_json::from_str::<Value>(&text)
                .ok()
                .and_then(|v| {
                    let e = &v["errors"][0];
                    Some(format!("{}: {}", e["code"].as_str()?, e["detail"].as_str().or(e["message"].as_str())?))
                })
                .unwrap_or(text);
            bail!("{status} {detail}");
        }
        Ok((status, text))
    }

    async fn json(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> Result<Value> {
        let (_, text) = self.call(method, path, body).await?;
        Ok(if text.is_empty() { Value::Null } else { serde_json::from_str(&text)? })
    }
}

fn print(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

fn rule_line(r: &Value) -> String {
    let mut parts = vec![r["ptype"].as_str().unwrap_or("").to_owned()];
    if let Some(f) = r["fields"].as_array() {
        parts.extend(f.iter().map(|x| x.as_str().unwrap_or("").to_owned()));
    }
    parts.join(", ")
}

pub async fn policy(conn: &Conn, cmd: PolicyCmd) -> Result<bool> {
    use reqwest::Method as M;
    if let PolicyCmd::Test { file, policy_dir } = &cmd {
        return policy_test(file, policy_dir.clone()).await;
    }
    let c = Client::new(conn)?;
    match cmd {
        PolicyCmd::List => {
            let v = c.json(M::GET, "policies", None).await?;
            for r in v["rules"].as_array().into_iter().flatten() {
                println!("{}", rule_line(r));
            }
        }
        PolicyCmd::Export => {
            let (_, text) = c.call(M::GET, "policies?format=csv", None).await?;
            print!("{text}");
        }
        PolicyCmd::Add { ptype, fields } => {
            c.json(M::POST, "policies", Some(json!({"ptype": ptype, "fields": fields}))).await?;
            println!("added");
        }
        PolicyCmd::Remove { ptype, fields } => {
            c.json(M::POST, "policies/remove", Some(json!({"ptype": ptype, "fields": fields}))).await?;
            println!("removed");
        }
        PolicyCmd::Check { user, tenant, object, action } => {
            let v = c
                .json(M::POST, "policies/check", Some(json!({"user": user, "tenant": tenant, "object": object, "action": action})))
                .await?;
            let allowed = v["allowed"].as_bool().unwrap_or(false);
            let rule = v["rule"].as_array().map(|r| r.iter().filter_map(|x| x.as_str()).collect::<Vec<_>>().join(", "));
            println!("{} (rule: {})", if allowed { "allow" } else { "deny" }, rule.unwrap_or_else(|| "none matched".into()));
            return Ok(allowed);
        }
        PolicyCmd::Test { .. } => unreachable!(),
    }
    Ok(true)
}

async fn policy_test(file: &PathBuf, dir: Option<PathBuf>) -> Result<bool> {
    let dir = dir.or_else(|| {
        let d = PathBuf::from(crate::config::DEFAULT_POLICY_DIR);
        d.join("model.conf").is_file().then_some(d)
    });
    let (model, policy) = match &dir {
        Some(d) => (
            std::fs::read_to_string(d.join("model.conf")).with_context(|| format!("reading {}", d.join("model.conf").display()))?,
            std::fs::read_to_string(d.join("policy.csv")).with_context(|| format!("reading {}", d.join("policy.csv").display()))?,
        ),
        None => (berth_auth::policy::DEFAULT_MODEL.to_owned(), berth_auth::policy::DEFAULT_POLICY.to_owned()),
    };
    let rules = berth_auth::policy::parse_rules(&policy).map_err(|e| anyhow!("policy.csv: {e}"))?;
    let table = std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?;
    let (n, failures) = berth_auth::policy::run_table(&model, rules, &table).await.map_err(|e| anyhow!("{}: {e}", file.display()))?;
    for f in &failures {
        println!("FAIL {}: {f}", file.display());
    }
    println!("{}: {} expectations, {} failed", file.display(), n, failures.len());
    Ok(failures.is_empty())
}

pub async fn token(conn: &Conn, cmd: TokenCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        TokenCmd::Issue { expires_in, description } => {
            let v = c.json(M::POST, "tokens", Some(json!({"expires_in": expires_in, "description": description}))).await?;
            print(&v);
            eprintln!("log in with: docker login -u {} --password-stdin <host>   (paste the token)", v["user"].as_str().unwrap_or(""));
        }
        TokenCmd::List => print(&c.json(M::GET, "tokens", None).await?),
        TokenCmd::Revoke { id } => {
            c.json(M::DELETE, &format!("tokens/{id}"), None).await?;
            println!("revoked {id}");
        }
    }
    Ok(true)
}

pub async fn tenant(conn: &Conn, cmd: TenantCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        TenantCmd::Create { name } => print(&c.json(M::POST, "tenants", Some(json!({"name": name}))).await?),
        TenantCmd::List => print(&c.json(M::GET, "tenants", None).await?),
        TenantCmd::AddNamespace { tenant, namespace } => {
            print(&c.json(M::POST, &format!("tenants/{tenant}/namespaces"), Some(json!({"name": namespace}))).await?)
        }
    }
    Ok(true)
}

pub async fn user(conn: &Conn, cmd: UserCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        UserCmd::Create { name, tenant, role, new_password } => {
            let pw = match new_password {
                Some(p) => p,
                None => {
                    let mut line = String::new();
                    std::io::stdin().read_line(&mut line)?;
                    line.trim_end_matches(['\n', '\r']).to_owned()
                }
            };
            print(&c.json(M::POST, &format!("tenants/{tenant}/users"), Some(json!({"name": name, "password": pw, "role": role}))).await?)
        }
        UserCmd::List => print(&c.json(M::GET, "users", None).await?),
    }
    Ok(true)
}

pub async fn repo(conn: &Conn, cmd: RepoCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        RepoCmd::Public { name } => {
            print(&c.json(M::PUT, &format!("repositories/{name}/visibility"), Some(json!({"public": true}))).await?)
        }
        RepoCmd::Private { name } => {
            print(&c.json(M::PUT, &format!("repositories/{name}/visibility"), Some(json!({"public": false}))).await?)
        }
        RepoCmd::Share { name, tenant, push, expires_in } => print(
            &c.json(M::PUT, &format!("repositories/{name}/shares/{tenant}"), Some(json!({"push": push, "expires_in": expires_in}))).await?,
        ),
        RepoCmd::Unshare { name, tenant } => {
            c.json(M::DELETE, &format!("repositories/{name}/shares/{tenant}"), None).await?;
            println!("unshared {name} from {tenant}");
        }
    }
    Ok(true)
}

pub async fn rotate_key(conn: &Conn) -> Result<bool> {
    let c = Client::new(conn)?;
    print(&c.json(reqwest::Method::POST, "keys/rotate", None).await?);
    Ok(true)
}
