//! One media event loop: a thread that owns a socket on the media port, the connections and
//! rooms placed on it, and drives them. A received batch is routed, handed to its connections
//! and fanned out, and everything it caused leaves in one batched send, with no channel, task
//! switch or lock between a publisher's packet and its subscribers.
//!
//! With several loops the kernel spreads clients over their sockets by address, not by room, so
//! a client's datagrams may reach a loop that does not own its connection. That loop hands them
//! over, and the owner then opens a socket connected to that client on the same port: the
//! kernel delivers a connected socket its client's datagrams before any other socket of the
//! port, so from then on they arrive where they belong.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::{Events, Interest, Poll, Token, Waker};
use tokio::sync::oneshot;
use tracing::{debug, error};

use super::Shared;
use super::io::RecvBatch;
use super::io::router::{ConnRef, Router, Routes};
use super::peer::PeerSettings;
use super::relay::{Command, MediaState};

const SOCKET: Token = Token(0);
const WAKE: Token = Token(1);
/// Tokens of the sockets connected to one client start here.
const FIRST_DIRECT: usize = 2;
/// Datagrams taken from the socket per `recvmmsg`.
const RECV_BATCH: usize = 64;
/// The longest sleep: a command is noticed at once anyway (the waker), this only bounds drift.
const MAX_WAIT: Duration = Duration::from_secs(1);

/// What other threads send a loop.
pub enum Input {
    Command(Command),
    /// Datagrams another loop received for this one.
    Datagrams(Vec<HandedOver>),
    /// Routes to connections another loop closed.
    Forget(Vec<SocketAddr>),
    Shutdown(oneshot::Sender<()>),
}

/// A datagram another loop received for this one.
pub enum HandedOver {
    /// For one of its connections, from this address.
    Conn(ConnRef, SocketAddr, Vec<u8>),
    /// From another node's pipe (by its id, from this address), for one of its remote tracks.
    Pipe(Arc<str>, SocketAddr, Vec<u8>),
}

/// How other threads reach a loop.
#[derive(Clone)]
pub struct Mailbox {
    inbox: mpsc::Sender<Input>,
    waker: Arc<Waker>,
    /// Handed-over datagrams queued and not yet taken (bounded by MAX_HANDED_OVER).
    handed_over: Arc<AtomicUsize>,
}

/// Datagrams queued from other loops beyond which more are dropped (a loop that cannot keep up
/// must not grow memory without bound).
const MAX_HANDED_OVER: usize = 8192;

impl Mailbox {
    /// Delivers `input` and wakes the loop; `false` if the loop has stopped.
    pub fn send(&self, input: Input) -> bool {
        self.inbox.send(input).is_ok() && self.waker.wake().is_ok()
    }

    /// Hands datagrams over, unless too many already wait; `false` if dropped.
    fn hand_over(&self, datagrams: Vec<HandedOver>) -> bool {
        let n = datagrams.len();
        if self.handed_over.load(Ordering::Relaxed) + n > MAX_HANDED_OVER {
            return false;
        }
        self.handed_over.fetch_add(n, Ordering::Relaxed);
        self.send(Input::Datagrams(datagrams))
    }
}

/// What every loop is started with.
pub struct LoopConfig {
    pub settings: Arc<PeerSettings>,
    pub shared: Arc<Shared>,
    pub events: tokio::sync::mpsc::UnboundedSender<super::api::SfuEvent>,
    pub router: Router,
    pub gso: bool,
    pub data_channel_limit: usize,
}

/// Starts one loop per socket; returns their mailboxes and threads.
pub fn start(
    sockets: Vec<UdpSocket>,
    config: LoopConfig,
) -> std::io::Result<(Vec<Mailbox>, Vec<JoinHandle<()>>)> {
    let mut polls = Vec::new();
    let mut mailboxes = Vec::new();
    let mut inboxes = Vec::new();
    for _ in &sockets {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
        let (tx, rx) = mpsc::channel();
        mailboxes.push(Mailbox {
            inbox: tx,
            waker,
            handed_over: Arc::default(),
        });
        inboxes.push(rx);
        polls.push(poll);
    }
    let config = Arc::new(config);
    let mut threads = Vec::new();
    for (index, ((socket, poll), inbox)) in sockets.into_iter().zip(polls).zip(inboxes).enumerate()
    {
        let (config, peers) = (config.clone(), mailboxes.clone());
        let thread = std::thread::Builder::new()
            .name(format!("media-loop-{index}"))
            .spawn(move || {
                let bound = socket.local_addr();
                let socket = mio::net::UdpSocket::from_std(socket);
                let state = MediaState::new(
                    config.settings.clone(),
                    config.shared.clone(),
                    config.events.clone(),
                    Routes::new(index, config.router.clone()),
                    config.gso,
                    config.data_channel_limit,
                );
                let Ok(bound) = bound else {
                    error!("media loop {index}: its socket has no address");
                    return;
                };
                let mut event_loop = EventLoop {
                    index,
                    socket,
                    bound,
                    direct: slab::Slab::new(),
                    direct_by_addr: HashMap::new(),
                    poll,
                    inbox,
                    peers,
                    recv: RecvBatch::new(RECV_BATCH),
                    state,
                    shared: config.shared.clone(),
                };
                event_loop.run();
            })?;
        threads.push(thread);
    }
    Ok((mailboxes, threads))
}

