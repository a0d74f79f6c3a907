//! `berth`: the registry binary.
//!
//! `berth serve` runs a complete registry on one machine with embedded defaults
//! (blobs on the filesystem, metadata in embedded SurrealDB, both under the data
//! directory). The same binary scales out by configuration (S3 storage, a
//! SurrealDB server).

mod client;
mod config;

use std::path::PathBuf;

use berth_metadata::Metadata;
use berth_registry::Registry;
use berth_storage::BlobStore;
use clap::{Parser, Subcommand};
use config::{Config, LogFormat, Overrides};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(name = "berth", version, about = "Berth: a multi-tenant OCI container registry")]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    conn: client::Conn,
}

#[derive(Subcommand)]
enum Command {
    /// Run the registry.
    Serve {
        /// Address to listen on [env: BERTH_LISTEN] [default: 127.0.0.1:5000]
        #[arg(long)]
        listen: Option<String>,
        /// Directory for blobs and metadata [env: BERTH_DATA_DIR] [default: ./berth-data]
        #[arg(long)]
        data_dir: Option<PathBuf>,
        /// TOML configuration file [env: BERTH_CONFIG]
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Administer policies (casbin rules) of a running Berth, or test policy files.
    #[command(subcommand)]
    Policy(client::PolicyCmd),
    /// Issue, list and revoke registry access tokens.
    #[command(subcommand)]
    Token(client::TokenCmd),
    /// Manage tenants.
    #[command(subcommand)]
    Tenant(client::TenantCmd),
    /// Manage users.
    #[command(subcommand)]
    User(client::UserCmd),
    /// Repositories: list, inspect, create, update, delete, prune; visibility and sharing.
    #[command(subcommand)]
    Repo(client::RepoCmd),
    /// Namespaces: list, inspect, create, update, delete, check a name.
    #[command(subcommand)]
    Ns(client::NsCmd),
    /// Tags of a repository: list, inspect, delete; delete a manifest by digest.
    #[command(subcommand)]
    Tag(client::TagCmd),
    /// Shares you granted, repositories shared with your tenant (share with `berth repo share`).
    #[command(subcommand)]
    Share(client::ShareCmd),
    /// Per-tenant quotas: show limits and usage; set a tenant's limits (platform admin).
    #[command(subcommand)]
    Quota(client::QuotaCmd),
    /// Retention policies of repositories and namespaces: set, show, remove, run (or dry-run), past runs.
    #[command(subcommand)]
    Retention(client::RetentionCmd),
    /// Official images: list, inspect, versions.
    #[command(subcommand)]
    Official(client::OfficialCmd),
    /// The registry's address and its pull-through mirror's (for `registry-mirrors`).
    Registry,
    /// The security audit log, newest first (platform admin).
    Audit {
        /// Only this action (login, login-failed, token-issued, token-revoked, …).
        #[arg(long)]
        action: Option<String>,
        /// Events of the last this many seconds [default: a day].
        #[arg(long)]
        since_secs: Option<u64>,
        /// At most this many events (1–1000) [default: 100].
        #[arg(long)]
        limit: Option<u32>,
    },
    /// Check metadata against storage and the reference counts against a recount
    /// (exit 1 if not clean); --repair fixes what is safe to fix.
    Fsck {
        #[arg(long)]
        repair: bool,
        /// Hash every stored blob again (reads everything).
        #[arg(long)]
        rehash: bool,
        /// Check a stopped registry's data directory instead of asking a server.
        #[arg(long)]
        offline: bool,
        /// With --offline: the data directory (default as for `serve`).
        #[arg(long)]
        data_dir: Option<std::path::PathBuf>,
        /// With --offline: the configuration file (default as for `serve`).
        #[arg(long)]
        config: Option<std::path::PathBuf>,
    },
    /// Garbage collection: run a pass now (or a dry run), show the collector's status.
    #[command(subcommand)]
    Gc(client::GcCmd),
    /// WebAssembly plugins: modules (install, reload) and instances (enable, disable, status).
    #[command(subcommand)]
    Plugin(client::PluginCmd),
    /// Check credentials against the server and store them (mode 0600) for later commands.
    Login,
    /// Forget the stored credentials.
    Logout,
    /// Print the management API's OpenAPI 3 document.
    Openapi,
    /// Rotate the bearer-token signing key (older keys verify until their tokens
    /// expire; with --now, a leaked key, they stop at once).
    RotateKey {
        #[arg(long)]
        now: bool,
    },
}

fn main() -> std::process::ExitCode {
    // `RUST_BACKTRACE=1` (often set by operators for panics) also makes every
    // error value capture a backtrace (`anyhow`, `std::backtrace`), and the
    // embedded SurrealDB builds error values on ordinary paths: measured here,
    // pushes ran 25 % slower with it. Error backtraces stay off unless asked
    // for by `RUST_LIB_BACKTRACE`; panics keep theirs.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        // The first statement of `main`: no other thread reads the environment yet.
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    let conn = cli.conn.clone();
    let run_client = |f: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<bool>>>>| {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        match rt.block_on(f) {
            Ok(true) => std::process::ExitCode::SUCCESS,
            Ok(false) => std::process::ExitCode::from(1),
            Err(e) => {
                eprintln!("berth: {e:#}");
                std::process::ExitCode::from(2)
            }
        }
    };
    match cli.command {
        Command::Policy(c) => run_client(Box::pin(async move { client::policy(&conn, c).await })),
        Command::Token(c) => run_client(Box::pin(async move { client::token(&conn, c).await })),
        Command::Tenant(c) => run_client(Box::pin(async move { client::tenant(&conn, c).await })),
        Command::User(c) => run_client(Box::pin(async move { client::user(&conn, c).await })),
        Command::Repo(c) => run_client(Box::pin(async move { client::repo(&conn, c).await })),
        Command::Ns(c) => run_client(Box::pin(async move { client::ns(&conn, c).await })),
        Command::Share(c) => run_client(Box::pin(async move { client::share(&conn, c).await })),
        Command::Retention(c) => run_client(Box::pin(async move { client::retention(&conn, c).await })),
        Command::Official(c) => run_client(Box::pin(async move { client::official(&conn, c).await })),
        Command::Registry => run_client(Box::pin(async move { client::registry_info(&conn).await })),
        Command::Audit { action, since_secs, limit } => {
            run_client(Box::pin(async move { client::audit(&conn, action, since_secs, limit).await }))
        }
        Command::Fsck { repair, rehash, offline: false, .. } => {
            run_client(Box::pin(async move { client::fsck(&conn, repair, rehash).await }))
        }
        Command::Fsck { repair, rehash, offline: true, data_dir, config } => {
            let env: std::collections::HashMap<String, String> = std::env::vars().collect();
            let mut cfg = match Config::load(&env, Overrides { config, listen: None, data_dir }) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: configuration error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            // Nothing but the check runs against the data directory.
            cfg.registry.gc.enabled = false;
            cfg.registry.retention.enabled = false;
            let json_out = conn.json;
            run_client(Box::pin(async move { fsck_offline(cfg, repair, rehash, json_out).await }))
        }
        Command::Gc(c) => run_client(Box::pin(async move { client::gc(&conn, c).await })),
        Command::Plugin(c) => run_client(Box::pin(async move { client::plugin(&conn, c).await })),
        Command::Quota(c) => run_client(Box::pin(async move { client::quota(&conn, c).await })),
        Command::Tag(c) => run_client(Box::pin(async move { client::tag(&conn, c).await })),
        Command::Login => run_client(Box::pin(async move { client::login(&conn).await })),
        Command::Openapi => {
            println!("{}", berth_http::openapi_json());
            std::process::ExitCode::SUCCESS
        }
        Command::Logout => run_client(Box::pin(async move { client::logout() })),
        Command::RotateKey { now } => run_client(Box::pin(async move { client::rotate_key(&conn, now).await })),
        Command::Serve { listen, data_dir, config } => {
            let env: std::collections::HashMap<String, String> = std::env::vars().collect();
            let cfg = match Config::load(&env, Overrides { config, listen, data_dir }) {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("berth: configuration error: {e}");
                    return std::process::ExitCode::from(2);
                }
            };
            init_logging(&cfg);
            fix_malloc_thresholds(&env);
            let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
                Ok(rt) => rt,
                Err(e) => {
                    eprintln!("berth: starting runtime: {e}");
                    return std::process::ExitCode::FAILURE;
                }
            };
            match rt.block_on(serve(cfg)) {
                Ok(()) => std::process::ExitCode::SUCCESS,
                Err(e) => {
                    tracing::error!(error = %e, "berth stopped");
                    eprintln!("berth: {e}");
                    std::process::ExitCode::FAILURE
                }
            }
        }
    }
}

