//! The one typed configuration, loaded once at start: defaults, then an optional
//! TOML file, then `BERTH_*` environment variables, then command-line flags.
//! Unknown keys in the file and unknown `BERTH_*` variables are errors.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use berth_auth::AuthConfig;
use berth_http::tls::TlsConfig;
use berth_metadata::MetadataConfig;
use berth_registry::RegistryConfig;
use berth_storage::StorageConfig;
use serde::Deserialize;

pub const ENV_CONFIG: &str = "BERTH_CONFIG";
pub const ENV_LISTEN: &str = "BERTH_LISTEN";
pub const DEFAULT_LISTEN: &str = "127.0.0.1:5000";
pub const ENV_DATA_DIR: &str = "BERTH_DATA_DIR";
pub const DEFAULT_DATA_DIR: &str = "./berth-data";
pub const ENV_STORAGE: &str = "BERTH_STORAGE";
pub const ENV_METADATA_URL: &str = "BERTH_METADATA_URL";
pub const ENV_LOG: &str = "BERTH_LOG";
pub const DEFAULT_LOG: &str = "info";
/// Where `berth policy test` looks when no directory is given (a development
/// tool run in a checkout; `serve` never looks here unless configured).
pub const DEFAULT_POLICY_DIR: &str = "./policies";
pub const ENV_LOG_FORMAT: &str = "BERTH_LOG_FORMAT";
pub const ENV_MASTER_KEY_FILE: &str = "BERTH_MASTER_KEY_FILE";
pub const ENV_UPLOAD_TTL: &str = "BERTH_UPLOAD_TTL_SECS";
pub const ENV_ADMIN_PASSWORD: &str = "BERTH_ADMIN_PASSWORD";
pub const ENV_EXTERNAL_URL: &str = "BERTH_EXTERNAL_URL";
/// `[tls] certificate` and `key`: serve HTTPS (both or neither).
pub const ENV_TLS_CERTIFICATE: &str = "BERTH_TLS_CERTIFICATE";
pub const ENV_TLS_KEY: &str = "BERTH_TLS_KEY";
pub const ENV_POLICY_DIR: &str = "BERTH_POLICY_DIR";
/// Where plugin modules are installed (default `<data_dir>/plugins`).
pub const ENV_PLUGIN_DIR: &str = "BERTH_PLUGIN_DIR";
/// Used by the client subcommands (`berth policy …`, `berth token …`).
pub const ENV_SERVER: &str = "BERTH_SERVER";
pub const ENV_USER: &str = "BERTH_USER";
pub const ENV_PASSWORD: &str = "BERTH_PASSWORD";
/// Where `berth login` keeps credentials (default `~/.config/berth/credentials.json`).
pub const ENV_CREDENTIALS: &str = "BERTH_CREDENTIALS";

const KNOWN_ENV: &[&str] = &[
    ENV_CONFIG,
    ENV_LISTEN,
    ENV_DATA_DIR,
    ENV_STORAGE,
    ENV_METADATA_URL,
    ENV_LOG,
    ENV_LOG_FORMAT,
    ENV_UPLOAD_TTL,
    ENV_ADMIN_PASSWORD,
    ENV_EXTERNAL_URL,
    ENV_TLS_CERTIFICATE,
    ENV_TLS_KEY,
    ENV_POLICY_DIR,
    ENV_MASTER_KEY_FILE,
    ENV_PLUGIN_DIR,
    ENV_SERVER,
    ENV_USER,
    ENV_PASSWORD,
    ENV_CREDENTIALS,
];

/// The configuration file's shape (every section optional).
#[derive(Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub storage: Option<StorageConfig>,
    pub metadata: Option<MetadataConfig>,
    #[serde(default)]
    pub registry: Option<RegistryConfig>,
    pub log: Option<LogConfig>,
    pub auth: Option<AuthConfig>,
    pub plugins: Option<PluginsFile>,
    /// HTTPS on the main listener.
    pub tls: Option<TlsConfig>,
    /// Seconds between SIGTERM and the listener closing, while `/readyz`
    /// answers 503 and requests are still served (default 0; behind a load
    /// balancer, its health-check interval times the failures it needs).
    pub drain_secs: Option<u64>,
}

