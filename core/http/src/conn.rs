//! The accept loop: one hyper connection per TCP connection, serving [`crate::app`].
//!
//! Berth runs its own loop rather than warp's so that what one client does to its
//! own connection (a malformed request head, a reset, a stalled read) is logged
//! at `debug` with the peer's address, not as a server error: hyper has already
//! answered a malformed head with `400 Bad Request` and closed the connection.
//! Errors of the listener itself (out of file descriptors) stay errors.

use std::future::Future;
use std::io;
use std::net::SocketAddr;

/// The peer's address and whether it came over TLS, put into every request's
/// extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer {
    pub(crate) addr: SocketAddr,
    pub(crate) tls: bool,
}

/// Accept connections until `shutdown` resolves, then let open connections finish
/// the requests they are serving. With `tls`, each connection's handshake comes
/// first (a client that does not finish it within [`crate::tls::HANDSHAKE_TIMEOUT`]
/// is dropped; a failed handshake is the client's doing, logged at `debug`).
pub(crate) async fn serve(
    services: crate::Services,
    listener: tokio::net::TcpListener,
    tls: Option<crate::tls::Tls>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower_service::Service;
    use warp::http::header::{HeaderValue, HOST};

    let app = crate::app(services);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(e) => {
                    accept_failed(e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let svc = warp::service(app.clone());
        let mark = Peer { addr: peer, tls: tls.is_some() };
        let svc = warp::hyper::service::service_fn(move |mut req: warp::hyper::Request<warp::hyper::body::Incoming>| {
            req.extensions_mut().insert(mark);
            // HTTP/2 names the host in the :authority pseudo-header (the URI);
            // everything downstream reads the Host header.
            if !req.headers().contains_key(HOST) {
                let authority = req.uri().authority().and_then(|a| HeaderValue::from_str(a.as_str()).ok());
                if let Some(v) = authority {
                    req.headers_mut().insert(HOST, v);
                }
            }
            svc.clone().call(req)
        });
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            let io: Box<dyn Io> = match tls {
                None => Box::new(stream),
                Some(tls) => match tokio::time::timeout(crate::tls::HANDSHAKE_TIMEOUT, tls.acceptor.accept(stream)).await {
                    Ok(Ok(stream)) => Box::new(stream),
                    Ok(Err(e)) => return tracing::debug!(peer = %peer, error = %e, "TLS handshake failed"),
                    Err(_) => return tracing::debug!(peer = %peer, "TLS handshake timed out"),
                },
            };
            // HTTP/1.1, or HTTP/2 by its preface.
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(peer = %peer, error = %e, "connection closed on an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// A connection's byte stream: TCP, or TLS over TCP.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Io for T {}

/// A failure that concerns one connection is skipped; any other (too many open
/// files) is logged and pauses accepting for a moment instead of spinning.
async fn accept_failed(e: io::Error) {
    use io::ErrorKind::*;
    if matches!(e.kind(), ConnectionRefused | ConnectionAborted | ConnectionReset) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; pausing for a second");
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
}
