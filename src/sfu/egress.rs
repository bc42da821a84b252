//! The lean send path of a subscriber connection. Forwarded RTP is written (rewritten header,
//! shared payload) into a reused buffer and protected there with the connection's SRTP context,
//! with no trip through webrtc's handler pipeline and interceptors (see vendor/rtc/PATCH.md).
//! Since the interceptors never see these packets, this also does what they would have:
//! retransmissions (the packets come from the track's buffer in the forwarding core) and sender
//! reports.

use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use rtc::rtcp::sender_report::SenderReport;
use rtc::shared::marshal::Marshal;
use rtc::srtp::context::Context;
use slab::Slab;

use super::forward::{RtpHeader, write_header};
use super::io::SendBatch;

/// Retransmissions a down-track sends per second at most: a subscriber's NACKs cannot make the
/// server send more than this (one NACK packet can name hundreds of sequence numbers).
pub const MAX_RESENDS_PER_SECOND: u32 = 500;
/// Sender reports go out about this often per down-track (RFC 3550 allows 5 s; browsers use 1 s).
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);
/// Seconds from the NTP epoch (1900) to the Unix epoch (1970).
const NTP_UNIX_OFFSET: u64 = 2_208_988_800;

/// Writes `header` and `payload` into `buf` (cleared first) and SRTP-protects it in place, with
/// the stream's rollover counter `roc`.
pub fn protect_rtp(
    srtp: &mut Context,
    header: &RtpHeader,
    payload: &[u8],
    roc: u32,
    buf: &mut Vec<u8>,
) -> Result<(), rtc::shared::error::Error> {
    write_header(header, buf);
    let header_len = buf.len();
    buf.extend_from_slice(payload);
    srtp.encrypt_rtp_in_place_with_roc(buf, header_len, roc)
}

/// The SRTP rollover counter (RFC 3711 section 3.3.1) of a stream the server sends: kept here,
/// per stream, so that protecting a packet needs no lookup in the context. Packets go out in
/// sequence order but for retransmissions, which may come from before the latest wrap.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Rollover {
    highest: Option<u16>,
    roc: u32,
}

impl Rollover {
    /// The counter to protect packet `seq` with (and the stream's state advanced past it).
    pub fn roc_for(&mut self, seq: u16) -> u32 {
        let Some(highest) = self.highest else {
            self.highest = Some(seq);
            return self.roc;
        };
        if (seq.wrapping_sub(highest) as i16) > 0 {
            if seq < highest {
                self.roc = self.roc.wrapping_add(1); // the sequence numbers wrapped
            }
            self.highest = Some(seq);
            self.roc
        } else if seq > highest {
            self.roc.wrapping_sub(1) // an older packet, from before the latest wrap
        } else {
            self.roc
        }
    }
}

/// Where a connection's datagrams go: its selected pair's remote address and the key that keeps
/// them together in a send batch.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    pub to: SocketAddr,
    pub key: u32,
}

/// The down-tracks a subscriber connection sends.
#[derive(Default)]
pub struct Egress {
    downs: Slab<DownEgress>,
    /// Packets that could not be protected (counted, not sent).
    pub failed: u64,
}

/// One down-track's send state.
pub struct DownEgress {
    pub ssrc: u32,
    /// Retransmissions go as RTX (RFC 4588) when the subscriber negotiated it: their own SSRC,
    /// payload type and sequence numbers, so that its SRTP replay check and its jitter buffer
    /// take them as the repair they are.
    rtx: Option<Rtx>,
    rollover: Rollover,
    /// Retransmissions in the current one-second window, and when it began.
    resends: (u32, Option<Instant>),
    clock_rate: u32,
    packets: u32,
    octets: u32,
    /// Output timestamp of the newest packet sent, and when.
    last: Option<(u32, Instant)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rtx {
    pub ssrc: u32,
    pub payload_type: u8,
    next_seq: u16,
    rollover: Rollover,
}

impl Rtx {
    pub fn new(ssrc: u32, payload_type: u8) -> Rtx {
        Rtx {
            ssrc,
            payload_type,
            next_seq: (crate::random_u64() as u16) & 0x7FFF,
            rollover: Rollover::default(),
        }
    }
}

impl Egress {
    /// Adds a down-track; returns its slot.
    pub fn add(&mut self, ssrc: u32, clock_rate: u32) -> usize {
        self.downs.insert(DownEgress {
            ssrc,
            rtx: None,
            rollover: Rollover::default(),
            resends: (0, None),
            clock_rate,
            packets: 0,
            octets: 0,
            last: None,
        })
    }

