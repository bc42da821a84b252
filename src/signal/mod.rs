//! The socket.io edge: handshake, the Part 1 events, and delivery between nodes.

pub mod deliver;
pub mod handshake;
pub mod incoming;
pub mod media;
pub mod protocol;

use std::sync::{Arc, Mutex};

use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Event, Extension, SocketRef, State};
use socketioxide::handler::ConnectHandler;
use socketioxide::socket::{DisconnectReason, Sid};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::cluster::BusEvent;
use crate::room::{Reaped, Session};
use crate::sfu::Sfu;
use crate::sfu::api::SfuEvent;
use deliver::{Outbox, room_channel};
use incoming::Incoming;
use protocol::{Directed, Refusal};

/// Shared by every handler (socketioxide state).
pub struct Signal {
    pub outbox: Outbox,
    pub sfu: Arc<Sfu>,
    pub node_id: String,
    pub max_message_bytes: usize,
}

/// One connection, stored in its socket's extensions.
#[derive(Debug)]
pub struct Conn {
    pub user_id: String,
    pub room_id: Option<String>,
    pub token: String,
    /// Set when a newer connection of the same user took over: the room that one is in.
    replaced_by: Mutex<Option<Option<String>>>,
    /// Set once `on_connect` has recorded the connection and announced it. socketioxide sends
    /// CONNECT before it runs `on_connect` (on a task of its own), so a client's first events
    /// can arrive earlier; their handlers wait for this instead of acting on a connection that
    /// is not recorded yet.
    set_up: tokio::sync::SetOnce<()>,
}

/// Longer than setting a connection up can take (a few registry commands, each bounded by
/// `redis.command_timeout_ms`).
const SET_UP_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

impl Conn {
    /// Until the connection is set up (see `set_up`).
    pub async fn ready(&self) {
        self.set_up.wait().await;
    }
}

pub(crate) type App = Arc<Signal>;

/// Registers the namespace on `io` and starts the task that applies events from other nodes.
pub fn install(
    io: &SocketIo,
    app: App,
    from_bus: mpsc::UnboundedReceiver<BusEvent>,
    reaped: mpsc::UnboundedReceiver<Reaped>,
    from_sfu: mpsc::UnboundedReceiver<SfuEvent>,
) {
    io.ns("/", on_connect.with(authenticate));
    tokio::spawn(apply_remote(app, from_bus, reaped, from_sfu));
}

/// Connect middleware: a refused handshake gets `connect_error` with the reason. An accepted
/// one gets its handlers here, before socketioxide sends CONNECT: it drops the events (and the
/// disconnect) of a socket that has no handler for them yet, and the client may send as soon
/// as it has CONNECT, before `on_connect` runs.
async fn authenticate(s: SocketRef, State(app): State<App>) -> Result<(), String> {
    let query = s.req_parts().uri.query();
    let identity = handshake::identify(query).inspect_err(|e| debug!("handshake refused: {e}"))?;
    let token = format!("{}/{}", app.node_id, s.id);
    s.extensions.insert(Arc::new(Conn {
        user_id: identity.user_id,
        room_id: identity.room_id,
        token,
        replaced_by: Mutex::new(None),
        set_up: tokio::sync::SetOnce::new(),
    }));
    register_handlers(&s);
    Ok(())
}

/// Every handler that uses the connection's record waits for `Conn::ready` first.
fn register_handlers(s: &SocketRef) {
    s.on("msg", on_msg);
    s.on("roomUserList", on_room_user_list);
    for kind in Directed::ALL {
        s.on(
            kind.event(),
            move |s: SocketRef,
                  State(app): State<App>,
                  Extension(conn): Extension<Arc<Conn>>,
                  incoming: Incoming| async move {
                conn.ready().await;
                relay_directed(kind, &s, &app, &conn, incoming).await
            },
        );
    }
    for event in media::MEDIA_EVENTS {
        s.on(event, media::on_media_event);
    }
    s.on_fallback(on_unknown);
    s.on_disconnect(on_disconnect);
}

