//! One room across nodes, on the loop that holds the room here (docs/CLUSTER.md): local
//! tracks are relayed once to each other node with members in the room, and tracks published
//! on other nodes arrive on their pipes and fan out to the local members like local tracks.
//! The bus carries what is announced (`crate::cluster::MediaEvent`); the pipes carry packets.

use std::time::Instant;

use bytes::BytesMut;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{RTCPFeedback, RTCRtpCodec};
use rtc::shared::marshal::Unmarshal;
use tracing::{debug, info, warn};

use super::{MediaState, PublishedTrack};
use crate::cluster::{MediaEvent, RemoteChannel, RemoteTrack};
use crate::sfu::api::{MediaKind, SfuEvent};
use crate::sfu::forward::{Codec, TrackForwarder};
use crate::sfu::peer::ConnKey;

/// What the bus asks of a loop (sent by `Sfu::cluster`).
pub enum ClusterCommand {
    /// Another node's announcement about a room this loop holds, as it came.
    Announced(Box<MediaEvent>),
    /// The other nodes forgot this one (took it for dead): it forgets which nodes its rooms
    /// have and what it relays to them; their answers to its `RoomOpen` start afresh.
    ForgetNodes,
    /// This node's bus came back: nodes that do not confirm a room (with `RoomState`) by
    /// `until` are taken to have left it.
    Recheck { until: Instant },
    /// A subscriber on another node needs a keyframe of the layer relayed as `ssrc`.
    Keyframe { ssrc: u32 },
    /// A peer's pipe keys changed: this loop's contexts for it are made again.
    PipeChanged { node: String },
    /// A peer is gone: its tracks leave the rooms (members here are told), nothing more goes
    /// to it.
    NodeGone { node: String },
}

/// Where a track's packets come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// A local member's publisher connection.
    Local(ConnKey),
    /// Another node's pipe.
    Remote { node: String },
}

impl PublishedTrack {
    pub fn is_local(&self) -> bool {
        matches!(self.origin, Origin::Local(_))
    }

    /// The track as other nodes need it.
    fn remote(&self) -> RemoteTrack {
        let layers = self
            .relay
            .streams()
            .map(|(node, streams)| {
                let layers = streams
                    .into_iter()
                    .map(|(pipe, source)| (pipe, self.forwarder.rid_of(source)))
                    .collect();
                (node.to_owned(), layers)
            })
            .collect();
        RemoteTrack {
            owner: self.owner.clone(),
            track_id: self.track_id.clone(),
            video: self.kind == MediaKind::Video,
            mime_type: self.codec.mime_type.clone(),
            clock_rate: self.codec.clock_rate,
            channels: self.codec.channels,
            fmtp: self.codec.sdp_fmtp_line.clone(),
            feedback: self
                .codec
                .rtcp_feedback
                .iter()
                .map(|f| (f.typ.clone(), f.parameter.clone()))
                .collect(),
            simulcast: self.simulcast.clone(),
            ext_ids: self.ext_ids.clone(),
            layers,
            muted: self.muted,
            published_at: self.published_at,
        }
    }
}

impl MediaState {
    pub(super) fn handle_cluster(&mut self, command: ClusterCommand, now: Instant) {
        match command {
            ClusterCommand::Announced(event) => self.announced(*event, now),
            ClusterCommand::Recheck { until } => self.recheck(until),
            ClusterCommand::ForgetNodes => {
                let rooms: Vec<String> = self.rooms.keys().cloned().collect();
                for room in rooms {
                    for node in
                        std::mem::take(&mut self.rooms.get_mut(&room).expect("listed").nodes)
                    {
                        self.node_closed(&room, &node);
                    }
                }
            }
            ClusterCommand::Keyframe { ssrc } => {
                let found = self
                    .tracks
                    .iter()
                    .find_map(|(t, track)| Some((t, track.relay.source_of(ssrc)?)));
                if let Some((t, source)) = found {
                    self.request_keyframe(t, source, now);
                }
            }
            ClusterCommand::PipeChanged { node } => self.loop_pipes.reset(&node),
            ClusterCommand::NodeGone { node } => self.node_gone(&node, now),
        }
    }

