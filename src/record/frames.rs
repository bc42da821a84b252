//! Packets to frames: a small reorder window by sequence number, then webrtc-rs's
//! depacketizers. After a gap a video track waits for its next keyframe, so a file never holds a
//! frame that references one it lacks. (webrtc-rs's sample builder does the same with two
//! 65536-slot arrays per track, about 13 MB; this holds only the packets in the window.)

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use rtc::rtp;
use rtc::rtp::codec::{h264::H264Packet, opus::OpusPacket, vp8::Vp8Packet, vp9::Vp9Packet};
use rtc::rtp::packetizer::Depacketizer;

use crate::sfu::forward::Codec;

/// Packets held back waiting for a missing one before it is given up.
const REORDER_PACKETS: usize = 128;
/// ... or for this long.
const REORDER_TIME: Duration = Duration::from_millis(500);

/// A frame out of the assembler.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AssembledFrame {
    pub data: Bytes,
    pub timestamp: u64,
    /// The RTP timestamp as it came (not unwrapped).
    pub rtp_timestamp: u32,
    pub keyframe: bool,
}

pub struct FrameAssembler {
    codec: Codec,
    depacketizer: Box<dyn Depacketizer + Send>,
    /// Packets waiting, by extended sequence number, with their arrival.
    window: BTreeMap<u64, (rtp::Packet, Instant)>,
    /// The extended sequence number of the next packet to take.
    next: Option<u64>,
    /// The newest extended sequence number (sequence numbers wrap at 16 bits).
    newest: Option<u64>,
    /// Packets were lost since the last frame.
    lost: bool,
    /// After a gap: video frames are skipped until a keyframe.
    waiting_for_keyframe: bool,
    /// Unwrapping timestamps: the last one and its extended value.
    last: Option<(u32, u64)>,
    ready: VecDeque<AssembledFrame>,
    /// Frames left out after gaps (video, until a keyframe).
    pub skipped_frames: u64,
}

impl FrameAssembler {
    pub fn new(codec: Codec) -> Self {
        let depacketizer: Box<dyn Depacketizer + Send> = match codec {
            Codec::Opus => Box::new(OpusPacket),
            Codec::Vp8 => Box::new(Vp8Packet::default()),
            Codec::Vp9 => Box::new(Vp9Packet::default()),
            Codec::H264 => Box::new(H264Packet::default()),
        };
        FrameAssembler {
            codec,
            depacketizer,
            window: BTreeMap::new(),
            next: None,
            newest: None,
            lost: false,
            waiting_for_keyframe: codec.is_video(),
            last: None,
            ready: VecDeque::new(),
            skipped_frames: 0,
        }
    }

    /// One packet as the forwarding core rewrote it (any order within the window).
    pub fn push(&mut self, packet: rtp::Packet, now: Instant) {
        let seq = packet.header.sequence_number;
        // Extended: counted from 2^32 so that packets just before the first still fit.
        let ext = match self.newest {
            None => (1 << 32) + seq as u64,
            Some(newest) => {
                newest.wrapping_add_signed(seq.wrapping_sub(newest as u16) as i16 as i64)
            }
        };
        if self.newest.is_none_or(|n| ext > n) {
            self.newest = Some(ext);
        }
        let next = *self.next.get_or_insert(ext);
        if ext < next || self.window.contains_key(&ext) {
            return; // too late, or a duplicate
        }
        self.window.insert(ext, (packet, now));
        self.assemble(now, false);
    }

    /// The next complete frame, if any.
    pub fn pop(&mut self, now: Instant) -> Option<AssembledFrame> {
        self.assemble(now, false);
        self.ready.pop_front()
    }

    /// The end of the stream: every frame still complete in the window (what is missing
    /// will not come any more).
    pub fn finish(&mut self, now: Instant) -> Vec<AssembledFrame> {
        self.assemble(now, true);
        self.ready.drain(..).collect()
    }

