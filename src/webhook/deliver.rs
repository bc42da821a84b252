//! One URL's delivery task: its events in order, each retried with backoff until delivered or
//! out of attempts.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use super::WebhookStats;

/// The header carrying `sha256=<hex HMAC-SHA256 of the body under webhook.secret>`.
pub const SIGNATURE_HEADER: &str = "x-switchboard-signature";
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const MAX_BACKOFF: Duration = Duration::from_secs(30);

pub struct Target {
    pub url: reqwest::Url,
    pub client: reqwest::Client,
    pub secret: String,
    pub attempts: u32,
    pub stats: Arc<WebhookStats>,
    pub events: mpsc::Receiver<Bytes>,
}

pub async fn run(mut target: Target) {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, target.secret.as_bytes());
    while let Some(body) = target.events.recv().await {
        let signature = format!("sha256={}", hex(ring::hmac::sign(&key, &body).as_ref()));
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=target.attempts {
            let sent = target
                .client
                .post(target.url.clone())
                .header(reqwest::header::CONTENT_TYPE, "application/json")
                .header(SIGNATURE_HEADER, &signature)
                .body(body.clone())
                .send()
                .await;
            let error = match sent {
                Ok(r) if r.status().is_success() => {
                    target.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    break;
                }
                Ok(r) => format!("HTTP {}", r.status()),
                Err(e) => e.to_string(),
            };
            if attempt == target.attempts {
                target.stats.failed.fetch_add(1, Ordering::Relaxed);
                warn!(url = %target.url, attempts = attempt, "webhook given up: {error}");
                break;
            }
            target.stats.retried.fetch_add(1, Ordering::Relaxed);
            debug!(url = %target.url, attempt, "webhook failed, retrying in {backoff:?}: {error}");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
