//! The SFU: the server as member `sfu` of every room. Each participant publishes over one peer
//! connection and receives everyone else's tracks and data channels over another; the server
//! forwards every packet it receives to the participants that want it.

pub mod api;
pub mod egress;
pub mod forward;
pub mod io;
pub mod session;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use rtc::media_stream::MediaStreamTrack;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::RTCPeerConnectionState;

use crate::config::MediaConfig;
use api::{IceCandidate, MediaKind, PcKind, SfuError, SfuEvent, TrackInfo};
use forward::{Codec, DownTrackConfig, Quality};
use session::channel::ChannelSource;
use session::member::{DownEntry, Leg, Member};
use session::peer::{FORWARDED_EXTENSIONS, PeerEvent, PeerFactory};
use session::rtcp_to_app::is_keyframe_request;
use session::track::{self as track_task, TrackCommand};

/// A track a member publishes, and the handle to its fan-out task.
struct Published {
    owner: String,
    room_id: String,
    track_id: String,
    kind: MediaKind,
    codec: RTCRtpCodec,
    simulcast: Vec<String>,
    muted: AtomicBool,
    ext_ids: Vec<(String, u8)>,
    commands: mpsc::UnboundedSender<TrackCommand>,
}

impl Published {
    fn info(&self) -> TrackInfo {
        TrackInfo {
            user_id: self.owner.clone(),
            track_id: self.track_id.clone(),
            kind: self.kind,
            simulcast: self.simulcast.clone(),
            muted: self.muted.load(Ordering::Relaxed),
        }
    }
}

#[derive(Default)]
struct State {
    members: HashMap<String, Arc<Member>>,
    tracks: Vec<Arc<Published>>,
    channels: Vec<Arc<ChannelSource>>,
}

pub struct Sfu {
    factory: PeerFactory,
    events: mpsc::UnboundedSender<SfuEvent>,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// Makes "find or create the member" atomic: a candidate and an offer arriving together
    /// (socket.io runs handlers concurrently) must not create two sessions.
    joins: tokio::sync::Mutex<()>,
    is_current: SessionCheck,
    /// Data-channel messages not relayed to a subscriber whose channel was full.
    data_messages_dropped: AtomicU64,
}

/// Whether (user, session) is the user's current signaling connection.
pub type SessionCheck = Box<dyn Fn(&str, &str) -> bool + Send + Sync>;

/// A fresh SSRC for a subscriber's copy of a track (never 0).
fn random_ssrc() -> u32 {
    (crate::random_u64() as u32) | 1
}

impl Sfu {
    /// `is_current(user, session)` tells whether a signaling connection is still the user's
    /// current one; a request of a replaced or closed connection then starts nothing.
    pub fn new(
        config: MediaConfig,
        events: mpsc::UnboundedSender<SfuEvent>,
        is_current: SessionCheck,
    ) -> Arc<Sfu> {
        Arc::new(Sfu {
            factory: PeerFactory::new(config),
            events,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            joins: tokio::sync::Mutex::new(()),
            is_current,
            data_messages_dropped: AtomicU64::new(0),
        })
    }

    fn member(&self, user_id: &str, session: &str) -> Option<Arc<Member>> {
        self.state
            .lock()
            .unwrap()
            .members
            .get(user_id)
            .filter(|m| m.session == session)
            .cloned()
    }

    fn room_members(&self, room_id: &str) -> Vec<Arc<Member>> {
        self.state
            .lock()
            .unwrap()
            .members
            .values()
            .filter(|m| m.room_id == room_id)
            .cloned()
            .collect()
    }

    /// Number of members with media sessions (for health and tests).
    pub fn member_count(&self) -> usize {
        self.state.lock().unwrap().members.len()
    }

    /// Data-channel messages a lagging subscriber missed (for health and tests).
    pub fn data_messages_dropped(&self) -> u64 {
        self.data_messages_dropped.load(Ordering::Relaxed)
    }

