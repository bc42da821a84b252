//! The lean receive path for publishers' media, the mirror of `egress`.
//!
//! Through webrtc-rs's `handle_read`, every received packet is moved by value through eight
//! handler stages, the interceptor chain (which allocates a queue per packet), stats keyed by
//! strings and the event queue, before the application reads it out: that was the largest cost
//! per received packet the floor does not pay (docs/PERFORMANCE.md). Once a publisher's source
//! is bound (its first packets went through webrtc-rs, which announced the track), the event
//! loop decrypts its datagrams in place with the connection's inbound SRTP context and hands
//! them here, then to the forwarding core.
//!
//! What webrtc-rs's receive interceptors did for those packets is done here, with the same
//! interceptors driven directly: NACKs for gaps (`NackGeneratorInterceptor`), receiver reports
//! (`ReceiverReportInterceptor`, fed the publisher's sender reports) and transport-wide
//! congestion-control feedback (`TwccReceiverInterceptor`), which browsers' bandwidth estimation
//! needs. Their RTCP goes back through the connection's RTCP path (a few packets per second).
//! The publisher connection itself then carries no receive interceptor, so packets that still
//! take webrtc-rs's path (a source's first packets, sources it does not forward) are recorded
//! here too, once: for TWCC every RTP datagram webrtc-rs accepts (`arrived_via_core`), for
//! reports and NACKs the packets it hands out (`record`).

use std::time::Instant;

use bytes::BytesMut;
use rtc::interceptor::{
    Interceptor, NackGeneratorBuilder, NackGeneratorInterceptor, Packet, RTCPFeedback,
    RTPHeaderExtension, ReceiverReportBuilder, ReceiverReportInterceptor, StreamInfo, TaggedPacket,
    TwccReceiverBuilder, TwccReceiverInterceptor,
};
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::configuration::media_engine::MIME_TYPE_RTX;
use rtc::rtp;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use rtc::sansio::Protocol;
use rtc::shared::marshal::Unmarshal;
use rtc::shared::{TransportContext, TransportMessage};

/// Where a bound source's packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// A media source: the published track it feeds.
    Media(usize),
    /// The retransmission (RTX, RFC 4588) stream of a media source.
    Repair {
        track: usize,
        media_ssrc: u32,
        media_payload_type: u8,
    },
}

/// A bound source's datagram that failed authentication, was a replay, or was malformed.
#[derive(Debug, PartialEq, Eq)]
pub struct Rejected;

/// The receive state of one publisher connection.
pub struct Ingress {
    nack: NackGeneratorInterceptor,
    reports: ReceiverReportInterceptor,
    twcc: TwccReceiverInterceptor,
    /// Sources whose packets take this path: SSRC -> where they go.
    bound: Vec<(u32, Source)>,
}

impl Default for Ingress {
    fn default() -> Self {
        Ingress {
            nack: NackGeneratorBuilder::new().build(),
            reports: ReceiverReportBuilder::new().build(),
            twcc: TwccReceiverBuilder::new().build(),
            bound: Vec::new(),
        }
    }
}

impl Ingress {
    /// A source of a published track (`info` as webrtc-rs negotiated it): its packets take this
    /// path from now on, and so do those of its RTX stream when it has one.
    pub fn bind(&mut self, info: &StreamInfo, track: usize) {
        self.unbind(info.ssrc);
        self.nack.bind_remote_stream(info);
        self.reports.bind_remote_stream(info);
        self.twcc.bind_remote_stream(info);
        self.bound.push((info.ssrc, Source::Media(track)));
        if let Some(rtx) = info.ssrc_rtx {
            self.bound.retain(|(s, _)| *s != rtx);
            self.bound.push((
                rtx,
                Source::Repair {
                    track,
                    media_ssrc: info.ssrc,
                    media_payload_type: info.payload_type,
                },
            ));
        }
    }