    /// Another node's announcement about a room this loop holds.
    fn announced(&mut self, event: MediaEvent, now: Instant) {
        match event {
            MediaEvent::RoomOpen { room, node, .. } => self.node_opened(&room, &node.id),
            MediaEvent::RoomState {
                room,
                node,
                tracks,
                channels,
                ..
            } => self.room_state(&room, &node.id, tracks, channels, now),
            // Its members are told by `node` itself (trackUnpublished, room-wide).
            MediaEvent::RoomClosed { room, node } => {
                self.node_left_room(&room, &node.id, false, now)
            }
            MediaEvent::TrackUp { room, node, track } => {
                self.remote_track_up(&room, &node.id, track, now)
            }
            MediaEvent::TrackDown {
                room,
                node,
                owner,
                track_id,
            } => {
                if let Some(t) = self.remote_track(&room, Some(&node.id), &owner, &track_id) {
                    self.unpublish(t, now);
                }
            }
            MediaEvent::Muted {
                room,
                node,
                owner,
                track_id,
                muted,
            } => {
                if let Some(t) = self.remote_track(&room, Some(&node.id), &owner, &track_id) {
                    let track = &mut self.tracks[t];
                    track.muted = muted;
                    track.forwarder.set_muted(muted);
                }
            }
            MediaEvent::ChannelUp {
                room,
                node,
                channel,
            } => self.remote_channel_up(&room, &node.id, channel, now),
            MediaEvent::ChannelDown { room, node, key } => {
                self.remote_channel_down(&room, &node.id, key, now)
            }
            MediaEvent::Data {
                room,
                node,
                key,
                text,
                data,
            } => self.remote_data(&room, &node.id, key, text, data, now),
            // Not about a room: handled by `Sfu::cluster`.
            MediaEvent::PipeKey { .. }
            | MediaEvent::Keyframe { .. }
            | MediaEvent::NodeGone { .. } => {}
        }
    }

    /// A room lost its last local member (already removed from `rooms`): its remote tracks go
    /// (no one here to tell). (The other nodes heard of it from the directory.)
    pub(super) fn room_closed_here(&mut self, closed: super::Room) {
        for t in closed.tracks {
            self.drop_remote_track(t);
        }
        // Its remote channels had copies on the members who left, and nothing else.
        for c in closed.channels {
            self.channels.try_remove(c);
        }
    }

    /// `node` opened a room held here: its local tracks go there from now on, and this
    /// node's state answers (the opener learns that this node has members, and what they
    /// publish).
    fn node_opened(&mut self, room: &str, node: &str) {
        self.add_room_node(room, node);
        self.announce_room_state(room);
        // After this node's bus came back, a node that has not confirmed the room yet is asked
        // again: it may have missed this node's question, and knowing this node, it would not
        // answer the state above with its own.
        let unconfirmed = self
            .recheck
            .as_ref()
            .and_then(|(_, rooms)| rooms.get(room))
            .is_some_and(|nodes| nodes.iter().any(|n| n == node));
        if unconfirmed {
            self.shared.directory().announce_open(room);
        }
    }

    /// Relays the room's local tracks to `node` too. Whether it was new to the room here.
    fn add_room_node(&mut self, room: &str, node: &str) -> bool {
        let Some(r) = self.rooms.get_mut(room) else {
            return false;
        };
        if r.nodes.iter().any(|n| n == node) {
            return false;
        }
        r.nodes.push(node.to_owned());
        for &t in &r.tracks {
            let track = &mut self.tracks[t];
            if track.is_local() {
                track.relay.add_node(node, &self.shared.pipes);
            }
        }
        true
    }

    /// Publishes what the local members publish in `room`.
    fn announce_room_state(&self, room: &str) {
        let (Some(r), pipes) = (self.rooms.get(room), &self.shared.pipes) else {
            return;
        };
        if !pipes.clustered() {
            return;
        }
        let tracks = r.tracks.iter().map(|&t| &self.tracks[t]);
        let channels = r.channels.iter().map(|&c| &self.channels[c]);
        pipes.publish(MediaEvent::RoomState {
            room: room.to_owned(),
            node: pipes.me.clone(),
            relay: pipes.relay,
            tracks: tracks
                .filter(|t| t.is_local())
                .map(|t| t.remote())
                .collect(),
            channels: channels
                .filter(|c| c.is_local())
                .map(|c| c.remote())
                .collect(),
        });
    }

