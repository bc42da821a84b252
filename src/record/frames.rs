//! Packets to frames: reordering within a window and depacketizing, with webrtc-rs's sample
//! builder and depacketizers. After a gap a video track waits for its next keyframe, so a
//! file never holds a frame that references one it lacks.

use std::time::{Duration, Instant};

use bytes::Bytes;
use rtc::media::io::sample_builder::SampleBuilder;
use rtc::rtp;
use rtc::rtp::codec::{h264::H264Packet, opus::OpusPacket, vp8::Vp8Packet, vp9::Vp9Packet};

use crate::sfu::forward::Codec;

/// Packets held back waiting for a missing one before it is given up.
const REORDER_PACKETS: u16 = 128;
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

enum Builder {
    Opus(SampleBuilder<OpusPacket>),
    Vp8(SampleBuilder<Vp8Packet>),
    Vp9(SampleBuilder<Vp9Packet>),
    H264(SampleBuilder<H264Packet>),
}

pub struct FrameAssembler {
    codec: Codec,
    builder: Builder,
    /// RTP timestamps of frames that start with a keyframe (the last few).
    keyframes: Vec<u32>,
    /// After a gap: video frames are skipped until a keyframe.
    waiting_for_keyframe: bool,
    /// Unwrapping: the last timestamp and its extended value.
    last: Option<(u32, u64)>,
    /// Frames left out after gaps (video, until a keyframe).
    pub skipped_frames: u64,
    /// The newest packet's sequence number and timestamp.
    newest: Option<(u16, u32)>,
}

impl FrameAssembler {
    pub fn new(codec: Codec) -> Self {
        let rate = codec.clock_rate();
        let builder = match codec {
            Codec::Opus => Builder::Opus(sample_builder(OpusPacket, rate)),
            Codec::Vp8 => Builder::Vp8(sample_builder(Vp8Packet::default(), rate)),
            Codec::Vp9 => Builder::Vp9(sample_builder(Vp9Packet::default(), rate)),
            Codec::H264 => Builder::H264(sample_builder(H264Packet::default(), rate)),
        };
        FrameAssembler {
            codec,
            builder,
            keyframes: Vec::new(),
            waiting_for_keyframe: codec.is_video(),
            last: None,
            skipped_frames: 0,
            newest: None,
        }
    }

    /// One packet as the forwarding core rewrote it (any order within the window).
    pub fn push(&mut self, packet: rtp::Packet, now: Instant) {
        let (seq, ts) = (packet.header.sequence_number, packet.header.timestamp);
        let newer = self
            .newest
            .is_none_or(|(s, _)| seq.wrapping_sub(s) as i16 > 0);
        if newer {
            self.newest = Some((seq, ts));
        }
        if self.codec.is_video() && self.codec.starts_keyframe(&packet.payload) {
            if self.keyframes.len() >= 8 {
                self.keyframes.remove(0);
            }
            self.keyframes.push(packet.header.timestamp);
        }
        match &mut self.builder {
            Builder::Opus(b) => b.push(now, packet),
            Builder::Vp8(b) => b.push(now, packet),
            Builder::Vp9(b) => b.push(now, packet),
            Builder::H264(b) => b.push(now, packet),
        }
    }

    /// The next complete frame, if any.
    pub fn pop(&mut self, now: Instant) -> Option<AssembledFrame> {
        loop {
            let sample = match &mut self.builder {
                Builder::Opus(b) => b.pop(now),
                Builder::Vp8(b) => b.pop(now),
                Builder::Vp9(b) => b.pop(now),
                Builder::H264(b) => b.pop(now),
            }?;
            if sample.data.is_empty() {
                continue;
            }
            let ts = sample.packet_timestamp;
            let keyframe = !self.codec.is_video() || self.keyframes.contains(&ts);
            if self.codec.is_video() {
                if sample.prev_dropped_packets > 0 {
                    self.waiting_for_keyframe = true;
                }
                if self.waiting_for_keyframe && !keyframe {
                    self.skipped_frames += 1;
                    continue;
                }
                self.waiting_for_keyframe = false;
            }
            let timestamp = self.unwrap(ts);
            return Some(AssembledFrame {
                data: sample.data,
                timestamp,
                rtp_timestamp: ts,
                keyframe,
            });
        }
    }

    /// The end of the stream: the frames still held, the last one included (the builder
    /// releases a frame when the next begins, so an empty packet after it ends it).
    pub fn finish(&mut self, now: Instant) -> Vec<AssembledFrame> {
        if let Some((seq, ts)) = self.newest {
            let end = rtp::Packet {
                header: rtp::header::Header {
                    version: 2,
                    sequence_number: seq.wrapping_add(1),
                    timestamp: ts.wrapping_add(1),
                    ..Default::default()
                },
                payload: Bytes::new(),
            };
            self.push(end, now);
        }
        std::iter::from_fn(|| self.pop(now)).collect()
    }

    /// Whether video is skipped until a keyframe (the writer asks for one).
    pub fn needs_keyframe(&self) -> bool {
        self.waiting_for_keyframe
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

fn sample_builder<T: rtp::packetizer::Depacketizer>(d: T, rate: u32) -> SampleBuilder<T> {
    SampleBuilder::new(REORDER_PACKETS, d, rate).with_max_time_delay(REORDER_TIME)
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
        let now = Instant::now();
        let mut frames = Vec::new();
        // Over half a second of frames, so the builder gives up waiting for the lost packet.
        for n in 0..30u16 {
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
    }
}
