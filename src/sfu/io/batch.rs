//! Batched UDP I/O on Linux: `recvmmsg` for what arrives, `sendmmsg` for what leaves, and UDP
//! GSO (one message carrying several equal-size datagrams) for packets of one batch that go to
//! the same address. Buffers are reused: a steady stream allocates nothing here.

use std::io;
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsRawFd;

/// Room for one datagram: more than any path MTU carries, so nothing is ever truncated.
pub const MAX_DATAGRAM: usize = 2048;
/// Linux's `UDP_SEGMENT` (not in the `libc` crate for glibc targets).
const UDP_SEGMENT: libc::c_int = 103;
/// The kernel's limits on one GSO message.
const MAX_GSO_SEGMENTS: usize = 64;
const MAX_GSO_BYTES: usize = 65_000;
/// At most this many messages per `sendmmsg` call (the kernel's UIO_MAXIOV).
const MAX_MESSAGES_PER_CALL: usize = 1024;

/// Datagrams received by one `recvmmsg`.
pub struct RecvBatch {
    bufs: Vec<[u8; MAX_DATAGRAM]>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    len: usize,
}

impl RecvBatch {
    pub fn new(capacity: usize) -> RecvBatch {
        let capacity = capacity.max(1);
        RecvBatch {
            bufs: vec![[0; MAX_DATAGRAM]; capacity],
            // SAFETY: all-zero is a valid value of these plain C structs.
            addrs: vec![unsafe { std::mem::zeroed() }; capacity],
            iovs: vec![
                libc::iovec {
                    iov_base: std::ptr::null_mut(),
                    iov_len: 0
                };
                capacity
            ],
            hdrs: vec![unsafe { std::mem::zeroed() }; capacity],
            len: 0,
        }
    }

    pub fn capacity(&self) -> usize {
        self.bufs.len()
    }

