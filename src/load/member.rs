//! One member of a load run: socket.io signaling with `sfu`, a publisher connection that sends a
//! video track of pre-built packets on a schedule (and optionally data-channel messages), and a
//! subscriber connection that counts what it receives per publisher. No decoding: the figures
//! are meant to be the server's.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::media_stream::MediaStreamTrack;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use rtc::rtp_transceiver::rtp_sender::{
    RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
};
use serde_json::{Value, json};
use tokio::sync::mpsc;
use webrtc::data_channel::{DataChannel, DataChannelEvent};
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_local::{TrackLocal, TrackLocalEvent};
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};
use webrtc::peer_connection::{PeerConnection, RTCPeerConnectionState};

use super::Pacing;
use super::peer::{ClientFactory, PeerEvent};
use super::sfu_client::{CLOSE, Connections, Outbox, drive, relay_events, subscriber_offer};
use super::signaling::Client;
use crate::sfu::api::PcKind;

/// Label of the data channel a load publisher sends on.
pub const DATA_LABEL: &str = "load";
const VIDEO_SSRC: u32 = 0x1000_0000;

/// Packets received from one publisher, with sequence numbers unwrapped, for loss.
#[derive(Default)]
pub struct StreamCounter {
    pub received: AtomicU64,
    /// Highest extended sequence number seen (+1, so 0 means none yet).
    pub highest: AtomicU64,
}

/// What a member saw; shared with the run's reporting.
pub struct MemberStats {
    pub started: Instant,
    /// Per publisher (userId): its video as received here.
    pub streams: Mutex<HashMap<String, Arc<StreamCounter>>>,
    pub publisher_setup: Mutex<Option<Duration>>,
    pub subscriber_setup: Mutex<Option<Duration>>,
    /// From joining to the first media packet received.
    pub first_packet: Mutex<Option<Duration>>,
    pub data_received: AtomicU64,
    pub data_sent: AtomicU64,
    pub packets_sent: AtomicU64,
    /// When the publisher's offer went out / the first subscriber offer came in.
    publisher_offer_at: Mutex<Option<Instant>>,
    subscriber_offer_at: Mutex<Option<Instant>>,
}

impl MemberStats {
    fn new() -> Self {
        MemberStats {
            started: Instant::now(),
            streams: Mutex::default(),
            publisher_setup: Mutex::default(),
            subscriber_setup: Mutex::default(),
            first_packet: Mutex::default(),
            data_received: AtomicU64::new(0),
            data_sent: AtomicU64::new(0),
            packets_sent: AtomicU64::new(0),
            publisher_offer_at: Mutex::default(),
            subscriber_offer_at: Mutex::default(),
        }
    }

    /// Publishers whose video reached this member.
    pub fn receiving_from(&self) -> usize {
        lock(&self.streams)
            .values()
            .filter(|s| s.received.load(Ordering::Relaxed) > 0)
            .count()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// How a publishing member sends.
#[derive(Clone, Copy, Debug)]
pub struct Sending {
    pub pps: f64,
    pub payload_bytes: usize,
    pub pacing: Pacing,
    /// Data-channel messages per second (0: no channel).
    pub data_rate: f64,
    /// Steps fall at `epoch + phase + k * step`: publishers are independent senders, their
    /// steps spread over the step interval (browsers do not tick together).
    pub epoch: Instant,
    pub phase: Duration,
}

pub struct Member {
    pub user: String,
    pub publishes: bool,
    pub stats: Arc<MemberStats>,
    out: Outbox,
    connections: Connections,
    running: Arc<AtomicBool>,
}

impl Member {
    /// Connects, starts the media session (a publisher offer, or `call`) and, for a publisher,
    /// starts sending.
    pub async fn join(
        server: SocketAddr,
        factory: &ClientFactory,
        user: &str,
        room: &str,
        sending: Option<Sending>,
    ) -> anyhow::Result<Member> {
        let query = format!("userId={user}&roomId={room}");
        let client = Client::connect(server, &query).await?;
        let stats = Arc::new(MemberStats::new());
        let running = Arc::new(AtomicBool::new(true));
        let (out_tx, out_rx) = mpsc::unbounded_channel();
        let publisher = match sending {
            Some(sending) => {
                Some(start_publisher(factory, user, sending, &stats, &running, &out_tx).await?)
            }
            None => {
                let _ = out_tx.send(("call".into(), json!({"targetUid": "sfu"})));
                None
            }
        };
        let connections = Connections {
            publisher,
            ..Default::default()
        };
        let (conns, factory, stats_, out) = (
            connections.clone(),
            factory.clone(),
            stats.clone(),
            out_tx.clone(),
        );
        tokio::spawn(drive(
            client,
            out_rx,
            async move |client: &Client, name: String, envelope: Value| {
                if name != "msg" {
                    return;
                }
                if subscriber_offer(&envelope).is_some() {
                    lock(&stats_.subscriber_offer_at).get_or_insert_with(Instant::now);
                }
                let new_subscriber = async || new_subscriber(&factory, &stats_, &out).await;
                let _ = conns.apply(client, &envelope, new_subscriber).await;
            },
        ));
        Ok(Member {
            user: user.to_owned(),
            publishes: sending.is_some(),
            stats,
            out: out_tx,
            connections,
            running,
        })
    }

    pub async fn close(self) {
        self.running.store(false, Ordering::SeqCst);
        if let Some(pc) = &self.connections.publisher {
            let _ = pc.close().await;
        }
        if let Some(pc) = self.connections.subscriber() {
            let _ = pc.close().await;
        }
        let _ = self.out.send((CLOSE.into(), Value::Null));
    }
}

fn video_track(user: &str) -> Arc<TrackLocalStaticRTP> {
    Arc::new(TrackLocalStaticRTP::new(MediaStreamTrack::new(
        user.to_owned(),
        format!("{user}-video"),
        format!("{user}-video"),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(VIDEO_SSRC),
                ..Default::default()
            },
            codec: RTCRtpCodec {
                mime_type: "video/VP8".into(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: String::new(),
                rtcp_feedback: vec![],
            },
            ..Default::default()
        }],
    )))
}

