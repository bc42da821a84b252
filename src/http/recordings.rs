//! `/api/recordings`: start and stop recording a room or one participant; `/api/egress`: send
//! its tracks as plain RTP to an address, with the SDP to receive them. Behind the API key, or
//! an access token: `admin` may do all of it, `record` start and stop its own room's recording.

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::Http;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Selection {
    room_id: String,
    #[serde(default)]
    user_id: Option<String>,
}

pub async fn start(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Result<Json<Selection>, JsonRejection>,
) -> Response {
    select(http, headers, body, true).await
}

pub async fn stop(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Result<Json<Selection>, JsonRejection>,
) -> Response {
    select(http, headers, body, false).await
}

async fn select(
    http: Http,
    headers: HeaderMap,
    body: Result<Json<Selection>, JsonRejection>,
    start: bool,
) -> Response {
    let selection = match admitted(&http, &headers, body, |s: &Selection| {
        Need::Recording(s.room_id.clone())
    }) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    if selection.room_id.is_empty() {
        return error(StatusCode::BAD_REQUEST, "roomId must not be empty");
    }
    let user = selection.user_id.as_deref().filter(|u| !u.is_empty());
    let recorded = http
        .signal
        .sfu
        .record(&selection.room_id, user, start)
        .await;
    Json(json!({
        "roomId": selection.room_id,
        "userId": user,
        "recording": start,
        "recordedTracks": recorded,
    }))
    .into_response()
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Egress {
    room_id: String,
    #[serde(default)]
    user_id: Option<String>,
    /// Where to send (an IP address) and the first port (each track gets its own, two apart).
    host: Option<std::net::IpAddr>,
    port: Option<u16>,
}

pub async fn egress_start(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Result<Json<Egress>, JsonRejection>,
) -> Response {
    let egress = match admitted(&http, &headers, body, |_: &Egress| Need::Admin) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    let (Some(host), Some(port)) = (egress.host, egress.port.filter(|p| *p > 0)) else {
        return error(
            StatusCode::BAD_REQUEST,
            "host (an IP address) and port are required",
        );
    };
    let user = egress.user_id.as_deref().filter(|u| !u.is_empty());
    let tracks = http
        .signal
        .sfu
        .rtp_out(&egress.room_id, user, Some((host, port)))
        .await;
    if tracks.is_empty() {
        return error(
            StatusCode::NOT_FOUND,
            "no track published there on this node",
        );
    }
    let name = format!(
        "switchboard {}{}",
        egress.room_id,
        user.map(|u| format!(" {u}")).unwrap_or_default()
    );
    let sdp = crate::record::rtp_out::sdp(host, &name, &tracks);
    Json(json!({"roomId": egress.room_id, "userId": user, "tracks": tracks, "sdp": sdp}))
        .into_response()
}

pub async fn egress_stop(
    State(http): State<Http>,
    headers: HeaderMap,
    body: Result<Json<Egress>, JsonRejection>,
) -> Response {
    let egress = match admitted(&http, &headers, body, |_: &Egress| Need::Admin) {
        Ok(body) => body,
        Err(refused) => return *refused,
    };
    let user = egress.user_id.as_deref().filter(|u| !u.is_empty());
    http.signal.sfu.rtp_out(&egress.room_id, user, None).await;
    Json(json!({"roomId": egress.room_id, "userId": user, "tracks": []})).into_response()
}

/// What a request needs of its caller's token (the API key allows everything).
enum Need {
    Admin,
    /// The `record` grant for this room (or `admin`).
    Recording(String),
}

/// The request's body, if its caller may make it and it parses; else the answer refusing it.
fn admitted<T>(
    http: &Http,
    headers: &HeaderMap,
    body: Result<Json<T>, JsonRejection>,
    need: impl FnOnce(&T) -> Need,
) -> Result<T, Box<Response>> {
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or_default();
    let auth = http.signal.auth.as_deref();
    if http.api_key.is_none() && auth.is_none() {
        return Err(Box::new(error(
            StatusCode::FORBIDDEN,
            "the API is off: set api.key (--api-key, SWITCHBOARD_API__KEY)",
        )));
    }
    // Digests compared, not the keys: how long a comparison takes says nothing about the key.
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    let operator = http
        .api_key
        .as_deref()
        .is_some_and(|key| digest(given).as_ref() == digest(key).as_ref());
    let claims = match (operator, auth) {
        (true, _) => None,
        (false, Some(auth)) => Some(auth.claims(given).map_err(|_| unauthorized())?),
        (false, None) => return Err(unauthorized()),
    };
    let body = body
        .map(|Json(body)| body)
        .map_err(|e| Box::new(error(StatusCode::BAD_REQUEST, &e.body_text())))?;
    if let Some(claims) = claims {
        let grants = claims.grants();
        let allowed = grants.admin
            || match need(&body) {
                Need::Admin => false,
                Need::Recording(room) => grants.record && claims.room == Some(room),
            };
        if !allowed {
            return Err(Box::new(error(
                StatusCode::FORBIDDEN,
                "the token does not grant this (admin, or record for its own room)",
            )));
        }
    }
    Ok(body)
}

fn unauthorized() -> Box<Response> {
    let mut refused = error(
        StatusCode::UNAUTHORIZED,
        "a valid API key or access token is required",
    );
    refused
        .headers_mut()
        .insert(header::WWW_AUTHENTICATE, "Bearer".parse().unwrap());
    Box::new(refused)
}

fn error(status: StatusCode, message: &str) -> Response {
    (status, Json(json!({"error": message}))).into_response()
}
