//! Which event loop and connection a datagram belongs to. A STUN request names its connection
//! by the ICE username fragment (each connection has its own), and that always decides, so an
//! address that changes hands follows its new owner; other datagrams go by the source address,
//! learned from those requests or from the addresses a connection checked itself (full ICE may
//! check first; such a hint never displaces an address another connection holds).
//!
//! Each loop has its own socket on the shared port, and the kernel spreads clients over those
//! sockets by address, not by room: a datagram can arrive at a loop that does not own its
//! connection, which then hands it over. The shared table is only consulted for an address a
//! loop has not seen before; each loop caches what it learned.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use super::stun;

/// A connection on some event loop. `id` is unique for the node's life: a slot `key` is reused
/// after a connection closes, so a route that outlived its connection is told apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnRef {
    pub loop_index: usize,
    pub key: usize,
    pub id: u64,
}

/// Addresses one connection may be reached from: a client has a few (a path change, a second
/// interface); one cycling through source ports must not grow the table.
pub const MAX_ADDRESSES_PER_CONN: usize = 16;

#[derive(Default)]
struct Table {
    by_ufrag: HashMap<String, ConnRef>,
    by_addr: HashMap<SocketAddr, ConnRef>,
    /// Addresses in `by_addr` per connection id.
    addresses: HashMap<u64, usize>,
}

impl Table {
    /// Routes `addr` to `conn` from now on (taking it from another connection unless
    /// `displace` is false); `false` if it is not routed to `conn`.
    fn remember(&mut self, addr: SocketAddr, conn: ConnRef, displace: bool) -> bool {
        match self.by_addr.get(&addr) {
            Some(c) if *c == conn => return true,
            Some(_) if !displace => return false,
            _ => {}
        }
        let count = self.addresses.entry(conn.id).or_default();
        if *count >= MAX_ADDRESSES_PER_CONN {
            return false;
        }
        *count += 1;
        if let Some(old) = self.by_addr.insert(addr, conn)
            && let Some(n) = self.addresses.get_mut(&old.id)
        {
            *n = n.saturating_sub(1);
        }
        true
    }
}

/// The node-wide routing table (shared by the loops; touched on first contact and teardown).
#[derive(Clone, Default)]
pub struct Router {
    table: Arc<Mutex<Table>>,
}

impl Router {
    fn table(&self) -> std::sync::MutexGuard<'_, Table> {
        // A panic elsewhere cannot leave a half-updated map: every change is one insert/remove.
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, ufrag: &str, conn: ConnRef) {
        self.table().by_ufrag.insert(ufrag.to_owned(), conn);
    }

    /// Forgets a closed connection; returns the addresses that led to it.
    pub fn unregister(&self, ufrag: &str, conn: ConnRef) -> Vec<SocketAddr> {
        let mut table = self.table();
        table.by_ufrag.remove(ufrag);
        table.addresses.remove(&conn.id);
        let mut gone = Vec::new();
        table.by_addr.retain(|addr, c| {
            let keep = *c != conn;
            if !keep {
                gone.push(*addr);
            }
            keep
        });
        gone
    }
}

/// One loop's view: its cache in front of the shared table.
pub struct Routes {
    loop_index: usize,
    router: Router,
    cache: HashMap<SocketAddr, ConnRef>,
}

impl Routes {
    pub fn new(loop_index: usize, router: Router) -> Routes {
        Routes {
            loop_index,
            router,
            cache: HashMap::new(),
        }
    }

    pub fn loop_index(&self) -> usize {
        self.loop_index
    }

    pub fn router(&self) -> &Router {
        &self.router
    }

    /// The connection a datagram from `from` belongs to, if any.
    pub fn route(&mut self, from: SocketAddr, datagram: &[u8]) -> Option<ConnRef> {
        if let Some(ufrag) = stun::local_ufrag(datagram) {
            let mut table = self.router.table();
            let conn = *table.by_ufrag.get(std::str::from_utf8(ufrag).ok()?)?;
            // Past its address budget, the request still reaches its connection (ICE answers
            // it), but the address is not remembered.
            if table.remember(from, conn, true) {
                drop(table);
                self.cache.insert(from, conn);
            } else {
                drop(table);
                self.cache.remove(&from);
            }
            return Some(conn);
        }
        if let Some(conn) = self.cache.get(&from) {
            return Some(*conn);
        }
        let conn = *self.router.table().by_addr.get(&from)?;
        self.cache.insert(from, conn);
        Some(conn)
    }

    /// This loop's connection `conn` checks `to`: its answers may come from there (unless
    /// another connection already holds that address).
    pub fn learn(&mut self, to: SocketAddr, conn: ConnRef) {
        if self.cache.contains_key(&to) {
            return;
        }
        let mut table = self.router.table();
        table.remember(to, conn, false);
        if let Some(holder) = table.by_addr.get(&to).copied() {
            drop(table);
            self.cache.insert(to, holder);
        }
    }

    /// Drops cached routes (of a connection closed here or on another loop).
    pub fn forget(&mut self, addrs: &[SocketAddr]) {
        for a in addrs {
            self.cache.remove(a);
        }
    }

