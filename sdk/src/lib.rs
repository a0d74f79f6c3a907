//! Write a Berth plugin in plain Rust.
//!
//! A plugin implements [`Plugin`] (a gate judging pushes, a receiver of events,
//! or both) and names its type in [`export!`]; `cargo build --release --target
//! wasm32-wasip2` then produces the component Berth loads. The contract is the
//! WIT package `berth:plugin@0.1.0` in `sdk/wit/`; this crate is its Rust face:
//!
//! ```ignore
//! use berth_plugin::{export, Plugin, Push, Verdict, PluginError};
//!
//! struct NoLatest;
//!
//! impl Plugin for NoLatest {
//!     fn gate(push: Push) -> Result<Verdict, PluginError> {
//!         Ok(match push.tag.as_deref() {
//!             Some("latest") => Verdict::Deny("push a version, not latest".into()),
//!             _ => Verdict::Allow,
//!         })
//!     }
//! }
//!
//! export!(NoLatest);
//! ```
//!
//! Every function in [`host`] works only where the plugin's manifest grants it;
//! otherwise it returns [`HostError::Denied`].

#[doc(hidden)]
pub mod bindings {
    wit_bindgen::generate!({
        path: "wit",
        world: "plugin",
        pub_export_macro: true,
        export_macro_name: "__export_plugin_world",
        default_bindings_module: "berth_plugin::bindings",
    });
}

pub use bindings::berth::plugin::host::HostError;
pub use bindings::berth::plugin::types::{
    BlobUpload, Event, EventKind, Finding, ManifestDelete, ManifestPull, ManifestPush as Push, Platform, PluginError, RepositoryChange,
    Severity, TagDelete, Verdict,
};

/// The contract version this SDK speaks; Berth refuses a plugin built for another.
pub const CONTRACT: &str = "berth:plugin@0.1.0";

/// What a plugin does. Both methods have defaults, so a gate implements only
/// [`Plugin::gate`] and a notifier only [`Plugin::notify`]; Berth calls only the
/// hooks the plugin's manifest lists.
pub trait Plugin {
    /// Judge a manifest push before it is committed.
    fn gate(push: Push) -> Result<Verdict, PluginError> {
        let _ = push;
        Ok(Verdict::Allow)
    }

    /// Receive an event, at least once: deduplicate by [`Event::id`]. An
    /// `Err(PluginError::Unavailable(_))` asks Berth to deliver it again later.
    fn notify(event: Event) -> Result<(), PluginError> {
        let _ = event;
        Ok(())
    }
}

/// Export `T: Plugin` as the component's `plugin` world.
#[macro_export]
macro_rules! export {
    ($t:ty) => {
        const _: () = {
            struct BerthPluginExport;
            impl $crate::bindings::Guest for BerthPluginExport {
                fn gate(push: $crate::Push) -> ::core::result::Result<$crate::Verdict, $crate::PluginError> {
                    <$t as $crate::Plugin>::gate(push)
                }
                fn notify(event: $crate::Event) -> ::core::result::Result<(), $crate::PluginError> {
                    <$t as $crate::Plugin>::notify(event)
                }
            }
    $crate::bindings::__export_plugin_world!(BerthPluginExport with_types_in $crate::bindings);
        };
    };
}

/// The registry's services to a plugin, each available only where granted.
pub mod host {
    use crate::bindings::berth::plugin::host as raw;
    pub use raw::{HttpRequest, HttpResponse, Level};

    use crate::HostError;

    /// A line in the registry's log, attributed to this plugin instance.
    pub fn log(level: Level, message: &str) {
        raw::log(level, message)
    }

    pub fn info(message: &str) {
        raw::log(Level::Info, message)
    }

    pub fn warn(message: &str) {
        raw::log(Level::Warn, message)
    }

    /// A value of this instance's configuration.
    pub fn config(key: &str) -> Option<String> {
        raw::config(key)
    }

    /// Milliseconds since the Unix epoch.
    pub fn now_ms() -> i64 {
        raw::now_ms()
    }

    /// Send an HTTP request to a granted host.
    pub fn http(request: &HttpRequest) -> Result<HttpResponse, HostError> {
        raw::http(request)
    }

    /// POST `body` to `url` with these headers.
    pub fn post(url: &str, headers: &[(&str, &str)], body: Vec<u8>) -> Result<HttpResponse, HostError> {
        raw::http(&HttpRequest {
            method: "POST".into(),
            url: url.into(),
            headers: headers.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            body,
        })
    }

    /// The manifest being gated, as pushed.
    pub fn manifest() -> Result<Vec<u8>, HostError> {
        raw::manifest()
    }

    /// Up to `max` bytes of a blob the gated manifest references, from `offset`.
    pub fn blob(digest: &str, offset: u64, max: u32) -> Result<Vec<u8>, HostError> {
        raw::blob(digest, offset, max)
    }

    /// A whole blob the gated manifest references (within the call's byte budget).
    pub fn blob_all(digest: &str) -> Result<Vec<u8>, HostError> {
        let mut out = Vec::new();
        loop {
            let chunk = raw::blob(digest, out.len() as u64, 1 << 20)?;
            if chunk.is_empty() {
                return Ok(out);
            }
            out.extend_from_slice(&chunk);
        }
    }

    /// This instance's own key-value store.
    pub fn kv_get(key: &str) -> Result<Option<Vec<u8>>, HostError> {
        raw::kv_get(key)
    }

    pub fn kv_set(key: &str, value: &[u8]) -> Result<(), HostError> {
        raw::kv_set(key, value)
    }
}