/// Fix glibc's allocator thresholds instead of letting them float.
///
/// By default glibc raises its mmap threshold each time a large mapped block is
/// freed (up to 32 MiB), after which upload-sized buffers come from its arenas and
/// stay there: one 1 GiB push and three pulls left the process at 108–117 MiB
/// resident (peak 121–129). With allocations of 4 MiB and up mapped on their own
/// and arenas trimmed once 16 MiB lie free at their top, the same run ends at
/// 39–40 MiB (peak 75–81), with push speeds unchanged (medians 1,605 vs 1,610 MB/s
/// over five alternating runs). The 16 MiB keeps glibc from handing memory back
/// and faulting it in again on every chunk, which cost ~15 % of push speed with
/// its default of 128 KiB. An operator's own `GLIBC_TUNABLES` for either wins.
fn fix_malloc_thresholds(env: &std::collections::HashMap<String, String>) {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let tunables = env.get("GLIBC_TUNABLES").map(String::as_str).unwrap_or("");
        // SAFETY: mallopt only adjusts allocator parameters; called before the
        // runtime starts any thread.
        unsafe {
            if !tunables.contains("mmap_threshold") {
                libc::mallopt(libc::M_MMAP_THRESHOLD, 4 << 20);
            }
            if !tunables.contains("trim_threshold") {
                libc::mallopt(libc::M_TRIM_THRESHOLD, 16 << 20);
            }
        }
    }
    let _ = env;
}

