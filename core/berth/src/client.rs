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
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
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
        /// What it may do: pull, push, manage (repeat; default all, or the
        /// scopes of the token you are logged in with).
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    /// List your tokens, or a user's you administer (never their secrets).
    List {
        #[arg(long)]
        user: Option<String>,
    },
    /// Revoke a token by id (and every token minted from it).
    Revoke { id: String },
    /// Revoke every token of yours, or of a user you administer.
    RevokeAll {
        #[arg(long)]
        user: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ShareCmd {
    /// The shares you granted (of repositories you administer).
    List,
    /// Repositories other tenants shared with yours.
    WithMe,
    /// Is a repository shared with a tenant?
    Exists {
        repo: String,
        #[arg(long)]
        tenant: String,
    },
}

/// A retention policy's owner: a repository, or with --namespace a namespace.
#[derive(clap::Args)]
pub struct RetentionTarget {
    /// The repository (or, with --namespace, the namespace).
    pub target: String,
    /// The target is a namespace: the policy applies to each of its
    /// repositories that has none of its own.
    #[arg(long)]
    pub namespace: bool,
}

impl RetentionTarget {
    fn path(&self) -> String {
        if self.namespace {
            format!("namespaces/{}/retention", self.target)
        } else {
            format!("repositories/{}/-/retention", self.target)
        }
    }
}

#[derive(Subcommand)]
pub enum RetentionCmd {
    /// Set (replace) a policy. Durations: 45s, 30m, 12h, 90d, 2w.
    Set {
        #[command(flatten)]
        target: RetentionTarget,
        /// Keep the N most recently pushed tags.
        #[arg(long)]
        keep_last: Option<u32>,
        /// Always keep tags matching this glob (repeatable): --keep latest --keep 'v*'.
        #[arg(long = "keep")]
        keep: Vec<String>,
        /// Delete tags neither pulled nor pushed for this long.
        #[arg(long)]
        unpulled_for: Option<String>,
        /// Delete untagged manifests older than this.
        #[arg(long)]
        untagged_older_than: Option<String>,
        /// Do not run it on the schedule (it still runs with `berth retention run`).
        #[arg(long)]
        disabled: bool,
    },
    /// Show a policy.
    Get {
        #[command(flatten)]
        target: RetentionTarget,
    },
    /// Remove a policy.
    Delete {
        #[command(flatten)]
        target: RetentionTarget,
    },
    /// Run a policy now; --dry-run lists what would go.
    Run {
        #[command(flatten)]
        target: RetentionTarget,
        #[arg(long)]
        dry_run: bool,
    },
    /// The audit records of past runs.
    Runs {
        #[arg(long)]
        repository: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        limit: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum GcCmd {
    /// Run a collection pass now and print what it removed.
    Run {
        /// List what would go, remove nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// The collector's settings, totals and last pass.
    Status,
}

#[derive(Subcommand)]
pub enum PluginCmd {
    /// Installed modules and the instances you administer.
    List,
    /// Install (or upgrade) a module (platform admin): a folder holding
    /// plugin.toml and its component; with --component, that component (its
    /// file name and sha256 are then written into the manifest sent).
    Install {
        dir: PathBuf,
        #[arg(long)]
        component: Option<PathBuf>,
    },
    /// Set an instance, or (only an ID) enable an existing one afresh.
    Enable {
        id: String,
        /// The module to run.
        #[arg(long)]
        module: Option<String>,
        /// platform, tenant:<name> or namespace:<name>.
        #[arg(long)]
        scope: Option<String>,
        /// A hook to call it for (repeatable): gate, manifest-pushed, manifest-pulled, …
        #[arg(long = "hook")]
        hooks: Vec<String>,
        /// key=value (repeatable).
        #[arg(long = "config")]
        config: Vec<String>,
        /// A host its outbound HTTP may reach (repeatable).
        #[arg(long = "allow-host")]
        allow_hosts: Vec<String>,
    },
    /// Switch an instance off (its configuration stays).
    Disable { id: String },
    /// Remove an instance and its key-value store.
    Remove { id: String },
    /// An instance's state and health (calls, failures, latency, last error,
    /// event queue); all without an ID.
    Status { id: Option<String> },
    /// An instance's delivery log, newest first.
    Deliveries {
        id: String,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long, default_value_t = 0)]
        offset: u32,
    },
    /// Load every module folder again and restart every instance (platform admin).
    Reload,
}

#[derive(Subcommand)]
pub enum QuotaCmd {
    /// A tenant's limits and usage (default: your own tenant's).
    Get { tenant: Option<String> },
    /// Set a tenant's limits; a limit not given returns to the registry's default.
    Set {
        tenant: String,
        #[arg(long)]
        namespaces: Option<u64>,
        #[arg(long)]
        repositories: Option<u64>,
        /// Bytes, or with a unit: 500MB, 10GiB, 1TB.
        #[arg(long, value_parser = parse_size)]
        storage: Option<u64>,
    },
}

/// `1234`, `500MB`, `10GiB`, `1.5TB` → bytes (decimal and binary units).
fn parse_size(s: &str) -> std::result::Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num.parse().map_err(|_| format!("{s:?} is not a size (e.g. 1073741824, 500MB, 10GiB)"))?;
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "kb" | "k" => 1000,
        "mb" | "m" => 1000_u64.pow(2),
        "gb" | "g" => 1000_u64.pow(3),
        "tb" | "t" => 1000_u64.pow(4),
        "kib" => 1 << 10,
        "mib" => 1 << 20,
        "gib" => 1 << 30,
        "tib" => 1 << 40,
        other => return Err(format!("unknown size unit {other:?} (B, KB, MB, GB, TB, KiB, MiB, GiB, TiB)")),
    };
    let bytes = n * mult as f64;
    if !bytes.is_finite() || bytes < 0.0 || bytes > (1u64 << 53) as f64 {
        return Err(format!("{s:?} is out of range"));
    }
    Ok(bytes.round() as u64)
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
    /// Disable a user: every password, token and bearer token of theirs stops working.
    Disable {
        name: String,
    },
    /// Enable a disabled user again.
    Enable {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum RepoCmd {
    /// List repositories you may pull (filters, sorting, paging).
    List {
        /// all (default), mine (you may push) or public.
        #[arg(long)]
        scope: Option<String>,
        #[arg(long)]
        namespace: Option<String>,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        keyword: Option<String>,
        /// key:value[,key:value…]
        #[arg(long)]
        labels: Option<String>,
        /// name, updated or pulls.
        #[arg(long)]
        sort: Option<String>,
        #[arg(long)]
        desc: bool,
        #[arg(long)]
        limit: Option<i64>,
        #[arg(long)]
        offset: Option<i64>,
    },
    /// Show one repository with its figures.
    Get { name: String },
    /// Create an empty repository.
    Create {
        name: String,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, default_value = "")]
        category: String,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        #[arg(long)]
        public: bool,
    },
    /// Change description, category or labels.
    Update {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        category: Option<String>,
        /// key=value, repeatable; replaces all labels.
        #[arg(long = "label")]
        labels: Vec<String>,
    },
    /// Delete a repository with all its images.
    Delete { name: String },
    /// Delete every untagged (or, with --tagged, every tagged) manifest.
    Prune {
        name: String,
        #[arg(long)]
        tagged: bool,
    },
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
    /// The tenants a repository is shared with.
    Shares { name: String },
    /// Is a name valid, yours to push to, and not taken? (exit 1 if not)
    Check { name: String },
}

