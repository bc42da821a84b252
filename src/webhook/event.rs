//! What a webhook says: `{"id","event","createdAt","node","room",...}`.

use std::path::PathBuf;
use std::time::Duration;

use serde_json::{Value, json};

use crate::sfu::api::TrackInfo;

#[derive(Debug, Clone)]
pub enum Event {
    RoomStarted {
        room: String,
    },
    RoomFinished {
        room: String,
    },
    ParticipantJoined {
        room: String,
        user: String,
    },
    ParticipantLeft {
        room: String,
        user: String,
    },
    TrackPublished {
        room: String,
        track: TrackInfo,
    },
    TrackUnpublished {
        room: String,
        track: TrackInfo,
    },
    RecordingStarted {
        room: String,
        user: String,
        track_id: String,
        path: PathBuf,
    },
    RecordingFinished {
        room: String,
        user: String,
        track_id: String,
        /// The file written; `None` if it failed (then `error` says why).
        path: Option<PathBuf>,
        /// Every file the track went into (its own, and its participant's WebM).
        files: Vec<PathBuf>,
        duration: Duration,
        bytes: u64,
        frames: u64,
        dropped_packets: u64,
        error: Option<String>,
    },
}

impl Event {
    pub fn name(&self) -> &'static str {
        match self {
            Event::RoomStarted { .. } => "room_started",
            Event::RoomFinished { .. } => "room_finished",
            Event::ParticipantJoined { .. } => "participant_joined",
            Event::ParticipantLeft { .. } => "participant_left",
            Event::TrackPublished { .. } => "track_published",
            Event::TrackUnpublished { .. } => "track_unpublished",
            Event::RecordingStarted { .. } => "recording_started",
            Event::RecordingFinished { .. } => "recording_finished",
        }
    }

    /// The request body: a fresh event id and the time, then what the event is about.
    pub fn to_json(&self, node_id: &str) -> Vec<u8> {
        let created = crate::unix_ms();

        let mut body = json!({
            "id": format!("{:016x}", crate::random_u64()),
            "event": self.name(),
            "createdAt": created,
            "node": node_id,
        });
        let fields = match self {
            Event::RoomStarted { room } | Event::RoomFinished { room } => json!({"room": room}),
            Event::ParticipantJoined { room, user } | Event::ParticipantLeft { room, user } => {
                json!({"room": room, "userId": user})
            }
            Event::TrackPublished { room, track } | Event::TrackUnpublished { room, track } => {
                json!({"room": room, "userId": track.user_id, "track": track})
            }
            Event::RecordingStarted {
                room,
                user,
                track_id,
                path,
            } => json!({
                "room": room, "userId": user,
                "recording": {"trackId": track_id, "path": path},
            }),
            Event::RecordingFinished {
                room,
                user,
                track_id,
                path,
                files,
                duration,
                bytes,
                frames,
                dropped_packets,
                error,
            } => json!({
                "room": room, "userId": user,
                "recording": {
                    "trackId": track_id, "path": path, "files": files,
                    "durationMs": duration.as_millis() as u64,
                    "bytes": bytes, "frames": frames, "droppedPackets": dropped_packets,
                    "error": error,
                },
            }),
        };
        if let (Value::Object(body), Value::Object(fields)) = (&mut body, fields) {
            body.extend(fields);
        }
        serde_json::to_vec(&body).unwrap_or_default()
    }
}
