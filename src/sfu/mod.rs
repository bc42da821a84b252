//! The SFU: the server as member `sfu` of every room. Each participant publishes over one peer
//! connection and receives everyone else's tracks and data channels over another; the server
//! forwards every packet it receives to the participants that want it.
//!
//! The media plane runs on a few event loops (threads, one per core by default), each with a
//! socket on the one media UDP port. A room lives on one loop with all its members'
//! connections, so a packet goes from the publisher to every subscriber without leaving that
//! thread. [`Sfu`] is the handle the signaling edge talks to: it finds the member's loop and
//! hands it the request.
//!
//! - `io/`: the media port (sockets, batched receive and send, routing of datagrams)
//! - `event_loop.rs`: a loop's thread
//! - `peer/`: one connection around webrtc-rs's sans-IO core (settings, SDP, candidates)
//! - `relay/`: members, rooms, tracks and channels on a loop; what crosses connections
//! - `egress.rs`: the lean send path of forwarded RTP (SRTP in place, NACKs, sender reports)
//! - `forward/`: the sans-IO forwarding core
//! - `rooms.rs`: which loop each room and member session is on

pub mod api;
pub mod egress;
mod event_loop;
pub mod forward;
pub mod ingress;
pub mod io;
pub mod peer;
pub mod pipes;
pub mod relay;
pub mod rooms;
mod starts;

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;

use tokio::sync::{mpsc, oneshot};
use tracing::info;

use crate::auth::Grants;
use crate::config::MediaConfig;

use crate::cluster::MediaEvent;
use api::{IceCandidate, PcKind, SfuError, SfuEvent, TrackInfo};
use event_loop::{Input, LoopConfig, Mailbox};
use forward::Quality;
use peer::PeerSettings;
use relay::{ClusterCommand, Command, Reply};
use rooms::Directory;

/// Counters of the media plane, for `/healthz` and the load tool.
#[derive(Debug, Default)]
pub struct Stats {
    /// Data-channel messages not relayed to a subscriber whose copy was full.
    pub data_messages_dropped: AtomicU64,
    pub datagrams_in: AtomicU64,
    pub datagrams_out: AtomicU64,
    /// `sendmmsg`/`sendmsg` calls.
    pub send_calls: AtomicU64,
    /// Messages that carried several datagrams to one address (UDP GSO).
    pub gso_messages: AtomicU64,
    pub send_failures: AtomicU64,
    /// Datagrams from addresses no connection knows.
    pub unrouted: AtomicU64,
    /// Datagrams one loop received for another loop's connection.
    pub handed_over: AtomicU64,
    /// ... and dropped because that loop had too many of them waiting.
    pub handover_dropped: AtomicU64,
    /// Times an event loop woke up (a datagram, a command or a timer).
    pub wakeups: AtomicU64,
    /// Publishers' media packets that took the server's own receive path (crate::sfu::ingress).
    pub media_received: AtomicU64,
    /// ... and datagrams of bound sources it dropped: failed authentication, replays, malformed.
    pub media_rejected: AtomicU64,
    /// Tracks and data channels refused because their member had published the most allowed.
    pub tracks_refused: AtomicU64,
    pub channels_refused: AtomicU64,
    /// Media sessions refused: their user started too many this minute.
    pub session_starts_refused: AtomicU64,
    /// Packets received on pipes from other nodes, and sent on pipes to them (once per track,
    /// layer and node, whatever the number of subscribers there).
    pub relayed_in: AtomicU64,
    pub relayed_out: AtomicU64,
    /// Data-channel messages over `media.max_data_message_bytes`, not relayed.
    pub data_messages_too_large: AtomicU64,
}

impl Stats {
    /// Adds what a send batch counted between two of its readings.
    pub fn count_sends(&self, before: io::SendStats, after: io::SendStats) {
        let add = |counter: &AtomicU64, delta: u64| counter.fetch_add(delta, Ordering::Relaxed);
        add(&self.datagrams_out, after.datagrams - before.datagrams);
        add(&self.send_calls, after.syscalls - before.syscalls);
        add(&self.gso_messages, after.gso_messages - before.gso_messages);
        add(&self.send_failures, after.failed - before.failed);
    }
}

/// What the loops and the handle share: the directory (touched on joins and leaves) and
/// counters.
pub struct Shared {
    directory: Mutex<Directory>,
    pub stats: Stats,
    pub recordings: Arc<crate::record::Recordings>,
    /// The other nodes' pipes and this node's place among them.
    pub pipes: Arc<pipes::Pipes>,
}