    /// A source no longer forwarded (replaced by another, or its track unpublished).
    pub fn unbind(&mut self, ssrc: u32) {
        let info = StreamInfo {
            ssrc,
            ..Default::default()
        };
        self.nack.unbind_remote_stream(&info);
        self.reports.unbind_remote_stream(&info);
        self.twcc.unbind_remote_stream(&info);
        self.bound.retain(|(s, source)| {
            *s != ssrc
                && !matches!(source, Source::Repair { media_ssrc, .. } if *media_ssrc == ssrc)
        });
    }

    /// Sources bound to `track`, for unbinding when it goes.
    pub fn sources_of(&self, track: usize) -> Vec<u32> {
        self.bound
            .iter()
            .filter(|(_, source)| matches!(source, Source::Media(t) if *t == track))
            .map(|(s, _)| *s)
            .collect()
    }

    /// The bound source of an SRTP datagram's SSRC, read from its clear header; `None` for
    /// RTCP, non-RTP and unbound sources.
    pub fn source_of(&self, datagram: &[u8]) -> Option<Source> {
        if self.bound.is_empty() || !is_rtp(datagram) {
            return None;
        }
        let ssrc = u32::from_be_bytes([datagram[8], datagram[9], datagram[10], datagram[11]]);
        self.bound
            .iter()
            .find(|(s, _)| *s == ssrc)
            .map(|(_, source)| *source)
    }

    /// Decrypts a bound source's datagram in place, records its arrival, and returns the
    /// packet to forward with the track it feeds (a retransmission unwrapped to its original
    /// stream); `Ok(None)` for a packet with nothing to forward (an RTX padding probe). A
    /// datagram that fails authentication, is a replay or is malformed is an error (dropped, as
    /// webrtc-rs drops them).
    pub fn receive(
        &mut self,
        source: Source,
        srtp: &mut rtc::srtp::context::Context,
        datagram: &[u8],
        now: Instant,
    ) -> Result<Option<(usize, rtp::Packet)>, Rejected> {
        let mut buf = BytesMut::from(datagram);
        srtp.decrypt_rtp_in_place(&mut buf).map_err(|_| Rejected)?;
        let packet = rtp::Packet::unmarshal(&mut buf.freeze()).map_err(|_| Rejected)?;
        let packet = pass(&mut self.twcc, tagged(Packet::Rtp(packet), now)).and_then(rtp_of);
        let Some(packet) = packet.and_then(|p| self.record(p, now)) else {
            return Ok(None);
        };
        match source {
            Source::Media(track) => Ok(Some((track, packet))),
            Source::Repair {
                track,
                media_ssrc,
                media_payload_type,
            } => {
                // A padding-only bandwidth probe has no original (TWCC counted its arrival).
                let Some(packet) = unwrap_rtx(packet, media_ssrc, media_payload_type) else {
                    return Ok(None);
                };
                // The original's sequence number is no longer missing: no NACK for it.
                Ok(self.recovered(packet, now).map(|p| (track, p)))
            }
        }
    }

    /// Records the arrival of an RTP datagram that takes webrtc-rs's receive path, for TWCC
    /// feedback: every RTP packet of the connection counts there, including those webrtc-rs never
    /// hands out (padding probes, retransmissions of layers it binds itself, a source's packets
    /// before its track is announced), or the sender's bandwidth estimate reads them as lost. The
    /// header is in the clear in SRTP; `arrived_via_core` is called once webrtc-rs accepted it.
    pub fn arrived_via_core(&mut self, datagram: &[u8], now: Instant) {
        if !is_rtp(datagram) {
            return;
        }
        let Ok(header) = rtp::Header::unmarshal(&mut &datagram[..]) else {
            return;
        };
        let packet = rtp::Packet {
            header,
            ..Default::default()
        };
        let _ = pass(&mut self.twcc, tagged(Packet::Rtp(packet), now));
    }

