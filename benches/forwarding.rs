//! The forwarding path without a network, each bench asserting that its packets arrived:
//!
//! - `fanout/N`: the forwarding core alone, one 1000-byte VP8 packet to N down-tracks, each with
//!   its own SSRC, payload type, offsets and one mapped header extension (per element: one
//!   packet to one down-track).
//! - `srtp/*`: protecting one forwarded 1000-byte packet: rtc-srtp's own `encrypt_rtp` (a new
//!   buffer per packet) against the in-place protect of the vendor/rtc-srtp patch, for AES-GCM
//!   and AES-CM + HMAC-SHA1.
//! - `egress/N`: what the server does per subscriber after the core: header written into a
//!   reused buffer, payload copied, SRTP in place (AES-GCM, one context per subscriber), queued;
//!   then the batch assembled into sendmmsg/GSO messages (the syscall left out).
//!   `egress-cold/N`: the same with the core's caches swept before each packet, as they are
//!   when a paced publisher's packets arrive one per wake-up and other processes run between.
//! - `demux/*`: routing a datagram: a known address (the steady state), and the STUN username
//!   of a first contact.
//! - `receive/webrtc-rs`: what webrtc-rs's core does with one SRTP video packet from a
//!   publisher before the forwarding core sees it (a source's first packets take this path):
//!   `handle_read` (SRTP decrypt, stats; the server's publisher connections carry no receive
//!   interceptor), then `poll_event`, `poll_read`, `poll_write` and `poll_timeout` as the event
//!   loop calls them. The publisher is a second `rtc` connection in memory, connected to the
//!   server's through a DTLS handshake run without a network.
//! - `receive/lean`: the same packets on the server's own receive path once the source is bound
//!   (`switchboard::sfu::ingress`): decrypt in place, parse, NACK / receiver-report / TWCC
//!   recording.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BatchSize, BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use rtc::srtp::context::Context;
use rtc::srtp::protection_profile::ProtectionProfile;
use switchboard::sfu::api::PcKind;
use switchboard::sfu::egress::{Egress, Rollover, Route, protect_rtp};
use switchboard::sfu::forward::{
    Codec, DownTrackConfig, ExtMap, Quality, RtpHeader, RtpPacket, TrackForwarder, write_header,
};
use switchboard::sfu::ingress::{self, Ingress};
use switchboard::sfu::io::router::{ConnRef, Router, Routes};
use switchboard::sfu::io::{SendBatch, stun};
use switchboard::sfu::peer::PeerSettings;

fn forwarder(downs: u64) -> TrackForwarder<u64> {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(0x1234, None);
    for id in 0..downs {
        let mut ext_map = ExtMap::default();
        ext_map.insert(1, 1 + (id % 3) as u8);
        let config = DownTrackConfig {
            id,
            ssrc: 0x10_0000 + id as u32,
            payload_type: Some(96 + (id % 4) as u8),
            ext_map,
            quality: Quality::High,
        };
        f.add_down_track(config, id);
    }
    f
}

fn packet(seq: u16, keyframe: bool) -> RtpPacket {
    let mut payload = vec![0u8; 1000];
    payload[0] = 0x10;
    payload[1] = if keyframe { 0x00 } else { 0x01 };
    let mut header = RtpHeader {
        payload_type: 96,
        sequence_number: seq,
        timestamp: seq as u32 * 3000,
        ssrc: 0x1234,
        ..Default::default()
    };
    header.extensions.push(1, Bytes::from_static(&[0x30]));
    header.extensions.push(3, Bytes::from_static(&[0, 1, 2]));
    RtpPacket {
        header,
        payload: Bytes::from(payload),
    }
}

fn srtp_context(profile: ProtectionProfile, seed: u8) -> Context {
    let crypto = rtc::crypto::default_provider().expect("a crypto provider");
    let key = vec![seed; profile.key_len()];
    let salt = vec![seed ^ 0x5A; profile.salt_len()];
    Context::new(&key, &salt, profile, None, None, crypto.crypto()).expect("an SRTP context")
}