    /// Enters SFU mode (event `call` to `sfu`, or the first publisher offer): creates the
    /// subscriber connection and subscribes to everything already in the room.
    pub async fn join(
        self: &Arc<Self>,
        user_id: &str,
        room_id: &str,
        session: &str,
    ) -> Result<Arc<Member>, SfuError> {
        if let Some(m) = self.member(user_id, session) {
            return Ok(m);
        }
        let one_join_at_a_time = self.joins.lock().await;
        if let Some(m) = self.member(user_id, session) {
            return Ok(m);
        }
        // Checked under the lock: a request of a connection replaced meanwhile must not evict
        // the newer connection's session below.
        if !(self.is_current)(user_id, session) {
            return Err(SfuError::NoConnection(PcKind::Subscriber));
        }
        let previous = self.state.lock().unwrap().members.get(user_id).cloned();
        if let Some(previous) = previous {
            self.leave(user_id, &previous.session).await;
        }
        let (pc, peer_events) = self
            .factory
            .build()
            .await
            .map_err(|e| SfuError::Internal(e.to_string()))?;
        let member = Arc::new(Member::new(
            user_id,
            room_id,
            session,
            pc,
            self.events.clone(),
            self.factory.public_ip().map(str::to_owned),
        ));
        self.state
            .lock()
            .unwrap()
            .members
            .insert(user_id.to_owned(), member.clone());
        info!(user = %user_id, room = %room_id, "media session started");
        tokio::spawn(member.clone().negotiate_loop());
        tokio::spawn(self.clone().watch(
            member.clone(),
            member.subscriber.clone(),
            PcKind::Subscriber,
            peer_events,
        ));
        // The member exists now: a second request of this session finds it. Subscribing to the
        // room's tracks needs no server-wide lock (add_down is per member and dedupes), so other
        // joins need not wait for it.
        drop(one_join_at_a_time);

        let (tracks, channels) = {
            let s = self.state.lock().unwrap();
            let tracks: Vec<_> = s
                .tracks
                .iter()
                .filter(|t| t.room_id == room_id)
                .cloned()
                .collect();
            let channels: Vec<_> = s
                .channels
                .iter()
                .filter(|c| {
                    s.members
                        .get(&c.owner)
                        .is_some_and(|o| o.room_id == room_id)
                })
                .cloned()
                .collect();
            (tracks, channels)
        };
        for t in tracks {
            if member.wants(&t.owner, &t.track_id) {
                self.add_down(&member, &t).await;
            }
        }
        for c in channels {
            if c.owner != member.user_id {
                self.add_channel_copy(&member, &c).await;
            }
        }
        Ok(member)
    }

    /// The member's publisher connection, created on first use (an offer, or a candidate that
    /// overtook its offer: socket.io runs each event's handler concurrently).
    async fn publisher_leg(self: &Arc<Self>, member: &Arc<Member>) -> Result<Arc<Leg>, SfuError> {
        let mut publisher = member.publisher.lock().await;
        if let Some(leg) = &*publisher {
            return Ok(leg.clone());
        }
        if member.closed.load(Ordering::SeqCst) {
            // The session ended while this request waited: create nothing it would leak.
            return Err(SfuError::NoConnection(PcKind::Publisher));
        }
        let (pc, peer_events) = self
            .factory
            .build()
            .await
            .map_err(|e| SfuError::Internal(e.to_string()))?;
        let leg = Arc::new(Leg::new(pc));
        tokio::spawn(self.clone().watch(
            member.clone(),
            leg.clone(),
            PcKind::Publisher,
            peer_events,
        ));
        *publisher = Some(leg.clone());
        Ok(leg)
    }

