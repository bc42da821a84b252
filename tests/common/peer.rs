//! A webrtc-rs participant for the SFU tests: socket.io signaling with `sfu`, a publisher
//! connection sending synthetic Opus and VP8 (and a data channel), and a subscriber connection
//! recording every track and channel it receives. Loopback only, no STUN, no mDNS.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::receiver_report::ReceiverReport;
use rtc::rtcp::sender_report::SenderReport;
use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::{NackPair, TransportLayerNack};
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use switchboard::load::peer::{ClientFactory, PeerEvent};
use switchboard::load::sfu_client::{CLOSE, Connections, drive, relay_events, subscriber_offer};
use switchboard::load::signaling::Client;
use switchboard::sfu::api::PcKind;
use switchboard::sfu::peer::sdp::sending_track_ids;
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::PeerConnection;

use super::query;

pub const AUDIO_SSRC: u32 = 0xA000;
pub const VIDEO_SSRC: u32 = 0xB000;

/// What a subscriber saw of one forwarded track.
#[derive(Debug, Clone, Default)]
pub struct Received {
    /// Sender reports received for this track.
    pub sender_reports: u64,
    /// Packets whose sequence number had been received before (retransmissions).
    pub repeated: u64,
    pub seen: std::collections::HashSet<u16>,
    pub last_seq: u16,
    pub stream_id: String,
    pub track_id: String,
    pub kind: String,
    pub packets: u64,
    pub first_payloads: Vec<Bytes>,
    pub ssrc: u32,
    pub ended: bool,
}

/// What a subscriber saw of one relayed data channel.
#[derive(Debug, Clone, Default)]
pub struct ReceivedChannel {
    pub label: String,
    pub protocol: String,
    pub ordered: bool,
    pub max_retransmits: Option<u16>,
    pub max_packet_life_time: Option<u16>,
    pub texts: Vec<String>,
    pub binaries: Vec<Vec<u8>>,
}

#[derive(Default)]
pub struct Observed {
    pub tracks: Mutex<HashMap<String, Received>>, // by "<stream> <track>"
    pub channels: Mutex<Vec<ReceivedChannel>>,
    pub envelopes: Mutex<Vec<Value>>,
    /// Events other than `msg` (e.g. the `tracks` reply): (name, first argument).
    pub events: Mutex<Vec<(String, Value)>>,
    pub subscriber_offers: AtomicU64,
    pub plis_at_publisher: AtomicU64,
    pub nacks_at_publisher: AtomicU64,
    pub twcc_at_publisher: AtomicU64,
    pub receiver_reports_at_publisher: AtomicU64,
    /// Receiver reports that echo one of the publisher's sender reports (LSR set).
    pub reports_echoing_sr_at_publisher: AtomicU64,
    /// Sequence numbers the server asked the publisher for again.
    pub nacked_at_publisher: Mutex<Vec<u16>>,
    /// The video codecs this member's subscriber connection accepts (`None`: all).
    pub subscriber_video_codecs: Mutex<Option<Vec<&'static str>>>,
    /// Where the peer connections run (`None`: the test's runtime).
    pub media_runtime: Mutex<Option<tokio::runtime::Handle>>,
    pub remote_tracks: Mutex<Vec<Arc<dyn TrackRemote>>>,
    /// Track ids the latest subscriber offer still sends (webrtc-rs never ends a remote track
    /// that renegotiation removed, so this is how a client sees a track go).
    pub offered: Mutex<Vec<String>>,
    /// Connection state changes, as "publisher Connected" (for assertion messages).
    pub states: Mutex<Vec<String>>,
}

impl Observed {
    fn record_state(&self, pc: &str, state: impl std::fmt::Debug) {
        self.states.lock().unwrap().push(format!("{pc} {state:?}"));
    }

    fn is_live(&self, r: &Received) -> bool {
        !r.ended && self.offered.lock().unwrap().contains(&r.track_id)
    }
}

