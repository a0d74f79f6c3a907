//! One call into a plugin, sandboxed: a fresh store and instance per call (no
//! state survives between calls, so one tenant's data never reaches another's
//! call), WASI preview 2 with nothing granted (no files, no environment, no
//! sockets; stdout and stderr discarded), the `berth:plugin/host` imports
//! checked against the module's grants, linear memory capped, fuel when the
//! module sets it, and a wall clock: the epoch ticks every 10 ms and each tick
//! yields to tokio, whose timeout then drops the call wherever it is (in wasm,
//! or waiting in a host call such as HTTP or a WASI sleep).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use wasmtime::component::{HasSelf, Linker, ResourceTable};
use wasmtime::{Engine, Store, StoreLimits, StoreLimitsBuilder, UpdateDeadline};
use wasmtime_wasi::{WasiCtx, WasiCtxBuilder, WasiCtxView, WasiView};

use crate::manifest::{host_allowed, Capabilities};
use crate::{BlobReader, CallError, KvStore};

wasmtime::component::bindgen!({
    path: "../../sdk/wit",
    world: "plugin",
    imports: { default: async },
    exports: { default: async },
});

pub(crate) use berth::plugin::host::{HostError, HttpRequest, HttpResponse, Level};
pub(crate) use berth::plugin::types as wit;

/// The epoch's tick.
pub(crate) const TICK: Duration = Duration::from_millis(10);
/// Bytes a single HTTP body (either way), a log line, or a blob read may carry.
const MAX_HTTP_BODY: usize = 1 << 20;
const MAX_LOG_LINE: usize = 4096;
const MAX_READ: u64 = 1 << 20;
const MAX_KV_KEY: usize = 256;
const MAX_KV_VALUE: usize = 64 * 1024;

/// What one call may see and use.
pub(crate) struct CallCtx {
    /// `instance-id (module)`, for the log.
    pub label: String,
    pub caps: Capabilities,
    /// The instance's own hosts (within the module's grant).
    pub allow_hosts: Vec<String>,
    pub config: BTreeMap<String, String>,
    pub image: Option<ImageAccess>,
    pub kv: Option<(Arc<dyn KvStore>, String)>,
    pub http: reqwest::Client,
    pub log_lines_left: u32,
    pub logs_dropped: u64,
}

/// The gated image: its manifest, the digests it references (the only blobs a
/// plugin may read), and what is left of the call's byte budget.
pub(crate) struct ImageAccess {
    pub manifest: Vec<u8>,
    pub refs: BTreeSet<String>,
    pub reader: Arc<dyn BlobReader>,
    pub budget_left: u64,
}

pub(crate) struct State {
    wasi: WasiCtx,
    table: ResourceTable,
    limits: StoreLimits,
    pub call: CallCtx,
}

impl WasiView for State {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView { ctx: &mut self.wasi, table: &mut self.table }
    }
}

impl berth::plugin::types::Host for State {}

fn denied(what: &str) -> HostError {
    HostError::Denied(format!("{what} is not granted to this plugin"))
}

impl berth::plugin::host::Host for State {
    async fn log(&mut self, level: Level, message: String) {
        let c = &mut self.call;
        if !c.caps.log {
            return;
        }
        if c.log_lines_left == 0 {
            c.logs_dropped += 1;
            return;
        }
        c.log_lines_left -= 1;
        let mut message = message;
        if message.len() > MAX_LOG_LINE {
            let mut cut = MAX_LOG_LINE;
            while !message.is_char_boundary(cut) {
                cut -= 1;
            }
            message.truncate(cut);
            message.push('…');
        }
        let plugin = c.label.as_str();
        match level {
            Level::Trace => tracing::trace!(plugin, "{message}"),
            Level::Debug => tracing::debug!(plugin, "{message}"),
            Level::Info => tracing::info!(plugin, "{message}"),
            Level::Warn => tracing::warn!(plugin, "{message}"),
            Level::Error => tracing::error!(plugin, "{message}"),
        }
    }

    async fn config(&mut self, key: String) -> Option<String> {
        self.call.config.get(&key).cloned()
    }

    async fn now_ms(&mut self) -> i64 {
        crate::now_ms()
    }

