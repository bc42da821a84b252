//! A connection's life: accepted (handlers registered), set up (recorded in the room registry
//! and announced), torn down. socketioxide sends CONNECT before it runs `on_connect`, on a task
//! of its own, so a client's first events and even its disconnect can come before the set-up:
//! events wait for it, and whichever of set-up and disconnect comes second tears down.

use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use socketioxide::SocketIo;
use socketioxide::extract::{Extension, SocketRef, State, TryData};
use socketioxide::socket::{DisconnectReason, Sid};
use tracing::{debug, info, warn};

use super::deliver::room_channel;
use super::{App, handshake, protocol, register_handlers};
use crate::auth::{AuthError, Grants};
use crate::cluster::BusEvent;
use crate::room::Session;

/// One connection, stored in its socket's extensions.
#[derive(Debug)]
pub struct Conn {
    pub user_id: String,
    pub room_id: Option<String>,
    pub token: String,
    /// Set when a newer connection of the same user took over: the room that one is in.
    replaced_by: Mutex<Option<Option<String>>>,
    phase: Mutex<Phase>,
    /// Set when the set-up is over: `true` once the connection is recorded and announced,
    /// `false` if it closed first.
    settled: tokio::sync::SetOnce<bool>,
    /// The socket's event and byte budgets spent so far.
    bucket: Mutex<super::limits::Bucket>,
    bytes: Mutex<super::limits::Bucket>,
    /// What its token allows (everything with auth off).
    pub grants: Grants,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    SettingUp,
    Ready,
    /// Disconnected during the set-up: the set-up tears down when it ends.
    ClosedEarly,
}

impl Conn {
    /// Waits until the connection is set up; `false`: it closed first, leave it alone.
    pub async fn ready(&self) -> bool {
        *self.settled.wait().await
    }

    /// Spends one event of the socket's budget.
    pub fn spend(&self, budget: &super::limits::EventBudget) -> super::limits::Verdict {
        let mut bucket = self.bucket.lock().unwrap_or_else(PoisonError::into_inner);
        bucket.take(budget, 1.0, std::time::Instant::now())
    }

    /// Spends `size` bytes of the socket's byte budget.
    pub fn spend_bytes(
        &self,
        budget: &super::limits::EventBudget,
        size: usize,
    ) -> super::limits::Verdict {
        let mut bucket = self.bytes.lock().unwrap_or_else(PoisonError::into_inner);
        bucket.take(budget, size as f64, std::time::Instant::now())
    }
}

/// Connect middleware: a refused handshake gets `connect_error` with the reason. An accepted
/// one gets its handlers here, before socketioxide sends CONNECT: it drops the events (and the
/// disconnect) of a socket that has no handler for them yet.
pub async fn authenticate(
    s: SocketRef,
    State(app): State<App>,
    payload: TryData<serde_json::Value>,
) -> Result<(), String> {
    let refused = admit(&s, &app, payload).await;
    if refused.is_err() {
        app.refused.handshakes.fetch_add(1, Ordering::Relaxed);
    }
    refused
}

/// The handshake's checks: identity, token, room and node limits; on success the connection
/// record and its handlers are in place.
async fn admit(
    s: &SocketRef,
    app: &App,
    payload: TryData<serde_json::Value>,
) -> Result<(), String> {
    let query = s.req_parts().uri.query();
    let identity = handshake::identify(query).inspect_err(|e| debug!("handshake refused: {e}"))?;
    let grants = match &app.auth {
        None => Grants::EVERYTHING,
        Some(verifier) => {
            // The query's token, else the socket.io auth payload's {token}.
            let from_payload = payload.0.ok().and_then(|p| match p.get("token") {
                Some(serde_json::Value::String(t)) => Some(t.clone()),
                _ => None,
            });
            let Some(token) = identity.token.clone().or(from_payload) else {
                debug!(user = %identity.user_id, "handshake refused: no token");
                return Err("a token is required: auth is on".into());
            };
            verifier
                .verify(&token, &identity.user_id, identity.room_id.as_deref())
                .map_err(|e| match e {
                    AuthError::Refused(why) | AuthError::Config(why) => why,
                })
                .inspect_err(|why| info!(user = %identity.user_id, "token refused: {why}"))?
        }
    };
    if let Some(room) = &identity.room_id
        && app.max_room_members > 0
    {
        let members = app.outbox.rooms.members(room).await;
        let returning = members.iter().any(|(user, _)| *user == identity.user_id);
        if members.len() >= app.max_room_members && !returning {
            let limit = app.max_room_members;
            warn!(room = %room, limit, "join refused: the room is full");
            return Err(format!(
                "room {room} is full: signal.max_room_members is {limit}"
            ));
        }
    }
    if let Some(room) = &identity.room_id
        && app.max_rooms_per_node > 0
        && !app.outbox.rooms.hosts(room)
        && app.outbox.rooms.local_rooms() >= app.max_rooms_per_node
    {
        let limit = app.max_rooms_per_node;
        warn!(room = %room, limit, "join refused: this node hosts its most rooms");
        return Err(format!(
            "this node hosts its most rooms: signal.max_rooms_per_node is {limit}"
        ));
    }
    let token = format!("{}/{}", app.node_id, s.id);
    s.extensions.insert(Arc::new(Conn {
        user_id: identity.user_id,
        room_id: identity.room_id,
        token,
        replaced_by: Mutex::new(None),
        phase: Mutex::new(Phase::SettingUp),
        settled: tokio::sync::SetOnce::new(),
        bucket: Default::default(),
        bytes: Default::default(),
        grants,
    }));
    register_handlers(s);
    Ok(())
}

