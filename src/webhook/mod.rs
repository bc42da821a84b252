//! Webhooks: a JSON POST to every configured URL for each room, participant, track and recording
//! event (README "Webhooks"). Emitting never waits: each URL has a bounded queue (a full queue
//! drops the event and counts it) and a task that delivers its events in order, retrying with
//! backoff; a slow or dead receiver delays only its own queue.

mod deliver;
pub mod event;

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::warn;

use crate::config::WebhookConfig;
pub use event::Event;

/// Delivery counters, for /healthz and tests.
#[derive(Debug, Default)]
pub struct WebhookStats {
    /// Events queued for a URL (one per event and URL).
    pub queued: AtomicU64,
    pub delivered: AtomicU64,
    /// Attempts that failed and were tried again.
    pub retried: AtomicU64,
    /// Events given up after every attempt failed.
    pub failed: AtomicU64,
    /// Events not queued because the URL's queue was full.
    pub dropped: AtomicU64,
}

/// The handle signaling, the media plane and recorders emit events through (cheap to clone).
#[derive(Clone, Default)]
pub struct Webhooks {
    inner: Option<Arc<Inner>>,
}

struct Inner {
    queues: Vec<mpsc::Sender<Bytes>>,
    stats: Arc<WebhookStats>,
    node_id: String,
    /// Members per room on this node: a room starts with its first and finishes with its last.
    rooms: Mutex<HashMap<String, HashSet<String>>>,
}

