//! A local track's relay to the other nodes of its room: a pipe stream per layer and node, and
//! the sealing of each forwarded packet for each node.
//!
//! No two packets are ever sealed with one nonce under a pipe's key (AES-GCM would then give
//! away the key's authentication): each stream has a pipe SSRC of its own, drawn when the node
//! is added to the track or the layer appears and never used again, and an index (the pipe's
//! sequence number and rollover counter) one more for every packet sealed, from 0. The
//! publisher's own sequence numbers may repeat or go back (a retransmission, a forged RTX
//! packet); they travel in the first two bytes of the payload. A node removed and added again
//! gets new streams, so its receiving side starts each one from a clean state too.

use super::super::forward::{RtpPacket, write_header};
use super::super::io::SendBatch;
use super::super::pipes::{LoopPipes, Pipes};

/// The send batch's destination key of pipe datagrams (addresses are compared too).
const PIPE_KEY: u32 = u32::MAX - 1;

#[derive(Debug, Default)]
pub struct Relay {
    /// The publisher's SSRC of each layer.
    sources: Vec<u32>,
    /// The nodes it goes to.
    to: Vec<RelayTarget>,
}

#[derive(Debug)]
struct RelayTarget {
    node: String,
    streams: Vec<PipeStream>,
}

#[derive(Debug, Clone, Copy)]
struct PipeStream {
    source: u32,
    ssrc: u32,
    next_index: u64,
}

impl PipeStream {
    fn new(source: u32, pipes: &Pipes) -> PipeStream {
        PipeStream {
            source,
            ssrc: pipes.relay_ssrc(),
            next_index: 0,
        }
    }
}

impl Relay {
    pub fn is_empty(&self) -> bool {
        self.to.is_empty()
    }

    pub fn goes_to(&self, node: &str) -> bool {
        self.to.iter().any(|t| t.node == node)
    }

    /// The track goes to `node` too, on new streams.
    pub fn add_node(&mut self, node: &str, pipes: &Pipes) {
        if self.goes_to(node) {
            return;
        }
        let streams = self
            .sources
            .iter()
            .map(|&s| PipeStream::new(s, pipes))
            .collect();
        self.to.push(RelayTarget {
            node: node.to_owned(),
            streams,
        });
    }

    pub fn remove_node(&mut self, node: &str) {
        self.to.retain(|t| t.node != node);
    }

    /// A layer of the publisher's (taking the place of `replaced`): a new stream to each node.
    /// Whether it is new.
    pub fn add_source(&mut self, source: u32, replaced: Option<u32>, pipes: &Pipes) -> bool {
        if let Some(old) = replaced {
            self.sources.retain(|s| *s != old);
            for target in &mut self.to {
                target.streams.retain(|s| s.source != old);
            }
        }
        if self.sources.contains(&source) {
            return false;
        }
        self.sources.push(source);
        for target in &mut self.to {
            target.streams.push(PipeStream::new(source, pipes));
        }
        true
    }

    /// The publisher's SSRC of the layer sent as `pipe_ssrc` (to any node).
    pub fn source_of(&self, pipe_ssrc: u32) -> Option<u32> {
        self.to
            .iter()
            .flat_map(|t| &t.streams)
            .find(|s| s.ssrc == pipe_ssrc)
            .map(|s| s.source)
    }

    /// Each node's streams: (node, [(pipe SSRC, the publisher's SSRC)]).
    pub fn streams(&self) -> impl Iterator<Item = (&str, Vec<(u32, u32)>)> {
        self.to.iter().map(|t| {
            let streams = t.streams.iter().map(|s| (s.ssrc, s.source)).collect();
            (t.node.as_str(), streams)
        })
    }