fn fanout(c: &mut Criterion) {
    let mut group = c.benchmark_group("fanout");
    for downs in [1u64, 10, 100, 1000] {
        group.throughput(Throughput::Elements(downs));
        group.bench_with_input(BenchmarkId::from_parameter(downs), &downs, |b, &downs| {
            let mut f = forwarder(downs);
            let start = Instant::now();
            // Every down-track starts on a keyframe; then steady-state delta frames.
            f.forward(&packet(0, true), start, |_, _, _| {});
            let mut p = packet(1, false);
            let mut seq = 1u16;
            let (mut sum, mut packets, mut copies) = (0u64, 0u64, 0u64);
            b.iter(|| {
                seq = seq.wrapping_add(1);
                p.header.sequence_number = seq;
                p.header.timestamp = p.header.timestamp.wrapping_add(3000);
                packets += 1;
                f.forward(&p, start + Duration::from_millis(1), |sink, h, payload| {
                    copies += 1;
                    sum += black_box(*sink)
                        + black_box(h.sequence_number) as u64
                        + payload.len() as u64;
                });
            });
            black_box(sum);
            // The figure is only meaningful if every packet reached every down-track (a forwarder
            // that drops packets, say after the sequence numbers wrap, would look fast).
            assert_eq!(copies, packets * downs, "packets were dropped");
        });
    }
    group.finish();
}

fn srtp(c: &mut Criterion) {
    let mut group = c.benchmark_group("srtp");
    group.throughput(Throughput::Elements(1));
    let p = packet(1, false);
    for (name, profile) in [
        ("aes-gcm", ProtectionProfile::AeadAes128Gcm),
        ("aes-cm-hmac-sha1", ProtectionProfile::Aes128CmHmacSha1_80),
    ] {
        let mut header = p.header.clone();
        let mut plain = Vec::new();
        group.bench_function(format!("{name}/allocating"), |b| {
            let mut ctx = srtp_context(profile, 1);
            let mut bytes = 0usize;
            b.iter(|| {
                header.sequence_number = header.sequence_number.wrapping_add(1);
                write_header(&header, &mut plain);
                plain.extend_from_slice(&p.payload);
                let out = ctx.encrypt_rtp(&plain).expect("protects");
                bytes += black_box(out.len());
            });
            assert!(bytes > 0);
        });
        group.bench_function(format!("{name}/in-place"), |b| {
            let mut ctx = srtp_context(profile, 1);
            let mut rollover = Rollover::default();
            let mut buf = Vec::with_capacity(2048);
            let mut bytes = 0usize;
            b.iter(|| {
                header.sequence_number = header.sequence_number.wrapping_add(1);
                let roc = rollover.roc_for(header.sequence_number);
                protect_rtp(&mut ctx, &header, &p.payload, roc, &mut buf).expect("protects");
                bytes += black_box(buf.len());
            });
            assert!(bytes > 0);
        });
    }
    group.finish();
}

/// More than this machine's per-core L2 cache (2 MiB): written through between two packets.
const CACHE_SWEEP_BYTES: usize = 8 << 20;

fn evict_caches(sweep: &mut [u8]) {
    for line in sweep.chunks_mut(64) {
        line[0] = line[0].wrapping_add(1);
    }
    black_box(sweep);
}

fn egress(c: &mut Criterion) {
    egress_group(c, "egress", false);
    egress_group(c, "egress-cold", true);
}

