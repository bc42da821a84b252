//! Data channels across nodes: a local member's channel is announced to the other nodes of
//! its room, which open copies of it on their members' connections as for a local channel;
//! its messages cross on the bus byte for byte, in order (the bus is FIFO per node).
//! Reliability across is Redis pub/sub's: delivered while Redis is up.

use std::time::Instant;

use bytes::Bytes;
use rtc::data_channel::{RTCDataChannelInit, RTCDataChannelMessage};
use tracing::info;

use super::{ChannelOrigin, ChannelSource, MediaState};
use crate::cluster::{MediaEvent, RemoteChannel};

impl ChannelSource {
    pub(super) fn remote(&self) -> RemoteChannel {
        RemoteChannel {
            key: self.key,
            owner: self.owner.clone(),
            label: self.label.clone(),
            ordered: self.init.ordered,
            max_packet_life_time: self.init.max_packet_life_time,
            max_retransmits: self.init.max_retransmits,
        }
    }

    pub fn is_local(&self) -> bool {
        matches!(self.origin, ChannelOrigin::Local { .. })
    }
}

impl MediaState {
    /// Whether channel `c` is local and its room has members on other nodes.
    fn crosses(&self, c: usize) -> bool {
        self.channels.get(c).is_some_and(|source| {
            source.is_local()
                && self
                    .rooms
                    .get(&source.room)
                    .is_some_and(|r| !r.nodes.is_empty())
        })
    }

    pub(super) fn announce_channel(&self, c: usize) {
        if !self.crosses(c) {
            return;
        }
        let source = &self.channels[c];
        let pipes = &self.shared.pipes;
        pipes.publish(MediaEvent::ChannelUp {
            room: source.room.clone(),
            node: pipes.me.clone(),
            channel: source.remote(),
        });
    }

    pub(super) fn announce_channel_down(&self, c: usize) {
        if !self.crosses(c) {
            return;
        }
        let source = &self.channels[c];
        let pipes = &self.shared.pipes;
        pipes.publish(MediaEvent::ChannelDown {
            room: source.room.clone(),
            node: pipes.me.clone(),
            key: source.key,
        });
    }

    pub(super) fn announce_message(&self, c: usize, message: &RTCDataChannelMessage) {
        if !self.crosses(c) {
            return;
        }
        let source = &self.channels[c];
        let pipes = &self.shared.pipes;
        pipes.publish(MediaEvent::Data {
            room: source.room.clone(),
            node: pipes.me.clone(),
            key: source.key,
            text: message.is_string,
            data: Bytes::copy_from_slice(&message.data),
        });
    }

    fn remote_channel(&self, room: &str, node: &str, key: u64) -> Option<usize> {
        let r = self.rooms.get(room)?;
        r.channels.iter().copied().find(|&c| {
            let source = &self.channels[c];
            source.key == key
                && matches!(&source.origin, ChannelOrigin::Remote { node: n } if n == node)
        })
    }

    /// A channel a member of another node opened: copies for every member here.
    pub(super) fn remote_channel_up(
        &mut self,
        room: &str,
        node: &str,
        channel: RemoteChannel,
        now: Instant,
    ) {
        if self.remote_channel(room, node, channel.key).is_some() {
            return; // announced again (to a node that opened the room)
        }
        let Some(r) = self.rooms.get(room) else {
            return;
        };
        let members = r.members.clone();
        let c = self.channels.insert(ChannelSource {
            owner: channel.owner.clone(),
            room: room.to_owned(),
            origin: ChannelOrigin::Remote {
                node: node.to_owned(),
            },
            key: channel.key,
            label: channel.label.clone(),
            init: RTCDataChannelInit {
                ordered: channel.ordered,
                max_packet_life_time: channel.max_packet_life_time,
                max_retransmits: channel.max_retransmits,
                protocol: channel.owner.clone(),
                negotiated: None,
            },
            copies: Vec::new(),
        });
        if let Some(r) = self.rooms.get_mut(room) {
            r.channels.push(c);
        }
        info!(%node, owner = %channel.owner, label = %channel.label, "remote data channel");
        for user in members {
            self.add_copy(&user, c, now);
        }
    }

    pub(super) fn remote_channel_down(&mut self, room: &str, node: &str, key: u64, now: Instant) {
        if let Some(c) = self.remote_channel(room, node, key) {
            self.remove_channel(c, now);
        }
    }

    pub(super) fn remote_data(
        &mut self,
        room: &str,
        node: &str,
        key: u64,
        text: bool,
        data: Bytes,
        now: Instant,
    ) {
        if let Some(c) = self.remote_channel(room, node, key) {
            let message = RTCDataChannelMessage {
                is_string: text,
                data: bytes::BytesMut::from(&data[..]),
            };
            self.relay_message(c, &message, now);
        }
    }

    /// The remote channels of a node (all rooms; `None`: of every node) in `room`.
    pub(super) fn remote_channels_of(&self, room: &str, node: Option<&str>) -> Vec<usize> {
        let Some(r) = self.rooms.get(room) else {
            return Vec::new();
        };
        r.channels
            .iter()
            .copied()
            .filter(|&c| match &self.channels[c].origin {
                ChannelOrigin::Remote { node: n } => node.is_none_or(|node| node == n),
                ChannelOrigin::Local { .. } => false,
            })
            .collect()
    }
}