    /// Records a received packet for receiver reports and NACK gaps and hands it back (its TWCC
    /// arrival is recorded separately, per datagram).
    pub fn record(&mut self, packet: rtp::Packet, now: Instant) -> Option<rtp::Packet> {
        let msg = pass(&mut self.reports, tagged(Packet::Rtp(packet), now))?;
        rtp_of(pass(&mut self.nack, msg)?)
    }

    /// A retransmitted packet, unwrapped: only the NACK generator needs to see it (the RTX
    /// packet's arrival was recorded as such).
    fn recovered(&mut self, packet: rtp::Packet, now: Instant) -> Option<rtp::Packet> {
        rtp_of(pass(&mut self.nack, tagged(Packet::Rtp(packet), now))?)
    }

    /// The publisher's sender reports (their timestamps go back in the receiver reports).
    pub fn sender_reports(&mut self, packets: Vec<Box<dyn rtc::rtcp::Packet>>, now: Instant) {
        let _ = pass(&mut self.reports, tagged(Packet::Rtcp(packets), now));
    }

    /// When the next NACK, report or TWCC feedback is due.
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        [
            self.nack.poll_timeout(),
            self.reports.poll_timeout(),
            self.twcc.poll_timeout(),
        ]
        .into_iter()
        .flatten()
        .min()
    }

    pub fn handle_timeout(&mut self, now: Instant) {
        let _ = self.nack.handle_timeout(now);
        let _ = self.reports.handle_timeout(now);
        let _ = self.twcc.handle_timeout(now);
    }

    /// RTCP to send to the publisher (NACKs, receiver reports, TWCC feedback).
    pub fn poll_feedback(&mut self) -> Option<Vec<Box<dyn rtc::rtcp::Packet>>> {
        let stages = [
            &mut self.nack as &mut dyn Interceptor,
            &mut self.reports,
            &mut self.twcc,
        ];
        for stage in stages {
            while let Some(msg) = stage.poll_write() {
                if let Packet::Rtcp(packets) = msg.message.packet
                    && !packets.is_empty()
                {
                    return Some(packets);
                }
            }
        }
        None
    }
}

/// RTP version 2, and not RTCP (payload types 192-223 with the marker bit are RTCP's, RFC 5761).
fn is_rtp(datagram: &[u8]) -> bool {
    datagram.len() >= 12 && datagram[0] >> 6 == 2 && !(192..=223).contains(&datagram[1])
}

/// The interceptors read the instant only (the addresses are the connection's, known to it).
fn tagged(packet: Packet, now: Instant) -> TaggedPacket {
    TransportMessage {
        now,
        transport: TransportContext::default(),
        message: packet.into(),
    }
}

/// One interceptor's read step. These three queue what they are given and hand it back (none
/// holds, drops or fails a packet); one that did would lose the packet, not stall the loop.
fn pass(stage: &mut dyn Interceptor, msg: TaggedPacket) -> Option<TaggedPacket> {
    stage.handle_read(msg).ok()?;
    stage.poll_read()
}

fn rtp_of(msg: TaggedPacket) -> Option<rtp::Packet> {
    match msg.message.packet {
        Packet::Rtp(p) => Some(p),
        _ => None,
    }
}

/// RFC 4588: a retransmission's payload starts with the original sequence number; the rest is
/// the original payload. `None` for a packet without one (a padding-only probe).
fn unwrap_rtx(mut packet: rtp::Packet, media_ssrc: u32, payload_type: u8) -> Option<rtp::Packet> {
    if packet.payload.len() < 2 {
        return None;
    }
    let osn = u16::from_be_bytes([packet.payload[0], packet.payload[1]]);
    packet.payload = packet.payload.slice(2..);
    packet.header.sequence_number = osn;
    packet.header.ssrc = media_ssrc;
    packet.header.payload_type = payload_type;
    packet.header.padding = false;
    Some(packet)
}