    /// Another node's state of a room held here: what is missing is added, what it no longer
    /// publishes goes (announcements lost while this node's bus was down), and a node new to
    /// the room here learns this node's state in return.
    fn room_state(
        &mut self,
        room: &str,
        node: &str,
        tracks: Vec<RemoteTrack>,
        channels: Vec<RemoteChannel>,
        now: Instant,
    ) {
        if !self.rooms.contains_key(room) {
            return;
        }
        if let Some((_, unconfirmed)) = &mut self.recheck
            && let Some(nodes) = unconfirmed.get_mut(room)
        {
            nodes.retain(|n| n != node);
        }
        if self.add_room_node(room, node) {
            self.announce_room_state(room);
        }
        let origin = Origin::Remote {
            node: node.to_owned(),
        };
        let stale: Vec<usize> = self.rooms[room]
            .tracks
            .iter()
            .copied()
            .filter(|&t| {
                let track = &self.tracks[t];
                track.origin == origin
                    && !tracks
                        .iter()
                        .any(|r| r.owner == track.owner && r.track_id == track.track_id)
            })
            .collect();
        for t in stale {
            let info = self.tracks[t].info();
            self.unpublish(t, now);
            // Its trackUnpublished may have been lost with the announcement.
            self.emit(SfuEvent::RemoteTrackGone {
                room_id: room.to_owned(),
                track: info,
            });
        }
        for track in tracks {
            self.remote_track_up(room, node, track, now);
        }
        for c in self.remote_channels_of(room, Some(node)) {
            if !channels.iter().any(|ch| ch.key == self.channels[c].key) {
                self.remove_channel(c, now);
            }
        }
        for channel in channels {
            self.remote_channel_up(room, node, channel, now);
        }
    }

    fn node_closed(&mut self, room: &str, node: &str) {
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        r.nodes.retain(|n| n != node);
        for &t in &r.tracks {
            self.tracks[t].relay.remove_node(node);
        }
    }

    /// Tells the nodes a local track goes to what it is now (new, or with a new layer).
    pub(super) fn announce_track(&self, t: usize) {
        let Some(track) = self.tracks.get(t) else {
            return;
        };
        if !track.is_local() || track.relay.is_empty() {
            return;
        }
        let pipes = &self.shared.pipes;
        pipes.publish(MediaEvent::TrackUp {
            room: track.room.clone(),
            node: pipes.me.clone(),
            track: track.remote(),
        });
    }

    /// Tells the other nodes a local track is gone, or muted.
    pub(super) fn announce_track_change(&self, t: usize, gone: bool) {
        let Some(track) = self.tracks.get(t) else {
            return;
        };
        if !track.is_local() || track.relay.is_empty() {
            return;
        }
        let pipes = &self.shared.pipes;
        let (room, node, owner, track_id) = (
            track.room.clone(),
            pipes.me.clone(),
            track.owner.clone(),
            track.track_id.clone(),
        );
        pipes.publish(if gone {
            MediaEvent::TrackDown {
                room,
                node,
                owner,
                track_id,
            }
        } else {
            MediaEvent::Muted {
                room,
                node,
                owner,
                track_id,
                muted: track.muted,
            }
        });
    }

    /// A remote track of `room` by owner and id, from `node` (`None`: from any node).
    pub(super) fn remote_track(
        &self,
        room: &str,
        node: Option<&str>,
        owner: &str,
        track_id: &str,
    ) -> Option<usize> {
        let r = self.rooms.get(room)?;
        r.tracks.iter().copied().find(|&t| {
            let track = &self.tracks[t];
            let from_node = match (&track.origin, node) {
                (Origin::Remote { node: n }, Some(node)) => n == node,
                (Origin::Remote { .. }, None) => true,
                (Origin::Local(_), _) => false,
            };
            from_node && track.owner == owner && track.track_id == track_id
        })
    }

