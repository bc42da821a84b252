//! One published track and its subscribers: the per-packet fan-out.
//!
//! A `TrackForwarder` is owned by exactly one task, which feeds it packets and applies control
//! changes between packets, so the per-packet path takes no lock and touches no shared counter.
//! Time comes in as `now`: nothing here reads a clock or does I/O.

use std::time::{Duration, Instant};

use super::downtrack::{DownTrack, DownTrackConfig, DownTrackId, Quality};
use super::keyframe::Codec;
use super::rtp::{RtpHeader, RtpPacket};

/// Packets of a video layer kept for retransmissions (NACKs from any subscriber): 0.5 s at
/// 1000 packets/s, 2.5 s at 200.
pub const HISTORY: usize = 512;

/// At most one keyframe request per source layer in this interval.
pub const KEYFRAME_REQUEST_INTERVAL: Duration = Duration::from_millis(500);
/// A layer with no packet for this long is not offered to subscribers.
pub const LAYER_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, Clone)]
struct Layer {
    ssrc: u32,
    /// The simulcast rid it was announced with (`None`: the single stream).
    rid: Option<String>,
    quality: Quality,
    last_seen: Option<Instant>,
    last_keyframe_request: Option<Instant>,
    /// Recent packets by sequence number modulo [`HISTORY`] (video only; allocated on first use).
    kept: Vec<Option<RtpPacket>>,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TrackStats {
    pub packets: u64,
    pub bytes: u64,
    /// Packets that could not be parsed (raw input only).
    pub malformed: u64,
    /// Packets from an SSRC that is not one of this track's layers.
    pub unknown_ssrc: u64,
    /// Packets dropped because the publisher muted the track.
    pub muted: u64,
    pub keyframe_requests: u64,
}

pub struct TrackForwarder<S> {
    codec: Codec,
    layers: Vec<Layer>,
    downs: Vec<DownTrack<S>>,
    muted: bool,
    pub stats: TrackStats,
    /// Reused for every output header: no allocation per packet.
    scratch: RtpHeader,
    /// The announced simulcast rids and their ranks (empty: not simulcast, or not announced).
    rid_ranks: Vec<(String, Quality)>,
}

/// Maps a simulcast rid to a quality rank; `None` for a name that tells nothing. "h" is half
/// (medium) next to "q"/"f" (Chrome's naming), but high next to "l"/"m".
fn quality_of_rid(rid: &str, h_is_high: bool) -> Option<Quality> {
    match rid.to_ascii_lowercase().as_str() {
        "q" | "l" | "low" | "0" => Some(Quality::Low),
        "h" if h_is_high => Some(Quality::High),
        "h" | "m" | "mid" | "medium" | "1" => Some(Quality::Medium),
        "f" | "high" | "full" | "2" => Some(Quality::High),
        _ => None,
    }
}

/// The quality of each rid a publisher announced (`a=simulcast:send`): by name when every name
/// tells its rank and no two share one, else by position, lowest first (the order browsers list
/// `sendEncodings` in).
pub fn rank_rids(rids: &[String]) -> Vec<(String, Quality)> {
    let lower: Vec<String> = rids.iter().map(|r| r.to_ascii_lowercase()).collect();
    let h_is_high = lower.iter().any(|r| r == "l" || r == "m") && !lower.iter().any(|r| r == "f");
    let named: Option<Vec<Quality>> = lower.iter().map(|r| quality_of_rid(r, h_is_high)).collect();
    let distinct = |q: &[Quality]| (1..q.len()).all(|i| !q[..i].contains(&q[i]));
    let qualities = match named {
        Some(q) if distinct(&q) => q,
        _ => (0..rids.len())
            .map(|i| match (i, rids.len()) {
                (_, 1) => Quality::High,
                (0, _) => Quality::Low,
                (i, n) if i + 1 == n => Quality::High,
                _ => Quality::Medium,
            })
            .collect(),
    };
    rids.iter().cloned().zip(qualities).collect()
}

impl<S> TrackForwarder<S> {
    pub fn new(codec: Codec) -> Self {
        TrackForwarder {
            codec,
            layers: Vec::new(),
            downs: Vec::new(),
            muted: false,
            stats: TrackStats::default(),
            scratch: RtpHeader::default(),
            rid_ranks: Vec::new(),
        }
    }

    /// The simulcast rids the publisher announced, so each layer gets its rank from the whole set.
    pub fn set_rids(&mut self, rids: &[String]) {
        self.rid_ranks = rank_rids(rids);
    }

    pub fn has_layer(&self, ssrc: u32) -> bool {
        self.layers.iter().any(|l| l.ssrc == ssrc)
    }