    /// Receives what is queued on `socket`, up to the capacity, without waiting. `Ok(0)` when
    /// nothing is queued.
    pub fn recv(&mut self, socket: &impl AsRawFd) -> io::Result<usize> {
        self.len = 0;
        for i in 0..self.bufs.len() {
            self.iovs[i] = libc::iovec {
                iov_base: self.bufs[i].as_mut_ptr().cast(),
                iov_len: MAX_DATAGRAM,
            };
            let h = &mut self.hdrs[i];
            h.msg_hdr.msg_name = (&mut self.addrs[i] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = std::mem::size_of::<libc::sockaddr_storage>() as u32;
            h.msg_hdr.msg_iov = &mut self.iovs[i];
            h.msg_hdr.msg_iovlen = 1;
            h.msg_hdr.msg_control = std::ptr::null_mut();
            h.msg_hdr.msg_controllen = 0;
            h.msg_hdr.msg_flags = 0;
            h.msg_len = 0;
        }
        // SAFETY: every header points at live buffers of the stated sizes owned by `self`.
        let n = unsafe {
            libc::recvmmsg(
                socket.as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as u32,
                libc::MSG_DONTWAIT,
                std::ptr::null_mut(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            return match e.kind() {
                io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted => Ok(0),
                _ => Err(e),
            };
        }
        self.len = n as usize;
        Ok(self.len)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The `i`th datagram received and its source; `None` past the end or for an address
    /// family other than IPv4 and IPv6.
    pub fn get(&self, i: usize) -> Option<(SocketAddr, &[u8])> {
        if i >= self.len {
            return None;
        }
        let from = from_sockaddr(&self.addrs[i])?;
        let len = (self.hdrs[i].msg_len as usize).min(MAX_DATAGRAM);
        Some((from, &self.bufs[i][..len]))
    }
}

/// Counters of a [`SendBatch`].
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SendStats {
    pub datagrams: u64,
    pub syscalls: u64,
    /// Messages that carried several datagrams (GSO).
    pub gso_messages: u64,
    /// Datagrams the kernel refused (unreachable address family, a full buffer after retries).
    pub failed: u64,
}

struct Queued {
    /// Datagrams with the same key go to the same address and may share a GSO message.
    key: u32,
    to: SocketAddr,
    data: Vec<u8>,
}

/// Datagrams waiting to be sent, and the reusable buffers they are written into.
pub struct SendBatch {
    queue: Vec<Queued>,
    pool: Vec<Vec<u8>>,
    order: Vec<(u32, u32)>,
    addrs: Vec<libc::sockaddr_storage>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
    cmsgs: Vec<[u64; 4]>,
    /// (first iovec, datagrams, segment size) of each message being built.
    runs: Vec<(usize, usize, usize)>,
    gso: bool,
    pub stats: SendStats,
}

impl SendBatch {
    /// `gso`: whether several datagrams to one address may go out as one message.
    pub fn new(gso: bool) -> SendBatch {
        SendBatch {
            queue: Vec::new(),
            pool: Vec::new(),
            order: Vec::new(),
            addrs: Vec::new(),
            iovs: Vec::new(),
            hdrs: Vec::new(),
            cmsgs: Vec::new(),
            runs: Vec::new(),
            gso,
            stats: SendStats::default(),
        }
    }

    /// An empty buffer to write one datagram into (reused after the previous flush).
    pub fn buffer(&mut self) -> Vec<u8> {
        self.pool
            .pop()
            .unwrap_or_else(|| Vec::with_capacity(MAX_DATAGRAM))
    }

    /// Gives back a buffer that was not queued.
    pub fn recycle(&mut self, mut buf: Vec<u8>) {
        buf.clear();
        self.pool.push(buf);
    }

    /// Queues a datagram. `key` names its destination (a connection): datagrams with the same
    /// key must have the same address and may be merged into one GSO message.
    pub fn push(&mut self, key: u32, to: SocketAddr, data: Vec<u8>) {
        self.queue.push(Queued { key, to, data });
    }

    pub fn len(&self) -> usize {
        self.queue.len()
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// The queued datagrams, in queue order, instead of sending them (unit tests).
    #[cfg(test)]
    pub fn drain_for_test(&mut self) -> Vec<Vec<u8>> {
        self.queue.drain(..).map(|q| q.data).collect()
    }

    /// Builds the messages a flush would send and returns how many datagrams they carry, then
    /// drops the queue without sending (benchmarks: the batch assembly without the syscall).
    pub fn assemble_and_discard(&mut self) -> usize {
        self.plan();
        let datagrams = self.hdrs.iter().map(|h| iov_count(&h.msg_hdr)).sum();
        for q in self.queue.drain(..) {
            let mut data = q.data;
            data.clear();
            self.pool.push(data);
        }
        datagrams
    }

    /// Sends everything queued (the queue is empty afterwards, whatever the kernel said).
    pub fn flush(&mut self, socket: &impl AsRawFd) {
        if self.queue.is_empty() {
            return;
        }
        self.plan();
        let fd = socket.as_raw_fd();
        let mut first = 0;
        while first < self.hdrs.len() {
            let count = (self.hdrs.len() - first).min(MAX_MESSAGES_PER_CALL);
            first += self.send_messages(fd, first, count);
        }
        for q in self.queue.drain(..) {
            let mut data = q.data;
            data.clear();
            self.pool.push(data);
        }
    }

    /// Orders the queue by destination (keeping each destination's order) and builds one
    /// message per datagram, or per GSO run of equal-size datagrams to one destination.
    fn plan(&mut self) {
        self.order.clear();
        self.order.extend(
            self.queue
                .iter()
                .enumerate()
                .map(|(i, q)| (q.key, i as u32)),
        );
        // (key, index): unstable sort keeps each key's datagrams in queue order, no allocation.
        self.order.sort_unstable();
        self.addrs.clear();
        self.iovs.clear();
        self.hdrs.clear();
        self.cmsgs.clear();
        self.runs.clear();
        let mut i = 0;
        while i < self.order.len() {
            let first = &self.queue[self.order[i].1 as usize];
            let segment = first.data.len();
            let mut count = 1;
            let mut bytes = segment;
            if self.gso {
                while i + count < self.order.len() && count < MAX_GSO_SEGMENTS {
                    let (key, index) = self.order[i + count];
                    let next = &self.queue[index as usize];
                    // One address per run (a connection checks several during ICE); all
                    // segments but the last have the run's size, the last may be shorter.
                    if key != first.key
                        || next.to != first.to
                        || next.data.len() > segment
                        || bytes + next.data.len() > MAX_GSO_BYTES
                    {
                        break;
                    }
                    count += 1;
                    bytes += next.data.len();
                    if next.data.len() < segment {
                        break;
                    }
                }
            }
            let iov_start = self.iovs.len();
            for k in 0..count {
                let q = &self.queue[self.order[i + k].1 as usize];
                self.iovs.push(libc::iovec {
                    iov_base: q.data.as_ptr() as *mut libc::c_void,
                    iov_len: q.data.len(),
                });
            }
            self.addrs.push(to_sockaddr(first.to));
            self.runs.push((iov_start, count, segment));
            i += count;
        }
        for m in 0..self.runs.len() {
            let (iov_start, count, segment) = self.runs[m];
            // SAFETY: all-zero is a valid mmsghdr; the pointers set below stay valid until the
            // queue is drained, after the send.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (&mut self.addrs[m] as *mut libc::sockaddr_storage).cast();
            h.msg_hdr.msg_namelen = sockaddr_len(&self.addrs[m]);
            h.msg_hdr.msg_iov = &mut self.iovs[iov_start];
            h.msg_hdr.msg_iovlen = count as _;
            if count > 1 {
                self.cmsgs.push([0; 4]);
                let c = self.cmsgs.last_mut().expect("just pushed");
                // SAFETY: the buffer holds CMSG_SPACE(2) bytes, aligned for cmsghdr.
                unsafe {
                    h.msg_hdr.msg_control = c.as_mut_ptr().cast();
                    h.msg_hdr.msg_controllen = libc::CMSG_SPACE(2) as _;
                    let cm = libc::CMSG_FIRSTHDR(&h.msg_hdr);
                    (*cm).cmsg_level = libc::SOL_UDP;
                    (*cm).cmsg_type = UDP_SEGMENT;
                    (*cm).cmsg_len = libc::CMSG_LEN(2) as _;
                    std::ptr::write_unaligned(libc::CMSG_DATA(cm).cast::<u16>(), segment as u16);
                }
                self.stats.gso_messages += 1;
            }
            self.hdrs.push(h);
        }
        // The cmsg buffers may have moved while growing: point the messages at their final place.
        let mut c = 0;
        for h in &mut self.hdrs {
            if !h.msg_hdr.msg_control.is_null() {
                h.msg_hdr.msg_control = self.cmsgs[c].as_mut_ptr().cast();
                c += 1;
            }
        }
    }

    /// Sends messages `first..first + count`; returns how many were dealt with (sent or given
    /// up), at least one.
    fn send_messages(&mut self, fd: libc::c_int, first: usize, count: usize) -> usize {
        let mut retries = 0;
        loop {
            // SAFETY: the headers, addresses, iovecs and control buffers built by `plan` are live.
            let n = unsafe { libc::sendmmsg(fd, self.hdrs[first..].as_mut_ptr(), count as u32, 0) };
            self.stats.syscalls += 1;
            if n > 0 {
                let sent: usize = self.hdrs[first..first + n as usize]
                    .iter()
                    .map(|h| iov_count(&h.msg_hdr))
                    .sum();
                self.stats.datagrams += sent as u64;
                return n as usize;
            }
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) if retries < 3 => {
                    // The send buffer is full: wait briefly for room rather than drop.
                    retries += 1;
                    let mut pfd = libc::pollfd {
                        fd,
                        events: libc::POLLOUT,
                        revents: 0,
                    };
                    // SAFETY: one valid pollfd.
                    unsafe { libc::poll(&mut pfd, 1, 5) };
                }
                Some(libc::EIO) if self.hdrs[first].msg_hdr.msg_iovlen > 1 => {
                    // The device cannot segment: send this run's datagrams one by one from now on.
                    self.gso = false;
                    return self.send_unsegmented(fd, first);
                }
                _ => {
                    // This message cannot go (say an IPv6 destination on an IPv4 socket): skip it.
                    let lost = self.hdrs[first].msg_hdr.msg_iovlen as u64;
                    self.stats.failed += lost;
                    tracing::debug!("sendmmsg: {e}; {lost} datagram(s) dropped");
                    return 1;
                }
            }
        }
    }

    /// Sends the datagrams of GSO message `index` separately.
    fn send_unsegmented(&mut self, fd: libc::c_int, index: usize) -> usize {
        let h = self.hdrs[index].msg_hdr;
        for k in 0..iov_count(&h) {
            // SAFETY: the message's iovecs are live; one datagram per sendmsg.
            let mut single: libc::msghdr = unsafe { std::mem::zeroed() };
            single.msg_name = h.msg_name;
            single.msg_namelen = h.msg_namelen;
            single.msg_iov = unsafe { h.msg_iov.add(k) };
            single.msg_iovlen = 1;
            let n = unsafe { libc::sendmsg(fd, &single, 0) };
            self.stats.syscalls += 1;
            if n < 0 {
                self.stats.failed += 1;
            } else {
                self.stats.datagrams += 1;
            }
        }
        1
    }
}

/// Datagrams in a message (`msg_iovlen` is a `usize` on glibc, an `int` elsewhere).
#[allow(clippy::unnecessary_cast)]
fn iov_count(h: &libc::msghdr) -> usize {
    h.msg_iovlen as usize
}

fn to_sockaddr(addr: SocketAddr) -> libc::sockaddr_storage {
    // SAFETY: all-zero is a valid sockaddr_storage; the casts write within its size.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    match addr {
        SocketAddr::V4(a) => {
            let sin = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in) };
            sin.sin_family = libc::AF_INET as libc::sa_family_t;
            sin.sin_port = a.port().to_be();
            sin.sin_addr.s_addr = u32::from(*a.ip()).to_be();
        }
        SocketAddr::V6(a) => {
            let sin6 = unsafe { &mut *(&mut storage as *mut _ as *mut libc::sockaddr_in6) };
            sin6.sin6_family = libc::AF_INET6 as libc::sa_family_t;
            sin6.sin6_port = a.port().to_be();
            sin6.sin6_addr.s6_addr = a.ip().octets();
            sin6.sin6_flowinfo = a.flowinfo();
            sin6.sin6_scope_id = a.scope_id();
        }
    }
    storage
}

