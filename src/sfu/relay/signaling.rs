//! What the edge asks of a loop (PROTOCOL.md Part 2): media sessions, offers and answers,
//! candidates, subscriptions, quality, mute, leaving; and what the loop tells it back.

use std::time::Instant;

use rtc::peer_connection::sdp::RTCSessionDescription;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::sansio::Protocol;
use tokio::sync::oneshot;
use tracing::{debug, info, warn};

use super::{MediaState, Member};
use crate::auth::Grants;

use crate::sfu::api::{IceCandidate, PcKind, SfuError, SfuEvent, TrackInfo};
use crate::sfu::forward::Quality;
use crate::sfu::io::router::ConnRef;
use crate::sfu::peer::{ConnKey, Connection, ice_credentials, sdp};

pub type Reply<T> = oneshot::Sender<Result<T, SfuError>>;

/// A request from the edge to the loop that holds the member's room.
pub enum Command {
    Join {
        user: String,
        room: String,
        session: String,
        grants: Grants,
        reply: Reply<()>,
    },
    Offer {
        user: String,
        session: String,
        sdp: String,
        reply: Reply<()>,
    },
    Answer {
        user: String,
        session: String,
        sdp: String,
        reply: Reply<()>,
    },
    Candidate {
        user: String,
        session: String,
        pc: PcKind,
        candidate: Option<IceCandidate>,
        reply: Reply<()>,
    },
    Subscribe {
        user: String,
        session: String,
        track_ids: Vec<String>,
        on: bool,
        reply: Reply<()>,
    },
    SetQuality {
        user: String,
        session: String,
        track_id: String,
        quality: Quality,
        reply: Reply<()>,
    },
    Mute {
        user: String,
        room: String,
        track_id: String,
        muted: bool,
        reply: Reply<()>,
    },
    Leave {
        user: String,
        session: String,
        reply: oneshot::Sender<bool>,
    },
    Tracks {
        room: String,
        reply: oneshot::Sender<Vec<TrackInfo>>,
    },
    /// Starts or stops recording the room's tracks (or one participant's) that are published
    /// now; replies with the tracks recorded afterwards.
    Record {
        room: String,
        user: Option<String>,
        start: bool,
        reply: oneshot::Sender<Vec<TrackInfo>>,
    },
    /// Starts (to `host`, ports from the given one up) or stops (`None`) RTP egress.
    RtpOut {
        room: String,
        user: Option<String>,
        to: Option<(std::net::IpAddr, u16)>,
        reply: oneshot::Sender<Vec<crate::record::rtp_out::OutTrack>>,
    },
    /// What another node announced about a room held here (or about itself).
    Cluster(super::ClusterCommand),
}

fn bad_sdp(e: impl ToString) -> SfuError {
    SfuError::BadSdp(e.to_string())
}

fn internal(e: impl ToString) -> SfuError {
    SfuError::Internal(e.to_string())
}

impl MediaState {
    pub fn handle_command(&mut self, command: Command, now: Instant) {
        match command {
            Command::Join {
                user,
                room,
                session,
                grants,
                reply,
            } => {
                let joined = self.join(&user, &room, &session, grants, now);
                if joined.is_err() {
                    // Not left to the requester, which may have gone meanwhile.
                    self.shared.directory().remove(&user, &session);
                }
                let _ = reply.send(joined);
            }
            Command::Offer {
                user,
                session,
                sdp,
                reply,
            } => {
                let _ = reply.send(self.publisher_offer(&user, &session, sdp, now));
            }
            Command::Answer {
                user,
                session,
                sdp,
                reply,
            } => {
                let _ = reply.send(self.subscriber_answer(&user, &session, sdp, now));
            }
            Command::Candidate {
                user,
                session,
                pc,
                candidate,
                reply,
            } => {
                let _ = reply.send(self.remote_candidate(&user, &session, pc, candidate, now));
            }
            Command::Subscribe {
                user,
                session,
                track_ids,
                on,
                reply,
            } => {
                let _ = reply.send(self.subscribe(&user, &session, &track_ids, on, now));
            }
            Command::SetQuality {
                user,
                session,
                track_id,
                quality,
                reply,
            } => {
                let _ = reply.send(self.set_quality(&user, &session, &track_id, quality));
            }
            Command::Mute {
                user,
                room,
                track_id,
                muted,
                reply,
            } => {
                let _ = reply.send(self.mute(&user, &room, &track_id, muted));
            }
            Command::Leave {
                user,
                session,
                reply,
            } => {
                let _ = reply.send(self.end_member(&user, &session, now));
            }
            Command::Tracks { room, reply } => {
                let _ = reply.send(self.tracks_of(&room));
            }
            Command::Record {
                room,
                user,
                start,
                reply,
            } => {
                let _ = reply.send(self.record(&room, user.as_deref(), start));
            }
            Command::RtpOut {
                room,
                user,
                to,
                reply,
            } => {
                let _ = reply.send(self.rtp_out(&room, user.as_deref(), to));
            }
            Command::Cluster(command) => self.handle_cluster(command, now),
        }
    }

