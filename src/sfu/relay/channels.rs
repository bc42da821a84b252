//! Data channels: a channel a member opens on its publisher connection is relayed to every
//! other member of the room as a channel of the same label on their subscriber connection, with
//! the sender's userId as `protocol` and the same reliability settings; messages pass byte for
//! byte. A copy whose subscriber stops acknowledging misses messages once it holds
//! `media.data_channel_buffer_bytes`: waiting would hold back everyone else, queuing would grow
//! without bound.

use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::BytesMut;
use rtc::data_channel::{RTCDataChannelId, RTCDataChannelInit, RTCDataChannelMessage};
use tracing::{debug, info, warn};

use super::{ChannelCopy, ChannelOrigin, ChannelSource, MediaState};
use crate::sfu::api::{PcKind, SfuError, SfuEvent};
use crate::sfu::peer::ConnKey;

impl MediaState {
    pub(super) fn on_channel_open(&mut self, key: ConnKey, id: RTCDataChannelId, now: Instant) {
        let conn = &mut self.conns[key];
        if conn.kind == PcKind::Subscriber {
            match conn.channel(id) {
                Some(c) => {
                    if let Some(copy) = self.channels[c]
                        .copies
                        .iter_mut()
                        .find(|copy| copy.conn == key && copy.id == id)
                    {
                        copy.open = true;
                    }
                }
                None => {
                    debug!(user = %conn.user, "ignoring a channel opened on the subscriber connection")
                }
            }
            return;
        }
        let Some(dc) = conn.pc.data_channel(id) else {
            return;
        };
        let user = conn.user.clone();
        let label = dc.label().to_owned();
        let init = RTCDataChannelInit {
            ordered: dc.ordered(),
            max_packet_life_time: dc.max_packet_life_time(),
            max_retransmits: dc.max_retransmits(),
            protocol: user.clone(),
            negotiated: None,
        };
        let Some((room, session)) = self
            .members
            .get(&user)
            .map(|m| (m.room.clone(), m.session.clone()))
        else {
            return;
        };
        // A member opens at most `max_channels` (each is copied to every other member).
        let opened = self
            .channels
            .iter()
            .filter(|(_, c)| c.owner == user)
            .count();
        if opened >= self.settings.max_channels {
            let limit = self.settings.max_channels;
            if let Some(mut dc) = self.conns[key].pc.data_channel(id) {
                let _ = dc.close();
            }
            self.mark_dirty(key);
            self.shared
                .stats
                .channels_refused
                .fetch_add(1, Ordering::Relaxed);
            warn!(%user, %label, limit, "data channel refused: too many data channels");
            self.emit(SfuEvent::TrackRefused {
                user_id: user,
                session,
                error: SfuError::TooManyChannels(limit),
            });
            return;
        }
        let c = self.channels.insert(ChannelSource {
            owner: user.clone(),
            room: room.clone(),
            origin: ChannelOrigin::Local { conn: key, id },
            key: crate::random_u64(),
            label: label.clone(),
            init,
            copies: Vec::new(),
        });
        self.conns[key].channels.push((id, c));
        let r = self.rooms.entry(room).or_default();
        r.channels.push(c);
        let others: Vec<String> = r.members.iter().filter(|u| **u != user).cloned().collect();
        info!(%user, %label, "data channel published");
        for other in others {
            self.add_copy(&other, c, now);
        }
        self.announce_channel(c);
    }

    /// Creates the copy of a channel on a member's subscriber connection.
    pub(super) fn add_copy(&mut self, user: &str, c: usize, now: Instant) {
        let (Some(m), Some(source)) = (self.members.get_mut(user), self.channels.get_mut(c)) else {
            return;
        };
        if source.owner == user || source.copies.iter().any(|copy| copy.user == user) {
            return;
        }
        let conn = &mut self.conns[m.subscriber];
        let id = match conn
            .pc
            .create_data_channel(&source.label, Some(source.init.clone()))
        {
            Ok(dc) => dc.id(),
            Err(e) => {
                warn!(%user, label = %source.label, "cannot create the relayed channel: {e}");
                return;
            }
        };
        conn.channels.push((id, c));
        source.copies.push(ChannelCopy {
            user: user.to_owned(),
            conn: m.subscriber,
            id,
            open: false,
        });
        // The first channel adds the data section to the subscriber connection; later ones
        // open in-band.
        let (sub, first) = (m.subscriber, !m.has_channels);
        m.has_channels = true;
        if first {
            self.renegotiate(user, now);
        }
        self.mark_dirty(sub);
    }

