//! The few socket calls tokio does not offer: pre-bind options on UDP
//! sockets, and `IP_PKTINFO`/`IPV6_PKTINFO` so a wildcard (NodePort) UDP
//! socket can answer from the address the client sent to. `socket2` makes
//! and binds the sockets; `nix` carries the control messages. One unsafe
//! call: handing a listener we own to tokio's reactor (`register`).

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::RawFd;

use nix::sys::socket::{
    recvmsg, sendmsg, setsockopt, sockopt, ControlMessage, ControlMessageOwned, MsgFlags,
    SockaddrStorage,
};
use socket2::{Domain, Socket, Type};
use tokio::io::unix::AsyncFd;
use tokio::net::UdpSocket;

/// Listen queue of every proxy TCP listener.
const BACKLOG: i32 = 1024;

/// A listening TCP socket with `SO_REUSEADDR` + `SO_REUSEPORT` (a restarted
/// proxy rebinds at once; wildcard NodePort and specific ClusterIP binds on
/// the same port coexist). IPv6 sockets are v6-only so `[::]` and `0.0.0.0`
/// do not collide.
///
/// A mio listener in tokio's reactor: its accepts (`accept4` with
/// `SOCK_NONBLOCK`) give sockets registered nowhere yet, for the worker
/// that serves them to register once ([`crate::workers`]).
pub(crate) fn tcp_listener(addr: SocketAddr) -> io::Result<mio::net::TcpListener> {
    let s = Socket::new(Domain::for_address(addr), Type::STREAM.nonblocking(), None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    // Linux copies it to every accepted socket: one setsockopt per
    // listener instead of one per connection.
    s.set_tcp_nodelay(true)?;
    s.bind(&addr.into())?;
    s.listen(BACKLOG)?;
    Ok(mio::net::TcpListener::from_std(s.into()))
}

/// Register a listener from [`tcp_listener`] with the runtime the caller
/// has entered: the loop that will accept on it
/// ([`crate::workers::Workers::spawn_next`]).
pub(crate) fn register(
    listener: mio::net::TcpListener,
) -> io::Result<AsyncFd<mio::net::TcpListener>> {
    // SAFETY: the AsyncFd owns the listener, so its descriptor stays open
    // and the same until the AsyncFd is dropped (what tokio cannot check).
    unsafe { AsyncFd::register_with_interest(listener, tokio::io::Interest::READABLE) }
        .map_err(io::Error::from)
}

/// A bound UDP socket with the same reuse options as [`tcp_listener`]. With
/// `pktinfo`, the kernel reports each datagram's destination address (needed
/// when bound to a wildcard address).
pub(crate) fn udp_socket(addr: SocketAddr, pktinfo: bool) -> io::Result<UdpSocket> {
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM.nonblocking(), None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
        if pktinfo {
            setsockopt(&s, sockopt::Ipv6RecvPacketInfo, &true)?;
        }
    } else if pktinfo {
        setsockopt(&s, sockopt::Ipv4PacketInfo, &true)?;
    }
    s.bind(&addr.into())?;
    UdpSocket::from_std(s.into())
}

/// A socket address as the standard library spells it.
fn std_addr(a: &SockaddrStorage) -> io::Result<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        Ok(SocketAddr::V4(SocketAddrV4::from(*v4)))
    } else if let Some(v6) = a.as_sockaddr_in6() {
        Ok(SocketAddr::V6(SocketAddrV6::from(*v6)))
    } else {
        Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "not an IP socket address",
        ))
    }
}