    /// Whether video is skipped until a keyframe (the writer asks for one).
    pub fn needs_keyframe(&self) -> bool {
        self.waiting_for_keyframe
    }

    /// Takes every frame that can be taken now; `end`: nothing more will arrive.
    fn assemble(&mut self, now: Instant, end: bool) {
        while let (Some(next), Some((&first, (_, arrived)))) =
            (self.next, self.window.first_key_value())
        {
            // Waited long enough for what is missing: it is lost.
            let given_up = end
                || self.window.len() >= REORDER_PACKETS
                || now.saturating_duration_since(*arrived) >= REORDER_TIME;
            if first > next {
                if !given_up {
                    return;
                }
                self.lost = true;
                self.next = Some(first);
                continue;
            }
            let head = &self.window[&first].0;
            if !self.depacketizer.is_partition_head(&head.payload) {
                // The middle of a frame whose start is gone.
                self.window.remove(&first);
                self.next = Some(first + 1);
                self.lost = true;
                continue;
            }
            // The frame: packets of the head's timestamp up to its last (marker) packet.
            let timestamp = head.header.timestamp;
            let mut last = None;
            let mut k = first;
            while let Some((p, _)) = self.window.get(&k) {
                if p.header.timestamp != timestamp {
                    last = Some(k - 1); // the next frame began: this one is whole
                    break;
                }
                if self
                    .depacketizer
                    .is_partition_tail(p.header.marker, &p.payload)
                {
                    last = Some(k);
                    break;
                }
                k += 1;
            }
            let Some(last) = last else {
                if !given_up {
                    return; // the rest of the frame is still to come
                }
                // Incomplete for good: dropped, and what follows the hole is taken next.
                for s in first..k {
                    self.window.remove(&s);
                }
                self.lost = true;
                self.next = Some(k);
                continue;
            };
            self.take_frame(first, last);
        }
    }

    /// Depacketizes the packets `first..=last` (one frame) and queues the frame.
    fn take_frame(&mut self, first: u64, last: u64) {
        self.next = Some(last + 1);
        let mut data = BytesMut::new();
        let mut keyframe = !self.codec.is_video();
        let mut timestamp = 0;
        let mut broken = false;
        for s in first..=last {
            let Some((p, _)) = self.window.remove(&s) else {
                broken = true;
                continue;
            };
            if s == first {
                timestamp = p.header.timestamp;
                keyframe |= self.codec.starts_keyframe(&p.payload);
            }
            match self.depacketizer.depacketize(&p.payload) {
                Ok(part) => data.extend_from_slice(&part),
                Err(_) => broken = true,
            }
        }
        if broken {
            self.lost = true;
            return;
        }
        if data.is_empty() {
            return; // nothing to decode (padding)
        }
        if self.codec.is_video() {
            if std::mem::take(&mut self.lost) {
                self.waiting_for_keyframe = true;
            }
            if self.waiting_for_keyframe && !keyframe {
                self.skipped_frames += 1;
                return;
            }
            self.waiting_for_keyframe = false;
        }
        self.lost = false;
        let extended = self.unwrap(timestamp);
        self.ready.push_back(AssembledFrame {
            data: data.freeze(),
            timestamp: extended,
            rtp_timestamp: timestamp,
            keyframe,
        });
    }