async fn on_connect(s: SocketRef, State(app): State<App>) {
    let Some(conn) = s.extensions.get::<Arc<Conn>>() else {
        return;
    };
    set_up(&s, &app, &conn).await;
    let _ = conn.set_up.set(());
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
    // A socket gone meanwhile is still announced: its disconnect handler waits for this and
    // then removes it, so the room sees join, then leave.
    if let Some(bus) = &outbox.bus {
        bus.publish(BusEvent::Replace {
            user_id: conn.user_id.clone(),
            token: conn.token.clone(),
            room_id: conn.room_id.clone(),
        });
    }
    info!(user = %conn.user_id, room = ?conn.room_id, sid = %s.id, transport = ?s.transport_type(), "join");
    if let Some(room) = &conn.room_id {
        outbox
            .to_room(room, &protocol::join_envelope(&conn.user_id, room))
            .await;
    }
}

/// Tells a replaced connection why and closes it. Its disconnect then spares the newer one.
fn close_replaced(io: &SocketIo, sid: Sid, new_room: Option<String>) {
    let Some(old) = io.of("/").and_then(|ns| ns.get_socket(sid)) else {
        return;
    };
    if let Some(conn) = old.extensions.get::<Arc<Conn>>() {
        *conn.replaced_by.lock().unwrap() = Some(new_room);
        info!(user = %conn.user_id, sid = %sid, "replaced by a newer connection");
    }
    old.leave_all();
    let _ = old.emit("msg", &protocol::replaced_envelope());
    let _ = old.disconnect();
}

async fn on_disconnect(
    s: SocketRef,
    reason: DisconnectReason,
    State(app): State<App>,
    Extension(conn): Extension<Arc<Conn>>,
) {
    // A socket that closed while socketioxide was connecting it never gets `on_connect`, and
    // has nothing to undo; the bound keeps this task from waiting for it forever.
    if tokio::time::timeout(SET_UP_WAIT, conn.ready())
        .await
        .is_err()
    {
        debug!(user = %conn.user_id, sid = %s.id, "closed before it was set up");
        return;
    }
    s.leave_all();
    let room = conn.room_id.as_deref();
    // Rooms first: a media request racing this disconnect then sees the session gone and
    // undoes what it started (see media::to_sfu).
    app.outbox
        .rooms
        .leave(&conn.user_id, room, &conn.token)
        .await;
    app.sfu.leave(&conn.user_id, &conn.token).await;
    let replaced_by = conn.replaced_by.lock().unwrap().clone();
    info!(user = %conn.user_id, room = ?room, sid = %s.id, ?reason, replaced = replaced_by.is_some(), "leave");
    let Some(room) = room else { return };
    // A replacement in the same room means the user never left it.
    if replaced_by.is_some_and(|new_room| new_room.as_deref() == Some(room)) {
        return;
    }
    app.outbox
        .to_room(room, &protocol::leave_envelope(&conn.user_id, room))
        .await;
}

fn refuse(s: &SocketRef, event: &str, refusal: &Refusal) {
    debug!(sid = %s.id, event, "refused: {refusal}");
    let _ = s.emit("msg", &refusal.envelope(event));
}

/// Checks the size limit and that the payload parsed at all.
fn accept(app: &Signal, incoming: Incoming) -> Result<rmpv::Value, Refusal> {
    if incoming.size > app.max_message_bytes {
        return Err(Refusal::TooLarge {
            size: incoming.size,
            limit: app.max_message_bytes,
        });
    }
    incoming.payload.map_err(Refusal::Malformed)
}

/// `msg`: the payload, as sent, to every member of the sender's room, sender included.
async fn on_msg(
    s: SocketRef,
    State(app): State<App>,
    Extension(conn): Extension<Arc<Conn>>,
    incoming: Incoming,
) {
    conn.ready().await;
    let result = accept(&app, incoming).and_then(|payload| match &conn.room_id {
        Some(room) => Ok((room, payload)),
        None => Err(Refusal::NoRoom),
    });
    match result {
        Ok((room, payload)) => {
            debug!(user = %conn.user_id, room = %room, "msg");
            app.outbox.to_room(room, &payload).await;
        }
        Err(refusal) => refuse(&s, "msg", &refusal),
    }
}