    /// Whether a layer for `rid` (or, with `None`, any layer at all) is still missing: a source
    /// whose announcement was lost can then be added from its first packet, while a stream that
    /// is not a layer (say a retransmission stream) can never displace one.
    pub fn lacks_layer(&self, rid: Option<&str>) -> bool {
        match rid {
            None => self.layers.is_empty() && self.rid_ranks.is_empty(),
            Some(rid) => match self.rid_ranks.iter().find(|(r, _)| r == rid) {
                Some((_, quality)) => !self.layers.iter().any(|l| l.quality == *quality),
                None => false,
            },
        }
    }

    /// The rid a layer was added with.
    pub fn rid_of(&self, ssrc: u32) -> Option<String> {
        self.layers.iter().find(|l| l.ssrc == ssrc)?.rid.clone()
    }

    fn quality_of(&self, rid: &str) -> Quality {
        if let Some((_, q)) = self.rid_ranks.iter().find(|(r, _)| r == rid) {
            return *q;
        }
        quality_of_rid(rid, false).unwrap_or(match self.layers.len() {
            0 => Quality::Low,
            1 => Quality::Medium,
            _ => Quality::High,
        })
    }

    /// Registers a source SSRC (a simulcast layer by its rid, or the single stream). A known SSRC
    /// is ignored, so repeated announcements (after every renegotiation) are harmless. Returns the
    /// SSRC of the layer it replaces, if any.
    pub fn add_layer(&mut self, ssrc: u32, rid: Option<&str>) -> Option<u32> {
        if self.has_layer(ssrc) {
            return None;
        }
        let quality = match rid {
            // A single stream: any wish maps to it.
            None => Quality::High,
            Some(rid) => self.quality_of(rid),
        };
        // The same rank again (a re-publish with new SSRCs): the new source replaces the old.
        let replaced = self
            .layers
            .iter()
            .position(|l| l.quality == quality)
            .map(|i| self.layers.swap_remove(i).ssrc);
        self.layers.push(Layer {
            ssrc,
            rid: rid.map(str::to_owned),
            quality,
            last_seen: None,
            last_keyframe_request: None,
            kept: Vec::new(),
        });
        replaced
    }

    pub fn add_down_track(&mut self, config: DownTrackConfig, sink: S) {
        self.remove_down_track(config.id);
        self.downs.push(DownTrack::new(config, sink));
    }

    pub fn remove_down_track(&mut self, id: DownTrackId) -> Option<DownTrack<S>> {
        let i = self.downs.iter().position(|d| d.config.id == id)?;
        Some(self.downs.swap_remove(i))
    }

    pub fn down_track(&self, id: DownTrackId) -> Option<&DownTrack<S>> {
        self.downs.iter().find(|d| d.config.id == id)
    }

    /// Applies a renegotiated payload type and extension mapping; the subscriber's layer choice
    /// is `set_quality`'s alone, so a renegotiation never undoes it.
    pub fn configure_down_track(&mut self, config: DownTrackConfig) {
        if let Some(d) = self.downs.iter_mut().find(|d| d.config.id == config.id) {
            d.config = DownTrackConfig {
                quality: d.config.quality,
                ..config
            };
        }
    }

    pub fn set_quality(&mut self, id: DownTrackId, quality: Quality) {
        if let Some(d) = self.downs.iter_mut().find(|d| d.config.id == id) {
            d.config.quality = quality;
        }
    }

    /// Publisher mute: nothing is forwarded; on unmute every subscriber starts a new segment
    /// (video on a keyframe), so its sequence numbers continue without a gap.
    pub fn set_muted(&mut self, muted: bool) {
        if self.muted && !muted {
            for d in &mut self.downs {
                d.resync = true;
            }
        }
        self.muted = muted;
    }

    /// The layer to send a subscriber: the best active one not above its wish, else the lowest
    /// active one, else its wish (nothing active yet).
    fn effective_quality(layers: &[Layer], wish: Quality, now: Instant) -> Quality {
        let active = |l: &&Layer| {
            l.last_seen
                .is_some_and(|t| now.saturating_duration_since(t) < LAYER_TIMEOUT)
        };
        let best_below = layers
            .iter()
            .filter(active)
            .filter(|l| l.quality <= wish)
            .map(|l| l.quality)
            .max();
        best_below
            .or_else(|| layers.iter().filter(active).map(|l| l.quality).min())
            .unwrap_or(wish)
    }

    /// Throttled: `Some(ssrc)` when a keyframe request for that layer should go upstream now.
    fn request_keyframe(layer: &mut Layer, stats: &mut TrackStats, now: Instant) -> Option<u32> {
        let due = layer
            .last_keyframe_request
            .is_none_or(|t| now.saturating_duration_since(t) >= KEYFRAME_REQUEST_INTERVAL);
        if !due {
            return None;
        }
        layer.last_keyframe_request = Some(now);
        stats.keyframe_requests += 1;
        Some(layer.ssrc)
    }

