//! One of a member's two peer connections: webrtc-rs's sans-IO `RTCPeerConnection`, driven by
//! the event loop that owns it, and what the SFU keeps beside it (remote candidates waiting for
//! a description, the down-tracks it sends, the tracks and channels it carries).

pub mod rtcp_to_app;
pub mod sdp;
pub mod settings;

use std::time::Instant;

use rtc::data_channel::RTCDataChannelId;
use rtc::peer_connection::RTCPeerConnection;
use rtc::peer_connection::transport::RTCIceCandidateInit;
use rtc::rtp_transceiver::RTCRtpReceiverId;
use tracing::debug;

use super::api::{IceCandidate, PcKind, SfuError};
use super::egress::Egress;
use super::ingress::{self, Ingress};
pub use settings::{FORWARDED_EXTENSIONS, PeerSettings, VIDEO_CODECS, media_engine};

/// A browser gathers a handful of candidates per connection; the limits keep a client from
/// growing server memory or making the server check an arbitrary number of addresses.
pub const MAX_REMOTE_CANDIDATES: usize = 64;
pub const MAX_CANDIDATE_LEN: usize = 1024;

/// Sources (SSRCs) a publisher connection may send: more are not forwarded (a browser sends a
/// few per track; a client cycling through SSRCs must not grow the server's state).
pub const MAX_SOURCES: usize = 32;

/// Index of a connection in its event loop.
pub type ConnKey = usize;

/// Candidates from the client, held until the connection has a remote description.
#[derive(Default)]
struct RemoteCandidates {
    ready: bool,
    held: Vec<RTCIceCandidateInit>,
    /// Accepted over the connection's life (held or given to the ICE agent).
    accepted: usize,
}

pub struct Connection {
    /// Unique for the node's life (the slab key is reused once the connection closes).
    pub id: u64,
    /// Boxed: webrtc-rs's connection is large, and the fields below are what forwarding reads
    /// for every subscriber and packet; kept apart, they sit densely in the loop's slab.
    pub pc: Box<RTCPeerConnection>,
    pub kind: PcKind,
    /// The member (userId) it belongs to.
    pub user: String,
    pub ufrag: String,
    /// The connection is up: ICE connected and DTLS done.
    pub connected: bool,
    /// The server's candidates have been sent (after the description they belong to).
    pub candidates_sent: bool,
    /// Where forwarded packets go: the selected pair's remote address, refreshed whenever the
    /// connection has handled input or a timeout (the only times the pair can change).
    pub route: Option<std::net::SocketAddr>,
    pub next_timeout: Option<Instant>,
    /// The earliest entry for this connection in its loop's timer heap.
    pub scheduled: Option<Instant>,
    remote: RemoteCandidates,
    /// Subscriber: the down-tracks it sends, and the outbound SRTP context it protects them
    /// with (taken from webrtc-rs once DTLS is done: everything a subscriber connection sends
    /// over SRTP is the server's own, see crate::sfu::egress).
    pub egress: Egress,
    pub srtp: Option<rtc::srtp::context::Context>,
    /// Publisher: source SSRC -> published track (`None`: known not to be forwarded).
    pub inbound: Vec<(u32, Option<usize>)>,
    /// Publisher: the receive path of its forwarded sources (boxed: subscribers have none).
    pub ingress: Option<Box<Ingress>>,
    /// Publisher: its data channels -> relayed channel; subscriber: copies -> relayed channel.
    pub channels: Vec<(RTCDataChannelId, usize)>,
    /// Publisher: track ids refused (in use in the room), told to the client once.
    pub refused: Vec<String>,
}

impl Connection {
    pub fn new(
        id: u64,
        pc: RTCPeerConnection,
        kind: PcKind,
        user: &str,
        ufrag: String,
    ) -> Connection {
        Connection {
            id,
            pc: Box::new(pc),
            kind,
            user: user.to_owned(),
            ufrag,
            connected: false,
            candidates_sent: false,
            route: None,
            next_timeout: None,
            scheduled: None,
            remote: RemoteCandidates::default(),
            egress: Egress::default(),
            srtp: None,
            inbound: Vec::new(),
            ingress: (kind == PcKind::Publisher).then(Box::default),
            channels: Vec::new(),
            refused: Vec::new(),
        }
    }

    /// The published track a source SSRC feeds; `None` when unknown yet.
    pub fn inbound_track(&self, ssrc: u32) -> Option<Option<usize>> {
        self.inbound
            .iter()
            .find(|(s, _)| *s == ssrc)
            .map(|(_, t)| *t)
    }

    pub fn set_inbound(&mut self, ssrc: u32, track: Option<usize>) {
        let full = self.inbound.len() >= MAX_SOURCES;
        match self.inbound.iter_mut().find(|(s, _)| *s == ssrc) {
            Some(entry) => entry.1 = track,
            None if !full => self.inbound.push((ssrc, track)),
            None => tracing::debug!(user = %self.user, ssrc, "too many sources: not forwarded"),
        }
    }

