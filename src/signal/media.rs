//! PROTOCOL.md Part 2 at the edge: signaling with the reserved member `sfu`, the track events,
//! and the SFU's notices turned into `msg` envelopes.

use serde_json::{Value, json};
use socketioxide::extract::{AckSender, Event, Extension, SocketRef, State};
use tracing::debug;

use super::protocol::{Directed, Envelope, Refusal};
use super::requests::{self, MediaRequest};
use super::{App, Conn, accept, refuse};
use crate::sfu::api::{SfuError, SfuEvent};

fn refusal(e: SfuError) -> Refusal {
    let status = match e {
        SfuError::BadSdp(_) | SfuError::BadCandidate(_) => 400,
        SfuError::NotYourTrack(_) | SfuError::NotGranted(_) => 403,
        SfuError::UnknownTrack(_) => 404,
        SfuError::NoConnection(_)
        | SfuError::TrackIdInUse(_)
        | SfuError::TooManyTracks(_)
        | SfuError::TooManyChannels(_) => 409,
        SfuError::TooManyStarts(_) => 429,
        SfuError::Internal(_) => 500,
    };
    Refusal::Media {
        status,
        reason: e.to_string(),
    }
}

fn room_of(conn: &Conn) -> Result<&str, Refusal> {
    conn.room_id.as_deref().ok_or(Refusal::NoRoom)
}

/// `call` / `offer` / `answer` / `candidate` with `targetUid: "sfu"`.
pub async fn to_sfu(
    kind: Directed,
    app: &super::Signal,
    conn: &Conn,
    payload: rmpv::Value,
) -> Result<(), Refusal> {
    let room = room_of(conn)?;
    let (sfu, user, session) = (&app.sfu, conn.user_id.as_str(), conn.token.as_str());
    let grants = conn.grants;
    if !is_current(app, conn) {
        return Ok(()); // the connection is closing: start nothing
    }
    let result = match requests::parse(kind.event(), payload, app.max_sdp_bytes)? {
        MediaRequest::Call => sfu.join(user, room, session, grants).await.map(drop),
        MediaRequest::Offer { sdp } => sfu.offer(user, room, session, grants, sdp).await,
        MediaRequest::Answer { sdp } => sfu.answer(user, session, sdp).await,
        MediaRequest::Candidate { pc, candidate } => {
            sfu.candidate(user, room, session, grants, pc, candidate)
                .await
        }
        _ => return Err(Refusal::UnknownEvent),
    };
    // Handlers run concurrently: if the connection closed meanwhile, undo what this started.
    if !is_current(app, conn) {
        sfu.leave(user, session).await;
    }
    result.map_err(refusal)
}

/// Whether this connection is still the user's current one on this node.
fn is_current(app: &super::Signal, conn: &Conn) -> bool {
    app.outbox.rooms.is_current(&conn.user_id, &conn.token)
}

/// `tracks`, `subscribe`, `setQuality`, `mute` and `leave`.
pub async fn on_media_event(
    s: SocketRef,
    Event(event): Event,
    State(app): State<App>,
    Extension(conn): Extension<std::sync::Arc<Conn>>,
    ack: AckSender,
    incoming: super::incoming::Incoming,
) {
    if !conn.ready().await {
        return;
    }
    let result = match accept(&app, &conn, incoming) {
        Ok(payload) => media_event(&event, &s, &app, &conn, payload).await,
        Err(r) => Err(r),
    };
    match result {
        Ok(reply) => {
            let _ = ack.send(&reply);
        }
        Err(refusal) => {
            refuse(&app, &s, &event, &refusal);
            let _ = ack.send(&refusal.envelope(&event));
        }
    }
}

async fn media_event(
    event: &str,
    s: &SocketRef,
    app: &App,
    conn: &Conn,
    payload: rmpv::Value,
) -> Result<Value, Refusal> {
    let room = room_of(conn)?;
    let (sfu, user, session) = (&app.sfu, conn.user_id.as_str(), conn.token.as_str());
    match requests::parse(event, payload, app.max_sdp_bytes)? {
        MediaRequest::Tracks => {
            let tracks = json!(sfu.tracks(room).await);
            let _ = s.emit("tracks", &tracks);
            Ok(tracks)
        }
        MediaRequest::Subscribe {
            track_ids,
            subscribe,
        } => {
            sfu.subscribe(user, session, &track_ids, subscribe)
                .await
                .map_err(refusal)?;
            Ok(json!({"ok": true}))
        }
        MediaRequest::SetQuality { track_id, quality } => {
            sfu.set_quality(user, session, &track_id, quality)
                .await
                .map_err(refusal)?;
            Ok(json!({"ok": true}))
        }
        MediaRequest::Mute { track_id, muted } => {
            sfu.mute(user, room, &track_id, muted)
                .await
                .map_err(refusal)?;
            Ok(json!({"ok": true}))
        }
        MediaRequest::Leave => {
            sfu.leave(user, session).await;
            Ok(json!({"ok": true}))
        }
        _ => Err(Refusal::UnknownEvent),
    }
}

