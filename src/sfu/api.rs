//! What the SFU takes from the edge and tells it back, in its own types (no socket.io, no webrtc).

use serde::{Deserialize, Serialize};

/// Which of a member's two peer connections a message is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PcKind {
    /// The client offers, the server answers: what the client sends.
    Publisher,
    /// The server offers, the client answers: what the client receives.
    Subscriber,
}

/// An ICE candidate in the browser's JSON form (`RTCIceCandidateInit`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct IceCandidate {
    pub candidate: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        rename = "sdpMLineIndex"
    )]
    pub sdp_mline_index: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MediaKind {
    Audio,
    Video,
}

/// A published track as the room sees it (`trackPublished`, `tracks`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct TrackInfo {
    pub user_id: String,
    pub track_id: String,
    pub kind: MediaKind,
    /// Simulcast rids, empty for a single stream.
    pub simulcast: Vec<String>,
    pub muted: bool,
}

/// What the SFU asks the edge to deliver.
#[derive(Debug, Clone, PartialEq)]
pub enum SfuEvent {
    /// An SDP for the member (`answer` on publisher, `offer` on subscriber).
    Sdp {
        user_id: String,
        /// The signaling connection the media session belongs to: only it may get this.
        session: String,
        pc: PcKind,
        sdp_type: &'static str,
        sdp: String,
    },
    /// A server candidate for the member; `None` ends the candidates.
    Candidate {
        user_id: String,
        session: String,
        pc: PcKind,
        candidate: Option<IceCandidate>,
    },
    TrackPublished {
        room_id: String,
        track: TrackInfo,
    },
    /// The server ended the member's media session by itself (its connection failed).
    MediaEnded {
        user_id: String,
        session: String,
        reason: &'static str,
    },
    /// A track or data channel the member sent that is not forwarded, and why (an error
    /// envelope for `offer`).
    TrackRefused {
        user_id: String,
        session: String,
        error: SfuError,
    },
    TrackUnpublished {
        room_id: String,
        track: TrackInfo,
    },
    /// A track of a node found dead: each node tells its own members (`trackUnpublished`).
    RemoteTrackGone {
        room_id: String,
        track: TrackInfo,
    },
    TrackMuted {
        room_id: String,
        track: TrackInfo,
    },
    /// A room's recording to files started (its first recorded track) or stopped (its last).
    Recording {
        room_id: String,
        user_id: Option<String>,
        started: bool,
    },
    /// A member joined a room that is being recorded.
    RecordingOngoing {
        user_id: String,
        session: String,
        room_id: String,
        recorded_user: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SfuError {
    #[error("bad session description: {0}")]
    BadSdp(String),
    #[error("bad ICE candidate: {0}")]
    BadCandidate(String),
    #[error("no {0:?} connection to apply this to")]
    NoConnection(PcKind),
    #[error("no track {0}")]
    UnknownTrack(String),
    #[error("track {0} is not yours")]
    NotYourTrack(String),
    #[error("track id {0} is already published by another member of the room; not forwarded")]
    TrackIdInUse(String),
    #[error("too many tracks: media.max_tracks_per_member is {0}")]
    TooManyTracks(usize),
    #[error("too many data channels: media.max_data_channels_per_member is {0}")]
    TooManyChannels(usize),
    #[error("too many media sessions started: media.max_session_starts_per_minute is {0}")]
    TooManyStarts(u32),
    /// The member's token does not allow it (the grant's name).
    #[error("your token does not grant {0}")]
    NotGranted(&'static str),
    #[error("media setup failed: {0}")]
    Internal(String),
}