    async fn http(&mut self, request: HttpRequest) -> Result<HttpResponse, HostError> {
        let c = &self.call;
        if c.caps.http.is_empty() {
            return Err(denied("outbound HTTP"));
        }
        let url = reqwest::Url::parse(&request.url).map_err(|e| HostError::Failed(format!("url {:?}: {e}", request.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(HostError::Denied(format!("scheme {}: http or https only", url.scheme())));
        }
        let host = url.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        let port = url.port_or_known_default().unwrap_or(0);
        let module_grant = host_allowed(&c.caps.http, &host, port);
        let instance_grant =
            if c.allow_hosts.is_empty() { !c.caps.http.iter().any(|p| p == "*") } else { host_allowed(&c.allow_hosts, &host, port) };
        if !(module_grant && instance_grant) {
            return Err(HostError::Denied(format!("HTTP to {host}:{port} is not granted to this plugin")));
        }
        if request.body.len() > MAX_HTTP_BODY {
            return Err(HostError::TooLarge(MAX_HTTP_BODY as u64));
        }
        let method = reqwest::Method::from_bytes(request.method.as_bytes())
            .map_err(|_| HostError::Failed(format!("method {:?}", request.method)))?;
        let mut req = c.http.request(method, url);
        for (k, v) in &request.headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let mut resp = req.body(request.body).send().await.map_err(|e| HostError::Failed(e.without_url().to_string()))?;
        let status = resp.status().as_u16();
        let headers = resp.headers().iter().filter_map(|(k, v)| Some((k.to_string(), v.to_str().ok()?.to_owned()))).collect();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| HostError::Failed(e.without_url().to_string()))? {
            if body.len() + chunk.len() > MAX_HTTP_BODY {
                return Err(HostError::TooLarge(MAX_HTTP_BODY as u64));
            }
            body.extend_from_slice(&chunk);
        }
        Ok(HttpResponse { status, headers, body })
    }

    async fn manifest(&mut self) -> Result<Vec<u8>, HostError> {
        if !self.call.caps.read_image {
            return Err(denied("reading the image"));
        }
        self.call.image.as_ref().map(|i| i.manifest.clone()).ok_or(HostError::NotFound)
    }

    async fn blob(&mut self, digest: String, offset: u64, max: u32) -> Result<Vec<u8>, HostError> {
        if !self.call.caps.read_image {
            return Err(denied("reading the image"));
        }
        let Some(image) = self.call.image.as_mut() else { return Err(HostError::NotFound) };
        if !image.refs.contains(&digest) {
            return Err(HostError::NotFound);
        }
        let want = u64::from(max).min(MAX_READ);
        if want > 0 && image.budget_left == 0 {
            return Err(HostError::TooLarge(self.call.caps.image_budget_bytes));
        }
        let bytes = image.reader.read(&digest, offset, want.min(image.budget_left)).await.map_err(HostError::Failed)?;
        image.budget_left = image.budget_left.saturating_sub(bytes.len() as u64);
        Ok(bytes)
    }

    async fn kv_get(&mut self, key: String) -> Result<Option<Vec<u8>>, HostError> {
        let Some((kv, scope)) = self.call.kv.as_ref().filter(|_| self.call.caps.kv) else { return Err(denied("the key-value store")) };
        if key.len() > MAX_KV_KEY {
            return Err(HostError::TooLarge(MAX_KV_KEY as u64));
        }
        kv.get(scope, &key).await.map_err(HostError::Failed)
    }

    async fn kv_set(&mut self, key: String, value: Vec<u8>) -> Result<(), HostError> {
        let Some((kv, scope)) = self.call.kv.as_ref().filter(|_| self.call.caps.kv) else { return Err(denied("the key-value store")) };
        if key.len() > MAX_KV_KEY {
            return Err(HostError::TooLarge(MAX_KV_KEY as u64));
        }
        if value.len() > MAX_KV_VALUE {
            return Err(HostError::TooLarge(MAX_KV_VALUE as u64));
        }
        kv.set(scope, &key, &value).await.map_err(HostError::Failed)
    }
}

/// The linker every module is instantiated with: WASI (nothing granted) and
/// Berth's host interface.
pub(crate) fn linker(engine: &Engine) -> wasmtime::Result<Linker<State>> {
    let mut linker = Linker::new(engine);
    wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
    Plugin::add_to_linker::<State, HasSelf<State>>(&mut linker, |s| s)?;
    Ok(linker)
}

/// A store for one call, with its limits.
pub(crate) fn store(
    engine: &Engine,
    call: CallCtx,
    memory_mib: u64,
    fuel: Option<u64>,
    timeout: Duration,
) -> wasmtime::Result<Store<State>> {
    // No environment, arguments, files, clocks beyond the ordinary, or sockets.
    let wasi = WasiCtxBuilder::new().allow_tcp(false).allow_udp(false).allow_ip_name_lookup(false).build();
    let limits = StoreLimitsBuilder::new()
        .memory_size(usize::try_from(memory_mib << 20).unwrap_or(usize::MAX))
        .instances(64)
        .tables(64)
        .memories(16)
        .trap_on_grow_failure(true)
        .build();
    let mut store = Store::new(engine, State { wasi, table: ResourceTable::new(), limits, call });
    store.limiter(|s| &mut s.limits);
    store.set_fuel(fuel.unwrap_or(u64::MAX))?;
    // Yield to tokio on every tick, so its timeout can end the call; and, as a
    // backstop should the call not be dropped, trap once well past the limit.
    let hard_stop = Instant::now() + timeout * 2 + Duration::from_millis(100);
    store.set_epoch_deadline(1);
    store.epoch_deadline_callback(move |_| {
        if Instant::now() > hard_stop {
            Err(wasmtime::Trap::Interrupt.into())
        } else {
            Ok(UpdateDeadline::Yield(1))
        }
    });
    Ok(store)
}

/// What a failed call amounted to.
pub(crate) fn classify(e: wasmtime::Error) -> CallError {
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        match trap {
            wasmtime::Trap::OutOfFuel => return CallError::OutOfFuel,
            wasmtime::Trap::Interrupt => return CallError::Timeout,
            _ => {}
        }
    }
    let text = format!("{e:#}");
    if text.contains("growing memory") || text.contains("memory minimum size") || text.contains("resource limit") {
        return CallError::OutOfMemory;
    }
    // The first line names the trap; the backtrace that follows is for the log.
    let first = text.lines().next().unwrap_or("trap").chars().take(500).collect::<String>();
    CallError::Trap(first)
}