    /// Drops every cached route to this loop's connection `conn`.
    pub fn forget_conn(&mut self, conn: ConnRef) {
        self.cache.retain(|_, c| *c != conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn binding_request(username: &str) -> Vec<u8> {
        let mut attrs = vec![0x00, 0x06];
        attrs.extend_from_slice(&(username.len() as u16).to_be_bytes());
        attrs.extend_from_slice(username.as_bytes());
        while !attrs.len().is_multiple_of(4) {
            attrs.push(0);
        }
        let mut m = vec![0x00, 0x01];
        m.extend_from_slice(&(attrs.len() as u16).to_be_bytes());
        m.extend_from_slice(&[0x21, 0x12, 0xA4, 0x42]);
        m.extend_from_slice(&[1; 12]);
        m.extend_from_slice(&attrs);
        m
    }

    #[test]
    fn first_contact_by_ufrag_then_by_address_on_every_loop() {
        let router = Router::default();
        let (mut loop0, mut loop1) = (
            Routes::new(0, router.clone()),
            Routes::new(1, router.clone()),
        );
        let conn = ConnRef {
            loop_index: 1,
            key: 7,
            id: 70,
        };
        router.register("abcd", conn);
        let client: SocketAddr = "127.0.0.1:5000".parse().unwrap();
        // DTLS from an unknown address goes nowhere.
        assert_eq!(loop0.route(client, &[22, 254, 253]), None);
        // The STUN request arrives at loop 0 (the kernel's choice): routed to loop 1's conn.
        assert_eq!(
            loop0.route(client, &binding_request("abcd:remote")),
            Some(conn)
        );
        // From then on any datagram from that address, on either loop.
        assert_eq!(loop0.route(client, &[22, 254, 253]), Some(conn));
        assert_eq!(loop1.route(client, &[0x80, 96]), Some(conn));
        // An unknown ufrag routes nowhere.
        let other: SocketAddr = "127.0.0.1:5001".parse().unwrap();
        assert_eq!(loop0.route(other, &binding_request("nope:remote")), None);
        // Closing forgets it everywhere.
        let gone = router.unregister("abcd", conn);
        assert_eq!(gone, vec![client]);
        loop0.forget(&gone);
        loop1.forget_conn(conn);
        assert_eq!(loop0.route(client, &[22, 254, 253]), None);
        assert_eq!(loop1.route(client, &[22, 254, 253]), None);
    }

    #[test]
    fn addresses_the_server_checks_first_are_routed_back() {
        let router = Router::default();
        let (mut loop0, mut loop1) = (Routes::new(0, router.clone()), Routes::new(1, router));
        let client: SocketAddr = "127.0.0.1:6000".parse().unwrap();
        let conn = ConnRef {
            loop_index: 1,
            key: 3,
            id: 30,
        };
        loop1.learn(client, conn);
        // A binding response (no USERNAME) lands on loop 0.
        let response = [
            0x01, 0x01, 0, 0, 0x21, 0x12, 0xA4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(loop0.route(client, &response), Some(conn));
    }

    #[test]
    fn a_hint_never_takes_an_address_and_a_request_always_names_its_connection() {
        let router = Router::default();
        let mut routes = Routes::new(0, router.clone());
        let (alice, mallory) = (
            ConnRef {
                loop_index: 0,
                key: 1,
                id: 1,
            },
            ConnRef {
                loop_index: 0,
                key: 2,
                id: 2,
            },
        );
        router.register("alice", alice);
        router.register("mallory", mallory);
        let addr: SocketAddr = "127.0.0.1:7000".parse().unwrap();
        assert_eq!(routes.route(addr, &binding_request("alice:x")), Some(alice));
        // Mallory lists alice's address as a candidate: the server's checks to it change nothing.
        routes.learn(addr, mallory);
        let mut other = Routes::new(1, router.clone());
        other.learn(addr, mallory);
        assert_eq!(routes.route(addr, &[0x80, 96]), Some(alice));
        assert_eq!(other.route(addr, &[0x80, 96]), Some(alice));
        // A new connection behind the same address (a client's port reused) takes it by its
        // request; an unknown username routes nowhere.
        assert_eq!(
            routes.route(addr, &binding_request("mallory:y")),
            Some(mallory)
        );
        assert_eq!(routes.route(addr, &[0x80, 96]), Some(mallory));
        assert_eq!(routes.route(addr, &binding_request("gone:z")), None);
    }

    #[test]
    fn a_connection_is_routed_from_a_bounded_number_of_addresses() {
        let router = Router::default();
        let mut routes = Routes::new(0, router.clone());
        let conn = ConnRef {
            loop_index: 0,
            key: 1,
            id: 1,
        };
        router.register("u", conn);
        let addr = |port: u16| SocketAddr::from(([127, 0, 0, 1], port));
        for port in 0..100 {
            // Every request reaches its connection...
            assert_eq!(
                routes.route(addr(port), &binding_request("u:z")),
                Some(conn)
            );
        }
        // ...but only the first addresses are remembered for media.
        let media = [0x80, 96];
        assert_eq!(routes.route(addr(0), &media), Some(conn));
        assert_eq!(
            routes.route(addr(MAX_ADDRESSES_PER_CONN as u16 - 1), &media),
            Some(conn)
        );
        assert_eq!(routes.route(addr(99), &media), None);
        assert_eq!(router.table().by_addr.len(), MAX_ADDRESSES_PER_CONN);
        assert_eq!(router.unregister("u", conn).len(), MAX_ADDRESSES_PER_CONN);
        assert!(router.table().addresses.is_empty());
    }
}