fn sockaddr_len(storage: &libc::sockaddr_storage) -> libc::socklen_t {
    if storage.ss_family == libc::AF_INET as libc::sa_family_t {
        std::mem::size_of::<libc::sockaddr_in>() as _
    } else {
        std::mem::size_of::<libc::sockaddr_in6>() as _
    }
}

fn from_sockaddr(storage: &libc::sockaddr_storage) -> Option<SocketAddr> {
    match storage.ss_family as libc::c_int {
        libc::AF_INET => {
            // SAFETY: the family says this storage holds a sockaddr_in.
            let sin = unsafe { &*(storage as *const _ as *const libc::sockaddr_in) };
            Some(SocketAddr::V4(SocketAddrV4::new(
                u32::from_be(sin.sin_addr.s_addr).into(),
                u16::from_be(sin.sin_port),
            )))
        }
        libc::AF_INET6 => {
            // SAFETY: the family says this storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(storage as *const _ as *const libc::sockaddr_in6) };
            Some(SocketAddr::V6(SocketAddrV6::new(
                sin6.sin6_addr.s6_addr.into(),
                u16::from_be(sin6.sin6_port),
                sin6.sin6_flowinfo,
                sin6.sin6_scope_id,
            )))
        }
        _ => None,
    }
}

/// Whether the kernel segments UDP for `socket` (probed once at start-up).
pub fn gso_supported(socket: &impl AsRawFd) -> bool {
    if !super::port::set_int_option(socket, libc::SOL_UDP, UDP_SEGMENT, 1200) {
        return false;
    }
    // Back to no default segmentation: only messages that ask for it are split.
    super::port::set_int_option(socket, libc::SOL_UDP, UDP_SEGMENT, 0);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::UdpSocket;
    use std::time::{Duration, Instant};

    fn loopback() -> UdpSocket {
        UdpSocket::bind("127.0.0.1:0").unwrap()
    }

    /// Everything `socket` receives within `wait`, as (from, bytes).
    fn drain(socket: &UdpSocket, expected: usize, wait: Duration) -> Vec<(SocketAddr, Vec<u8>)> {
        socket.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(8);
        let mut got = Vec::new();
        let deadline = Instant::now() + wait;
        while got.len() < expected && Instant::now() < deadline {
            let n = batch.recv(socket).unwrap();
            for i in 0..n {
                let (from, data) = batch.get(i).unwrap();
                got.push((from, data.to_vec()));
            }
            if n == 0 {
                std::thread::sleep(Duration::from_millis(1));
            }
        }
        got
    }

    #[test]
    fn a_batch_reaches_every_receiver_in_order_with_gso_runs() {
        let sender = loopback();
        let gso = gso_supported(&sender);
        println!("gso supported: {gso}");
        let receivers: Vec<UdpSocket> = (0..3).map(|_| loopback()).collect();
        let mut batch = SendBatch::new(gso);
        // Two "input packets", each to the three receivers (the SFU's pattern), then a short
        // third packet to receiver 0: receiver 0 gets 3 datagrams, the others 2, in order.
        for (n, size) in [(0u8, 1000usize), (1, 1000)] {
            for (k, r) in receivers.iter().enumerate() {
                let mut buf = batch.buffer();
                buf.resize(size, n);
                buf[0] = k as u8;
                batch.push(k as u32, r.local_addr().unwrap(), buf);
            }
        }
        let mut tail = batch.buffer();
        tail.extend_from_slice(&[0, 9, 9]);
        batch.push(0, receivers[0].local_addr().unwrap(), tail);
        batch.flush(&sender);
        assert!(batch.is_empty());
        assert_eq!(batch.stats.datagrams, 7, "{:?}", batch.stats);
        assert_eq!(batch.stats.failed, 0);
        if gso {
            // One message per receiver: 3 messages in one sendmmsg.
            assert_eq!(batch.stats.gso_messages, 3, "{:?}", batch.stats);
            assert_eq!(batch.stats.syscalls, 1);
        }
        for (k, r) in receivers.iter().enumerate() {
            let expected = if k == 0 { 3 } else { 2 };
            let got = drain(r, expected, Duration::from_secs(2));
            assert_eq!(got.len(), expected, "receiver {k}");
            assert!(
                got.iter()
                    .all(|(from, _)| *from == sender.local_addr().unwrap())
            );
            assert_eq!(got[0].1.len(), 1000);
            assert_eq!((got[0].1[0], got[0].1[1]), (k as u8, 0));
            assert_eq!((got[1].1[0], got[1].1[1]), (k as u8, 1));
            if k == 0 {
                assert_eq!(got[2].1, vec![0, 9, 9]);
            }
        }
        // Buffers were recycled: the next one comes from the pool, empty.
        assert!(batch.buffer().is_empty());
    }

    #[test]
    fn datagrams_of_one_key_to_several_addresses_are_never_merged() {
        // A connection's ICE checks go to each candidate address under the same key.
        let sender = loopback();
        let receivers: Vec<UdpSocket> = (0..3).map(|_| loopback()).collect();
        let mut batch = SendBatch::new(gso_supported(&sender));
        for r in &receivers {
            batch.push(7, r.local_addr().unwrap(), vec![0x01; 100]);
        }
        batch.flush(&sender);
        assert_eq!(batch.stats.gso_messages, 0, "{:?}", batch.stats);
        for r in &receivers {
            assert_eq!(drain(r, 1, Duration::from_secs(2)).len(), 1);
        }
    }

    #[test]
    fn an_unreachable_destination_is_counted_and_the_rest_still_go() {
        let sender = loopback();
        let receiver = loopback();
        let mut batch = SendBatch::new(gso_supported(&sender));
        let v6: SocketAddr = "[::1]:9".parse().unwrap();
        batch.push(0, v6, vec![1, 2, 3]); // IPv6 on an IPv4 socket
        batch.push(1, receiver.local_addr().unwrap(), vec![4, 5, 6]);
        batch.flush(&sender);
        assert_eq!(batch.stats.failed, 1);
        let got = drain(&receiver, 1, Duration::from_secs(2));
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].1, vec![4, 5, 6]);
    }

    #[test]
    fn receiving_from_an_empty_socket_does_not_wait() {
        let s = loopback();
        s.set_nonblocking(true).unwrap();
        let mut batch = RecvBatch::new(4);
        assert_eq!(batch.recv(&s).unwrap(), 0);
        assert!(batch.get(0).is_none());
    }
}