    /// A publisher offer: applies it and answers (on the publisher connection).
    pub async fn offer(
        self: &Arc<Self>,
        user_id: &str,
        room_id: &str,
        session: &str,
        sdp: String,
    ) -> Result<(), SfuError> {
        let member = self.join(user_id, room_id, session).await?;
        let leg = self.publisher_leg(&member).await?;
        let _one_offer_at_a_time = leg.offers.lock().await;
        member.publisher_offer(&leg, sdp.clone()).await?;
        *member.publisher_sdp.lock().unwrap() = sdp.clone();
        // A track the offer no longer sends is unpublished (webrtc never ends it by itself).
        let sending = session::sdp::sending_track_ids(&sdp);
        let gone: Vec<Arc<Published>> = self
            .state
            .lock()
            .unwrap()
            .tracks
            .iter()
            .filter(|t| t.owner == user_id && !sending.contains(&t.track_id))
            .cloned()
            .collect();
        for t in gone {
            self.unpublish(&t).await;
        }
        Ok(())
    }

    /// The client's answer to a subscriber offer.
    pub async fn answer(&self, user_id: &str, session: &str, sdp: String) -> Result<(), SfuError> {
        let member = self.session_member(user_id, session, PcKind::Subscriber)?;
        member.subscriber_answer(sdp).await
    }

    pub async fn candidate(
        self: &Arc<Self>,
        user_id: &str,
        room_id: &str,
        session: &str,
        pc: PcKind,
        candidate: Option<IceCandidate>,
    ) -> Result<(), SfuError> {
        let leg = match pc {
            PcKind::Subscriber => {
                let member = self.session_member(user_id, session, pc)?;
                member.subscriber.clone()
            }
            PcKind::Publisher => {
                let member = self.join(user_id, room_id, session).await?;
                self.publisher_leg(&member).await?
            }
        };
        Member::remote_candidate(&leg, candidate).await
    }

    /// The tracks published in a room.
    pub fn tracks(&self, room_id: &str) -> Vec<TrackInfo> {
        self.state
            .lock()
            .unwrap()
            .tracks
            .iter()
            .filter(|t| t.room_id == room_id)
            .map(|t| t.info())
            .collect()
    }

    /// The member's media session, or the error for a request on a connection it lacks.
    fn session_member(
        &self,
        user_id: &str,
        session: &str,
        pc: PcKind,
    ) -> Result<Arc<Member>, SfuError> {
        self.member(user_id, session)
            .ok_or(SfuError::NoConnection(pc))
    }

    /// A track published in the room, or the 404 error.
    fn published(&self, room_id: &str, track_id: &str) -> Result<Arc<Published>, SfuError> {
        self.find_track(room_id, track_id)
            .ok_or_else(|| SfuError::UnknownTrack(track_id.to_owned()))
    }

    fn find_track(&self, room_id: &str, track_id: &str) -> Option<Arc<Published>> {
        self.state
            .lock()
            .unwrap()
            .tracks
            .iter()
            .find(|t| t.room_id == room_id && t.track_id == track_id)
            .cloned()
    }

    /// Selective subscription (`subscribe`): adds or removes tracks on the subscriber connection.
    pub async fn subscribe(
        self: &Arc<Self>,
        user_id: &str,
        session: &str,
        track_ids: &[String],
        on: bool,
    ) -> Result<(), SfuError> {
        let member = self.session_member(user_id, session, PcKind::Subscriber)?;
        for id in track_ids {
            debug!(user = %user_id, track = %id, on, "subscribe");
            let t = self.published(&member.room_id, id)?;
            let key = (t.owner.clone(), t.track_id.clone());
            if on {
                member.unsubscribed.lock().unwrap().remove(&key);
                if member.wants(&t.owner, &t.track_id) {
                    self.add_down(&member, &t).await; // a no-op if it is already there
                }
            } else {
                member.unsubscribed.lock().unwrap().insert(key);
                Self::remove_down(&member, &t.owner, &t.track_id).await;
            }
        }
        Ok(())
    }

