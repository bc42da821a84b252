//! The Redis registry: the original `meeting-room::<roomId>` hashes, shared by several nodes.
//!
//! Keys (besides the original hash, field userId = `{"userId":..,"roomId":..}`):
//! - `switchboard:owner::<roomId>`  hash userId -> token of the connection that wrote the entry
//! - `switchboard:users`            hash userId -> token of the user's current connection
//! - `switchboard:nodes`            set of node ids that may own entries
//! - `switchboard:node::<id>`       heartbeat, expires after `node_ttl_ms`
//! - `switchboard:node::<id>:sessions` set of `token\nuserId\nroomId` this node wrote
//!
//! Every change goes through a Lua script, so a node that dies mid-way leaves nothing half done.
//! The local [`MemoryRegistry`] is the truth for this node's own connections: while Redis is
//! down or slow, everything is served from it, and the heartbeat task rewrites Redis from it
//! when Redis answers again (or when it notices its heartbeat key was lost, e.g. a restart).

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use async_trait::async_trait;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{AsyncCommands, Script};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::memory::MemoryRegistry;
use super::registry::{Member, RoomListing, RoomRegistry};
use crate::config::RedisConfig;
use crate::signal::protocol::MemberInfo;

pub const ROOM_PREFIX: &str = "meeting-room::";
const OWNER_PREFIX: &str = "switchboard:owner::";
const USERS: &str = "switchboard:users";
const NODES: &str = "switchboard:nodes";

fn heartbeat_key(node: &str) -> String {
    format!("switchboard:node::{node}")
}
fn sessions_key(node: &str) -> String {
    format!("switchboard:node::{node}:sessions")
}
/// Ids never contain control characters (see `validate_id`), so `\n` separates safely.
fn session_entry(m: &Member) -> String {
    format!(
        "{}\n{}\n{}",
        m.token,
        m.user_id,
        m.room_id.as_deref().unwrap_or("")
    )
}

const JOIN_LUA: &str = r#"
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
if #KEYS > 2 then
  redis.call('HSET', KEYS[3], ARGV[1], ARGV[4])
  redis.call('HSET', KEYS[4], ARGV[1], ARGV[2])
end
return 1
"#;

const LEAVE_LUA: &str = r#"
local removed = 0
if #KEYS > 2 and redis.call('HGET', KEYS[4], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[3], ARGV[1])
  redis.call('HDEL', KEYS[4], ARGV[1])
  removed = 1
end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then
  redis.call('HDEL', KEYS[1], ARGV[1])
end
redis.call('SREM', KEYS[2], ARGV[3])
return removed
"#;

/// Removes every entry a node wrote that it still owns; returns the freed (room, user) pairs.
/// Does nothing if the node's heartbeat came back in the meantime.
const REAP_LUA: &str = r#"
if redis.call('EXISTS', KEYS[4]) == 1 then return {} end
local out = {}
for _, e in ipairs(redis.call('SMEMBERS', KEYS[3])) do
  local token, user, room = string.match(e, '^([^\n]*)\n([^\n]*)\n(.*)$')
  if token then
    if room ~= '' then
      local owner = ARGV[3] .. room
      if redis.call('HGET', owner, user) == token then
        redis.call('HDEL', ARGV[2] .. room, user)
        redis.call('HDEL', owner, user)
        table.insert(out, room)
        table.insert(out, user)
      end
    end
    if redis.call('HGET', KEYS[1], user) == token then
      redis.call('HDEL', KEYS[1], user)
    end
  end
end
redis.call('DEL', KEYS[3])
redis.call('SREM', KEYS[2], ARGV[1])
return out
"#;

/// A member removed from a room because its node died.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reaped {
    pub room_id: String,
    pub user_id: String,
}

/// A node found dead, and the room members it had.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadNode {
    pub node: String,
    pub members: Vec<Reaped>,
}

pub struct RedisRegistry {
    local: MemoryRegistry,
    conn: ConnectionManager,
    node_id: String,
    cfg: RedisConfig,
    healthy: AtomicBool,
    reaped: mpsc::UnboundedSender<DeadNode>,
    stop: CancellationToken,
    scripts: Scripts,
    /// Serializes Redis writes with the resync, so a join or leave can never interleave with a
    /// rewrite from an older snapshot.
    writes: tokio::sync::Mutex<()>,
}

struct Scripts {
    join: Script,
    leave: Script,
    reap: Script,
}

type RedisError = Box<dyn std::error::Error + Send + Sync>;

