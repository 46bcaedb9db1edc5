//! The kernel's routing netlink (`NETLINK_ROUTE`): links, addresses,
//! routes and named network namespaces, the few things the node needs
//! from `ip` (iproute2), spoken directly through the `rtnetlink` crate.
//!
//! Why not run `ip`: the container image (`docker/Containerfile`) holds
//! one static binary and nothing else, and a DaemonSet's image rarely has
//! iproute2; a syscall is also cheaper than a process per change.
//!
//! Users:
//! * the userspace proxy's Service IPs on a dummy link or `lo`
//!   (`proxy::userspace::addrs`), cluster DNS's address on `lo` and
//!   `--cleanup` (`node`);
//! * routes to other nodes' podCIDRs (`node::routes`);
//! * the pod network: bridge, veth pairs, pod namespaces
//!   (`kubelet::network`).
//!
//! [`Rtnl`] is one connection, in this process's namespace or in a named
//! one (`/run/netns/<name>`, as `ip netns` makes them: [`add_netns`],
//! [`del_netns`]). Errors are `io::Error`s carrying the kernel's errno, so
//! callers can tell "exists" (`EEXIST`) and "not there" (`ENODEV`,
//! `EADDRNOTAVAIL`, `ESRCH`) from real failures.

use std::fs::File;
use std::io;
use std::net::{IpAddr, Ipv4Addr};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use futures::stream::{StreamExt, TryStreamExt};
use rtnetlink::packet_route::address::{AddressAttribute, AddressFlags, AddressScope};
use rtnetlink::packet_route::link::{InfoData, InfoKind, InfoVeth};
use rtnetlink::packet_route::route::{RouteAddress, RouteAttribute, RouteProtocol, RouteScope};
use rtnetlink::{LinkMessageBuilder, LinkUnspec, RouteMessageBuilder};

/// Where named network namespaces are bind-mounted (as `ip netns`).
pub const NETNS_DIR: &str = "/run/netns";

/// The main routing table.
const RT_TABLE_MAIN: u8 = 254;

/// How many requests are in flight at once when many addresses change.
const PIPELINE: usize = 64;

/// The path of namespace `netns`: a name under [`NETNS_DIR`], or a path.
pub fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        Path::new(NETNS_DIR).join(netns)
    }
}

fn to_io(e: rtnetlink::Error) -> io::Error {
    match e {
        rtnetlink::Error::NetlinkError(m) => m.to_io(),
        other => io::Error::other(other.to_string()),
    }
}

/// Whether `e` is the kernel's `errno`.
pub fn is_errno(e: &io::Error, errno: i32) -> bool {
    e.raw_os_error() == Some(errno)
}

/// An address on a link, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Addr {
    pub ip: IpAddr,
    pub prefix: u8,
    /// IPv4 label (`lo:fairlead`); IPv6 addresses have none.
    pub label: Option<String>,
    /// Link-scope (IPv6 `fe80::`): never one of ours.
    pub link_scope: bool,
}

/// How a new link is made.
pub enum NewLink<'a> {
    Dummy,
    Bridge,
    /// A veth pair: this end, and its peer named `peer` created directly
    /// in namespace `peer_netns`.
    Veth {
        peer: &'a str,
        peer_netns: &'a str,
    },
}