impl Webhooks {
    /// Starts a delivery task per URL (on the current tokio runtime); none configured: a handle
    /// that does nothing.
    pub fn start(config: &WebhookConfig, node_id: &str) -> anyhow::Result<Webhooks> {
        if config.urls.is_empty() {
            return Ok(Webhooks::default());
        }
        if config.secret.is_empty() {
            anyhow::bail!(
                "webhook.urls is set but webhook.secret is empty: requests must be signed"
            );
        }
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(config.timeout_ms))
            .build()?;
        let stats = Arc::new(WebhookStats::default());
        let mut queues = Vec::new();
        for url in &config.urls {
            let url = reqwest::Url::parse(url)
                .map_err(|e| anyhow::anyhow!("webhook.urls: {url:?} is not a URL: {e}"))?;
            let (tx, rx) = mpsc::channel(config.queue.max(1));
            tokio::spawn(deliver::run(deliver::Target {
                url,
                client: client.clone(),
                secret: config.secret.clone(),
                attempts: config.attempts.max(1),
                stats: stats.clone(),
                events: rx,
            }));
            queues.push(tx);
        }
        Ok(Webhooks {
            inner: Some(Arc::new(Inner {
                queues,
                stats,
                node_id: node_id.to_owned(),
                rooms: Mutex::new(HashMap::new()),
            })),
        })
    }

    pub fn stats(&self) -> Option<&WebhookStats> {
        self.inner.as_deref().map(|i| &*i.stats)
    }

    /// Queues `event` for every URL; never waits.
    pub fn emit(&self, event: Event) {
        let Some(inner) = &self.inner else {
            return;
        };
        let body = Bytes::from(event.to_json(&inner.node_id));
        for queue in &inner.queues {
            match queue.try_send(body.clone()) {
                Ok(()) => inner.stats.queued.fetch_add(1, Ordering::Relaxed),
                Err(_) => {
                    if inner.stats.dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!("a webhook queue is full: events are dropped (counted in /healthz)");
                    }
                    0
                }
            };
        }
    }

    /// A user joined `room` on this node (`room_started` first if it was empty here).
    pub fn participant_joined(&self, room: &str, user: &str) {
        let Some(inner) = &self.inner else {
            return;
        };
        // Queued under the lock: two members joining or leaving at once must not have their
        // events overtake each other (`room_finished` before the other's `participant_left`).
        let mut rooms = inner.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let members = rooms.entry(room.to_owned()).or_default();
        let first = members.is_empty();
        if !members.insert(user.to_owned()) {
            return; // a reconnection: the user never left
        }
        if first {
            self.emit(Event::RoomStarted { room: room.into() });
        }
        self.emit(Event::ParticipantJoined {
            room: room.into(),
            user: user.into(),
        });
    }

    /// A user left `room` on this node (`room_finished` after it if it is now empty here).
    pub fn participant_left(&self, room: &str, user: &str) {
        let Some(inner) = &self.inner else {
            return;
        };
        let mut rooms = inner.rooms.lock().unwrap_or_else(|e| e.into_inner());
        let Some(members) = rooms.get_mut(room) else {
            return;
        };
        if !members.remove(user) {
            return;
        }
        let last = members.is_empty();
        if last {
            rooms.remove(room);
        }
        // Under the lock, as in `participant_joined`.
        self.emit(Event::ParticipantLeft {
            room: room.into(),
            user: user.into(),
        });
        if last {
            self.emit(Event::RoomFinished { room: room.into() });
        }
    }

    /// Waits (up to `limit`) until every queued event was delivered or given up (graceful stop).
    pub async fn flush(&self, limit: Duration) {
        let Some(inner) = &self.inner else {
            return;
        };
        let s = &inner.stats;
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            let done = s.delivered.load(Ordering::Relaxed) + s.failed.load(Ordering::Relaxed);
            if done >= s.queued.load(Ordering::Relaxed) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(urls: &[&str], secret: &str) -> WebhookConfig {
        WebhookConfig {
            urls: urls.iter().map(|u| u.to_string()).collect(),
            secret: secret.into(),
            queue: 4,
            attempts: 1,
            timeout_ms: 100,
        }
    }

    #[tokio::test]
    async fn unsigned_or_malformed_configurations_are_refused() {
        let unsigned = Webhooks::start(&config(&["http://127.0.0.1:9/h"], ""), "n");
        assert!(
            unsigned
                .err()
                .unwrap()
                .to_string()
                .contains("webhook.secret")
        );
        let malformed = Webhooks::start(&config(&["not a url"], "s"), "n");
        assert!(malformed.err().unwrap().to_string().contains("not a URL"));
        let none = Webhooks::start(&config(&[], ""), "n").unwrap();
        assert!(none.stats().is_none(), "no URLs: nothing runs");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts_instead_of_waiting() {
        // Nothing listens on port 9 of loopback (discard) and one attempt each: the task is
        // busy with the first event while the rest fill the 4-slot queue.
        let hooks = Webhooks::start(&config(&["http://127.0.0.1:9/h"], "s"), "n").unwrap();
        for _ in 0..20 {
            hooks.emit(Event::RoomStarted { room: "r".into() });
        }
        let stats = hooks.stats().unwrap();
        let (queued, dropped) = (
            stats.queued.load(Ordering::Relaxed),
            stats.dropped.load(Ordering::Relaxed),
        );
        assert_eq!(queued + dropped, 20);
        assert!(dropped >= 15, "queued {queued}, dropped {dropped}");
    }

    #[test]
    fn rooms_start_with_their_first_member_and_finish_with_their_last() {
        let (tx, mut rx) = mpsc::channel(64);
        let hooks = Webhooks {
            inner: Some(Arc::new(Inner {
                queues: vec![tx],
                stats: Default::default(),
                node_id: "n".into(),
                rooms: Default::default(),
            })),
        };
        hooks.participant_joined("r", "a");
        hooks.participant_joined("r", "b");
        hooks.participant_joined("r", "a"); // a reconnection: not a second join
        hooks.participant_left("r", "a");
        hooks.participant_left("r", "a"); // already gone
        hooks.participant_left("r", "b");
        let mut names = Vec::new();
        while let Ok(body) = rx.try_recv() {
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            names.push(format!(
                "{} {}",
                v["event"].as_str().unwrap(),
                v["userId"].as_str().unwrap_or("-")
            ));
        }
        assert_eq!(
            names,
            [
                "room_started -",
                "participant_joined a",
                "participant_joined b",
                "participant_left a",
                "participant_left b",
                "room_finished -"
            ]
        );
    }
}