/// `recvmsg` on a non-blocking socket with pktinfo enabled: the datagram
/// length, the sender, and the local address it was sent to.
pub(crate) fn recv_pktinfo(
    fd: RawFd,
    buf: &mut [u8],
) -> io::Result<(usize, SocketAddr, Option<IpAddr>)> {
    let mut cmsg = nix::cmsg_space!(libc::in6_pktinfo);
    let mut iov = [IoSliceMut::new(buf)];
    let msg = recvmsg::<SockaddrStorage>(fd, &mut iov, Some(&mut cmsg), MsgFlags::empty())?;
    let peer = msg
        .address
        .as_ref()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "datagram without a sender"))
        .and_then(std_addr)?;
    let mut local = None;
    for c in msg.cmsgs()? {
        match c {
            ControlMessageOwned::Ipv4PacketInfo(info) => {
                local = Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    info.ipi_addr.s_addr,
                ))));
            }
            ControlMessageOwned::Ipv6PacketInfo(info) => {
                local = Some(IpAddr::from(info.ipi6_addr.s6_addr));
            }
            _ => {}
        }
    }
    Ok((msg.bytes, peer, local))
}

/// `sendmsg` with a pktinfo control message: send `buf` to `to` with source
/// address `from` (one of the host's addresses).
pub(crate) fn send_from(fd: RawFd, buf: &[u8], to: SocketAddr, from: IpAddr) -> io::Result<usize> {
    let iov = [IoSlice::new(buf)];
    let to = SockaddrStorage::from(to);
    let v4;
    let v6;
    let cmsg = match from {
        IpAddr::V4(ip) => {
            v4 = libc::in_pktinfo {
                ipi_ifindex: 0,
                ipi_spec_dst: libc::in_addr {
                    s_addr: u32::from(ip).to_be(),
                },
                ipi_addr: libc::in_addr { s_addr: 0 },
            };
            ControlMessage::Ipv4PacketInfo(&v4)
        }
        IpAddr::V6(ip) => {
            v6 = libc::in6_pktinfo {
                ipi6_addr: libc::in6_addr {
                    s6_addr: ip.octets(),
                },
                ipi6_ifindex: 0,
            };
            ControlMessage::Ipv6PacketInfo(&v6)
        }
    };
    Ok(sendmsg(fd, &iov, &[cmsg], MsgFlags::empty(), Some(&to))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        use std::os::fd::{FromRawFd, IntoRawFd};
        let l = tcp_listener("127.0.0.1:0".parse().unwrap()).unwrap();
        // SAFETY: the descriptor comes from into_raw_fd, owned once.
        let l = unsafe { std::net::TcpListener::from_raw_fd(l.into_raw_fd()) };
        l.set_nonblocking(false).unwrap();
        let _c = std::net::TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let (accepted, _) = l.accept().unwrap();
        assert!(accepted.nodelay().unwrap(), "TCP_NODELAY not inherited");
    }

    #[test]
    fn sockaddr_round_trip() {
        for a in [
            "127.0.0.55:8080".parse::<SocketAddr>().unwrap(),
            "[fd00::1]:53".parse().unwrap(),
        ] {
            assert_eq!(std_addr(&SockaddrStorage::from(a)).unwrap(), a);
        }
    }

    /// A datagram to a wildcard socket reports the address it was sent to,
    /// and an answer sent from that address arrives from it.
    #[test]
    fn pktinfo_reports_and_sets_the_local_address() {
        use std::os::fd::AsRawFd;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let server = udp_socket("0.0.0.0:0".parse().unwrap(), true).unwrap();
            let port = server.local_addr().unwrap().port();
            let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            client.send_to(b"hi", ("127.0.0.2", port)).unwrap();
            server.readable().await.unwrap();
            let mut buf = [0u8; 16];
            let (n, peer, local) = recv_pktinfo(server.as_raw_fd(), &mut buf).unwrap();
            assert_eq!(&buf[..n], b"hi");
            assert_eq!(peer, client.local_addr().unwrap());
            assert_eq!(local, Some("127.0.0.2".parse().unwrap()));
            send_from(server.as_raw_fd(), b"ho", peer, local.unwrap()).unwrap();
            let mut got = [0u8; 16];
            let (m, from) = client.recv_from(&mut got).unwrap();
            assert_eq!(&got[..m], b"ho");
            assert_eq!(from, SocketAddr::new("127.0.0.2".parse().unwrap(), port));
        });
    }
}