struct EventLoop {
    index: usize,
    socket: mio::net::UdpSocket,
    /// The media port's address, for the connected sockets.
    bound: SocketAddr,
    /// Sockets connected to one client each (see the module's comment), by token - FIRST_DIRECT.
    direct: slab::Slab<(SocketAddr, mio::net::UdpSocket)>,
    direct_by_addr: HashMap<SocketAddr, usize>,
    poll: Poll,
    inbox: mpsc::Receiver<Input>,
    peers: Vec<Mailbox>,
    recv: RecvBatch,
    state: MediaState,
    shared: Arc<Shared>,
}

impl EventLoop {
    fn run(&mut self) {
        if let Err(e) = self
            .poll
            .registry()
            .register(&mut self.socket, SOCKET, Interest::READABLE)
        {
            error!("media loop {}: cannot poll its socket: {e}", self.index);
            return;
        }
        let mut events = Events::with_capacity(16);
        loop {
            let now = Instant::now();
            let wait = self
                .state
                .next_deadline()
                .map_or(MAX_WAIT, |d| d.saturating_duration_since(now).min(MAX_WAIT));
            if let Err(e) = self.poll.poll(&mut events, Some(wait))
                && e.kind() != std::io::ErrorKind::Interrupted
            {
                error!("media loop {}: poll failed: {e}", self.index);
                return;
            }
            let now = Instant::now();
            self.shared.stats.wakeups.fetch_add(1, Ordering::Relaxed);
            if !self.take_inputs(now) {
                return;
            }
            for event in events.iter() {
                match event.token() {
                    SOCKET => self.receive(None, now),
                    WAKE => {}
                    Token(t) => self.receive(Some(t - FIRST_DIRECT), now),
                }
            }
            self.state.handle_timeouts(now);
            self.send(now);
        }
    }

    /// Opens a socket connected to `client`, whose datagrams reached another loop first.
    fn connect_directly(&mut self, client: SocketAddr) {
        if self.direct_by_addr.contains_key(&client) {
            return;
        }
        let connected = super::io::port::connected(self.bound, client);
        let mut socket = match connected {
            Ok(s) => mio::net::UdpSocket::from_std(s),
            Err(e) => {
                debug!(%client, "cannot open a socket connected to a client: {e}");
                return;
            }
        };
        let entry = self.direct.vacant_entry();
        let token = Token(FIRST_DIRECT + entry.key());
        if self
            .poll
            .registry()
            .register(&mut socket, token, Interest::READABLE)
            .is_err()
        {
            return;
        }
        self.direct_by_addr.insert(client, entry.key());
        entry.insert((client, socket));
    }

    /// Closes the connected sockets to clients whose connections are gone.
    fn disconnect(&mut self, clients: &[SocketAddr]) {
        for client in clients {
            if let Some(i) = self.direct_by_addr.remove(client) {
                let (_, mut socket) = self.direct.remove(i);
                let _ = self.poll.registry().deregister(&mut socket);
            }
        }
    }

    /// Commands and handed-over datagrams; `false` once told to stop.
    fn take_inputs(&mut self, now: Instant) -> bool {
        while let Ok(input) = self.inbox.try_recv() {
            match input {
                Input::Command(command) => self.state.handle_command(command, now),
                Input::Datagrams(datagrams) => {
                    self.peers[self.index]
                        .handed_over
                        .fetch_sub(datagrams.len(), Ordering::Relaxed);
                    for datagram in datagrams {
                        match datagram {
                            HandedOver::Conn(conn, from, data) => {
                                self.state.handle_datagram(conn, now, from, &data);
                                // Only for a connection's selected pair: a client must not make
                                // the server open sockets for addresses of its choosing.
                                if self.state.is_route_of(conn, from) {
                                    self.connect_directly(from);
                                }
                            }
                            HandedOver::Pipe(peer, from, data) => {
                                self.state.handle_pipe(&peer, &data, now);
                                // While every stream of the peer is on this loop, its
                                // datagrams come here straight (a socket connected to it).
                                if self.shared.pipes.all_streams_on(&peer, self.index) {
                                    self.connect_directly(from);
                                }
                            }
                        }
                    }
                }
                Input::Forget(addrs) => {
                    self.state.routes.forget(&addrs);
                    self.disconnect(&addrs);
                }
                Input::Shutdown(done) => {
                    self.state.shutdown(now);
                    self.send(now);
                    let _ = done.send(());
                    return false;
                }
            }
        }
        true
    }