    /// The member's session, or the error for a request on a connection it lacks.
    fn session_member(
        &mut self,
        user: &str,
        session: &str,
        pc: PcKind,
    ) -> Result<&mut Member, SfuError> {
        self.members
            .get_mut(user)
            .filter(|m| m.session == session)
            .ok_or(SfuError::NoConnection(pc))
    }

    /// Enters SFU mode: the subscriber connection, and everything already in the room.
    fn join(
        &mut self,
        user: &str,
        room: &str,
        session: &str,
        grants: Grants,
        now: Instant,
    ) -> Result<(), SfuError> {
        if let Some(m) = self.members.get(user) {
            if m.session == session {
                return Ok(());
            }
            let old = m.session.clone();
            self.end_member(user, &old, now);
        }
        let subscriber = self.new_connection(user, PcKind::Subscriber, now)?;
        self.members.insert(
            user.to_owned(),
            Member {
                user: user.to_owned(),
                room: room.to_owned(),
                session: session.to_owned(),
                publisher: None,
                subscriber,
                downs: Vec::new(),
                unsubscribed: Default::default(),
                quality: Default::default(),
                publisher_sdp: String::new(),
                negotiation: Default::default(),
                has_channels: false,
                grants,
            },
        );
        let r = self.rooms.entry(room.to_owned()).or_default();
        r.members.push(user.to_owned());
        let (tracks, channels) = (r.tracks.clone(), r.channels.clone());
        let recorded = (r.recorded_tracks > 0).then(|| r.recorded_user.clone());
        if let Some(recorded_user) = recorded {
            self.emit(SfuEvent::RecordingOngoing {
                user_id: user.to_owned(),
                session: session.to_owned(),
                room_id: room.to_owned(),
                recorded_user,
            });
        }
        info!(%user, %room, "media session started");
        for t in tracks {
            self.add_down(user, t, now);
        }
        for c in channels {
            self.add_copy(user, c, now);
        }
        Ok(())
    }

    /// A new connection of `user`, reachable through the media port by its ufrag.
    fn new_connection(
        &mut self,
        user: &str,
        kind: PcKind,
        now: Instant,
    ) -> Result<ConnKey, SfuError> {
        let (ufrag, pwd) = ice_credentials();
        let mut pc = self
            .settings
            .build(kind, &ufrag, &pwd, now)
            .map_err(internal)?;
        pc.add_local_candidate(RTCIceCandidateInit {
            candidate: self.settings.candidate(),
            ..Default::default()
        })
        .map_err(internal)?;
        self.next_conn_id += 1;
        let id = self.next_conn_id;
        let key = self
            .conns
            .insert(Connection::new(id, pc, kind, user, ufrag.clone()));
        let conn = ConnRef {
            loop_index: self.routes.loop_index(),
            key,
            id,
        };
        self.routes.router().register(&ufrag, conn);
        debug!(%user, pc = ?kind, key, "connection created");
        Ok(key)
    }