    /// A subscriber asked for a keyframe (PLI/FIR): relay it upstream, throttled per layer.
    pub fn on_keyframe_request(&mut self, id: DownTrackId, now: Instant) -> Option<u32> {
        let d = self.downs.iter().find(|d| d.config.id == id)?;
        let wish = Self::effective_quality(&self.layers, d.config.quality, now);
        let layer = match d.current {
            Some(ssrc) => self.layers.iter_mut().find(|l| l.ssrc == ssrc),
            None => self.layers.iter_mut().find(|l| l.quality == wish),
        }?;
        Self::request_keyframe(layer, &mut self.stats, now)
    }

    /// Keeps a forwarded video packet for retransmission: one copy per track, shared by every
    /// subscriber (each maps its own sequence numbers back, see [`Self::retransmission`]).
    pub fn keep(&mut self, packet: RtpPacket) {
        if !self.codec.is_video() {
            return;
        }
        let Some(layer) = self
            .layers
            .iter_mut()
            .find(|l| l.ssrc == packet.header.ssrc)
        else {
            return;
        };
        if layer.kept.is_empty() {
            layer.kept.resize(HISTORY, None);
        }
        let slot = packet.header.sequence_number as usize % HISTORY;
        layer.kept[slot] = Some(packet);
    }

    /// A packet a subscriber lost (`out_seq` in its numbering), rewritten for it again, if it is
    /// still kept; `None` otherwise.
    pub fn retransmission(
        &self,
        id: DownTrackId,
        out_seq: u16,
    ) -> Option<(RtpHeader, bytes::Bytes)> {
        let d = self.downs.iter().find(|d| d.config.id == id)?;
        let (ssrc, in_seq) = d.source_of(out_seq)?;
        let layer = self.layers.iter().find(|l| l.ssrc == ssrc)?;
        let kept = layer.kept.get(in_seq as usize % HISTORY)?.as_ref()?;
        if kept.header.sequence_number != in_seq {
            return None; // overwritten since
        }
        Some((d.rewritten(&kept.header)?, kept.payload.clone()))
    }

    /// Parses raw bytes and forwards them; malformed input is counted and dropped.
    pub fn forward_raw(
        &mut self,
        buf: bytes::Bytes,
        now: Instant,
        send: impl FnMut(&S, &RtpHeader, &bytes::Bytes),
    ) -> Option<u32> {
        match RtpPacket::parse(buf) {
            Ok(p) => self.forward(&p, now, send),
            Err(_) => {
                self.stats.malformed += 1;
                None
            }
        }
    }

    /// Fans one packet out: `send(sink, header, payload)` for every subscriber that gets it.
    /// Returns the SSRC of a layer to request a keyframe for, when one is needed now.
    pub fn forward(
        &mut self,
        packet: &RtpPacket,
        now: Instant,
        mut send: impl FnMut(&S, &RtpHeader, &bytes::Bytes),
    ) -> Option<u32> {
        let h = &packet.header;
        let Some(layer_index) = self.layers.iter().position(|l| l.ssrc == h.ssrc) else {
            self.stats.unknown_ssrc += 1;
            return None;
        };
        self.stats.packets += 1;
        self.stats.bytes += packet.payload.len() as u64;
        self.layers[layer_index].last_seen = Some(now);
        if self.muted {
            self.stats.muted += 1;
            return None;
        }
        let quality = self.layers[layer_index].quality;
        let video = self.codec.is_video();
        // Only parsed when some subscriber needs to start or switch.
        let mut keyframe: Option<bool> = None;
        let mut is_keyframe =
            |codec: Codec| *keyframe.get_or_insert_with(|| codec.starts_keyframe(&packet.payload));
        let mut want_keyframe = false;
        let clock_rate = self.codec.clock_rate();
        let out = &mut self.scratch;

        for d in &mut self.downs {
            if d.config.payload_type.is_none() {
                continue;
            }
            let on_current = d.current == Some(h.ssrc);
            if !on_current || d.resync {
                let wanted = on_current
                    || Self::effective_quality(&self.layers, d.config.quality, now) == quality;
                if !wanted {
                    continue;
                }
                if video && !is_keyframe(self.codec) {
                    d.stats.waiting += 1;
                    want_keyframe = true;
                    continue;
                }
                d.start_segment(h, clock_rate, now);
            }
            if d.rewrite(h, packet.payload.len(), now, out) {
                send(&d.sink, out, &packet.payload);
            }
        }
        if want_keyframe {
            return Self::request_keyframe(&mut self.layers[layer_index], &mut self.stats, now);
        }
        None
    }
}