#[derive(Default)]
pub struct Options {
    pub publish: bool,
    pub chat: bool,
    /// Media starts only when this is notified (several publishers can then start together).
    pub hold_media: Option<Arc<tokio::sync::Notify>>,
    pub shape: MediaShape,
    /// Video codecs the subscriber connection accepts (`None`: all the server offers).
    pub accept_video: Option<Vec<&'static str>>,
    /// Run the peer connections on this runtime; shutting it down kills them without a goodbye
    /// while signaling goes on (a network failure).
    pub media_runtime: Option<tokio::runtime::Handle>,
    /// Name the published tracks after this user instead (`<name>-audio`, `<name>-video`).
    pub track_ids_of: Option<String>,
    /// Send this real media (once through, then silence) instead of synthetic payloads.
    pub encoded: Option<Arc<super::media::EncodedMedia>>,
    /// The access token for the handshake (a server with auth on).
    pub token: Option<String>,
    /// Offers without `a=msid` (as some clients that are not browsers send them).
    pub without_msid: bool,
}

/// How much video a publisher sends: `video_burst` packets per frame at 30 frames/s, each with
/// `pad` filler bytes. Audio is always 50 small packets/s.
#[derive(Clone, Copy, Debug)]
pub struct MediaShape {
    pub video_burst: u32,
    pub pad: usize,
    /// Leave out every Nth video sequence number (a lost packet the server should NACK).
    pub skip_every: Option<u32>,
    /// Send every Nth frame's packets in reverse order (real media only): reordering on the way.
    /// Frames N-1, 2N-1, ...: with N = 3 and a keyframe every 30 frames, never a keyframe (a
    /// down-track that starts on a keyframe whose first packet comes last waits for the next).
    pub reverse_every: Option<u32>,
}

impl Default for MediaShape {
    fn default() -> Self {
        MediaShape {
            video_burst: 1,
            pad: 24,
            skip_every: None,
            reverse_every: None,
        }
    }
}

pub struct TestPeer {
    pub user: String,
    pub observed: Arc<Observed>,
    out: mpsc::UnboundedSender<(String, Value)>,
    connections: Connections,
    pub chat: Option<Arc<dyn DataChannel>>,
    pub chat_open: Arc<AtomicBool>,
    running: Arc<AtomicBool>,
    pub audio_id: String,
    pub video_id: String,
    without_msid: bool,
}

/// A publisher offer to `sfu` (without `a=msid` lines when `without_msid`).
async fn send_offer(
    pc: &Arc<dyn PeerConnection>,
    out: &mpsc::UnboundedSender<(String, Value)>,
    without_msid: bool,
) {
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer.clone()).await.unwrap();
    let sdp = if without_msid {
        let kept: Vec<&str> = (offer.sdp.split("\r\n"))
            .filter(|l| !l.starts_with("a=msid:") && !l.contains(" msid:"))
            .collect();
        kept.join("\r\n")
    } else {
        offer.sdp
    };
    let _ = out.send((
        "offer".into(),
        json!({"targetUid": "sfu", "pc": "publisher", "sdp": {"type": "offer", "sdp": sdp}}),
    ));
}

fn factory() -> ClientFactory {
    ClientFactory::new([127, 0, 0, 1].into())
}

fn local_track(user: &str, id: &str, kind: RtpCodecKind, ssrc: u32) -> Arc<TrackLocalStaticRTP> {
    let codec = match kind {
        RtpCodecKind::Audio => RTCRtpCodec {
            mime_type: "audio/opus".into(),
            clock_rate: 48_000,
            channels: 2,
            sdp_fmtp_line: "minptime=10;useinbandfec=1".into(),
            rtcp_feedback: vec![],
        },
        _ => RTCRtpCodec {
            mime_type: "video/VP8".into(),
            clock_rate: 90_000,
            channels: 0,
            sdp_fmtp_line: String::new(),
            rtcp_feedback: vec![],
        },
    };
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        user.to_owned(),
        id.to_owned(),
        id.to_owned(),
        kind,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(ssrc),
                ..Default::default()
            },
            codec,
            ..Default::default()
        }],
    )))
}

