//! webrtc-rs (async) peer connections for clients of the server: the load tool's members and the
//! tests' participants. Loopback-friendly settings (no mDNS, no STUN, bound to one address), and
//! a handler that turns webrtc's callbacks into events on a channel.

use std::net::IpAddr;
use std::sync::Arc;

use rtc::dtls::extension::extension_use_srtp::SrtpProtectionProfile;
use rtc::ice::mdns::MulticastDnsMode;
use rtc::interceptor::Slot;
use tokio::sync::mpsc;
use tracing::warn;
use webrtc::data_channel::DataChannel;
use webrtc::media_stream::track_remote::TrackRemote;
use webrtc::peer_connection::{
    PeerConnection, PeerConnectionBuilder, PeerConnectionEventHandler, RTCConfigurationBuilder,
    RTCIceGatheringState, RTCPeerConnectionIceEvent, RTCPeerConnectionState, Registry,
    SettingEngineBuilder, configure_twcc_sender_only, register_default_interceptors,
};

use crate::sfu::api::IceCandidate;
use crate::sfu::peer::rtcp_to_app::{RtcpToApp, SLOT};
use crate::sfu::peer::{VIDEO_CODECS, media_engine};

/// What a client's peer connection reports.
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

/// Makes client peer connections: all inbound RTCP reaches the application, and outgoing RTP
/// carries transport-wide sequence numbers, as a browser's does.
#[derive(Clone)]
pub struct ClientFactory {
    bind_ip: IpAddr,
    video_codecs: Vec<&'static str>,
    srtp_profiles: Vec<SrtpProtectionProfile>,
}

impl ClientFactory {
    /// Clients whose sockets bind `bind_ip` (loopback in tests and load runs).
    pub fn new(bind_ip: IpAddr) -> Self {
        ClientFactory {
            bind_ip,
            video_codecs: VIDEO_CODECS.to_vec(),
            srtp_profiles: Vec::new(),
        }
    }

    /// Only these video codecs (MIME types) are offered or accepted.
    pub fn with_video_codecs(mut self, codecs: &[&'static str]) -> Self {
        self.video_codecs = codecs.to_vec();
        self
    }

    /// The SRTP profiles offered, in order (empty: webrtc-rs's default list).
    pub fn with_srtp_profiles(mut self, profiles: &[SrtpProtectionProfile]) -> Self {
        self.srtp_profiles = profiles.to_vec();
        self
    }

    /// A new peer connection and the channel its events arrive on.
    pub async fn build(
        &self,
    ) -> anyhow::Result<(Arc<dyn PeerConnection>, mpsc::UnboundedReceiver<PeerEvent>)> {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut me = media_engine(&self.video_codecs)?;
        let registry = register_default_interceptors(Registry::new(), &mut me)?
            .with(Slot::from(SLOT as usize), RtcpToApp::new(|_| true));
        let registry = configure_twcc_sender_only(registry, &mut me)?;
        let mut settings = SettingEngineBuilder::new()
            // No mDNS: its default opens a multicast socket on :5353 per connection.
            .with_multicast_dns_mode(MulticastDnsMode::Disabled)
            // Checks every 50 ms, as browsers pace them (webrtc-rs's default is 200 ms).
            .with_ice_connection_attempts(Some(std::time::Duration::from_millis(50)), None);
        if !self.srtp_profiles.is_empty() {
            settings = settings.with_srtp_protection_profiles(self.srtp_profiles.clone());
        }
        let pc = PeerConnectionBuilder::new()
            .with_configuration(RTCConfigurationBuilder::new().build())
            .with_media_engine(me)
            .with_setting_engine(settings.build())
            .with_interceptor_registry(registry)
            .with_handler(Arc::new(Forwarding(tx)))
            .with_udp_addrs(vec![format!("{}:0", self.bind_ip)])
            .build()
            .await?;
        Ok((Arc::new(pc), rx))
    }
}
