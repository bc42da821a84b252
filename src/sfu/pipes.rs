//! The pipes between nodes (docs/CLUSTER.md): what a node knows about its peers' media. A
//! pipe is plain SRTP on the one media port, one direction per key: the sender draws the key
//! and announces it over the bus ([`MediaEvent::PipeKey`]). Datagrams from a peer's relay
//! address are pipe datagrams; their SSRC (assigned by the sending node, one per layer of
//! each track it relays) names the remote track and so the event loop that holds its room.
//!
//! [`Pipes`] is shared by the loops and touched when pipes and remote tracks come and go, and
//! once per received pipe datagram to find its loop; [`LoopPipes`] holds a loop's SRTP
//! contexts (stateful, so each loop keeps its own: an SSRC is always sealed, and opened, on
//! one loop).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use rtc::srtp::context::Context;
use tracing::{info, warn};

use crate::cluster::pipe::PipeKey;
use crate::cluster::{Bus, BusEvent, MediaEvent, NodeRef};

/// One direction of a pipe.
#[derive(Clone)]
struct PipeEnd {
    incarnation: u64,
    /// The peer's relay address (outbound: where to send; inbound: where it sends from).
    addr: SocketAddr,
    key: PipeKey,
}

#[derive(Default)]
struct Table {
    outbound: HashMap<String, PipeEnd>,
    inbound: HashMap<String, PipeEnd>,
    by_addr: HashMap<SocketAddr, Arc<str>>,
    /// The loop holding the remote track each pipe SSRC of a peer feeds.
    loops: HashMap<String, HashMap<u32, usize>>,
}

pub struct Pipes {
    /// This node as its peers know it.
    pub me: NodeRef,
    /// Where peers send this node's pipes (`cluster.relay_ip` and the media port).
    pub relay: SocketAddr,
    bus: Option<Arc<Bus>>,
    table: Mutex<Table>,
    next_ssrc: AtomicU32,
}

impl std::fmt::Debug for Pipes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipes")
            .field("me", &self.me)
            .field("relay", &self.relay)
            .finish_non_exhaustive()
    }
}

