//! What every peer connection of the server is built with: codecs and header extensions,
//! interceptors per role, ICE and DTLS settings, one certificate for the whole process.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::{Registry, Slot};
use rtc::peer_connection::certificate::{CertificateParams, RTCCertificate};
use rtc::peer_connection::configuration::RTCConfigurationBuilder;
use rtc::peer_connection::configuration::interceptor_registry::{
    configure_simulcast_extension_headers, configure_twcc_receiver_only,
};
use rtc::peer_connection::configuration::media_engine::{
    MIME_TYPE_H264, MIME_TYPE_OPUS, MIME_TYPE_VP8, MIME_TYPE_VP9, MediaEngine,
};
use rtc::peer_connection::configuration::setting_engine::{
    SctpMaxMessageSize, SettingEngineBuilder,
};
use rtc::peer_connection::transport::RTCDtlsRole;
use rtc::peer_connection::{RTCPeerConnection, RTCPeerConnectionBuilder};
use rtc::rtp_transceiver::rtp_sender::{
    RTCPFeedback, RTCRtpCodec, RTCRtpCodecParameters, RTCRtpHeaderExtensionCapability, RtpCodecKind,
};

use super::rtcp_to_app::{RtcpToApp, SLOT, is_sender_report, is_subscriber_feedback};
use crate::config::MediaConfig;
use crate::sfu::api::PcKind;

/// Header extensions forwarded from publishers to subscribers (the rest are per transport).
pub const FORWARDED_EXTENSIONS: [&str; 2] = [
    "urn:ietf:params:rtp-hdrext:ssrc-audio-level",
    "urn:3gpp:video-orientation",
];

/// Every video codec the server forwards.
pub const VIDEO_CODECS: [&str; 3] = [MIME_TYPE_VP8, MIME_TYPE_VP9, MIME_TYPE_H264];

/// Connectivity checks every 50 ms (webrtc's default is 200): a browser's first checks can
/// arrive before its answer and are dropped, and the server's own checks then connect sooner.
const ICE_CHECK_INTERVAL: Duration = Duration::from_millis(50);

/// SRTP profiles in the server's order of preference (the server's order decides, see the
/// rtc-dtls patch): AES-GCM costs a third of AES-CM + HMAC-SHA1 per packet; AES-CM for clients
/// that offer nothing else.
const SRTP_PROFILES: [SrtpProtectionProfile; 2] = [
    SrtpProtectionProfile::Srtp_Aead_Aes_128_Gcm,
    SrtpProtectionProfile::Srtp_Aes128_Cm_Hmac_Sha1_80,
];

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

