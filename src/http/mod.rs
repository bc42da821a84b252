//! HTTP routes beside socket.io: the demo page, the ICE servers for clients, and health.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Html;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::config::IceServer;
use crate::signal::Signal;

/// The demo page: a plain-JS socket.io client that publishes camera and microphone, shows every
/// other member, and chats over a data channel.
const DEMO_PAGE: &str = include_str!("demo.html");

mod recordings;

#[derive(Clone)]
struct Http {
    signal: Arc<Signal>,
    ice_servers: Arc<Vec<IceServer>>,
    /// `api.key`; `None` refuses every API request.
    api_key: Option<Arc<str>>,
}

pub fn router(signal: Arc<Signal>, ice_servers: Vec<IceServer>, api_key: &str) -> Router {
    Router::new()
        .route("/", get(demo))
        .route("/healthz", get(healthz))
        .route(
            "/favicon.ico",
            get(|| async { axum::http::StatusCode::NO_CONTENT }),
        )
        .route("/api/ice-servers", get(ice))
        .route("/api/recordings/start", post(recordings::start))
        .route("/api/recordings/stop", post(recordings::stop))
        .route("/api/egress/start", post(recordings::egress_start))
        .route("/api/egress/stop", post(recordings::egress_stop))
        .with_state(Http {
            signal,
            ice_servers: Arc::new(ice_servers),
            api_key: Some(api_key.trim())
                .filter(|k| !k.is_empty())
                .map(Arc::from),
        })
}

/// Webhook delivery counters (absent when none are configured).
fn webhook_stats(w: &crate::webhook::WebhookStats) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "queued": w.queued.load(Relaxed),
        "delivered": w.delivered.load(Relaxed),
        "retried": w.retried.load(Relaxed),
        "failed": w.failed.load(Relaxed),
        "dropped": w.dropped.load(Relaxed),
    })
}

/// The media plane's counters.
fn media_stats(sfu: &crate::sfu::Sfu) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    let s = sfu.stats();
    json!({
        "port": sfu.media_addr().port(),
        "datagramsIn": s.datagrams_in.load(Relaxed),
        "datagramsOut": s.datagrams_out.load(Relaxed),
        "sendCalls": s.send_calls.load(Relaxed),
        "gsoMessages": s.gso_messages.load(Relaxed),
        "sendFailures": s.send_failures.load(Relaxed),
        "unrouted": s.unrouted.load(Relaxed),
        "handedOver": s.handed_over.load(Relaxed),
        "handoverDropped": s.handover_dropped.load(Relaxed),
        "wakeups": s.wakeups.load(Relaxed),
        "mediaReceived": s.media_received.load(Relaxed),
                "mediaRejected": s.media_rejected.load(Relaxed),
        "tracksRefused": s.tracks_refused.load(Relaxed),
                "channelsRefused": s.channels_refused.load(Relaxed),
        "sessionStartsRefused": s.session_starts_refused.load(Relaxed),
                "dataMessagesTooLarge": s.data_messages_too_large.load(Relaxed),
        // Rooms across nodes: packets from and to other nodes' pipes.
        "relayedIn": s.relayed_in.load(Relaxed),
        "relayedOut": s.relayed_out.load(Relaxed),
    })
}

/// Refused events (by kind) and handshakes: every limit reached is counted.
fn refused(r: &crate::signal::limits::Refusals) -> Value {
    use std::sync::atomic::Ordering::Relaxed;
    json!({
        "malformed": r.malformed.load(Relaxed),
        "forbidden": r.forbidden.load(Relaxed),
        "notFound": r.not_found.load(Relaxed),
        "conflict": r.conflict.load(Relaxed),
        "tooLarge": r.too_large.load(Relaxed),
        "rateLimited": r.rate_limited.load(Relaxed),
        "handshakes": r.handshakes.load(Relaxed),
    })
}

/// The heap as the allocator sees it: bytes in use (what a leak grows) and bytes it keeps free
/// for reuse (why RSS stays near its peak after a burst).
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn memory() -> Value {
    // SAFETY: mallinfo2 only reads the allocator's counters (taking its own locks).
    let m = unsafe { libc::mallinfo2() };
    json!({"heapInUse": m.uordblks + m.hblkhd, "heapFree": m.fordblks})
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn memory() -> Value {
    Value::Null
}

async fn demo() -> Html<&'static str> {
    Html(DEMO_PAGE)
}

/// The STUN/TURN servers clients should use (`media.ice_servers`), in `RTCConfiguration` form.
async fn ice(State(http): State<Http>) -> Json<Value> {
    Json(json!({ "iceServers": *http.ice_servers }))
}

/// Liveness: the process serves HTTP. Also names the node and counts its connections.
async fn healthz(State(http): State<Http>) -> Json<Value> {
    let signal = &http.signal;
    Json(json!({
        "status": "ok",
        "node": signal.node_id,
        "connections": signal.outbox.rooms.local_count(),
        "mediaSessions": signal.sfu.member_count(),
        "dataMessagesDropped": signal.sfu.data_messages_dropped(),
        "media": media_stats(&signal.sfu),
                "webhooks": signal.webhooks.stats().map(webhook_stats),
        "bus": signal.outbox.bus.as_ref().map(|bus| json!({
            "queuedBytes": bus.queued_bytes(),
            "dropped": bus.dropped.load(std::sync::atomic::Ordering::Relaxed),
        })),
                        "refused": refused(&signal.refused),
        "memory": memory(),
        "pid": std::process::id(),
        "tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
    }))
}