/// The payload a publisher sends: who, which kind, which packet (VP8 with a descriptor).
pub fn payload(user_index: u8, video: bool, n: u32, keyframe: bool) -> Bytes {
    payload_padded(user_index, video, n, keyframe, 24)
}

/// [`payload`] with `pad` filler bytes (1000-byte packets for load runs).
pub fn payload_padded(user_index: u8, video: bool, n: u32, keyframe: bool, pad: usize) -> Bytes {
    let mut p = Vec::with_capacity(8 + pad);
    if video {
        p.push(0x10); // VP8: start of partition 0
        p.push(if keyframe { 0x00 } else { 0x01 });
    } else {
        p.push(0xFC);
    }
    p.push(user_index);
    p.extend_from_slice(&n.to_be_bytes());
    p.resize(p.len() + pad, 0xAB);
    Bytes::from(p)
}

impl TestPeer {
    /// Joins `room`, publishes one Opus and one VP8 track and a "chat" channel (when `publish`),
    /// and starts sending media (user_index marks the payloads).
    pub async fn join(
        addr: SocketAddr,
        user: &str,
        room: &str,
        user_index: u8,
        publish: bool,
    ) -> TestPeer {
        let options = Options {
            publish,
            chat: publish,
            hold_media: None,
            shape: MediaShape::default(),
            accept_video: None,
            media_runtime: None,
            track_ids_of: None,
            encoded: None,
            token: None,
            without_msid: false,
        };
        Self::join_with(addr, user, room, user_index, options).await
    }

    pub async fn join_with(
        addr: SocketAddr,
        user: &str,
        room: &str,
        user_index: u8,
        options: Options,
    ) -> TestPeer {
        let Options {
            publish,
            chat: with_chat,
            hold_media,
            shape,
            accept_video,
            media_runtime,
            track_ids_of,
            encoded,
            token,
            without_msid,
        } = options;
        let mut handshake = query(user, Some(room));
        if let Some(token) = &token {
            handshake.push_str(&format!("&token={token}"));
        }
        let client = Client::connect(addr, &handshake)
            .await
            .expect("signaling connects");
        let observed = Arc::new(Observed::default());
        *observed.subscriber_video_codecs.lock().unwrap() = accept_video;
        *observed.media_runtime.lock().unwrap() = media_runtime;
        let (pc, pub_events) = build_pc(&observed, factory()).await;
        let (out_tx, out_rx) = mpsc::unbounded_channel::<(String, Value)>();
        let connections = Connections {
            publisher: Some(pc.clone()),
            ..Default::default()
        };
        let running = Arc::new(AtomicBool::new(true));
        let ids_of = track_ids_of.as_deref().unwrap_or(user);
        let audio_id = format!("{ids_of}-audio");
        let video_id = format!("{ids_of}-video");

        let obs = observed.clone();
        relay_events(pub_events, out_tx.clone(), PcKind::Publisher, move |e| {
            if let PeerEvent::State(state) = e {
                obs.record_state("publisher", state);
            }
        });
        tokio::spawn(dispatch(
            client,
            out_rx,
            out_tx.clone(),
            connections.clone(),
            observed.clone(),
        ));

        let mut chat = None;
        let chat_open = Arc::new(AtomicBool::new(false));
        if publish {
            let audio = local_track(
                user,
                &audio_id,
                RtpCodecKind::Audio,
                AUDIO_SSRC + user_index as u32,
            );
            let video = local_track(
                user,
                &video_id,
                RtpCodecKind::Video,
                VIDEO_SSRC + user_index as u32,
            );
            pc.add_track(audio.clone() as Arc<dyn TrackLocal>)
                .await
                .unwrap();
            pc.add_track(video.clone() as Arc<dyn TrackLocal>)
                .await
                .unwrap();
            if with_chat {
                // A second channel, unordered with at most 2 retransmissions: copied as it is.
                let lossy = RTCDataChannelInit {
                    ordered: false,
                    max_retransmits: Some(2),
                    ..Default::default()
                };
                let state = pc.create_data_channel("state", Some(lossy)).await.unwrap();
                tokio::spawn(async move { while state.poll().await.is_some() {} });
                // A third, ordered and timed (150 ms lifetime): copied as it is too.
                let timed = RTCDataChannelInit {
                    max_packet_life_time: Some(150),
                    ..Default::default()
                };
                let cursor = pc.create_data_channel("cursor", Some(timed)).await.unwrap();
                tokio::spawn(async move { while cursor.poll().await.is_some() {} });
                let dc = pc.create_data_channel("chat", None).await.unwrap();
                let (poll_dc, open) = (dc.clone(), chat_open.clone());
                tokio::spawn(async move {
                    while let Some(e) = poll_dc.poll().await {
                        if matches!(e, DataChannelEvent::OnOpen) {
                            open.store(true, Ordering::SeqCst);
                        }
                    }
                });
                chat = Some(dc);
            }
            let audio_for_feedback = audio.clone();
            let (a, v, r) = (audio, video.clone(), running.clone());
            tokio::spawn(async move {
                if let Some(release) = hold_media {
                    release.notified().await;
                }
                match encoded {
                    Some(media) => send_encoded(a, v, user_index, r, shape, media).await,
                    None => send_media(a, v, user_index, r, shape).await,
                }
            });
            // The feedback that reaches this publisher (all RTCP is delivered to test clients).
            for local in [video, audio_for_feedback] {
                tokio::spawn(count_feedback(local, observed.clone()));
            }
            send_offer(&pc, &out_tx, without_msid).await;
        } else {
            let _ = out_tx.send(("call".into(), json!({"targetUid": "sfu"})));
        }
        TestPeer {
            user: user.to_owned(),
            observed,
            out: out_tx,
            connections,
            chat,
            chat_open,
            running,
            audio_id,
            video_id,
            without_msid,
        }
    }