fn egress_group(c: &mut Criterion, name: &str, cold: bool) {
    let mut group = c.benchmark_group(name);
    for subscribers in [10u64, 50] {
        group.throughput(Throughput::Elements(subscribers));
        group.bench_with_input(
            BenchmarkId::from_parameter(subscribers),
            &subscribers,
            |b, &n| {
                let mut f = forwarder(n);
                let mut egress: Vec<(Egress, usize, Context)> = (0..n)
                    .map(|i| {
                        let mut e = Egress::default();
                        let slot = e.add(0x10_0000 + i as u32, 90_000);
                        let ctx = srtp_context(ProtectionProfile::AeadAes128Gcm, i as u8);
                        (e, slot, ctx)
                    })
                    .collect();
                let mut batch = SendBatch::new(true);
                let start = Instant::now();
                f.forward(&packet(0, true), start, |_, _, _| {});
                let mut p = packet(1, false);
                let (mut packets, mut datagrams) = (0u64, 0u64);
                let mut send_one = || {
                    p.header.sequence_number = p.header.sequence_number.wrapping_add(1);
                    packets += 1;
                    f.forward(&p, start, |sink, h, payload| {
                        let (e, slot, ctx) = &mut egress[*sink as usize];
                        let to = SocketAddr::from(([127, 0, 0, 1], 20_000 + *sink as u16));
                        let route = Route {
                            to,
                            key: *sink as u32,
                        };
                        e.send(*slot, h, payload, start, ctx, route, &mut batch);
                    });
                    datagrams += batch.assemble_and_discard() as u64;
                };
                if cold {
                    // Between two packets of a paced sender the server sleeps and other
                    // processes run: the subscribers' state is no longer in the core's caches.
                    let mut sweep = vec![0u8; CACHE_SWEEP_BYTES];
                    b.iter_batched(
                        || evict_caches(&mut sweep),
                        |_| send_one(),
                        BatchSize::PerIteration,
                    );
                } else {
                    b.iter(&mut send_one);
                }
                assert_eq!(
                    datagrams,
                    packets * n,
                    "every subscriber's datagram was queued"
                );
            },
        );
    }
    group.finish();
}

fn demux(c: &mut Criterion) {
    let mut group = c.benchmark_group("demux");
    group.throughput(Throughput::Elements(1));
    let router = Router::default();
    let mut routes = Routes::new(0, router.clone());
    let conns: Vec<SocketAddr> = (0..100)
        .map(|i| SocketAddr::from(([127, 0, 0, 1], 30_000 + i)))
        .collect();
    for (i, addr) in conns.iter().enumerate() {
        let conn = ConnRef {
            loop_index: 0,
            key: i,
            id: i as u64,
        };
        routes.learn(*addr, conn);
    }
    let rtp = [0x80u8; 1012];
    group.bench_function("known-address", |b| {
        let mut i = 0;
        let mut found = 0usize;
        b.iter(|| {
            i = (i + 1) % conns.len();
            found += routes.route(conns[i], &rtp).map_or(0, |c| c.key + 1);
        });
        assert!(found > 0);
    });
    // A binding request: USERNAME after a PRIORITY attribute, as browsers send it.
    let mut request = vec![0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xA4, 0x42];
    request.extend_from_slice(&[7; 12]);
    request.extend_from_slice(&[0x00, 0x24, 0x00, 0x04, 1, 2, 3, 4]);
    let username = b"AbCdEfGhIjKlMnOp:remoteUfrag";
    request.extend_from_slice(&[0x00, 0x06, 0x00, username.len() as u8]);
    request.extend_from_slice(username);
    while request.len() % 4 != 0 {
        request.push(0);
    }
    let attrs = (request.len() - 20) as u16;
    request[2..4].copy_from_slice(&attrs.to_be_bytes());
    router.register(
        "AbCdEfGhIjKlMnOp",
        ConnRef {
            loop_index: 0,
            key: 7,
            id: 7,
        },
    );
    group.bench_function("stun-username", |b| {
        let mut n = 0usize;
        b.iter(|| n += stun::local_ufrag(black_box(&request)).map_or(0, |u| u.len()));
        assert!(n > 0);
    });
    group.finish();
}