pub async fn on_connect(s: SocketRef, State(app): State<App>) {
    let Some(conn) = s.extensions.get::<Arc<Conn>>() else {
        return;
    };
    // Waiting events are released even if the set-up panics.
    let release = ReleaseOnDrop(&conn);
    set_up(&s, &app, &conn).await;
    let closed_early = {
        let mut phase = conn.phase.lock().unwrap_or_else(PoisonError::into_inner);
        if *phase == Phase::ClosedEarly {
            true
        } else {
            *phase = Phase::Ready;
            false
        }
    };
    if closed_early {
        tear_down(&s, &app, &conn, "closed while connecting").await;
    } else {
        let _ = conn.settled.set(true);
    }
    drop(release);
}

struct ReleaseOnDrop<'a>(&'a Conn);

impl Drop for ReleaseOnDrop<'_> {
    fn drop(&mut self) {
        let _ = self.0.settled.set(false);
    }
}

/// Records the connection (the last one of a user wins) and announces it to the room.
async fn set_up(s: &SocketRef, app: &App, conn: &Conn) {
    if let Some(room) = &conn.room_id {
        s.join(room_channel(room));
    }
    let session = Session {
        handle: s.id,
        token: conn.token.clone(),
        room_id: conn.room_id.clone(),
    };
    let outbox = &app.outbox;
    if let Some(previous) = outbox.rooms.join(&conn.user_id, session).await {
        close_replaced(outbox.io(), previous.handle, conn.room_id.clone());
    }
    if let Some(bus) = &outbox.bus {
        bus.publish(BusEvent::Replace {
            user_id: conn.user_id.clone(),
            token: conn.token.clone(),
            room_id: conn.room_id.clone(),
        });
    }
    info!(user = %conn.user_id, room = ?conn.room_id, sid = %s.id, transport = ?s.transport_type(), "join");
    if let Some(room) = &conn.room_id {
        app.webhooks.participant_joined(room, &conn.user_id);
    }
    if let Some(room) = &conn.room_id {
        outbox
            .to_room(room, &protocol::join_envelope(&conn.user_id, room))
            .await;
    }
}

/// Tells a replaced connection why and closes it. Its disconnect then spares the newer one.
pub(super) fn close_replaced(io: &SocketIo, sid: Sid, new_room: Option<String>) {
    let Some(old) = io.of("/").and_then(|ns| ns.get_socket(sid)) else {
        return;
    };
    if let Some(conn) = old.extensions.get::<Arc<Conn>>() {
        *conn
            .replaced_by
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(new_room);
        info!(user = %conn.user_id, sid = %sid, "replaced by a newer connection");
    }
    old.leave_all();
    let _ = old.emit("msg", &protocol::replaced_envelope());
    let _ = old.disconnect();
}

pub async fn on_disconnect(
    s: SocketRef,
    reason: DisconnectReason,
    State(app): State<App>,
    Extension(conn): Extension<Arc<Conn>>,
) {
    {
        let mut phase = conn.phase.lock().unwrap_or_else(PoisonError::into_inner);
        if *phase == Phase::SettingUp {
            // The set-up tears down when it ends (if it runs at all: socketioxide skips
            // `on_connect` when it could not send CONNECT). Events waiting for it give up.
            *phase = Phase::ClosedEarly;
            drop(phase);
            let _ = conn.settled.set(false);
            debug!(user = %conn.user_id, sid = %s.id, ?reason, "closed while connecting");
            return;
        }
    }
    tear_down(&s, &app, &conn, &format!("{reason:?}")).await;
}

/// Removes the connection from its room, everywhere, and tells the room.
async fn tear_down(s: &SocketRef, app: &App, conn: &Conn, reason: &str) {
    s.leave_all();
    let room = conn.room_id.as_deref();
    // Rooms first: a media request racing this disconnect then sees the session gone and
    // undoes what it started (see media::to_sfu).
    app.outbox
        .rooms
        .leave(&conn.user_id, room, &conn.token)
        .await;
    app.sfu.leave(&conn.user_id, &conn.token).await;
    let replaced_by = conn
        .replaced_by
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    info!(user = %conn.user_id, room = ?room, sid = %s.id, reason, replaced = replaced_by.is_some(), "leave");
    let Some(room) = room else { return };
    // A replacement in the same room means the user never left it.
    if replaced_by.is_some_and(|new_room| new_room.as_deref() == Some(room)) {
        return;
    }
    app.webhooks.participant_left(room, &conn.user_id);
    app.outbox
        .to_room(room, &protocol::leave_envelope(&conn.user_id, room))
        .await;
}