/// Opus, VP8, VP9 and H264 (each video codec with RTX), at the payload types browsers use, and
/// the forwarded header extensions. Test clients use it too.
pub fn media_engine(video_codecs: &[&str]) -> Result<MediaEngine, rtc::shared::error::Error> {
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

/// What a receiving connection negotiates: NACK and PLI feedback, TWCC (feedback and the
/// transport-wide sequence number), and the mid/rid extensions that tell simulcast layers apart.
/// Its interceptors are not webrtc-rs's: the server's receive path (crate::sfu::ingress) drives
/// the NACK generator, receiver reports and TWCC receiver itself, for every received packet
/// (those webrtc-rs still handles are handed to it), so the connection only hands the
/// publisher's sender reports to the application.
fn publisher_interceptors(me: &mut MediaEngine) -> Result<Registry, rtc::shared::error::Error> {
    for parameter in ["", "pli"] {
        me.register_feedback(
            RTCPFeedback {
                typ: "nack".into(),
                parameter: parameter.into(),
            },
            RtpCodecKind::Video,
        );
    }
    configure_simulcast_extension_headers(me)?;
    // Registers TWCC in the media engine; the interceptor it adds is left out.
    configure_twcc_receiver_only(Registry::new(), me)?;
    Ok(Registry::new().with(Slot::from(SLOT as usize), RtcpToApp::new(is_sender_report)))
}

/// Builds the server's peer connections.
pub struct PeerSettings {
    /// The host candidate every connection advertises: the media port at `media.public_ip`, or
    /// at `media.ip`. Inbound datagrams are handed to the ICE agent as received on it.
    pub candidate_addr: SocketAddr,
    certificate: RTCCertificate,
    ice_disconnected: Duration,
    ice_failed: Duration,
    /// What one member may publish (`media.max_tracks_per_member`, `..._data_channels_...`).
    pub max_tracks: usize,
    pub max_channels: usize,
    /// `media.max_data_message_bytes`: advertised, and larger messages are not relayed.
    pub max_data_message: usize,
}

impl PeerSettings {
    /// One certificate for every connection of the process (as mediasoup does): generating a
    /// key per connection costs milliseconds on the join path and buys nothing, since the
    /// fingerprint in each SDP is what authenticates the DTLS handshake.
    pub fn new(config: &MediaConfig, candidate_addr: SocketAddr) -> anyhow::Result<PeerSettings> {
        let crypto = rtc::crypto::default_provider()?;
        let params = CertificateParams::new(vec!["switchboard".to_owned()])?;
        let certificate = RTCCertificate::generate(
            crypto.crypto(),
            rtc::crypto::SignatureScheme::EcdsaP256Sha256,
            params,
        )?;
        Ok(PeerSettings {
            candidate_addr,
            certificate,
            ice_disconnected: Duration::from_millis(config.ice_disconnected_ms),
            ice_failed: Duration::from_millis(config.ice_failed_ms),
            max_tracks: config.max_tracks_per_member,
            max_channels: config.max_data_channels_per_member,
            max_data_message: config.max_data_message_bytes as usize,
        })
    }

    /// A new connection whose ICE username fragment is `ufrag` (the key that routes its first
    /// datagrams to it).
    pub fn build(
        &self,
        kind: PcKind,
        ufrag: &str,
        pwd: &str,
        now: Instant,
    ) -> Result<RTCPeerConnection, rtc::shared::error::Error> {
        let mut me = media_engine(&VIDEO_CODECS)?;
        let registry = match kind {
            PcKind::Publisher => publisher_interceptors(&mut me)?,
            // Forwarded packets take the lean path (crate::sfu::egress), which answers NACKs and
            // sends sender reports itself; the app needs the subscriber's PLI, FIR and NACK.
            PcKind::Subscriber => Registry::new().with(
                Slot::from(SLOT as usize),
                RtcpToApp::new(is_subscriber_feedback),
            ),
        };
        let settings = SettingEngineBuilder::new()
            .with_ice_credentials(ufrag.to_owned(), pwd.to_owned())
            .with_lite(false)
            // The server is the DTLS server on both connections, so that its SRTP profile
            // preference applies (a browser answers a server offer as DTLS client).
            .with_answering_dtls_role(RTCDtlsRole::Server)
            .with_srtp_protection_profiles(SRTP_PROFILES.to_vec())
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            .with_ice_connection_attempts(Some(ICE_CHECK_INTERVAL), Some(28))
            // Nominate at once. A browser's own candidates often arrive after its first checks,
            // so the server knows it as peer-reflexive; webrtc's default then waits a second.
            .with_host_acceptance_min_wait(Some(Duration::ZERO))
            .with_prflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_srflx_acceptance_min_wait(Some(Duration::ZERO))
            .with_ice_timeouts(Some(self.ice_disconnected), Some(self.ice_failed), None)
            .with_sctp_max_message_size(SctpMaxMessageSize::Bounded(self.max_data_message as u32))
            .build();
        let configuration = RTCConfigurationBuilder::new()
            .with_certificates(vec![self.certificate.clone()])
            .build();
        RTCPeerConnectionBuilder::new()
            .with_configuration(configuration)
            .with_media_engine(me)
            .with_setting_engine(settings)
            .with_interceptor_registry(registry)
            .build(now)
    }

    /// The host candidate line of every connection.
    pub fn candidate(&self) -> String {
        format!(
            "candidate:1 1 udp 2130706431 {} {} typ host",
            self.candidate_addr.ip(),
            self.candidate_addr.port()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_media_engine_registers() {
        media_engine(&VIDEO_CODECS).unwrap();
    }

    #[test]
    fn connections_build_quickly_with_the_shared_certificate() {
        let config = crate::config::Config::defaults().media;
        let settings = PeerSettings::new(&config, "127.0.0.1:7882".parse().unwrap()).unwrap();
        let start = Instant::now();
        for i in 0..20 {
            let kind = if i % 2 == 0 {
                PcKind::Publisher
            } else {
                PcKind::Subscriber
            };
            settings
                .build(
                    kind,
                    &format!("ufrag{i}"),
                    "0123456789abcdef0123456789",
                    Instant::now(),
                )
                .unwrap();
        }
        println!("20 connections built in {:?}", start.elapsed());
        assert_eq!(
            settings.candidate(),
            "candidate:1 1 udp 2130706431 127.0.0.1 7882 typ host"
        );
    }
}