/// `roomUserList`: the own room's members (userId -> JSON string), as an event and to the ack.
async fn on_room_user_list(
    s: SocketRef,
    State(app): State<App>,
    Extension(conn): Extension<Arc<Conn>>,
    ack: AckSender,
    incoming: Incoming,
) {
    conn.ready().await;
    let asked = accept(&app, incoming).and_then(|payload| {
        let room = protocol::required_str(&payload, "roomId")?;
        match conn.room_id.as_deref() {
            Some(own) if own == room => Ok(own.to_owned()),
            _ => Err(Refusal::NotYourRoom {
                room_id: room.to_owned(),
            }),
        }
    });
    match asked {
        Ok(room) => {
            let listing = ListingJson(app.outbox.rooms.members(&room).await);
            let _ = s.emit("roomUserList", &listing);
            let _ = ack.send(&listing);
        }
        Err(refusal) => {
            refuse(&s, "roomUserList", &refusal);
            let _ = ack.send(&refusal.envelope("roomUserList"));
        }
    }
}

/// Serializes a room listing as a JSON object in listing order.
struct ListingJson(crate::room::RoomListing);

impl Serialize for ListingJson {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_map(self.0.iter().map(|(k, v)| (k, v)))
    }
}

/// `call` / `offer` / `answer` / `candidate`: the payload, stamped with `fromUid`, to `targetUid`.
async fn relay_directed(
    kind: Directed,
    s: &SocketRef,
    app: &Signal,
    conn: &Conn,
    incoming: Incoming,
) {
    let event = kind.event();
    let prepared = accept(app, incoming).and_then(|payload| {
        let target = protocol::required_str(&payload, "targetUid")?.to_owned();
        Ok((target, payload))
    });
    let (target, mut payload) = match prepared {
        Ok(p) => p,
        Err(refusal) => return refuse(s, event, &refusal),
    };
    if target == protocol::SFU_USER_ID {
        debug!(user = %conn.user_id, event, "to the sfu");
        if let Err(refusal) = media::to_sfu(kind, app, conn, payload).await {
            refuse(s, event, &refusal);
        }
        return;
    }
    protocol::stamp_sender(&mut payload, &conn.user_id);
    let envelope = protocol::Envelope::ok(event, kind.text(), payload);
    if app.outbox.to_user(&target, &envelope).await {
        debug!(from = %conn.user_id, to = %target, event, "relayed");
    } else {
        refuse(s, event, &Refusal::Offline { target });
    }
}

async fn on_unknown(s: SocketRef, Event(event): Event) {
    refuse(&s, &event, &Refusal::UnknownEvent);
}

/// Applies what other nodes ask for, and announces members of dead nodes as gone.
async fn apply_remote(
    app: App,
    mut from_bus: mpsc::UnboundedReceiver<BusEvent>,
    mut reaped: mpsc::UnboundedReceiver<Reaped>,
    mut from_sfu: mpsc::UnboundedReceiver<SfuEvent>,
) {
    let outbox = &app.outbox;
    loop {
        tokio::select! {
            Some(event) = from_sfu.recv() => match media::delivery(event) {
                media::Delivery::Session(user, session, envelope) => {
                    // Only to the connection the media session belongs to: never to another
                    // node, nor to a newer connection of the same user.
                    if outbox.rooms.is_current(&user, &session) {
                        outbox.to_local_user(&user, &envelope);
                    }
                }
                media::Delivery::Room(room, envelope) => outbox.to_room(&room, &envelope).await,
            },
            Some(event) = from_bus.recv() => match event {
                BusEvent::Room { room_id, payload } => outbox.to_local_room(&room_id, &payload).await,
                BusEvent::User { user_id, payload } => {
                    outbox.to_local_user(&user_id, &payload);
                }
                BusEvent::Replace { user_id, token, room_id } => {
                    if let Some(old) = outbox.rooms.evict(&user_id, &token) {
                        close_replaced(outbox.io(), old.handle, room_id);
                    }
                }
            },
            Some(gone) = reaped.recv() => {
                warn!(user = %gone.user_id, room = %gone.room_id, "member of a dead node removed");
                outbox.to_room(&gone.room_id, &protocol::leave_envelope(&gone.user_id, &gone.room_id)).await;
            }
            else => return,
        }
    }
}