async fn start_publisher(
    factory: &ClientFactory,
    user: &str,
    sending: Sending,
    stats: &Arc<MemberStats>,
    running: &Arc<AtomicBool>,
    out: &Outbox,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let (pc, events) = factory.build().await?;
    let video = video_track(user);
    pc.add_track(video.clone() as Arc<dyn TrackLocal>).await?;
    let channel = if sending.data_rate > 0.0 {
        Some(pc.create_data_channel(DATA_LABEL, None).await?)
    } else {
        None
    };
    let stats_ = stats.clone();
    relay_events(events, out.clone(), PcKind::Publisher, move |e| {
        if let PeerEvent::State(RTCPeerConnectionState::Connected) = e {
            let at = *lock(&stats_.publisher_offer_at);
            if let Some(at) = at {
                lock(&stats_.publisher_setup).get_or_insert(at.elapsed());
            }
        }
    });
    let keyframe = Arc::new(AtomicBool::new(true));
    tokio::spawn(watch_keyframe_requests(video.clone(), keyframe.clone()));
    let (handle, stats_, running_) = (
        tokio::runtime::Handle::current(),
        stats.clone(),
        running.clone(),
    );
    std::thread::Builder::new()
        .name(format!("send-{user}"))
        .spawn(move || send_video(video, sending, keyframe, stats_, running_, handle))?;
    if let Some(channel) = channel {
        tokio::spawn(send_data(
            channel,
            sending.data_rate,
            stats.clone(),
            running.clone(),
        ));
    }
    let offer = pc.create_offer(None).await?;
    pc.set_local_description(offer.clone()).await?;
    *lock(&stats.publisher_offer_at) = Some(Instant::now());
    let _ = out.send((
        "offer".into(),
        json!({"targetUid": "sfu", "pc": "publisher", "sdp": {"type": "offer", "sdp": offer.sdp}}),
    ));
    Ok(pc)
}

/// A PLI or FIR from the server makes the next packet a keyframe, as a browser does.
async fn watch_keyframe_requests(video: Arc<TrackLocalStaticRTP>, keyframe: Arc<AtomicBool>) {
    while let Some(TrackLocalEvent::OnRtcpPacket(packets)) = video.poll().await {
        if packets.iter().any(|p| {
            let any = p.as_any();
            any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>()
        }) {
            keyframe.store(true, Ordering::Relaxed);
        }
    }
}

