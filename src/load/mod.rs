//! Clients of the server, for the load tool (`switchboard load`) and the integration tests: a
//! minimal socket.io client and webrtc-rs peer connections with client settings.

pub mod peer;
pub mod signaling;