    /// Whether and how retransmissions go as RTX (after each subscriber answer). A known stream
    /// keeps its sequence numbers.
    pub fn set_rtx(&mut self, slot: usize, ssrc: u32, payload_type: Option<u8>) {
        if let Some(down) = self.downs.get_mut(slot) {
            down.rtx = match (payload_type, down.rtx) {
                (None, _) => None,
                (Some(pt), Some(mut rtx)) if rtx.ssrc == ssrc => {
                    rtx.payload_type = pt;
                    Some(rtx)
                }
                (Some(pt), _) => Some(Rtx::new(ssrc, pt)),
            };
        }
    }

    pub fn remove(&mut self, slot: usize) {
        self.downs.try_remove(slot);
    }

    pub fn slot_of(&self, ssrc: u32) -> Option<usize> {
        self.downs
            .iter()
            .find(|(_, d)| d.ssrc == ssrc)
            .map(|(k, _)| k)
    }

    /// Protects and queues one forwarded packet; `false` if it could not be protected.
    #[allow(clippy::too_many_arguments)]
    pub fn send(
        &mut self,
        slot: usize,
        header: &RtpHeader,
        payload: &Bytes,
        now: Instant,
        srtp: &mut Context,
        route: Route,
        batch: &mut SendBatch,
    ) -> bool {
        let Some(down) = self.downs.get_mut(slot) else {
            return false;
        };
        let mut buf = batch.buffer();
        let roc = down.rollover.roc_for(header.sequence_number);
        let protected = protect_rtp(srtp, header, payload, roc, &mut buf);
        if !queue(&mut self.failed, buf, protected, route, batch) {
            return false;
        }
        down.packets = down.packets.wrapping_add(1);
        down.octets = down.octets.wrapping_add(payload.len() as u32);
        let newer = down
            .last
            .is_none_or(|(ts, _)| (header.timestamp.wrapping_sub(ts) as i32) >= 0);
        if newer {
            down.last = Some((header.timestamp, now));
        }
        true
    }

    /// Sends a packet again that the subscriber lost (`header` as first sent to it): as RTX
    /// where negotiated. `false` if it was not sent (protection failed, or the down-track's
    /// retransmission budget for this second is spent).
    #[allow(clippy::too_many_arguments)]
    pub fn resend(
        &mut self,
        slot: usize,
        header: &RtpHeader,
        payload: &[u8],
        now: Instant,
        srtp: &mut Context,
        route: Route,
        batch: &mut SendBatch,
    ) -> bool {
        let Some(down) = self.downs.get_mut(slot) else {
            return false;
        };
        let (count, since) = &mut down.resends;
        if since.is_none_or(|t| now.saturating_duration_since(t) >= Duration::from_secs(1)) {
            (*count, *since) = (0, Some(now));
        }
        if *count >= MAX_RESENDS_PER_SECOND {
            return false;
        }
        *count += 1;
        let mut buf = batch.buffer();
        let protected = match &mut down.rtx {
            None => {
                let roc = down.rollover.roc_for(header.sequence_number);
                protect_rtp(srtp, header, payload, roc, &mut buf)
            }
            Some(rtx) => {
                // Same header but payload type, sequence number and SSRC; the original sequence
                // number leads the payload.
                let mut h = header.clone();
                (h.payload_type, h.sequence_number, h.ssrc) =
                    (rtx.payload_type, rtx.next_seq, rtx.ssrc);
                rtx.next_seq = rtx.next_seq.wrapping_add(1);
                let roc = rtx.rollover.roc_for(h.sequence_number);
                write_header(&h, &mut buf);
                let header_len = buf.len();
                buf.extend_from_slice(&header.sequence_number.to_be_bytes());
                buf.extend_from_slice(payload);
                srtp.encrypt_rtp_in_place_with_roc(&mut buf, header_len, roc)
            }
        };
        queue(&mut self.failed, buf, protected, route, batch)
    }

