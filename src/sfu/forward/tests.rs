//! The forwarding core fed with crafted packets.

use std::time::{Duration, Instant};

use bytes::Bytes;

use super::*;

const VP8_KEY: &[u8] = &[0x10, 0x00, 0x9d, 0x01, 0x2a];
const VP8_DELTA: &[u8] = &[0x10, 0x01, 0x00];
const VP8_CONT: &[u8] = &[0x00, 0xAB];

fn pkt(ssrc: u32, seq: u16, ts: u32, payload: &'static [u8]) -> RtpPacket {
    RtpPacket {
        header: RtpHeader {
            marker: false,
            payload_type: 96,
            sequence_number: seq,
            timestamp: ts,
            ssrc,
            extensions: Extensions::default(),
        },
        payload: Bytes::from_static(payload),
    }
}

fn down(id: DownTrackId, pt: u8) -> DownTrackConfig {
    DownTrackConfig {
        id,
        ssrc: 0x5000 + id as u32,
        payload_type: Some(pt),
        ext_map: ExtMap::default(),
        quality: Quality::High,
    }
}

/// What the sinks received: (sink id, header).
type Sent = Vec<(u64, RtpHeader, Bytes)>;

/// Simulcast layers q (SSRC 100) and f (SSRC 300), and down-track 1 (sink 1) with the default
/// wish (high).
fn q_and_f_layers_to_one_subscriber() -> TrackForwarder<u64> {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(100, Some("q"));
    f.add_layer(300, Some("f"));
    f.add_down_track(down(1, 96), 1);
    f
}

fn run(f: &mut TrackForwarder<u64>, p: &RtpPacket, now: Instant, sent: &mut Sent) -> Option<u32> {
    f.forward(p, now, |sink, h, payload| {
        sent.push((*sink, h.clone(), payload.clone()))
    })
}

#[test]
fn rewrites_ssrc_and_payload_type_per_subscriber_and_shares_the_payload() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(0xAAAA, None);
    f.add_down_track(down(1, 111), 1);
    f.add_down_track(down(2, 109), 2);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    let p = pkt(0xAAAA, 100, 4800, b"opus-frame");
    run(&mut f, &p, t0, &mut sent);
    assert_eq!(sent.len(), 2);
    for (sink, h, payload) in &sent {
        assert_eq!(h.ssrc, 0x5000 + *sink as u32);
        assert_eq!(h.payload_type, if *sink == 1 { 111 } else { 109 });
        assert_eq!(h.sequence_number, 100);
        assert_eq!(h.timestamp, 4800);
        assert_eq!(
            payload.as_ptr(),
            p.payload.as_ptr(),
            "payload shared, not copied"
        );
    }
    assert_eq!(f.down_track(1).unwrap().stats.packets, 1);
    assert_eq!(f.stats.packets, 1);
}

#[test]
fn nothing_is_sent_before_the_payload_type_is_known() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(1, None);
    let mut cfg = down(1, 0);
    cfg.payload_type = None;
    f.add_down_track(cfg.clone(), 1);
    let mut sent = Sent::new();
    run(&mut f, &pkt(1, 1, 0, b"a"), Instant::now(), &mut sent);
    assert!(sent.is_empty());
    cfg.payload_type = Some(111);
    f.configure_down_track(cfg);
    run(&mut f, &pkt(1, 2, 960, b"a"), Instant::now(), &mut sent);
    assert_eq!(sent.len(), 1);
}