/// `[plugins]`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct PluginsFile {
    /// Where modules are installed (a folder each); default `<data_dir>/plugins`.
    pub dir: Option<PathBuf>,
    /// `false`: no plugin is loaded or called.
    pub enabled: Option<bool>,
}

/// The plugin host's settings.
#[derive(Clone, Debug, PartialEq)]
pub struct PluginsConfig {
    pub enabled: bool,
    pub dir: PathBuf,
    /// Compiled modules, reused across restarts: `<data_dir>/plugins-cache`.
    pub cache_dir: PathBuf,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    /// An `EnvFilter` directive such as `info` or `berth_http=debug,info`.
    #[serde(default = "default_log")]
    pub level: String,
    #[serde(default)]
    pub format: LogFormat,
}

fn default_log() -> String {
    DEFAULT_LOG.into()
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// The effective configuration.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub storage: StorageConfig,
    pub metadata: MetadataConfig,
    pub registry: RegistryConfig,
    pub log: LogConfig,
    pub auth: AuthConfig,
    pub plugins: PluginsConfig,
    pub tls: Option<TlsConfig>,
    pub drain_secs: u64,
}

/// Values given on the command line (they win over everything else).
#[derive(Debug, Default)]
pub struct Overrides {
    pub config: Option<PathBuf>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
}