    /// Offers the publisher connection again, unchanged (a renegotiation that keeps every
    /// track).
    pub async fn offer_again(&self) {
        let pc = self.connections.publisher.as_ref().expect("a publisher");
        send_offer(pc, &self.out, self.without_msid).await;
    }

    pub fn emit(&self, event: &str, data: Value) {
        let _ = self.out.send((event.to_owned(), data));
    }

    /// Tracks received from `publisher` (stream id) that carried packets.
    pub fn tracks_from(&self, publisher: &str) -> Vec<Received> {
        self.observed
            .tracks
            .lock()
            .unwrap()
            .values()
            .filter(|r| r.stream_id == publisher && r.packets > 0 && self.observed.is_live(r))
            .cloned()
            .collect()
    }

    pub fn live_tracks(&self) -> Vec<Received> {
        self.observed
            .tracks
            .lock()
            .unwrap()
            .values()
            .filter(|r| self.observed.is_live(r))
            .cloned()
            .collect()
    }

    /// One line per received track, for assertion messages.
    pub fn summary(&self) -> String {
        let tracks = self.observed.tracks.lock().unwrap();
        let mut lines: Vec<String> = tracks
            .values()
            .map(|r| {
                format!(
                    "{} {} {} packets={} ended={}",
                    r.stream_id, r.track_id, r.kind, r.packets, r.ended
                )
            })
            .collect();
        lines.sort();
        let channels: Vec<String> = self
            .observed
            .channels
            .lock()
            .unwrap()
            .iter()
            .map(|c| {
                let messages = c.texts.len() + c.binaries.len();
                format!("{}@{} ({messages} messages)", c.label, c.protocol)
            })
            .collect();
        let errors = self.envelopes_of("error");
        format!(
            "{}: {} | channels {channels:?} | offers={} offered={:?} | states {:?} | errors {errors:?}",
            self.user,
            lines.join("; "),
            self.observed.subscriber_offers.load(Ordering::SeqCst),
            self.observed.offered.lock().unwrap(),
            self.observed.states.lock().unwrap(),
        )
    }