    /// A track published on another node: new here (every local member gets it), or new
    /// layers of one known.
    fn remote_track_up(&mut self, room: &str, node: &str, remote: RemoteTrack, now: Instant) {
        let loop_index = self.routes.loop_index();
        let me = &self.shared.pipes.me.id;
        // The streams `node` sends this node (none yet: it has not heard that this node is in
        // the room; its answer will list them).
        let layers = remote
            .layers
            .iter()
            .find(|(n, _)| n == me)
            .map(|(_, layers)| layers.clone())
            .unwrap_or_default();
        if let Some(t) = self.remote_track(room, Some(node), &remote.owner, &remote.track_id) {
            for (ssrc, rid) in &layers {
                let replaced = self.tracks[t].forwarder.add_layer(*ssrc, rid.as_deref());
                if let Some(old) = replaced {
                    self.forget_stream(node, old);
                }
                self.remote_streams.insert(node, *ssrc, t);
                self.shared.pipes.place(node, *ssrc, loop_index);
            }
            let track = &mut self.tracks[t];
            track.muted = remote.muted;
            track.forwarder.set_muted(remote.muted);
            return;
        }
        // The same owner's track of that id from elsewhere: the owner reconnected (its old
        // node may not have said goodbye yet). The one published later stays.
        if let Some(old) = self.remote_track(room, None, &remote.owner, &remote.track_id) {
            if self.tracks[old].published_at > remote.published_at {
                return; // a late word from the node the owner left
            }
            self.unpublish(old, now);
        }
        let Some(r) = self.rooms.get(room) else {
            return; // no member here any more
        };
        if r.tracks
            .iter()
            .any(|&t| self.tracks[t].track_id == remote.track_id)
        {
            warn!(%node, track = %remote.track_id, "a remote track's id is in use in the room: not forwarded");
            return;
        }
        let Some(codec) = Codec::from_mime(&remote.mime_type) else {
            return;
        };
        let mut forwarder = TrackForwarder::new(codec);
        forwarder.set_rids(&remote.simulcast);
        for (ssrc, rid) in &layers {
            forwarder.add_layer(*ssrc, rid.as_deref());
        }
        forwarder.set_muted(remote.muted);
        let t = self.tracks.insert(PublishedTrack {
            owner: remote.owner.clone(),
            room: room.to_owned(),
            track_id: remote.track_id.clone(),
            kind: if remote.video {
                MediaKind::Video
            } else {
                MediaKind::Audio
            },
            codec: RTCRtpCodec {
                mime_type: remote.mime_type,
                clock_rate: remote.clock_rate,
                channels: remote.channels,
                sdp_fmtp_line: remote.fmtp,
                rtcp_feedback: remote
                    .feedback
                    .into_iter()
                    .map(|(typ, parameter)| RTCPFeedback { typ, parameter })
                    .collect(),
            },
            simulcast: remote.simulcast,
            muted: remote.muted,
            ext_ids: remote.ext_ids,
            origin: Origin::Remote {
                node: node.to_owned(),
            },
            receivers: Vec::new(),
            forwarder,
            recording: None,
            rtp_out: Vec::new(),
            relay: Default::default(),
            published_at: remote.published_at,
        });
        for (ssrc, _) in &layers {
            self.remote_streams.insert(node, *ssrc, t);
            self.shared.pipes.place(node, *ssrc, loop_index);
        }
        let r = self.rooms.get_mut(room).expect("checked above");
        r.tracks.push(t);
        let members = r.members.clone();
        info!(%node, owner = %remote.owner, track = %remote.track_id, "remote track");
        for user in members {
            self.add_down(&user, t, now);
        }
    }

    /// Forgets a remote track's streams (the caller removes the track itself).
    pub(super) fn forget_remote_streams(&mut self, t: usize) {
        let Some(track) = self.tracks.get(t) else {
            return;
        };
        let Origin::Remote { node } = &track.origin else {
            return;
        };
        let node = node.clone();
        for ssrc in self.remote_streams.of_track(&node, t) {
            self.forget_stream(&node, ssrc);
        }
    }

    /// A remote stream ended here: its route, and its state in this loop's SRTP context (a
    /// stream of the same SSRC later starts from a clean state, and the context does not
    /// grow with every stream it saw).
    fn forget_stream(&mut self, node: &str, ssrc: u32) {
        self.remote_streams.remove(node, ssrc);
        let loop_index = self.routes.loop_index();
        self.shared.pipes.unplace(node, ssrc, loop_index);
        self.loop_pipes.forget_inbound_stream(node, ssrc);
    }

    /// A remote track of a room closed here (no down-tracks left to remove).
    fn drop_remote_track(&mut self, t: usize) {
        self.forget_remote_streams(t);
        self.tracks.try_remove(t);
    }

    fn node_gone(&mut self, node: &str, now: Instant) {
        self.loop_pipes.reset(node);
        let rooms: Vec<String> = self.rooms.keys().cloned().collect();
        for room in rooms {
            self.node_left_room(&room, node, true, now);
        }
    }

    /// `node` has no members in `room` any more (it said so, died, or did not answer after
    /// this node's bus came back): nothing more goes to it, and what it published leaves
    /// (members here are told: its own announcements may not have arrived).
    fn node_left_room(&mut self, room: &str, node: &str, tell: bool, now: Instant) {
        if !self.rooms.contains_key(room) {
            return;
        }
        self.node_closed(room, node);
        let origin = Origin::Remote {
            node: node.to_owned(),
        };
        let gone: Vec<usize> = self.rooms[room]
            .tracks
            .iter()
            .copied()
            .filter(|&t| self.tracks[t].origin == origin)
            .collect();
        for t in gone {
            let info = self.tracks[t].info();
            self.unpublish(t, now);
            if tell {
                self.emit(SfuEvent::RemoteTrackGone {
                    room_id: room.to_owned(),
                    track: info,
                });
            }
        }
        for c in self.remote_channels_of(room, Some(node)) {
            self.remove_channel(c, now);
        }
    }