    /// The timestamp extended past 32-bit wraps, from the first frame's.
    fn unwrap(&mut self, ts: u32) -> u64 {
        let extended = match self.last {
            None => 0,
            Some((last_ts, last_ext)) => {
                let delta = ts.wrapping_sub(last_ts) as i32 as i64;
                (last_ext as i64 + delta).max(0) as u64
            }
        };
        self.last = Some((ts, extended));
        extended
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Frame `n`'s two VP8 packets (sequence numbers 2n, 2n+1); a keyframe when `key`.
    fn vp8_frame(n: u16, key: bool) -> Vec<rtp::Packet> {
        let packet = |k: u16, payload: Vec<u8>| rtp::Packet {
            header: rtp::header::Header {
                version: 2,
                marker: k == 1,
                sequence_number: 2 * n + k,
                timestamp: 1000 + 3000 * n as u32,
                ..Default::default()
            },
            payload: Bytes::from(payload),
        };
        vec![
            // Start of partition 0; the VP8 frame's first byte says key (bit 0 clear) or delta.
            packet(0, vec![0x10, if key { 0x00 } else { 0x01 }, n as u8, 0xAA]),
            packet(1, vec![0x00, 0xEE, n as u8, 0xBB]),
        ]
    }

    fn drain(a: &mut FrameAssembler, now: Instant) -> Vec<(u64, bool, Vec<u8>)> {
        std::iter::from_fn(|| a.pop(now))
            .map(|f| (f.timestamp, f.keyframe, f.data.to_vec()))
            .collect()
    }

    #[test]
    fn packets_out_of_order_make_whole_frames_in_order() {
        let mut a = FrameAssembler::new(Codec::Vp8);
        let now = Instant::now();
        let mut packets: Vec<_> = (0..4).flat_map(|n| vp8_frame(n, n == 0)).collect();
        packets.swap(1, 2); // frame 0's second packet after frame 1's first
        packets.swap(5, 6);
        let mut frames = Vec::new();
        for p in packets {
            a.push(p, now);
            frames.extend(drain(&mut a, now));
        }
        let stamps: Vec<u64> = frames.iter().map(|f| f.0).collect();
        assert_eq!(&stamps[..3], &[0, 3000, 6000], "{frames:?}");
        assert_eq!(frames[0], (0, true, vec![0x00, 0, 0xAA, 0xEE, 0, 0xBB]));
        assert_eq!(frames[1], (3000, false, vec![0x01, 1, 0xAA, 0xEE, 1, 0xBB]));
    }

    #[test]
    fn after_a_lost_packet_video_waits_for_a_keyframe() {
        let mut a = FrameAssembler::new(Codec::Vp8);
        let start = Instant::now();
        let mut frames = Vec::new();
        // 30 frames a second for one second: the lost packet is given up 500 ms after it.
        for n in 0..30u16 {
            let now = start + Duration::from_millis(33 * n as u64);
            for (k, p) in vp8_frame(n, n == 0 || n == 5).into_iter().enumerate() {
                if n == 2 && k == 1 {
                    continue; // lost
                }
                a.push(p, now);
            }
            frames.extend(drain(&mut a, now));
        }
        let kept: Vec<(u64, bool)> = frames.iter().map(|f| (f.0, f.1)).collect();
        // Frames 0 and 1, then nothing until the keyframe 5 (frames 3 and 4 would need 2).
        assert_eq!(
            &kept[..4],
            &[(0, true), (3000, false), (15000, true), (18000, false)]
        );
        assert_eq!(a.skipped_frames, 2, "frames 3 and 4: {kept:?}");
        assert_eq!(kept.len(), 30 - 3, "every other frame: {kept:?}");
    }

    #[test]
    fn sequence_numbers_wrap_and_the_last_frame_comes_out() {
        let mut a = FrameAssembler::new(Codec::Opus);
        let now = Instant::now();
        let mut out = Vec::new();
        for n in 0..6u16 {
            let p = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    marker: n == 0,
                    sequence_number: 65533u16.wrapping_add(n),
                    timestamp: 960 * n as u32,
                    ..Default::default()
                },
                payload: Bytes::from(vec![0xFC, n as u8]),
            };
            a.push(p, now);
            out.extend(drain(&mut a, now));
        }
        out.extend(
            a.finish(now)
                .into_iter()
                .map(|f| (f.timestamp, f.keyframe, f.data.to_vec())),
        );
        let stamps: Vec<u64> = out.iter().map(|f| f.0).collect();
        assert_eq!(stamps, [0, 960, 1920, 2880, 3840, 4800]);
    }
}