/// Hand the allocator's free memory back to the system: once the server has
/// been quiet for a tick after handling requests, and under load whenever the
/// process's anonymous memory grew by [`TRIM_GROWTH`] since the last trim
/// (checked every 2 s).
///
/// glibc gives memory back only from the top of an arena: free memory between
/// live chunks stays resident until `malloc_trim`, and each thread that
/// allocates under contention gets an arena of its own. After a burst of 50
/// concurrent pushes the process stayed at its peak (~227 MiB) until the quiet
/// trim; under a steady write load there is no quiet tick, and the free memory
/// grew without bound: filling 100,000 tags, the arenas held 376 MB from the
/// system with 98 MB in use, and one trim took the process from 433 to
/// 197 MiB. A trim walks every arena's free chunks (milliseconds; measured in
/// docs/PERFORMANCE.md) on a blocking thread.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
async fn trim_memory() {
    const TICK: std::time::Duration = std::time::Duration::from_secs(2);
    let mut seen = berth_http::request_counts();
    let mut trimmed_at = seen;
    let mut floor = anon_bytes();
    loop {
        tokio::time::sleep(TICK).await;
        let now = berth_http::request_counts();
        let quiet = now == seen && now.0 == now.1;
        seen = now;
        // The floor follows memory down, so growth counts from the lowest since.
        let anon = anon_bytes();
        floor = floor.min(anon);
        let grown = anon - floor >= TRIM_GROWTH;
        let after_burst = quiet && now != trimmed_at;
        if !(grown || after_burst) {
            continue;
        }
        let started = std::time::Instant::now();
        // SAFETY: malloc_trim only releases free memory; it is thread-safe.
        let after = tokio::task::spawn_blocking(|| unsafe {
            libc::malloc_trim(0);
            anon_bytes()
        })
        .await
        .unwrap_or(anon);
        tracing::debug!(
            before_mib = anon >> 20,
            after_mib = after >> 20,
            took_ms = started.elapsed().as_millis() as u64,
            quiet,
            "allocator trimmed"
        );
        (floor, trimmed_at) = (after, now);
    }
}