    /// Sends a sender report for every down-track that has sent packets (the event loop calls
    /// this every [`REPORT_INTERVAL`]).
    pub fn send_reports(
        &mut self,
        now: Instant,
        wall: SystemTime,
        srtp: &mut Context,
        route: Route,
        batch: &mut SendBatch,
    ) {
        let ntp = ntp_time(wall);
        for (_, down) in self.downs.iter().filter(|(_, d)| d.packets > 0) {
            let Some((ts, at)) = down.last else { continue };
            let elapsed = now.saturating_duration_since(at).as_micros() as u64;
            let report = SenderReport {
                ssrc: down.ssrc,
                ntp_time: ntp,
                // u128: a clock rate from the client's SDP times hours of silence fits.
                rtp_time: ts
                    .wrapping_add((elapsed as u128 * down.clock_rate as u128 / 1_000_000) as u32),
                packet_count: down.packets,
                octet_count: down.octets,
                ..Default::default()
            };
            let Ok(plain) = report.marshal() else {
                continue;
            };
            match srtp.encrypt_rtcp(&plain) {
                Ok(protected) => {
                    let mut buf = batch.buffer();
                    buf.extend_from_slice(&protected);
                    batch.push(route.key, route.to, buf);
                }
                Err(_) => self.failed += 1,
            }
        }
    }
}

/// Queues a protected datagram, or counts and recycles one that could not be protected.
fn queue(
    failed: &mut u64,
    buf: Vec<u8>,
    protected: Result<(), rtc::shared::error::Error>,
    route: Route,
    batch: &mut SendBatch,
) -> bool {
    if protected.is_err() {
        *failed += 1;
        batch.recycle(buf);
        return false;
    }
    batch.push(route.key, route.to, buf);
    true
}

/// A wall-clock time as a 64-bit NTP timestamp (seconds since 1900, 32.32 fixed point).
pub fn ntp_time(wall: SystemTime) -> u64 {
    let since_unix = wall
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let seconds = since_unix.as_secs() + NTP_UNIX_OFFSET;
    let fraction = ((since_unix.subsec_nanos() as u64) << 32) / 1_000_000_000;
    (seconds << 32) | fraction
}

#[cfg(test)]
mod tests {
    use super::*;
    use rtc::shared::marshal::Unmarshal;
    use rtc::srtp::protection_profile::ProtectionProfile;

    fn context(profile: ProtectionProfile) -> Context {
        let crypto = rtc::crypto::default_provider().unwrap();
        let key = vec![7u8; profile.key_len()];
        let salt = vec![9u8; profile.salt_len()];
        Context::new(&key, &salt, profile, None, None, crypto.crypto()).unwrap()
    }

    fn header(seq: u16) -> RtpHeader {
        let mut h = RtpHeader {
            marker: true,
            payload_type: 96,
            sequence_number: seq,
            timestamp: 1234 + seq as u32,
            ssrc: 0xCAFE,
            ..Default::default()
        };
        h.extensions.push(1, Bytes::from_static(&[0x30]));
        h
    }