    /// A source now feeds track `t`; its packets take the lean receive path from now on.
    pub fn forward_source(&mut self, ssrc: u32, receiver: RTCRtpReceiverId, t: usize) {
        self.set_inbound(ssrc, Some(t));
        if self.inbound_track(ssrc) != Some(Some(t)) {
            return; // too many sources
        }
        let Some(ingress) = self.ingress.as_deref_mut() else {
            return;
        };
        match ingress::stream_info(&mut self.pc, receiver, ssrc) {
            Some(info) => ingress.bind(&info, t),
            None => debug!(user = %self.user, ssrc, "no negotiated codec for a source"),
        }
    }

    /// A source replaced by another (the same track published again, a layer's new SSRC).
    pub fn forget_source(&mut self, ssrc: u32) {
        self.inbound.retain(|(s, _)| *s != ssrc);
        if let Some(ingress) = self.ingress.as_deref_mut() {
            ingress.unbind(ssrc);
        }
    }

    /// Track `t` is gone: its sources are no longer forwarded.
    pub fn stop_forwarding(&mut self, t: usize) {
        for (_, target) in self.inbound.iter_mut() {
            if *target == Some(t) {
                *target = None;
            }
        }
        if let Some(ingress) = self.ingress.as_deref_mut() {
            for ssrc in ingress.sources_of(t) {
                ingress.unbind(ssrc);
            }
        }
    }

    /// Moves the receive path's RTCP (NACKs, receiver reports, TWCC feedback) into the
    /// connection, which protects and sends it with its own.
    pub fn flush_feedback(&mut self, now: Instant) {
        let Some(ingress) = self.ingress.as_deref_mut() else {
            return;
        };
        while let Some(packets) = ingress.poll_feedback() {
            // Any receiver of the connection writes to its one RTCP path.
            let Some(id) = self.pc.get_receivers().next() else {
                return;
            };
            if let Some(mut receiver) = self.pc.rtp_receiver(id)
                && let Err(e) = receiver.write_rtcp(now, packets)
            {
                debug!(user = %self.user, "cannot send feedback upstream: {e}");
            }
        }
    }

    pub fn channel(&self, id: RTCDataChannelId) -> Option<usize> {
        self.channels
            .iter()
            .find(|(c, _)| *c == id)
            .map(|(_, k)| *k)
    }

    /// A candidate from the client: given to the ICE agent, or held until a remote description.
    pub fn add_remote_candidate(&mut self, candidate: IceCandidate) -> Result<(), SfuError> {
        if candidate.candidate.len() > MAX_CANDIDATE_LEN {
            return Err(SfuError::BadCandidate(format!(
                "longer than {MAX_CANDIDATE_LEN} bytes"
            )));
        }
        if self.remote.accepted >= MAX_REMOTE_CANDIDATES {
            return Err(SfuError::BadCandidate(format!(
                "more than {MAX_REMOTE_CANDIDATES} on one connection"
            )));
        }
        // Browsers hide private addresses behind mDNS names; the server resolves none (mDNS is
        // off), and the browser's own checks reach it as peer-reflexive anyway.
        if candidate
            .candidate
            .split(' ')
            .nth(4)
            .is_some_and(|host| host.ends_with(".local"))
        {
            debug!(candidate = %candidate.candidate, "ignoring an mDNS candidate");
            return Ok(());
        }
        self.remote.accepted += 1;
        let init = RTCIceCandidateInit {
            candidate: candidate.candidate,
            sdp_mid: candidate.sdp_mid,
            sdp_mline_index: candidate.sdp_mline_index,
            username_fragment: candidate.username_fragment,
            url: None,
        };
        if !self.remote.ready {
            self.remote.held.push(init);
            return Ok(());
        }
        self.pc
            .add_remote_candidate(init)
            .map_err(|e| SfuError::BadCandidate(e.to_string()))
    }

    /// The connection has a remote description now: the held candidates go to the ICE agent.
    pub fn remote_description_set(&mut self) {
        self.remote.ready = true;
        for init in std::mem::take(&mut self.remote.held) {
            if let Err(e) = self.pc.add_remote_candidate(init) {
                debug!(user = %self.user, "dropping a bad early candidate: {e}");
            }
        }
    }

    /// Back to no remote description (a rolled-back first offer): hold candidates again.
    pub fn remote_description_cleared(&mut self) {
        self.remote.ready = false;
    }
}

/// A random ICE username fragment (16 characters) and password (32): the fragment is the
/// routing key of the connection's first datagrams, so it must be unique on the node.
pub fn ice_credentials() -> (String, String) {
    (random_token(16), random_token(32))
}

fn random_token(len: usize) -> String {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789";
    let mut out = String::with_capacity(len);
    let mut bits = crate::random_u64();
    for i in 0..len {
        if i % 10 == 0 {
            bits = crate::random_u64();
        }
        out.push(ALPHABET[(bits % ALPHABET.len() as u64) as usize] as char);
        bits /= ALPHABET.len() as u64;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_are_long_and_distinct() {
        let (a, pwd) = ice_credentials();
        let (b, _) = ice_credentials();
        assert_eq!((a.len(), pwd.len()), (16, 32));
        assert_ne!(a, b);
        assert!(a.chars().all(|c| c.is_ascii_alphanumeric()));
    }
}