#[derive(Subcommand)]
pub enum OfficialCmd {
    /// The official images (the platform's official namespace).
    List {
        #[arg(long)]
        keyword: Option<String>,
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        offset: Option<u64>,
    },
    /// One official image (`alpine` for `library/alpine`).
    Get { name: String },
    /// Its versions (tags).
    Versions {
        name: String,
        #[arg(long)]
        limit: Option<u64>,
        #[arg(long)]
        offset: Option<u64>,
    },
}

#[derive(Subcommand)]
pub enum NsCmd {
    /// Namespaces you may see.
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        keyword: Option<String>,
        #[arg(long)]
        limit: Option<i64>,
        #[arg(long)]
        offset: Option<i64>,
    },
    Get {
        name: String,
    },
    /// Create a namespace (for your tenant unless --tenant).
    Create {
        name: String,
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long, default_value = "")]
        description: String,
        #[arg(long, default_value = "")]
        project_id: String,
        /// key=value, repeatable.
        #[arg(long = "label")]
        labels: Vec<String>,
        /// Repositories created through the API start public.
        #[arg(long)]
        public_default: bool,
    },
    Update {
        name: String,
        #[arg(long)]
        description: Option<String>,
        #[arg(long)]
        project_id: Option<String>,
        #[arg(long)]
        public_default: Option<bool>,
    },
    /// Delete a namespace; --force deletes its repositories first.
    Delete {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Is a name valid and free?
    Check {
        name: String,
    },
    /// Share every repository of a namespace, present and future, with another
    /// tenant (pull, or pull+push with --push).
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
    /// Withdraw a namespace share.
    Unshare {
        name: String,
        #[arg(long)]
        tenant: String,
    },
    /// The tenants a namespace is shared with.
    Shares {
        name: String,
    },
}

#[derive(Subcommand)]
pub enum TagCmd {
    /// A repository's tags with digests, sizes and counters.
    List {
        repo: String,
        #[arg(long)]
        keyword: Option<String>,
        #[arg(long)]
        limit: Option<i64>,
        #[arg(long)]
        offset: Option<i64>,
    },
    Get {
        repo: String,
        tag: String,
    },
    /// Delete a tag (its manifest stays).
    Delete {
        repo: String,
        tag: String,
    },
    /// Delete a manifest by digest, with its tags.
    DeleteManifest {
        repo: String,
        digest: String,
    },
}

struct Client {
    http: reqwest::Client,
    base: String,
    user: String,
    password: String,
}

/// What `berth login` stores (file mode 0600).
#[derive(serde::Serialize, serde::Deserialize)]
struct Stored {
    server: String,
    user: String,
    password: String,
}

/// `$BERTH_CREDENTIALS`, else `$XDG_CONFIG_HOME/berth/credentials.json`, else
/// `~/.config/berth/credentials.json`.
fn credentials_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(crate::config::ENV_CREDENTIALS) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("berth").join("credentials.json"))
}