    pub(super) fn on_channel_message(
        &mut self,
        key: ConnKey,
        id: RTCDataChannelId,
        message: RTCDataChannelMessage,
        now: Instant,
    ) {
        let conn = &self.conns[key];
        if conn.kind != PcKind::Publisher {
            return; // a message on a copy or a channel of the subscriber connection: not relayed
        }
        let Some(c) = conn.channel(id) else {
            return;
        };
        if message.data.len() > self.settings.max_data_message {
            let stats = &self.shared.stats;
            if stats
                .data_messages_too_large
                .fetch_add(1, Ordering::Relaxed)
                == 0
            {
                warn!(user = %conn.user, size = message.data.len(), "a data-channel message over media.max_data_message_bytes: not relayed");
            }
            return;
        }
        self.announce_message(c, &message);
        self.relay_message(c, &message, now);
    }

    /// Sends a message to every open copy of channel `c` here.
    pub(super) fn relay_message(
        &mut self,
        c: usize,
        message: &RTCDataChannelMessage,
        now: Instant,
    ) {
        let limit = self.data_channel_limit;
        let mut touched = Vec::new();
        let mut dropped = 0;
        for copy in self.channels[c].copies.iter().filter(|copy| copy.open) {
            let Some(mut dc) = self
                .conns
                .get_mut(copy.conn)
                .and_then(|sub| sub.pc.data_channel(copy.id))
            else {
                continue;
            };
            if dc.outstanding_bytes() + message.data.len() > limit {
                dropped += 1;
                continue;
            }
            let sent = match (message.is_string, std::str::from_utf8(&message.data)) {
                (true, Ok(text)) => dc.send_text(now, text),
                _ => dc.send(now, BytesMut::from(&message.data[..])),
            };
            match sent {
                Ok(()) => touched.push(copy.conn),
                // Closing, or too large for that subscriber: it misses this message.
                Err(e) => debug!(label = %self.channels[c].label, "data channel relay: {e}"),
            }
        }
        for _ in 0..dropped {
            if self.count_dropped_message() {
                warn!(label = %self.channels[c].label, "a subscriber's data channel is full: messages to it are dropped");
            }
        }
        for k in touched {
            self.mark_dirty(k);
        }
    }

    pub(super) fn on_channel_close(&mut self, key: ConnKey, id: RTCDataChannelId, now: Instant) {
        let conn = &mut self.conns[key];
        let Some(c) = conn.channel(id) else {
            return;
        };
        conn.channels.retain(|(i, _)| *i != id);
        if conn.kind == PcKind::Publisher {
            self.remove_channel(c, now);
        } else if let Some(source) = self.channels.get_mut(c) {
            source
                .copies
                .retain(|copy| !(copy.conn == key && copy.id == id));
        }
    }

    /// A published channel ended: its copies close.
    pub(super) fn remove_channel(&mut self, c: usize, _now: Instant) {
        self.announce_channel_down(c);
        let Some(source) = self.channels.try_remove(c) else {
            return;
        };
        for copy in &source.copies {
            if let Some(sub) = self.conns.get_mut(copy.conn) {
                sub.channels.retain(|(i, k)| !(*i == copy.id && *k == c));
                if let Some(mut dc) = sub.pc.data_channel(copy.id) {
                    let _ = dc.close();
                }
            }
        }
        for copy in &source.copies {
            self.mark_dirty(copy.conn);
        }
        if let ChannelOrigin::Local { conn, .. } = source.origin
            && let Some(conn) = self.conns.get_mut(conn)
        {
            conn.channels.retain(|(_, k)| *k != c);
        }
        if let Some(r) = self.rooms.get_mut(&source.room) {
            r.channels.retain(|&x| x != c);
        }
        debug!(user = %source.owner, label = %source.label, "data channel ended");
    }
}
