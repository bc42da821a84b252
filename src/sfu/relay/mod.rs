//! The media state of one event loop: its connections, the members and rooms placed on it,
//! their published tracks and data channels, and what crosses from one connection to others.
//! It is driven by the loop (datagrams, commands, timeouts) and does no I/O itself: datagrams
//! to send go into its send batch.
//!
//! Words: a *member* is a user in a room with a media session; a *connection* is one of its two
//! peer connections; a *track* is what a member publishes; a *down-track* is one subscriber's
//! copy of it; a *channel* is a data channel a member opened, relayed as *copies*.

mod channels;
pub mod negotiation;
mod pipe_out;
mod remote;
mod remote_channels;

mod signaling;
mod tracks;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::BytesMut;
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit};
use rtc::peer_connection::event::{RTCDataChannelEvent, RTCPeerConnectionEvent, RTCTrackEvent};
use rtc::peer_connection::message::RTCMessage;
use rtc::peer_connection::state::RTCPeerConnectionState;
use rtc::rtp_transceiver::rtp_sender::RTCRtpCodec;
use rtc::rtp_transceiver::{RTCRtpReceiverId, RTCRtpSenderId};
use rtc::sansio::Protocol;
use rtc::shared::{TaggedBytesMut, TransportContext, TransportProtocol};
use slab::Slab;
use tokio::sync::mpsc::UnboundedSender;
use tracing::{debug, warn};

use crate::auth::Grants;

pub use pipe_out::Relay;
pub use remote::{ClusterCommand, Origin};
pub use signaling::{Command, Reply};

use super::Shared;
use super::api::{MediaKind, PcKind, SfuEvent};
use super::egress::Route;
use super::forward::{DownTrackId, Quality, TrackForwarder};
use super::io::SendBatch;
use super::io::router::{ConnRef, Routes};
use super::io::stun;
use super::peer::{ConnKey, Connection, PeerSettings};
use negotiation::Negotiation;

/// Where a down-track's packets go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DownSink {
    /// A subscriber connection and its egress slot.
    Subscriber { conn: ConnKey, slot: usize },
    /// The track's recording ([`PublishedTrack::recording`]).
    Recording,
    /// Plain RTP to an address (RTP egress, [`PublishedTrack::rtp_out`]).
    Plain { to: SocketAddr },
}

/// A user in a room with a media session on this loop.
pub struct Member {
    pub user: String,
    pub room: String,
    /// The signaling connection the session belongs to.
    pub session: String,
    pub publisher: Option<ConnKey>,
    pub subscriber: ConnKey,
    /// Tracks of others forwarded on the subscriber connection.
    pub downs: Vec<DownEntry>,
    /// Tracks (owner, track id) this member said it does not want.
    pub unsubscribed: HashSet<(String, String)>,
    pub quality: HashMap<(String, String), Quality>,
    /// The latest publisher offer (track ids, simulcast rids and extension ids of its tracks).
    pub publisher_sdp: String,
    pub negotiation: Negotiation,
    /// The subscriber connection carries a data section (offered once).
    pub has_channels: bool,
    /// What the member's token allows.
    pub grants: Grants,
}

impl Member {
    pub fn wants(&self, owner: &str, track_id: &str) -> bool {
        self.grants.subscribe
            && owner != self.user
            && !self
                .unsubscribed
                .contains(&(owner.to_owned(), track_id.to_owned()))
    }
}

/// One forwarded track on a member's subscriber connection.
pub struct DownEntry {
    pub track: usize,
    pub down_id: DownTrackId,
    pub sender: RTCRtpSenderId,
    pub slot: usize,
    pub ssrc: u32,
    /// The SSRC of its retransmission stream (video).
    pub rtx_ssrc: Option<u32>,
}