/// Anonymous memory growth that makes a busy server trim its allocator.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
const TRIM_GROWTH: u64 = 32 << 20;

/// This process's resident memory that is not file-backed (heap, caches), in
/// bytes; 0 if /proc cannot tell.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn anon_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let mut pages = statm.split_whitespace().skip(1).map(|v| v.parse::<u64>().unwrap_or(0));
    let (resident, shared) = (pages.next().unwrap_or(0), pages.next().unwrap_or(0));
    // SAFETY: sysconf only reads a system constant.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(1) as u64;
    resident.saturating_sub(shared) * page
}

fn init_logging(cfg: &Config) {
    let filter = EnvFilter::try_new(&cfg.log.level).unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_ansi(ansi).with_writer(std::io::stderr);
    match cfg.log.format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

async fn serve(cfg: Config) -> anyhow::Result<()> {
    std::fs::create_dir_all(&cfg.data_dir)?;
    let tls = cfg.tls.as_ref().map(berth_http::tls::Tls::open).transpose().map_err(|e| anyhow::anyhow!(e))?;
    let store = BlobStore::open(&cfg.storage).await.map_err(|e| anyhow::anyhow!("opening storage: {e}"))?;
    let meta = Metadata::connect(&cfg.metadata).await.map_err(|e| anyhow::anyhow!("opening metadata {}: {e}", cfg.metadata.url))?;
    let plugins = if cfg.plugins.enabled {
        let p = berth_registry::plugins::Plugins::open(&cfg.plugins.dir, &cfg.plugins.cache_dir, meta.clone())
            .await
            .map_err(|e| anyhow::anyhow!("plugins: {e}"))?;
        Some(p)
    } else {
        None
    };
    let meta_close = meta.clone();
    let registry = Registry::open(store, meta.clone(), cfg.registry.clone(), plugins).await.map_err(|e| anyhow::anyhow!(e))?;
    let index = registry.clone();
    let repo_exists: berth_auth::RepoProbe = Box::new(move |repo| index.repo_held(repo));
    let auth =
        berth_auth::Auth::open(meta, cfg.auth.clone(), registry.arbiter(), repo_exists).await.map_err(|e| anyhow::anyhow!("auth: {e}"))?;
    if let Some(dir) = &cfg.auth.policy_dir {
        tracing::info!(dir = %dir.display(), "policies loaded");
    }
    let listener = tokio::net::TcpListener::bind(cfg.listen).await.map_err(|e| anyhow::anyhow!("binding {}: {e}", cfg.listen))?;
    let addr = listener.local_addr()?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(%addr, scheme, data_dir = %cfg.data_dir.display(), storage = ?storage_kind(&cfg), metadata = %cfg.metadata.url, "berth listening");
    // The line tests and scripts wait for (the bound port may have been 0).
    println!("berth listening on {scheme}://{addr}");
    if let Some(pw) = &auth.generated_admin_password {
        // Shown once, on the first start of a new data directory.
        println!("berth created the platform admin: user 'admin', password '{pw}' (shown once; set BERTH_ADMIN_PASSWORD to choose it)");
    }
    let services = berth_http::Services { registry: registry.clone(), auth: auth.clone() };
    let watchdog = cfg.metadata.watchdog_secs.unwrap_or(berth_metadata::DEFAULT_WATCHDOG_SECS);
    if watchdog > 0 {
        watch_metadata(meta_close.clone(), std::time::Duration::from_secs(watchdog))?;
    }
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    tokio::spawn(trim_memory());
    // On SIGTERM readiness goes false first; requests are served for
    // `drain_secs` more (so a load balancer moves away), then the listener closes.
    let (draining, drain) = (registry.clone(), std::time::Duration::from_secs(cfg.drain_secs));
    let shutdown = async move {
        shutdown_signal().await;
        draining.drain();
        if !drain.is_zero() {
            tracing::info!(secs = drain.as_secs(), "draining: /readyz answers 503");
            tokio::time::sleep(drain).await;
        }
    };
    berth_http::serve(services, listener, tls, shutdown).await;
    tracing::info!("shutting down");
    registry.flush_counters().await;
    auth.close().await;
    registry.shutdown();
    meta_close.shutdown().await;
    Ok(())
}

/// Exit when the metadata store stops answering (see `MetadataConfig::watchdog_secs`):
/// a task reads from it every few seconds; a thread of its own (not the
/// runtime's, whose workers may be the ones stuck) checks that reads keep
/// succeeding. Exiting is safe: every acknowledged change is durable, and the
/// next start sweeps what was in flight.
fn watch_metadata(meta: Metadata, limit: std::time::Duration) -> anyhow::Result<()> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let beat = std::sync::Arc::new(AtomicU64::new(0));
    let started = std::time::Instant::now();
    let b = beat.clone();
    tokio::spawn(async move {
        loop {
            if meta.ping().await.is_ok() {
                b.store(started.elapsed().as_secs(), Ordering::Release);
            }
            tokio::time::sleep(std::time::Duration::from_secs(2)).await;
        }
    });
    std::thread::Builder::new().name("berth-watchdog".into()).spawn(move || loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
        let silent = started.elapsed().as_secs().saturating_sub(beat.load(Ordering::Acquire));
        if silent > limit.as_secs() {
            tracing::error!(
                silent_secs = silent,
                "the metadata store has not answered for {silent} s; exiting so a supervisor restarts Berth (metadata.watchdog_secs)"
            );
            eprintln!("berth: the metadata store has not answered for {silent} s; exiting (metadata.watchdog_secs)");
            std::process::exit(75);
        }
    })?;
    Ok(())
}