    pub fn envelopes_of(&self, kind: &str) -> Vec<Value> {
        self.observed
            .envelopes
            .lock()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == kind)
            .cloned()
            .collect()
    }

    /// Sends a PLI for the forwarded video track from `publisher`, as a browser would.
    pub async fn send_pli_for(&self, publisher: &str) -> bool {
        let tracks: Vec<Arc<dyn TrackRemote>> = self.observed.remote_tracks.lock().unwrap().clone();
        for t in tracks {
            if t.stream_id().await == publisher && t.kind().await == RtpCodecKind::Video {
                let ssrc = t.ssrcs().await.first().copied().unwrap_or(0);
                let pli = PictureLossIndication {
                    sender_ssrc: 0,
                    media_ssrc: ssrc,
                };
                return t.write_rtcp(vec![Box::new(pli)]).await.is_ok();
            }
        }
        false
    }

    /// Sends a NACK for the last packet received on the forwarded video of `publisher`, as if
    /// it had been lost; the server should send it again from its retransmission buffer.
    pub async fn nack_last_video_of(&self, publisher: &str) -> Option<u16> {
        let tracks: Vec<Arc<dyn TrackRemote>> = self.observed.remote_tracks.lock().unwrap().clone();
        for t in tracks {
            if t.stream_id().await == publisher && t.kind().await == RtpCodecKind::Video {
                let key = format!("{} {}", t.stream_id().await, t.track_id().await);
                let seq = self.observed.tracks.lock().unwrap().get(&key)?.last_seq;
                let ssrc = t.ssrcs().await.first().copied().unwrap_or(0);
                let nack = TransportLayerNack {
                    sender_ssrc: 0,
                    media_ssrc: ssrc,
                    nacks: vec![NackPair {
                        packet_id: seq,
                        lost_packets: 0,
                    }],
                };
                t.write_rtcp(vec![Box::new(nack)]).await.ok()?;
                return Some(seq);
            }
        }
        None
    }

    pub async fn close(self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(pc) = &self.connections.publisher {
            let _ = pc.close().await;
        }
        let sub = self.connections.subscriber.lock().unwrap().take();
        if let Some(pc) = sub {
            let _ = pc.close().await;
        }
        let _ = self.out.send((CLOSE.into(), Value::Null));
    }
}

/// Real media at its real rate: an Opus packet every 20 ms and a VP8 frame every 33 ms, until
/// the media runs out. `shape.skip_every` leaves out every Nth video packet (never resent).
async fn send_encoded(
    audio: Arc<TrackLocalStaticRTP>,
    video: Arc<TrackLocalStaticRTP>,
    user_index: u8,
    running: Arc<AtomicBool>,
    shape: MediaShape,
    media: Arc<super::media::EncodedMedia>,
) {
    let (mut audio_next, mut video_next, mut video_seq) = (0usize, 0usize, 0u32);
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(5));
    while running.load(Ordering::SeqCst)
        && (audio_next < media.audio.len() || video_next < media.video.len())
    {
        tick.tick().await;
        let elapsed = start.elapsed().as_millis() as usize;
        while audio_next < media.audio.len() && audio_next * 20 <= elapsed {
            let p = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: 111,
                    sequence_number: audio_next as u16,
                    timestamp: audio_next as u32 * 960,
                    ssrc: AUDIO_SSRC + user_index as u32,
                    ..Default::default()
                },
                payload: media.audio[audio_next].clone(),
            };
            let _ = audio.write_rtp(p).await;
            audio_next += 1;
        }
        while video_next < media.video.len() && video_next * 100 / 3 <= elapsed {
            let packets = &media.video[video_next];
            let mut out = Vec::new();
            for (k, payload) in packets.iter().enumerate() {
                video_seq = video_seq.wrapping_add(1);
                if shape
                    .skip_every
                    .is_some_and(|n| video_seq.is_multiple_of(n))
                {
                    continue; // "lost"
                }
                out.push(rtp::Packet {
                    header: rtp::header::Header {
                        version: 2,
                        marker: k + 1 == packets.len(),
                        payload_type: 96,
                        sequence_number: video_seq as u16,
                        timestamp: video_next as u32 * 3000,
                        ssrc: VIDEO_SSRC + user_index as u32,
                        ..Default::default()
                    },
                    payload: payload.clone(),
                });
            }
            if shape
                .reverse_every
                .is_some_and(|n| (video_next as u32 + 1).is_multiple_of(n))
            {
                out.reverse(); // reordered on the way
            }
            for p in out {
                let _ = video.write_rtp(p).await;
            }
            video_next += 1;
        }
    }
}

