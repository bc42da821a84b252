//! switchboard patch: a lean send path for RTP the application has already serialized (and the
//! inbound SRTP context, for a lean receive path of the application's own).
//!
//! An SFU forwards each received packet to many subscribers. Through `RTCRtpSender::write_rtp`
//! every copy is validated, moved by value through eight handler stages and the interceptor
//! chain, marshalled again and encrypted into a fresh buffer. These accessors hand the
//! application the connection's outbound SRTP context and the selected candidate pair instead,
//! so it can protect a packet it wrote itself in place
//! (`srtp::context::Context::encrypt_rtp_in_place`) and send it on its own socket.
//! Interceptors do not see such packets: the application answers NACKs and sends sender reports
//! for them itself.

use std::net::SocketAddr;

use super::RTCPeerConnection;

impl RTCPeerConnection {
    /// The connection's outbound SRTP context, once DTLS has completed (and its event has been
    /// polled); `None` before. It is the connection's one outbound context: never build a second
    /// one with the same keys (that would reuse keystream).
    pub fn local_srtp_context(&mut self) -> Option<&mut srtp::context::Context> {
        self.pipeline_context
            .srtp_handler_context
            .local_srtp_context
            .as_mut()
    }

    /// Hands the outbound SRTP context to the application, for a connection whose every RTP and
    /// RTCP packet the application protects itself (an SFU's subscriber connection). From then on
    /// the connection's own pipeline can no longer protect anything: it drops what is written
    /// through it, with a warning.
    pub fn take_local_srtp_context(&mut self) -> Option<srtp::context::Context> {
        self.pipeline_context
            .srtp_handler_context
            .local_srtp_context
            .take()
    }

    /// The connection's inbound SRTP context, once DTLS has completed; `None` before. For a
    /// receive path of the application's own (an SFU's publisher media): it decrypts a datagram
    /// in place with it (`srtp::context::Context::decrypt_rtp_in_place`) instead of handing the
    /// datagram to `handle_read`. Packets decrypted either way share the context's rollover
    /// counters and replay windows, so both paths may be used on one connection.
    pub fn remote_srtp_context(&mut self) -> Option<&mut srtp::context::Context> {
        self.pipeline_context
            .srtp_handler_context
            .remote_srtp_context
            .as_mut()
    }

    /// The local and remote addresses of the selected candidate pair (where the connection's
    /// packets go); `None` until ICE has selected one. The pair only changes while the
    /// connection handles input or a timeout, so a caller may keep it between those.
    pub fn selected_pair_addrs(&self) -> Option<(SocketAddr, SocketAddr)> {
        let (local, remote) = self
            .pipeline_context
            .ice_handler_context
            .ice_transport
            .agent
            .get_selected_candidate_pair()?;
        Some((local.base_addr(), remote.addr()))
    }
}
