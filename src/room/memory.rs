//! The in-memory registry: the default, and the local truth the Redis registry is rebuilt from.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::PoisonError;

use async_trait::async_trait;
use indexmap::IndexMap;

use super::registry::{Member, RoomListing, RoomRegistry};
use crate::signal::protocol::MemberInfo;

/// The distinct node ids of connection tokens (`<nodeId>/<sid>`), sorted.
pub fn nodes_of<'a>(tokens: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut nodes: Vec<String> = tokens
        .filter_map(|t| t.split_once('/').map(|(node, _)| node.to_owned()))
        .collect();
    nodes.sort();
    nodes.dedup();
    nodes
}

#[derive(Default)]
pub struct MemoryRegistry {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    /// room -> userId -> token, in join order (the order `roomUserList` reports).
    rooms: HashMap<String, IndexMap<String, String>>,
    /// userId -> token of its current connection.
    users: HashMap<String, String>,
}

impl MemoryRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Every current connection (what a store must hold after an outage).
    pub fn snapshot(&self) -> Vec<Member> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        let mut room_of: HashMap<(&str, &str), &str> = HashMap::new();
        for (room, users) in &inner.rooms {
            for (user, token) in users {
                room_of.insert((user, token), room);
            }
        }
        inner
            .users
            .iter()
            .map(|(user, token)| Member {
                user_id: user.clone(),
                room_id: room_of
                    .get(&(user.as_str(), token.as_str()))
                    .map(|r| r.to_string()),
                token: token.clone(),
            })
            .collect()
    }

    pub fn join_now(&self, m: &Member) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.users.insert(m.user_id.clone(), m.token.clone());
        if let Some(room) = &m.room_id {
            inner
                .rooms
                .entry(room.clone())
                .or_default()
                .insert(m.user_id.clone(), m.token.clone());
        }
    }

    pub fn leave_now(&self, m: &Member) {
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        if inner.users.get(&m.user_id) == Some(&m.token) {
            inner.users.remove(&m.user_id);
        }
        if let Some(room) = &m.room_id
            && let Some(users) = inner.rooms.get_mut(room)
        {
            if users.get(&m.user_id) == Some(&m.token) {
                users.shift_remove(&m.user_id);
            }
            if users.is_empty() {
                inner.rooms.remove(room);
            }
        }
    }

    pub fn members_now(&self, room_id: &str) -> RoomListing {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner
            .rooms
            .get(room_id)
            .map(|users| {
                users
                    .keys()
                    .map(|user| {
                        let info = MemberInfo {
                            user_id: user,
                            room_id,
                        };
                        (user.clone(), info.to_json())
                    })
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn nodes_now(&self, room_id: &str) -> Vec<String> {
        let inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        nodes_of(
            inner
                .rooms
                .get(room_id)
                .into_iter()
                .flat_map(|u| u.values()),
        )
    }

    pub fn is_online_now(&self, user_id: &str) -> bool {
        self.inner
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .users
            .contains_key(user_id)
    }
}

#[async_trait]
impl RoomRegistry for MemoryRegistry {
    async fn join(&self, member: &Member) {
        self.join_now(member)
    }
    async fn leave(&self, member: &Member) {
        self.leave_now(member)
    }
    async fn room_nodes(&self, room_id: &str) -> Vec<String> {
        self.nodes_now(room_id)
    }
    async fn room_members(&self, room_id: &str) -> RoomListing {
        self.members_now(room_id)
    }
    async fn is_online(&self, user_id: &str) -> bool {
        self.is_online_now(user_id)
    }
    async fn shutdown(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(user: &str, room: Option<&str>, token: &str) -> Member {
        Member {
            user_id: user.into(),
            room_id: room.map(Into::into),
            token: token.into(),
        }
    }

    #[test]
    fn lists_members_in_join_order_with_the_original_values() {
        let r = MemoryRegistry::new();
        r.join_now(&member("b", Some("R"), "n/1"));
        r.join_now(&member("a", Some("R"), "n/2"));
        r.join_now(&member("c", Some("other"), "n/3"));
        assert_eq!(
            r.members_now("R"),
            vec![
                ("b".into(), r#"{"userId":"b","roomId":"R"}"#.into()),
                ("a".into(), r#"{"userId":"a","roomId":"R"}"#.into()),
            ]
        );
        assert!(r.members_now("nobody").is_empty());
    }

    #[test]
    fn names_the_nodes_of_a_room() {
        let r = MemoryRegistry::new();
        r.join_now(&member("b", Some("R"), "n2/1"));
        r.join_now(&member("a", Some("R"), "n1/2"));
        r.join_now(&member("c", Some("R"), "n2/3"));
        r.join_now(&member("d", Some("S"), "n3/4"));
        assert_eq!(r.nodes_now("R"), ["n1", "n2"]);
        r.leave_now(&member("a", Some("R"), "n1/2"));
        assert_eq!(r.nodes_now("R"), ["n2"]);
        assert!(r.nodes_now("nobody").is_empty());
    }

    #[test]
    fn a_stale_connection_cannot_remove_its_replacement() {
        let r = MemoryRegistry::new();
        let old = member("u", Some("R"), "n/1");
        let new = member("u", Some("R"), "n/2");
        r.join_now(&old);
        r.join_now(&new);
        r.leave_now(&old);
        assert_eq!(r.members_now("R").len(), 1);
        assert!(r.is_online_now("u"));
        r.leave_now(&new);
        assert!(r.members_now("R").is_empty());
        assert!(!r.is_online_now("u"));
        assert!(r.snapshot().is_empty());
    }

    #[test]
    fn snapshot_has_every_connection_with_its_room() {
        let r = MemoryRegistry::new();
        r.join_now(&member("a", Some("R"), "n/1"));
        r.join_now(&member("b", None, "n/2"));
        let mut snap = r.snapshot();
        snap.sort_by(|x, y| x.user_id.cmp(&y.user_id));
        assert_eq!(
            snap,
            vec![member("a", Some("R"), "n/1"), member("b", None, "n/2")]
        );
    }
}
