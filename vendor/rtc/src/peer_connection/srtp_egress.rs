//! switchboard patch: a lean send path for RTP the application has already serialized.
//!
//! An SFU forwards each received packet to many subscribers. Through `RTCRtpSender::write_rtp`
//! every copy is validated, moved by value through eight handler stages and the interceptor
//! chain, marshalled again and encrypted into a fresh buffer. This hands the application the
//! connection's outbound SRTP context and the selected candidate pair instead, so it can protect
//! a packet it wrote itself in place (`srtp::context::Context::encrypt_rtp_in_place`) and send it
//! on its own socket. Interceptors do not see such packets: the application answers NACKs and
//! sends sender reports for them itself.

use std::net::SocketAddr;

use super::RTCPeerConnection;

/// The outbound SRTP context of a connection and where its packets go.
pub struct RTCSrtpEgress<'a> {
    /// The connection's one outbound context: never build a second one with the same keys
    /// (that would reuse keystream).
    pub context: &'a mut srtp::context::Context,
    /// The local address of the selected candidate pair.
    pub local_addr: SocketAddr,
    /// The remote address of the selected candidate pair: the packets' destination.
    pub peer_addr: SocketAddr,
}

impl RTCPeerConnection {
    /// The outbound SRTP context and the selected pair's addresses, once DTLS has completed (and
    /// its event has been polled) and ICE has selected a pair; `None` before.
    pub fn srtp_egress(&mut self) -> Option<RTCSrtpEgress<'_>> {
        let pipeline = &mut self.pipeline_context;
        let (local, remote) = pipeline
            .ice_handler_context
            .ice_transport
            .agent
            .get_selected_candidate_pair()?;
        let (local_addr, peer_addr) = (local.base_addr(), remote.addr());
        let context = pipeline
            .srtp_handler_context
            .local_srtp_context
            .as_mut()?;
        Some(RTCSrtpEgress {
            context,
            local_addr,
            peer_addr,
        })
    }
}
