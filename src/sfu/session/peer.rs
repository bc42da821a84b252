//! Building the server's peer connections: codecs, header extensions, interceptors, network
//! settings, and a handler that turns webrtc callbacks into events on a channel (callbacks run
//! on the connection's driver task, so they only forward).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Slot;
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8, MIME_TYPE_VP9, MediaEngine,
};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};
use tokio::sync::mpsc;
use tracing::warn;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState, Registry,
    SettingEngineBuilder, configure_twcc_sender_only, register_default_interceptors,
};

use super::rtcp_to_app::{RtcpToApp, SLOT, is_keyframe_request};
use crate::config::MediaConfig;
use crate::sfu::api::IceCandidate;

/// Header extensions forwarded from publishers to subscribers (the rest are per transport).
pub const FORWARDED_EXTENSIONS: [&str; 2] = [
    "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "urn:3gpp:video-orientation",
];

const ICE_CHECK_INTERVAL: std::time::Duration = std::time::Duration::from_millis(50);

/// What a peer connection reports.
pub enum PeerEvent {
    Candidate(IceCandidate),
    GatheringComplete,
    State(RTCPeerConnectionState),
    Track(Arc<dyn TrackRemote>),
    DataChannel(Arc<dyn DataChannel>),
}

struct Forwarding(mpsc::UnboundedSender<PeerEvent>);

#[async_trait::async_trait]
impl PeerConnectionEventHandler for Forwarding {
    async fn on_ice_candidate(&self, event: RTCPeerConnectionIceEvent) {
        match event.candidate.to_json() {
            Ok(init) => {
                let _ = self.0.send(PeerEvent::Candidate(IceCandidate {
                    candidate: init.candidate,
                    sdp_mid: init.sdp_mid.filter(|m| !m.is_empty()),
                    sdp_mline_index: init.sdp_mline_index,
                    username_fragment: init.username_fragment,
                }));
            }
            Err(e) => warn!("cannot encode a local candidate: {e}"),
        }
    }
    async fn on_ice_gathering_state_change(&self, state: RTCIceGatheringState) {
        if state == RTCIceGatheringState::Complete {
            let _ = self.0.send(PeerEvent::GatheringComplete);
        }
    }
    async fn on_connection_state_change(&self, state: RTCPeerConnectionState) {
        let _ = self.0.send(PeerEvent::State(state));
    }
    async fn on_track(&self, track: Arc<dyn TrackRemote>) {
        let _ = self.0.send(PeerEvent::Track(track));
    }
    async fn on_data_channel(&self, channel: Arc<dyn DataChannel>) {
        let _ = self.0.send(PeerEvent::DataChannel(channel));
    }
}

/// Makes peer connections with the server's media settings.
pub struct PeerFactory {
    config: MediaConfig,
    next_port: AtomicU32,
    rtcp_to_app: fn(&dyn rtc::rtcp::Packet) -> bool,
    twcc_sender: bool,
    video_codecs: Vec<&'static str>,
}

/// Every video codec the server forwards.
pub const VIDEO_CODECS: [&str; 3] = [MIME_TYPE_VP8, MIME_TYPE_VP9, MIME_TYPE_H264];

fn codec(mime: &str, clock_rate: u32, channels: u16, fmtp: &str, video: bool) -> RTCRtpCodec {
    let feedback = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.into(),
        parameter: parameter.into(),
    };
    RTCRtpCodec {
        mime_type: mime.into(),
        clock_rate,
        channels,
        sdp_fmtp_line: fmtp.into(),
        rtcp_feedback: if video {
            vec![
                feedback("goog-remb", ""),
                feedback("ccm", "fir"),
                feedback("nack", ""),
                feedback("nack", "pli"),
            ]
        } else {
            vec![]
        },
    }
}