fn stored() -> Option<Stored> {
    serde_json::from_slice(&std::fs::read(credentials_path()?).ok()?).ok()
}

impl Client {
    /// Flags, then `BERTH_*` variables, then what `berth login` stored.
    fn new(c: &Conn) -> Result<Self> {
        let saved = stored();
        // A flag, else a variable, else what `berth login` stored.
        let pick = |flag: &Option<String>, var: &str, stored: fn(&Stored) -> &String| {
            flag.clone().or_else(|| std::env::var(var).ok()).or_else(|| saved.as_ref().map(|s| stored(s).clone()))
        };
        let base = pick(&c.server, "BERTH_SERVER", |s| &s.server).unwrap_or_else(|| "http://127.0.0.1:5000".into());
        let user = pick(&c.login, "BERTH_USER", |s| &s.user).unwrap_or_else(|| "admin".into());
        let password = pick(&c.password, "BERTH_PASSWORD", |s| &s.password)
            .ok_or_else(|| anyhow!("no credentials: pass --password, set BERTH_PASSWORD or run `berth login`"))?;
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

/// Print a table of `cols` (JSON field, header) over `rows`.
fn table(rows: &[Value], cols: &[(&str, &str)]) {
    let cell = |v: &Value| match v {
        Value::Null => "-".to_owned(),
        Value::String(s) => s.clone(),
        Value::Object(m) => m.iter().map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or(""))).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    };
    let cells: Vec<Vec<String>> = rows.iter().map(|r| cols.iter().map(|(f, _)| cell(&r[*f])).collect()).collect();
    let widths: Vec<usize> =
        cols.iter().enumerate().map(|(i, (_, h))| cells.iter().map(|r| r[i].chars().count()).max().unwrap_or(0).max(h.len())).collect();
    let line = |vals: Vec<&str>| {
        let parts: Vec<String> = vals.iter().zip(&widths).map(|(v, w)| format!("{v:<w$}")).collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(cols.iter().map(|(_, h)| *h).collect());
    for r in &cells {
        line(r.iter().map(String::as_str).collect());
    }
}

/// A page: its items as a table (or the JSON), and where it is in the whole.
fn show_page(conn: &Conn, v: &Value, cols: &[(&str, &str)]) {
    if conn.json {
        return print(v);
    }
    let items = v["items"].as_array().cloned().unwrap_or_default();
    table(&items, cols);
    let (offset, total) = (v["offset"].as_u64().unwrap_or(0), v["total_count"].as_u64().unwrap_or(0));
    if total as usize > items.len() {
        println!("({} of {total}, from offset {offset})", items.len());
    }
}

/// One object: its JSON, or `field: value` lines.
fn show_one(conn: &Conn, v: &Value) {
    if conn.json {
        return print(v);
    }
    if let Some(m) = v.as_object() {
        for (k, val) in m {
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("{k}: {s}");
        }
    } else {
        print(v);
    }
}

fn query_string(pairs: &[(&str, Option<String>)]) -> String {
    let q: Vec<String> = pairs.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v)))).collect();
    if q.is_empty() {
        String::new()
    } else {
        format!("?{}", q.join("&"))
    }
}

fn encode(s: &str) -> String {
    s.bytes()
        .map(|b| if b.is_ascii_alphanumeric() || b"-._~:/".contains(&b) { (b as char).to_string() } else { format!("%{b:02X}") })
        .collect()
}

fn labels(pairs: &[String]) -> Result<serde_json::Map<String, Value>> {
    pairs
        .iter()
        .map(|p| {
            p.split_once('=')
                .map(|(k, v)| (k.to_owned(), Value::String(v.to_owned())))
                .ok_or_else(|| anyhow!("label {p:?} is not key=value"))
        })
        .collect()
}

const REPO_COLS: [(&str, &str); 7] = [
    ("name", "REPOSITORY"),
    ("tag_count", "TAGS"),
    ("size_bytes", "SIZE"),
    ("pull_count", "PULLS"),
    ("push_count", "PUSHES"),
    ("public", "PUBLIC"),
    ("latest_tag", "LATEST"),
];
const TAG_COLS: [(&str, &str); 5] =
    [("name", "TAG"), ("digest", "DIGEST"), ("size", "SIZE"), ("pull_count", "PULLS"), ("push_count", "PUSHES")];
const NS_COLS: [(&str, &str); 5] = [
    ("name", "NAMESPACE"),
    ("tenant", "TENANT"),
    ("repository_count", "REPOS"),
    ("storage_bytes", "STORAGE"),
    ("description", "DESCRIPTION"),
];