    /// Notes every other node known in each room, to be confirmed by its `RoomState` by
    /// `until`.
    fn recheck(&mut self, until: Instant) {
        let mut unconfirmed = std::collections::HashMap::new();
        for (room, r) in &self.rooms {
            let mut nodes = r.nodes.clone();
            let origins = r
                .tracks
                .iter()
                .filter_map(|&t| match &self.tracks[t].origin {
                    Origin::Remote { node } => Some(node.clone()),
                    Origin::Local(_) => None,
                })
                .chain(
                    r.channels
                        .iter()
                        .filter_map(|&c| match &self.channels[c].origin {
                            super::ChannelOrigin::Remote { node } => Some(node.clone()),
                            super::ChannelOrigin::Local { .. } => None,
                        }),
                );
            for node in origins {
                if !nodes.contains(&node) {
                    nodes.push(node);
                }
            }
            if !nodes.is_empty() {
                unconfirmed.insert(room.clone(), nodes);
            }
        }
        self.recheck = Some((until, unconfirmed));
    }

    /// When the recheck is due: the nodes that did not confirm a room have left it.
    pub(super) fn recheck_due(&mut self, now: Instant) {
        if self.recheck.as_ref().is_none_or(|(until, _)| *until > now) {
            return;
        }
        let Some((_, unconfirmed)) = self.recheck.take() else {
            return;
        };
        for (room, nodes) in unconfirmed {
            for node in nodes {
                info!(%node, %room, "no answer from a node after the bus came back: taken to have left the room");
                self.node_left_room(&room, &node, true, now);
            }
        }
    }

    /// A datagram from a peer's pipe, routed to this loop by its SSRC.
    pub fn handle_pipe(&mut self, peer: &str, datagram: &[u8], now: Instant) {
        let Some(ssrc) = datagram
            .get(8..12)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        else {
            return;
        };
        // Known streams only: nothing else makes the context keep state.
        let Some(t) = self.remote_streams.get(peer, ssrc) else {
            self.received.rejected += 1;
            return;
        };
        let Some(ctx) = self.loop_pipes.inbound(&self.shared.pipes, peer) else {
            self.received.rejected += 1;
            return;
        };
        let mut buf = BytesMut::from(datagram);
        if ctx.decrypt_rtp_in_place(&mut buf).is_err() {
            self.received.rejected += 1;
            return;
        }
        let Ok(mut packet) = rtp::Packet::unmarshal(&mut buf.freeze()) else {
            self.received.rejected += 1;
            return;
        };
        // The publisher's sequence number, before the payload (see `RelayTarget`).
        let Some(seq) = packet
            .payload
            .get(..2)
            .map(|b| u16::from_be_bytes([b[0], b[1]]))
        else {
            self.received.rejected += 1;
            return;
        };
        packet.header.sequence_number = seq;
        packet.payload = packet.payload.slice(2..);
        self.received.relayed_in += 1;
        debug_assert_eq!(packet.header.ssrc, ssrc);
        self.forward(t, packet, now);
    }

    /// A keyframe request for a remote track's layer goes to its node.
    pub(super) fn request_remote_keyframe(&self, node: &str, ssrc: u32) {
        debug!(%node, ssrc, "keyframe request to another node");
        self.shared.pipes.publish(MediaEvent::Keyframe {
            to: node.to_owned(),
            ssrc,
        });
    }
}

/// The remote tracks' pipe streams on a loop: (peer, pipe SSRC) -> track.
#[derive(Default)]
pub struct RemoteStreams(std::collections::HashMap<String, std::collections::HashMap<u32, usize>>);

impl RemoteStreams {
    fn get(&self, peer: &str, ssrc: u32) -> Option<usize> {
        self.0.get(peer)?.get(&ssrc).copied()
    }

    fn insert(&mut self, peer: &str, ssrc: u32, t: usize) {
        self.0.entry(peer.to_owned()).or_default().insert(ssrc, t);
    }

    fn remove(&mut self, peer: &str, ssrc: u32) {
        if let Some(streams) = self.0.get_mut(peer) {
            streams.remove(&ssrc);
            if streams.is_empty() {
                self.0.remove(peer);
            }
        }
    }

    fn of_track(&self, peer: &str, t: usize) -> Vec<u32> {
        self.0
            .get(peer)
            .map(|s| {
                s.iter()
                    .filter(|(_, x)| **x == t)
                    .map(|(s, _)| *s)
                    .collect()
            })
            .unwrap_or_default()
    }
}
