//! The socket.io edge: handshake, the Part 1 events, and delivery between nodes.

mod connection;
pub mod deliver;
pub mod handshake;
pub mod incoming;
pub mod limits;
pub mod media;
pub mod protocol;
pub mod requests;

use std::sync::Arc;

use serde::Serialize;
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, Event, Extension, SocketRef, State};
use socketioxide::handler::ConnectHandler;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::cluster::BusEvent;
use crate::room::DeadNode;
use crate::sfu::Sfu;
use crate::sfu::api::SfuEvent;
pub use connection::Conn;
use deliver::Outbox;
use incoming::Incoming;
use protocol::{Directed, Refusal};

/// Shared by every handler (socketioxide state).
pub struct Signal {
    pub outbox: Outbox,
    pub sfu: Arc<Sfu>,
    pub node_id: String,
    pub max_message_bytes: usize,
    /// `signal.max_room_members` (0: no limit).
    pub max_room_members: usize,
    pub webhooks: crate::webhook::Webhooks,
    /// Each socket's event and byte budgets.
    pub budget: limits::EventBudget,
    pub byte_budget: limits::EventBudget,
    /// `media.max_sdp_bytes`.
    pub max_sdp_bytes: usize,
    /// `signal.max_rooms_per_node` (0: no limit).
    pub max_rooms_per_node: usize,
    /// Refused events and handshakes, for /healthz.
    pub refused: limits::Refusals,
    /// Checks access tokens; `None`: auth is off, everyone may do everything.
    pub auth: Option<Arc<crate::auth::Verifier>>,
}

pub(crate) type App = Arc<Signal>;

/// Registers the namespace on `io` and starts the task that applies events from other nodes.
pub fn install(
    io: &SocketIo,
    app: App,
    from_bus: mpsc::Receiver<BusEvent>,
    reaped: mpsc::UnboundedReceiver<DeadNode>,
    from_sfu: mpsc::UnboundedReceiver<SfuEvent>,
) {
    io.ns("/", connection::on_connect.with(connection::authenticate));
    tokio::spawn(apply_remote(app, from_bus, reaped, from_sfu));
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
                if !conn.ready().await {
                    return;
                }
                relay_directed(kind, &s, &app, &conn, incoming).await
            },
        );
    }
    for event in media::MEDIA_EVENTS {
        s.on(event, media::on_media_event);
    }
    s.on_fallback(on_unknown);
    s.on_disconnect(connection::on_disconnect);
}

fn refuse(app: &Signal, s: &SocketRef, event: &str, refusal: &Refusal) {
    debug!(sid = %s.id, event, "refused: {refusal}");
    app.refused.count(refusal.status());
    let _ = s.emit("msg", &refusal.envelope(event));
    if matches!(refusal, Refusal::RateLimited { abusive: true }) {
        warn!(sid = %s.id, "disconnected: kept sending over its event budget");
        let _ = s.clone().disconnect();
    }
}