/// A track a member publishes.
pub struct PublishedTrack {
    pub owner: String,
    pub room: String,
    pub track_id: String,
    pub kind: MediaKind,
    pub codec: RTCRtpCodec,
    pub simulcast: Vec<String>,
    pub muted: bool,
    /// The publisher's header-extension ids (by URI) of the forwarded extensions.
    pub ext_ids: Vec<(String, u8)>,
    /// A local member's connection, or another node's pipe.
    pub origin: Origin,
    /// Source SSRC of each layer -> its receiver (keyframe requests go there; local tracks).
    pub receivers: Vec<(u32, RTCRtpReceiverId)>,
    pub forwarder: TrackForwarder<DownSink>,
    /// The track's recording, fed by a down-track of its own.
    pub recording: Option<crate::record::Recorder>,
    /// RTP egress: a down-track per destination.
    pub rtp_out: Vec<DownTrackId>,
    /// Other nodes it is relayed to (local tracks).
    pub relay: Relay,
    /// When it was published (Unix ms, on its node): of two tracks of one owner and id from
    /// two nodes (a member that reconnected elsewhere), the later one stays.
    pub published_at: u64,
}

/// A data channel a member opened, and its copies on the other members' connections.
pub struct ChannelSource {
    pub owner: String,
    pub room: String,
    /// A local member's channel (its connection and id there), or another node's.
    pub origin: ChannelOrigin,
    /// Names the channel across nodes.
    pub key: u64,
    pub label: String,
    /// What the copies are created with (`protocol` = the owner's userId).
    pub init: RTCDataChannelInit,
    pub copies: Vec<ChannelCopy>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ChannelOrigin {
    Local { conn: ConnKey, id: RTCDataChannelId },
    Remote { node: String },
}

pub struct ChannelCopy {
    pub user: String,
    pub conn: ConnKey,
    pub id: RTCDataChannelId,
    pub open: bool,
}

#[derive(Default)]
pub struct Room {
    /// Members in join order.
    pub members: Vec<String>,
    /// Tracks being recorded to files (members are told when this leaves or returns to 0).
    pub recorded_tracks: usize,
    /// The participant recorded, when only one is (not the room).
    pub recorded_user: Option<String>,
    /// Local and remote tracks.
    pub tracks: Vec<usize>,
    pub channels: Vec<usize>,
    /// Other nodes with members in the room (its local tracks are relayed to them).
    pub nodes: Vec<String>,
}

pub struct MediaState {
    pub settings: Arc<PeerSettings>,
    shared: Arc<Shared>,
    events: UnboundedSender<SfuEvent>,
    pub routes: Routes,
    pub conns: Slab<Connection>,
    members: HashMap<String, Member>,
    rooms: HashMap<String, Room>,
    tracks: Slab<PublishedTrack>,
    channels: Slab<ChannelSource>,
    pub batch: SendBatch,
    /// Connections with output queued by the application (a PLI, a channel message) whose
    /// datagrams are collected before the batch goes out.
    dirty: Vec<ConnKey>,
    next_down_id: DownTrackId,
    data_channel_limit: usize,
    /// Connection timers by deadline. Entries may be early (the deadline moved later since) or
    /// stale (the connection closed): both are checked when they come due.
    timers: BinaryHeap<Reverse<(Instant, ConnKey)>>,
    /// Members with a subscriber offer to make or an answer to wait for.
    negotiating: HashSet<String>,
    next_reports: Instant,
    /// Addresses of connections closed here, for the other loops to forget.
    pub forgotten: Vec<SocketAddr>,
    next_conn_id: u64,
    /// Counted here per packet, added to the shared counters per batch.
    pub received: ReceiveCounts,
    /// This loop's SRTP contexts of the pipes to and from other nodes.
    loop_pipes: super::pipes::LoopPipes,
    /// Remote tracks by the pipe streams that feed them.
    remote_streams: remote::RemoteStreams,
    /// After this node's bus came back: by when, and which nodes of each room have not
    /// confirmed it yet.
    recheck: Option<(Instant, HashMap<String, Vec<String>>)>,
}

/// Publishers' media on the server's own receive path since the last batch.
#[derive(Default, Clone, Copy)]
pub struct ReceiveCounts {
    pub media: u64,
    pub rejected: u64,
    /// Packets received from other nodes' pipes, and sent on pipes to them.
    pub relayed_in: u64,
    pub relayed_out: u64,
}

impl MediaState {
    pub fn new(
        settings: Arc<PeerSettings>,
        shared: Arc<Shared>,
        events: UnboundedSender<SfuEvent>,
        routes: Routes,
        gso: bool,
        data_channel_limit: usize,
    ) -> MediaState {
        MediaState {
            settings,
            shared,
            events,
            routes,
            conns: Slab::new(),
            members: HashMap::new(),
            rooms: HashMap::new(),
            tracks: Slab::new(),
            channels: Slab::new(),
            batch: SendBatch::new(gso),
            dirty: Vec::new(),
            next_down_id: 1,
            data_channel_limit,
            timers: BinaryHeap::new(),
            negotiating: HashSet::new(),
            next_reports: Instant::now() + super::egress::REPORT_INTERVAL,
            forgotten: Vec::new(),
            next_conn_id: 0,
            received: ReceiveCounts::default(),
            loop_pipes: Default::default(),
            remote_streams: Default::default(),
            recheck: None,
        }
    }

