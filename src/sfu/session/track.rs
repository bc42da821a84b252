//! One published track: a task that reads the publisher's remote track and fans every packet out
//! to the subscribers' local tracks through the forwarding core. The task owns the core's state;
//! other tasks change it only through commands, applied between packets.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::FutureExt;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtp;
use tokio::sync::mpsc;
use tracing::{debug, warn};
use webrtc::media_stream::track_local::TrackLocal;
use webrtc::media_stream::track_local::static_rtp::TrackLocalStaticRTP;
use webrtc::media_stream::track_remote::{TrackRemote, TrackRemoteEvent};

use crate::sfu::forward::{
    Codec, DownTrackConfig, DownTrackId, Quality, RtpHeader, RtpPacket, TrackForwarder,
};

pub type Sink = Arc<TrackLocalStaticRTP>;

pub enum TrackCommand {
    AddDown {
        config: DownTrackConfig,
        sink: Sink,
    },
    Configure(DownTrackConfig),
    RemoveDown(DownTrackId),
    SetQuality(DownTrackId, Quality),
    Mute(bool),
    /// A subscriber's PLI or FIR.
    KeyframeRequest(DownTrackId),
    /// The publisher published the track again (a new remote track, same id).
    Source(Arc<dyn TrackRemote>),
}

/// Runs until the command channel closes (the track is unpublished).
pub async fn run(
    track_id: String,
    codec: Codec,
    rids: Vec<String>,
    mut remote: Arc<dyn TrackRemote>,
    mut commands: mpsc::UnboundedReceiver<TrackCommand>,
) {
    let mut forwarder: TrackForwarder<Sink> = TrackForwarder::new(codec);
    forwarder.set_rids(&rids);
    // SSRCs that turned out not to be a missing layer: not looked up again.
    let mut not_layers: Vec<u32> = Vec::new();
    let mut out: Vec<(Sink, RtpHeader)> = Vec::new();
    let mut source_open = true;
    let mut dropped: u64 = 0;
    loop {
        tokio::select! {
            biased;
            command = commands.recv() => {
                let Some(command) = command else { break };
                match command {
                    TrackCommand::Source(new_remote) => {
                        remote = new_remote;
                        source_open = true;
                    }
                    other => apply(&mut forwarder, &*remote, other).await,
                }
            }
            event = remote.poll(), if source_open => match event {
                Some(TrackRemoteEvent::OnOpen(init)) => {
                    forwarder.add_layer(init.ssrc, init.rid.as_deref());
                }
                Some(TrackRemoteEvent::OnRtpPacket(packet)) => {
                    let packet = from_rtc(packet);
                    let ssrc = packet.header.ssrc;
                    if !forwarder.has_layer(ssrc) && !not_layers.contains(&ssrc) && not_layers.len() < 16 {
                        // Its OnOpen may have been lost (a full event queue drops it).
                        let rid = remote.rid(ssrc).await;
                        if forwarder.lacks_layer(rid.as_deref()) {
                            forwarder.add_layer(ssrc, rid.as_deref());
                        } else {
                            not_layers.push(ssrc);
                        }
                    }
                    let keyframe_for = forwarder.forward(&packet, Instant::now(), |sink, header, _| {
                        out.push((sink.clone(), header.clone()));
                    });
                    for (sink, header) in out.drain(..) {
                        // Never wait for one subscriber: webrtc's write_rtp waits when that
                        // connection's queue is full, which would stall every other subscriber
                        // and the publisher's reads. Such a subscriber loses this packet instead.
                        match sink.write_rtp(to_rtc(header, packet.payload.clone())).now_or_never() {
                            Some(Ok(())) => {}
                            Some(Err(e)) => debug!(track = %track_id, "write_rtp: {e}"),
                            None => dropped += 1,
                        }
                    }
                    if let Some(ssrc) = keyframe_for {
                        request_keyframe(&*remote, ssrc).await;
                    }
                }
                Some(TrackRemoteEvent::OnEnded) | None => source_open = false,
                Some(_) => {}
            },
        }
    }
    let stats = forwarder.stats;
    debug!(track = %track_id, packets = stats.packets, malformed = stats.malformed, dropped, "fan-out ended");
}

async fn apply(
    forwarder: &mut TrackForwarder<Sink>,
    remote: &dyn TrackRemote,
    command: TrackCommand,
) {
    match command {
        TrackCommand::AddDown { config, sink } => forwarder.add_down_track(config, sink),
        TrackCommand::Configure(config) => forwarder.configure_down_track(config),
        TrackCommand::RemoveDown(id) => {
            forwarder.remove_down_track(id);
        }
        TrackCommand::SetQuality(id, quality) => forwarder.set_quality(id, quality),
        TrackCommand::Mute(muted) => forwarder.set_muted(muted),
        TrackCommand::KeyframeRequest(id) => {
            if let Some(ssrc) = forwarder.on_keyframe_request(id, Instant::now()) {
                request_keyframe(remote, ssrc).await;
            }
        }
        TrackCommand::Source(_) => unreachable!("handled by the loop"),
    }
}

async fn request_keyframe(remote: &dyn TrackRemote, media_ssrc: u32) {
    let pli = PictureLossIndication {
        sender_ssrc: 0,
        media_ssrc,
    };
    if let Err(e) = remote.write_rtcp(vec![Box::new(pli)]).await {
        warn!("cannot send PLI upstream: {e}");
    }
}

/// webrtc's parsed packet into the core's form (extension values stay shared).
fn from_rtc(p: rtp::Packet) -> RtpPacket {
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
        header.extensions.push(e.id, e.payload);
    }
    RtpPacket {
        header,
        payload: p.payload,
    }
}

fn to_rtc(h: RtpHeader, payload: Bytes) -> rtp::Packet {
    let extensions: Vec<rtp::header::Extension> = h
        .extensions
        .iter()
        .map(|(id, value)| rtp::header::Extension {
            id: *id,
            payload: value.clone(),
        })
        .collect();
    rtp::Packet {
        header: rtp::header::Header {
            version: 2,
            padding: false,
            extension: !extensions.is_empty(),
            marker: h.marker,
            payload_type: h.payload_type,
            sequence_number: h.sequence_number,
            timestamp: h.timestamp,
            ssrc: h.ssrc,
            csrc: Vec::new(),
            extension_profile: if extensions.is_empty() { 0 } else { 0xBEDE },
            extensions,
            ..Default::default()
        },
        payload,
    }
}
