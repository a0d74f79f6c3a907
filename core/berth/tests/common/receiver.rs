//! A webhook receiver on a loopback port, as a user would run one: it checks
//! each delivery's HMAC-SHA256 signature, records the CloudEvent, and answers
//! 204 — or 503 while told to fail, to exercise retries.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use hmac::{Hmac, KeyInit, Mac};
use serde_json::Value;
use sha2::Sha256;
use warp::Filter;

/// One POST the receiver answered 2xx.
#[derive(Clone, Debug)]
pub struct Delivery {
    pub id: String,
    /// `manifest.pushed` … (the CloudEvent type without `io.berth.`).
    pub kind: String,
    pub data: Value,
    pub signature_ok: bool,
}

pub struct Receiver {
    pub url: String,
    /// Hosts the plugin instance must be granted (`127.0.0.1`).
    pub host: String,
    acked: Arc<Mutex<Vec<Delivery>>>,
    refused: Arc<AtomicU32>,
    fail_next: Arc<AtomicU32>,
    down: Arc<AtomicBool>,
}

impl Receiver {
    /// Listen on a free loopback port (on a thread of its own, so it outlives
    /// any one runtime); `secret` is the key signatures are checked with.
    pub fn start(secret: &str) -> Receiver {
        let acked = Arc::new(Mutex::new(Vec::new()));
        let (refused, fail_next, down) = (Arc::new(AtomicU32::new(0)), Arc::new(AtomicU32::new(0)), Arc::new(AtomicBool::new(false)));
        let (a, r, f, d, key) = (acked.clone(), refused.clone(), fail_next.clone(), down.clone(), secret.as_bytes().to_vec());
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async move {
                let route = warp::post().and(warp::header::optional::<String>("x-berth-signature")).and(warp::body::bytes()).map(
                    move |sig: Option<String>, body: bytes::Bytes| {
                        let failing =
                            d.load(Ordering::SeqCst) || f.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok();
                        if failing {
                            r.fetch_add(1, Ordering::SeqCst);
                            return warp::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        let mut mac = Hmac::<Sha256>::new_from_slice(&key).unwrap();
                        mac.update(&body);
                        let expected = format!("sha256={}", hex::encode(mac.finalize().into_bytes()));
                        let ev: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                        a.lock().unwrap().push(Delivery {
                            id: ev["id"].as_str().unwrap_or_default().to_owned(),
                            kind: ev["type"].as_str().unwrap_or_default().trim_start_matches("io.berth.").to_owned(),
                            data: ev["data"].clone(),
                            signature_ok: sig.as_deref() == Some(expected.as_str()),
                        });
                        warp::http::StatusCode::NO_CONTENT
                    },
                );
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                tx.send(listener.local_addr().unwrap()).unwrap();
                warp::serve(route).incoming(listener).run().await;
            });
        });
        let addr = rx.recv().unwrap();
        Receiver { url: format!("http://{addr}/hook"), host: "127.0.0.1".into(), acked, refused, fail_next, down }
    }

    /// What it acknowledged so far.
    pub fn acked(&self) -> Vec<Delivery> {
        self.acked.lock().unwrap().clone()
    }

    /// Deliveries it answered 503.
    pub fn refused(&self) -> u32 {
        self.refused.load(Ordering::SeqCst)
    }

    /// Answer the next `n` deliveries 503.
    pub fn fail_next(&self, n: u32) {
        self.fail_next.store(n, Ordering::SeqCst);
    }

    /// Answer every delivery 503 (`true`) or resume.
    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }
}