/// One routing-netlink connection. Its I/O runs on a task of the current
/// tokio runtime, stopped when the connection is dropped.
pub struct Rtnl {
    handle: rtnetlink::Handle,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Rtnl {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Rtnl {
    /// A connection in this process's network namespace.
    pub fn open() -> io::Result<Rtnl> {
        let (conn, handle, _) = rtnetlink::new_connection()?;
        Ok(Rtnl {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// A connection in namespace `netns`: the socket is created by a
    /// thread that entered it, and stays bound to it for its life.
    pub fn open_in(netns: &str) -> io::Result<Rtnl> {
        let path = netns_path(netns);
        let fd = std::thread::spawn(move || -> io::Result<OwnedFd> {
            let f = File::open(&path)
                .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
            // Only this short-lived thread changes namespace.
            nix::sched::setns(&f, nix::sched::CloneFlags::CLONE_NEWNET)?;
            let s = rtnetlink::sys::Socket::new(rtnetlink::sys::protocols::NETLINK_ROUTE)?;
            // SAFETY: into_raw_fd gives up ownership of an open socket.
            Ok(unsafe { OwnedFd::from_raw_fd(s.into_raw_fd()) })
        })
        .join()
        .map_err(|_| io::Error::other("netns thread panicked"))??;
        // SAFETY: the fd is an open netlink socket we own; TokioSocket
        // takes it over (and makes it non-blocking).
        let socket = unsafe { rtnetlink::sys::TokioSocket::from_raw_fd(fd.into_raw_fd()) };
        let (conn, handle, _) = rtnetlink::from_socket(socket);
        Ok(Rtnl {
            handle,
            task: tokio::spawn(conn),
        })
    }

    /// The index of link `name`, if it exists.
    pub async fn link_index(&self, name: &str) -> io::Result<Option<u32>> {
        let mut links = self
            .handle
            .link()
            .get()
            .match_name(name.to_string())
            .execute();
        match links.try_next().await {
            Ok(Some(l)) => Ok(Some(l.header.index)),
            Ok(None) => Ok(None),
            Err(e) => {
                let e = to_io(e);
                if is_errno(&e, libc::ENODEV) {
                    Ok(None)
                } else {
                    Err(e)
                }
            }
        }
    }

    async fn index(&self, name: &str) -> io::Result<u32> {
        self.link_index(name)
            .await?
            .ok_or_else(|| io::Error::from_raw_os_error(libc::ENODEV))
    }

    /// Create link `name`; `EEXIST` if it is there already.
    pub async fn add_link(&self, name: &str, kind: NewLink<'_>) -> io::Result<()> {
        // The peer's namespace, open until the kernel has the request
        // (the message carries only its fd number).
        let mut ns = None;
        let msg = match kind {
            NewLink::Dummy => rtnetlink::LinkDummy::new(name).build(),
            NewLink::Bridge => rtnetlink::LinkBridge::new(name).build(),
            NewLink::Veth { peer, peer_netns } => {
                let ns = ns.insert(File::open(netns_path(peer_netns))?);
                let peer = LinkMessageBuilder::<LinkUnspec>::new()
                    .name(peer.to_string())
                    .setns_by_fd(ns.as_raw_fd())
                    .build();
                LinkMessageBuilder::<LinkUnspec>::new_with_info_kind(InfoKind::Veth)
                    .name(name.to_string())
                    .set_info_data(InfoData::Veth(InfoVeth::Peer(peer)))
                    .build()
            }
        };
        let r = self.handle.link().add(msg).execute().await.map_err(to_io);
        drop(ns);
        r
    }

    /// Set link `name` up, and optionally its MAC address and its bridge.
    pub async fn set_link(
        &self,
        name: &str,
        mac: Option<[u8; 6]>,
        master: Option<&str>,
    ) -> io::Result<()> {
        let index = self.index(name).await?;
        let mut b = LinkUnspec::new_with_index(index).up();
        if let Some(mac) = mac {
            b = b.address(mac.to_vec());
        }
        if let Some(m) = master {
            b = b.controller(self.index(m).await?);
        }
        self.handle
            .link()
            .set(b.build())
            .execute()
            .await
            .map_err(to_io)
    }

    /// Delete link `name`; Ok(false) when there was none.
    pub async fn del_link(&self, name: &str) -> io::Result<bool> {
        let Some(index) = self.link_index(name).await? else {
            return Ok(false);
        };
        match self.handle.link().del(index).execute().await.map_err(to_io) {
            Ok(()) => Ok(true),
            Err(e) if is_errno(&e, libc::ENODEV) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// The addresses on link `name`.
    pub async fn addrs(&self, name: &str) -> io::Result<Vec<Addr>> {
        let index = self.index(name).await?;
        let msgs: Vec<_> = self
            .handle
            .address()
            .get()
            .set_link_index_filter(index)
            .execute()
            .try_collect()
            .await
            .map_err(to_io)?;
        Ok(msgs
            .into_iter()
            .filter_map(|m| {
                let mut ip = None;
                let mut label = None;
                for a in &m.attributes {
                    match a {
                        // IPv4: Local is the address, Address the peer
                        // (the same when there is none); IPv6: Address.
                        AddressAttribute::Local(x) => ip = Some(*x),
                        AddressAttribute::Address(x) if ip.is_none() => ip = Some(*x),
                        AddressAttribute::Label(l) => label = Some(l.clone()),
                        _ => {}
                    }
                }
                Some(Addr {
                    ip: ip?,
                    prefix: m.header.prefix_len,
                    label,
                    link_scope: m.header.scope == AddressScope::Link,
                })
            })
            .collect())
    }

    /// Add (or replace) host addresses (/32, /128) on link `name`, with
    /// `label` on the IPv4 ones. IPv6 ones skip duplicate address
    /// detection: otherwise they stay "tentative" for a while and bind(2)
    /// fails. Returns the addresses that failed, with why.
    pub async fn add_host_addrs(
        &self,
        name: &str,
        ips: &[IpAddr],
        label: Option<&str>,
    ) -> io::Result<Vec<(IpAddr, io::Error)>> {
        let index = self.index(name).await?;
        Ok(self
            .each(ips, |ip| {
                self.add_addr_at(index, ip, host_prefix(ip), label)
            })
            .await)
    }

    /// Add (or replace) `ip/prefix` on link `name`.
    pub async fn add_addr(
        &self,
        name: &str,
        ip: IpAddr,
        prefix: u8,
        label: Option<&str>,
    ) -> io::Result<()> {
        let index = self.index(name).await?;
        self.add_addr_at(index, ip, prefix, label).await
    }

    async fn add_addr_at(
        &self,
        index: u32,
        ip: IpAddr,
        prefix: u8,
        label: Option<&str>,
    ) -> io::Result<()> {
        let mut req = self.handle.address().add(index, ip, prefix).replace();
        let msg = req.message_mut();
        match ip {
            IpAddr::V4(_) => {
                if let Some(l) = label {
                    msg.attributes.push(AddressAttribute::Label(l.to_string()));
                }
            }
            IpAddr::V6(_) => msg
                .attributes
                .push(AddressAttribute::Flags(AddressFlags::Nodad)),
        }
        req.execute().await.map_err(to_io)
    }

    /// Remove host addresses from link `name`; one already gone counts as
    /// removed. Returns the ones that failed.
    pub async fn del_host_addrs(
        &self,
        name: &str,
        ips: &[IpAddr],
    ) -> io::Result<Vec<(IpAddr, io::Error)>> {
        let index = self.index(name).await?;
        Ok(self
            .each(ips, |ip| async move {
                let msg = match ip {
                    IpAddr::V4(a) => rtnetlink::AddressMessageBuilder::<Ipv4Addr>::new()
                        .index(index)
                        .address(a, 32)
                        .build(),
                    IpAddr::V6(a) => rtnetlink::AddressMessageBuilder::<std::net::Ipv6Addr>::new()
                        .index(index)
                        .address(a, 128)
                        .build(),
                };
                match self
                    .handle
                    .address()
                    .del(msg)
                    .execute()
                    .await
                    .map_err(to_io)
                {
                    Err(e) if is_errno(&e, libc::EADDRNOTAVAIL) => Ok(()),
                    r => r,
                }
            })
            .await)
    }

    /// Run `op` for every address, [`PIPELINE`] at a time; the failures.
    async fn each<'s, F, Fut>(&'s self, ips: &[IpAddr], op: F) -> Vec<(IpAddr, io::Error)>
    where
        F: Fn(IpAddr) -> Fut + 's,
        Fut: std::future::Future<Output = io::Result<()>> + 's,
    {
        futures::stream::iter(ips.iter().copied())
            .map(|ip| {
                let fut = op(ip);
                async move { (ip, fut.await) }
            })
            .buffer_unordered(PIPELINE)
            .filter_map(|(ip, r)| async move { r.err().map(|e| (ip, e)) })
            .collect()
            .await
    }

    /// IPv4 routes of the main table with protocol `proto`:
    /// (destination, prefix length, gateway).
    pub async fn routes_by_proto(&self, proto: u8) -> io::Result<Vec<(Ipv4Addr, u8, Ipv4Addr)>> {
        let msgs: Vec<_> = self
            .handle
            .route()
            .get(RouteMessageBuilder::<Ipv4Addr>::new().build())
            .execute()
            .try_collect()
            .await
            .map_err(to_io)?;
        Ok(msgs
            .into_iter()
            .filter(|m| m.header.table == RT_TABLE_MAIN && u8::from(m.header.protocol) == proto)
            .filter_map(|m| {
                let mut dst = Some(Ipv4Addr::UNSPECIFIED);
                let mut gw = None;
                for a in &m.attributes {
                    match a {
                        RouteAttribute::Destination(RouteAddress::Inet(d)) => dst = Some(*d),
                        RouteAttribute::Gateway(RouteAddress::Inet(g)) => gw = Some(*g),
                        _ => {}
                    }
                }
                Some((dst?, m.header.destination_prefix_length, gw?))
            })
            .collect())
    }

    /// `ip route replace <dst>/<prefix> via <gw> proto <proto>`.
    pub async fn replace_route(
        &self,
        dst: Ipv4Addr,
        prefix: u8,
        gw: Ipv4Addr,
        proto: u8,
    ) -> io::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .gateway(gw)
            .protocol(RouteProtocol::from(proto))
            .build();
        self.handle
            .route()
            .add(msg)
            .replace()
            .execute()
            .await
            .map_err(to_io)
    }

    /// Delete the main table's route to `dst/prefix` with protocol `proto`.
    pub async fn del_route(&self, dst: Ipv4Addr, prefix: u8, proto: u8) -> io::Result<()> {
        let msg = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .protocol(RouteProtocol::from(proto))
            .build();
        match self.handle.route().del(msg).execute().await.map_err(to_io) {
            Err(e) if is_errno(&e, libc::ESRCH) => Ok(()),
            r => r,
        }
    }

    /// A route through link `dev`: to `dst/prefix` on the link itself
    /// (`scope link`), or, with `gw`, via that gateway.
    pub async fn add_dev_route(
        &self,
        dev: &str,
        dst: Ipv4Addr,
        prefix: u8,
        gw: Option<Ipv4Addr>,
    ) -> io::Result<()> {
        let index = self.index(dev).await?;
        let mut b = RouteMessageBuilder::<Ipv4Addr>::new()
            .destination_prefix(dst, prefix)
            .output_interface(index);
        b = match gw {
            Some(g) => b.gateway(g),
            None => b.scope(RouteScope::Link),
        };
        self.handle
            .route()
            .add(b.build())
            .replace()
            .execute()
            .await
            .map_err(to_io)
    }

    /// Whether the kernel has a route to `ip` (`ip route get`).
    pub async fn route_to(&self, ip: IpAddr) -> io::Result<()> {
        let msg = match ip {
            IpAddr::V4(a) => RouteMessageBuilder::<Ipv4Addr>::new()
                .destination_prefix(a, 32)
                .build(),
            IpAddr::V6(a) => RouteMessageBuilder::<std::net::Ipv6Addr>::new()
                .destination_prefix(a, 128)
                .build(),
        };
        let mut routes = self.handle.route().get(msg).execute();
        routes.try_next().await.map_err(to_io).map(|_| ())
    }
}

/// The host's own address, for what it tells others (a Node's InternalIP,
/// the API server's advertised address when it binds 0.0.0.0): the first
/// IPv4 address of an interface that is up and not loopback, else
/// 127.0.0.1 (a host, or network namespace, with only `lo`).
pub fn host_ipv4() -> IpAddr {
    use nix::net::if_::InterfaceFlags;
    let found = nix::ifaddrs::getifaddrs().ok().and_then(|mut addrs| {
        addrs.find_map(|a| {
            let up = a.flags.contains(InterfaceFlags::IFF_UP);
            let lo = a.flags.contains(InterfaceFlags::IFF_LOOPBACK);
            if !up || lo {
                return None;
            }
            a.address?.as_sockaddr_in().map(|s| s.ip())
        })
    });
    IpAddr::V4(found.unwrap_or(Ipv4Addr::LOCALHOST))
}

fn host_prefix(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        32
    } else {
        128
    }
}

/// Create the named network namespace `name` (`ip netns add`): a new
/// namespace bind-mounted at `/run/netns/<name>`, so it lives on without
/// a process in it and `ip netns exec` finds it. `EEXIST` if the name is
/// taken.
///
/// `/run/netns` is made a shared mount first, as iproute2 does, so that
/// the unmount in [`del_netns`] reaches the copies in mount namespaces
/// made since (every pod has one); otherwise those copies keep deleted
/// namespaces alive.
pub fn add_netns(name: &str) -> io::Result<()> {
    use nix::mount::{mount, MsFlags};
    let dir = Path::new(NETNS_DIR);
    std::fs::create_dir_all(dir)?;
    let shared = |()| {
        mount(
            None::<&str>,
            dir,
            None::<&str>,
            MsFlags::MS_SHARED | MsFlags::MS_REC,
            None::<&str>,
        )
    };
    if shared(()).is_err() {
        // Not a mount point yet: make it one (bind onto itself), then share.
        mount(
            Some(dir),
            dir,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )?;
        shared(())?;
    }
    let path = dir.join(name);
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&path)?;
    let target = path.clone();
    let made = std::thread::spawn(move || -> io::Result<()> {
        // unshare(CLONE_NEWNET) moves only this thread, which then pins
        // its new namespace with a bind mount and ends.
        nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)?;
        mount(
            Some("/proc/thread-self/ns/net"),
            &target,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )?;
        Ok(())
    })
    .join()
    .map_err(|_| io::Error::other("netns thread panicked"))?;
    if let Err(e) = made {
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok(())
}

/// Remove the named network namespace `name` (`ip netns del`); Ok(false)
/// when there was none. The namespace itself goes once nothing else
/// holds it (its links, a veth pair among them, go with it).
pub fn del_netns(name: &str) -> io::Result<bool> {
    let path = netns_path(name);
    if !path.exists() {
        return Ok(false);
    }
    match nix::mount::umount2(&path, nix::mount::MntFlags::MNT_DETACH) {
        Ok(()) | Err(nix::errno::Errno::EINVAL) => {}
        Err(e) => return Err(e.into()),
    }
    std::fs::remove_file(&path)?;
    Ok(true)
}