    fn emit(&self, event: SfuEvent) {
        // Track webhooks from here, in the loop: ordered before a leave's participant_left.
        let webhooks = self.shared.recordings.webhooks();
        match &event {
            SfuEvent::TrackPublished { room_id, track } => {
                webhooks.emit(crate::webhook::Event::TrackPublished {
                    room: room_id.clone(),
                    track: track.clone(),
                })
            }
            SfuEvent::TrackUnpublished { room_id, track } => {
                webhooks.emit(crate::webhook::Event::TrackUnpublished {
                    room: room_id.clone(),
                    track: track.clone(),
                })
            }
            _ => {}
        }
        let _ = self.events.send(event);
    }

    /// A datagram for connection `conn` (routed by the loop); dropped if that connection has
    /// closed since it was routed.
    pub fn handle_datagram(&mut self, conn: ConnRef, now: Instant, from: SocketAddr, data: &[u8]) {
        let local_addr = self.settings.candidate_addr;
        let key = conn.key;
        let Some(conn) = self.conns.get_mut(key).filter(|c| c.id == conn.id) else {
            return;
        };
        // A bound publisher source's media takes the lean receive path (crate::sfu::ingress).
        if let Some(ingress) = conn.ingress.as_deref_mut()
            && let Some(source) = ingress.source_of(data)
            && let Some(srtp) = conn.pc.remote_srtp_context()
        {
            match ingress.receive(source, srtp, data, now) {
                Ok(Some((t, packet))) => {
                    self.received.media += 1;
                    self.forward(t, packet, now);
                }
                Ok(None) => self.received.media += 1,
                Err(_) => self.received.rejected += 1,
            }
            self.schedule_ingress(key);
            return;
        }
        let read = conn.pc.handle_read(TaggedBytesMut {
            now,
            transport: TransportContext {
                local_addr,
                peer_addr: from,
                ecn: None,
                transport_protocol: TransportProtocol::UDP,
            },
            message: BytesMut::from(data),
        });
        if read.is_ok()
            && let Some(ingress) = conn.ingress.as_deref_mut()
        {
            ingress.arrived_via_core(data, now);
        }
        self.service(key, now);
    }

    /// Takes everything a connection has for the application (events first, so a track or
    /// channel is announced before its first packet), then its datagrams and next timeout.
    fn service(&mut self, key: ConnKey, now: Instant) {
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let Some(event) = conn.pc.poll_event() else {
                break;
            };
            self.on_event(key, event, now);
        }
        loop {
            let Some(conn) = self.conns.get_mut(key) else {
                return;
            };
            let Some(message) = conn.pc.poll_read() else {
                break;
            };
            self.on_message(key, message.message, now);
        }
        self.collect_writes(key, now);
    }

