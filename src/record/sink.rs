//! The hook integrators implement to receive a track's media as frames.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::SystemTime;

use crate::sfu::forward::Codec;

/// The track a sink receives.
#[derive(Debug, Clone)]
pub struct TrackMeta {
    pub room: String,
    pub user: String,
    pub track_id: String,
    pub codec: Codec,
    /// RTP clock rate: frame timestamps count in these units.
    pub clock_rate: u32,
    /// Audio channels as negotiated (2 for Opus), 0 for video.
    pub channels: u16,
    /// When the recording started.
    pub started: SystemTime,
}

/// One depacketized frame: an Opus packet, a VP8/VP9 frame, or an H264 access unit (Annex B).
#[derive(Debug, Clone, Copy)]
pub struct Frame<'a> {
    pub data: &'a [u8],
    /// RTP timestamp, unwrapped, counted from the recording's first frame (clock-rate units).
    pub timestamp: u64,
    /// Whether a decoder can start here (always true for audio).
    pub keyframe: bool,
    /// When the publisher captured it, in seconds on its NTP clock (from its RTCP sender
    /// reports; the same clock for all its tracks). `None` until a sender report arrived.
    pub capture_time: Option<f64>,
    /// When the server had it (its last packet).
    pub arrival: std::time::Instant,
}

/// Receives a track's frames on the track's writer thread (never on a media loop): a slow sink
/// only makes its own track's queue overflow.
pub trait MediaSink: Send {
    /// One frame, in order. An error stops this sink (the others go on) and is reported.
    fn frame(&mut self, frame: &Frame<'_>) -> std::io::Result<()>;
    /// The track ended (unpublished, its publisher left, or the server stopping): finish up.
    /// Returns the file written, if the sink writes one.
    fn finish(self: Box<Self>) -> std::io::Result<Option<PathBuf>>;
}

/// Makes the sinks of a track that starts being recorded (`None`: this factory does not want
/// that track).
pub type SinkFactory = Arc<dyn Fn(&TrackMeta) -> Option<Box<dyn MediaSink>> + Send + Sync>;
