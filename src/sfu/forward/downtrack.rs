//! One subscriber's copy of a track: its own SSRC, payload type and extension ids, and the
//! sequence/timestamp offsets that keep its stream continuous whatever the source does.

use std::time::Instant;

use super::rtp::RtpHeader;

pub type DownTrackId = u64;

/// Simulcast quality a subscriber asks for (`setQuality`); also a layer's rank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub enum Quality {
    Low = 0,
    Medium = 1,
    #[default]
    High = 2,
}

impl Quality {
    pub fn parse(s: &str) -> Option<Quality> {
        match s {
            "low" => Some(Quality::Low),
            "medium" => Some(Quality::Medium),
            "high" => Some(Quality::High),
            _ => None,
        }
    }
}

/// Maps the publisher's one-byte header-extension ids (1..=14) to this subscriber's;
/// unmapped extensions are not forwarded.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExtMap([u8; 16]);

impl ExtMap {
    pub fn insert(&mut self, publisher_id: u8, subscriber_id: u8) {
        if (1..15).contains(&publisher_id) && (1..15).contains(&subscriber_id) {
            self.0[publisher_id as usize] = subscriber_id;
        }
    }

    pub fn get(&self, publisher_id: u8) -> Option<u8> {
        match self.0.get(publisher_id as usize) {
            Some(&id) if id != 0 => Some(id),
            _ => None,
        }
    }
}

/// What a down-track is told when it is created or renegotiated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DownTrackConfig {
    pub id: DownTrackId,
    /// The SSRC this subscriber sees, for the whole life of the down-track.
    pub ssrc: u32,
    /// The payload type negotiated with this subscriber; `None` until its answer: nothing is sent.
    pub payload_type: Option<u8>,
    pub ext_map: ExtMap,
    pub quality: Quality,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DownTrackStats {
    pub packets: u64,
    pub bytes: u64,
    /// Packets dropped while waiting for a keyframe to start or switch on.
    pub waiting: u64,
    /// Late packets from before the current stream segment.
    pub stale: u64,
}

/// A down-track and the sink (the I/O side's handle) its packets go to.
#[derive(Debug)]
pub struct DownTrack<S> {
    pub config: DownTrackConfig,
    pub sink: S,
    pub stats: DownTrackStats,
    /// SSRC of the source (layer) forwarded now.
    pub(super) current: Option<u32>,
    /// The next packet must start a new segment (after mute or a gap).
    pub(super) resync: bool,
    segment: Option<Segment>,
    last_out: Option<LastOut>,
}

/// Offsets of the stream segment being forwarded: out = in + offset (wrapping).
#[derive(Debug, Clone, Copy)]
struct Segment {
    /// The segment's first input sequence number, while packets from before it can still
    /// arrive late; `None` once the segment is far past it (sequence numbers wrap, so the
    /// comparison would turn around after 32768 packets).
    first_in_seq: Option<u16>,
    seq_offset: u16,
    ts_offset: u32,
}

/// How far a segment goes before late packets from before its start stop being checked.
const LATE_WINDOW: i16 = 1024;

#[derive(Debug, Clone, Copy)]
struct LastOut {
    seq: u16,
    ts: u32,
    at: Instant,
}

/// `a - b` for RTP sequence numbers, in -32768..32767.
pub fn seq_diff(a: u16, b: u16) -> i16 {
    a.wrapping_sub(b) as i16
}

impl<S> DownTrack<S> {
    pub fn new(config: DownTrackConfig, sink: S) -> Self {
        DownTrack {
            config,
            sink,
            stats: DownTrackStats::default(),
            current: None,
            resync: false,
            segment: None,
            last_out: None,
        }
    }

    /// Starts a new segment at `h` so the output continues right after the last packet sent:
    /// the next sequence number, and a timestamp advanced by the wall-clock time since then.
    pub(super) fn start_segment(&mut self, h: &RtpHeader, clock_rate: u32, now: Instant) {
        let (seq_offset, ts_offset) = match self.last_out {
            None => (0, 0),
            Some(last) => {
                let elapsed = now.saturating_duration_since(last.at);
                let ticks = ((elapsed.as_micros() as u64 * clock_rate as u64) / 1_000_000).max(1);
                let next_ts = last.ts.wrapping_add(ticks as u32);
                (
                    last.seq.wrapping_add(1).wrapping_sub(h.sequence_number),
                    next_ts.wrapping_sub(h.timestamp),
                )
            }
        };
        self.segment = Some(Segment {
            first_in_seq: Some(h.sequence_number),
            seq_offset,
            ts_offset,
        });
        self.current = Some(h.ssrc);
        self.resync = false;
    }

    /// Rewrites `h` into `out` for this subscriber; `false` if the packet is not to be sent.
    pub(super) fn rewrite(
        &mut self,
        h: &RtpHeader,
        payload_len: usize,
        now: Instant,
        out: &mut RtpHeader,
    ) -> bool {
        let (Some(seg), Some(pt)) = (self.segment, self.config.payload_type) else {
            return false;
        };
        if let Some(first) = seg.first_in_seq {
            let since_start = seq_diff(h.sequence_number, first);
            if since_start < 0 {
                self.stats.stale += 1;
                return false;
            }
            if since_start > LATE_WINDOW
                && let Some(s) = &mut self.segment
            {
                s.first_in_seq = None;
            }
        }
        self.write_out(&seg, pt, h, out);
        let newer = self
            .last_out
            .is_none_or(|last| seq_diff(out.sequence_number, last.seq) > 0);
        if newer {
            self.last_out = Some(LastOut {
                seq: out.sequence_number,
                ts: out.timestamp,
                at: now,
            });
        }
        self.stats.packets += 1;
        self.stats.bytes += payload_len as u64;
        true
    }

    fn write_out(&self, seg: &Segment, pt: u8, h: &RtpHeader, out: &mut RtpHeader) {
        out.marker = h.marker;
        out.payload_type = pt;
        out.sequence_number = h.sequence_number.wrapping_add(seg.seq_offset);
        out.timestamp = h.timestamp.wrapping_add(seg.ts_offset);
        out.ssrc = self.config.ssrc;
        out.extensions.clear();
        for (id, value) in h.extensions.iter() {
            if let Some(mapped) = self.config.ext_map.get(*id) {
                out.extensions.push(mapped, value.clone());
            }
        }
    }

    /// The source packet (layer SSRC, input sequence number) this subscriber got as `out_seq`,
    /// if it was sent in the current segment (a NACK for an older one cannot be mapped back).
    pub(super) fn source_of(&self, out_seq: u16) -> Option<(u32, u16)> {
        let (seg, last, ssrc) = (self.segment?, self.last_out?, self.current?);
        if seq_diff(out_seq, last.seq) > 0 {
            return None; // not sent yet
        }
        let in_seq = out_seq.wrapping_sub(seg.seq_offset);
        if seg
            .first_in_seq
            .is_some_and(|first| seq_diff(in_seq, first) < 0)
        {
            return None; // before the segment
        }
        Some((ssrc, in_seq))
    }

    /// `h` as this subscriber got it, again (a retransmission), without touching its state.
    pub(super) fn rewritten(&self, h: &RtpHeader) -> Option<RtpHeader> {
        let (seg, pt) = (self.segment?, self.config.payload_type?);
        let mut out = RtpHeader::default();
        self.write_out(&seg, pt, h, &mut out);
        Some(out)
    }
}