    /// Moves a connection's datagrams into the send batch and records its next timeout.
    fn collect_writes(&mut self, key: ConnKey, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        conn.flush_feedback(now);
        while let Some(out) = conn.pc.poll_write() {
            let to = out.transport.peer_addr;
            if stun::is_stun(&out.message) {
                // Full ICE: the server may check an address before hearing from it.
                let me = ConnRef {
                    loop_index: self.routes.loop_index(),
                    key,
                    id: conn.id,
                };
                self.routes.learn(to, me);
            }
            let mut buf = self.batch.buffer();
            buf.extend_from_slice(&out.message);
            self.batch.push(key as u32, to, buf);
        }
        conn.route = conn.pc.selected_pair_addrs().map(|(_, remote)| remote);
        if conn.kind == PcKind::Subscriber && conn.srtp.is_none() {
            conn.srtp = conn.pc.take_local_srtp_context();
        }
        let ingress = conn.ingress.as_deref_mut().and_then(|i| i.poll_timeout());
        // rtc may report a deadline already past; never spin on it.
        let next = [conn.pc.poll_timeout(), ingress]
            .into_iter()
            .flatten()
            .min()
            .map(|t| t.max(now + std::time::Duration::from_millis(1)));
        conn.next_timeout = next;
        self.schedule(key, next);
    }