/// `berth login`: check the credentials against the server, then store them.
pub async fn login(conn: &Conn) -> Result<bool> {
    let mut conn = conn.clone();
    if conn.password.is_none() && std::env::var("BERTH_PASSWORD").is_err() {
        eprint!("password or access token: ");
        let mut line = String::new();
        std::io::stdin().read_line(&mut line)?;
        conn.password = Some(line.trim_end_matches(['\n', '\r']).to_owned());
    }
    let c = Client::new(&conn)?;
    let me = c.json(reqwest::Method::GET, "me", None).await?;
    let path = credentials_path().ok_or_else(|| anyhow!("no place for credentials: set HOME or BERTH_CREDENTIALS"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let body = serde_json::to_vec(&Stored { server: c.base.clone(), user: c.user.clone(), password: c.password.clone() })?;
    write_private(&path, &body)?;
    println!("logged in to {} as {} (credentials in {})", c.base, me["user"].as_str().unwrap_or(&c.user), path.display());
    Ok(true)
}

/// Write a file only its owner can read, from its creation on.
fn write_private(path: &std::path::Path, body: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
    f.write_all(body)?;
    Ok(())
}

/// `berth logout`: forget the stored credentials.
pub fn logout() -> Result<bool> {
    if let Some(p) = credentials_path() {
        match std::fs::remove_file(&p) {
            Ok(()) => println!("removed {}", p.display()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => println!("not logged in"),
            Err(e) => return Err(e).with_context(|| format!("removing {}", p.display())),
        }
    }
    Ok(true)
}

pub async fn ns(conn: &Conn, cmd: NsCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        NsCmd::List { tenant, keyword, limit, offset } => {
            let q = query_string(&[
                ("tenant", tenant),
                ("keyword", keyword),
                ("limit", limit.map(|n| n.to_string())),
                ("offset", offset.map(|n| n.to_string())),
            ]);
            show_page(conn, &c.json(M::GET, &format!("namespaces{q}"), None).await?, &NS_COLS);
        }
        NsCmd::Get { name } => show_one(conn, &c.json(M::GET, &format!("namespaces/{name}"), None).await?),
        NsCmd::Create { name, tenant, description, project_id, labels: l, public_default } => {
            let body = json!({"name": name, "tenant": tenant, "description": description, "project_id": project_id, "labels": labels(&l)?, "public_default": public_default});
            show_one(conn, &c.json(M::POST, "namespaces", Some(body)).await?)
        }
        NsCmd::Update { name, description, project_id, public_default } => {
            let body = json!({"description": description, "project_id": project_id, "public_default": public_default});
            show_one(conn, &c.json(M::PATCH, &format!("namespaces/{name}"), Some(body)).await?)
        }
        NsCmd::Delete { name, force } => {
            let v = c.json(M::DELETE, &format!("namespaces/{name}{}", if force { "?force=true" } else { "" }), None).await?;
            show_one(conn, &v)
        }
        NsCmd::Check { name } => {
            let v = c.json(M::GET, &format!("namespaces/check?name={}", encode(&name)), None).await?;
            show_one(conn, &v);
            return Ok(v["available"].as_bool().unwrap_or(false));
        }
        NsCmd::Share { name, tenant, push, expires_in } => show_one(
            conn,
            &c.json(M::PUT, &format!("namespaces/{name}/shares/{tenant}"), Some(json!({"push": push, "expires_in": expires_in}))).await?,
        ),
        NsCmd::Unshare { name, tenant } => {
            c.json(M::DELETE, &format!("namespaces/{name}/shares/{tenant}"), None).await?;
            println!("unshared namespace {name} from {tenant}");
        }
        NsCmd::Shares { name } => {
            let v = c.json(M::GET, &format!("namespaces/{name}/shares"), None).await?;
            print_shares(conn, &v);
        }
    }
    Ok(true)
}

pub async fn official(conn: &Conn, cmd: OfficialCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        OfficialCmd::List { keyword, limit, offset } => {
            let q =
                query_string(&[("keyword", keyword), ("limit", limit.map(|n| n.to_string())), ("offset", offset.map(|n| n.to_string()))]);
            show_page(conn, &c.json(M::GET, &format!("official{q}"), None).await?, &REPO_COLS)
        }
        OfficialCmd::Get { name } => show_one(conn, &c.json(M::GET, &format!("official/{name}"), None).await?),
        OfficialCmd::Versions { name, limit, offset } => {
            let q = query_string(&[("limit", limit.map(|n| n.to_string())), ("offset", offset.map(|n| n.to_string()))]);
            show_page(conn, &c.json(M::GET, &format!("official/{name}/versions{q}"), None).await?, &TAG_COLS)
        }
    }
    Ok(true)
}

/// The registry's and its mirror's addresses.
pub async fn registry_info(conn: &Conn) -> Result<bool> {
    let c = Client::new(conn)?;
    show_one(conn, &c.json(reqwest::Method::GET, "registry", None).await?);
    Ok(true)
}

/// The security audit log, newest first.
pub async fn audit(conn: &Conn, action: Option<String>, since_secs: Option<u64>, limit: Option<u32>) -> Result<bool> {
    let c = Client::new(conn)?;
    let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_millis() as i64;
    let since = since_secs.map(|s| now_ms.saturating_sub((s as i64).saturating_mul(1000)));
    let q = query_string(&[("action", action), ("since_ms", since.map(|m| m.to_string())), ("limit", limit.map(|n| n.to_string()))]);
    let v = c.json(reqwest::Method::GET, &format!("audit{q}"), None).await?;
    if conn.json {
        print(&v);
    } else {
        table(
            v["events"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            &[("ms", "MS"), ("action", "ACTION"), ("actor", "WHO"), ("source", "FROM"), ("target", "TARGET"), ("detail", "DETAIL")],
        );
    }
    Ok(true)
}

fn print_run(run: &Value) {
    let verb = if run["dry_run"].as_bool().unwrap_or(false) { "would delete" } else { "deleted" };
    let items = run["items"].as_array().map(Vec::as_slice).unwrap_or(&[]);
    println!("{} by {}: {verb} {} item(s)", run["scope"].as_str().unwrap_or("-"), run["by"].as_str().unwrap_or("-"), items.len());
    for i in items {
        println!(
            "  {} {}:{} ({})",
            i["kind"].as_str().unwrap_or(""),
            i["repository"].as_str().unwrap_or(""),
            i["name"].as_str().unwrap_or(""),
            i["reason"].as_str().unwrap_or("")
        );
    }
    for e in run["errors"].as_array().into_iter().flatten() {
        println!("  error: {}", e.as_str().unwrap_or(""));
    }
}

pub async fn retention(conn: &Conn, cmd: RetentionCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        RetentionCmd::Set { target, keep_last, keep, unpulled_for, untagged_older_than, disabled } => {
            let body = json!({
                "keep_last": keep_last, "keep_patterns": keep, "unpulled_for": unpulled_for,
                "untagged_older_than": untagged_older_than, "enabled": !disabled,
            });
            show_one(conn, &c.json(M::PUT, &target.path(), Some(body)).await?)
        }
        RetentionCmd::Get { target } => show_one(conn, &c.json(M::GET, &target.path(), None).await?),
        RetentionCmd::Delete { target } => {
            c.json(M::DELETE, &target.path(), None).await?;
            println!("removed the retention policy of {}", target.target);
        }
        RetentionCmd::Run { target, dry_run } => {
            let v = c.json(M::POST, &format!("{}/run", target.path()), Some(json!({"dry_run": dry_run}))).await?;
            if conn.json {
                print(&v);
            } else {
                print_run(&v);
            }
        }
        RetentionCmd::Runs { repository, namespace, limit } => {
            let q = query_string(&[("repository", repository), ("namespace", namespace), ("limit", limit.map(|n| n.to_string()))]);
            let v = c.json(M::GET, &format!("retention/runs{q}"), None).await?;
            if conn.json {
                print(&v);
            } else {
                for run in v["runs"].as_array().into_iter().flatten() {
                    print_run(run);
                }
            }
        }
    }
    Ok(true)
}

/// An integrity report: a summary and every finding; `true` when clean.
pub fn print_fsck(json_out: bool, v: &Value) -> bool {
    let clean = v["clean"].as_bool().unwrap_or(false);
    if json_out {
        print(v);
        return clean;
    }
    println!(
        "{}: {} repositories, {} links, {} manifests, {} tags; {} blobs stored ({} bytes); {} awaiting the collector",
        if clean { "clean" } else { "NOT CLEAN" },
        v["repositories"],
        v["links"],
        v["manifests"],
        v["tags"],
        v["stored_blobs"],
        v["stored_bytes"],
        v["awaiting_collection"]
    );
    for key in
        ["dangling_links", "missing_manifests", "dangling_tags", "refcount_mismatches", "usage_mismatches", "orphans", "digest_mismatches"]
    {
        let n = v[key]["count"].as_u64().unwrap_or(0);
        if n > 0 {
            println!("{}: {n}", key.replace('_', " "));
            for i in v[key]["items"].as_array().into_iter().flatten() {
                println!("  {}", i.as_str().unwrap_or(""));
            }
        }
    }
    for r in v["repaired"].as_array().into_iter().flatten() {
        println!("repaired: {}", r.as_str().unwrap_or(""));
    }
    clean
}

/// `berth fsck` against a running server.
pub async fn fsck(conn: &Conn, repair: bool, rehash: bool) -> Result<bool> {
    let c = Client::new(conn)?;
    let v = c.json(reqwest::Method::POST, "fsck", Some(json!({"repair": repair, "rehash": rehash}))).await?;
    Ok(print_fsck(conn.json, &v))
}

pub async fn gc(conn: &Conn, cmd: GcCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    let v = match cmd {
        GcCmd::Run { dry_run } => c.json(M::POST, "gc", Some(json!({"dry_run": dry_run}))).await?,
        GcCmd::Status => c.json(M::GET, "gc", None).await?,
    };
    if conn.json {
        print(&v);
        return Ok(true);
    }
    let pass = if v.get("last").is_some() { &v["last"] } else { &v };
    if v.get("last").is_some() {
        println!(
            "collector: {} (every {} s, grace {} s); {} passes, {} links and {} blobs ({} bytes) removed since start",
            if v["enabled"].as_bool().unwrap_or(false) { "on" } else { "off" },
            v["interval_secs"],
            v["grace_secs"],
            v["passes"],
            v["links_removed"],
            v["blobs_deleted"],
            v["bytes_reclaimed"]
        );
    }
    if pass.is_object() {
        let verb = if pass["dry_run"].as_bool().unwrap_or(false) { "would remove" } else { "removed" };
        println!(
            "{verb}: {} links, {} blobs, {} bytes ({} errors)",
            pass["links_removed"], pass["blobs_deleted"], pass["bytes_reclaimed"], pass["errors"]
        );
        for (tenant, bytes) in pass["freed_by_tenant"].as_object().into_iter().flatten() {
            println!("  tenant {tenant}: {bytes} bytes freed");
        }
        for item in pass["items"].as_array().into_iter().flatten() {
            println!("  {}", item.as_str().unwrap_or(""));
        }
    }
    Ok(true)
}

pub async fn plugin(conn: &Conn, cmd: PluginCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    let instance = |id: &str| format!("plugins/instances/{id}");
    let v = match cmd {
        PluginCmd::List => {
            let v = c.json(M::GET, "plugins", None).await?;
            if !conn.json {
                println!("modules:");
                table(
                    v["modules"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &[("name", "NAME"), ("version", "VERSION"), ("hooks", "HOOKS"), ("capabilities", "CAPABILITIES")],
                );
                for r in v["refused"].as_array().into_iter().flatten() {
                    println!("refused: {}: {}", r["folder"].as_str().unwrap_or(""), r["error"].as_str().unwrap_or(""));
                }
                println!("instances:");
                table(
                    v["instances"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &[("id", "ID"), ("module", "MODULE"), ("scope", "SCOPE"), ("hooks", "HOOKS"), ("state", "STATE")],
                );
                return Ok(true);
            }
            v
        }
        PluginCmd::Install { dir, component } => {
            let path = dir.join("plugin.toml");
            let text = std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
            let mut manifest: toml::Table = toml::from_str(&text).with_context(|| format!("{}", path.display()))?;
            let name = manifest.get("name").and_then(|v| v.as_str()).ok_or_else(|| anyhow!("plugin.toml has no name"))?.to_owned();
            let (bytes, file) = match component {
                Some(p) => {
                    let file =
                        p.file_name().map(|f| f.to_string_lossy().into_owned()).ok_or_else(|| anyhow!("--component names no file"))?;
                    (std::fs::read(&p).with_context(|| format!("reading {}", p.display()))?, file)
                }
                None => {
                    let file = manifest
                        .get("file")
                        .and_then(|v| v.as_str())
                        .ok_or_else(|| anyhow!("plugin.toml names no file (or give --component)"))?
                        .to_owned();
                    (std::fs::read(dir.join(&file)).with_context(|| format!("reading {}", dir.join(&file).display()))?, file)
                }
            };
            let sha = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&bytes));
            if let Some(pinned) = manifest.get("sha256").and_then(|v| v.as_str()) {
                if pinned != sha {
                    bail!("{file} has sha256 {sha}, but plugin.toml pins {pinned}");
                }
            }
            manifest.insert("file".into(), toml::Value::String(file));
            manifest.insert("sha256".into(), toml::Value::String(sha));
            use base64::Engine as _;
            let body = json!({"manifest": toml::to_string(&manifest)?, "component_base64": base64::engine::general_purpose::STANDARD.encode(&bytes)});
            let v = c.json(M::PUT, &format!("plugins/modules/{name}"), Some(body)).await?;
            if !conn.json {
                println!("installed {name} {} (hooks: {})", v["version"].as_str().unwrap_or(""), v["hooks"]);
                return Ok(true);
            }
            v
        }
        PluginCmd::Enable { id, module, scope, hooks, config, allow_hosts } => {
            let mut body = if module.is_none() && scope.is_none() && hooks.is_empty() && config.is_empty() && allow_hosts.is_empty() {
                // Enable what is stored, as it is (secrets stay as stored).
                let v = c.json(M::GET, &instance(&id), None).await?;
                json!({"module": v["module"], "scope": v["scope"], "hooks": v["hooks"], "config": v["config"], "allow_hosts": v["allow_hosts"]})
            } else {
                let mut cfg = serde_json::Map::new();
                for kv in &config {
                    let (k, v) = kv.split_once('=').ok_or_else(|| anyhow!("--config {kv:?}: key=value"))?;
                    cfg.insert(k.to_owned(), Value::String(v.to_owned()));
                }
                json!({
                    "module": module.ok_or_else(|| anyhow!("--module is required to set an instance"))?,
                    "scope": scope.ok_or_else(|| anyhow!("--scope is required to set an instance"))?,
                    "hooks": hooks, "config": cfg, "allow_hosts": allow_hosts,
                })
            };
            body["enabled"] = json!(true);
            c.json(M::PUT, &instance(&id), Some(body)).await?
        }
        PluginCmd::Disable { id } => {
            let v = c.json(M::GET, &instance(&id), None).await?;
            let body = json!({"module": v["module"], "scope": v["scope"], "hooks": v["hooks"], "config": v["config"], "allow_hosts": v["allow_hosts"], "enabled": false});
            c.json(M::PUT, &instance(&id), Some(body)).await?
        }
        PluginCmd::Remove { id } => {
            c.json(M::DELETE, &instance(&id), None).await?;
            if !conn.json {
                println!("removed plugin instance {id}");
            }
            return Ok(true);
        }
        PluginCmd::Status { id: Some(id) } => c.json(M::GET, &instance(&id), None).await?,
        PluginCmd::Status { id: None } => {
            let v = c.json(M::GET, "plugins", None).await?;
            if !conn.json {
                for i in v["instances"].as_array().into_iter().flatten() {
                    print_instance(i);
                }
                return Ok(true);
            }
            v["instances"].clone()
        }
        PluginCmd::Deliveries { id, limit, offset } => {
            let v = c.json(M::GET, &format!("plugins/instances/{id}/deliveries?limit={limit}&offset={offset}"), None).await?;
            if !conn.json {
                table(
                    v["items"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &[
                        ("at_ms", "AT_MS"),
                        ("event_type", "EVENT"),
                        ("event_id", "ID"),
                        ("attempt", "ATTEMPT"),
                        ("outcome", "OUTCOME"),
                        ("took_ms", "MS"),
                        ("detail", "DETAIL"),
                    ],
                );
                println!("{} of {}", v["items"].as_array().map_or(0, Vec::len), v["total_count"]);
                return Ok(true);
            }
            v
        }
        PluginCmd::Reload => c.json(M::POST, "plugins/reload", None).await?,
    };
    if conn.json {
        print(&v);
    } else if v.get("state").is_some() {
        print_instance(&v);
    } else {
        print(&v);
    }
    Ok(true)
}

/// A repository's or namespace's shares.
fn print_shares(conn: &Conn, v: &Value) {
    if conn.json {
        print(v);
    } else {
        table(
            v["shares"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            &[("tenant", "TENANT"), ("actions", "ACTIONS"), ("expires_ms", "EXPIRES_MS")],
        );
    }
}

fn print_instance(i: &Value) {
    let s = |k: &str| i[k].as_str().unwrap_or("").to_owned();
    println!(
        "{} ({} at {}): {}{}",
        s("id"),
        s("module"),
        s("scope"),
        s("state"),
        i["reason"].as_str().map(|r| format!(" ({r})")).unwrap_or_default()
    );
    let h = &i["health"];
    if h.is_object() {
        println!(
            "  calls {}, failures {}, timeouts {}, p50 {:.1} ms, p99 {:.1} ms{}",
            h["calls"],
            h["failures"],
            h["timeouts"],
            h["p50_ms"].as_f64().unwrap_or(0.0),
            h["p99_ms"].as_f64().unwrap_or(0.0),
            h["last_error"].as_str().map(|e| format!(", last error: {e}")).unwrap_or_default()
        );
    }
    let q = &i["queue"];
    if q.is_object() {
        println!(
            "  queue {} (oldest waiting {} ms), delivered {}, retried {}, given up {}, overflow {}",
            q["depth"], q["lag_ms"], q["delivered"], q["retried"], q["given_up"], q["overflow"]
        );
    }
}

pub async fn quota(conn: &Conn, cmd: QuotaCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    let v = match cmd {
        QuotaCmd::Get { tenant: None } => c.json(M::GET, "quotas", None).await?,
        QuotaCmd::Get { tenant: Some(t) } => c.json(M::GET, &format!("tenants/{t}/quota"), None).await?,
        QuotaCmd::Set { tenant, namespaces, repositories, storage } => {
            let body = json!({"namespaces": namespaces, "repositories": repositories, "storage_bytes": storage});
            c.json(M::PUT, &format!("tenants/{tenant}/quota"), Some(body)).await?
        }
    };
    if conn.json {
        print(&v);
    } else {
        println!("tenant: {}", v["tenant"].as_str().unwrap_or("-"));
        table(
            v["quotas"].as_array().map(Vec::as_slice).unwrap_or(&[]),
            &[("resource", "RESOURCE"), ("used", "USED"), ("limit", "LIMIT"), ("source", "SOURCE")],
        );
        println!("reserved by pushes in progress: {} bytes", v["reserved_bytes"].as_u64().unwrap_or(0));
    }
    Ok(true)
}

pub async fn share(conn: &Conn, cmd: ShareCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        ShareCmd::List => {
            let v = c.json(M::GET, "shares", None).await?;
            if conn.json {
                print(&v);
            } else {
                table(
                    v["shares"].as_array().map(Vec::as_slice).unwrap_or(&[]),
                    &[
                        ("repository", "REPOSITORY"),
                        ("namespace", "NAMESPACE"),
                        ("tenant", "TENANT"),
                        ("actions", "ACTIONS"),
                        ("expires_ms", "EXPIRES_MS"),
                    ],
                );
            }
        }
        ShareCmd::WithMe => show_page(conn, &c.json(M::GET, "repositories?scope=shared", None).await?, &REPO_COLS),
        ShareCmd::Exists { repo, tenant } => {
            return match c.json(M::GET, &format!("repositories/{repo}/shares/{tenant}"), None).await {
                Ok(v) => {
                    show_one(conn, &v);
                    Ok(true)
                }
                Err(e) if e.to_string().starts_with("404") => {
                    println!("{repo} is not shared with {tenant}");
                    Ok(false)
                }
                Err(e) => Err(e),
            };
        }
    }
    Ok(true)
}

pub async fn tag(conn: &Conn, cmd: TagCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        TagCmd::List { repo, keyword, limit, offset } => {
            let q =
                query_string(&[("keyword", keyword), ("limit", limit.map(|n| n.to_string())), ("offset", offset.map(|n| n.to_string()))]);
            show_page(conn, &c.json(M::GET, &format!("repositories/{repo}/-/tags{q}"), None).await?, &TAG_COLS);
        }
        TagCmd::Get { repo, tag } => show_one(conn, &c.json(M::GET, &format!("repositories/{repo}/-/tags/{tag}"), None).await?),
        TagCmd::Delete { repo, tag } => {
            c.json(M::DELETE, &format!("repositories/{repo}/-/tags/{tag}"), None).await?;
            println!("deleted {repo}:{tag}");
        }
        TagCmd::DeleteManifest { repo, digest } => {
            c.json(M::DELETE, &format!("repositories/{repo}/-/manifests/{digest}"), None).await?;
            println!("deleted {repo}@{digest}");
        }
    }
    Ok(true)
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
        TokenCmd::Issue { expires_in, description, scopes } => {
            let scopes = (!scopes.is_empty()).then_some(scopes);
            let v =
                c.json(M::POST, "tokens", Some(json!({"expires_in": expires_in, "description": description, "scopes": scopes}))).await?;
            print(&v);
            eprintln!("log in with: docker login -u {} --password-stdin <host>   (paste the token)", v["user"].as_str().unwrap_or(""));
        }
        TokenCmd::List { user: None } => print(&c.json(M::GET, "tokens", None).await?),
        TokenCmd::List { user: Some(u) } => print(&c.json(M::GET, &format!("users/{}/tokens", encode(&u)), None).await?),
        TokenCmd::Revoke { id } => {
            c.json(M::DELETE, &format!("tokens/{id}"), None).await?;
            println!("revoked {id}");
        }
        TokenCmd::RevokeAll { user } => {
            let path = user.map_or("tokens".to_owned(), |u| format!("users/{}/tokens", encode(&u)));
            let v = c.json(M::DELETE, &path, None).await?;
            println!("revoked {} tokens", v["revoked"].as_array().map_or(0, |a| a.len()));
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
        UserCmd::Disable { name } => {
            c.json(M::PUT, &format!("users/{}/disabled", encode(&name)), Some(json!({"disabled": true}))).await?;
            println!("disabled {name}");
        }
        UserCmd::Enable { name } => {
            c.json(M::PUT, &format!("users/{}/disabled", encode(&name)), Some(json!({"disabled": false}))).await?;
            println!("enabled {name}");
        }
    }
    Ok(true)
}

pub async fn repo(conn: &Conn, cmd: RepoCmd) -> Result<bool> {
    use reqwest::Method as M;
    let c = Client::new(conn)?;
    match cmd {
        RepoCmd::List { scope, namespace, tenant, keyword, labels, sort, desc, limit, offset } => {
            let q = query_string(&[
                ("scope", scope),
                ("namespace", namespace),
                ("tenant", tenant),
                ("keyword", keyword),
                ("labels", labels),
                ("sort", sort),
                ("order", desc.then(|| "desc".to_owned())),
                ("limit", limit.map(|n| n.to_string())),
                ("offset", offset.map(|n| n.to_string())),
            ]);
            show_page(conn, &c.json(M::GET, &format!("repositories{q}"), None).await?, &REPO_COLS);
        }
        RepoCmd::Get { name } => show_one(conn, &c.json(M::GET, &format!("repositories/{name}"), None).await?),
        RepoCmd::Create { name, description, category, labels: l, public } => {
            let body = json!({"name": name, "description": description, "category": category, "labels": labels(&l)?, "public": public});
            show_one(conn, &c.json(M::POST, "repositories", Some(body)).await?)
        }
        RepoCmd::Update { name, description, category, labels: l } => {
            let mut body = json!({"description": description, "category": category});
            if !l.is_empty() {
                body["labels"] = Value::Object(labels(&l)?);
            }
            show_one(conn, &c.json(M::PATCH, &format!("repositories/{name}"), Some(body)).await?)
        }
        RepoCmd::Delete { name } => show_one(conn, &c.json(M::DELETE, &format!("repositories/{name}"), None).await?),
        RepoCmd::Prune { name, tagged } => {
            let status = if tagged { "tagged" } else { "untagged" };
            let v = c.json(M::POST, &format!("repositories/{name}/-/manifests/delete"), Some(json!({"status": status}))).await?;
            if conn.json {
                print(&v);
            } else {
                for d in v["deleted"].as_array().into_iter().flatten() {
                    println!("deleted {name}@{}", d.as_str().unwrap_or(""));
                }
            }
        }
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
        RepoCmd::Shares { name } => {
            let v = c.json(M::GET, &format!("repositories/{name}/shares"), None).await?;
            print_shares(conn, &v);
        }
        RepoCmd::Check { name } => {
            let v = c.json(M::GET, &format!("repositories/-/check?name={}", encode(&name)), None).await?;
            show_one(conn, &v);
            // Free for you: valid, yours to push to, not there yet.
            let free = v["valid"].as_bool() == Some(true) && v["pushable"].as_bool() == Some(true) && v["exists"].as_bool() == Some(false);
            return Ok(free);
        }
    }
    Ok(true)
}

pub async fn rotate_key(conn: &Conn, now: bool) -> Result<bool> {
    let c = Client::new(conn)?;
    print(&c.json(reqwest::Method::POST, if now { "keys/rotate?now=true" } else { "keys/rotate" }, None).await?);
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("1234"), Ok(1234));
        assert_eq!(parse_size("500MB"), Ok(500_000_000));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("1.5 kb"), Ok(1500));
        assert!(parse_size("ten").is_err());
        assert!(parse_size("5 parsecs").is_err());
        assert!(parse_size("99999999TB").is_err());
    }
}
