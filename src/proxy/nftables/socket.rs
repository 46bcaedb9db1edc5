//! The nf_tables netlink socket: sends a batch ([`super::netlink`]) and
//! reads what the kernel answers. Blocking calls (a batch is processed
//! inside `send`); the proxy runs them off the async runtime's workers.
//!
//! How a transaction is confirmed: messages in the batch carry no ACK
//! request, so the kernel answers only failures. Right after the batch we
//! send `NFT_MSG_GETGEN` with an ACK request; netlink answers in order, so
//! once its reply arrives every failure of the batch has too, and the
//! reply carries the ruleset generation our commit produced (the periodic
//! check compares it with the kernel's current one).

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::PathBuf;

use super::diff::Op;
use super::netlink::{self, FinishedBatch};
use super::ruleset::{table_name, TableId};

/// Receive buffer asked for (errors of a large failed batch must fit).
const RCVBUF: usize = 8 << 20;

/// Why a transaction failed.
#[derive(Debug, thiserror::Error)]
pub enum TxError {
    #[error("netlink: {0}")]
    Io(#[from] io::Error),
    /// The kernel rejected the batch (nothing was applied). `op` is the
    /// index of the operation whose message failed, if known.
    #[error("kernel rejected {what}: {source}")]
    Rejected {
        what: String,
        op: Option<usize>,
        #[source]
        source: io::Error,
    },
}

/// A `NETLINK_NETFILTER` socket, optionally in another network namespace.
pub struct Socket {
    fd: OwnedFd,
    seq: u32,
    sndbuf: usize,
    buf: Vec<u8>,
}

/// Where `/run/netns/<name>` style namespaces live.
fn netns_path(netns: &str) -> PathBuf {
    if netns.contains('/') {
        PathBuf::from(netns)
    } else {
        PathBuf::from("/run/netns").join(netns)
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn setsockopt_int(
    fd: &OwnedFd,
    level: libc::c_int,
    opt: libc::c_int,
    v: libc::c_int,
) -> io::Result<()> {
    // SAFETY: a valid fd and a pointer to a c_int of the given size.
    cvt(unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            opt,
            &v as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    })
    .map(|_| ())
}

fn open_here() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the fd is owned right away.
    let fd = cvt(unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_NETFILTER,
        )
    })?;
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: sockaddr_nl is plain data; zeroed = "kernel assigns the port".
    let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
    addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
    // SAFETY: addr is a valid sockaddr_nl of the given size.
    cvt(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
            std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
        )
    })?;
    // Errors without a copy of the failed message (a rule can be large).
    let _ = setsockopt_int(&fd, libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
    if setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUFFORCE, RCVBUF as i32).is_err() {
        let _ = setsockopt_int(&fd, libc::SOL_SOCKET, libc::SO_RCVBUF, RCVBUF as i32);
    }
    Ok(fd)
}

