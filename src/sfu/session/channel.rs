//! Data channels: a channel a member opens on its publisher connection is relayed to every other
//! member as a channel of the same label on their subscriber connection, with the sender's userId
//! as `protocol` and the same reliability settings; messages pass byte for byte.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use tracing::{debug, warn};
use webrtc::data_channel::{DataChannel, DataChannelEvent, RTCDataChannelInit};

/// A publisher's channel and its copies on the other members' subscriber connections.
pub struct ChannelSource {
    pub owner: String,
    pub label: String,
    /// The settings the copies are created with (`protocol` = the owner's userId).
    pub init: RTCDataChannelInit,
    copies: Mutex<Vec<Copy>>,
    /// Ends the copies' drain tasks when the source goes.
    ended: tokio_util::sync::CancellationToken,
}

struct Copy {
    /// The media session (signaling connection token) whose subscriber connection has it.
    session: String,
    channel: Arc<dyn DataChannel>,
}

impl ChannelSource {
    /// Reads the publisher channel's settings.
    pub async fn new(owner: &str, channel: &Arc<dyn DataChannel>) -> ChannelSource {
        let label = channel.label().await.unwrap_or_default();
        let init = RTCDataChannelInit {
            ordered: channel.ordered().await.unwrap_or(true),
            max_packet_life_time: channel.max_packet_life_time().await.ok().flatten(),
            max_retransmits: channel.max_retransmits().await.ok().flatten(),
            protocol: owner.to_owned(),
            negotiated: None,
        };
        ChannelSource {
            owner: owner.to_owned(),
            label,
            init,
            copies: Mutex::new(Vec::new()),
            ended: tokio_util::sync::CancellationToken::new(),
        }
    }

    /// Registers a copy made on a session's subscriber connection and keeps it polled; `false`
    /// (the caller closes the copy) when the source has ended meanwhile.
    pub fn add_copy(&self, session: &str, channel: Arc<dyn DataChannel>) -> bool {
        let mut copies = self.copies.lock().unwrap();
        if self.ended.is_cancelled() {
            return false;
        }
        tokio::spawn(drain(channel.clone(), self.ended.clone()));
        copies.push(Copy {
            session: session.to_owned(),
            channel,
        });
        true
    }

    /// Forgets (and closes) the copy on a session's connection.
    pub async fn remove_copies_of(&self, session: &str) {
        let removed: Vec<Arc<dyn DataChannel>> = {
            let mut copies = self.copies.lock().unwrap();
            let (gone, kept) = copies.drain(..).partition(|c| c.session == session);
            *copies = kept;
            gone.into_iter().map(|c| c.channel).collect()
        };
        for channel in removed {
            let _ = channel.close().await;
        }
    }

    pub fn has_copy_for(&self, session: &str) -> bool {
        self.copies
            .lock()
            .unwrap()
            .iter()
            .any(|c| c.session == session)
    }

    /// Relays the publisher's messages until its channel closes; then closes every copy.
    /// A copy whose send buffer is full (its subscriber lags) misses the message, counted in
    /// `dropped`: waiting would hold every other copy back, queuing would grow without bound.
    pub async fn relay(self: Arc<Self>, channel: Arc<dyn DataChannel>, dropped: &AtomicU64) {
        while let Some(event) = channel.poll().await {
            match event {
                DataChannelEvent::OnMessage(message) => {
                    let targets: Vec<Arc<dyn DataChannel>> = self
                        .copies
                        .lock()
                        .unwrap()
                        .iter()
                        .map(|c| c.channel.clone())
                        .collect();
                    for target in targets {
                        let sent = if message.is_string {
                            match std::str::from_utf8(&message.data) {
                                Ok(text) => target.try_send_text(text).await,
                                Err(_) => target.try_send(message.data.clone()).await,
                            }
                        } else {
                            target.try_send(BytesMut::from(&message.data[..])).await
                        };
                        match sent {
                            Ok(()) => {}
                            Err(webrtc::error::Error::ErrSendBufferFull) => {
                                if dropped.fetch_add(1, Ordering::Relaxed) == 0 {
                                    warn!(label = %self.label, "a subscriber's data channel is full: messages to it are dropped");
                                }
                            }
                            // Not open yet, or closing: that member misses this message.
                            Err(e) => debug!(label = %self.label, "data channel relay: {e}"),
                        }
                    }
                }
                DataChannelEvent::OnClose => break,
                _ => {}
            }
        }
        let copies: Vec<Arc<dyn DataChannel>> = {
            // Ended under the lock that add_copy checks it under: no copy is added after this.
            let mut copies = self.copies.lock().unwrap();
            self.ended.cancel();
            copies.drain(..).map(|c| c.channel).collect()
        };
        for copy in copies {
            let _ = copy.close().await;
        }
    }
}

/// Every channel must be polled, or webrtc stops reading its association.
async fn drain(channel: Arc<dyn DataChannel>, ended: tokio_util::sync::CancellationToken) {
    loop {
        let event = tokio::select! {
            _ = ended.cancelled() => return,
            event = channel.poll() => event,
        };
        if matches!(event, None | Some(DataChannelEvent::OnClose)) {
            return;
        }
    }
}