/// Checks the event budget, the size limit and that the payload parsed at all.
fn accept(app: &Signal, conn: &Conn, incoming: Incoming) -> Result<rmpv::Value, Refusal> {
    over_budget(app, conn)?;
    if incoming.size > app.max_message_bytes {
        return Err(Refusal::TooLarge {
            size: incoming.size,
            limit: app.max_message_bytes,
        });
    }
    if let limits::Verdict::Refused { abusive } = conn.spend_bytes(&app.byte_budget, incoming.size)
    {
        return Err(Refusal::RateLimited { abusive });
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
    if !conn.ready().await {
        return;
    }
    let result = accept(&app, &conn, incoming).and_then(|payload| {
        if let Some(kind) = protocol::imitated_type(&payload) {
            return Err(Refusal::Imitation { kind: kind.into() });
        }
        match &conn.room_id {
            Some(room) => Ok((room, payload)),
            None => Err(Refusal::NoRoom),
        }
    });
    match result {
        Ok((room, payload)) => {
            debug!(user = %conn.user_id, room = %room, "msg");
            app.outbox.to_room(room, &payload).await;
        }
        Err(refusal) => refuse(&app, &s, "msg", &refusal),
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
    if !conn.ready().await {
        return;
    }
    let asked = accept(&app, &conn, incoming).and_then(|payload| {
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
            refuse(&app, &s, "roomUserList", &refusal);
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
    let prepared = accept(app, conn, incoming).and_then(|payload| {
        let target = protocol::required_str(&payload, "targetUid")?.to_owned();
        Ok((target, payload))
    });
    let (target, mut payload) = match prepared {
        Ok(p) => p,
        Err(refusal) => return refuse(app, s, event, &refusal),
    };
    if target == protocol::SFU_USER_ID {
        debug!(user = %conn.user_id, event, "to the sfu");
        if let Err(refusal) = media::to_sfu(kind, app, conn, payload).await {
            refuse(app, s, event, &refusal);
        }
        return;
    }
    if app.auth.is_some() && !in_own_room(app, conn, &target).await {
        return refuse(app, s, event, &Refusal::OutsideYourRoom { target });
    }
    protocol::stamp_sender(&mut payload, &conn.user_id);
    let envelope = protocol::Envelope::ok(event, kind.text(), payload);
    if app.outbox.to_user(&target, &envelope).await {
        debug!(from = %conn.user_id, to = %target, event, "relayed");
    } else {
        refuse(app, s, event, &Refusal::Offline { target });
    }
}

/// Whether `target` is a member of the sender's room (on any node).
async fn in_own_room(app: &Signal, conn: &Conn, target: &str) -> bool {
    let Some(room) = &conn.room_id else {
        return false;
    };
    let members = app.outbox.rooms.members(room).await;
    members.iter().any(|(user, _)| user == target)
}

async fn on_unknown(
    s: SocketRef,
    Event(event): Event,
    State(app): State<App>,
    Extension(conn): Extension<Arc<Conn>>,
) {
    let refusal = over_budget(&app, &conn)
        .err()
        .unwrap_or(Refusal::UnknownEvent);
    refuse(&app, &s, &event, &refusal);
}

/// Spends one event of the socket's budget.
fn over_budget(app: &Signal, conn: &Conn) -> Result<(), Refusal> {
    match conn.spend(&app.budget) {
        limits::Verdict::Accepted => Ok(()),
        limits::Verdict::Refused { abusive } => Err(Refusal::RateLimited { abusive }),
    }
}

/// Applies what other nodes ask for, and announces members of dead nodes as gone.
async fn apply_remote(
    app: App,
    mut from_bus: mpsc::Receiver<BusEvent>,
    mut reaped: mpsc::UnboundedReceiver<DeadNode>,
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
                media::Delivery::LocalRoom(room, envelope) => {
                    outbox.to_local_room(&room, &envelope).await
                }
            },
            Some(event) = from_bus.recv() => match event {
                BusEvent::Room { room_id, payload } => outbox.to_local_room(&room_id, &payload).await,
                BusEvent::User { user_id, payload } => {
                    outbox.to_local_user(&user_id, &payload);
                }
                                BusEvent::Replace { user_id, token, room_id } => {
                    if let Some(old) = outbox.rooms.evict(&user_id, &token) {
                        connection::close_replaced(outbox.io(), old.handle, room_id);
                    }
                }
                                BusEvent::Media(event) => app.sfu.cluster(event),
                BusEvent::Resubscribed => app.sfu.resync(),
            },
                        Some(dead) = reaped.recv() => {
                // Its tracks leave every node's rooms (each tells its own members).
                app.sfu.node_gone(&dead.node);
                for gone in dead.members {
                    warn!(user = %gone.user_id, room = %gone.room_id, "member of a dead node removed");
                    outbox.to_room(&gone.room_id, &protocol::leave_envelope(&gone.user_id, &gone.room_id)).await;
                }
            }
            else => return,
        }
    }
}