    /// Seals one forwarded packet for each node: the publisher's header (only the forwarded
    /// extensions, the publisher's ids) with the stream's SSRC and index, then the publisher's
    /// sequence number and the payload. Returns the datagrams queued.
    pub fn send(
        &mut self,
        packet: &RtpPacket,
        loop_pipes: &mut LoopPipes,
        pipes: &Pipes,
        batch: &mut SendBatch,
    ) -> u64 {
        let mut sent = 0;
        for target in &mut self.to {
            let Some(stream) = target
                .streams
                .iter_mut()
                .find(|s| s.source == packet.header.ssrc)
            else {
                continue;
            };
            let Some((to, ctx)) = loop_pipes.outbound(pipes, &target.node) else {
                continue;
            };
            let index = stream.next_index;
            stream.next_index += 1;
            let mut buf = batch.buffer();
            write_header(&packet.header, &mut buf);
            buf[2..4].copy_from_slice(&(index as u16).to_be_bytes());
            buf[8..12].copy_from_slice(&stream.ssrc.to_be_bytes());
            let header_len = buf.len();
            buf.extend_from_slice(&packet.header.sequence_number.to_be_bytes());
            buf.extend_from_slice(&packet.payload);
            let roc = (index >> 16) as u32;
            if ctx
                .encrypt_rtp_in_place_with_roc(&mut buf, header_len, roc)
                .is_ok()
            {
                batch.push(PIPE_KEY, to, buf);
                sent += 1;
            } else {
                batch.recycle(buf);
            }
        }
        sent
    }
}

#[cfg(test)]
mod tests {
    use bytes::BytesMut;
    use rtc::rtp;
    use rtc::shared::marshal::Unmarshal;

    use super::*;
    use crate::cluster::NodeRef;
    use crate::sfu::forward::RtpHeader;

    fn packet(seq: u16) -> RtpPacket {
        RtpPacket {
            header: RtpHeader {
                payload_type: 96,
                sequence_number: seq,
                timestamp: 1234,
                ssrc: 0xAAAA,
                ..Default::default()
            },
            payload: bytes::Bytes::from_static(b"a frame"),
        }
    }

    /// A packet relayed twice (a publisher's retransmission, or a forged RTX packet naming one
    /// already relayed), and a node removed and added again, never seal with one nonce; every
    /// packet opens on the other side with the publisher's sequence number and payload.
    #[test]
    fn no_two_packets_share_a_nonce_on_a_pipe() {
        let pipes = Pipes::new("n1", "127.0.0.2:7882".parse().unwrap(), None);
        let peer = NodeRef {
            id: "n2".into(),
            incarnation: 1,
        };
        pipes.open_outbound(&peer, "127.0.0.3:7882".parse().unwrap(), false);
        let mut loop_pipes = LoopPipes::default();
        let mut batch = SendBatch::new(false);
        let mut relay = Relay::default();
        assert!(relay.add_source(0xAAAA, None, &pipes));
        relay.add_node("n2", &pipes);
        for _ in 0..2 {
            assert_eq!(
                relay.send(&packet(65_535), &mut loop_pipes, &pipes, &mut batch),
                1
            );
        }
        relay.remove_node("n2");
        assert_eq!(
            relay.send(&packet(1), &mut loop_pipes, &pipes, &mut batch),
            0
        );
        relay.add_node("n2", &pipes);
        assert_eq!(
            relay.send(&packet(2), &mut loop_pipes, &pipes, &mut batch),
            1
        );
        let sealed = batch.drain_for_test();
        let nonce = |d: &Vec<u8>| (d[8..12].to_vec(), d[2..4].to_vec());
        assert_ne!(nonce(&sealed[0]), nonce(&sealed[1]));
        assert_ne!(
            nonce(&sealed[0]),
            nonce(&sealed[2]),
            "added again: a new stream"
        );
        assert_ne!(sealed[0][8..12], sealed[2][8..12]);
        // The receiving side, with the key as announced.
        let mut receiver = pipes.outbound_key("n2").unwrap().context().unwrap();
        for (datagram, seq) in sealed.iter().zip([65_535u16, 65_535, 2]) {
            let mut buf = BytesMut::from(&datagram[..]);
            receiver.decrypt_rtp_in_place(&mut buf).unwrap();
            let p = rtp::Packet::unmarshal(&mut buf.freeze()).unwrap();
            assert_eq!(&p.payload[..2], &seq.to_be_bytes());
            assert_eq!(&p.payload[2..], b"a frame");
        }
        // A replaced layer's streams go; the new one gets its own.
        assert!(relay.add_source(0xBBBB, Some(0xAAAA), &pipes));
        let streams: Vec<_> = relay.streams().collect();
        assert_eq!(streams.len(), 1);
        assert_eq!(streams[0].1.len(), 1);
        assert_eq!(streams[0].1[0].1, 0xBBBB);
        assert_eq!(relay.source_of(streams[0].1[0].0), Some(0xBBBB));
    }
}