/// Opus, VP8, VP9 and H264 (each video codec with RTX), at the payload types browsers use.
fn media_engine(video_codecs: &[&str]) -> Result<MediaEngine, rtc::shared::error::Error> {
    let mut me = MediaEngine::default();
    let audio = RTCRtpCodecParameters {
        rtp_codec: codec(
            MIME_TYPE_OPUS,
            48_000,
            2,
            "minptime=10;useinbandfec=1",
            false,
        ),
        payload_type: 111,
    };
    me.register_codec(audio, RtpCodecKind::Audio)?;
    let video = [
        (MIME_TYPE_VP8, "", 96),
        (MIME_TYPE_VP9, "profile-id=0", 98),
        (MIME_TYPE_VP9, "profile-id=2", 100),
        (
            MIME_TYPE_H264,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42001f",
            102,
        ),
        (
            MIME_TYPE_H264,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f",
            106,
        ),
        (
            MIME_TYPE_H264,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=4d001f",
            108,
        ),
        (
            MIME_TYPE_H264,
            "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=640032",
            123,
        ),
    ];
    for (mime, fmtp, pt) in video {
        if !video_codecs.iter().any(|c| c.eq_ignore_ascii_case(mime)) {
            continue;
        }
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: codec(mime, 90_000, 0, fmtp, true),
                payload_type: pt,
            },
            RtpCodecKind::Video,
        )?;
        me.register_codec(
            RTCRtpCodecParameters {
                rtp_codec: codec("video/rtx", 90_000, 0, &format!("apt={pt}"), false),
                payload_type: pt + 1,
            },
            RtpCodecKind::Video,
        )?;
    }
    for (uri, kind) in [
        (FORWARDED_EXTENSIONS[0], RtpCodecKind::Audio),
        (FORWARDED_EXTENSIONS[1], RtpCodecKind::Video),
    ] {
        me.register_header_extension(
            RTCRtpHeaderExtensionCapability { uri: uri.into() },
            kind,
            None,
        )?;
    }
    Ok(me)
}

impl PeerFactory {
    /// The server's connections: keyframe requests reach the application.
    pub fn new(config: MediaConfig) -> Self {
        PeerFactory {
            config,
            next_port: AtomicU32::new(0),
            rtcp_to_app: is_keyframe_request,
            twcc_sender: false,
            video_codecs: VIDEO_CODECS.to_vec(),
        }
    }

    /// A client's connections (tests, load tool): all inbound RTCP reaches the application, and
    /// outgoing RTP carries transport-wide sequence numbers, as a browser's does.
    pub fn client(config: MediaConfig) -> Self {
        PeerFactory {
            rtcp_to_app: |_| true,
            twcc_sender: true,
            ..Self::new(config)
        }
    }

