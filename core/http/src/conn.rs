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

/// The peer's address, put into every request's extensions.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Peer(pub(crate) SocketAddr);

/// Accept connections until `shutdown` resolves, then let open connections finish
/// the requests they are serving.
pub(crate) async fn serve(
    services: crate::Services,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    use tower_service::Service;

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
        let svc = warp::hyper::service::service_fn(move |mut req: warp::hyper::Request<warp::hyper::body::Incoming>| {
            req.extensions_mut().insert(Peer(peer));
            svc.clone().call(req)
        });
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            let conn = builder.serve_connection_with_upgrades(TokioIo::new(stream), svc);
            if let Err(e) = watcher.watch(conn).await {
                tracing::debug!(peer = %peer, error = %e, "connection closed on an error");
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

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