    /// The member's publisher connection, created on first use (an offer, or a candidate that
    /// overtook its offer: socket.io runs each event's handler concurrently).
    fn publisher_conn(
        &mut self,
        user: &str,
        session: &str,
        now: Instant,
    ) -> Result<ConnKey, SfuError> {
        if let Some(key) = self
            .session_member(user, session, PcKind::Publisher)?
            .publisher
        {
            return Ok(key);
        }
        let key = self.new_connection(user, PcKind::Publisher, now)?;
        self.session_member(user, session, PcKind::Publisher)?
            .publisher = Some(key);
        Ok(key)
    }

    /// The client's publisher offer: applied and answered. An offer that fails part-way is
    /// rolled back (rtc has already entered have-remote-offer then), so the next is not refused.
    fn publisher_offer(
        &mut self,
        user: &str,
        session: &str,
        offer: String,
        now: Instant,
    ) -> Result<(), SfuError> {
        let grants = self
            .session_member(user, session, PcKind::Publisher)?
            .grants;
        if !grants.publish && sdp::sends_media(&offer) {
            return Err(SfuError::NotGranted("publish"));
        }
        if !grants.publish_data && sdp::has_data_section(&offer) {
            return Err(SfuError::NotGranted("publishData"));
        }
        let key = self.publisher_conn(user, session, now)?;
        let result = self.answer_offer(key, offer.clone(), now);
        if result.is_err() {
            let conn = &mut self.conns[key];
            if conn.pc.pending_remote_description().is_some()
                && let Ok(rollback) = RTCSessionDescription::rollback(None)
            {
                match conn.pc.set_remote_description(now, rollback) {
                    Err(e) => warn!(%user, "cannot roll back a failed offer: {e}"),
                    Ok(()) if conn.pc.current_remote_description().is_none() => {
                        conn.remote_description_cleared();
                    }
                    Ok(()) => {}
                }
            }
        }
        self.service(key, now);
        result?;
        self.send_candidates(key);
        // A track the offer no longer sends is unpublished (rtc never ends it by itself).
        let sending = sdp::sending_track_ids(&offer, user);
        if let Some(m) = self.members.get_mut(user) {
            m.publisher_sdp = offer;
        }
        let gone: Vec<usize> = self
            .tracks
            .iter()
            .filter(|(_, t)| t.owner == user && !sending.contains(&t.track_id))
            .map(|(k, _)| k)
            .collect();
        for t in gone {
            self.unpublish(t, now);
        }
        Ok(())
    }

    fn answer_offer(&mut self, key: ConnKey, offer: String, now: Instant) -> Result<(), SfuError> {
        let conn = &mut self.conns[key];
        let offer = RTCSessionDescription::offer(offer).map_err(bad_sdp)?;
        conn.pc
            .set_remote_description(now, offer)
            .map_err(bad_sdp)?;
        conn.remote_description_set();
        let answer = conn.pc.create_answer(None).map_err(internal)?;
        conn.pc
            .set_local_description(now, answer)
            .map_err(internal)?;
        let sdp = conn
            .pc
            .local_description()
            .ok_or_else(|| internal("no local description"))?
            .sdp;
        self.emit_sdp(key, "answer", sdp);
        Ok(())
    }

    fn emit_sdp(&self, key: ConnKey, sdp_type: &'static str, sdp: String) {
        let conn = &self.conns[key];
        let Some(m) = self.members.get(&conn.user) else {
            return;
        };
        self.emit(SfuEvent::Sdp {
            user_id: m.user.clone(),
            session: m.session.clone(),
            pc: conn.kind,
            sdp_type,
            sdp,
        });
    }

    /// The server's one candidate for a connection (and the end of candidates), once the
    /// description it belongs to is out: publisher after the answer, subscriber once its answer
    /// is applied (a browser checks as soon as it has a candidate, and checks that arrive before
    /// the server knows the browser's credentials are dropped).
    fn send_candidates(&mut self, key: ConnKey) {
        let candidate = self.settings.candidate();
        // The connection may have closed while its description was applied.
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        if conn.candidates_sent {
            return;
        }
        conn.candidates_sent = true;
        let mid = conn
            .pc
            .local_description()
            .and_then(|d| sdp::first_mid(&d.sdp))
            .unwrap_or_else(|| "0".to_owned());
        let (kind, user) = (conn.kind, conn.user.clone());
        let Some(m) = self.members.get(&user) else {
            return;
        };
        for c in [
            Some(IceCandidate {
                candidate,
                sdp_mid: Some(mid),
                sdp_mline_index: Some(0),
                username_fragment: None,
            }),
            None,
        ] {
            self.emit(SfuEvent::Candidate {
                user_id: m.user.clone(),
                session: m.session.clone(),
                pc: kind,
                candidate: c,
            });
        }
    }