impl Config {
    /// Build the configuration from `env` (the process environment in production,
    /// a map in tests) and command-line overrides.
    pub fn load(env: &HashMap<String, String>, cli: Overrides) -> Result<Config, String> {
        for key in env.keys().filter(|k| k.starts_with("BERTH_")) {
            if !KNOWN_ENV.contains(&key.as_str()) {
                return Err(format!("unknown environment variable {key} (known: {})", KNOWN_ENV.join(", ")));
            }
        }
        let path = cli.config.clone().or_else(|| env.get(ENV_CONFIG).map(PathBuf::from));
        let file = match &path {
            Some(p) => {
                let text = std::fs::read_to_string(p).map_err(|e| format!("reading config {}: {e}", p.display()))?;
                toml::from_str::<FileConfig>(&text).map_err(|e| format!("config {}: {e}", p.display()))?
            }
            None => FileConfig::default(),
        };
        let listen = cli.listen.or_else(|| env.get(ENV_LISTEN).cloned()).or(file.listen).unwrap_or_else(|| DEFAULT_LISTEN.into());
        let listen: SocketAddr = listen.parse().map_err(|e| format!("listen address {listen:?}: {e}"))?;
        let data_dir = cli
            .data_dir
            .or_else(|| env.get(ENV_DATA_DIR).map(PathBuf::from))
            .or(file.data_dir)
            .unwrap_or_else(|| PathBuf::from(DEFAULT_DATA_DIR));
        let storage = match env.get(ENV_STORAGE).map(String::as_str) {
            Some("fs") | None if file.storage.is_none() => StorageConfig::fs(path_str(&data_dir.join("blobs"))),
            Some("fs") => StorageConfig::fs(path_str(&data_dir.join("blobs"))),
            Some("memory") => StorageConfig::Memory,
            Some(other) => return Err(format!("{ENV_STORAGE}={other:?}: expected fs or memory (configure s3 in the file)")),
            None => file.storage.expect("checked above"),
        };
        let metadata = match (env.get(ENV_METADATA_URL), file.metadata) {
            (Some(url), Some(m)) => MetadataConfig { url: url.clone(), ..m },
            (Some(url), None) => MetadataConfig::new(url.clone()),
            (None, Some(m)) => m,
            (None, None) => MetadataConfig::new(format!("surrealkv://{}", path_str(&data_dir.join("meta")))),
        };
        let mut registry = file.registry.unwrap_or_default();
        if let Some(v) = env.get(ENV_UPLOAD_TTL) {
            registry.upload_ttl_secs = v.parse().map_err(|e| format!("{ENV_UPLOAD_TTL}={v:?}: {e}"))?;
        }
        let mut log = file.log.unwrap_or(LogConfig { level: default_log(), format: LogFormat::Text });
        if let Some(v) = env.get(ENV_LOG) {
            log.level = v.clone();
        }
        if let Some(v) = env.get(ENV_LOG_FORMAT) {
            log.format = match v.as_str() {
                "text" => LogFormat::Text,
                "json" => LogFormat::Json,
                _ => return Err(format!("{ENV_LOG_FORMAT}={v:?}: expected text or json")),
            };
        }
        let mut auth = file.auth.unwrap_or_default();
        if let Some(v) = env.get(ENV_ADMIN_PASSWORD) {
            auth.admin_password = Some(v.clone());
        }
        if let Some(v) = env.get(ENV_EXTERNAL_URL) {
            auth.external_url = Some(v.clone());
        }
        if let Some(v) = env.get(ENV_POLICY_DIR) {
            auth.policy_dir = Some(PathBuf::from(v));
        }
        if let Some(v) = env.get(ENV_MASTER_KEY_FILE) {
            auth.master_key_file = Some(PathBuf::from(v));
        }
        if auth.master_key_file.is_none() {
            // Replicas sharing a server must share the key: it is never made up
            // behind their backs. On one machine it lives beside the data.
            if metadata.is_server() {
                return Err(format!(
                    "metadata on a SurrealDB server: set [auth] master_key_file (or {ENV_MASTER_KEY_FILE}), the same file on every \
                     replica (64 hex digits; it seals the token-signing keys, keep it out of database backups)"
                ));
            }
            auth.master_key_file = Some(data_dir.join("master.key"));
            auth.generate_master_key = true;
        }
        if let Some(u) = &auth.external_url {
            if !(u.starts_with("http://") || u.starts_with("https://")) {
                return Err(format!("external_url {u:?} must start with http:// or https://"));
            }
        }
        // Policies come from a directory only when one is configured: a
        // `policies/` folder that happens to be in the working directory of a
        // production start is never picked up. Unset: the built-in defaults (the
        // repository's `policies/` as compiled in).
        let plugins_file = file.plugins.unwrap_or_default();
        let plugins = PluginsConfig {
            enabled: plugins_file.enabled.unwrap_or(true),
            dir: env.get(ENV_PLUGIN_DIR).map(PathBuf::from).or(plugins_file.dir).unwrap_or_else(|| data_dir.join("plugins")),
            cache_dir: data_dir.join("plugins-cache"),
        };
        let tls = match (env.get(ENV_TLS_CERTIFICATE), env.get(ENV_TLS_KEY), file.tls) {
            (None, None, file) => file,
            (Some(c), Some(k), _) => Some(TlsConfig { certificate: c.into(), key: k.into() }),
            (Some(c), None, Some(f)) => Some(TlsConfig { certificate: c.into(), ..f }),
            (None, Some(k), Some(f)) => Some(TlsConfig { key: k.into(), ..f }),
            _ => return Err(format!("TLS needs a certificate and a key: set both {ENV_TLS_CERTIFICATE} and {ENV_TLS_KEY} (or [tls])")),
        };
        let drain_secs = file.drain_secs.unwrap_or(0);
        if drain_secs > 600 {
            return Err(format!("drain_secs {drain_secs}: at most 600"));
        }
        Ok(Config { listen, data_dir, storage, metadata, registry, log, auth, plugins, tls, drain_secs })
    }
}