/// How the media plane reaches other nodes: its node id, the bus (none: a single node), and
/// the address other nodes send to (`cluster.relay_ip`; `None`: the media address).
pub struct ClusterLink {
    pub node_id: String,
    pub bus: Option<Arc<crate::cluster::Bus>>,
    pub relay_ip: Option<std::net::IpAddr>,
}

impl Shared {
    /// A panic elsewhere cannot leave the directory half-updated (each change is one call).
    pub fn directory(&self) -> MutexGuard<'_, Directory> {
        self.directory.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// How long a node whose bus came back waits for the other nodes' answers (`RoomState`, normally
/// within milliseconds) before it takes a node that did not answer for a room to have left it.
const RECHECK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Whether (user, session) is the user's current signaling connection.
pub type SessionCheck = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

pub struct Sfu {
    loops: Vec<Mailbox>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    shared: Arc<Shared>,
    is_current: SessionCheck,
    media_addr: SocketAddr,
    starts: Mutex<starts::SessionStarts>,
}

fn stopped() -> SfuError {
    SfuError::Internal("the media plane has stopped".into())
}

impl Sfu {
    /// Binds the media port and starts the event loops. `is_current(user, session)` tells
    /// whether a signaling connection is still the user's current one; a request of a replaced
    /// or closed connection then starts nothing.
    pub fn start(
        config: &MediaConfig,
        events: mpsc::UnboundedSender<SfuEvent>,
        is_current: SessionCheck,
        recordings: Arc<crate::record::Recordings>,
        cluster: ClusterLink,
    ) -> anyhow::Result<Arc<Sfu>> {
        let loops = config.loops();
        let sockets = io::port::bind(SocketAddr::new(config.ip, config.udp_port), loops)?;
        let bound = sockets[0].local_addr()?;
        let advertised = config.advertised_ip().unwrap_or(bound.ip());
        if advertised.is_unspecified() {
            anyhow::bail!(
                "media.ip {} is not an address clients can reach: set media.public_ip",
                config.ip
            );
        }
        let media_addr = SocketAddr::new(advertised, bound.port());
        let gso = io::gso_supported(&sockets[0]);
        if let Some(ip) = cluster.relay_ip
            && !bound.ip().is_unspecified()
            && ip != bound.ip()
        {
            anyhow::bail!(
                "cluster.relay_ip {ip} is not an address the media socket receives on (media.ip {}): set media.ip to 0.0.0.0 or to the relay address",
                bound.ip()
            );
        }
        let relay = SocketAddr::new(
            cluster.relay_ip.unwrap_or(if bound.ip().is_unspecified() {
                advertised
            } else {
                bound.ip()
            }),
            bound.port(),
        );
        let pipes = Arc::new(pipes::Pipes::new(&cluster.node_id, relay, cluster.bus));
        let shared = Arc::new(Shared {
            directory: Mutex::new(Directory::new(loops, Some(pipes.clone()))),
            stats: Stats::default(),
            recordings,
            pipes,
        });
        let (mailboxes, threads) = event_loop::start(
            sockets,
            LoopConfig {
                settings: Arc::new(PeerSettings::new(config, media_addr)?),
                shared: shared.clone(),
                events,
                router: Default::default(),
                gso,
                data_channel_limit: config.data_channel_buffer_bytes,
            },
        )?;
        info!(%bound, advertised = %media_addr, loops, gso, "media port open");
        // A node restarting under its id: the others forget what its last run published.
        shared.pipes.publish(MediaEvent::NodeGone {
            node: shared.pipes.me.id.clone(),
        });
        Ok(Arc::new(Sfu {
            loops: mailboxes,
            threads: Mutex::new(threads),
            shared,
            is_current,
            media_addr,
            starts: Mutex::new(starts::SessionStarts::new(
                config.max_session_starts_per_minute,
            )),
        }))
    }

    /// The address and port clients send media to.
    pub fn media_addr(&self) -> SocketAddr {
        self.media_addr
    }