    /// Offers the subscriber connection again (its tracks or channels changed).
    pub(super) fn offer_subscriber(&mut self, user: &str, now: Instant) {
        let Some(m) = self.members.get(user) else {
            return;
        };
        let key = m.subscriber;
        let conn = &mut self.conns[key];
        let offered = conn
            .pc
            .create_offer(None)
            .and_then(|offer| conn.pc.set_local_description(now, offer))
            .map_err(internal)
            .and_then(|()| {
                conn.pc
                    .local_description()
                    .ok_or_else(|| internal("no local description"))
            });
        let m = self.members.get_mut(user).expect("looked up above");
        match offered {
            Ok(description) => {
                m.negotiation.offered(now);
                debug!(%user, "subscriber offer");
                // Its candidates go out once the answer is applied (see send_candidates).
                self.emit_sdp(key, "offer", sdp::without_candidates(&description.sdp));
            }
            Err(e) => {
                warn!(%user, "subscriber offer failed: {e}");
                m.negotiation.offer_failed(now);
            }
        }
        self.service(key, now);
    }

    /// The client's answer to the subscriber offer; each down-track learns its payload type and
    /// extension ids from what was negotiated.
    fn subscriber_answer(
        &mut self,
        user: &str,
        session: &str,
        answer: String,
        now: Instant,
    ) -> Result<(), SfuError> {
        let key = self
            .session_member(user, session, PcKind::Subscriber)?
            .subscriber;
        let answer = RTCSessionDescription::answer(answer).map_err(bad_sdp)?;
        let conn = &mut self.conns[key];
        let had_offer = conn.pc.pending_local_description().is_some();
        if let Err(e) = conn.pc.set_remote_description(now, answer) {
            let settled = had_offer && conn.pc.pending_local_description().is_none();
            let m = self.members.get_mut(user).expect("checked above");
            if settled {
                // rtc took the answer as far as `stable` before failing: this offer is done but
                // its down-tracks are not configured, so offer again (a few times: a client whose
                // answers always fail must not loop forever).
                m.negotiation.answered();
                m.negotiation.failed_answers += 1;
                if m.negotiation.failed_answers <= super::negotiation::OFFER_RETRIES {
                    self.renegotiate(user, now);
                }
            }
            return Err(bad_sdp(e));
        }
        conn.remote_description_set();
        let m = self.members.get_mut(user).expect("checked above");
        m.negotiation.failed_answers = 0;
        m.negotiation.answered();
        self.send_candidates(key);
        self.configure_downs(user);
        debug!(%user, "subscriber answer applied");
        self.service(key, now);
        Ok(())
    }

    fn remote_candidate(
        &mut self,
        user: &str,
        session: &str,
        pc: PcKind,
        candidate: Option<IceCandidate>,
        now: Instant,
    ) -> Result<(), SfuError> {
        let key = match pc {
            PcKind::Subscriber => self.session_member(user, session, pc)?.subscriber,
            PcKind::Publisher => self.publisher_conn(user, session, now)?,
        };
        let Some(candidate) = candidate else {
            return Ok(()); // end of candidates: nothing to do
        };
        self.conns[key].add_remote_candidate(candidate)?;
        self.service(key, now);
        Ok(())
    }

    /// Selective subscription: adds or removes tracks on the subscriber connection.
    fn subscribe(
        &mut self,
        user: &str,
        session: &str,
        track_ids: &[String],
        on: bool,
        now: Instant,
    ) -> Result<(), SfuError> {
        let room = self
            .session_member(user, session, PcKind::Subscriber)?
            .room
            .clone();
        for id in track_ids {
            let t = self.find_track(&room, id)?;
            let owner = self.tracks[t].owner.clone();
            let m = self.members.get_mut(user).expect("checked above");
            let key = (owner, id.clone());
            debug!(%user, track = %id, on, "subscribe");
            if on {
                m.unsubscribed.remove(&key);
                self.add_down(user, t, now); // a no-op if it is there already
            } else {
                m.unsubscribed.insert(key);
                self.remove_down(user, t, now);
            }
        }
        Ok(())
    }

