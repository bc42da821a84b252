//! Rooms: this node's connections (one per user, the last one wins) over a shared registry.

mod memory;
mod redis;
mod registry;

use std::collections::HashMap;
use std::sync::PoisonError;
use std::sync::{Arc, Mutex};

pub use memory::MemoryRegistry;
pub use redis::{DeadNode, ROOM_PREFIX, Reaped, RedisRegistry};
pub use registry::{Member, RoomListing, RoomRegistry};

/// One live connection on this node. `H` is the edge's handle to reach it (a socket id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Session<H> {
    pub handle: H,
    pub token: String,
    pub room_id: Option<String>,
}

/// The connections of this node, by userId, and the registry they are recorded in.
pub struct Rooms<H> {
    local: Mutex<Local<H>>,
    registry: Arc<dyn RoomRegistry>,
}

/// This node's connections and how many of them each room has.
struct Local<H> {
    sessions: HashMap<String, Session<H>>,
    rooms: HashMap<String, usize>,
}

impl<H> Local<H> {
    fn insert(&mut self, user_id: &str, session: Session<H>) -> Option<Session<H>> {
        if let Some(room) = &session.room_id {
            *self.rooms.entry(room.clone()).or_default() += 1;
        }
        let previous = self.sessions.insert(user_id.to_owned(), session);
        if let Some(p) = &previous {
            self.forget_room(p.room_id.as_deref());
        }
        previous
    }

    fn remove(&mut self, user_id: &str) -> Option<Session<H>> {
        let removed = self.sessions.remove(user_id);
        if let Some(s) = &removed {
            self.forget_room(s.room_id.as_deref());
        }
        removed
    }

    fn forget_room(&mut self, room: Option<&str>) {
        if let Some(room) = room
            && let Some(count) = self.rooms.get_mut(room)
        {
            *count -= 1;
            if *count == 0 {
                self.rooms.remove(room);
            }
        }
    }
}

impl<H: Clone> Rooms<H> {
    pub fn new(registry: Arc<dyn RoomRegistry>) -> Self {
        Rooms {
            local: Mutex::new(Local {
                sessions: HashMap::new(),
                rooms: HashMap::new(),
            }),
            registry,
        }
    }

    /// Records a new connection. Returns the same user's previous connection on this node,
    /// which the caller must notify and close: the last connection wins.
    pub async fn join(&self, user_id: &str, session: Session<H>) -> Option<Session<H>> {
        let member = Member {
            user_id: user_id.to_owned(),
            room_id: session.room_id.clone(),
            token: session.token.clone(),
        };
        let previous = self.table().insert(user_id, session);
        self.registry.join(&member).await;
        previous
    }

    /// Removes a closed connection. Entries a newer connection of the user owns stay.
    pub async fn leave(&self, user_id: &str, room_id: Option<&str>, token: &str) {
        {
            let mut local = self.table();
            if local
                .sessions
                .get(user_id)
                .is_some_and(|s| s.token == token)
            {
                local.remove(user_id);
            }
        }
        let member = Member {
            user_id: user_id.to_owned(),
            room_id: room_id.map(str::to_owned),
            token: token.to_owned(),
        };
        self.registry.leave(&member).await;
    }

    /// Forgets the user's connection here because a newer one exists on another node.
    pub fn evict(&self, user_id: &str, newer_token: &str) -> Option<Session<H>> {
        let mut local = self.table();
        match local.sessions.get(user_id) {
            Some(s) if s.token != newer_token => local.remove(user_id),
            _ => None,
        }
    }

    /// Whether `token` is the user's current connection on this node.
    pub fn is_current(&self, user_id: &str, token: &str) -> bool {
        self.table()
            .sessions
            .get(user_id)
            .is_some_and(|s| s.token == token)
    }

    /// The user's connection on this node.
    pub fn local(&self, user_id: &str) -> Option<Session<H>> {
        self.table().sessions.get(user_id).cloned()
    }

    pub fn local_count(&self) -> usize {
        self.table().sessions.len()
    }

    pub fn local_handles(&self) -> Vec<H> {
        self.table()
            .sessions
            .values()
            .map(|s| s.handle.clone())
            .collect()
    }

