//! TLS on the main listener (`[tls]` in the configuration): a certificate chain
//! and its private key, PEM files, read at start and again whenever either file
//! changes (looked at every [`RELOAD_CHECK`]), so a renewed certificate is served
//! without a restart. A renewal that does not load (a file half written, a key
//! that does not match the certificate) is logged and the certificate in use
//! stays; the next change to either file is tried again. HTTP/2 and HTTP/1.1
//! are offered by ALPN.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use serde::Deserialize;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::{ClientHello, ResolvesServerCert};
use tokio_rustls::rustls::sign::CertifiedKey;

/// How often the certificate files are looked at for a renewal.
pub const RELOAD_CHECK: Duration = Duration::from_secs(5);

/// How long a client may take over its handshake before the connection is dropped.
pub(crate) const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// `[tls]`: serve HTTPS on the main listener.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM file of the certificate chain, the server's own certificate first.
    pub certificate: PathBuf,
    /// PEM file of its private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// The certificate being served.
#[derive(Debug)]
struct Current {
    key: RwLock<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for Current {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.key.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// The listener's TLS: the acceptor the accept loop hands each connection to.
#[derive(Clone)]
pub struct Tls {
    pub(crate) acceptor: tokio_rustls::TlsAcceptor,
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

impl Tls {
    /// Read the certificate and key (an error names the file and what is wrong
    /// with it) and start looking for renewals. Needs a tokio runtime.
    pub fn open(config: &TlsConfig) -> Result<Tls, String> {
        let provider = provider();
        let key = load(config, &provider)?;
        let current = Arc::new(Current { key: RwLock::new(Arc::new(key)) });
        let mut server = rustls::ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(|e| format!("TLS: {e}"))?
            .with_no_client_auth()
            .with_cert_resolver(current.clone());
        server.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        tokio::spawn(watch(config.clone(), current, provider));
        Ok(Tls { acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)) })
    }
}

/// Read the chain and the key, and check that they belong together.
fn load(config: &TlsConfig, provider: &rustls::crypto::CryptoProvider) -> Result<CertifiedKey, String> {
    let shown = |p: &Path| p.display().to_string();
    let chain = CertificateDer::pem_file_iter(&config.certificate)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("TLS certificate {}: {e}", shown(&config.certificate)))?;
    if chain.is_empty() {
        return Err(format!("TLS certificate {}: no CERTIFICATE block in it", shown(&config.certificate)));
    }
    let key = PrivateKeyDer::from_pem_file(&config.key).map_err(|e| format!("TLS key {}: {e}", shown(&config.key)))?;
    CertifiedKey::from_der(chain, key, provider)
        .map_err(|e| format!("TLS key {} for certificate {}: {e}", shown(&config.key), shown(&config.certificate)))
}

/// What a file looks like from outside: a renewal changes one of these.
fn stamp(p: &Path) -> Option<(SystemTime, u64, u64)> {
    use std::os::unix::fs::MetadataExt;
    let m = std::fs::metadata(p).ok()?;
    Some((m.modified().ok()?, m.len(), m.ino()))
}

/// Reload the certificate whenever its files change.
async fn watch(config: TlsConfig, current: Arc<Current>, provider: Arc<rustls::crypto::CryptoProvider>) {
    let stamps = |c: &TlsConfig| (stamp(&c.certificate), stamp(&c.key));
    let mut seen = stamps(&config);
    loop {
        tokio::time::sleep(RELOAD_CHECK).await;
        let now = stamps(&config);
        if now == seen {
            continue;
        }
        seen = now;
        let (c, p) = (config.clone(), provider.clone());
        match tokio::task::spawn_blocking(move || load(&c, &p)).await {
            Ok(Ok(key)) => {
                *current.key.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(key);
                tracing::info!(certificate = %config.certificate.display(), "TLS certificate reloaded");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "TLS certificate changed but does not load; still serving the previous one"),
            Err(e) => tracing::error!(error = %e, "TLS certificate reload failed"),
        }
    }
}
