//! Media sessions: the webrtc-rs side of the SFU. webrtc types live here and nowhere above
//! (public so that the tests' webrtc clients can reuse the peer settings and interceptor).

pub mod channel;
pub mod member;
pub mod peer;
pub mod rtcp_to_app;
pub mod sdp;
pub mod track;
