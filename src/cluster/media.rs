//! What nodes tell each other about media over the bus (docs/CLUSTER.md): which nodes have
//! members in a room, the keys of the pipes between them, the tracks published on each, and
//! keyframe requests travelling back to a publisher's node. The media itself crosses on the
//! pipes (`crate::sfu::pipes`), never on the bus.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

use super::pipe::PipeKey;

/// A node as the media plane knows it: its id and this run's random incarnation (a node that
/// restarts under the same id is a new peer: new pipe keys, its old tracks gone).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeRef {
    pub id: String,
    pub incarnation: u64,
}

/// A layer's stream on a pipe: its SSRC there and the layer's simulcast rid.
pub type PipeLayer = (u32, Option<String>);

/// A published track as other nodes need it to forward it: the publisher's codec, simulcast
/// rids and header-extension ids, and the SSRC each layer has on the pipe.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemoteTrack {
    pub owner: String,
    pub track_id: String,
    pub video: bool,
    pub mime_type: String,
    pub clock_rate: u32,
    pub channels: u16,
    pub fmtp: String,
    /// RTCP feedback (type, parameter) the codec is offered with.
    pub feedback: Vec<(String, String)>,
    pub simulcast: Vec<String>,
    pub ext_ids: Vec<(String, u8)>,
    /// For each node it is relayed to: the pipe SSRC of each layer, with its rid (`None`: not
    /// simulcast). Each node gets streams of its own.
    pub layers: Vec<(String, Vec<PipeLayer>)>,
    pub muted: bool,
    /// When it was published (Unix ms, on its node).
    pub published_at: u64,
}

/// A data channel as other nodes need it to open copies of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteChannel {
    /// Names the channel across nodes (drawn by its node).
    pub key: u64,
    pub owner: String,
    pub label: String,
    pub ordered: bool,
    pub max_packet_life_time: Option<u16>,
    pub max_retransmits: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum MediaEvent {
    /// `node` has media members in `room` (sent when the first one arrives, and again when a
    /// node asks): every node with tracks in the room sends them to `relay`.
    RoomOpen {
        room: String,
        node: NodeRef,
        relay: SocketAddr,
    },
    /// What `node` publishes in `room` now (its answer to `RoomOpen`): every node holding the
    /// room adds what it lacks and drops what is not listed, and a node new to it answers
    /// with its own state.
    RoomState {
        room: String,
        node: NodeRef,
        relay: SocketAddr,
        tracks: Vec<RemoteTrack>,
        channels: Vec<RemoteChannel>,
    },
    /// `node` has no media member in `room` any more: stop sending it the room's tracks.
    RoomClosed { room: String, node: NodeRef },
    /// The key `from` protects what it sends to `to` with, and the address it sends from.
    PipeKey {
        from: NodeRef,
        to: String,
        relay: SocketAddr,
        key: PipeKey,
    },
    /// A track published on `node` (new, or with new layers): sent to the nodes in the room.
    TrackUp {
        room: String,
        node: NodeRef,
        track: RemoteTrack,
    },
    TrackDown {
        room: String,
        node: NodeRef,
        owner: String,
        track_id: String,
    },
    Muted {
        room: String,
        node: NodeRef,
        owner: String,
        track_id: String,
        muted: bool,
    },
    /// A data channel a member of `node` opened (sent to the nodes in the room).
    ChannelUp {
        room: String,
        node: NodeRef,
        channel: RemoteChannel,
    },
    ChannelDown {
        room: String,
        node: NodeRef,
        key: u64,
    },
    /// A message on channel `key`, byte for byte (the bus keeps a node's messages in order).
    Data {
        room: String,
        node: NodeRef,
        key: u64,
        text: bool,
        data: bytes::Bytes,
    },
    /// A subscriber on another node needs a keyframe of the layer sent as `ssrc` on the pipe.
    Keyframe { to: String, ssrc: u32 },
    /// `node` stopped (a graceful stop, or found dead by the registry), or started (for its own
    /// id: the others forget its last run): its tracks and pipes are gone.
    NodeGone { node: String },
}

impl MediaEvent {
    /// The room an announcement is about, if it is about one.
    pub fn room(&self) -> Option<&str> {
        match self {
            MediaEvent::RoomOpen { room, .. }
            | MediaEvent::RoomState { room, .. }
            | MediaEvent::RoomClosed { room, .. }
            | MediaEvent::TrackUp { room, .. }
            | MediaEvent::TrackDown { room, .. }
            | MediaEvent::Muted { room, .. }
            | MediaEvent::ChannelUp { room, .. }
            | MediaEvent::ChannelDown { room, .. }
            | MediaEvent::Data { room, .. } => Some(room),
            MediaEvent::PipeKey { .. }
            | MediaEvent::Keyframe { .. }
            | MediaEvent::NodeGone { .. } => None,
        }
    }
}