/// Opus every 20 ms and VP8 every 33 ms (a keyframe every 30 frames), payloads marked.
async fn send_media(
    audio: Arc<TrackLocalStaticRTP>,
    video: Arc<TrackLocalStaticRTP>,
    user_index: u8,
    running: Arc<AtomicBool>,
    shape: MediaShape,
) {
    let mut n: u32 = 0;
    let mut video_seq: u32 = 0;
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    while running.load(Ordering::SeqCst) {
        tick.tick().await;
        n += 1;
        if n.is_multiple_of(2) {
            let seq = (n / 2) as u16;
            let p = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    payload_type: 111,
                    sequence_number: seq,
                    timestamp: seq as u32 * 960,
                    ssrc: AUDIO_SSRC + user_index as u32,
                    ..Default::default()
                },
                payload: payload(user_index, false, seq as u32, false),
            };
            let _ = audio.write_rtp(p).await;
        }
        if n.is_multiple_of(3) {
            // One frame: `burst` packets, the marker on the last, a keyframe every 30 frames.
            let frame = n / 3;
            for k in 0..shape.video_burst {
                video_seq = video_seq.wrapping_add(1);
                if shape
                    .skip_every
                    .is_some_and(|n| video_seq.is_multiple_of(n))
                {
                    video_seq = video_seq.wrapping_add(1); // this one is "lost"
                }
                let p = rtp::Packet {
                    header: rtp::header::Header {
                        version: 2,
                        marker: k + 1 == shape.video_burst,
                        payload_type: 96,
                        sequence_number: video_seq as u16,
                        timestamp: frame * 3000,
                        ssrc: VIDEO_SSRC + user_index as u32,
                        ..Default::default()
                    },
                    payload: payload_padded(
                        user_index,
                        true,
                        video_seq,
                        k == 0 && frame % 30 == 1,
                        shape.pad,
                    ),
                };
                let _ = video.write_rtp(p).await;
            }
        }
    }
}

/// Owns the socket.io client: answers server offers, applies answers and candidates, and
/// records envelopes; sends what the test queues.
async fn dispatch(
    client: Client,
    out: mpsc::UnboundedReceiver<(String, Value)>,
    out_tx: mpsc::UnboundedSender<(String, Value)>,
    connections: Connections,
    observed: Arc<Observed>,
) {
    drive(
        client,
        out,
        async move |client: &Client, name: String, first: Value| {
            if name != "msg" {
                observed.events.lock().unwrap().push((name, first));
                return;
            }
            observed.envelopes.lock().unwrap().push(first.clone());
            if let Some(sdp) = subscriber_offer(&first) {
                observed.subscriber_offers.fetch_add(1, Ordering::SeqCst);
                *observed.offered.lock().unwrap() = sending_track_ids(sdp, "");
            }
            let new_subscriber = async || Ok(new_subscriber(&observed, &out_tx).await);
            connections
                .apply(client, &first, new_subscriber)
                .await
                .expect("the server's description or candidate applies");
        },
    )
    .await
}

