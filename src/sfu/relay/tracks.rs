//! Published tracks and their down-tracks: publishing on a publisher's first packets, the
//! per-packet fan-out through the forwarding core into the subscribers' egress, keyframe
//! requests and NACKs from subscribers, and unpublishing.

use std::sync::atomic::Ordering;
use std::time::{Instant, SystemTime};

use bytes::Bytes;
use rtc::media_stream::MediaStreamTrack;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::event::RTCTrackEventInit;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodingParameters, RTCRtpEncodingParameters, RTCRtpRtxParameters, RtpCodecKind,
};
use tracing::{debug, info, warn};

use super::{DownEntry, DownSink, MediaState, Origin, PublishedTrack, Relay};
use crate::record::TrackMeta;
use crate::record::rtp_out::{self, OutTrack};
use crate::sfu::api::{MediaKind, PcKind, SfuError, SfuEvent, TrackInfo};
use crate::sfu::egress::Route;
use crate::sfu::forward::{
    Codec, DownTrackConfig, DownTrackId, ExtMap, Quality, RtpHeader, RtpPacket, TrackForwarder,
    write_header,
};
use crate::sfu::peer::{ConnKey, FORWARDED_EXTENSIONS, sdp};

/// The recording's down-track on each track (subscribers' ids start at 1).
const RECORDING_DOWN_ID: DownTrackId = 0;
/// The send batch's destination key of plain RTP (it never shares a GSO run with another
/// address: the batch compares addresses too).
const PLAIN_RTP_KEY: u32 = u32::MAX;

impl PublishedTrack {
    pub fn info(&self) -> TrackInfo {
        TrackInfo {
            user_id: self.owner.clone(),
            track_id: self.track_id.clone(),
            kind: self.kind,
            simulcast: self.simulcast.clone(),
            muted: self.muted,
        }
    }
}

/// The mid of the transceiver a receiver belongs to.
fn receiver_mid(pc: &mut RTCPeerConnection, receiver: RTCRtpReceiverId) -> Option<String> {
    let transceivers: Vec<_> = pc.get_transceivers().collect();
    let id = transceivers
        .into_iter()
        .find(|&t| RTCRtpReceiverId::from(t) == receiver)?;
    pc.rtp_transceiver(id)?.mid().clone()
}

/// A fresh SSRC for a subscriber's copy of a track (never 0).
fn random_ssrc() -> u32 {
    (crate::random_u64() as u32) | 1
}

/// rtc's parsed packet into the core's form (payload and extension values stay shared). Only
/// the extensions the track forwards (`ext_ids`) are kept: a packet may carry a dozen, and the
/// core holds at most `MAX_EXTENSIONS`.
fn from_rtc(p: rtp::Packet, ext_ids: &[(String, u8)]) -> RtpPacket {
    let h = p.header;
    let mut header = RtpHeader {
        marker: h.marker,
        payload_type: h.payload_type,
        sequence_number: h.sequence_number,
        timestamp: h.timestamp,
        ssrc: h.ssrc,
        ..Default::default()
    };
    for e in h.extensions {
        if ext_ids.iter().any(|(_, id)| *id == e.id) {
            header.extensions.push(e.id, e.payload);
        }
    }
    RtpPacket {
        header,
        payload: p.payload,
    }
}

impl MediaState {
    pub(super) fn find_track(&self, room: &str, track_id: &str) -> Result<usize, SfuError> {
        self.rooms
            .get(room)
            .and_then(|r| {
                r.tracks
                    .iter()
                    .copied()
                    .find(|&t| self.tracks[t].track_id == track_id)
            })
            .ok_or_else(|| SfuError::UnknownTrack(track_id.to_owned()))
    }

