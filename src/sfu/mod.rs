//! The SFU: the server as a member of every room, forwarding media between participants.

pub mod forward;