/// Builds a peer connection on the member's media runtime (see [`Options::media_runtime`]).
/// A real offer from a webrtc-rs client with one audio track, for tests that signal by hand.
pub async fn sample_offer() -> String {
    sample_offer_with(false).await
}

/// [`sample_offer`], with a data channel when `data`.
pub async fn sample_offer_with(data: bool) -> String {
    let (pc, _events) = factory().build().await.expect("peer connection");
    let audio = local_track("sample", "sample-audio", RtpCodecKind::Audio, AUDIO_SSRC);
    pc.add_track(audio as Arc<dyn TrackLocal>).await.unwrap();
    if data {
        pc.create_data_channel("chat", None).await.unwrap();
    }
    let offer = pc.create_offer(None).await.unwrap();
    pc.set_local_description(offer.clone()).await.unwrap();
    let _ = pc.close().await;
    offer.sdp
}

async fn build_pc(
    observed: &Observed,
    factory: ClientFactory,
) -> (Arc<dyn PeerConnection>, mpsc::UnboundedReceiver<PeerEvent>) {
    let runtime = observed.media_runtime.lock().unwrap().clone();
    let built = match runtime {
        Some(rt) => rt
            .spawn(async move { factory.build().await })
            .await
            .expect("media runtime"),
        None => factory.build().await,
    };
    built.expect("peer connection")
}

/// The subscriber connection, made on the server's first offer: it records what arrives.
async fn new_subscriber(
    observed: &Arc<Observed>,
    out: &mpsc::UnboundedSender<(String, Value)>,
) -> Arc<dyn PeerConnection> {
    let codecs = observed.subscriber_video_codecs.lock().unwrap().clone();
    let factory = match codecs {
        Some(codecs) => factory().with_video_codecs(&codecs),
        None => factory(),
    };
    let (pc, events) = build_pc(observed, factory).await;
    let obs = observed.clone();
    relay_events(events, out.clone(), PcKind::Subscriber, move |e| match e {
        PeerEvent::Track(t) => {
            tokio::spawn(record_track(t, obs.clone()));
        }
        PeerEvent::DataChannel(dc) => {
            tokio::spawn(record_channel(dc, obs.clone()));
        }
        PeerEvent::State(state) => obs.record_state("subscriber", state),
        _ => {}
    });
    pc
}