/// Events the edge handles for the SFU, besides the directed four.
pub const MEDIA_EVENTS: [&str; 5] = ["tracks", "subscribe", "setQuality", "mute", "leave"];

/// An SFU notice as the envelope (and audience) the protocol gives it.
pub enum Delivery {
    /// To one connection: (userId, connection token).
    Session(String, String, Envelope<Value>),
    Room(String, Envelope<Value>),
    /// To the room's members on this node only.
    LocalRoom(String, Envelope<Value>),
}

pub fn delivery(event: SfuEvent) -> Delivery {
    match event {
        SfuEvent::Sdp {
            user_id,
            session,
            pc,
            sdp_type,
            sdp,
        } => {
            let (kind, text) = if sdp_type == "offer" {
                ("offer", Directed::Offer.text())
            } else {
                ("answer", Directed::Answer.text())
            };
            let data = json!({"fromUid": "sfu", "pc": pc, "sdp": {"type": sdp_type, "sdp": sdp}});
            Delivery::Session(user_id, session, Envelope::ok(kind, text, data))
        }
        SfuEvent::Candidate {
            user_id,
            session,
            pc,
            candidate,
        } => {
            let data = json!({"fromUid": "sfu", "pc": pc, "candidate": candidate});
            Delivery::Session(
                user_id,
                session,
                Envelope::ok("candidate", Directed::Candidate.text(), data),
            )
        }
        SfuEvent::TrackPublished { room_id, track } => {
            debug!(room = %room_id, track = %track.track_id, "trackPublished");
            Delivery::Room(
                room_id,
                Envelope::ok("trackPublished", "track published", json!(track)),
            )
        }
        SfuEvent::MediaEnded {
            user_id,
            session,
            reason,
        } => Delivery::Session(
            user_id,
            session,
            Envelope::ok(
                "mediaEnded",
                "media session ended",
                json!({"fromUid": "sfu", "reason": reason}),
            ),
        ),
        SfuEvent::TrackRefused {
            user_id,
            session,
            error,
        } => Delivery::Session(user_id, session, refusal(error).envelope("offer")),
        SfuEvent::TrackUnpublished { room_id, track } => Delivery::Room(
            room_id,
            Envelope::ok("trackUnpublished", "track unpublished", json!(track)),
        ),
        SfuEvent::RemoteTrackGone { room_id, track } => Delivery::LocalRoom(
            room_id,
            Envelope::ok("trackUnpublished", "track unpublished", json!(track)),
        ),
        SfuEvent::TrackMuted { room_id, track } => Delivery::Room(
            room_id,
            Envelope::ok("trackMuted", "track muted", json!(track)),
        ),
        SfuEvent::Recording {
            room_id,
            user_id,
            started,
        } => {
            let envelope = recording_envelope(&room_id, user_id.as_deref(), started);
            Delivery::Room(room_id, envelope)
        }
        SfuEvent::RecordingOngoing {
            user_id,
            session,
            room_id,
            recorded_user,
        } => {
            let envelope = recording_envelope(&room_id, recorded_user.as_deref(), true);
            Delivery::Session(user_id, session, envelope)
        }
    }
}

/// PROTOCOL.md Part 3: `recordingStarted` / `recordingStopped` for a room's members.
fn recording_envelope(room_id: &str, user_id: Option<&str>, started: bool) -> Envelope<Value> {
    let (kind, text) = if started {
        ("recordingStarted", "recording started")
    } else {
        ("recordingStopped", "recording stopped")
    };
    let mut data = json!({"roomId": room_id, "fromUid": "sfu"});
    if let Some(user) = user_id {
        data["userId"] = json!(user); // one participant is recorded, not the room
    }
    Envelope::ok(kind, text, data)
}