    /// Keeps a timer heap entry for a connection's deadline `at` unless an earlier one is there.
    fn schedule(&mut self, key: ConnKey, at: Option<Instant>) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if let Some(t) = at
            && conn.scheduled.is_none_or(|s| t < s)
        {
            conn.scheduled = Some(t);
            self.timers.push(Reverse((t, key)));
        }
    }

    /// After a packet took the lean receive path: its interceptors may have armed a timer (the
    /// first packet of a stream starts the NACK, report and feedback clocks).
    fn schedule_ingress(&mut self, key: ConnKey) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let Some(at) = conn.ingress.as_deref_mut().and_then(|i| i.poll_timeout()) else {
            return;
        };
        if conn.next_timeout.is_none_or(|t| at < t) {
            conn.next_timeout = Some(at);
            self.schedule(key, Some(at));
        }
    }

    /// Whether `from` is the selected remote address of the (still open) connection `conn`.
    pub fn is_route_of(&self, conn: ConnRef, from: SocketAddr) -> bool {
        self.conns
            .get(conn.key)
            .is_some_and(|c| c.id == conn.id && c.route == Some(from))
    }

    /// A connection the application wrote to (a PLI, a channel message, a close).
    fn mark_dirty(&mut self, key: ConnKey) {
        if !self.dirty.contains(&key) {
            self.dirty.push(key);
        }
    }

    /// Collects the datagrams of connections written to since the last call.
    pub fn collect_dirty(&mut self, now: Instant) {
        while let Some(key) = self.dirty.pop() {
            self.service(key, now);
        }
    }

    fn on_event(&mut self, key: ConnKey, event: RTCPeerConnectionEvent, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let kind = conn.kind;
        match event {
            RTCPeerConnectionEvent::OnConnectionStateChangeEvent(state) => {
                debug!(user = %conn.user, pc = ?kind, %state, "connection state");
                conn.connected = state == RTCPeerConnectionState::Connected;
                if state == RTCPeerConnectionState::Failed {
                    let user = conn.user.clone();
                    self.connection_failed(&user, kind, now);
                }
            }
            RTCPeerConnectionEvent::OnTrack(RTCTrackEvent::OnOpen(init)) => {
                if kind == PcKind::Publisher {
                    self.on_track(key, init, now);
                } else {
                    debug!(user = %conn.user, "ignoring a track sent on the subscriber connection");
                }
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnOpen(id)) => {
                self.on_channel_open(key, id, now)
            }
            RTCPeerConnectionEvent::OnDataChannel(RTCDataChannelEvent::OnClose(id)) => {
                self.on_channel_close(key, id, now)
            }
            _ => {}
        }
    }

    fn on_message(&mut self, key: ConnKey, message: RTCMessage, now: Instant) {
        match message {
            RTCMessage::RtpPacket(_, packet) => self.on_rtp(key, packet, now),
            RTCMessage::RtcpPacket(_, packets) => self.on_rtcp(key, packets, now),
            RTCMessage::DataChannelMessage(id, message) => {
                self.on_channel_message(key, id, message, now)
            }
            _ => {}
        }
    }

    /// A connection failed (no ICE traffic): the member's session ends everywhere, and it is told.
    fn connection_failed(&mut self, user: &str, kind: PcKind, now: Instant) {
        let Some(session) = self.members.get(user).map(|m| m.session.clone()) else {
            return;
        };
        warn!(%user, pc = ?kind, "connection failed; ending the media session");
        self.shared.directory().remove(user, &session);
        if self.end_member(user, &session, now) {
            self.emit(SfuEvent::MediaEnded {
                user_id: user.to_owned(),
                session,
                reason: "connection failed",
            });
        }
    }

    /// The earliest instant something is due: a connection's timer, an offer, the reports.
    pub fn next_deadline(&self) -> Option<Instant> {
        let conns = self.timers.peek().map(|Reverse((at, _))| *at);
        let offers = self
            .negotiating
            .iter()
            .filter_map(|u| self.members.get(u)?.negotiation.deadline());
        conns
            .into_iter()
            .chain(offers)
            .chain([self.next_reports])
            .chain(self.recheck.as_ref().map(|(until, _)| *until))
            .min()
    }

    /// Runs whatever is due at `now`. Only what is due is looked at (a wake-up for a packet
    /// costs no scan of every connection).
    pub fn handle_timeouts(&mut self, now: Instant) {
        while let Some(&Reverse((at, key))) = self.timers.peek() {
            if at > now {
                break;
            }
            self.timers.pop();
            let Some(conn) = self.conns.get_mut(key) else {
                continue; // closed since
            };
            if conn.scheduled == Some(at) {
                conn.scheduled = None;
            }
            match conn.next_timeout {
                Some(t) if t <= now => {
                    let _ = conn.pc.handle_timeout(now);
                    if let Some(ingress) = conn.ingress.as_deref_mut() {
                        ingress.handle_timeout(now);
                    }
                    self.service(key, now);
                }
                // An early entry (the deadline moved later): keep one for the real deadline.
                Some(t) if conn.scheduled.is_none() => {
                    conn.scheduled = Some(t);
                    self.timers.push(Reverse((t, key)));
                }
                _ => {}
            }
        }
        if self.next_reports <= now {
            self.next_reports = now + super::egress::REPORT_INTERVAL;
            self.send_reports(now);
        }
        self.recheck_due(now);
        if !self.negotiating.is_empty() {
            let users: Vec<String> = self.negotiating.iter().cloned().collect();
            for user in users {
                let Some(m) = self.members.get_mut(&user) else {
                    self.negotiating.remove(&user);
                    continue;
                };
                if m.negotiation.deadline().is_none() {
                    self.negotiating.remove(&user);
                } else if m.negotiation.offer_due(now) {
                    self.offer_subscriber(&user, now);
                }
            }
        }
    }

    /// Sender reports for every down-track that has sent packets.
    fn send_reports(&mut self, now: Instant) {
        let wall = SystemTime::now();
        for (key, conn) in self.conns.iter_mut() {
            let Connection {
                egress,
                route,
                srtp,
                ..
            } = conn;
            if let (Some(to), Some(srtp)) = (*route, srtp.as_mut()) {
                let route = Route {
                    to,
                    key: key as u32,
                };
                egress.send_reports(now, wall, srtp, route, &mut self.batch);
            }
        }
    }

    /// A member's subscriber connection is to be offered again (its tracks or channels changed).
    fn renegotiate(&mut self, user: &str, now: Instant) {
        if let Some(m) = self.members.get_mut(user) {
            m.negotiation.changed(now);
            if !self.negotiating.contains(user) {
                self.negotiating.insert(user.to_owned());
            }
        }
    }

    /// Closes every connection (graceful shutdown).
    pub fn shutdown(&mut self, now: Instant) {
        let members: Vec<(String, String)> = self
            .members
            .values()
            .map(|m| (m.user.clone(), m.session.clone()))
            .collect();
        for (user, session) in members {
            self.shared.directory().remove(&user, &session);
            self.end_member(&user, &session, now);
        }
    }

    /// Counts a relayed data message a lagging subscriber missed.
    fn count_dropped_message(&self) -> bool {
        self.shared
            .stats
            .data_messages_dropped
            .fetch_add(1, Ordering::Relaxed)
            == 0
    }
}
