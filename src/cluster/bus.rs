//! The cross-node bus: one Redis pub/sub channel that every node publishes to and reads from.
//!
//! Why not socketioxide-redis: its broadcast publishes to Redis first and returns early when that
//! fails, skipping the local delivery (socketioxide-redis 0.4.4, `broadcast`), so a Redis outage
//! would stop signaling even between users of one node. Here local delivery never touches Redis;
//! the bus only carries what other nodes must deliver, from a bounded queue that a background
//! task publishes and retries, so a slow Redis never stalls a handler.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;

use futures_util::StreamExt;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

const CHANNEL: &str = "switchboard:bus";
/// Deliveries waiting for Redis; beyond this, new ones are dropped (logged once per overflow).
const QUEUE: usize = 16_384;
const RETRY: Duration = Duration::from_millis(200);

/// What one node asks the others to do.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum BusEvent {
    /// Emit `msg` with this payload to the room's members connected to the receiving node.
    Room {
        room_id: String,
        payload: rmpv::Value,
    },
    /// Emit `msg` with this payload to the user if connected to the receiving node.
    User {
        user_id: String,
        payload: rmpv::Value,
    },
    /// The user connected again (`token`, in `room_id`): close any other connection of theirs.
    Replace {
        user_id: String,
        token: String,
        room_id: Option<String>,
    },
    /// Media across nodes: rooms, pipes, tracks (`crate::sfu::pipes`).
    Media(super::MediaEvent),
    /// Never on the wire: this node's subscription came back after a loss, and what other
    /// nodes published meanwhile did not reach it.
    Resubscribed,
}

#[derive(Serialize, Deserialize)]
struct Frame {
    origin: String,
    event: BusEvent,
}

pub struct Bus {
    origin: String,
    queue: mpsc::Sender<Vec<u8>>,
    full: AtomicBool,
    /// Bytes of the frames waiting in `queue`, and the most allowed (`redis.bus_queue_bytes`).
    queued_bytes: Arc<AtomicUsize>,
    max_queued_bytes: usize,
    /// Frames dropped because the queue was full.
    pub dropped: AtomicU64,
}

impl Bus {
    /// Starts the publisher and the subscriber; events from other nodes arrive on `incoming`.
    /// Waits (at most `timeout`) for the first subscription, so that a node that has started
    /// hears its peers; without Redis it starts anyway and keeps trying.
    pub async fn start(
        url: &str,
        origin: &str,
        timeout: Duration,
        max_queued_bytes: usize,
        incoming: mpsc::Sender<BusEvent>,
        stop: CancellationToken,
    ) -> anyhow::Result<Arc<Bus>> {
        let client = redis::Client::open(url)?;
        let conn_cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(timeout))
            .set_response_timeout(Some(timeout))
            .set_number_of_retries(1);
        let conn = ConnectionManager::new_lazy_with_config(client.clone(), conn_cfg)?;
        let (queue, rx) = mpsc::channel(QUEUE);
        let queued_bytes = Arc::new(AtomicUsize::new(0));
        tokio::spawn(publish_loop(conn, rx, queued_bytes.clone(), stop.clone()));
        let (subscribed_tx, subscribed) = tokio::sync::oneshot::channel();
        tokio::spawn(subscribe_loop(
            client,
            origin.to_owned(),
            incoming,
            timeout,
            stop,
            subscribed_tx,
        ));
        let _ = tokio::time::timeout(timeout, subscribed).await;
        Ok(Arc::new(Bus {
            origin: origin.to_owned(),
            queue,
            full: AtomicBool::new(false),
            queued_bytes,
            max_queued_bytes,
            dropped: AtomicU64::new(0),
        }))
    }

    /// Bytes waiting to be published.
    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Queues an event for the other nodes. Never waits.
    pub fn publish(&self, event: BusEvent) {
        let frame = Frame {
            origin: self.origin.clone(),
            event,
        };
        let bytes = match rmp_serde::to_vec(&frame) {
            Ok(b) => b,
            Err(e) => {
                warn!("bus: cannot encode event: {e}");
                return;
            }
        };
        let size = bytes.len();
        // Bounded in bytes as well as in frames: a frame may be a 1 MB message.
        let queued = self.queued_bytes.fetch_add(size, Ordering::Relaxed);
        let sent = queued + size <= self.max_queued_bytes && self.queue.try_send(bytes).is_ok();
        if sent {
            if self.full.swap(false, Ordering::Relaxed) {
                info!("bus: queue has room again");
            }
            return;
        }
        self.queued_bytes.fetch_sub(size, Ordering::Relaxed);
        self.dropped.fetch_add(1, Ordering::Relaxed);
        if !self.full.swap(true, Ordering::Relaxed) {
            warn!(
                "bus: {} bytes in {} deliveries waiting for redis (redis.bus_queue_bytes is {}); dropping new ones",
                queued,
                QUEUE - self.queue.capacity(),
                self.max_queued_bytes
            );
        }
    }
}