    pub async fn set_quality(
        &self,
        user_id: &str,
        session: &str,
        track_id: &str,
        quality: Quality,
    ) -> Result<(), SfuError> {
        let member = self.session_member(user_id, session, PcKind::Subscriber)?;
        let t = self.published(&member.room_id, track_id)?;
        // Serialized with add_down, which reads the choice before its down-track is listed.
        let _ops = member.track_ops.lock().await;
        member
            .quality
            .lock()
            .unwrap()
            .insert((t.owner.clone(), t.track_id.clone()), quality);
        let down = member
            .downs
            .lock()
            .unwrap()
            .iter()
            .find(|d| d.owner == t.owner && d.track_id == t.track_id)
            .map(|d| d.down_id);
        if let Some(id) = down {
            let _ = t.commands.send(TrackCommand::SetQuality(id, quality));
        }
        Ok(())
    }

    /// Publisher mute: stops forwarding the member's own track, announced as `trackMuted`.
    pub fn mute(
        &self,
        user_id: &str,
        room_id: &str,
        track_id: &str,
        muted: bool,
    ) -> Result<(), SfuError> {
        let t = self.published(room_id, track_id)?;
        if t.owner != user_id {
            return Err(SfuError::NotYourTrack(track_id.to_owned()));
        }
        t.muted.store(muted, Ordering::Relaxed);
        let _ = t.commands.send(TrackCommand::Mute(muted));
        let _ = self.events.send(SfuEvent::TrackMuted {
            room_id: t.room_id.clone(),
            track: t.info(),
        });
        Ok(())
    }

    /// Ends a member's media session: both connections, its tracks and channels everywhere.
    /// Whether there was one to end.
    pub async fn leave(&self, user_id: &str, session: &str) -> bool {
        let member = {
            let mut s = self.state.lock().unwrap();
            match s.members.get(user_id) {
                Some(m) if m.session == session => s.members.remove(user_id),
                _ => None,
            }
        };
        let Some(member) = member else { return false };
        member.close().await;
        // Wait for an add_down or channel copy in progress (they hold `track_ops`); later ones
        // see the member closed. So nothing is added after the clean-up below. (This member is
        // no longer in `members`, so nothing below takes its `track_ops` again.)
        let _ops = member.track_ops.lock().await;
        let (tracks, channels) = {
            let mut s = self.state.lock().unwrap();
            let tracks: Vec<_> = s
                .tracks
                .iter()
                .filter(|t| t.owner == user_id)
                .cloned()
                .collect();
            s.channels.retain(|c| c.owner != user_id);
            (tracks, s.channels.clone())
        };
        for t in tracks {
            self.unpublish(&t).await;
        }
        for c in channels {
            c.remove_copies_of(&member.session).await;
        }
        let downs: Vec<DownEntry> = std::mem::take(&mut *member.downs.lock().unwrap());
        for d in downs {
            d.keyframe_relay.abort();
            let _ = d.commands.send(TrackCommand::RemoveDown(d.down_id));
        }
        info!(user = %user_id, "media session ended");
        true
    }

    /// Closes every media session (graceful shutdown).
    pub async fn shutdown(&self) {
        let members: Vec<(String, String)> = self
            .state
            .lock()
            .unwrap()
            .members
            .values()
            .map(|m| (m.user_id.clone(), m.session.clone()))
            .collect();
        for (user, session) in members {
            self.leave(&user, &session).await;
        }
    }

    fn is_published(&self, t: &Arc<Published>) -> bool {
        let s = self.state.lock().unwrap();
        s.tracks.iter().any(|x| Arc::ptr_eq(x, t))
    }

    async fn unpublish(&self, t: &Arc<Published>) {
        let removed = {
            let mut s = self.state.lock().unwrap();
            let before = s.tracks.len();
            s.tracks.retain(|x| !Arc::ptr_eq(x, t));
            before != s.tracks.len()
        };
        if !removed {
            return;
        }
        for m in self.room_members(&t.room_id) {
            Self::remove_down(&m, &t.owner, &t.track_id).await;
        }
        info!(user = %t.owner, track = %t.track_id, "track unpublished");
        let _ = self.events.send(SfuEvent::TrackUnpublished {
            room_id: t.room_id.clone(),
            track: t.info(),
        });
    }