/// Counts the RTCP a publisher's track gets back from the server.
async fn count_feedback(local: Arc<TrackLocalStaticRTP>, observed: Arc<Observed>) {
    while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = local.poll().await {
        for p in &packets {
            let any = p.as_any();
            let counter = if any.is::<PictureLossIndication>() {
                &observed.plis_at_publisher
            } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
                let mut nacked = observed.nacked_at_publisher.lock().unwrap();
                nacked.extend(nack.nacks.iter().flat_map(|pair| (*pair).into_iter()));
                &observed.nacks_at_publisher
            } else if any.is::<TransportLayerCc>() {
                &observed.twcc_at_publisher
            } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
                if rr.reports.iter().any(|r| r.last_sender_report != 0) {
                    observed
                        .reports_echoing_sr_at_publisher
                        .fetch_add(1, Ordering::SeqCst);
                }
                &observed.receiver_reports_at_publisher
            } else {
                continue;
            };
            counter.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn record_track(t: Arc<dyn TrackRemote>, observed: Arc<Observed>) {
    observed.remote_tracks.lock().unwrap().push(t.clone());
    let key = format!("{} {}", t.stream_id().await, t.track_id().await);
    {
        let mut tracks = observed.tracks.lock().unwrap();
        let r = tracks.entry(key.clone()).or_default();
        r.ended = false;
    }
    let (stream_id, track_id) = (t.stream_id().await, t.track_id().await);
    let kind = format!("{}", t.kind().await);
    while let Some(e) = t.poll().await {
        match e {
            TrackRemoteEvent::OnRtpPacket(p) => {
                let mut tracks = observed.tracks.lock().unwrap();
                let r = tracks.entry(key.clone()).or_default();
                r.stream_id = stream_id.clone();
                r.track_id = track_id.clone();
                r.kind = kind.clone();
                r.ssrc = p.header.ssrc;
                r.packets += 1;
                r.last_seq = p.header.sequence_number;
                if !r.seen.insert(p.header.sequence_number) {
                    r.repeated += 1;
                }
                if r.first_payloads.len() < 20 {
                    r.first_payloads.push(p.payload.clone());
                }
            }
            TrackRemoteEvent::OnRtcpPacket(packets) => {
                let reports = packets
                    .iter()
                    .filter(|p| p.as_any().is::<SenderReport>())
                    .count();
                let mut tracks = observed.tracks.lock().unwrap();
                tracks.entry(key.clone()).or_default().sender_reports += reports as u64;
            }
            TrackRemoteEvent::OnEnded => break,
            _ => {}
        }
    }
    if let Some(r) = observed.tracks.lock().unwrap().get_mut(&key) {
        r.ended = true;
    }
}

async fn record_channel(dc: Arc<dyn DataChannel>, observed: Arc<Observed>) {
    let index = {
        let mut channels = observed.channels.lock().unwrap();
        channels.push(ReceivedChannel::default());
        channels.len() - 1
    };
    let label = dc.label().await.unwrap_or_default();
    let protocol = dc.protocol().await.unwrap_or_default();
    let ordered = dc.ordered().await.unwrap_or(true);
    let max_retransmits = dc.max_retransmits().await.ok().flatten();
    let max_packet_life_time = dc.max_packet_life_time().await.ok().flatten();
    {
        let mut channels = observed.channels.lock().unwrap();
        let c = &mut channels[index];
        c.label = label;
        c.protocol = protocol;
        c.ordered = ordered;
        c.max_retransmits = max_retransmits;
        c.max_packet_life_time = max_packet_life_time;
    }
    while let Some(e) = dc.poll().await {
        if let DataChannelEvent::OnMessage(m) = e {
            let mut channels = observed.channels.lock().unwrap();
            if m.is_string {
                channels[index]
                    .texts
                    .push(String::from_utf8_lossy(&m.data).into_owned());
            } else {
                channels[index].binaries.push(m.data.to_vec());
            }
        }
    }
}

/// How long media set-up and delivery may take in tests on a busy machine.
pub const MEDIA_WAIT: Duration = Duration::from_secs(20);

/// Whether `peer` receives exactly the audio and video of each of `publishers`, with the
/// publisher's userId as stream id and the payloads as the publisher sent them.
pub fn receives_exactly(peer: &TestPeer, publishers: &[(&str, u8)]) -> bool {
    let live = peer.live_tracks();
    let flowing: Vec<_> = live.iter().filter(|r| r.packets >= 5).collect();
    if flowing.len() != publishers.len() * 2 {
        return false;
    }
    publishers.iter().all(|(user, index)| {
        let tracks = peer.tracks_from(user);
        tracks.len() == 2
            && tracks.iter().all(|r| {
                let video = r.kind == "video";
                let expected_id = if video {
                    format!("{user}-video")
                } else {
                    format!("{user}-audio")
                };
                r.track_id == expected_id
                    && r.first_payloads.iter().all(|p| {
                        // Same bytes as sent: marker byte for the user, then the counter.
                        let at = if video { 3 } else { 2 };
                        let n = u32::from_be_bytes([p[at], p[at + 1], p[at + 2], p[at + 3]]);
                        let keyframe = video && p[1] == 0x00;
                        *p == payload(*index, video, n, keyframe)
                    })
            })
    })
}

/// Whether more of `publisher`'s packets keep reaching `peer`.
pub async fn keeps_receiving(peer: &TestPeer, publisher: &str) -> bool {
    let packets = || {
        peer.tracks_from(publisher)
            .iter()
            .map(|t| t.packets)
            .sum::<u64>()
    };
    let before = packets();
    super::eventually(MEDIA_WAIT, || packets() > before + 50).await
}