    /// Whether a connection of this node is in `room_id`.
    pub fn hosts(&self, room_id: &str) -> bool {
        self.table().rooms.contains_key(room_id)
    }

    /// Rooms with a connection on this node.
    pub fn local_rooms(&self) -> usize {
        self.table().rooms.len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Local<H>> {
        self.local.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub async fn members(&self, room_id: &str) -> RoomListing {
        self.registry.room_members(room_id).await
    }

    /// The nodes with members in a room.
    pub async fn nodes(&self, room_id: &str) -> Vec<String> {
        self.registry.room_nodes(room_id).await
    }

    pub async fn is_online(&self, user_id: &str) -> bool {
        self.local(user_id).is_some() || self.registry.is_online(user_id).await
    }

    pub async fn shutdown(&self) {
        self.registry.shutdown().await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn session(handle: u32, room: Option<&str>) -> Session<u32> {
        Session {
            handle,
            token: format!("n/{handle}"),
            room_id: room.map(Into::into),
        }
    }

    #[tokio::test]
    async fn the_last_connection_wins_and_the_old_one_cannot_remove_it() {
        let rooms = Rooms::new(Arc::new(MemoryRegistry::new()));
        assert_eq!(rooms.join("u", session(1, Some("R"))).await, None);
        assert_eq!(
            rooms.join("u", session(2, Some("R"))).await,
            Some(session(1, Some("R")))
        );
        rooms.leave("u", Some("R"), "n/1").await;
        assert_eq!(rooms.local("u"), Some(session(2, Some("R"))));
        assert_eq!(rooms.members("R").await.len(), 1);
        rooms.leave("u", Some("R"), "n/2").await;
        assert_eq!(rooms.local("u"), None);
        assert!(rooms.members("R").await.is_empty());
        assert!(!rooms.is_online("u").await);
    }

    /// A panic while the session table is locked (a bug somewhere) must not make every later
    /// join and leave on the node panic too.
    #[tokio::test]
    async fn a_panic_while_the_table_is_locked_does_not_take_the_node_down() {
        let rooms = Arc::new(Rooms::new(Arc::new(MemoryRegistry::new())));
        assert_eq!(rooms.join("u", session(1, Some("R"))).await, None);
        let poisoner = rooms.clone();
        let panicked = std::thread::spawn(move || {
            let _held = poisoner.local.lock();
            panic!("a bug while the table is locked");
        })
        .join();
        assert!(panicked.is_err() && rooms.local.is_poisoned());
        assert_eq!(rooms.local_count(), 1);
        assert_eq!(rooms.join("v", session(2, Some("R"))).await, None);
        rooms.leave("u", Some("R"), "n/1").await;
        assert_eq!(rooms.local("v"), Some(session(2, Some("R"))));
        assert!(rooms.is_current("v", "n/2"));
    }

    #[tokio::test]
    async fn evict_spares_the_newer_connection() {
        let rooms = Rooms::new(Arc::new(MemoryRegistry::new()));
        rooms.join("u", session(1, None)).await;
        assert_eq!(rooms.evict("u", "n/1"), None);
        assert_eq!(rooms.evict("u", "other/9"), Some(session(1, None)));
        assert_eq!(rooms.local_count(), 0);
    }

    #[tokio::test]
    async fn counts_the_rooms_this_node_hosts() {
        let rooms = Rooms::new(Arc::new(MemoryRegistry::new()));
        rooms.join("u", session(1, Some("A"))).await;
        rooms.join("v", session(2, Some("A"))).await;
        rooms.join("w", session(3, None)).await;
        assert_eq!((rooms.local_rooms(), rooms.hosts("A")), (1, true));
        // The same user again, in another room: A keeps v, B is new.
        rooms.join("u", session(4, Some("B"))).await;
        assert_eq!(rooms.local_rooms(), 2);
        rooms.leave("v", Some("A"), "n/2").await;
        assert!(!rooms.hosts("A"));
        assert_eq!(rooms.evict("u", "other/9"), Some(session(4, Some("B"))));
        assert_eq!(rooms.local_rooms(), 0);
    }
}