    /// Reports of one of a member's connections.
    async fn watch(
        self: Arc<Self>,
        member: Arc<Member>,
        leg: Arc<Leg>,
        kind: PcKind,
        mut events: mpsc::UnboundedReceiver<PeerEvent>,
    ) {
        loop {
            let event = tokio::select! {
                _ = member.ended.cancelled() => return,
                event = events.recv() => event,
            };
            let Some(event) = event else { return };
            match event {
                PeerEvent::Candidate(c) => member.local_candidate(&leg, kind, Some(c)),
                PeerEvent::GatheringComplete => member.local_candidate(&leg, kind, None),
                PeerEvent::State(RTCPeerConnectionState::Failed) => {
                    warn!(user = %member.user_id, pc = ?kind, "connection failed; ending the media session");
                    let sfu = self.clone();
                    let (user, session) = (member.user_id.clone(), member.session.clone());
                    tokio::spawn(async move {
                        if sfu.leave(&user, &session).await {
                            // Tell the client, which can then offer again.
                            let _ = sfu.events.send(SfuEvent::MediaEnded {
                                user_id: user,
                                session,
                                reason: "connection failed",
                            });
                        }
                    });
                }
                PeerEvent::State(state) => {
                    debug!(user = %member.user_id, pc = ?kind, %state, "connection state")
                }
                PeerEvent::Track(remote) if kind == PcKind::Publisher => {
                    let sfu = self.clone();
                    let member = member.clone();
                    tokio::spawn(async move { sfu.on_track(&member, remote).await });
                }
                PeerEvent::DataChannel(channel) if kind == PcKind::Publisher => {
                    let sfu = self.clone();
                    let member = member.clone();
                    tokio::spawn(async move { sfu.on_channel(&member, channel).await });
                }
                // Media or a channel sent on the subscriber connection is not relayed, only
                // read and discarded (see `discard`).
                PeerEvent::Track(remote) => {
                    debug!(user = %member.user_id, "ignoring a track sent on the subscriber connection");
                    discard(remote);
                }
                PeerEvent::DataChannel(channel) => {
                    debug!(user = %member.user_id, "ignoring a channel opened on the subscriber connection");
                    tokio::spawn(async move { while channel.poll().await.is_some() {} });
                }
            }
        }
    }