fn path_str(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn tls_needs_a_certificate_and_a_key() {
        assert_eq!(Config::load(&env(&[]), Overrides::default()).unwrap().tls, None);
        let both = env(&[(ENV_TLS_CERTIFICATE, "/c.pem"), (ENV_TLS_KEY, "/k.pem")]);
        let tls = Config::load(&both, Overrides::default()).unwrap().tls.unwrap();
        assert_eq!((tls.certificate, tls.key), (PathBuf::from("/c.pem"), PathBuf::from("/k.pem")));
        for one in [ENV_TLS_CERTIFICATE, ENV_TLS_KEY] {
            let err = Config::load(&env(&[(one, "/x.pem")]), Overrides::default()).unwrap_err();
            assert!(err.contains("a certificate and a key"), "{err}");
        }
        assert!(toml::from_str::<FileConfig>("[tls]\ncertificate = \"/c.pem\"\n").is_err(), "[tls] without a key");
        assert!(toml::from_str::<FileConfig>("[tls]\ncertificate = \"/c\"\nkey = \"/k\"\nca = \"/a\"\n").is_err(), "unknown key");
    }

    #[test]
    fn defaults_are_embedded() {
        let c = Config::load(&env(&[]), Overrides::default()).unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert_eq!(c.storage, StorageConfig::fs("./berth-data/blobs"));
        assert_eq!(c.metadata.url, "surrealkv://./berth-data/meta");
    }

    #[test]
    fn precedence_cli_over_env_over_file() {
        let dir = std::env::temp_dir().join(format!("berth-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("berth.toml");
        std::fs::write(&file, "listen = \"127.0.0.1:7000\"\ndata_dir = \"/d\"\n[registry]\nupload_ttl_secs = 5\n").unwrap();
        let e = env(&[(ENV_CONFIG, file.to_str().unwrap()), (ENV_LISTEN, "127.0.0.1:7001")]);
        let c = Config::load(&e, Overrides::default()).unwrap();
        assert_eq!(c.listen.port(), 7001);
        assert_eq!(c.data_dir, PathBuf::from("/d"));
        assert_eq!(c.registry.upload_ttl_secs, 5);
        let c = Config::load(&e, Overrides { listen: Some("127.0.0.1:7002".into()), ..Default::default() }).unwrap();
        assert_eq!(c.listen.port(), 7002);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn unknown_keys_are_errors() {
        let dir = std::env::temp_dir().join(format!("berth-config-u-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for text in ["lisen = \"x\"", "[storage]\nbackend = \"fs\"\nroot = \"/x\"\nbogus = 1", "[registry]\nttl = 1"] {
            let file = dir.join("bad.toml");
            std::fs::write(&file, text).unwrap();
            let err = Config::load(&env(&[]), Overrides { config: Some(file), ..Default::default() }).unwrap_err();
            assert!(err.contains("unknown"), "{text}: {err}");
        }
        std::fs::remove_dir_all(dir).unwrap();
        let err = Config::load(&env(&[("BERTH_LISTN", "x")]), Overrides::default()).unwrap_err();
        assert!(err.contains("BERTH_LISTN"));
        assert!(Config::load(&env(&[(ENV_LISTEN, "nope")]), Overrides::default()).is_err());
    }

    #[test]
    fn backends_by_config() {
        let c = Config::load(&env(&[(ENV_STORAGE, "memory"), (ENV_METADATA_URL, "mem://")]), Overrides::default()).unwrap();
        assert_eq!(c.storage, StorageConfig::Memory);
        assert_eq!(c.metadata.url, "mem://");
    }

    #[test]
    fn the_master_key_beside_the_data_or_configured_for_a_server() {
        let c = Config::load(&env(&[]), Overrides::default()).unwrap();
        assert_eq!(c.auth.master_key_file, Some(PathBuf::from("./berth-data/master.key")));
        assert!(c.auth.generate_master_key);
        let err = Config::load(&env(&[(ENV_METADATA_URL, "ws://db:8000")]), Overrides::default()).unwrap_err();
        assert!(err.contains("master_key_file"), "{err}");
        let c =
            Config::load(&env(&[(ENV_METADATA_URL, "ws://db:8000"), (ENV_MASTER_KEY_FILE, "/etc/berth/master.key")]), Overrides::default())
                .unwrap();
        assert_eq!((c.auth.master_key_file, c.auth.generate_master_key), (Some(PathBuf::from("/etc/berth/master.key")), false));
    }
}