    /// A publisher's new source (the first packet of an SSRC): a new track, or another layer of
    /// one it publishes (simulcast, or the same track published again).
    pub(super) fn on_track(&mut self, key: ConnKey, init: RTCTrackEventInit, now: Instant) {
        let conn = &mut self.conns[key];
        let user = conn.user.clone();
        let (ssrc, rid) = (init.ssrc, init.rid.clone());
        let track_id = match init.track_id.as_str() {
            // No `a=msid`: the track goes by its section's mid.
            "" => match receiver_mid(&mut conn.pc, init.receiver_id) {
                Some(mid) => sdp::mid_track_id(&user, &mid),
                None => return,
            },
            id => id.to_owned(),
        };
        let Some((codec, kind)) = conn.pc.rtp_receiver(init.receiver_id).map(|r| {
            let t = r.track();
            (t.codec(ssrc).cloned(), t.kind())
        }) else {
            return;
        };
        let Some(member) = self.members.get(&user) else {
            return;
        };
        let room = member.room.clone();
        let in_room = self
            .rooms
            .get(&room)
            .map(|r| r.tracks.clone())
            .unwrap_or_default();
        let mine = |t: &PublishedTrack| t.owner == user && t.is_local();
        if let Some(&t) = in_room
            .iter()
            .find(|&&t| self.tracks[t].track_id == track_id && mine(&self.tracks[t]))
        {
            let track = &mut self.tracks[t];
            let new_layer = !track.forwarder.has_layer(ssrc);
            let replaced = track.forwarder.add_layer(ssrc, rid.as_deref());
            // A source that replaced another (the same track published again, a layer's new
            // SSRC) takes its place everywhere: nothing grows with each re-publish.
            if let Some(old) = replaced {
                track.receivers.retain(|(s, _)| *s != old);
                self.conns[key].forget_source(old);
            }
            if !track.receivers.iter().any(|(s, _)| *s == ssrc) {
                track.receivers.push((ssrc, init.receiver_id));
            }
            track.origin = Origin::Local(key);
            self.conns[key].forward_source(ssrc, init.receiver_id, t);
            if new_layer {
                let pipes = &self.shared.pipes;
                self.tracks[t].relay.add_source(ssrc, replaced, pipes);
                self.announce_track(t);
            }
            return;
        }
        let Some((codec, forward_codec)) =
            codec.and_then(|c| Codec::from_mime(&c.mime_type).map(|f| (c, f)))
        else {
            warn!(%user, track = %track_id, "unsupported codec: track not forwarded");
            self.conns[key].set_inbound(ssrc, None);
            return;
        };
        // The member published this track on another node before reconnecting here (that node
        // may not have said goodbye yet): this one replaces it.
        let moved = self.remote_track(&room, None, &user, &track_id);
        let in_room = match moved {
            Some(old) => {
                self.unpublish(old, now);
                in_room.into_iter().filter(|&t| t != old).collect()
            }
            None => in_room,
        };
        let Some(member) = self.members.get(&user) else {
            return;
        };
        // A member publishes at most `max_tracks` (each costs every other member a down-track).
        let published = in_room.iter().filter(|&&t| mine(&self.tracks[t])).count();
        if published >= self.settings.max_tracks {
            let limit = self.settings.max_tracks;
            let conn = &mut self.conns[key];
            conn.set_inbound(ssrc, None);
            if conn.refused.contains(&track_id) {
                return; // another layer of a track already refused
            }
            conn.refused.push(track_id.clone());
            self.shared
                .stats
                .tracks_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%user, track = %track_id, limit, "track refused: too many tracks");
            self.emit(SfuEvent::TrackRefused {
                user_id: user.clone(),
                session: member.session.clone(),
                error: SfuError::TooManyTracks(limit),
            });
            return;
        }
        // Subscribers tell tracks apart by id, so an id another member of the room publishes is
        // refused.
        if in_room.iter().any(|&t| self.tracks[t].track_id == track_id) {
            let conn = &mut self.conns[key];
            conn.set_inbound(ssrc, None);
            if conn.refused.contains(&track_id) {
                return; // another layer of a track already refused
            }
            conn.refused.push(track_id.clone());
            warn!(%user, track = %track_id, "track id in use in the room: not forwarded");
            self.emit(SfuEvent::TrackRefused {
                user_id: user.clone(),
                session: member.session.clone(),
                error: SfuError::TrackIdInUse(track_id),
            });
            return;
        }
        let ext_ids = sdp::extension_ids(&member.publisher_sdp, &user, &track_id)
            .into_iter()
            .filter(|(uri, _)| FORWARDED_EXTENSIONS.contains(&uri.as_str()))
            .collect();
        let simulcast = sdp::simulcast_rids(&member.publisher_sdp, &user, &track_id);
        let mut forwarder = TrackForwarder::new(forward_codec);
        forwarder.set_rids(&simulcast);
        forwarder.add_layer(ssrc, rid.as_deref());
        let t = self.tracks.insert(PublishedTrack {
            owner: user.clone(),
            room: room.clone(),
            track_id: track_id.clone(),
            kind: match kind {
                RtpCodecKind::Audio => MediaKind::Audio,
                _ => MediaKind::Video,
            },
            codec,
            simulcast,
            muted: false,
            ext_ids,
            origin: Origin::Local(key),
            receivers: vec![(ssrc, init.receiver_id)],
            forwarder,
            recording: None,
            rtp_out: Vec::new(),
            relay: Relay::default(),
            published_at: crate::unix_ms(),
        });
        self.conns[key].forward_source(ssrc, init.receiver_id, t);
        let r = self.rooms.entry(room.clone()).or_default();
        r.tracks.push(t);
        let (relay, pipes) = (&mut self.tracks[t].relay, &self.shared.pipes);
        relay.add_source(ssrc, None, pipes);
        for node in &r.nodes {
            relay.add_node(node, pipes);
        }
        let others: Vec<String> = r.members.iter().filter(|u| **u != user).cloned().collect();
        info!(%user, track = %track_id, kind = ?self.tracks[t].kind, "track published");
        self.emit(SfuEvent::TrackPublished {
            room_id: room,
            track: self.tracks[t].info(),
        });
        self.announce_track(t);
        // After the announcement: recording_started follows track_published.
        self.start_recording(t);
        for other in others {
            self.add_down(&other, t, now);
        }
    }

    /// The API's start / stop for the tracks published in `room` now (all, or `user`'s).
    /// Returns the room's tracks being recorded afterwards.
    pub(super) fn record(&mut self, room: &str, user: Option<&str>, start: bool) -> Vec<TrackInfo> {
        let to_file = |track: &PublishedTrack| track.recording.as_ref().is_some_and(|r| r.to_file);
        let tracks = self.published_in(room, user);
        for &t in &tracks {
            let track = &self.tracks[t];
            match (start, to_file(track)) {
                (true, false) => {
                    // A recording for registered sinks only is replaced by one with files too.
                    self.stop_recording(t);
                    self.start_recording(t);
                }
                // A room stopped stops every track; a participant stopped keeps a room rule.
                (false, true) if !self.shared.recordings.records(room, &track.owner) => {
                    self.stop_recording(t)
                }
                _ => {}
            }
        }
        let tracks = self
            .published_in(room, None)
            .into_iter()
            .map(|t| &self.tracks[t]);
        tracks.filter(|t| to_file(t)).map(|t| t.info()).collect()
    }

    /// The tracks published in `room` on this node now: all, or `user`'s. (Each node records
    /// and sends RTP egress of its own members' tracks.)
    fn published_in(&self, room: &str, user: Option<&str>) -> Vec<usize> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        let mine = |&t: &usize| {
            let track = &self.tracks[t];
            track.is_local() && user.is_none_or(|u| u == track.owner)
        };
        r.tracks.iter().copied().filter(mine).collect()
    }

    /// RTP egress for the tracks published in `room` now (all, or `user`'s): each to `host`
    /// on its own port from `first_port` up, two apart (RTP, then RTCP's customary place).
    /// `None` for `host` stops them instead. Returns what is sent where.
    pub(super) fn rtp_out(
        &mut self,
        room: &str,
        user: Option<&str>,
        to: Option<(std::net::IpAddr, u16)>,
    ) -> Vec<OutTrack> {
        let mut out = Vec::new();
        for t in self.published_in(room, user) {
            let track = &mut self.tracks[t];
            for id in track.rtp_out.drain(..) {
                track.forwarder.remove_down_track(id);
            }
            let Some((host, first_port)) = to else {
                continue;
            };
            let Some(codec) = Codec::from_mime(&track.codec.mime_type) else {
                continue;
            };
            let Some(port) = first_port.checked_add(2 * out.len() as u16) else {
                break;
            };
            let addr = std::net::SocketAddr::new(host, port);
            let id = self.next_down_id;
            self.next_down_id += 1;
            let payload_type = rtp_out::payload_type(codec);
            track.forwarder.add_down_track(
                DownTrackConfig {
                    id,
                    ssrc: random_ssrc(),
                    payload_type: Some(payload_type),
                    ext_map: ExtMap::default(),
                    quality: Quality::High,
                },
                DownSink::Plain { to: addr },
            );
            track.rtp_out.push(id);
            out.push(OutTrack {
                user_id: track.owner.clone(),
                track_id: track.track_id.clone(),
                port,
                payload_type,
                rtpmap: rtp_out::rtpmap(
                    &track.codec.mime_type,
                    track.codec.clock_rate,
                    track.codec.channels,
                ),
                fmtp: track.codec.sdp_fmtp_line.clone(),
                video: codec.is_video(),
            });
            info!(user = %track.owner, track = %track.track_id, %addr, "RTP egress");
        }
        out
    }

    /// Ends a track's recording (its file is finished in the background).
    fn stop_recording(&mut self, t: usize) {
        let track = &mut self.tracks[t];
        let Some(recorder) = track.recording.take() else {
            return;
        };
        track.forwarder.remove_down_track(RECORDING_DOWN_ID);
        let (room, owner) = (track.room.clone(), track.owner.clone());
        if recorder.to_file {
            self.recording_changed(&room, &owner, -1);
        }
        self.shared.recordings.finished(recorder);
    }

    /// Starts the track's recording if its room is recorded (or a registered sink wants it):
    /// a down-track of its own on the highest layer, fed and keyframe-gated like a subscriber
    /// that just joined.
    fn start_recording(&mut self, t: usize) {
        let track = &mut self.tracks[t];
        let Some(codec) = Codec::from_mime(&track.codec.mime_type) else {
            return;
        };
        let meta = TrackMeta {
            room: track.room.clone(),
            user: track.owner.clone(),
            track_id: track.track_id.clone(),
            codec,
            clock_rate: track.codec.clock_rate,
            channels: track.codec.channels,
            started: SystemTime::now(),
        };
        let Some(recorder) = self.shared.recordings.start(meta) else {
            return;
        };
        if recorder.to_file {
            let (room, owner) = (track.room.clone(), track.owner.clone());
            self.recording_changed(&room, &owner, 1);
        }
        let track = &mut self.tracks[t];
        track.recording = Some(recorder);
        track.forwarder.add_down_track(
            DownTrackConfig {
                id: RECORDING_DOWN_ID,
                ssrc: random_ssrc(),
                // Not sent anywhere: any value lets the forwarder feed it.
                payload_type: Some(0),
                ext_map: ExtMap::default(),
                quality: Quality::High,
            },
            DownSink::Recording,
        );
        info!(user = %track.owner, track = %track.track_id, room = %track.room, "recording");
    }

    /// Counts a room's tracks recorded to files; its members hear when recording starts (the
    /// first) and stops (the last), with the participant's userId when only `owner` is
    /// recorded, not the room.
    fn recording_changed(&mut self, room: &str, owner: &str, change: isize) {
        let whole_room = self.shared.recordings.records_room(room);
        let Some(r) = self.rooms.get_mut(room) else {
            return;
        };
        let before = r.recorded_tracks;
        r.recorded_tracks = before.saturating_add_signed(change);
        if (before == 0) != (r.recorded_tracks == 0) {
            if before == 0 {
                r.recorded_user = (!whole_room).then(|| owner.to_owned());
            }
            let user_id = r.recorded_user.clone();
            self.emit(SfuEvent::Recording {
                room_id: room.to_owned(),
                user_id,
                started: before == 0,
            });
        }
    }

    /// Puts a published track on a member's subscriber connection (if it wants it and does not
    /// have it yet) and asks for renegotiation.
    pub(super) fn add_down(&mut self, user: &str, t: usize, now: Instant) {
        let (Some(m), Some(track)) = (self.members.get_mut(user), self.tracks.get_mut(t)) else {
            return;
        };
        if !m.wants(&track.owner, &track.track_id) || m.downs.iter().any(|d| d.track == t) {
            return;
        }
        let (ssrc, rtx_ssrc) = (random_ssrc(), random_ssrc());
        let (rtc_kind, video) = match track.kind {
            MediaKind::Audio => (RtpCodecKind::Audio, false),
            MediaKind::Video => (RtpCodecKind::Video, true),
        };
        let conn = &mut self.conns[m.subscriber];
        // msid "<publisher userId> <publisher track id>": the browser's stream id is the publisher.
        let local = MediaStreamTrack::new(
            track.owner.clone(),
            track.track_id.clone(),
            track.track_id.clone(),
            rtc_kind,
            vec![RTCRtpEncodingParameters {
                rtp_coding_parameters: RTCRtpCodingParameters {
                    ssrc: Some(ssrc),
                    // Kept only if the subscriber negotiates RTX (rtc drops it otherwise).
                    rtx: video.then_some(RTCRtpRtxParameters { ssrc: rtx_ssrc }),
                    ..Default::default()
                },
                codec: track.codec.clone(),
                ..Default::default()
            }],
        );
        let sender = match conn.pc.add_track(local) {
            Ok(s) => s,
            Err(e) => {
                warn!(%user, track = %track.track_id, "add_track failed: {e}");
                return;
            }
        };
        let slot = conn.egress.add(ssrc, track.codec.clock_rate);
        let down_id = self.next_down_id;
        self.next_down_id += 1;
        let quality = m
            .quality
            .get(&(track.owner.clone(), track.track_id.clone()))
            .copied()
            .unwrap_or_default();
        track.forwarder.add_down_track(
            DownTrackConfig {
                id: down_id,
                ssrc,
                payload_type: None,
                ext_map: ExtMap::default(),
                quality,
            },
            DownSink::Subscriber {
                conn: m.subscriber,
                slot,
            },
        );
        debug!(%user, owner = %track.owner, track = %track.track_id, down_id, "down-track added");
        m.downs.push(DownEntry {
            track: t,
            down_id,
            sender,
            slot,
            ssrc,
            rtx_ssrc: video.then_some(rtx_ssrc),
        });
        self.renegotiate(user, now);
    }

    pub(super) fn remove_down(&mut self, user: &str, t: usize, now: Instant) {
        let Some(m) = self.members.get_mut(user) else {
            return;
        };
        let Some(i) = m.downs.iter().position(|d| d.track == t) else {
            return;
        };
        let d = m.downs.swap_remove(i);
        if let Some(track) = self.tracks.get_mut(t) {
            track.forwarder.remove_down_track(d.down_id);
        }
        let conn = &mut self.conns[m.subscriber];
        if let Err(e) = conn.pc.remove_track(d.sender) {
            debug!(%user, "remove_track: {e}");
        }
        conn.egress.remove(d.slot);
        debug!(%user, down_id = d.down_id, "down-track removed");
        self.renegotiate(user, now);
    }

    /// After a subscriber answer: each down-track's payload type and extension ids as
    /// negotiated (`None`: the subscriber did not accept the codec, nothing is sent).
    pub(super) fn configure_downs(&mut self, user: &str) {
        let Some(m) = self.members.get(user) else {
            return;
        };
        let conn = &mut self.conns[m.subscriber];
        for d in &m.downs {
            let Some(track) = self.tracks.get_mut(d.track) else {
                continue;
            };
            let Some(mut sender) = conn.pc.rtp_sender(d.sender) else {
                continue;
            };
            let rtp = &sender.get_parameters().rtp_parameters;
            let payload_type = rtp
                .codecs
                .iter()
                .find(|c| {
                    c.rtp_codec
                        .mime_type
                        .eq_ignore_ascii_case(&track.codec.mime_type)
                })
                .map(|c| c.payload_type);
            let rtx_payload_type = payload_type.and_then(|pt| {
                rtp.codecs
                    .iter()
                    .find(|c| {
                        c.rtp_codec.mime_type.eq_ignore_ascii_case("video/rtx")
                            && sdp::rtx_apt(&c.rtp_codec.sdp_fmtp_line) == Some(pt)
                    })
                    .map(|c| c.payload_type)
            });
            if let Some(rtx_ssrc) = d.rtx_ssrc {
                conn.egress.set_rtx(d.slot, rtx_ssrc, rtx_payload_type);
            }
            let mut ext_map = ExtMap::default();
            for ext in &rtp.header_extensions {
                if let Some((_, publisher_id)) =
                    track.ext_ids.iter().find(|(uri, _)| *uri == ext.uri)
                    && let Ok(id) = u8::try_from(ext.id)
                {
                    ext_map.insert(*publisher_id, id);
                }
            }
            if payload_type.is_none() {
                debug!(%user, mime = %track.codec.mime_type, "subscriber did not accept the codec: track not sent");
            }
            track.forwarder.configure_down_track(DownTrackConfig {
                id: d.down_id,
                ssrc: d.ssrc,
                payload_type,
                ext_map,
                quality: Default::default(), // the forwarder keeps the subscriber's choice
            });
        }
    }

    /// Removes a track from the room and from every subscriber.
    pub(super) fn unpublish(&mut self, t: usize, now: Instant) {
        let Some(track) = self.tracks.get(t) else {
            return;
        };
        let (room, origin) = (track.room.clone(), track.origin.clone());
        let members = self
            .rooms
            .get(&room)
            .map(|r| r.members.clone())
            .unwrap_or_default();
        for user in members {
            self.remove_down(&user, t, now);
        }
        if let Some(r) = self.rooms.get_mut(&room) {
            r.tracks.retain(|&x| x != t);
        }
        let Origin::Local(publisher) = origin else {
            // Its node announced it gone to the whole room.
            self.forget_remote_streams(t);
            let track = self.tracks.remove(t);
            info!(user = %track.owner, track = %track.track_id, "remote track gone");
            return;
        };
        if let Some(conn) = self.conns.get_mut(publisher) {
            conn.stop_forwarding(t);
        }
        self.stop_recording(t);
        self.announce_track_change(t, true);
        let track = self.tracks.remove(t);
        info!(user = %track.owner, track = %track.track_id, "track unpublished");
        self.emit(SfuEvent::TrackUnpublished {
            room_id: room,
            track: track.info(),
        });
    }

    /// A publisher's packet that took webrtc-rs's receive path (a source's first packets, a
    /// source not forwarded): recorded by the connection's receive path, then forwarded.
    pub(super) fn on_rtp(&mut self, key: ConnKey, packet: rtp::Packet, now: Instant) {
        let conn = &mut self.conns[key];
        let packet = match conn.ingress.as_deref_mut() {
            Some(ingress) => match ingress.record(packet, now) {
                Some(packet) => packet,
                None => return,
            },
            None => packet,
        };
        let Some(Some(t)) = conn.inbound_track(packet.header.ssrc) else {
            return; // not forwarded (or its track announcement is still to come)
        };
        self.forward(t, packet, now);
    }

    /// A publisher's packet for track `t`: fanned out to every down-track, straight into the
    /// send batch.
    pub(super) fn forward(&mut self, t: usize, packet: rtp::Packet, now: Instant) {
        let (tracks, conns, batch) = (&mut self.tracks, &mut self.conns, &mut self.batch);
        let (loop_pipes, pipes) = (&mut self.loop_pipes, &self.shared.pipes);
        let Some(track) = tracks.get_mut(t) else {
            return;
        };
        let packet = from_rtc(packet, &track.ext_ids);
        let PublishedTrack {
            forwarder,
            recording,
            relay,
            muted,
            ..
        } = track;
        let mut keyframe_for = forwarder.forward(&packet, now, |sink, header, payload: &Bytes| {
            let (conn, slot) = match *sink {
                DownSink::Subscriber { conn, slot } => (conn, slot),
                DownSink::Recording => {
                    if let Some(r) = recording.as_mut() {
                        r.push(header, payload, &packet.header, now);
                    }
                    return;
                }
                DownSink::Plain { to } => {
                    let mut buf = batch.buffer();
                    write_header(header, &mut buf);
                    buf.extend_from_slice(payload);
                    batch.push(PLAIN_RTP_KEY, to, buf);
                    return;
                }
            };
            let Some(sub) = conns.get_mut(conn) else {
                return;
            };
            // No selected pair or no SRTP context yet: the connection is not up, nothing to send.
            let (Some(to), Some(srtp)) = (sub.route, sub.srtp.as_mut()) else {
                return;
            };
            let route = Route {
                to,
                key: conn as u32,
            };
            sub.egress
                .send(slot, header, payload, now, srtp, route, batch);
        });
        if !relay.is_empty() && !*muted {
            self.received.relayed_out += relay.send(&packet, loop_pipes, pipes, batch);
        }
        forwarder.keep(packet);
        // The recording lost video (a gap, or its queue overflowed): it needs a keyframe.
        if let Some(r) = recording.as_ref()
            && r.take_keyframe_request()
        {
            keyframe_for = keyframe_for.or(forwarder.on_keyframe_request(RECORDING_DOWN_ID, now));
        }
        if let Some(ssrc) = keyframe_for {
            self.request_keyframe(t, ssrc, now);
        }
    }

    /// Sends a PLI for one layer of a track to its publisher.
    pub(super) fn request_keyframe(&mut self, t: usize, media_ssrc: u32, now: Instant) {
        let Some(track) = self.tracks.get(t) else {
            return;
        };
        let publisher = match &track.origin {
            Origin::Local(key) => *key,
            Origin::Remote { node } => return self.request_remote_keyframe(node, media_ssrc),
        };
        let Some(&(_, receiver)) = track.receivers.iter().find(|(s, _)| *s == media_ssrc) else {
            return;
        };
        let Some(conn) = self.conns.get_mut(publisher) else {
            return;
        };
        if let Some(mut r) = conn.pc.rtp_receiver(receiver) {
            let pli = PictureLossIndication {
                sender_ssrc: 0,
                media_ssrc,
            };
            if let Err(e) = r.write_rtcp(now, vec![Box::new(pli)]) {
                debug!("cannot send a PLI upstream: {e}");
            }
            self.mark_dirty(publisher);
        }
    }

    /// RTCP a client sent: on a subscriber connection, keyframe requests go upstream and NACKs
    /// are answered from the retransmission buffer.
    pub(super) fn on_rtcp(
        &mut self,
        key: ConnKey,
        packets: Vec<Box<dyn rtc::rtcp::Packet>>,
        now: Instant,
    ) {
        if self.conns[key].ingress.is_some() {
            // A publisher's sender reports (the only RTCP its connection hands over): also the
            // capture clock of its recorded tracks.
            for p in &packets {
                if let Some(sr) = p.as_any().downcast_ref::<SenderReport>() {
                    self.sender_report_to_recordings(key, sr);
                }
            }
            if let Some(ingress) = self.conns[key].ingress.as_deref_mut() {
                ingress.sender_reports(packets, now);
            }
            return;
        }
        let conn = &self.conns[key];
        if conn.kind != PcKind::Subscriber {
            return;
        }
        for p in packets {
            let any = p.as_any();
            if let Some(pli) = any.downcast_ref::<PictureLossIndication>() {
                self.keyframe_requested(key, pli.media_ssrc, now);
            } else if let Some(fir) = any.downcast_ref::<FullIntraRequest>() {
                for entry in &fir.fir {
                    self.keyframe_requested(key, entry.ssrc, now);
                }
            } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                self.retransmit(key, nack, now);
            }
        }
    }

    /// Hands a publisher's sender report to the recording of the track that source feeds.
    fn sender_report_to_recordings(&mut self, publisher: ConnKey, sr: &SenderReport) {
        // The connection knows which track each of its sources feeds.
        if let Some(Some(t)) = self.conns[publisher].inbound_track(sr.ssrc)
            && let Some(recording) = self.tracks.get_mut(t).and_then(|t| t.recording.as_mut())
        {
            recording.sender_report(sr.ssrc, sr.ntp_time, sr.rtp_time);
        }
    }

    /// A subscriber's NACK: the lost packets still in the track's buffer go again.
    fn retransmit(&mut self, key: ConnKey, nack: &TransportLayerNack, now: Instant) {
        let conn = &mut self.conns[key];
        let Some(d) = self
            .members
            .get(&conn.user)
            .and_then(|m| m.downs.iter().find(|d| d.ssrc == nack.media_ssrc))
        else {
            return;
        };
        let Some(track) = self.tracks.get(d.track) else {
            return;
        };
        let crate::sfu::peer::Connection {
            egress,
            route,
            srtp,
            ..
        } = conn;
        let (Some(to), Some(srtp)) = (*route, srtp.as_mut()) else {
            return;
        };
        let route = Route {
            to,
            key: key as u32,
        };
        for seq in nack.nacks.iter().flat_map(|pair| (*pair).into_iter()) {
            if let Some((header, payload)) = track.forwarder.retransmission(d.down_id, seq) {
                egress.resend(d.slot, &header, &payload, now, srtp, route, &mut self.batch);
            }
        }
    }

    /// A subscriber's PLI or FIR for one of its down-tracks, relayed upstream (throttled).
    fn keyframe_requested(&mut self, key: ConnKey, ssrc: u32, now: Instant) {
        let user = &self.conns[key].user;
        let Some(d) = self
            .members
            .get(user)
            .and_then(|m| m.downs.iter().find(|d| d.ssrc == ssrc))
        else {
            return;
        };
        let (t, down_id) = (d.track, d.down_id);
        let layer = self
            .tracks
            .get_mut(t)
            .and_then(|track| track.forwarder.on_keyframe_request(down_id, now));
        if let Some(layer) = layer {
            self.request_keyframe(t, layer, now);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Chrome sends a dozen extensions with video; the forwarded one may come last.
    #[test]
    fn the_forwarded_extension_survives_a_packet_with_many() {
        let mut header = rtp::header::Header {
            version: 2,
            extension: true,
            extension_profile: 0xBEDE,
            ..Default::default()
        };
        for id in 1..=12u8 {
            header
                .set_extension(id, Bytes::from(vec![id]))
                .expect("one-byte extension");
        }
        let packet = rtp::Packet {
            header,
            payload: Bytes::from_static(b"frame"),
        };
        let orientation = vec![("urn:3gpp:video-orientation".to_owned(), 12)];
        let kept = from_rtc(packet, &orientation);
        assert_eq!(kept.header.extensions.len(), 1);
        assert_eq!(
            kept.header.extensions.get(12),
            Some(&Bytes::from_static(&[12]))
        );
    }
}
