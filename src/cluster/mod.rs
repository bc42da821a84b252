//! Several nodes over one Redis: a pub/sub bus that carries deliveries between nodes.

mod bus;
pub mod media;
pub mod pipe;

pub use bus::{Bus, BusEvent};
pub use media::{MediaEvent, NodeRef, RemoteChannel, RemoteTrack};