/// VP8 packets of `payload_bytes`, a frame every 1/30 s: paced (packets spread in 2 ms steps,
/// as a browser's pacer sends) or in bursts (a frame's packets at once). A thread of its own
/// keeps the steps on time (tokio's timers have a 1 ms resolution, which would make every
/// publisher send at the same instant).
fn send_video(
    video: Arc<TrackLocalStaticRTP>,
    sending: Sending,
    keyframe: Arc<AtomicBool>,
    stats: Arc<MemberStats>,
    running: Arc<AtomicBool>,
    runtime: tokio::runtime::Handle,
) {
    let payload = |key: bool| {
        let mut p = vec![0xABu8; sending.payload_bytes.max(3)];
        p[0] = 0x10; // VP8 descriptor: start of partition 0
        p[1] = if key { 0x00 } else { 0x01 }; // P bit clear on keyframes
        Bytes::from(p)
    };
    let (key_payload, delta_payload) = (payload(true), payload(false));
    let (step, per_step) = super::schedule(sending.pacing, sending.pps);
    let per_frame = (sending.pps / 30.0).max(1.0);
    let (mut carry, mut seq, mut sent) = (0.0f64, 0u16, 0u64);
    let mut last_keyframe = Instant::now();
    let mut due = sending.epoch + sending.phase;
    while due < Instant::now() {
        due += step;
    }
    while running.load(Ordering::Relaxed) {
        let now = Instant::now();
        if due > now {
            std::thread::sleep(due - now);
        }
        due += step;
        carry += per_step;
        while carry >= 1.0 {
            carry -= 1.0;
            let frame = (sent as f64 / per_frame) as u32;
            let last_of_frame = ((sent + 1) as f64 / per_frame) as u32 != frame;
            let first_of_frame = sent == 0 || ((sent - 1) as f64 / per_frame) as u32 != frame;
            // A keyframe when asked for, and every 3 s, starting at a frame's first packet.
            let key = first_of_frame
                && (keyframe.swap(false, Ordering::Relaxed)
                    || last_keyframe.elapsed() > Duration::from_secs(3));
            if key {
                last_keyframe = Instant::now();
            }
            seq = seq.wrapping_add(1);
            let p = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    marker: last_of_frame,
                    payload_type: 96,
                    sequence_number: seq,
                    timestamp: frame.wrapping_mul(3000),
                    ssrc: VIDEO_SSRC,
                    ..Default::default()
                },
                payload: if key {
                    key_payload.clone()
                } else {
                    delta_payload.clone()
                },
            };
            if runtime.block_on(video.write_rtp(p)).is_ok() {
                stats.packets_sent.fetch_add(1, Ordering::Relaxed);
            }
            sent += 1;
        }
    }
}

async fn send_data(
    channel: Arc<dyn DataChannel>,
    rate: f64,
    stats: Arc<MemberStats>,
    running: Arc<AtomicBool>,
) {
    let open = Arc::new(AtomicBool::new(false));
    {
        let (channel, open) = (channel.clone(), open.clone());
        tokio::spawn(async move {
            while let Some(e) = channel.poll().await {
                if matches!(e, DataChannelEvent::OnOpen) {
                    open.store(true, Ordering::SeqCst);
                }
            }
        });
    }
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate));
    let message = BytesMut::from(&[0x5Au8; 100][..]);
    while running.load(Ordering::Relaxed) {
        tick.tick().await;
        if open.load(Ordering::SeqCst) && channel.send(message.clone()).await.is_ok() {
            stats.data_sent.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// The subscriber connection, made on the server's first offer: it counts what arrives.
async fn new_subscriber(
    factory: &ClientFactory,
    stats: &Arc<MemberStats>,
    out: &Outbox,
) -> anyhow::Result<Arc<dyn PeerConnection>> {
    let (pc, events) = factory.build().await?;
    let stats = stats.clone();
    relay_events(events, out.clone(), PcKind::Subscriber, move |e| match e {
        PeerEvent::Track(t) => {
            tokio::spawn(count_track(t, stats.clone()));
        }
        PeerEvent::DataChannel(dc) => {
            tokio::spawn(count_channel(dc, stats.clone()));
        }
        PeerEvent::State(RTCPeerConnectionState::Connected) => {
            let at = *lock(&stats.subscriber_offer_at);
            if let Some(at) = at {
                lock(&stats.subscriber_setup).get_or_insert(at.elapsed());
            }
        }
        _ => {}
    });
    Ok(pc)
}

/// Counts a publisher's video packets as they arrive (sequence numbers unwrapped for loss).
async fn count_track(t: Arc<dyn TrackRemote>, stats: Arc<MemberStats>) {
    if t.kind().await != RtpCodecKind::Video {
        while t.poll().await.is_some() {}
        return;
    }
    let publisher = t.stream_id().await;
    let counter = lock(&stats.streams).entry(publisher).or_default().clone();
    let mut extended: Option<u64> = None;
    while let Some(e) = t.poll().await {
        let TrackRemoteEvent::OnRtpPacket(p) = e else {
            continue;
        };
        let seq = p.header.sequence_number;
        let ext = match extended {
            None => {
                lock(&stats.first_packet).get_or_insert(stats.started.elapsed());
                seq as u64 + (1 << 16)
            }
            Some(last) => {
                let delta = seq.wrapping_sub(last as u16) as i16 as i64;
                (last as i64 + delta).max(0) as u64
            }
        };
        extended = Some(extended.map_or(ext, |l| l.max(ext)));
        counter.received.fetch_add(1, Ordering::Relaxed);
        counter.highest.fetch_max(ext + 1, Ordering::Relaxed);
    }
}

async fn count_channel(dc: Arc<dyn DataChannel>, stats: Arc<MemberStats>) {
    let load = dc.label().await.is_ok_and(|l| l == DATA_LABEL);
    while let Some(e) = dc.poll().await {
        if load && matches!(e, DataChannelEvent::OnMessage(_)) {
            stats.data_received.fetch_add(1, Ordering::Relaxed);
        }
    }
}