/// A publisher connection (a plain `rtc` client) and the server's side of it (built as the server
/// builds its publisher connections), connected in memory: (publisher, server).
fn connected_pair() -> (
    rtc::peer_connection::RTCPeerConnection,
    rtc::peer_connection::RTCPeerConnection,
) {
    use rtc::media_stream::MediaStreamTrack;
    use rtc::peer_connection::RTCPeerConnectionBuilder;
    use rtc::peer_connection::configuration::interceptor_registry::register_default_interceptors;
    use rtc::peer_connection::configuration::setting_engine::SettingEngineBuilder;
    use rtc::peer_connection::transport::RTCIceCandidateInit;
    use rtc::rtp_transceiver::rtp_sender::{
        RTCRtpCodec, RTCRtpCodingParameters, RTCRtpEncodingParameters, RtpCodecKind,
    };
    use rtc::sansio::Protocol;

    let mut now = Instant::now();
    let (client_addr, server_addr) = (publisher_addr(), server_addr());
    let mut me =
        switchboard::sfu::peer::media_engine(&switchboard::sfu::peer::VIDEO_CODECS).unwrap();
    let registry =
        register_default_interceptors(rtc::interceptor::Registry::new(), &mut me).unwrap();
    let settings = SettingEngineBuilder::new()
        .with_multicast_dns_mode(rtc::ice::mdns::MulticastDnsMode::Disabled)
        .build();
    let mut client = RTCPeerConnectionBuilder::new()
        .with_media_engine(me)
        .with_setting_engine(settings)
        .with_interceptor_registry(registry)
        .build(now)
        .unwrap();
    let config = switchboard::config::Config::defaults().media;
    let server_settings = PeerSettings::new(&config, server_addr).unwrap();
    let mut server = server_settings
        .build(
            PcKind::Publisher,
            "benchufrag",
            "benchpassword0123456789abcdef",
            now,
        )
        .unwrap();
    let track = MediaStreamTrack::new(
        "bench".into(),
        "bench-video".into(),
        "bench-video".into(),
        RtpCodecKind::Video,
        vec![RTCRtpEncodingParameters {
            rtp_coding_parameters: RTCRtpCodingParameters {
                ssrc: Some(PUBLISHER_SSRC),
                ..Default::default()
            },
            codec: RTCRtpCodec {
                mime_type: "video/VP8".into(),
                clock_rate: 90_000,
                ..Default::default()
            },
            ..Default::default()
        }],
    );
    client.add_track(track).unwrap();
    let offer = client.create_offer(None).unwrap();
    client.set_local_description(now, offer.clone()).unwrap();
    server.set_remote_description(now, offer).unwrap();
    let answer = server.create_answer(None).unwrap();
    server.set_local_description(now, answer.clone()).unwrap();
    client.set_remote_description(now, answer).unwrap();
    let candidate = |a: SocketAddr| RTCIceCandidateInit {
        candidate: format!(
            "candidate:1 1 udp 2130706431 {} {} typ host",
            a.ip(),
            a.port()
        ),
        sdp_mid: Some("0".into()),
        sdp_mline_index: Some(0),
        ..Default::default()
    };
    client.add_local_candidate(candidate(client_addr)).unwrap();
    server.add_local_candidate(candidate(server_addr)).unwrap();
    client.add_remote_candidate(candidate(server_addr)).unwrap();
    server.add_remote_candidate(candidate(client_addr)).unwrap();
    for _ in 0..3000 {
        exchange(&mut client, &mut server, now);
        now += Duration::from_millis(1);
        let _ = client.handle_timeout(now);
        let _ = server.handle_timeout(now);
        if client.local_srtp_context().is_some() && server.local_srtp_context().is_some() {
            break;
        }
    }
    assert!(
        client.local_srtp_context().is_some(),
        "DTLS completes in memory"
    );
    (client, server)
}

const PUBLISHER_SSRC: u32 = 0x5EED_0001;

fn publisher_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 5000))
}

fn server_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7882))
}

fn tagged(
    now: Instant,
    from: SocketAddr,
    to: SocketAddr,
    data: bytes::BytesMut,
) -> rtc::shared::TaggedBytesMut {
    rtc::shared::TaggedBytesMut {
        now,
        transport: rtc::shared::TransportContext {
            local_addr: to,
            peer_addr: from,
            ecn: None,
            transport_protocol: rtc::shared::TransportProtocol::UDP,
        },
        message: data,
    }
}

/// Delivers everything each side has to send to the other, and drains their events and reads.
fn exchange(
    client: &mut rtc::peer_connection::RTCPeerConnection,
    server: &mut rtc::peer_connection::RTCPeerConnection,
    now: Instant,
) {
    use rtc::sansio::Protocol;
    let (c, s) = (publisher_addr(), server_addr());
    while let Some(out) = client.poll_write() {
        let _ = server.handle_read(tagged(now, c, s, out.message));
    }
    while let Some(out) = server.poll_write() {
        let _ = client.handle_read(tagged(now, s, c, out.message));
    }
    while client.poll_event().is_some() {}
    while client.poll_read().is_some() {}
    while server.poll_event().is_some() {}
    while server.poll_read().is_some() {}
}

