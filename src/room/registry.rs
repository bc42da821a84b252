//! The room registry: who is in which room, shared by every node that uses the same backend.

use async_trait::async_trait;

/// One connection's place in the registry. `token` names the connection (`<nodeId>/<socketId>`),
/// so a stale connection can never remove the entry of the one that replaced it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub user_id: String,
    pub room_id: Option<String>,
    pub token: String,
}

/// A room's members as the original server listed them: userId -> `{"userId":..,"roomId":..}`
/// (a JSON string), in the order they joined.
pub type RoomListing = Vec<(String, String)>;

/// Backends: [`super::MemoryRegistry`] (one node) and [`super::RedisRegistry`] (several nodes).
/// Methods never fail: a backend that cannot reach its store keeps serving from memory and
/// repairs the store later.
#[async_trait]
pub trait RoomRegistry: Send + Sync + 'static {
    /// Records a connection (replacing an older one of the same user).
    async fn join(&self, member: &Member);
    /// Removes a connection's entries, unless a newer connection of the user already owns them.
    async fn leave(&self, member: &Member);
    /// The members of a room, on every node.
    async fn room_members(&self, room_id: &str) -> RoomListing;
    /// The nodes with members in a room (from their connections' tokens, `<nodeId>/<sid>`),
    /// sorted: where a room's media must reach (docs/CLUSTER.md).
    async fn room_nodes(&self, room_id: &str) -> Vec<String>;
    /// Whether a user is connected to any node.
    async fn is_online(&self, user_id: &str) -> bool;
    /// Removes this node's entries (graceful shutdown).
    async fn shutdown(&self);
}
