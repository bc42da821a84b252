//! The one media port: a UDP socket per event loop, all bound to the same address
//! (`SO_REUSEPORT` when there are several), and never shared with another process.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Socket buffers large enough for bursts of many subscribers' packets (the kernel may cap
/// them at `net.core.{r,w}mem_max` unless the process may exceed it).
const SOCKET_BUFFER_BYTES: usize = 8 << 20;

#[derive(Debug, thiserror::Error)]
pub enum PortError {
    #[error(
        "media port {0} is in use by another process (another switchboard?): choose another media.udp_port"
    )]
    InUse(SocketAddr),
    #[error("cannot bind the media port {0}: {1}")]
    Bind(SocketAddr, io::Error),
}

/// Binds `count` sockets to `addr` (port 0: any free port, the same for all of them).
///
/// A port someone else holds is refused: the first bind is exclusive, and only once it has
/// succeeded is the port handed to this process's own `SO_REUSEPORT` group. (Between those two
/// binds, microseconds apart, a second server starting at the same instant could still slip in.)
pub fn bind(addr: SocketAddr, count: usize) -> Result<Vec<UdpSocket>, PortError> {
    let exclusive = new_socket(addr, false)?;
    let bound = exclusive
        .local_addr()
        .ok()
        .and_then(|a| a.as_socket())
        .unwrap_or(addr);
    if count <= 1 {
        return Ok(vec![exclusive.into()]);
    }
    drop(exclusive);
    (0..count)
        .map(|_| new_socket(bound, true).map(UdpSocket::from))
        .collect()
}

/// A socket of the port's `SO_REUSEPORT` group connected to one client: the kernel hands it that
/// client's datagrams in preference to the group's other sockets.
pub fn connected(bound: SocketAddr, client: SocketAddr) -> Result<UdpSocket, PortError> {
    let socket = new_socket(bound, true)?;
    socket
        .connect(&client.into())
        .map_err(|e| PortError::Bind(bound, e))?;
    Ok(socket.into())
}

fn new_socket(addr: SocketAddr, reuse_port: bool) -> Result<Socket, PortError> {
    let err = |e| PortError::Bind(addr, e);
    let socket =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(err)?;
    if reuse_port {
        socket.set_reuse_port(true).map_err(err)?;
    }
    socket.set_nonblocking(true).map_err(err)?;
    grow_buffers(&socket);
    set_dont_fragment(&socket, addr.is_ipv4());
    match socket.bind(&addr.into()) {
        Ok(()) => Ok(socket),
        Err(e) if e.kind() == io::ErrorKind::AddrInUse => Err(PortError::InUse(addr)),
        Err(e) => Err(err(e)),
    }
}

/// Datagrams leave with Don't Fragment set and are never fragmented locally (media packets fit
/// the path MTU by design). Besides, the kernel then numbers IPv4 datagrams with a per-socket
/// counter instead of hashing each one (`__ip_select_ident`, 3% of the server's CPU).
pub fn set_dont_fragment(socket: &impl std::os::fd::AsRawFd, ipv4: bool) {
    let (level, option, value) = if ipv4 {
        (
            libc::IPPROTO_IP,
            libc::IP_MTU_DISCOVER,
            libc::IP_PMTUDISC_PROBE,
        )
    } else {
        (
            libc::IPPROTO_IPV6,
            libc::IPV6_MTU_DISCOVER,
            libc::IPV6_PMTUDISC_PROBE,
        )
    };
    // Failing leaves the default, which also works.
    set_int_option(socket, level, option, value);
}

/// Larger receive and send buffers: beyond the system's cap when the process may (as root in a
/// container or test namespace), else up to it.
fn grow_buffers(socket: &Socket) {
    let bytes = SOCKET_BUFFER_BYTES as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        if !set_int_option(socket, libc::SOL_SOCKET, force, bytes) {
            set_int_option(socket, libc::SOL_SOCKET, plain, bytes);
        }
    }
}

/// Sets an `int` socket option; whether the kernel took it.
pub fn set_int_option(
    socket: &impl std::os::fd::AsRawFd,
    level: libc::c_int,
    option: libc::c_int,
    value: libc::c_int,
) -> bool {
    // SAFETY: an int option, passed by pointer with its size, on a valid socket.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            level,
            option,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as _,
        ) == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_sockets_share_one_port() {
        let sockets = bind("127.0.0.1:0".parse().unwrap(), 3).unwrap();
        let ports: Vec<u16> = sockets
            .iter()
            .map(|s| s.local_addr().unwrap().port())
            .collect();
        assert_ne!(ports[0], 0);
        assert!(ports.iter().all(|p| *p == ports[0]), "{ports:?}");
    }

    #[test]
    fn a_connected_socket_gets_its_clients_datagrams() {
        let group = bind("127.0.0.1:0".parse().unwrap(), 2).unwrap();
        let port = group[0].local_addr().unwrap();
        let clients: Vec<UdpSocket> = (0..8)
            .map(|_| UdpSocket::bind("127.0.0.1:0").unwrap())
            .collect();
        let direct: Vec<UdpSocket> = clients
            .iter()
            .map(|c| connected(port, c.local_addr().unwrap()).unwrap())
            .collect();
        for (c, d) in clients.iter().zip(&direct) {
            c.send_to(b"hi", port).unwrap();
            d.set_nonblocking(false).unwrap();
            d.set_read_timeout(Some(std::time::Duration::from_secs(2)))
                .unwrap();
            let mut buf = [0u8; 8];
            let (n, from) = d.recv_from(&mut buf).unwrap();
            assert_eq!((&buf[..n], from), (&b"hi"[..], c.local_addr().unwrap()));
        }
        // A client without a connected socket still reaches the group.
        let stranger = UdpSocket::bind("127.0.0.1:0").unwrap();
        stranger.send_to(b"yo", port).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(50));
        let mut buf = [0u8; 8];
        let got = group
            .iter()
            .filter(|s| s.recv_from(&mut buf).is_ok_and(|(n, _)| &buf[..n] == b"yo"))
            .count();
        assert_eq!(got, 1);
    }

    #[test]
    fn a_port_in_use_is_refused_with_a_clear_error() {
        for count in [1, 2] {
            let first = bind("127.0.0.1:0".parse().unwrap(), count).unwrap();
            let addr = first[0].local_addr().unwrap();
            for again in [1, 2] {
                let err = bind(addr, again).unwrap_err();
                assert!(matches!(err, PortError::InUse(a) if a == addr), "{err}");
                assert!(err.to_string().contains("in use"), "{err}");
            }
            // A plain socket of another program, too.
            let plain = UdpSocket::bind("127.0.0.1:0").unwrap();
            let err = bind(plain.local_addr().unwrap(), count).unwrap_err();
            assert!(matches!(err, PortError::InUse(_)), "{err}");
        }
    }
}
