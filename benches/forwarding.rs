//! The forwarding core's fan-out: one 1000-byte VP8 packet to 1, 10, 100 and 1000 down-tracks,
//! each with its own SSRC, payload type, offsets and one mapped header extension. Throughput is
//! in down-tracks, so criterion's time per element is the cost per packet per down-track.

use std::hint::black_box;
use std::time::{Duration, Instant};

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use switchboard::sfu::forward::{
    Codec, DownTrackConfig, ExtMap, Quality, RtpHeader, RtpPacket, TrackForwarder,
};

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

criterion_group!(benches, fanout);
criterion_main!(benches);