    async fn on_track(self: &Arc<Self>, member: &Arc<Member>, remote: Arc<dyn TrackRemote>) {
        let track_id = remote.track_id().await;
        let kind = match remote.kind().await {
            RtpCodecKind::Audio => MediaKind::Audio,
            _ => MediaKind::Video,
        };
        let first_ssrc = remote.ssrcs().await.first().copied();
        let codec = match first_ssrc {
            Some(ssrc) => remote.codec(ssrc).await,
            None => None,
        };
        let Some((codec, forward_codec)) =
            codec.and_then(|c| Codec::from_mime(&c.mime_type).map(|f| (c, f)))
        else {
            warn!(user = %member.user_id, track = %track_id, "unsupported codec: track not forwarded");
            discard(remote);
            return;
        };
        let existing = self
            .find_track(&member.room_id, &track_id)
            .filter(|t| t.owner == member.user_id);
        if let Some(t) = existing {
            let _ = t.commands.send(TrackCommand::Source(remote));
            return;
        }
        let offer = member.publisher_sdp.lock().unwrap().clone();
        let ext_ids = session::sdp::extension_ids(&offer, &track_id)
            .into_iter()
            .filter(|(uri, _)| FORWARDED_EXTENSIONS.contains(&uri.as_str()))
            .collect();
        let (commands, rx) = mpsc::unbounded_channel();
        let simulcast = session::sdp::simulcast_rids(&offer, &track_id);
        let published = Arc::new(Published {
            owner: member.user_id.clone(),
            room_id: member.room_id.clone(),
            track_id: track_id.clone(),
            kind,
            codec,
            simulcast: simulcast.clone(),
            muted: AtomicBool::new(false),
            ext_ids,
            commands,
        });
        let taken = {
            let mut s = self.state.lock().unwrap();
            let live = s
                .members
                .get(&member.user_id)
                .is_some_and(|m| Arc::ptr_eq(m, member));
            if !live {
                return; // the session ended meanwhile; its connections are closing
            }
            // Subscribers tell tracks apart by id (webrtc even routes a sent track's RTCP by
            // it), so an id another member of the room publishes is refused. Checked and
            // claimed under one lock, so two members cannot both claim it.
            let taken = s.tracks.iter().any(|t| {
                t.room_id == member.room_id && t.track_id == track_id && t.owner != member.user_id
            });
            if !taken {
                s.tracks.push(published.clone());
            }
            taken
        };
        if taken {
            warn!(user = %member.user_id, track = %track_id, "track id in use in the room: not forwarded");
            let _ = self.events.send(SfuEvent::TrackRefused {
                user_id: member.user_id.clone(),
                session: member.session.clone(),
                error: SfuError::TrackIdInUse(track_id),
            });
            discard(remote);
            return;
        }
        tokio::spawn(track_task::run(
            track_id.clone(),
            forward_codec,
            simulcast,
            remote,
            rx,
        ));
        info!(user = %member.user_id, track = %track_id, ?kind, "track published");
        let _ = self.events.send(SfuEvent::TrackPublished {
            room_id: member.room_id.clone(),
            track: published.info(),
        });
        for m in self.room_members(&member.room_id) {
            if m.wants(&published.owner, &published.track_id) {
                self.add_down(&m, &published).await;
            }
        }
    }

