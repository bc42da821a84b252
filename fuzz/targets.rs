//! The fuzz targets' bodies: untrusted input into what the server parses itself. Shared by the
//! libFuzzer targets (`fuzz_targets/`, `cargo +nightly fuzz run NAME`) and the stable test that
//! replays each corpus with mutations in the README's test command (`tests/fuzz_corpus.rs`).
//! A target passes when it returns: any panic is a bug. Each returns how far the input got
//! (requests parsed, packets forwarded, tracks found, datagrams routed), so the corpus test can
//! check that its seeds reach past the first check.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use rtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use switchboard::sfu::forward::{Codec, DownTrackConfig, ExtMap, Quality, TrackForwarder};
use switchboard::sfu::io::router::{ConnRef, Router, Routes};
use switchboard::sfu::io::stun;
use switchboard::sfu::peer::sdp;
use switchboard::signal::{handshake, protocol, requests};

/// The names of the targets, as `fuzz_targets/<name>.rs` and `corpus/<name>/`.
pub const TARGETS: [&str; 4] = ["signaling", "rtp_rtcp", "sdp", "demux"];

pub fn run(target: &str, data: &[u8]) -> usize {
    match target {
        "signaling" => signaling(data),
        "rtp_rtcp" => rtp_rtcp(data),
        "sdp" => sdp(data),
        "demux" => demux(data),
        other => panic!("no fuzz target {other}"),
    }
}

/// The handshake query, and an event's payload as the edge parses it: `<event>\n<JSON>`.
pub fn signaling(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let mut reached = handshake::identify(Some(text)).is_ok() as usize;
    let (event, json) = text.split_once('\n').unwrap_or(("offer", text));
    let Ok(mut payload) = serde_json::from_str::<rmpv::Value>(json) else {
        return reached;
    };
    reached += requests::parse(event, payload.clone(), 64 * 1024).is_ok() as usize;
    reached += protocol::required_str(&payload, "targetUid").is_ok() as usize;
    let _ = protocol::required_str(&payload, "roomId");
    protocol::stamp_sender(&mut payload, "fuzzer");
    reached
}

/// The forwarding core of one VP8 track with three subscribers, driven by a sequence of
/// operations: `[op, len_hi, len_lo, bytes...]`; op 0 a publisher's RTP packet, 1 a
/// subscriber's RTCP (NACKs answered from the retransmission buffer, PLI/FIR relayed), 2 a
/// quality change, 3 a new simulcast layer. Time advances 1 ms per operation.
pub fn rtp_rtcp(data: &[u8]) -> usize {
    let mut forwarder = TrackForwarder::<u32>::new(Codec::Vp8);
    forwarder.set_rids(&["q".into(), "h".into(), "f".into()]);
    forwarder.add_layer(0x1111, Some("f"));
    for id in 1..=3u64 {
        let mut ext_map = ExtMap::default();
        ext_map.insert(1, id as u8);
        let config = DownTrackConfig {
            id,
            ssrc: 0x100 + id as u32,
            payload_type: Some(96),
            ext_map,
            quality: Quality::High,
        };
        forwarder.add_down_track(config, id as u32);
    }
    let mut now = Instant::now();
    let mut reached = 0;
    let mut rest = data;
    while rest.len() >= 3 {
        let (op, len) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        let chunk = &rest[3..(3 + len).min(rest.len())];
        rest = &rest[3 + chunk.len()..];
        now += Duration::from_millis(1);
        match op % 4 {
            0 => {
                let packet = Bytes::copy_from_slice(chunk);
                forwarder.forward_raw(packet, now, |_, _, _| reached += 1);
            }
            1 => reached += subscriber_rtcp(&mut forwarder, chunk, now),
            2 => {
                let quality = [Quality::Low, Quality::Medium, Quality::High];
                let pick = chunk.first().copied().unwrap_or(0) as usize;
                forwarder.set_quality(1 + (pick % 3) as u64, quality[pick / 3 % 3]);
            }
            _ => {
                let ssrc = chunk.iter().fold(0u32, |s, b| s.rotate_left(8) ^ *b as u32);
                let rid = ["q", "h", "f", "x"][chunk.len() % 4];
                forwarder.add_layer(ssrc, Some(rid));
            }
        }
    }
    reached
}

/// How many keyframe requests and retransmissions it led to.
fn subscriber_rtcp(forwarder: &mut TrackForwarder<u32>, chunk: &[u8], now: Instant) -> usize {
    let id = 1 + chunk.first().map_or(0, |b| *b % 3) as u64;
    let Ok(packets) = rtc::rtcp::packet::unmarshal(&mut Bytes::copy_from_slice(chunk)) else {
        return 0;
    };
    let mut reached = 0;
    for p in packets {
        let any = p.as_any();
        if any.downcast_ref::<PictureLossIndication>().is_some()
            || any.downcast_ref::<FullIntraRequest>().is_some()
        {
            reached += 1;
            forwarder.on_keyframe_request(id, now);
        } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
            for pair in &nack.nacks {
                for seq in pair.packet_list() {
                    reached += forwarder.retransmission(id, seq).is_some() as usize;
                }
            }
        }
    }
    reached
}

/// What the server reads from a client's SDP itself (webrtc-rs parses the rest).
pub fn sdp(data: &[u8]) -> usize {
    let Ok(text) = std::str::from_utf8(data) else {
        return 0;
    };
    let mut reached = 0;
    for id in sdp::sending_track_ids(text, "fuzzer") {
        reached += 1 + sdp::simulcast_rids(text, "fuzzer", &id).len();
        reached += sdp::extension_ids(text, "fuzzer", &id).len();
    }
    let _ = sdp::sends_media(text);
    let _ = sdp::has_data_section(text);
    let _ = sdp::without_candidates(text);
    for line in text.lines() {
        reached += sdp::rtx_apt(line).is_some() as usize;
    }
    reached + sdp::first_mid(text).is_some() as usize
}

/// The media port's demultiplexer: which connection a datagram from an address belongs to
/// (STUN username first, then learned addresses), with two connections registered.
pub fn demux(data: &[u8]) -> usize {
    let router = Router::default();
    let conn = |key| ConnRef {
        loop_index: 0,
        key,
        id: key as u64,
    };
    router.register("ufragA", conn(1));
    router.register("ufragB", conn(2));
    let mut routes = Routes::new(0, router);
    let from: SocketAddr = ([127, 0, 0, 1], 5000).into();
    let _ = stun::is_stun(data);
    let _ = stun::local_ufrag(data);
    let Some(c) = routes.route(from, data) else {
        return 0;
    };
    routes.learn(from, c);
    let again = routes.route(from, data).is_some() as usize;
    routes.forget_conn(c);
    1 + again
}
