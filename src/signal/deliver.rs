//! Delivery of `msg` envelopes to rooms and users: straight to this node's sockets, and through
//! the bus (when there is one) to the other nodes' sockets.

use std::sync::{Arc, OnceLock};

use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::socket::Sid;
use tracing::debug;

use crate::cluster::{Bus, BusEvent};
use crate::room::Rooms;

/// The socket.io room of a meeting room (user ids never need a room: see [`Outbox::to_user`]).
pub fn room_channel(room_id: &str) -> String {
    format!("r:{room_id}")
}

pub struct Outbox {
    io: OnceLock<SocketIo>,
    pub rooms: Arc<Rooms<Sid>>,
    pub bus: Option<Arc<Bus>>,
}

impl Outbox {
    pub fn new(rooms: Arc<Rooms<Sid>>, bus: Option<Arc<Bus>>) -> Self {
        Outbox {
            io: OnceLock::new(),
            rooms,
            bus,
        }
    }

    /// Completes the outbox once socket.io is built (it needs the outbox as its state first).
    pub fn attach(&self, io: SocketIo) {
        let _ = self.io.set(io);
    }

    pub fn io(&self) -> &SocketIo {
        self.io.get().expect("attached before the first connection")
    }

    /// Emits `msg` to every member of the room, on every node.
    pub async fn to_room<T: Serialize + ?Sized>(&self, room_id: &str, payload: &T) {
        self.to_local_room(room_id, payload).await;
        if let Some(bus) = &self.bus {
            match bus_value(payload) {
                Ok(payload) => bus.publish(BusEvent::Room {
                    room_id: room_id.to_owned(),
                    payload,
                }),
                Err(e) => debug!("cannot encode a room delivery for the bus: {e}"),
            }
        }
    }

    /// Emits `msg` to the members of the room connected to this node.
    pub async fn to_local_room<T: Serialize + ?Sized>(&self, room_id: &str, payload: &T) {
        // `of` rather than `to`: after shutdown closed the namespace, `to` would panic.
        let Some(ns) = self.io().of("/") else { return };
        if let Err(e) = ns.to(room_channel(room_id)).emit("msg", payload).await {
            debug!(room = %room_id, "room delivery incomplete: {e}");
        }
    }

    /// Emits `msg` to the user's current connection, wherever it is. `false`: not online.
    pub async fn to_user<T: Serialize + ?Sized>(&self, user_id: &str, payload: &T) -> bool {
        if self.to_local_user(user_id, payload) {
            return true;
        }
        let Some(bus) = &self.bus else { return false };
        if !self.rooms.is_online(user_id).await {
            return false;
        }
        match bus_value(payload) {
            Ok(payload) => bus.publish(BusEvent::User {
                user_id: user_id.to_owned(),
                payload,
            }),
            Err(e) => debug!("cannot encode a user delivery for the bus: {e}"),
        }
        true
    }

    /// Emits `msg` to the user's connection on this node. `false`: none here.
    pub fn to_local_user<T: Serialize + ?Sized>(&self, user_id: &str, payload: &T) -> bool {
        let Some(socket) = self
            .rooms
            .local(user_id)
            .and_then(|s| self.io().of("/")?.get_socket(s.handle))
        else {
            return false;
        };
        if let Err(e) = socket.emit("msg", payload) {
            debug!(user = %user_id, "user delivery failed: {e}");
        }
        true
    }
}

/// A payload as the bus carries it. Through msgpack with field names, so that structs stay
/// objects (`rmpv::ext::to_value` would turn them into arrays) and binary stays binary.
fn bus_value<T: Serialize + ?Sized>(payload: &T) -> Result<rmpv::Value, String> {
    let bytes = rmp_serde::to_vec_named(payload).map_err(|e| e.to_string())?;
    rmpv::decode::read_value(&mut bytes.as_slice()).map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signal::protocol::join_envelope;

    #[test]
    fn bus_values_serialize_back_to_the_same_json() {
        let v = bus_value(&join_envelope("u", "r")).unwrap();
        assert_eq!(
            serde_json::to_string(&v).unwrap(),
            serde_json::to_string(&join_envelope("u", "r")).unwrap()
        );
        let bin = rmpv::Value::Map(vec![("b".into(), rmpv::Value::Binary(vec![1, 2]))]);
        assert_eq!(bus_value(&bin).unwrap(), bin);
    }
}
