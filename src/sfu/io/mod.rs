//! The media port's I/O: sockets bound to the one UDP port, batched receive and send, and just
//! enough STUN parsing to tell which connection a first datagram belongs to.

pub mod batch;
pub mod port;
pub mod router;
pub mod stun;

pub use batch::{MAX_DATAGRAM, RecvBatch, SendBatch, SendStats, gso_supported};