    /// The in-place protect (vendor/rtc-srtp patch), with the rollover counter kept here, gives
    /// byte for byte what rtc-srtp's own allocating one gives, across a sequence-number wrap and
    /// for a retransmission from before it, and the receiver decrypts it.
    #[test]
    fn in_place_protection_matches_rtc_srtp_and_decrypts() {
        for profile in [
            ProtectionProfile::AeadAes128Gcm,
            ProtectionProfile::Aes128CmHmacSha1_80,
        ] {
            let (mut ours, mut theirs, mut receiver, mut header_only) = (
                context(profile),
                context(profile),
                context(profile),
                context(profile),
            );
            let payload = vec![0xAB; 1000];
            let mut buf = Vec::new();
            let mut rollover = Rollover::default();
            // Across a wrap, with a retransmission from before it (65534 after 2).
            for seq in (65530..=65535).chain(0..3).chain([65534]).chain(3..5) {
                let h = header(seq);
                protect_rtp(&mut ours, &h, &payload, rollover.roc_for(seq), &mut buf).unwrap();
                let mut plain = Vec::new();
                write_header(&h, &mut plain);
                plain.extend_from_slice(&payload);
                let expected = theirs.encrypt_rtp(&plain).unwrap();
                assert_eq!(buf, &expected[..], "{profile:?} seq {seq}");
                let decrypted = receiver.decrypt_rtp(&buf).unwrap();
                assert_eq!(&decrypted[..], &plain[..], "{profile:?} seq {seq}");
                // The in-place protect that keeps the counter in the context agrees.
                let mut kept = plain.clone();
                header_only
                    .encrypt_rtp_in_place(&mut kept, plain.len() - payload.len())
                    .unwrap();
                assert_eq!(kept, buf, "{profile:?} seq {seq}");
            }
        }
    }

    #[test]
    fn a_buffer_shorter_than_a_header_is_an_error() {
        let mut ctx = context(ProtectionProfile::AeadAes128Gcm);
        let mut short = vec![0x80, 96, 0, 1];
        assert!(ctx.encrypt_rtp_in_place(&mut short, 12).is_err());
        assert!(ctx.encrypt_rtp_in_place(&mut vec![0; 20], 8).is_err());
    }

    fn route() -> Route {
        Route {
            to: "127.0.0.1:9".parse().unwrap(),
            key: 3,
        }
    }

    /// Decrypts every queued datagram (flushing to a socket nobody reads) and returns them.
    fn sent(batch: &mut SendBatch, receiver: &mut Context, rtcp: bool) -> Vec<Vec<u8>> {
        let out = batch.drain_for_test();
        out.into_iter()
            .map(|d| {
                if rtcp {
                    receiver.decrypt_rtcp(&d).unwrap().to_vec()
                } else {
                    receiver.decrypt_rtp(&d).unwrap().to_vec()
                }
            })
            .collect()
    }