fn receive(c: &mut Criterion) {
    use rtc::peer_connection::message::RTCMessage;
    use rtc::sansio::Protocol;
    let mut group = c.benchmark_group("receive");
    group.throughput(Throughput::Elements(1));
    let (mut client, mut server) = connected_pair();
    let payload = Bytes::from(vec![0x10u8; 1000]);
    let (mut seq, mut sent, mut got) = (0u16, 0u64, 0u64);
    let start = Instant::now();
    group.bench_function("webrtc-rs", |b| {
        b.iter_batched(
            || {
                seq = seq.wrapping_add(1);
                publisher_datagram(&mut client, seq, &payload)
            },
            |datagram| {
                sent += 1;
                let now = start + Duration::from_micros(sent * 1000);
                let _ = server.handle_read(tagged(now, publisher_addr(), server_addr(), datagram));
                while server.poll_event().is_some() {}
                while let Some(m) = server.poll_read() {
                    if let RTCMessage::RtpPacket(_, p) = m.message {
                        got += 1;
                        black_box(p);
                    }
                }
                while server.poll_write().is_some() {}
                black_box(server.poll_timeout());
            },
            criterion::BatchSize::SmallInput,
        );
    });
    assert_eq!(got, sent, "every packet reached the application");

    // The same packets on the server's own receive path, once the source is bound (as the event
    // loop binds it when webrtc-rs announces the track): decrypt in place, NACK / report / TWCC
    // recording, RTX check. The source's first packet goes through webrtc-rs (when a filter
    // skipped the bench above, this is what makes the receiver known).
    seq = seq.wrapping_add(1);
    let first = publisher_datagram(&mut client, seq, &payload);
    let _ = server.handle_read(tagged(start, publisher_addr(), server_addr(), first));
    while server.poll_event().is_some() {}
    while server.poll_read().is_some() {}
    let receiver = server
        .get_receivers()
        .next()
        .expect("the publisher's receiver");
    let info = ingress::stream_info(&mut server, receiver, PUBLISHER_SSRC).expect("negotiated");
    let mut lean = Ingress::default();
    lean.bind(&info, 0);
    let (mut sent, mut got) = (0u64, 0u64);
    group.bench_function("lean", |b| {
        b.iter_batched(
            || {
                seq = seq.wrapping_add(1);
                publisher_datagram(&mut client, seq, &payload)
            },
            |datagram| {
                sent += 1;
                let now = start + Duration::from_micros(sent * 1000);
                let source = lean.source_of(&datagram).expect("a bound source");
                let srtp = server.remote_srtp_context().unwrap();
                if let Ok(Some((_, p))) = lean.receive(source, srtp, &datagram, now) {
                    got += 1;
                    black_box(p);
                }
                black_box(lean.poll_timeout());
            },
            criterion::BatchSize::SmallInput,
        );
    });
    group.finish();
    assert_eq!(got, sent, "every packet taken by the lean path");
}

/// Packet `seq` of the publisher's video, SRTP-protected by the client as it would send it.
fn publisher_datagram(
    client: &mut rtc::peer_connection::RTCPeerConnection,
    seq: u16,
    payload: &Bytes,
) -> bytes::BytesMut {
    use rtc::shared::marshal::Marshal;
    let header = rtc::rtp::header::Header {
        version: 2,
        payload_type: 96,
        sequence_number: seq,
        timestamp: seq as u32 * 3000,
        ssrc: PUBLISHER_SSRC,
        ..Default::default()
    };
    let plain = rtc::rtp::packet::Packet {
        header,
        payload: payload.clone(),
    }
    .marshal()
    .unwrap();
    client
        .local_srtp_context()
        .unwrap()
        .encrypt_rtp(&plain)
        .unwrap()
}

criterion_group!(benches, fanout, srtp, egress, demux, receive);
criterion_main!(benches);