impl Socket {
    /// Open a socket in this process's network namespace, or in `netns`
    /// (a name under /run/netns, or a path): the socket is created by a
    /// thread that entered the namespace, and stays bound to it.
    pub fn open(netns: Option<&str>) -> io::Result<Socket> {
        let fd = match netns {
            None => open_here()?,
            Some(ns) => {
                let path = netns_path(ns);
                std::thread::spawn(move || -> io::Result<OwnedFd> {
                    let f = File::open(&path).map_err(|e| {
                        io::Error::new(e.kind(), format!("{}: {e}", path.display()))
                    })?;
                    // SAFETY: setns on this (short-lived) thread only.
                    cvt(unsafe { libc::setns(f.as_raw_fd(), libc::CLONE_NEWNET) })?;
                    open_here()
                })
                .join()
                .map_err(|_| io::Error::other("netns thread panicked"))??
            }
        };
        let seed = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(1);
        Ok(Socket {
            fd,
            seq: seed,
            sndbuf: 0,
            buf: vec![0u8; 1 << 20],
        })
    }

    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1);
        self.seq
    }

    fn send(&mut self, bytes: &[u8]) -> io::Result<()> {
        // A batch goes to the kernel as one message; the socket's send
        // buffer must hold it.
        if bytes.len() + 65536 > self.sndbuf {
            let want = (bytes.len() + 65536).next_power_of_two();
            let v = want.min(i32::MAX as usize) as i32;
            if setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, v).is_err() {
                setsockopt_int(&self.fd, libc::SOL_SOCKET, libc::SO_SNDBUF, v)?;
            }
            self.sndbuf = want;
        }
        // SAFETY: sockaddr_nl zeroed = the kernel (pid 0).
        let mut addr: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        addr.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        loop {
            // SAFETY: bytes and addr are valid for the call.
            let r = unsafe {
                libc::sendto(
                    self.fd.as_raw_fd(),
                    bytes.as_ptr() as *const libc::c_void,
                    bytes.len(),
                    0,
                    &addr as *const libc::sockaddr_nl as *const libc::sockaddr,
                    std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if r as usize != bytes.len() {
                return Err(io::Error::other("short netlink send"));
            }
            return Ok(());
        }
    }

    /// Receive one datagram (one or more messages) into `self.buf`.
    fn recv(&mut self) -> io::Result<usize> {
        loop {
            // SAFETY: buf is valid for its length.
            let r = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    self.buf.as_mut_ptr() as *mut libc::c_void,
                    self.buf.len(),
                    0,
                )
            };
            if r < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            return Ok(r as usize);
        }
    }

    /// Send `ops`, each on its table (`base` names the main table), as one
    /// transaction. Ok: applied, with the ruleset generation after it.
    /// Err: nothing was applied.
    pub fn transact(
        &mut self,
        base: &str,
        ops: &[(TableId, Op)],
    ) -> Result<(FinishedBatch, u32), TxError> {
        let seq = self.next_seq();
        let batch = netlink::encode(base, ops, seq);
        self.transact_batch(batch, &|i| {
            ops.get(i).map(|(t, o)| {
                let mut s = String::new();
                o.render(&table_name(base, *t), &mut s);
                s
            })
        })
    }

    /// The sequence number the next batch must start from
    /// ([`netlink::Batch::new`]).
    pub fn batch_seq(&mut self) -> u32 {
        self.next_seq()
    }

    /// Send a batch built by the caller (from [`Socket::batch_seq`]) as one
    /// transaction; `describe` renders the operation with a given index,
    /// for the error when the kernel rejects it.
    pub fn transact_batch(
        &mut self,
        batch: FinishedBatch,
        describe: &dyn Fn(usize) -> Option<String>,
    ) -> Result<(FinishedBatch, u32), TxError> {
        self.seq = batch.next_seq;
        self.send(&batch.bytes)?;
        let gen_seq = self.next_seq();
        self.send(&netlink::getgen_request(gen_seq))?;
        let mut failure: Option<(u32, i32)> = None;
        let mut genid = None;
        'read: loop {
            let n = match self.recv() {
                Ok(n) => n,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => {
                    // Lost answers: only a (huge) failure produces that
                    // many; the reply to GETGEN may be lost too.
                    return Err(TxError::Rejected {
                        what: "the batch".into(),
                        op: None,
                        source: e,
                    });
                }
                Err(e) => return Err(e.into()),
            };
            for m in netlink::messages(&self.buf[..n]) {
                if m.ty == netlink::NLMSG_ERROR {
                    let code = netlink::error_code(m.payload);
                    if m.seq == gen_seq {
                        if code != 0 {
                            return Err(io::Error::from_raw_os_error(-code).into());
                        }
                        break 'read;
                    }
                    let ours = m.seq.wrapping_sub(batch.first_seq)
                        <= batch.last_seq.wrapping_sub(batch.first_seq);
                    if code != 0 && ours && failure.is_none() {
                        failure = Some((m.seq, code));
                    }
                } else if m.seq == gen_seq
                    && netlink::nft_type(m.ty) == Some(netlink::NFT_MSG_NEWGEN)
                {
                    genid = gen_id(m.payload);
                }
            }
        }
        if let Some((seq, code)) = failure {
            let op = batch.op_index(seq);
            let what = match op.and_then(describe) {
                Some(s) => format!("`{s}`"),
                None => "the batch".to_string(),
            };
            return Err(TxError::Rejected {
                what,
                op,
                source: io::Error::from_raw_os_error(-code),
            });
        }
        let genid = genid.ok_or_else(|| io::Error::other("no generation in the GETGEN reply"))?;
        Ok((batch, genid))
    }

    /// Send dump request `request` (sequence `seq`) and hand the body
    /// (after the nfgenmsg header) of every reply message of nf_tables
    /// type `ty` to `each`. Ok(false): the kernel answered ENOENT (the
    /// table, chain or set does not exist).
    fn dump(
        &mut self,
        request: &[u8],
        seq: u32,
        ty: u16,
        each: &mut dyn FnMut(&[u8]),
    ) -> io::Result<bool> {
        let answered = self.request(request, seq, &mut |t, payload| {
            if netlink::nft_type(t) == Some(ty) {
                each(payload.get(4..).unwrap_or_default());
            }
        });
        match answered {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Send one request of any netfilter subsystem (sequence `seq`, from
    /// [`Socket::batch_seq`]) and hand every reply message, (netlink type,
    /// payload after the netlink header), to `each` until the dump ends or
    /// the request is acknowledged. An error answer is returned as its
    /// errno.
    pub fn request(
        &mut self,
        request: &[u8],
        seq: u32,
        each: &mut dyn FnMut(u16, &[u8]),
    ) -> io::Result<()> {
        self.send(request)?;
        loop {
            let n = self.recv()?;
            for m in netlink::messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    netlink::NLMSG_DONE => return Ok(()),
                    netlink::NLMSG_ERROR => {
                        return match netlink::error_code(m.payload) {
                            0 => Ok(()),
                            code => Err(io::Error::from_raw_os_error(-code)),
                        };
                    }
                    t => each(t, m.payload),
                }
            }
        }
    }

    /// The names of every `ip` table in the ruleset.
    pub fn tables(&mut self) -> io::Result<Vec<String>> {
        let seq = self.next_seq();
        let mut names = Vec::new();
        self.dump(
            &netlink::gettable_request(seq),
            seq,
            netlink::NFT_MSG_NEWTABLE,
            &mut |body| {
                for (ty, v) in netlink::attrs(body) {
                    if ty == netlink::NFTA_TABLE_NAME {
                        let name = v.split(|b| *b == 0).next().unwrap_or_default();
                        names.push(String::from_utf8_lossy(name).into_owned());
                    }
                }
            },
        )?;
        Ok(names)
    }

    /// The kernel's current ruleset generation (any commit by anyone
    /// changes it).
    pub fn generation(&mut self) -> io::Result<u32> {
        let seq = self.next_seq();
        self.send(&netlink::getgen_request(seq))?;
        let mut genid = None;
        loop {
            let n = self.recv()?;
            for m in netlink::messages(&self.buf[..n]) {
                if m.seq != seq {
                    continue;
                }
                if m.ty == netlink::NLMSG_ERROR {
                    let code = netlink::error_code(m.payload);
                    if code != 0 {
                        return Err(io::Error::from_raw_os_error(-code));
                    }
                    return genid.ok_or_else(|| io::Error::other("no generation in the reply"));
                }
                if netlink::nft_type(m.ty) == Some(netlink::NFT_MSG_NEWGEN) {
                    genid = gen_id(m.payload);
                }
            }
        }
    }

    /// The rules of chain `chain` in table `table`, as (handle, comment).
    pub fn rule_comments(&mut self, table: &str, chain: &str) -> io::Result<Vec<(u64, String)>> {
        let seq = self.next_seq();
        let mut rules = Vec::new();
        let found = self.dump(
            &netlink::getrule_request(table, chain, seq),
            seq,
            netlink::NFT_MSG_NEWRULE,
            &mut |body| rules.extend(netlink::rule_handle_comment(body)),
        )?;
        if !found {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        Ok(rules)
    }

    /// The keys of set `set` in table `table`; `None` when the table or
    /// the set does not exist.
    pub fn set_keys(&mut self, table: &str, set: &str) -> io::Result<Option<Vec<Vec<u8>>>> {
        let seq = self.next_seq();
        let mut keys = Vec::new();
        let found = self.dump(
            &netlink::getsetelem_request(table, set, seq),
            seq,
            netlink::NFT_MSG_NEWSETELEM,
            &mut |body| {
                for (ty, list) in netlink::attrs(body) {
                    if ty != netlink::NFTA_SET_ELEM_LIST_ELEMENTS {
                        continue;
                    }
                    for (_, elem) in netlink::attrs(list) {
                        for (ty, key) in netlink::attrs(elem) {
                            if ty != netlink::NFTA_SET_ELEM_KEY {
                                continue;
                            }
                            for (ty, v) in netlink::attrs(key) {
                                if ty == netlink::NFTA_DATA_VALUE {
                                    keys.push(v.to_vec());
                                }
                            }
                        }
                    }
                }
            },
        )?;
        Ok(found.then_some(keys))
    }
}

fn gen_id(payload: &[u8]) -> Option<u32> {
    netlink::attrs(payload.get(4..)?)
        .find(|(ty, _)| *ty == netlink::NFTA_GEN_ID)
        .and_then(|(_, v)| v.try_into().ok())
        .map(u32::from_be_bytes)
}
