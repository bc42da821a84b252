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
            match rmpv::ext::to_value(payload) {
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
        if let Err(e) = self
            .io()
            .to(room_channel(room_id))
            .emit("msg", payload)
            .await
        {
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
        match rmpv::ext::to_value(payload) {
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
            .and_then(|s| self.io().get_socket(s.handle))
        else {
            return false;
        };
        if let Err(e) = socket.emit("msg", payload) {
            debug!(user = %user_id, "user delivery failed: {e}");
        }
        true
    }
}