    /// Only these video codecs (MIME types) are offered or accepted (tests of codec choice).
    pub fn with_video_codecs(mut self, codecs: &[&'static str]) -> Self {
        self.video_codecs = codecs.to_vec();
        self
    }

    /// A new peer connection and the channel its events arrive on.
    pub async fn build(
        &self,
    ) -> anyhow::Result<(Arc<dyn PeerConnection>, mpsc::UnboundedReceiver<PeerEvent>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let handler = Arc::new(Forwarding(tx));
        let attempts = match self.config.udp_ports() {
            Some((min, max)) => (max - min) as u32 + 1,
            None => 1,
        };
        let mut last_error = None;
        for _ in 0..attempts {
            let addr = self.next_addr();
            let addr_used = addr.clone();
            let mut me = media_engine(&self.video_codecs)?;
            let registry = register_default_interceptors(Registry::new(), &mut me)?
                .with(Slot::from(SLOT as usize), RtcpToApp::new(self.rtcp_to_app));
            // Clients stamp transport-wide sequence numbers so the server's TWCC feedback flows.
            let registry = if self.twcc_sender {
                configure_twcc_sender_only(registry, &mut me)?
            } else {
                registry
            };
            // No mDNS: its default opens a multicast socket on :5353 per connection.
            let settings = SettingEngineBuilder::new()
                .with_multicast_dns_mode(MulticastDnsMode::Disabled)
                // Checks every 50 ms (default 200): a browser's first checks can arrive before
                // its answer does and are dropped; the server's own checks then connect sooner.
                .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), Some(28))
                // Nominate at once. A browser's own candidates often arrive after its first
                // checks, so the server knows it as peer-reflexive; webrtc's default then waits
                // a second before nominating (the ~1.6 s late subscriber connection).
                .with_host_acceptance_min_wait(Some(std::time::Duration::ZERO))
                .with_prflx_acceptance_min_wait(Some(std::time::Duration::ZERO))
                .with_srflx_acceptance_min_wait(Some(std::time::Duration::ZERO))
                .with_ice_timeouts(
                    Some(std::time::Duration::from_millis(
                        self.config.ice_disconnected_ms,
                    )),
                    Some(std::time::Duration::from_millis(self.config.ice_failed_ms)),
                    None,
                )
                .build();
            let built = PeerConnectionBuilder::new()
                // The server needs no STUN/TURN: it is the reachable side.
                .with_configuration(RTCConfigurationBuilder::new().build())
                .with_media_engine(me)
                .with_setting_engine(settings)
                .with_interceptor_registry(registry)
                .with_handler(handler.clone())
                .with_udp_addrs(vec![addr])
                // Bounded: relayed channels use try_send and drop for a subscriber that lags.
                .with_data_channel_send_buffer_limit(self.config.data_channel_buffer_bytes)
                .build()
                .await;
            match built {
                Ok(pc) => {
                    tracing::debug!(%addr_used, "peer connection created");
                    return Ok((Arc::new(pc), rx));
                }
                Err(e) => last_error = Some(e),
            }
        }
        Err(anyhow::anyhow!(
            "no media port available: {}",
            last_error.map(|e| e.to_string()).unwrap_or_default()
        ))
    }

    /// The next address to bind: any free port, or the next one of the configured range.
    fn next_addr(&self) -> String {
        let ip = self.config.ip;
        let port = match self.config.udp_ports() {
            None => 0,
            Some((min, max)) => {
                let span = (max - min) as u32 + 1;
                min + (self.next_port.fetch_add(1, Ordering::Relaxed) % span) as u16
            }
        };
        std::net::SocketAddr::new(ip, port).to_string()
    }

    /// The address to advertise in place of the bound one (1:1 NAT), if configured.
    pub fn public_ip(&self) -> Option<&str> {
        self.config.public_ip()
    }
}

/// Replaces the connection address in `candidate:` lines (webrtc 0.21 does not implement
/// `with_nat_1to1_ips`): `candidate:<foundation> <component> <proto> <priority> <ip> <port> ...`.
pub fn advertise_ip(candidate: &str, public_ip: &str) -> String {
    let mut fields: Vec<&str> = candidate.split(' ').collect();
    if fields.len() > 5 && fields[0].contains("candidate:") {
        fields[4] = public_ip;
    }
    fields.join(" ")
}

/// Applies [`advertise_ip`] to every `a=candidate:` line of an SDP.
pub fn advertise_ip_in_sdp(sdp: &str, public_ip: &str) -> String {
    sdp.split("\r\n")
        .map(|line| match line.strip_prefix("a=") {
            Some(rest) if rest.starts_with("candidate:") => {
                format!("a={}", advertise_ip(rest, public_ip))
            }
            _ => line.to_owned(),
        })
        .collect::<Vec<_>>()
        .join("\r\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nat_address_replaces_the_candidate_address() {
        let c = "candidate:1234 1 udp 2130706431 10.0.0.5 40001 typ host";
        assert_eq!(
            advertise_ip(c, "203.0.113.7"),
            "candidate:1234 1 udp 2130706431 203.0.113.7 40001 typ host"
        );
        let sdp = format!(
            "v=0\r\na=candidate:{}\r\na=end-of-candidates\r\n",
            &c["candidate:".len()..]
        );
        let out = advertise_ip_in_sdp(&sdp, "203.0.113.7");
        assert!(out.contains("203.0.113.7 40001"));
        assert!(!out.contains("10.0.0.5"));
        assert!(out.ends_with("a=end-of-candidates\r\n"));
    }

    #[test]
    fn the_media_engine_registers() {
        media_engine(&VIDEO_CODECS).unwrap();
    }
}