/// `berth fsck --offline`: open a stopped registry's storage and metadata and check them.
async fn fsck_offline(cfg: Config, repair: bool, rehash: bool, json_out: bool) -> anyhow::Result<bool> {
    if !cfg.data_dir.exists() {
        anyhow::bail!("no data directory at {}", cfg.data_dir.display());
    }
    let store = BlobStore::open(&cfg.storage).await.map_err(|e| anyhow::anyhow!("opening storage: {e}"))?;
    let meta = Metadata::connect(&cfg.metadata).await.map_err(|e| anyhow::anyhow!("opening metadata {}: {e}", cfg.metadata.url))?;
    let meta_close = meta.clone();
    let registry = Registry::open(store, meta, cfg.registry.clone(), None).await.map_err(|e| anyhow::anyhow!(e))?;
    let report = registry.fsck(repair, rehash).await.map_err(|e| anyhow::anyhow!(e.detail_or_message()))?;
    registry.shutdown();
    meta_close.shutdown().await;
    let v: serde_json::Value = serde_json::from_str(&berth_http::fsck_json(report))?;
    Ok(client::print_fsck(json_out, &v))
}

fn storage_kind(cfg: &Config) -> &'static str {
    match cfg.storage {
        berth_storage::StorageConfig::Fs { .. } => "fs",
        berth_storage::StorageConfig::Memory => "memory",
        berth_storage::StorageConfig::S3 { .. } => "s3",
    }
}

async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("SIGINT received"),
        _ = term => tracing::info!("SIGTERM received"),
    }
}

#[cfg(all(test, target_os = "linux", target_env = "gnu"))]
mod tests {
    /// What the busy trim compares: touched heap memory shows in `anon_bytes`.
    #[test]
    fn anon_bytes_sees_touched_memory() {
        let before = super::anon_bytes();
        assert!(before > 0);
        let touched = vec![1u8; 64 << 20];
        let during = super::anon_bytes();
        assert!(during >= before + (48 << 20), "{before} -> {during}");
        drop(touched);
    }
}