impl RedisRegistry {
    /// Connects lazily (the server starts even while Redis is down), makes a first heartbeat
    /// and starts the heartbeat task. Dead nodes this node removes come on `reaped`.
    pub async fn start(
        url: &str,
        node_id: &str,
        cfg: &RedisConfig,
        reaped: mpsc::UnboundedSender<DeadNode>,
    ) -> anyhow::Result<Arc<Self>> {
        let client = redis::Client::open(url)?;
        let conn_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(cfg.command_timeout()))
            .set_response_timeout(Some(cfg.command_timeout()))
            .set_number_of_retries(1)
            .set_max_delay(cfg.heartbeat());
        let conn = ConnectionManager::new_lazy_with_config(client, conn_cfg)?;
        let registry = Arc::new(RedisRegistry {
            local: MemoryRegistry::new(),
            conn,
            node_id: node_id.to_owned(),
            cfg: cfg.clone(),
            // Unknown until the first heartbeat; start pessimistic so it rewrites everything.
            healthy: AtomicBool::new(false),
            reaped,
            stop: CancellationToken::new(),
            scripts: Scripts {
                join: Script::new(JOIN_LUA),
                leave: Script::new(LEAVE_LUA),
                reap: Script::new(REAP_LUA),
            },
            writes: tokio::sync::Mutex::new(()),
        });
        registry.tick().await;
        tokio::spawn(registry.clone().heartbeat_loop());
        Ok(registry)
    }

    /// Runs `op` against Redis with the command timeout; `None` (and an outage) on failure.
    async fn attempt<T, F>(&self, what: &str, op: F) -> Option<T>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        self.attempt_within(self.cfg.command_timeout(), what, op)
            .await
    }

    /// [`Self::attempt`] with its own time budget (for work of many commands).
    async fn attempt_within<T, F>(
        &self,
        budget: std::time::Duration,
        what: &str,
        op: F,
    ) -> Option<T>
    where
        F: Future<Output = Result<T, RedisError>>,
    {
        match tokio::time::timeout(budget, op).await {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) => {
                self.mark_down(what, &e.to_string());
                None
            }
            Err(_) => {
                self.mark_down(what, "timed out");
                None
            }
        }
    }

    /// Logs once per outage, not once per message.
    fn mark_down(&self, what: &str, why: &str) {
        if self.healthy.swap(false, Ordering::SeqCst) {
            warn!(node = %self.node_id, "redis unavailable ({what}: {why}); serving rooms from memory until it returns");
        } else {
            debug!("redis still unavailable ({what}: {why})");
        }
    }

    fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::SeqCst)
    }

    fn member_keys(&self, m: &Member) -> Vec<String> {
        let mut keys = vec![USERS.to_owned(), sessions_key(&self.node_id)];
        if let Some(room) = &m.room_id {
            keys.push(format!("{ROOM_PREFIX}{room}"));
            keys.push(format!("{OWNER_PREFIX}{room}"));
        }
        keys
    }

    async fn write_join(&self, m: &Member) -> Result<(), RedisError> {
        let info = m
            .room_id
            .as_deref()
            .map(|room_id| {
                MemberInfo {
                    user_id: &m.user_id,
                    room_id,
                }
                .to_json()
            })
            .unwrap_or_default();
        let mut inv = self.scripts.join.prepare_invoke();
        for k in self.member_keys(m) {
            inv.key(k);
        }
        inv.arg(&m.user_id)
            .arg(&m.token)
            .arg(session_entry(m))
            .arg(info);
        let _: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn write_leave(&self, m: &Member) -> Result<(), RedisError> {
        let mut inv = self.scripts.leave.prepare_invoke();
        for k in self.member_keys(m) {
            inv.key(k);
        }
        inv.arg(&m.user_id).arg(&m.token).arg(session_entry(m));
        let _: i64 = inv.invoke_async(&mut self.conn.clone()).await?;
        Ok(())
    }

    async fn reap(&self, node: &str) -> Result<Vec<Reaped>, RedisError> {
        let flat: Vec<String> = self
            .scripts
            .reap
            .key(USERS)
            .key(NODES)
            .key(sessions_key(node))
            .key(heartbeat_key(node))
            .arg(node)
            .arg(ROOM_PREFIX)
            .arg(OWNER_PREFIX)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(flat
            .chunks_exact(2)
            .map(|p| Reaped {
                room_id: p[0].clone(),
                user_id: p[1].clone(),
            })
            .collect())
    }

    /// Refreshes the heartbeat; `true` when the key had been lost (expired or Redis restarted),
    /// which means Redis may have lost or reaped this node's entries.
    async fn beat(&self) -> Result<bool, RedisError> {
        let now = crate::unix_ms();

        let mut conn = self.conn.clone();
        let previous: Option<String> = redis::cmd("SET")
            .arg(heartbeat_key(&self.node_id))
            .arg(now.to_string())
            .arg("PX")
            .arg(self.cfg.node_ttl_ms)
            .arg("GET")
            .query_async(&mut conn)
            .await?;
        let _: i64 = conn.sadd(NODES, &self.node_id).await?;
        Ok(previous.is_none())
    }

    /// Makes Redis hold exactly this node's current connections.
    async fn resync(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let stored: HashSet<String> = conn.smembers(sessions_key(&self.node_id)).await?;
        let current = self.local.snapshot();
        let current_entries: HashSet<String> = current.iter().map(session_entry).collect();
        for stale in stored.difference(&current_entries) {
            let mut parts = stale.splitn(3, '\n');
            let (Some(token), Some(user), Some(room)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let m = Member {
                user_id: user.to_owned(),
                room_id: Some(room.to_owned()).filter(|r| !r.is_empty()),
                token: token.to_owned(),
            };
            self.write_leave(&m).await?;
        }
        for m in &current {
            self.write_join(m).await?;
        }
        Ok(())
    }

    async fn sweep_dead_nodes(&self) -> Result<(), RedisError> {
        let mut conn = self.conn.clone();
        let nodes: Vec<String> = conn.smembers(NODES).await?;
        for node in nodes.iter().filter(|n| **n != self.node_id) {
            let alive: bool = conn.exists(heartbeat_key(node)).await?;
            if alive {
                continue;
            }
            let freed = self.reap(node).await?;
            info!(dead_node = %node, members = freed.len(), "removed a dead node's room members");
            let _ = self.reaped.send(DeadNode {
                node: node.clone(),
                members: freed,
            });
        }
        Ok(())
    }

    async fn tick(&self) {
        let Some(lost) = self.attempt("heartbeat", self.beat()).await else {
            return;
        };
        if lost || !self.is_healthy() {
            let _writes = self.writes.lock().await;
            // One command timeout per entry to write (and one for reading the node's set).
            let entries = self.local.snapshot().len() as u32 + 1;
            let budget = self.cfg.command_timeout() * entries.saturating_mul(2);
            if self
                .attempt_within(budget, "resync", self.resync())
                .await
                .is_none()
            {
                return;
            }
            if !self.healthy.swap(true, Ordering::SeqCst) {
                info!(node = %self.node_id, "redis available; room registry written");
            }
        }
        self.attempt("sweep", self.sweep_dead_nodes()).await;
    }

    async fn heartbeat_loop(self: Arc<Self>) {
        let period = self.cfg.heartbeat();
        let mut every = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = every.tick() => self.tick().await,
            }
        }
    }
}

