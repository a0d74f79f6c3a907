//! What each kind of metadata transaction a push makes costs in CPU, on the
//! real store (no HTTP, no blob bytes): a pin, a blob link into a new
//! repository (its first link), the same link again (repository and link
//! exist: no reference counts move), and a ping (the SDK's round trip alone).
//! 350 of each per round (a round of the benchmark's 50 concurrent 5-layer
//! pushes pins 350 blobs and manifests, and makes 300 links and 50 manifest
//! commits), 50 at a time, on two worker threads like the server on this
//! project's 2-core machines.
//!
//! ```text
//! cargo run --release -p berth-metadata --example txcost -- surrealkv:///tmp/txcost   # or mem://, ws://…
//! ```
//!
//! See docs/PERFORMANCE.md ("What a push costs in metadata").

use std::future::Future;
use std::sync::Arc;
use std::time::Instant;

use berth_metadata::{Guard, LinkRow, Metadata, MetadataConfig};
use berth_oci::{Digest, RepoName};

const PER_ROUND: usize = 350;
const AT_ONCE: usize = 50;

/// CPU seconds this process has used (user and system).
fn cpu_secs() -> f64 {
    // SAFETY: getrusage only writes the struct it is handed.
    let u = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(u.ru_utime) + secs(u.ru_stime)
}

fn digest(round: usize, i: usize) -> Digest {
    format!("sha256:{round:032x}{i:032x}").parse().expect("a valid digest")
}

fn repo(round: usize, i: usize) -> RepoName {
    format!("txcost{round}/r{i}").parse().expect("a valid name")
}

/// Run `op(0..PER_ROUND)`, `AT_ONCE` at a time; print CPU and wall time per call.
async fn measure<F, Fut>(name: &str, op: F)
where
    F: Fn(usize) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (cpu0, t0) = (cpu_secs(), Instant::now());
    let slots = Arc::new(tokio::sync::Semaphore::new(AT_ONCE));
    let mut running = tokio::task::JoinSet::new();
    for i in 0..PER_ROUND {
        let slot = slots.clone().acquire_owned().await.expect("never closed");
        let call = op(i);
        running.spawn(async move {
            call.await;
            drop(slot);
        });
    }
    while let Some(done) = running.join_next().await {
        done.expect("a call panicked");
    }
    let per = |s: f64| s / PER_ROUND as f64 * 1e6;
    println!("{name:>14}: {:6.0} µs CPU, {:6.0} µs wall per call", per(cpu_secs() - cpu0), per(t0.elapsed().as_secs_f64()));
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let url = std::env::args().nth(1).expect("usage: txcost URL (surrealkv:///dir, mem://, ws://host:port)");
    let config: MetadataConfig = serde_json::from_value(serde_json::json!({ "url": url })).expect("a config");
    // `Metadata` is a handle: clones share one store.
    let md = Metadata::connect(&config).await.expect("the store opens");
    for round in 0..3 {
        let link = |pinned: bool| {
            let md = md.clone();
            move |i| {
                let (md, row) = (md.clone(), LinkRow { repo: repo(round, i), digest: digest(round, i), size: 1 << 20 });
                async move {
                    md.link_blob(&Guard::any(), &row, None, pinned, &[]).await.expect("linked");
                }
            }
        };
        measure("pin", |i| {
            let (md, d) = (md.clone(), digest(round, i));
            async move { assert!(md.pin_blob(&d).await.expect("pinned")) }
        })
        .await;
        measure("link, new repo", link(true)).await;
        measure("link again", link(false)).await;
        measure("ping", |_| {
            let md = md.clone();
            async move { md.ping().await.expect("answered") }
        })
        .await;
    }
}