    /// Number of members with media sessions (for health and tests).
    pub fn member_count(&self) -> usize {
        self.shared.directory().len()
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Data-channel messages a lagging subscriber missed (for health and tests).
    pub fn data_messages_dropped(&self) -> u64 {
        self.shared
            .stats
            .data_messages_dropped
            .load(Ordering::Relaxed)
    }

    async fn ask<T>(
        &self,
        loop_index: usize,
        make: impl FnOnce(Reply<T>) -> Command,
    ) -> Result<T, SfuError> {
        let (tx, rx) = oneshot::channel();
        if !self.loops[loop_index].send(Input::Command(make(tx))) {
            return Err(stopped());
        }
        rx.await.unwrap_or_else(|_| Err(stopped()))
    }

    /// The loop of the user's current session `session`, or the error for `pc`.
    fn loop_of(&self, user: &str, session: &str, pc: PcKind) -> Result<usize, SfuError> {
        self.shared
            .directory()
            .get(user)
            .filter(|s| s.session == session)
            .map(|s| s.loop_index)
            .ok_or(SfuError::NoConnection(pc))
    }

    /// Enters SFU mode (event `call` to `sfu`, or the first publisher offer): creates the
    /// subscriber connection and subscribes to everything already in the room.
    pub async fn join(
        &self,
        user: &str,
        room: &str,
        session: &str,
        grants: Grants,
    ) -> Result<(), SfuError> {
        let (tx, rx) = oneshot::channel();
        {
            let mut directory = self.shared.directory();
            if directory.get(user).is_some_and(|s| s.session == session) {
                return Ok(());
            }
            // Checked under the directory lock: a request of a connection replaced meanwhile
            // must not evict the newer connection's session.
            if !(self.is_current)(user, session) {
                return Err(SfuError::NoConnection(PcKind::Subscriber));
            }
            let mut starts = self.starts.lock().unwrap_or_else(PoisonError::into_inner);
            if !starts.allow(user, std::time::Instant::now()) {
                self.shared
                    .stats
                    .session_starts_refused
                    .fetch_add(1, Ordering::Relaxed);
                tracing::warn!(%user, "media session refused: too many started this minute");
                return Err(SfuError::TooManyStarts(starts.limit()));
            }
            drop(starts);
            if let Some(old) = directory.get(user).cloned() {
                directory.remove(user, &old.session);
                let (done, _) = oneshot::channel();
                self.loops[old.loop_index].send(Input::Command(Command::Leave {
                    user: user.to_owned(),
                    session: old.session,
                    reply: done,
                }));
            }
            let s = directory.insert(user, room, session);
            // Sent under the lock, so that any later request of this session queues behind it.
            let join = Command::Join {
                user: user.to_owned(),
                room: room.to_owned(),
                session: session.to_owned(),
                grants,
                reply: tx,
            };
            if !self.loops[s.loop_index].send(Input::Command(join)) {
                directory.remove(user, session);
                return Err(stopped());
            }
        }
        let joined = rx.await.unwrap_or_else(|_| Err(stopped()));
        if joined.is_err() {
            self.shared.directory().remove(user, session);
        }
        joined
    }

    /// A publisher offer: applies it and answers (on the publisher connection).
    pub async fn offer(
        &self,
        user: &str,
        room: &str,
        session: &str,
        grants: Grants,
        sdp: String,
    ) -> Result<(), SfuError> {
        self.join(user, room, session, grants).await?;
        let l = self.loop_of(user, session, PcKind::Publisher)?;
        self.ask(l, |reply| Command::Offer {
            user: user.to_owned(),
            session: session.to_owned(),
            sdp,
            reply,
        })
        .await
    }

    /// The client's answer to a subscriber offer.
    pub async fn answer(&self, user: &str, session: &str, sdp: String) -> Result<(), SfuError> {
        let l = self.loop_of(user, session, PcKind::Subscriber)?;
        self.ask(l, |reply| Command::Answer {
            user: user.to_owned(),
            session: session.to_owned(),
            sdp,
            reply,
        })
        .await
    }

    pub async fn candidate(
        &self,
        user: &str,
        room: &str,
        session: &str,
        grants: Grants,
        pc: PcKind,
        candidate: Option<IceCandidate>,
    ) -> Result<(), SfuError> {
        if pc == PcKind::Publisher {
            // A candidate can overtake its offer (socket.io runs handlers concurrently).
            self.join(user, room, session, grants).await?;
        }
        let l = self.loop_of(user, session, pc)?;
        self.ask(l, |reply| Command::Candidate {
            user: user.to_owned(),
            session: session.to_owned(),
            pc,
            candidate,
            reply,
        })
        .await
    }

    /// The tracks published in a room.
    pub async fn tracks(&self, room: &str) -> Vec<TrackInfo> {
        let Some(l) = self.shared.directory().loop_of_room(room) else {
            return Vec::new();
        };
        let (tx, rx) = oneshot::channel();
        if !self.loops[l].send(Input::Command(Command::Tracks {
            room: room.to_owned(),
            reply: tx,
        })) {
            return Vec::new();
        }
        rx.await.unwrap_or_default()
    }

    /// Selective subscription (`subscribe`): adds or removes tracks on the subscriber connection.
    pub async fn subscribe(
        &self,
        user: &str,
        session: &str,
        track_ids: &[String],
        on: bool,
    ) -> Result<(), SfuError> {
        let l = self.loop_of(user, session, PcKind::Subscriber)?;
        self.ask(l, |reply| Command::Subscribe {
            user: user.to_owned(),
            session: session.to_owned(),
            track_ids: track_ids.to_vec(),
            on,
            reply,
        })
        .await
    }

    pub async fn set_quality(
        &self,
        user: &str,
        session: &str,
        track_id: &str,
        quality: Quality,
    ) -> Result<(), SfuError> {
        let l = self.loop_of(user, session, PcKind::Subscriber)?;
        self.ask(l, |reply| Command::SetQuality {
            user: user.to_owned(),
            session: session.to_owned(),
            track_id: track_id.to_owned(),
            quality,
            reply,
        })
        .await
    }

    /// Publisher mute: stops forwarding the member's own track, announced as `trackMuted`.
    pub async fn mute(
        &self,
        user: &str,
        room: &str,
        track_id: &str,
        muted: bool,
    ) -> Result<(), SfuError> {
        let Some(l) = self.shared.directory().loop_of_room(room) else {
            return Err(SfuError::UnknownTrack(track_id.to_owned()));
        };
        self.ask(l, |reply| Command::Mute {
            user: user.to_owned(),
            room: room.to_owned(),
            track_id: track_id.to_owned(),
            muted,
            reply,
        })
        .await
    }

    /// Starts or stops recording a room (`user` `None`) or one participant on this node: from
    /// now on, and for the tracks published now. Returns the room's tracks recorded afterwards.
    pub async fn record(&self, room: &str, user: Option<&str>, start: bool) -> Vec<TrackInfo> {
        self.shared.recordings.select(room, user, start);
        let user = user.map(str::to_owned);
        self.ask_room(room, |room, reply| Command::Record {
            room,
            user,
            start,
            reply,
        })
        .await
    }

    /// Starts (`to`: host and first port) or stops (`None`) RTP egress of the tracks a room (or
    /// one participant) publishes now on this node. Returns what is sent where.
    pub async fn rtp_out(
        &self,
        room: &str,
        user: Option<&str>,
        to: Option<(std::net::IpAddr, u16)>,
    ) -> Vec<crate::record::rtp_out::OutTrack> {
        let user = user.map(str::to_owned);
        self.ask_room(room, |room, reply| Command::RtpOut {
            room,
            user,
            to,
            reply,
        })
        .await
    }

    /// Asks the loop holding `room` (nothing to do, and an empty answer, if none does).
    async fn ask_room<T: Default>(
        &self,
        room: &str,
        make: impl FnOnce(String, oneshot::Sender<T>) -> Command,
    ) -> T {
        let Some(l) = self.shared.directory().loop_of_room(room) else {
            return T::default(); // no media session in the room yet
        };
        let (tx, rx) = oneshot::channel();
        if !self.loops[l].send(Input::Command(make(room.to_owned(), tx))) {
            return T::default();
        }
        rx.await.unwrap_or_default()
    }

    /// Ends a member's media session: both connections, its tracks and channels everywhere.
    /// Whether there was one to end.
    pub async fn leave(&self, user: &str, session: &str) -> bool {
        let (tx, rx) = oneshot::channel();
        {
            let mut directory = self.shared.directory();
            let Some(s) = directory.remove(user, session) else {
                return false;
            };
            // Sent under the lock: a join that reopens the room on this loop queues behind it.
            let sent = self.loops[s.loop_index].send(Input::Command(Command::Leave {
                user: user.to_owned(),
                session: session.to_owned(),
                reply: tx,
            }));
            if !sent {
                return false;
            }
        }
        rx.await.unwrap_or(false)
    }

    /// What another node announced over the bus.
    pub fn cluster(&self, event: MediaEvent) {
        let pipes = &self.shared.pipes;
        match &event {
            MediaEvent::RoomOpen { room, node, relay } => {
                // Its question is answered (with this node's state) only where the room is.
                if !self.meet(node, room) {
                    return;
                }
                self.open_pipe_to(node, *relay, true);
            }
            MediaEvent::RoomState {
                room,
                node,
                relay,
                tracks,
                ..
            } => {
                if !self.meet(node, room) {
                    return; // an answer to another node
                }
                self.open_pipe_to(node, *relay, false);
                // Its packets cannot be opened without its key: ask for it (a RoomOpen makes
                // the node announce it again).
                if !tracks.is_empty() && !pipes.has_inbound(&node.id) {
                    self.shared.directory().announce_open(room);
                }
            }
            MediaEvent::PipeKey {
                from,
                to,
                relay,
                key,
            } => {
                if *to != pipes.me.id {
                    return;
                }
                if pipes.restarted(from) {
                    self.forget_node(&from.id);
                }
                if pipes.accept_inbound(from, *relay, key.clone()) {
                    let node = &from.id;
                    self.to_all_loops(|| ClusterCommand::PipeChanged { node: node.clone() });
                }
                return;
            }
            MediaEvent::Keyframe { to, ssrc } => {
                if *to == pipes.me.id {
                    self.to_all_loops(|| ClusterCommand::Keyframe { ssrc: *ssrc });
                }
                return;
            }
            MediaEvent::NodeGone { node } => return self.forget_node(node),
            _ => {}
        }
        let Some(room) = event.room() else {
            return;
        };
        if let Some(l) = self.shared.directory().loop_of_room(room) {
            let command = ClusterCommand::Announced(Box::new(event));
            self.loops[l].send(Input::Command(Command::Cluster(command)));
        }
    }

    /// Whether `node`'s word about `room` concerns this node: not its own, and about a room
    /// held here. A new incarnation of a node known under its id replaces the old one first.
    fn meet(&self, node: &crate::cluster::NodeRef, room: &str) -> bool {
        let pipes = &self.shared.pipes;
        if node.id == pipes.me.id {
            return false;
        }
        if pipes.restarted(node) {
            self.forget_node(&node.id);
        }
        self.holds(room)
    }

    /// The pipe to `node` (keyed anew for a new peer; the key announced again with `announce`).
    fn open_pipe_to(&self, node: &crate::cluster::NodeRef, relay: SocketAddr, announce: bool) {
        if self.shared.pipes.open_outbound(node, relay, announce) {
            let node = &node.id;
            self.to_all_loops(|| ClusterCommand::PipeChanged { node: node.clone() });
        }
    }

    /// Sends every loop a command (made once per loop).
    fn to_all_loops(&self, make: impl Fn() -> ClusterCommand) {
        for mailbox in &self.loops {
            mailbox.send(Input::Command(Command::Cluster(make())));
        }
    }

    /// This node's bus subscription came back after a loss: every room asks the other nodes
    /// for their state again (their answers add what was missed and drop what ended).
    pub fn resync(&self) {
        let directory = self.shared.directory();
        for room in directory.rooms() {
            directory.announce_open(room);
        }
        // Nodes that do not answer for a room by then have left it meanwhile.
        let until = std::time::Instant::now() + RECHECK_WAIT;
        self.to_all_loops(|| ClusterCommand::Recheck { until });
    }

    /// The registry found `node` dead: its tracks leave this node's rooms, and every other
    /// node is told to do the same.
    pub fn node_gone(&self, node: &str) {
        self.shared.pipes.publish(MediaEvent::NodeGone {
            node: node.to_owned(),
        });
        self.forget_node(node);
    }

    /// Whether a room has media members here.
    fn holds(&self, room: &str) -> bool {
        self.shared.directory().loop_of_room(room).is_some()
    }

    fn forget_node(&self, node: &str) {
        let pipes = &self.shared.pipes;
        if node == pipes.me.id {
            // Another node's registry took this one for dead (a heartbeat that stalled): the
            // others forgot its keys and tracks. New keys, and every room asks again.
            for peer in pipes.forget_outbound() {
                self.to_all_loops(|| ClusterCommand::PipeChanged { node: peer.clone() });
            }
            tracing::warn!("another node took this one for dead; announcing its rooms again");
            self.to_all_loops(|| ClusterCommand::ForgetNodes);
            self.resync();
            return;
        }
        if let Some(addr) = pipes.forget(node) {
            for mailbox in &self.loops {
                mailbox.send(Input::Forget(vec![addr]));
            }
        }
        self.to_all_loops(|| ClusterCommand::NodeGone {
            node: node.to_owned(),
        });
    }

    /// Closes every media session and stops the loops (graceful shutdown).
    pub async fn shutdown(&self) {
        for mailbox in &self.loops {
            let (tx, rx) = oneshot::channel();
            if mailbox.send(Input::Shutdown(tx)) {
                let _ = rx.await;
            }
        }
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        // Every recording ended with its track; its file is complete once its writer is done.
        let recordings = self.shared.recordings.clone();
        let _ = tokio::task::spawn_blocking(move || recordings.wait()).await;
        // The other nodes drop whatever of this node's they still hold (an announcement of a
        // track's end lost on the way, say). Given a moment to reach Redis.
        let pipes = &self.shared.pipes;
        pipes.publish(MediaEvent::NodeGone {
            node: pipes.me.id.clone(),
        });
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(1);
        while !pipes.sent_all() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    }
}