    fn set_quality(
        &mut self,
        user: &str,
        session: &str,
        track_id: &str,
        quality: Quality,
    ) -> Result<(), SfuError> {
        let room = self
            .session_member(user, session, PcKind::Subscriber)?
            .room
            .clone();
        let t = self.find_track(&room, track_id)?;
        let m = self.members.get_mut(user).expect("checked above");
        let track = &mut self.tracks[t];
        m.quality
            .insert((track.owner.clone(), track.track_id.clone()), quality);
        if let Some(d) = m.downs.iter().find(|d| d.track == t) {
            track.forwarder.set_quality(d.down_id, quality);
        }
        Ok(())
    }

    /// Publisher mute: stops forwarding the member's own track, announced as `trackMuted`.
    fn mute(
        &mut self,
        user: &str,
        room: &str,
        track_id: &str,
        muted: bool,
    ) -> Result<(), SfuError> {
        let t = self.find_track(room, track_id)?;
        let track = &mut self.tracks[t];
        if track.owner != user || !track.is_local() {
            return Err(SfuError::NotYourTrack(track_id.to_owned()));
        }
        track.muted = muted;
        track.forwarder.set_muted(muted);
        let info = track.info();
        self.announce_track_change(t, false);
        self.emit(SfuEvent::TrackMuted {
            room_id: room.to_owned(),
            track: info,
        });
        Ok(())
    }

    fn tracks_of(&self, room: &str) -> Vec<TrackInfo> {
        self.rooms
            .get(room)
            .map(|r| r.tracks.iter().map(|&t| self.tracks[t].info()).collect())
            .unwrap_or_default()
    }

    /// Ends a member's media session: both connections, its tracks and channels everywhere.
    /// Whether there was one to end.
    pub(super) fn end_member(&mut self, user: &str, session: &str, now: Instant) -> bool {
        if self.members.get(user).is_none_or(|m| m.session != session) {
            return false;
        }
        let room = self.members[user].room.clone();
        let (tracks, channels) = self
            .rooms
            .get(&room)
            .map(|r| (r.tracks.clone(), r.channels.clone()))
            .unwrap_or_default();
        for t in tracks {
            if self.tracks[t].owner == user && self.tracks[t].is_local() {
                self.unpublish(t, now);
            }
        }
        for c in channels {
            if self.channels[c].owner == user && self.channels[c].is_local() {
                self.remove_channel(c, now);
            } else {
                self.channels[c].copies.retain(|copy| copy.user != user);
            }
        }
        let member = self.members.remove(user).expect("checked above");
        for d in &member.downs {
            if let Some(t) = self.tracks.get_mut(d.track) {
                t.forwarder.remove_down_track(d.down_id);
            }
        }
        for key in [Some(member.subscriber), member.publisher]
            .into_iter()
            .flatten()
        {
            self.close_connection(key, now);
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            r.members.retain(|u| u != user);
            if r.members.is_empty()
                && let Some(r) = self.rooms.remove(&room)
            {
                self.room_closed_here(r);
            }
        }
        info!(%user, "media session ended");
        true
    }

    /// Closes a connection (its DTLS close and SCTP abort go out) and forgets it.
    fn close_connection(&mut self, key: ConnKey, now: Instant) {
        let Some(conn) = self.conns.get_mut(key) else {
            return;
        };
        let _ = conn.pc.close();
        self.collect_writes(key, now);
        let conn = self.conns.remove(key);
        let me = ConnRef {
            loop_index: self.routes.loop_index(),
            key,
            id: conn.id,
        };
        let addrs = self.routes.router().unregister(&conn.ufrag, me);
        self.routes.forget_conn(me);
        self.forgotten.extend(addrs);
        self.dirty.retain(|k| *k != key);
    }
}