async fn publish_loop(
    mut conn: ConnectionManager,
    mut rx: mpsc::Receiver<Vec<u8>>,
    queued_bytes: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let mut down = false;
    while let Some(frame) = tokio::select! {
        _ = stop.cancelled() => None,
        f = rx.recv() => f,
    } {
        loop {
            let sent: redis::RedisResult<i64> = redis::cmd("PUBLISH")
                .arg(CHANNEL)
                .arg(&frame)
                .query_async(&mut conn)
                .await;
            match sent {
                Ok(_) => {
                    queued_bytes.fetch_sub(frame.len(), Ordering::Relaxed);
                    if std::mem::take(&mut down) {
                        info!("bus: publishing to redis again");
                    }
                    break;
                }
                Err(e) => {
                    if !std::mem::replace(&mut down, true) {
                        warn!("bus: cannot publish ({e}); holding deliveries until redis returns");
                    }
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(RETRY) => {}
                    }
                }
            }
        }
    }
}

async fn subscribe_loop(
    client: redis::Client,
    origin: String,
    incoming: mpsc::Sender<BusEvent>,
    timeout: Duration,
    stop: CancellationToken,
    subscribed: tokio::sync::oneshot::Sender<()>,
) {
    let mut subscribed = Some(subscribed);
    let mut down = false;
    loop {
        let connect = async {
            let mut pubsub = client.get_async_pubsub().await?;
            pubsub.subscribe(CHANNEL).await?;
            redis::RedisResult::Ok(pubsub)
        };
        match tokio::time::timeout(timeout, connect).await {
            Ok(Ok(pubsub)) => {
                let first = subscribed.is_some();
                if std::mem::take(&mut down) {
                    info!("bus: subscribed again");
                }
                if let Some(tx) = subscribed.take() {
                    let _ = tx.send(());
                }
                // What others published meanwhile is lost for this node: it asks again.
                if !first && incoming.send(BusEvent::Resubscribed).await.is_err() {
                    return;
                }
                let mut messages = pubsub.into_on_message();
                loop {
                    let msg = tokio::select! {
                        _ = stop.cancelled() => return,
                        m = messages.next() => m,
                    };
                    let Some(msg) = msg else {
                        warn!("bus: subscription lost; reconnecting");
                        break;
                    };
                    match rmp_serde::from_slice::<Frame>(msg.get_payload_bytes()) {
                        // Waits while the node is behind: the subscription then stops reading
                        // and Redis holds (or, past its pub/sub buffer limit, drops) the rest.
                        Ok(frame) if frame.origin != origin => {
                            if incoming.send(frame.event).await.is_err() {
                                return;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => debug!("bus: ignoring an undecodable frame: {e}"),
                    }
                }
            }
            Ok(Err(e)) if !down => warn!("bus: cannot subscribe ({e}); retrying"),
            Err(_) if !down => warn!("bus: subscribing timed out; retrying"),
            _ => {}
        }
        down = true;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_keep_binary_and_key_order() {
        let payload = rmpv::Value::Map(vec![
            (rmpv::Value::from("z"), rmpv::Value::Binary(vec![0, 255, 7])),
            (rmpv::Value::from("a"), rmpv::Value::from("中文")),
        ]);
        let frame = Frame {
            origin: "n1".into(),
            event: BusEvent::Room {
                room_id: "R".into(),
                payload: payload.clone(),
            },
        };
        let back: Frame = rmp_serde::from_slice(&rmp_serde::to_vec(&frame).unwrap()).unwrap();
        assert_eq!(back.origin, "n1");
        assert_eq!(
            back.event,
            BusEvent::Room {
                room_id: "R".into(),
                payload
            }
        );
    }
}