    /// Adds a published track to a member's subscriber connection and asks for renegotiation.
    async fn add_down(&self, member: &Arc<Member>, t: &Arc<Published>) {
        debug!(user = %member.user_id, track = %t.track_id, "adding a down-track");
        let ops = member.track_ops.lock().await;
        // Checked under `track_ops`: an unpublish that has already removed the track waits for
        // this lock before removing down-tracks, so a copy added after it would be orphaned.
        if member.closed.load(Ordering::SeqCst)
            || member.has_down(&t.owner, &t.track_id)
            || !self.is_published(t)
        {
            return;
        }
        let ssrc = random_ssrc();
        let kind = match t.kind {
            MediaKind::Audio => RtpCodecKind::Audio,
            MediaKind::Video => RtpCodecKind::Video,
        };
        // msid "<publisher userId> <publisher track id>": the browser's stream id is the publisher.
        let local = Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
            t.owner.clone(),
            t.track_id.clone(),
            t.track_id.clone(),
            kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    ..Default::default()
                },
                codec: t.codec.clone(),
                ..Default::default()
            }],
        )));
        let sender = match member
            .subscriber
            .pc
            .add_track(local.clone() as Arc<dyn TrackLocal>)
            .await
        {
            Ok(s) => s,
            Err(e) => {
                warn!(user = %member.user_id, track = %t.track_id, "add_track failed: {e}");
                return;
            }
        };
        let down_id = self.next_id.fetch_add(1, Ordering::Relaxed);
        debug!(user = %member.user_id, owner = %t.owner, track = %t.track_id, down_id, "down-track added");
        let quality = member
            .quality
            .lock()
            .unwrap()
            .get(&(t.owner.clone(), t.track_id.clone()))
            .copied()
            .unwrap_or_default();
        let config = DownTrackConfig {
            id: down_id,
            ssrc,
            payload_type: None,
            ext_map: Default::default(),
            quality,
        };
        let _ = t.commands.send(TrackCommand::AddDown {
            config: config.clone(),
            sink: local.clone(),
        });
        let keyframe_relay = tokio::spawn(relay_keyframe_requests(
            local.clone(),
            t.commands.clone(),
            down_id,
        ))
        .abort_handle();
        member.downs.lock().unwrap().push(DownEntry {
            owner: t.owner.clone(),
            track_id: t.track_id.clone(),
            down_id,
            config,
            sender,
            local,
            commands: t.commands.clone(),
            mime: t.codec.mime_type.clone(),
            publisher_ext_ids: t.ext_ids.clone(),
            keyframe_relay,
        });
        drop(ops);
        member.renegotiate();
    }

    async fn remove_down(member: &Arc<Member>, owner: &str, track_id: &str) {
        let ops = member.track_ops.lock().await;
        let entry = {
            let mut downs = member.downs.lock().unwrap();
            downs
                .iter()
                .position(|d| d.owner == owner && d.track_id == track_id)
                .map(|i| downs.swap_remove(i))
        };
        let Some(entry) = entry else { return };
        let _ = entry.commands.send(TrackCommand::RemoveDown(entry.down_id));
        // Its poll holds the track's event lock, which remove_track needs to unbind the track.
        entry.keyframe_relay.abort();
        debug!(user = %member.user_id, track = %track_id, "removing a down-track");
        if !member.closed.load(Ordering::SeqCst) {
            if let Err(e) = member.subscriber.pc.remove_track(&entry.sender).await {
                debug!(user = %member.user_id, "remove_track: {e}");
            }
            drop(ops);
            member.renegotiate();
        }
    }

    async fn on_channel(self: &Arc<Self>, member: &Arc<Member>, channel: Arc<dyn DataChannel>) {
        let source = Arc::new(ChannelSource::new(&member.user_id, &channel).await);
        info!(user = %member.user_id, label = %source.label, "data channel published");
        self.state.lock().unwrap().channels.push(source.clone());
        for m in self.room_members(&member.room_id) {
            if m.user_id != member.user_id {
                self.add_channel_copy(&m, &source).await;
            }
        }
        source
            .clone()
            .relay(channel, &self.data_messages_dropped)
            .await;
        self.state
            .lock()
            .unwrap()
            .channels
            .retain(|c| !Arc::ptr_eq(c, &source));
    }

    async fn add_channel_copy(&self, member: &Arc<Member>, source: &Arc<ChannelSource>) {
        let ops = member.track_ops.lock().await;
        if member.closed.load(Ordering::SeqCst) || source.has_copy_for(&member.session) {
            return;
        }
        match member
            .subscriber
            .pc
            .create_data_channel(&source.label, Some(source.init.clone()))
            .await
        {
            Ok(copy) => {
                if !source.add_copy(&member.session, copy.clone()) {
                    let _ = copy.close().await; // its source closed meanwhile
                    return;
                }
            }
            Err(e) => {
                warn!(user = %member.user_id, label = %source.label, "cannot create the relayed channel: {e}");
                return;
            }
        }
        drop(ops);
        // The first channel adds the data section to the subscriber connection.
        if !member.has_channels.swap(true, Ordering::SeqCst) {
            member.renegotiate();
        }
    }
}

/// Reads a track that is not forwarded until it ends: unread, webrtc logs every packet its full
/// queue drops.
fn discard(remote: Arc<dyn TrackRemote>) {
    tokio::spawn(async move { while remote.poll().await.is_some() {} });
}

/// A subscriber's PLI/FIR on its copy of a track becomes a keyframe request to the publisher.
async fn relay_keyframe_requests(
    local: Arc<TrackLocalStaticRTP>,
    commands: mpsc::UnboundedSender<TrackCommand>,
    down_id: u64,
) {
    while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = local.poll().await {
        let asks = packets.iter().any(|p| is_keyframe_request(p.as_ref()));
        if asks
            && commands
                .send(TrackCommand::KeyframeRequest(down_id))
                .is_err()
        {
            return;
        }
    }
}