#[test]
fn video_waits_for_a_keyframe_and_asks_for_one_throttled() {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(7, None);
    f.add_down_track(down(1, 96), 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    assert_eq!(
        run(&mut f, &pkt(7, 10, 0, VP8_DELTA), t0, &mut sent),
        Some(7)
    );
    assert_eq!(
        run(
            &mut f,
            &pkt(7, 11, 0, VP8_CONT),
            t0 + Duration::from_millis(100),
            &mut sent
        ),
        None
    );
    assert!(sent.is_empty());
    assert_eq!(f.down_track(1).unwrap().stats.waiting, 2);
    // Throttle: the next request only after the interval.
    assert_eq!(
        run(
            &mut f,
            &pkt(7, 12, 3000, VP8_DELTA),
            t0 + KEYFRAME_REQUEST_INTERVAL,
            &mut sent
        ),
        Some(7)
    );
    run(
        &mut f,
        &pkt(7, 13, 6000, VP8_KEY),
        t0 + Duration::from_millis(600),
        &mut sent,
    );
    run(
        &mut f,
        &pkt(7, 14, 6000, VP8_CONT),
        t0 + Duration::from_millis(600),
        &mut sent,
    );
    run(
        &mut f,
        &pkt(7, 15, 9000, VP8_DELTA),
        t0 + Duration::from_millis(633),
        &mut sent,
    );
    let seqs: Vec<u16> = sent.iter().map(|(_, h, _)| h.sequence_number).collect();
    assert_eq!(seqs, [13, 14, 15]);
    assert_eq!(f.stats.keyframe_requests, 2);
}

#[test]
fn sequence_numbers_and_timestamps_wrap_around() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(1, None);
    f.add_down_track(down(1, 111), 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    for (i, seq) in [65534u16, 65535, 0, 1].into_iter().enumerate() {
        let ts = (u32::MAX - 959).wrapping_add(i as u32 * 960); // crosses 2^32 after the first
        run(
            &mut f,
            &pkt(1, seq, ts, b"x"),
            t0 + Duration::from_millis(20 * i as u64),
            &mut sent,
        );
    }
    // A late packet from before the wrap is still forwarded (same segment, reordering).
    run(&mut f, &pkt(1, 65535, 0, b"x"), t0, &mut sent);
    let out: Vec<(u16, u32)> = sent
        .iter()
        .map(|(_, h, _)| (h.sequence_number, h.timestamp))
        .collect();
    assert_eq!(
        out,
        [
            (65534, u32::MAX - 959),
            (65535, 0),
            (0, 960),
            (1, 1920),
            (65535, 0)
        ]
    );
    assert_eq!(seq_diff(0, 65535), 1);
    assert_eq!(seq_diff(65535, 0), -1);
}

#[test]
fn a_simulcast_layer_switch_keeps_the_output_continuous() {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(100, Some("q"));
    f.add_layer(200, Some("h"));
    f.add_layer(300, Some("f"));
    let mut cfg = down(1, 96);
    cfg.quality = Quality::Low;
    f.add_down_track(cfg, 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    // All three layers are live; the subscriber wants low.
    let mut t = t0;
    for (ssrc, seq, ts) in [
        (100, 500, 1000),
        (200, 7000, 50_000),
        (300, 30_000, 900_000),
    ] {
        run(&mut f, &pkt(ssrc, seq, ts, VP8_KEY), t, &mut sent);
    }
    for i in 1..5u16 {
        t += Duration::from_millis(33);
        run(
            &mut f,
            &pkt(100, 500 + i, 1000 + 3000 * i as u32, VP8_DELTA),
            t,
            &mut sent,
        );
        run(
            &mut f,
            &pkt(300, 30_000 + i, 900_000 + 3000 * i as u32, VP8_DELTA),
            t,
            &mut sent,
        );
    }
    assert!(sent.iter().all(|(_, h, _)| h.ssrc == 0x5001));
    let last = sent.last().unwrap().1.clone();
    assert_eq!(last.sequence_number, 504);

    // Switch to high: keep getting low until high's keyframe, and ask for it.
    f.set_quality(1, Quality::High);
    t += Duration::from_millis(33);
    let n = sent.len();
    assert_eq!(
        run(&mut f, &pkt(300, 30_005, 915_000, VP8_DELTA), t, &mut sent),
        Some(300)
    );
    assert_eq!(sent.len(), n, "no delta frame of the new layer");
    run(&mut f, &pkt(100, 505, 16_000, VP8_DELTA), t, &mut sent);
    assert_eq!(
        sent.last().unwrap().1.sequence_number,
        505,
        "still on low until the switch"
    );
    t += Duration::from_millis(33);
    run(&mut f, &pkt(300, 30_006, 918_000, VP8_KEY), t, &mut sent);
    run(&mut f, &pkt(100, 506, 19_000, VP8_DELTA), t, &mut sent); // old layer: no longer sent
    run(
        &mut f,
        &pkt(300, 30_007, 921_000, VP8_DELTA),
        t + Duration::from_millis(33),
        &mut sent,
    );
    let tail: Vec<(u16, u32)> = sent[n..]
        .iter()
        .map(|(_, h, _)| (h.sequence_number, h.timestamp))
        .collect();
    // Sequence continues at 506, 507; timestamp advanced by the 33 ms (2970 ticks) since 505.
    assert_eq!(tail, [(505, 16_000), (506, 18_970), (507, 21_970)]);
}

#[test]
fn an_inactive_layer_falls_back_to_the_best_active_one() {
    let mut f = q_and_f_layers_to_one_subscriber(); // it wants high
    let t0 = Instant::now();
    let mut sent = Sent::new();
    run(&mut f, &pkt(300, 1, 0, VP8_KEY), t0, &mut sent);
    assert_eq!(sent.len(), 1);
    // High stops (the publisher dropped it); low keeps coming: switch down at a keyframe.
    let later = t0 + LAYER_TIMEOUT + Duration::from_millis(10);
    run(&mut f, &pkt(100, 50, 0, VP8_DELTA), later, &mut sent);
    run(&mut f, &pkt(100, 51, 3000, VP8_KEY), later, &mut sent);
    assert_eq!(sent.len(), 2);
    assert_eq!(sent[1].1.sequence_number, 2);
}

#[test]
fn publisher_mute_stops_forwarding_and_unmute_resumes_without_a_gap() {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(9, None);
    f.add_down_track(down(1, 96), 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    run(&mut f, &pkt(9, 100, 0, VP8_KEY), t0, &mut sent);
    run(
        &mut f,
        &pkt(9, 101, 3000, VP8_DELTA),
        t0 + Duration::from_millis(33),
        &mut sent,
    );
    f.set_muted(true);
    for i in 0..30u16 {
        run(
            &mut f,
            &pkt(9, 102 + i, 6000 + 3000 * i as u32, VP8_DELTA),
            t0,
            &mut sent,
        );
    }
    assert_eq!(sent.len(), 2);
    assert_eq!(f.stats.muted, 30);
    f.set_muted(false);
    let t1 = t0 + Duration::from_secs(2);
    // Video resumes on a keyframe only.
    assert_eq!(
        run(&mut f, &pkt(9, 132, 96_000, VP8_DELTA), t1, &mut sent),
        Some(9)
    );
    run(&mut f, &pkt(9, 133, 99_000, VP8_KEY), t1, &mut sent);
    assert_eq!(sent.len(), 3);
    let h = &sent[2].1;
    assert_eq!(h.sequence_number, 102, "continues right after 101");
    assert_eq!(
        h.timestamp,
        3000 + 90_000 * 2 - 2970,
        "advanced by wall time since the last packet"
    );
}

#[test]
fn a_republished_source_continues_the_same_output_stream() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(1, None);
    f.add_down_track(down(1, 111), 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    run(&mut f, &pkt(1, 40_000, 1_000_000, b"a"), t0, &mut sent);
    // The publisher comes back with a new SSRC and new numbering.
    f.add_layer(2, None);
    run(
        &mut f,
        &pkt(1, 40_001, 1_000_960, b"late-old"),
        t0,
        &mut sent,
    );
    run(
        &mut f,
        &pkt(2, 3, 77, b"b"),
        t0 + Duration::from_millis(20),
        &mut sent,
    );
    run(
        &mut f,
        &pkt(2, 4, 1037, b"c"),
        t0 + Duration::from_millis(40),
        &mut sent,
    );
    let out: Vec<(u32, u16, u32)> = sent
        .iter()
        .map(|(_, h, _)| (h.ssrc, h.sequence_number, h.timestamp))
        .collect();
    assert_eq!(
        out,
        [
            (0x5001, 40_000, 1_000_000),
            (0x5001, 40_001, 1_000_960),
            (0x5001, 40_002, 1_001_920)
        ]
    );
    assert_eq!(
        f.stats.unknown_ssrc, 1,
        "the replaced source is no longer forwarded"
    );
}

#[test]
fn packets_from_before_a_segment_start_are_dropped() {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(5, None);
    f.add_down_track(down(1, 96), 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    run(&mut f, &pkt(5, 10, 0, VP8_KEY), t0, &mut sent);
    run(&mut f, &pkt(5, 9, 0, VP8_CONT), t0, &mut sent); // belongs to a frame never started
    assert_eq!(sent.len(), 1);
    assert_eq!(f.down_track(1).unwrap().stats.stale, 1);
}

#[test]
fn header_extensions_are_mapped_per_subscriber_and_others_dropped() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(1, None);
    let mut a = down(1, 111);
    a.ext_map.insert(1, 5); // audio level: publisher id 1 -> subscriber id 5
    let mut b = down(2, 111);
    b.ext_map.insert(1, 1);
    b.ext_map.insert(3, 2);
    f.add_down_track(a, 1);
    f.add_down_track(b, 2);
    let mut p = pkt(1, 1, 0, b"x");
    p.header.extensions.push(1, Bytes::from_static(&[0x85]));
    p.header.extensions.push(3, Bytes::from_static(&[1, 2, 3]));
    p.header.extensions.push(4, Bytes::from_static(&[9])); // transport-wide seq: not forwarded
    let mut sent = Sent::new();
    run(&mut f, &p, Instant::now(), &mut sent);
    let a_ext: Vec<(u8, Vec<u8>)> = sent[0]
        .1
        .extensions
        .iter()
        .map(|(i, v)| (*i, v.to_vec()))
        .collect();
    let b_ext: Vec<(u8, Vec<u8>)> = sent[1]
        .1
        .extensions
        .iter()
        .map(|(i, v)| (*i, v.to_vec()))
        .collect();
    assert_eq!(a_ext, [(5, vec![0x85])]);
    assert_eq!(b_ext, [(1, vec![0x85]), (2, vec![1, 2, 3])]);
    // Out-of-range ids are ignored by the map.
    let mut m = ExtMap::default();
    m.insert(15, 1);
    m.insert(1, 0);
    assert_eq!((m.get(15), m.get(1), m.get(200)), (None, None, None));
}

#[test]
fn malformed_and_unknown_packets_are_counted_never_a_panic() {
    let mut f: TrackForwarder<u64> = TrackForwarder::new(Codec::Vp8);
    f.add_layer(1, None);
    f.add_down_track(down(1, 96), 1);
    let now = Instant::now();
    let mut sent = 0;
    for raw in [
        &[][..],
        &[0x80, 96, 0][..],
        &[0x40; 20][..],
        &[0x9F; 12][..],
    ] {
        f.forward_raw(Bytes::copy_from_slice(raw), now, |_, _, _| sent += 1);
    }
    assert_eq!(f.stats.malformed, 4);
    let mut unknown = Vec::new();
    let mut h = RtpHeader {
        ssrc: 99,
        ..Default::default()
    };
    write_header(&h, &mut unknown);
    f.forward_raw(Bytes::from(unknown), now, |_, _, _| sent += 1);
    assert_eq!(f.stats.unknown_ssrc, 1);
    // A valid keyframe with an empty payload, then one with a payload: only the second starts.
    h.ssrc = 1;
    let mut ok = Vec::new();
    write_header(&h, &mut ok);
    f.forward_raw(Bytes::from(ok.clone()), now, |_, _, _| sent += 1);
    ok.extend_from_slice(VP8_KEY);
    f.forward_raw(Bytes::from(ok), now, |_, _, _| sent += 1);
    assert_eq!(sent, 1);
}

#[test]
fn subscriber_keyframe_requests_go_to_the_forwarded_layer_throttled() {
    let mut f = q_and_f_layers_to_one_subscriber();
    let t0 = Instant::now();
    let mut sent = Sent::new();
    run(&mut f, &pkt(100, 1, 0, VP8_KEY), t0, &mut sent);
    run(&mut f, &pkt(300, 1, 0, VP8_KEY), t0, &mut sent);
    assert_eq!(f.on_keyframe_request(1, t0), Some(300));
    assert_eq!(
        f.on_keyframe_request(1, t0 + Duration::from_millis(100)),
        None
    );
    assert_eq!(
        f.on_keyframe_request(1, t0 + Duration::from_millis(600)),
        Some(300)
    );
    assert_eq!(f.on_keyframe_request(42, t0), None);
}

#[test]
fn removed_down_tracks_get_nothing() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(1, None);
    f.add_down_track(down(1, 111), 1);
    f.add_down_track(down(2, 111), 2);
    assert!(f.remove_down_track(1).is_some());
    assert!(f.remove_down_track(1).is_none());
    let mut sent = Sent::new();
    run(&mut f, &pkt(1, 1, 0, b"x"), Instant::now(), &mut sent);
    assert_eq!(sent.iter().map(|s| s.0).collect::<Vec<_>>(), [2]);
}

#[test]
fn a_long_stream_keeps_flowing_past_the_sequence_number_half_range() {
    let mut f = TrackForwarder::new(Codec::Opus);
    f.add_layer(1, None);
    f.add_down_track(down(1, 111), 1);
    let t0 = Instant::now();
    let mut sent = 0u32;
    for i in 0..100_000u32 {
        let p = pkt(1, (10 + i) as u16, i.wrapping_mul(960), b"x");
        f.forward(&p, t0, |_, _, _| sent += 1);
    }
    assert_eq!(
        sent, 100_000,
        "every packet of a 100k-packet stream is forwarded"
    );
    assert_eq!(f.down_track(1).unwrap().stats.stale, 0);
}

#[test]
fn a_renegotiation_keeps_the_subscribers_layer_choice() {
    let mut f = q_and_f_layers_to_one_subscriber();
    f.set_quality(1, Quality::Low);
    // A later answer re-applies payload type and extension ids from a config that still says
    // the default (high); the subscriber asked for low and keeps it.
    f.configure_down_track(down(1, 97));
    let t0 = Instant::now();
    let mut sent = Sent::new();
    run(&mut f, &pkt(100, 20, 1000, VP8_KEY), t0, &mut sent);
    run(&mut f, &pkt(300, 10, 1000, VP8_KEY), t0, &mut sent);
    assert_eq!(sent.len(), 1, "only the low layer is forwarded");
    assert_eq!(
        sent[0].1.payload_type, 97,
        "the renegotiated payload type applies"
    );
    assert_eq!(f.down_track(1).unwrap().config.quality, Quality::Low);
}

#[test]
fn simulcast_rids_are_ranked_by_the_whole_set() {
    let ranks = |rids: &[&str]| {
        let rids: Vec<String> = rids.iter().map(|r| r.to_string()).collect();
        rank_rids(&rids)
            .into_iter()
            .map(|(_, q)| q)
            .collect::<Vec<_>>()
    };
    use Quality::{High, Low, Medium};
    assert_eq!(ranks(&["q", "h", "f"]), [Low, Medium, High]);
    assert_eq!(ranks(&["f", "h", "q"]), [High, Medium, Low]);
    assert_eq!(
        ranks(&["l", "m", "h"]),
        [Low, Medium, High],
        "h is high next to l/m"
    );
    assert_eq!(ranks(&["h", "l"]), [High, Low]);
    assert_eq!(ranks(&["r0", "r1", "r2"]), [Low, Medium, High]);
    assert_eq!(
        ranks(&["a", "b"]),
        [Low, High],
        "unknown names: by position"
    );
    assert_eq!(ranks(&["low", "x"]), [Low, High], "a mix: by position");
    assert_eq!(ranks(&["only"]), [High]);
}

#[test]
fn l_m_h_layers_all_count() {
    // With l/m/h naming all three layers are kept: none replaces another.
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.set_rids(&["l".into(), "m".into(), "h".into()]);
    f.add_layer(100, Some("l"));
    f.add_layer(200, Some("m"));
    f.add_layer(300, Some("h"));
    assert!(f.has_layer(100) && f.has_layer(200) && f.has_layer(300));
    let t0 = Instant::now();
    let mut sent = Sent::new();
    for ssrc in [100, 200, 300] {
        run(&mut f, &pkt(ssrc, 1, 1000, VP8_KEY), t0, &mut sent);
    }
    // All three are live; a subscriber wishing high gets h and nothing else.
    f.add_down_track(down(1, 96), 1);
    for ssrc in [100, 200, 300] {
        run(&mut f, &pkt(ssrc, 2, 4000, VP8_KEY), t0, &mut sent);
    }
    assert_eq!(sent.len(), 1, "only the wished (high) layer is sent");
    assert_eq!(f.stats.unknown_ssrc, 0);
}

#[test]
fn a_missing_layer_can_be_added_late_but_never_displaces_one() {
    let mut f = TrackForwarder::<u64>::new(Codec::Vp8);
    f.set_rids(&["q".into(), "h".into(), "f".into()]);
    f.add_layer(100, Some("q"));
    assert!(f.lacks_layer(Some("f")), "f has not been announced");
    assert!(!f.lacks_layer(Some("q")), "q is there");
    assert!(!f.lacks_layer(Some("x")), "x is no layer of this track");
    assert!(
        !f.lacks_layer(None),
        "a stream without rid is no layer of a simulcast track"
    );
    let mut single = TrackForwarder::<u64>::new(Codec::Opus);
    assert!(single.lacks_layer(None));
    single.add_layer(7, None);
    assert!(
        !single.lacks_layer(None),
        "a second stream never replaces the first"
    );
}

#[test]
fn a_lost_packet_is_sent_again_as_each_subscriber_numbered_it() {
    let mut f = TrackForwarder::new(Codec::Vp8);
    f.add_layer(100, None);
    f.add_down_track(down(1, 96), 1);
    let t0 = Instant::now();
    let mut sent = Sent::new();
    // Subscriber 1 starts at 1000; subscriber 2 joins later, at 1010, with its own numbering.
    for seq in 1000..1010u16 {
        let p = pkt(
            100,
            seq,
            seq as u32 * 3000,
            if seq == 1000 { VP8_KEY } else { VP8_DELTA },
        );
        run(&mut f, &p, t0, &mut sent);
        f.keep(p);
    }
    f.add_down_track(down(2, 100), 2);
    for seq in 1010..1020u16 {
        let p = pkt(
            100,
            seq,
            seq as u32 * 3000,
            if seq == 1010 { VP8_KEY } else { VP8_DELTA },
        );
        run(&mut f, &p, t0, &mut sent);
        f.keep(p);
    }
    for sink in [1u64, 2] {
        let (out_seq, header) = sent
            .iter()
            .filter(|(s, _, _)| *s == sink)
            .map(|(_, h, _)| (h.sequence_number, h.clone()))
            .nth(3)
            .unwrap();
        let (again, payload) = f.retransmission(sink, out_seq).expect("kept");
        assert_eq!(again, header, "sink {sink}: the same header as first sent");
        assert_eq!(payload.as_ref(), VP8_DELTA);
    }
    // Not sent yet, or before the subscriber's first packet: nothing.
    let last1 = sent
        .iter()
        .filter(|(s, _, _)| *s == 1)
        .map(|(_, h, _)| h.sequence_number)
        .last()
        .unwrap();
    assert!(f.retransmission(1, last1.wrapping_add(1)).is_none());
    let first2 = sent
        .iter()
        .find(|(s, _, _)| *s == 2)
        .map(|(_, h, _)| h.sequence_number)
        .unwrap();
    assert!(f.retransmission(2, first2.wrapping_sub(1)).is_none());
    // Overwritten after HISTORY more packets.
    for seq in 1020..1020 + HISTORY as u16 {
        let p = pkt(100, seq, seq as u32 * 3000, VP8_DELTA);
        run(&mut f, &p, t0, &mut sent);
        f.keep(p);
    }
    let early = sent
        .iter()
        .find(|(s, _, _)| *s == 1)
        .map(|(_, h, _)| h.sequence_number)
        .unwrap();
    assert!(f.retransmission(1, early).is_none());
    // Audio keeps nothing.
    let mut audio = TrackForwarder::new(Codec::Opus);
    audio.add_layer(7, None);
    audio.add_down_track(down(1, 111), 1);
    let p = pkt(7, 1, 960, b"opus");
    audio.forward(&p, t0, |_, _, _| {});
    audio.keep(p);
    assert!(audio.retransmission(1, 1).is_none());
}

#[test]
fn a_layer_published_again_names_the_source_it_replaces() {
    let mut f: TrackForwarder<u64> = TrackForwarder::new(Codec::Vp8);
    f.set_rids(&["q".into(), "f".into()]);
    assert_eq!(f.add_layer(100, Some("q")), None);
    assert_eq!(f.add_layer(300, Some("f")), None);
    assert_eq!(
        f.add_layer(100, Some("q")),
        None,
        "a known source changes nothing"
    );
    assert_eq!(f.add_layer(101, Some("q")), Some(100));
    assert!(f.has_layer(101) && !f.has_layer(100) && f.has_layer(300));
}