/// How webrtc-rs negotiated a received source (as it would describe it to its own
/// interceptors): codec, payload type, feedback, header extensions and RTX stream.
pub fn stream_info(
    pc: &mut RTCPeerConnection,
    receiver: RTCRtpReceiverId,
    ssrc: u32,
) -> Option<StreamInfo> {
    let mut receiver = pc.rtp_receiver(receiver)?;
    let coding = receiver
        .track()
        .codings()
        .iter()
        .find(|c| c.rtp_coding_parameters.ssrc == Some(ssrc))?;
    let (codec, ssrc_rtx) = (
        coding.codec.clone(),
        coding.rtp_coding_parameters.rtx.as_ref().map(|r| r.ssrc),
    );
    let parameters = &receiver.get_parameters().rtp_parameters;
    let negotiated = parameters.codecs.iter().find(|c| {
        c.rtp_codec.mime_type.eq_ignore_ascii_case(&codec.mime_type)
            && c.rtp_codec.sdp_fmtp_line == codec.sdp_fmtp_line
    })?;
    let rtx_payload_type = parameters
        .codecs
        .iter()
        .find(|c| {
            c.rtp_codec.mime_type.eq_ignore_ascii_case(MIME_TYPE_RTX)
                && c.rtp_codec.sdp_fmtp_line.split(';').any(|p| {
                    p.trim().strip_prefix("apt=") == Some(&negotiated.payload_type.to_string())
                })
        })
        .map(|c| c.payload_type);
    let ssrc_rtx = ssrc_rtx.filter(|_| rtx_payload_type.is_some());
    Some(StreamInfo {
        ssrc,
        ssrc_rtx,
        payload_type: negotiated.payload_type,
        payload_type_rtx: rtx_payload_type.filter(|_| ssrc_rtx.is_some()),
        rtp_header_extensions: parameters
            .header_extensions
            .iter()
            .map(|h| RTPHeaderExtension {
                uri: h.uri.clone(),
                id: h.id,
            })
            .collect(),
        mime_type: negotiated.rtp_codec.mime_type.clone(),
        clock_rate: negotiated.rtp_codec.clock_rate,
        channels: negotiated.rtp_codec.channels,
        sdp_fmtp_line: negotiated.rtp_codec.sdp_fmtp_line.clone(),
        rtcp_feedback: negotiated
            .rtp_codec
            .rtcp_feedback
            .iter()
            .map(|f| RTCPFeedback {
                typ: f.typ.clone(),
                parameter: f.parameter.clone(),
            })
            .collect(),
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use bytes::Bytes;
    use rtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
    use rtc::shared::marshal::Marshal;
    use rtc::srtp::context::Context;
    use rtc::srtp::option::srtp_replay_protection;
    use rtc::srtp::protection_profile::ProtectionProfile;

    use super::*;

    const MEDIA: u32 = 0x1111;
    const RTX: u32 = 0x2222;
    const TRACK: usize = 7;

    fn context(replay: bool) -> Context {
        let profile = ProtectionProfile::AeadAes128Gcm;
        let crypto = rtc::crypto::default_provider().unwrap();
        let replay = replay.then(|| srtp_replay_protection(64));
        let (key, salt) = (vec![5u8; profile.key_len()], vec![6u8; profile.salt_len()]);
        Context::new(&key, &salt, profile, replay, None, crypto.crypto()).unwrap()
    }

    fn video_info() -> StreamInfo {
        StreamInfo {
            ssrc: MEDIA,
            ssrc_rtx: Some(RTX),
            payload_type: 96,
            payload_type_rtx: Some(97),
            clock_rate: 90_000,
            mime_type: "video/VP8".into(),
            rtcp_feedback: vec![RTCPFeedback {
                typ: "nack".into(),
                parameter: String::new(),
            }],
            ..Default::default()
        }
    }

    fn datagram(sender: &mut Context, ssrc: u32, pt: u8, seq: u16, payload: &[u8]) -> Vec<u8> {
        let packet = rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                payload_type: pt,
                sequence_number: seq,
                timestamp: 3000 * seq as u32,
                ssrc,
                ..Default::default()
            },
            payload: Bytes::copy_from_slice(payload),
        };
        sender
            .encrypt_rtp(&packet.marshal().unwrap())
            .unwrap()
            .to_vec()
    }

    /// Every NACKed sequence number the ingress sends within `until`.
    fn nacks(ingress: &mut Ingress, mut now: Instant, until: Instant) -> Vec<u16> {
        let mut seqs = Vec::new();
        while now < until {
            now = ingress.poll_timeout().unwrap_or(until).max(now);
            ingress.handle_timeout(now);
            while let Some(packets) = ingress.poll_feedback() {
                for p in packets {
                    if let Some(n) = p.as_any().downcast_ref::<TransportLayerNack>() {
                        seqs.extend(n.nacks.iter().flat_map(|pair| (*pair).into_iter()));
                    }
                }
            }
            now += Duration::from_millis(1);
        }
        seqs
    }

    #[test]
    fn bound_media_is_decrypted_forwarded_and_its_gaps_nacked() {
        let (mut sender, mut receiver) = (context(false), context(true));
        let mut ingress = Ingress::default();
        ingress.bind(&video_info(), TRACK);
        let start = Instant::now();
        for seq in (1..=20u16).filter(|s| *s != 10) {
            let d = datagram(&mut sender, MEDIA, 96, seq, &[seq as u8; 100]);
            let source = ingress.source_of(&d).expect("a bound source");
            assert_eq!(source, Source::Media(TRACK));
            let (track, packet) = ingress
                .receive(source, &mut receiver, &d, start)
                .unwrap()
                .unwrap();
            assert_eq!((track, packet.header.sequence_number), (TRACK, seq));
            assert_eq!(&packet.payload[..], &[seq as u8; 100][..]);
        }
        let asked = nacks(&mut ingress, start, start + Duration::from_millis(300));
        assert!(asked.contains(&10), "{asked:?}");
        assert!(asked.iter().all(|s| *s == 10), "{asked:?}");
    }

    #[test]
    fn retransmissions_are_unwrapped_and_end_the_nacks() {
        let (mut sender, mut receiver) = (context(false), context(true));
        let mut ingress = Ingress::default();
        ingress.bind(&video_info(), TRACK);
        let start = Instant::now();
        for seq in [1u16, 2, 4] {
            let d = datagram(&mut sender, MEDIA, 96, seq, b"media");
            let source = ingress.source_of(&d).unwrap();
            ingress.receive(source, &mut receiver, &d, start).unwrap();
        }
        // RTX for 3: the original sequence number, then the original payload.
        let d = datagram(&mut sender, RTX, 97, 500, &[0, 3, b'x', b'y']);
        let source = ingress.source_of(&d).unwrap();
        assert!(matches!(
            source,
            Source::Repair {
                media_ssrc: MEDIA,
                ..
            }
        ));
        let (track, packet) = ingress
            .receive(source, &mut receiver, &d, start)
            .unwrap()
            .unwrap();
        assert_eq!(track, TRACK);
        let h = &packet.header;
        assert_eq!((h.ssrc, h.sequence_number, h.payload_type), (MEDIA, 3, 96));
        assert_eq!(&packet.payload[..], b"xy");
        let asked = nacks(&mut ingress, start, start + Duration::from_millis(300));
        assert!(asked.is_empty(), "repaired, yet asked for: {asked:?}");
        // A padding-only probe on the RTX stream forwards nothing.
        let probe = datagram(&mut sender, RTX, 97, 501, &[]);
        let source = ingress.source_of(&probe).unwrap();
        assert_eq!(
            ingress.receive(source, &mut receiver, &probe, start),
            Ok(None)
        );
    }

    /// A datagram carrying transport-wide sequence number `twcc` (header extension 3).
    fn twcc_datagram(
        sender: &mut Context,
        ssrc: u32,
        seq: u16,
        twcc: u16,
        payload: &[u8],
    ) -> Vec<u8> {
        let mut header = rtp::header::Header {
            version: 2,
            payload_type: 96,
            sequence_number: seq,
            ssrc,
            ..Default::default()
        };
        header
            .set_extension(3, Bytes::copy_from_slice(&twcc.to_be_bytes()))
            .unwrap();
        let packet = rtp::Packet {
            header,
            payload: Bytes::copy_from_slice(payload),
        };
        sender
            .encrypt_rtp(&packet.marshal().unwrap())
            .unwrap()
            .to_vec()
    }

    #[test]
    fn twcc_feedback_counts_every_datagram_whichever_path_it_took() {
        use rtc::rtcp::transport_feedbacks::transport_layer_cc::TransportLayerCc;
        let (mut sender, mut receiver) = (context(false), context(true));
        let mut ingress = Ingress::default();
        let mut info = video_info();
        info.rtp_header_extensions = vec![RTPHeaderExtension {
            uri: "http://www.ietf.org/id/draft-holmer-rmcat-transport-wide-cc-extensions-01".into(),
            id: 3,
        }];
        ingress.bind(&info, TRACK);
        let start = Instant::now();
        // Transport-wide 1-3: bound media, taken here; 4-6: padding probes on a stream webrtc-rs
        // handles (never handed out to the application), only seen arriving.
        for n in 1..=3u16 {
            let d = twcc_datagram(&mut sender, MEDIA, n, n, b"media");
            let source = ingress.source_of(&d).unwrap();
            ingress.receive(source, &mut receiver, &d, start).unwrap();
        }
        for n in 4..=6u16 {
            let d = twcc_datagram(&mut sender, 0x3333, n, n, &[]);
            assert_eq!(ingress.source_of(&d), None);
            ingress.arrived_via_core(&d, start);
        }
        let mut feedback = Vec::new();
        let end = start + Duration::from_millis(500);
        let mut now = start;
        while now < end && feedback.is_empty() {
            now = ingress.poll_timeout().unwrap_or(end).max(now);
            ingress.handle_timeout(now);
            while let Some(packets) = ingress.poll_feedback() {
                feedback.extend(
                    packets
                        .into_iter()
                        .filter_map(|p| p.as_any().downcast_ref::<TransportLayerCc>().cloned()),
                );
            }
            now += Duration::from_millis(1);
        }
        let cc = feedback.first().expect("TWCC feedback");
        assert_eq!(cc.base_sequence_number, 1);
        assert_eq!(cc.packet_status_count, 6);
        assert_eq!(cc.recv_deltas.len(), 6, "all six received: {cc:?}");
    }

    #[test]
    fn forged_replayed_and_unbound_datagrams_are_not_taken() {
        let (mut sender, mut receiver) = (context(false), context(true));
        let mut ingress = Ingress::default();
        let d = datagram(&mut sender, MEDIA, 96, 1, b"media");
        assert_eq!(ingress.source_of(&d), None, "nothing bound yet");
        ingress.bind(&video_info(), TRACK);
        let now = Instant::now();
        let source = ingress.source_of(&d).unwrap();
        let mut forged = d.clone();
        *forged.last_mut().unwrap() ^= 1;
        assert_eq!(
            ingress.receive(source, &mut receiver, &forged, now),
            Err(Rejected)
        );
        assert!(ingress.receive(source, &mut receiver, &d, now).is_ok());
        assert_eq!(
            ingress.receive(source, &mut receiver, &d, now),
            Err(Rejected),
            "a replay"
        );
        // RTCP (a sender report's packet type 200) and short datagrams go to webrtc-rs.
        let mut rtcp = d.clone();
        rtcp[1] = 200;
        assert_eq!(ingress.source_of(&rtcp), None);
        assert_eq!(ingress.source_of(&d[..11]), None);
        // Unbinding the media source unbinds its retransmissions too.
        ingress.unbind(MEDIA);
        let rtx = datagram(&mut sender, RTX, 97, 2, &[0, 1]);
        assert_eq!(ingress.source_of(&d), None);
        assert_eq!(ingress.source_of(&rtx), None);
    }
}
