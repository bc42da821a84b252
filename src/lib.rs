//! switchboard: an SFU media server with socket.io room signaling, wire-compatible with the
//! original Node.js signaling server. [`Server`] runs it in-process (tests use ephemeral ports);
//! `src/main.rs` is only the command line around it.

pub mod auth;
pub mod cluster;

pub mod config;
pub mod http;
pub mod load;
pub mod record;
pub mod room;
pub mod sfu;
pub mod signal;
pub mod webhook;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use axum::serve::ListenerExt;
use socketioxide::SocketIo;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use cluster::Bus;
use config::Config;
use room::{MemoryRegistry, RedisRegistry, RoomRegistry, Rooms};
use sfu::Sfu;
use signal::Signal;
use signal::deliver::Outbox;

/// A running switchboard node.
pub struct Server {
    addr: SocketAddr,
    node_id: String,
    io: SocketIo,
    signal: Arc<Signal>,
    stop: CancellationToken,
    http: JoinHandle<std::io::Result<()>>,
}

impl Server {
    /// Binds `config.server.listen` and starts serving.
    pub async fn start(config: Config) -> anyhow::Result<Server> {
        Server::start_with(config, Vec::new()).await
    }

    /// [`Server::start`], with media sinks of the caller's own: each factory is asked, for
    /// every track published on this node, whether it wants the track's frames (see
    /// [`record::MediaSink`]).
    ///
    /// ```no_run
    /// use std::sync::Arc;
    /// use switchboard::record::{Frame, MediaSink, SinkFactory, TrackMeta};
    ///
    /// /// Counts the audio frames of every track (a speech recognizer would take them here).
    /// struct AudioFrames(u64);
    ///
    /// impl MediaSink for AudioFrames {
    ///     fn frame(&mut self, _frame: &Frame<'_>) -> std::io::Result<()> {
    ///         self.0 += 1;
    ///         Ok(())
    ///     }
    ///     fn finish(self: Box<Self>) -> std::io::Result<Option<std::path::PathBuf>> {
    ///         println!("{} audio frames", self.0);
    ///         Ok(None)
    ///     }
    /// }
    ///
    /// # async fn run() -> anyhow::Result<()> {
    /// let audio_only: SinkFactory = Arc::new(|meta: &TrackMeta| {
    ///     (!meta.codec.is_video()).then(|| Box::new(AudioFrames(0)) as Box<dyn MediaSink>)
    /// });
    /// let config = switchboard::config::Config::defaults();
    /// let server = switchboard::Server::start_with(config, vec![audio_only]).await?;
    /// # server.shutdown().await;
    /// # Ok(())
    /// # }
    /// ```
    pub async fn start_with(
        config: Config,
        media_sinks: Vec<record::SinkFactory>,
    ) -> anyhow::Result<Server> {
        let node_id = match config.server.node_id.trim() {
            "" => random_node_id(),
            id => id.to_owned(),
        };
        let auth = config.auth.verifier()?.map(Arc::new);
        if auth.is_none() {
            tracing::warn!(
                "auth is off: anyone can join any room as any user (set auth.secret or auth.public_key_file)"
            );
        }
        let stop = CancellationToken::new();
        // Events from other nodes waiting for this one: bounded, the bus waits past it.
        let (bus_tx, bus_rx) = mpsc::channel(4096);
        let (reaped_tx, reaped_rx) = mpsc::unbounded_channel();
        let (registry, bus): (Arc<dyn RoomRegistry>, _) = match config.redis.url() {
            None => (Arc::new(MemoryRegistry::new()), None),
            Some(url) => {
                let registry =
                    RedisRegistry::start(url, &node_id, &config.redis, reaped_tx).await?;
                let timeout = config.redis.command_timeout();
                let max_bytes = config.redis.bus_queue_bytes;
                let bus =
                    Bus::start(url, &node_id, timeout, max_bytes, bus_tx, stop.clone()).await?;
                (registry, Some(bus))
            }
        };

        let webhooks = webhook::Webhooks::start(&config.webhook, &node_id)?;
        let (sfu_tx, sfu_rx) = mpsc::unbounded_channel();
        let rooms = Arc::new(Rooms::new(registry));
        let sessions = rooms.clone();
        let is_current =
            Box::new(move |user: &str, session: &str| sessions.is_current(user, session));
        let signal = Arc::new(Signal {
            outbox: Outbox::new(rooms, bus.clone()),
            sfu: Sfu::start(
                &config.media,
                sfu_tx,
                is_current,
                Arc::new(record::Recordings::new(
                    config.recording.clone(),
                    media_sinks,
                    webhooks.clone(),
                )),
                sfu::ClusterLink {
                    node_id: node_id.clone(),
                    bus: bus.clone(),
                    relay_ip: config.cluster.relay_ip().map_err(anyhow::Error::msg)?,
                },
            )?,
            node_id: node_id.clone(),
            max_message_bytes: config.signal.max_message_bytes,
            max_room_members: config.signal.max_room_members,
            max_sdp_bytes: config.media.max_sdp_bytes,
            max_rooms_per_node: config.signal.max_rooms_per_node,
            budget: signal::limits::EventBudget::from_config(&config.signal),
            byte_budget: signal::limits::EventBudget::bytes_from_config(&config.signal),
            refused: Default::default(),
            auth,
            webhooks,
        });
        let (sio_layer, io) = SocketIo::builder()
            .max_payload(config.signal.max_transport_bytes)
            .ws_max_message_size(config.signal.max_transport_bytes as usize)
            .max_buffer_size(config.signal.max_buffer_packets)
            .with_state(signal.clone())
            .build_layer();
        signal.outbox.attach(io.clone());
        signal::install(&io, signal.clone(), bus_rx, reaped_rx, sfu_rx);

        let app = http::router(
            signal.clone(),
            config.media.ice_servers.clone(),
            &config.api.key,
        )
        .layer(sio_layer);
        // Small socket.io frames otherwise wait on Nagle + delayed ACK (tens of ms at p99).
        let listener = tokio::net::TcpListener::bind(config.server.listen)
            .await
            .with_context(|| format!("cannot listen on {}", config.server.listen))?;
        let addr = listener.local_addr()?;
        let listener = listener.tap_io(|tcp| {
            let _ = tcp.set_nodelay(true);
        });
        let shutdown = stop.clone();
        let http = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async move { shutdown.cancelled().await })
                .await
        });
        info!(%addr, node = %node_id, redis = config.redis.url().is_some(), "started");
        Ok(Server {
            addr,
            node_id,
            io,
            signal,
            stop,
            http,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// Graceful stop: every member leaves (rooms are told), the node's registry entries are
    /// removed at once, then the listener closes.
    pub async fn shutdown(self) {
        let rooms = self.signal.outbox.rooms.clone();
        // Disconnect sockets one by one: `SocketIo::close` alone skips the disconnect handlers.
        for sid in rooms.local_handles() {
            if let Some(socket) = self.io.get_socket(sid) {
                let _ = socket.disconnect();
            }
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while rooms.local_count() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        self.signal.sfu.shutdown().await;
        // What the stop itself caused (participants left, recordings finished) still goes out.
        self.signal.webhooks.flush(Duration::from_secs(5)).await;
        self.io.close().await;
        rooms.shutdown().await;
        // Give the bus a moment to publish the last leave envelopes.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(3), self.http).await;
        info!(node = %self.node_id, "stopped");
    }
}

fn random_node_id() -> String {
    format!("{:012x}", random_u64() & 0xffff_ffff_ffff)
}

/// Milliseconds since the Unix epoch (0 if the clock is before it).
pub(crate) fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A random number from the standard library's per-process hash keys, the clock and the pid
/// (ids and SSRCs need uniqueness, not cryptographic strength).
pub(crate) fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}
