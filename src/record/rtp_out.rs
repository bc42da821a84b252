//! RTP egress: a room's or participant's tracks as plain RTP (no SRTP) to `host:port`, and the
//! SDP that ffmpeg (`-protocol_whitelist file,udp,rtp -i x.sdp`) or GStreamer opens to receive
//! them. mediasoup's recording route, without writing code.

use std::fmt::Write;
use std::net::IpAddr;

use crate::sfu::forward::Codec;

/// One track sent out, as the SDP describes it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct OutTrack {
    pub user_id: String,
    pub track_id: String,
    pub port: u16,
    pub payload_type: u8,
    /// `opus/48000/2`, `VP8/90000`, ...
    pub rtpmap: String,
    /// The publisher's format parameters (H264's profile and packetization mode).
    pub fmtp: String,
    pub video: bool,
}

/// The payload type a codec's egress packets carry.
pub fn payload_type(codec: Codec) -> u8 {
    match codec {
        Codec::Opus => 111,
        Codec::Vp8 => 96,
        Codec::Vp9 => 98,
        Codec::H264 => 102,
    }
}

/// `name/clock[/channels]` from a MIME type such as `audio/opus`.
pub fn rtpmap(mime: &str, clock_rate: u32, channels: u16) -> String {
    let name = mime.split_once('/').map_or(mime, |(_, n)| n);
    match channels {
        0 => format!("{name}/{clock_rate}"),
        n => format!("{name}/{clock_rate}/{n}"),
    }
}

/// A session description with one media section per track, each on its own port.
pub fn sdp(host: IpAddr, name: &str, tracks: &[OutTrack]) -> String {
    let family = if host.is_ipv4() { "IP4" } else { "IP6" };
    let mut s = format!(
        "v=0\r\no=- 0 0 IN {family} {host}\r\ns={name}\r\nc=IN {family} {host}\r\nt=0 0\r\n"
    );
    for t in tracks {
        let kind = if t.video { "video" } else { "audio" };
        let _ = write!(
            s,
            "m={kind} {} RTP/AVP {pt}\r\na=rtpmap:{pt} {}\r\n",
            t.port,
            t.rtpmap,
            pt = t.payload_type
        );
        if !t.fmtp.is_empty() {
            let _ = write!(s, "a=fmtp:{} {}\r\n", t.payload_type, t.fmtp);
        }
        let _ = write!(s, "a=recvonly\r\n");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_section_per_track_on_its_port() {
        let track = |port, video: bool| OutTrack {
            user_id: "u".into(),
            track_id: "t".into(),
            port,
            payload_type: if video { 96 } else { 111 },
            rtpmap: if video {
                rtpmap("video/VP8", 90000, 0)
            } else {
                rtpmap("audio/opus", 48000, 2)
            },
            fmtp: if video {
                String::new()
            } else {
                "minptime=10".into()
            },
            video,
        };
        let s = sdp(
            "127.0.0.1".parse().unwrap(),
            "room",
            &[track(5004, false), track(5006, true)],
        );
        assert_eq!(
            s,
            "v=0\r\no=- 0 0 IN IP4 127.0.0.1\r\ns=room\r\nc=IN IP4 127.0.0.1\r\nt=0 0\r\n\
             m=audio 5004 RTP/AVP 111\r\na=rtpmap:111 opus/48000/2\r\na=fmtp:111 minptime=10\r\na=recvonly\r\n\
             m=video 5006 RTP/AVP 96\r\na=rtpmap:96 VP8/90000\r\na=recvonly\r\n"
        );
    }
}
