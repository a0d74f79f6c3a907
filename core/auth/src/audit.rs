//! Security events. Each is a `tracing` event on the target `berth::audit` (who,
//! from where, what; never a secret) and a row of the audit log in metadata,
//! which the platform admin reads through `/api/v1/audit`. Rows are written in
//! batches by a background task, so recording never waits on the store; if the
//! store falls far behind, events past the buffer are counted and logged only.
//!
//! Recorded: password logins (a fresh verification, not each request a cached
//! credential answers) and failed logins, access tokens issued and revoked,
//! password changes, users created, policy rule changes, shares and visibility
//! changed, signing-key rotation. Not recorded: bearer tokens handed to docker
//! for each pull (their issue is a consequence of a recorded login).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use berth_metadata::{AuditRow, Metadata};

tokio::task_local! {
    /// The client's address for the request being served (set by the HTTP
    /// layer around each request), so events need not be handed it.
    pub static SOURCE: String;
}

/// Events waiting to be written, at most.
const BUFFER: usize = 10_000;

pub struct Audit {
    tx: tokio::sync::mpsc::Sender<AuditRow>,
    dropped: Arc<AtomicU64>,
    closing: Arc<tokio::sync::Notify>,
    writer: std::sync::Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl Audit {
    /// Start the writer: batches every second; events older than `keep` are pruned hourly.
    pub fn start(meta: Metadata, keep: Duration) -> Audit {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<AuditRow>(BUFFER);
        let dropped = Arc::new(AtomicU64::new(0));
        let lost = dropped.clone();
        let closing = Arc::new(tokio::sync::Notify::new());
        let close = closing.clone();
        let writer = tokio::spawn(async move {
            let mut batch = Vec::new();
            let mut pruned_ms = 0;
            let mut closed = false;
            loop {
                if !closed {
                    tokio::select! {
                        n = rx.recv_many(&mut batch, 1_000) => if n == 0 { break },
                        () = close.notified() => closed = true,
                    }
                }
                if closed {
                    // Closing: what is queued is written, then the writer ends.
                    while let Ok(row) = rx.try_recv() {
                        batch.push(row);
                    }
                }
                if !batch.is_empty() {
                    if let Err(e) = meta.append_audit(&batch).await {
                        tracing::warn!(error = %e, events = batch.len(), "audit log not written (the events were logged)");
                    }
                    batch.clear();
                }
                let n = lost.swap(0, Ordering::Relaxed);
                if n > 0 {
                    tracing::warn!(events = n, "audit events beyond the buffer were logged but not stored");
                }
                if closed {
                    break;
                }
                let now = crate::tokens::now_ms();
                if now - pruned_ms > 3_600_000 {
                    pruned_ms = now;
                    if let Err(e) = meta.prune_audit(now - keep.as_millis() as i64).await {
                        tracing::warn!(error = %e, "audit log pruning");
                    }
                }
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    () = close.notified() => closed = true,
                }
            }
        });
        Audit { tx, dropped, closing, writer: std::sync::Mutex::new(Some(writer)) }
    }

    /// Write what is queued and stop the writer (before the metadata store closes).
    pub async fn close(&self) {
        let writer = self.writer.lock().unwrap().take();
        if let Some(writer) = writer {
            self.closing.notify_one();
            let _ = tokio::time::timeout(Duration::from_secs(5), writer).await;
        }
    }

    /// Record an event; `source` defaults to the current request's.
    pub fn record(&self, action: &'static str, actor: Option<&str>, source: Option<&str>, target: Option<String>, detail: Option<String>) {
        let source = source.map(str::to_owned).or_else(|| SOURCE.try_with(|s| s.clone()).ok()).filter(|s| !s.is_empty());
        let actor = actor.map(printable);
        tracing::info!(
            target: "berth::audit",
            action,
            actor = actor.as_deref().unwrap_or("-"),
            source = source.as_deref().unwrap_or("-"),
            target = target.as_deref().unwrap_or("-"),
            detail = detail.as_deref().unwrap_or(""),
            "audit"
        );
        let row = AuditRow { ms: crate::tokens::now_ms(), action: action.to_owned(), actor, source, target, detail };
        if self.tx.try_send(row).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// A name as a failed login sent it: at most 64 printable characters.
fn printable(s: &str) -> String {
    s.chars().filter(|c| !c.is_control()).take(64).collect()
}
