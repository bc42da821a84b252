//! HTTP routes beside socket.io: health now; the REST API, metrics and the demo page later.

use std::sync::Arc;

use axum::extract::State;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{Value, json};

use crate::signal::Signal;

pub fn router(signal: Arc<Signal>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .with_state(signal)
}

/// Liveness: the process serves HTTP. Also names the node and counts its connections.
async fn healthz(State(signal): State<Arc<Signal>>) -> Json<Value> {
    Json(json!({
        "status": "ok",
        "node": signal.node_id,
        "connections": signal.outbox.rooms.local_count(),
        "mediaSessions": signal.sfu.member_count(),
        "tasks": tokio::runtime::Handle::current().metrics().num_alive_tasks(),
    }))
}