#[async_trait]
impl RoomRegistry for RedisRegistry {
    async fn join(&self, member: &Member) {
        let _writes = self.writes.lock().await;
        self.local.join_now(member);
        if self.is_healthy() {
            self.attempt("join", self.write_join(member)).await;
        }
    }

    async fn leave(&self, member: &Member) {
        let _writes = self.writes.lock().await;
        self.local.leave_now(member);
        if self.is_healthy() {
            self.attempt("leave", self.write_leave(member)).await;
        }
    }

    async fn room_members(&self, room_id: &str) -> RoomListing {
        if self.is_healthy() {
            let key = format!("{ROOM_PREFIX}{room_id}");
            let read = async {
                let mut conn = self.conn.clone();
                // Pairs, not a map: keeps Redis's field order, as node-redis returned it.
                let pairs: RoomListing = conn.hgetall(key).await?;
                Ok(pairs)
            };
            if let Some(pairs) = self.attempt("roomUserList", read).await {
                return pairs;
            }
        }
        self.local.members_now(room_id)
    }

    async fn room_nodes(&self, room_id: &str) -> Vec<String> {
        if self.is_healthy() {
            let key = format!("{OWNER_PREFIX}{room_id}");
            let read = async {
                let mut conn = self.conn.clone();
                let tokens: Vec<String> = conn.hvals(key).await?;
                Ok(tokens)
            };
            if let Some(tokens) = self.attempt("room nodes", read).await {
                return super::memory::nodes_of(tokens.iter());
            }
        }
        self.local.nodes_now(room_id)
    }

    async fn is_online(&self, user_id: &str) -> bool {
        if self.local.is_online_now(user_id) {
            return true;
        }
        if !self.is_healthy() {
            return false;
        }
        let read = async {
            let mut conn = self.conn.clone();
            let exists: bool = conn.hexists(USERS, user_id).await?;
            Ok(exists)
        };
        self.attempt("is_online", read).await.unwrap_or(false)
    }

    async fn shutdown(&self) {
        self.stop.cancel();
        let leave_all = async {
            let mut conn = self.conn.clone();
            let _: i64 = conn.del(heartbeat_key(&self.node_id)).await?;
            self.reap(&self.node_id).await
        };
        if let Some(freed) = self.attempt("shutdown", leave_all).await {
            info!(node = %self.node_id, members = freed.len(), "removed this node's entries from redis");
        }
    }
}