impl Pipes {
    pub fn new(node_id: &str, relay: SocketAddr, bus: Option<Arc<Bus>>) -> Pipes {
        let random = crate::random_u64();
        Pipes {
            me: NodeRef {
                id: node_id.to_owned(),
                incarnation: random,
            },
            relay,
            bus,
            table: Mutex::default(),
            next_ssrc: AtomicU32::new((random >> 32) as u32 | 1),
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        // Each change is one insert or remove: a panic elsewhere leaves nothing half-done.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether other nodes may share rooms with this one (there is a bus).
    pub fn clustered(&self) -> bool {
        self.bus.is_some()
    }

    pub fn publish(&self, event: MediaEvent) {
        if let Some(bus) = &self.bus {
            bus.publish(BusEvent::Media(event));
        }
    }

    /// Whether everything published has reached Redis (true without a bus).
    pub fn sent_all(&self) -> bool {
        self.bus.as_ref().is_none_or(|b| b.queued_bytes() == 0)
    }

    /// A fresh SSRC for one layer of a track this node relays (unique among this node's pipe
    /// streams, whatever loop sends it: the loops share each pipe's key).
    pub fn relay_ssrc(&self) -> u32 {
        // Odd numbers only: never 0, and 2^31 of them before one comes again.
        self.next_ssrc.fetch_add(2, Ordering::Relaxed)
    }

    /// `peer` wants this node's media: the pipe to it, keyed anew for a new peer or
    /// incarnation. The key is announced when new, and with `announce` again (the peer asked:
    /// it may have missed it). Returns whether the key changed (the loops then drop their
    /// contexts for it).
    pub fn open_outbound(&self, peer: &NodeRef, addr: SocketAddr, announce: bool) -> bool {
        let mut table = self.table();
        let current = table
            .outbound
            .get(&peer.id)
            .filter(|p| p.incarnation == peer.incarnation && p.addr == addr)
            .cloned();
        let (end, changed) = match current {
            Some(end) => (end, false),
            None => {
                let key = match PipeKey::generate() {
                    Ok(k) => k,
                    Err(e) => {
                        warn!(peer = %peer.id, "no pipe: {e}");
                        return false;
                    }
                };
                let end = PipeEnd {
                    incarnation: peer.incarnation,
                    addr,
                    key,
                };
                table.outbound.insert(peer.id.clone(), end.clone());
                info!(peer = %peer.id, %addr, "pipe to a node opened");
                (end, true)
            }
        };
        drop(table);
        if !changed && !announce {
            return false;
        }
        self.publish(MediaEvent::PipeKey {
            from: self.me.clone(),
            to: peer.id.clone(),
            relay: self.relay,
            key: end.key,
        });
        changed
    }

    /// A peer's key for what it sends this node. Returns whether it changed.
    pub fn accept_inbound(&self, from: &NodeRef, addr: SocketAddr, key: PipeKey) -> bool {
        let mut table = self.table();
        let same = table
            .inbound
            .get(&from.id)
            .is_some_and(|p| p.incarnation == from.incarnation && p.addr == addr && p.key == key);
        if same {
            return false;
        }
        if let Some(old) = table.inbound.get(&from.id).map(|p| p.addr) {
            table.by_addr.remove(&old);
        }
        // Another node that had this address (a node restarted under a new id on the same
        // address) does not send from it any more.
        if let Some(previous) = table.by_addr.insert(addr, Arc::from(from.id.as_str()))
            && *previous != *from.id
        {
            table.inbound.remove(&*previous);
        }
        table.inbound.insert(
            from.id.clone(),
            PipeEnd {
                incarnation: from.incarnation,
                addr,
                key,
            },
        );
        info!(peer = %from.id, %addr, "pipe from a node opened");
        true
    }

    pub fn has_inbound(&self, peer: &str) -> bool {
        self.table().inbound.contains_key(peer)
    }

    /// The peer a pipe datagram comes from (by its address) and the loop it goes to (by its
    /// SSRC); `None` if it is not one.
    pub fn route(&self, from: SocketAddr, datagram: &[u8]) -> Option<(Arc<str>, usize)> {
        let ssrc = u32::from_be_bytes(datagram.get(8..12)?.try_into().ok()?);
        let table = self.table();
        let peer = table.by_addr.get(&from)?;
        let l = *table.loops.get(&**peer)?.get(&ssrc)?;
        Some((peer.clone(), l))
    }

    /// Whether `peer` is a new incarnation of a node known under its id (it restarted): what
    /// is known of the old one is to be forgotten first.
    pub fn restarted(&self, peer: &NodeRef) -> bool {
        let table = self.table();
        [table.inbound.get(&peer.id), table.outbound.get(&peer.id)]
            .into_iter()
            .flatten()
            .any(|p| p.incarnation != peer.incarnation)
    }

    pub fn place(&self, peer: &str, ssrc: u32, loop_index: usize) {
        let mut table = self.table();
        table
            .loops
            .entry(peer.to_owned())
            .or_default()
            .insert(ssrc, loop_index);
    }

    /// Forgets a stream's loop, if it is still `loop_index` (a room that moved to another loop
    /// may have placed the same stream there since).
    pub fn unplace(&self, peer: &str, ssrc: u32, loop_index: usize) {
        let mut table = self.table();
        if let Some(streams) = table.loops.get_mut(peer) {
            if streams.get(&ssrc) == Some(&loop_index) {
                streams.remove(&ssrc);
            }
            if streams.is_empty() {
                table.loops.remove(peer);
            }
        }
    }

    /// Whether every stream of `peer` goes to loop `loop_index` (and there is one).
    pub fn all_streams_on(&self, peer: &str, loop_index: usize) -> bool {
        self.table()
            .loops
            .get(peer)
            .is_some_and(|streams| streams.values().all(|l| *l == loop_index))
    }

    /// A peer is gone: both directions of its pipe and its streams. Returns the address its
    /// pipe came from (the loops close sockets connected to it).
    pub fn forget(&self, peer: &str) -> Option<SocketAddr> {
        let mut table = self.table();
        table.outbound.remove(peer);
        let mut from = None;
        if let Some(p) = table.inbound.remove(peer)
            && table
                .by_addr
                .get(&p.addr)
                .is_some_and(|owner| **owner == *peer)
        {
            table.by_addr.remove(&p.addr);
            from = Some(p.addr);
        }
        table.loops.remove(peer);
        from
    }

    /// Drops every outbound key (they are drawn and announced anew on the next `RoomOpen` or
    /// `RoomState`); returns the peers.
    pub fn forget_outbound(&self) -> Vec<String> {
        self.table()
            .outbound
            .drain()
            .map(|(peer, _)| peer)
            .collect()
    }

    /// The key of what goes to `peer` (unit tests: the receiving side's view).
    #[cfg(test)]
    pub fn outbound_key(&self, peer: &str) -> Option<PipeKey> {
        self.outbound(peer).map(|end| end.key)
    }

    fn outbound(&self, peer: &str) -> Option<PipeEnd> {
        self.table().outbound.get(peer).cloned()
    }

    fn inbound(&self, peer: &str) -> Option<PipeEnd> {
        self.table().inbound.get(peer).cloned()
    }
}

/// A loop's SRTP contexts, made from the shared keys on first use.
#[derive(Default)]
pub struct LoopPipes {
    outbound: HashMap<String, (SocketAddr, Context)>,
    inbound: HashMap<String, Context>,
}

impl LoopPipes {
    /// The context sealing what goes to `peer`, and its address.
    pub fn outbound(&mut self, pipes: &Pipes, peer: &str) -> Option<(SocketAddr, &mut Context)> {
        if !self.outbound.contains_key(peer) {
            let end = pipes.outbound(peer)?;
            let ctx = end.key.context().ok()?;
            self.outbound.insert(peer.to_owned(), (end.addr, ctx));
        }
        self.outbound.get_mut(peer).map(|(a, c)| (*a, c))
    }

    /// The context opening what `peer` sends.
    pub fn inbound(&mut self, pipes: &Pipes, peer: &str) -> Option<&mut Context> {
        if !self.inbound.contains_key(peer) {
            let ctx = pipes.inbound(peer)?.key.context().ok()?;
            self.inbound.insert(peer.to_owned(), ctx);
        }
        self.inbound.get_mut(peer)
    }

    /// Forgets a stream's state in the context opening what `peer` sends.
    pub fn forget_inbound_stream(&mut self, peer: &str, ssrc: u32) {
        if let Some(ctx) = self.inbound.get_mut(peer) {
            ctx.remove_ssrc(ssrc);
        }
    }

    /// The peer's keys changed (or it is gone): contexts are made again on next use.
    pub fn reset(&mut self, peer: &str) {
        self.outbound.remove(peer);
        self.inbound.remove(peer);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, incarnation: u64) -> NodeRef {
        NodeRef {
            id: id.into(),
            incarnation,
        }
    }

    fn rtp_with_ssrc(ssrc: u32) -> Vec<u8> {
        let mut p = vec![0x80, 96, 0, 1, 0, 0, 0, 1];
        p.extend_from_slice(&ssrc.to_be_bytes());
        p
    }

    #[test]
    fn pipe_datagrams_are_routed_by_peer_address_and_ssrc() {
        let pipes = Pipes::new("me", "127.0.0.2:7882".parse().unwrap(), None);
        let peer_addr: SocketAddr = "127.0.0.3:7882".parse().unwrap();
        let key = PipeKey::generate().unwrap();
        assert!(pipes.accept_inbound(&node("n2", 1), peer_addr, key.clone()));
        assert!(
            !pipes.accept_inbound(&node("n2", 1), peer_addr, key),
            "known"
        );
        pipes.place("n2", 7, 1);
        let (peer, l) = pipes.route(peer_addr, &rtp_with_ssrc(7)).unwrap();
        assert_eq!((&*peer, l), ("n2", 1));
        assert!(
            pipes.route(peer_addr, &rtp_with_ssrc(9)).is_none(),
            "unknown stream"
        );
        let stranger: SocketAddr = "127.0.0.4:7882".parse().unwrap();
        assert!(
            pipes.route(stranger, &rtp_with_ssrc(7)).is_none(),
            "not a peer"
        );
        assert!(pipes.route(peer_addr, &[0x80, 96]).is_none(), "too short");
        pipes.unplace("n2", 7, 0);
        assert!(
            pipes.route(peer_addr, &rtp_with_ssrc(7)).is_some(),
            "placed on loop 1"
        );
        pipes.unplace("n2", 7, 1);
        assert!(pipes.route(peer_addr, &rtp_with_ssrc(7)).is_none());

        // A restart is a new incarnation; forgetting the peer drops its routes and keys.
        pipes.place("n2", 7, 0);
        assert!(!pipes.restarted(&node("n2", 1)));
        assert!(pipes.restarted(&node("n2", 2)));
        pipes.forget("n2");
        assert!(pipes.route(peer_addr, &rtp_with_ssrc(7)).is_none());
        assert!(!pipes.has_inbound("n2"));

        // A node restarted under a new id on the same address: the old id's death, reported
        // later, does not take the address from the new one.
        let key = PipeKey::generate().unwrap();
        assert!(pipes.accept_inbound(&node("old", 1), peer_addr, key.clone()));
        assert!(pipes.accept_inbound(&node("new", 1), peer_addr, key));
        assert!(!pipes.has_inbound("old"), "the address is the new node's");
        pipes.place("new", 11, 0);
        pipes.forget("old");
        assert_eq!(
            &*pipes.route(peer_addr, &rtp_with_ssrc(11)).unwrap().0,
            "new"
        );
    }

    #[test]
    fn an_outbound_pipe_is_keyed_once_per_peer_incarnation() {
        let pipes = Pipes::new("me", "127.0.0.2:7882".parse().unwrap(), None);
        let addr: SocketAddr = "127.0.0.3:7882".parse().unwrap();
        assert!(pipes.open_outbound(&node("n2", 1), addr, true));
        assert!(!pipes.open_outbound(&node("n2", 1), addr, true));
        let key = pipes.outbound("n2").unwrap().key;
        assert!(
            pipes.open_outbound(&node("n2", 2), addr, false),
            "restarted"
        );
        assert!(pipes.outbound("n2").unwrap().key != key, "a new key");
        let mut loop_pipes = LoopPipes::default();
        assert_eq!(loop_pipes.outbound(&pipes, "n2").unwrap().0, addr);
        assert!(loop_pipes.outbound(&pipes, "n3").is_none());
    }

    #[test]
    fn relay_ssrcs_are_odd_and_distinct() {
        let pipes = Pipes::new("me", "127.0.0.2:7882".parse().unwrap(), None);
        let ssrcs: std::collections::HashSet<u32> =
            (0..10_000).map(|_| pipes.relay_ssrc()).collect();
        assert_eq!(ssrcs.len(), 10_000);
        assert!(ssrcs.iter().all(|s| s % 2 == 1));
    }
}