    /// Everything queued on a socket (the loop's own, or a connected one), batch by batch,
    /// until it is empty. A full batch's output goes out at once; after a short one the socket
    /// is read once more first: a publisher's packets of one frame arrive microseconds apart,
    /// and those that came in meanwhile then leave in the same `sendmmsg` (one GSO run per
    /// subscriber) instead of costing a second call and a second wake-up. Output never waits
    /// more than one extra read.
    fn receive(&mut self, direct: Option<usize>, now: Instant) {
        let mut handover: Vec<Vec<HandedOver>> = Vec::new();
        let hand_to = |handover: &mut Vec<Vec<HandedOver>>, l: usize, datagram: HandedOver| {
            if handover.len() <= l {
                handover.resize_with(l + 1, Vec::new);
            }
            handover[l].push(datagram);
        };
        let mut read_since_send = 0;
        loop {
            let received = match direct {
                None => self.recv.recv(&self.socket),
                Some(i) => match self.direct.get(i) {
                    Some((_, socket)) => self.recv.recv(socket),
                    None => Ok(0),
                },
            };
            let n = match received {
                Ok(n) => n,
                Err(e) => {
                    debug!("media loop {}: recvmmsg: {e}", self.index);
                    0
                }
            };
            if n == 0 {
                break;
            }
            let stats = &self.shared.stats;
            stats.datagrams_in.fetch_add(n as u64, Ordering::Relaxed);
            for i in 0..n {
                let Some((from, data)) = self.recv.get(i) else {
                    continue;
                };
                match self.state.routes.route(from, data) {
                    Some(conn) if conn.loop_index == self.index => {
                        self.state.handle_datagram(conn, now, from, data)
                    }
                    Some(conn) => hand_to(
                        &mut handover,
                        conn.loop_index,
                        HandedOver::Conn(conn, from, data.to_vec()),
                    ),
                    None => match self.shared.pipes.route(from, data) {
                        Some((peer, l)) if l == self.index => {
                            self.state.handle_pipe(&peer, data, now)
                        }
                        Some((peer, l)) => hand_to(
                            &mut handover,
                            l,
                            HandedOver::Pipe(peer, from, data.to_vec()),
                        ),
                        None => {
                            stats.unrouted.fetch_add(1, Ordering::Relaxed);
                        }
                    },
                }
            }
            read_since_send += 1;
            if n == self.recv.capacity() || read_since_send == 2 {
                self.send(now);
                read_since_send = 0;
            }
            // Handed over batch by batch: a flood for another loop's connection never piles up
            // here (the other loop's queue is bounded and drops past it).
            for (target, datagrams) in handover.iter_mut().enumerate() {
                let n = datagrams.len() as u64;
                if n == 0 {
                    continue;
                }
                let stats = &self.shared.stats;
                if self.peers[target].hand_over(std::mem::take(datagrams)) {
                    stats.handed_over.fetch_add(n, Ordering::Relaxed);
                } else {
                    stats.handover_dropped.fetch_add(n, Ordering::Relaxed);
                }
            }
        }
        if read_since_send > 0 {
            self.send(now);
        }
    }

    /// Sends what the connections have queued, and tells the other loops about closed routes.
    fn send(&mut self, now: Instant) {
        self.state.collect_dirty(now);
        let before = self.state.batch.stats;
        self.state.batch.flush(&self.socket);
        let stats = &self.shared.stats;
        stats.count_sends(before, self.state.batch.stats);
        let received = std::mem::take(&mut self.state.received);
        stats
            .media_received
            .fetch_add(received.media, Ordering::Relaxed);
        stats
            .media_rejected
            .fetch_add(received.rejected, Ordering::Relaxed);
        stats
            .relayed_in
            .fetch_add(received.relayed_in, Ordering::Relaxed);
        stats
            .relayed_out
            .fetch_add(received.relayed_out, Ordering::Relaxed);
        let forgotten = std::mem::take(&mut self.state.forgotten);
        if !forgotten.is_empty() {
            self.disconnect(&forgotten);
            for (i, peer) in self.peers.iter().enumerate() {
                if i != self.index {
                    peer.send(Input::Forget(forgotten.clone()));
                }
            }
        }
    }
}