    #[test]
    fn a_lost_packet_goes_again_as_sent_or_as_rtx() {
        let profile = ProtectionProfile::AeadAes128Gcm;
        let (mut srtp, mut receiver) = (context(profile), context(profile));
        let mut egress = Egress::default();
        let video = egress.add(0xCAFE, 90_000);
        let mut batch = SendBatch::new(false);
        let payload = vec![7u8; 100];
        let now = Instant::now();
        let h = header(599);
        assert!(egress.resend(video, &h, &payload, now, &mut srtp, route(), &mut batch));
        let plain = sent(&mut batch, &mut receiver, false);
        let mut expected = Vec::new();
        write_header(&h, &mut expected);
        expected.extend_from_slice(&payload);
        assert_eq!(
            plain,
            vec![expected.clone()],
            "without RTX: the packet as first sent"
        );
        // With RTX negotiated: the RTX stream's SSRC, payload type and own sequence numbers,
        // the original sequence number first in the payload, the rest of the header as sent.
        egress.set_rtx(video, 0xBEEF, Some(97));
        for seq in [599u16, 598] {
            assert!(egress.resend(
                video,
                &header(seq),
                &payload,
                now,
                &mut srtp,
                route(),
                &mut batch
            ));
        }
        let rtx = sent(&mut batch, &mut receiver, false);
        for (packet, original) in rtx.iter().zip([599u16, 598]) {
            let header_len = 12 + 8; // one one-byte extension, padded
            assert_eq!(packet[1], 0x80 | 97, "marker kept, RTX payload type");
            assert_eq!(&packet[8..12], &0xBEEFu32.to_be_bytes());
            assert_eq!(
                &packet[4..8],
                &header(original).timestamp.to_be_bytes(),
                "timestamp kept"
            );
            assert_eq!(
                &packet[12..header_len],
                &expected[12..header_len],
                "extensions kept"
            );
            assert_eq!(&packet[header_len..header_len + 2], &original.to_be_bytes());
            assert_eq!(&packet[header_len + 2..], &payload[..]);
        }
        let rtx_seq = |p: &Vec<u8>| u16::from_be_bytes([p[2], p[3]]);
        assert_eq!(rtx_seq(&rtx[1]), rtx_seq(&rtx[0]).wrapping_add(1));
        // A renegotiation that keeps RTX keeps its numbering; one without RTX drops it.
        egress.set_rtx(video, 0xBEEF, Some(97));
        assert!(egress.resend(
            video,
            &header(1),
            &payload,
            now,
            &mut srtp,
            route(),
            &mut batch
        ));
        let again = sent(&mut batch, &mut receiver, false);
        assert_eq!(rtx_seq(&again[0]), rtx_seq(&rtx[1]).wrapping_add(1));
        egress.set_rtx(video, 0xBEEF, None);
        assert!(egress.resend(
            video,
            &header(2),
            &payload,
            now,
            &mut srtp,
            route(),
            &mut batch
        ));
        assert_eq!(
            &sent(&mut batch, &mut receiver, false)[0][8..12],
            &0xCAFEu32.to_be_bytes()
        );
        // A flood of NACKs gets at most MAX_RESENDS_PER_SECOND answers a second.
        let mut fresh = Egress::default();
        let slot = fresh.add(0xCAFE, 90_000);
        let resent = (0..2 * MAX_RESENDS_PER_SECOND)
            .filter(|i| {
                fresh.resend(
                    slot,
                    &header(*i as u16),
                    &payload,
                    now,
                    &mut srtp,
                    route(),
                    &mut batch,
                )
            })
            .count();
        assert_eq!(resent, MAX_RESENDS_PER_SECOND as usize);
        let later = now + Duration::from_secs(1);
        assert!(fresh.resend(
            slot,
            &header(1),
            &payload,
            later,
            &mut srtp,
            route(),
            &mut batch
        ));
        batch.drain_for_test();
    }

    #[test]
    fn sender_reports_count_what_was_sent_and_extrapolate_the_timestamp() {
        let profile = ProtectionProfile::Aes128CmHmacSha1_80;
        let (mut srtp, mut receiver) = (context(profile), context(profile));
        let mut egress = Egress::default();
        let slot = egress.add(0xCAFE, 90_000);
        let mut batch = SendBatch::new(false);
        let t0 = Instant::now();
        let wall = SystemTime::now();
        // Nothing sent yet: no report.
        egress.send_reports(t0, wall, &mut srtp, route(), &mut batch);
        assert!(batch.is_empty());
        let mut h = header(7);
        h.timestamp = 90_000;
        egress.send(
            slot,
            &h,
            &Bytes::from(vec![0; 500]),
            t0,
            &mut srtp,
            route(),
            &mut batch,
        );
        batch.drain_for_test();
        let later = t0 + Duration::from_millis(100);
        egress.send_reports(later, wall, &mut srtp, route(), &mut batch);
        let reports = sent(&mut batch, &mut receiver, true);
        assert_eq!(reports.len(), 1);
        let sr = SenderReport::unmarshal(&mut &reports[0][..]).unwrap();
        assert_eq!((sr.ssrc, sr.packet_count, sr.octet_count), (0xCAFE, 1, 500));
        assert_eq!(
            sr.rtp_time,
            90_000 + 9_000,
            "100 ms at 90 kHz after the last packet"
        );
        assert_eq!(sr.ntp_time, ntp_time(wall));
    }

    #[test]
    fn ntp_time_of_a_known_instant() {
        let t = SystemTime::UNIX_EPOCH + Duration::from_millis(1500);
        assert_eq!(ntp_time(t), ((NTP_UNIX_OFFSET + 1) << 32) | (1u64 << 31));
    }
}
