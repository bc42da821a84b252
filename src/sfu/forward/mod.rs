//! The forwarding core, sans-IO: packets in as `bytes::Bytes`, rewritten headers out to each
//! subscriber's sink, time passed in. No sockets, no async, no locks, no webrtc types, and no
//! allocation per packet and subscriber. `benches/forwarding.rs` measures it; the unit tests feed
//! it crafted packets.

mod downtrack;
mod fanout;
mod keyframe;
mod rtp;
#[cfg(test)]
mod tests;

pub use downtrack::{
    DownTrack, DownTrackConfig, DownTrackId, DownTrackStats, ExtMap, Quality, seq_diff,
};
pub use fanout::{
    HISTORY, KEYFRAME_REQUEST_INTERVAL, LAYER_TIMEOUT, TrackForwarder, TrackStats, rank_rids,
};
pub use keyframe::Codec;
pub use rtp::{Extensions, MAX_EXTENSIONS, ParseError, RtpHeader, RtpPacket, write_header};
