//! The webhook: every event it receives becomes a CloudEvents 1.0 JSON POST to
//! `url`, signed with HMAC-SHA256 over the body with `secret`:
//! `X-Berth-Signature: sha256=<hex>`. The event id is the CloudEvent's `id`, so a
//! receiver deduplicates redeliveries. A 2xx is delivered; a 5xx, 408, 429 or no
//! answer asks Berth to deliver it again later (with backoff); any other status
//! is a permanent failure, logged. Which events arrive is the instance's choice
//! of hooks; whose events arrive is its scope's (a tenant's webhook sees only
//! that tenant's).

use berth_plugin::{export, host, Event, EventKind, Plugin, PluginError};
use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

struct Webhook;

fn kind(e: &EventKind) -> (&'static str, String, Value) {
    match e {
        EventKind::ManifestPushed(p) => (
            "manifest.pushed",
            p.repository.clone(),
            json!({"tenant": p.tenant, "repository": p.repository, "tag": p.tag, "digest": p.digest,
                   "mediaType": p.media_type, "size": p.size, "contentSize": p.content_size,
                   "platforms": p.platforms.iter().map(|x| json!({"os": x.os, "architecture": x.architecture, "variant": x.variant})).collect::<Vec<_>>(),
                   "subject": p.subject, "artifactType": p.artifact_type, "pusher": p.pusher}),
        ),
        EventKind::ManifestPulled(p) => (
            "manifest.pulled",
            p.repository.clone(),
            json!({"tenant": p.tenant, "repository": p.repository, "reference": p.reference, "digest": p.digest, "puller": p.puller}),
        ),
        EventKind::ManifestDeleted(d) => (
            "manifest.deleted",
            d.repository.clone(),
            json!({"tenant": d.tenant, "repository": d.repository, "digest": d.digest, "tags": d.tags, "by": d.by}),
        ),
        EventKind::TagDeleted(d) => (
            "tag.deleted",
            d.repository.clone(),
            json!({"tenant": d.tenant, "repository": d.repository, "tag": d.tag, "digest": d.digest, "by": d.by}),
        ),
        EventKind::BlobUploaded(b) => (
            "blob.uploaded",
            b.repository.clone(),
            json!({"tenant": b.tenant, "repository": b.repository, "digest": b.digest, "size": b.size, "by": b.by}),
        ),
        EventKind::RepositoryCreated(r) => {
            ("repository.created", r.repository.clone(), json!({"tenant": r.tenant, "repository": r.repository, "by": r.by}))
        }
        EventKind::RepositoryDeleted(r) => {
            ("repository.deleted", r.repository.clone(), json!({"tenant": r.tenant, "repository": r.repository, "by": r.by}))
        }
    }
}

/// RFC 3339 (UTC, milliseconds) from milliseconds since the epoch.
fn rfc3339(ms: i64) -> String {
    let secs = ms.div_euclid(1000);
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil from days (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z", rem / 3600, rem % 3600 / 60, rem % 60, ms.rem_euclid(1000))
}

impl Plugin for Webhook {
    fn notify(event: Event) -> Result<(), PluginError> {
        let url = host::config("url").ok_or_else(|| PluginError::InvalidConfig("url is not set".into()))?;
        let (kind, subject, data) = kind(&event.kind);
        let body = serde_json::to_vec(&json!({
            "specversion": "1.0",
            "id": event.id,
            "source": host::config("source").unwrap_or_else(|| "berth".into()),
            "type": format!("io.berth.{kind}"),
            "subject": subject,
            "time": rfc3339(event.at_ms),
            "datacontenttype": "application/json",
            "data": data,
        }))
        .map_err(|e| PluginError::Failed(e.to_string()))?;
        let mut headers = vec![("content-type", "application/cloudevents+json".to_string())];
        if let Some(secret) = host::config("secret") {
            let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).map_err(|e| PluginError::Failed(e.to_string()))?;
            mac.update(&body);
            headers.push(("x-berth-signature", format!("sha256={}", hex::encode(mac.finalize().into_bytes()))));
        }
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        match host::post(&url, &headers, body) {
            Ok(r) if (200..300).contains(&r.status) => Ok(()),
            Ok(r) if r.status >= 500 || r.status == 408 || r.status == 429 => {
                Err(PluginError::Unavailable(format!("{url} answered {}", r.status)))
            }
            Ok(r) => Err(PluginError::Failed(format!("{url} answered {}", r.status))),
            Err(e) => Err(PluginError::Unavailable(format!("{url}: {e:?}"))),
        }
    }
}

export!(Webhook);

#[cfg(test)]
mod tests {
    #[test]
    fn times() {
        assert_eq!(super::rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(super::rfc3339(1_764_547_200_123), "2025-12-01T00:00:00.123Z");
        assert_eq!(super::rfc3339(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }
}
