//! The table's operations ([`Op`]) as nf_tables netlink messages: one
//! batch (`NFNL_MSG_BATCH_BEGIN` … `NFNL_MSG_BATCH_END`) is one atomic
//! transaction. Pure encoding and parsing; [`super::socket`] sends it.
//!
//! Why not `nft -f`: the `nft` program first fetches the kernel's whole
//! table into its cache (every chain, and for most statements every rule),
//! so even a one-element change cost ~110 ms at 10,000 Services. The kernel
//! itself needs nothing of the sort: chains, sets and maps are referenced
//! by name. Why not a crate: `rustables` (GPL-3.0, so not for an Apache-2.0
//! project) and `nftnl` (libnftnl bindings) have no `numgen`, `fib`,
//! `dynset` or verdict-map support; fairlead needs ~14 expressions, each a
//! handful of attributes, encoded here exactly as `nft` 1.0.6 encodes the
//! same statements, but for the protocol match `nft` puts in front of a
//! DNAT (see `dnat` below) — checked against `nft --debug=netlink,mnl`
//! and, in tests/nftables.rs, by comparing the kernel's listing of both.
//!
//! Register use mirrors `nft`: one 16-byte register (`NFT_REG_1`) for a
//! single value, and consecutive 4-byte registers (`NFT_REG32_01`, …) for
//! the parts of a concatenation, each part padded to 4 bytes.
//!
//! Attribute values are big-endian; netlink headers and the values the
//! kernel compares in registers from host-order sources (marks, `ct state`,
//! `fib` results, `numgen`) are in host order.

use std::net::{Ipv4Addr, SocketAddrV4};

use super::diff::Op;
use super::ruleset::{bucket_map, EntryKey, Key, MapName, NodeportMatch, Rule, Target, Verdict};
use super::ruleset::{table_name, TableId};
use crate::proxy::Protocol;

// ---- constants (linux/netfilter/nf_tables.h, nfnetlink.h) -------------------

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 16;
const NFNL_MSG_BATCH_END: u16 = 17;
pub(crate) const NLMSG_ERROR: u16 = 2;
pub(crate) const NLMSG_DONE: u16 = 3;

pub(crate) const NLM_F_REQUEST: u16 = 0x1;
pub(crate) const NLM_F_ACK: u16 = 0x4;
pub(crate) const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_APPEND: u16 = 0x800;
const NLA_F_NESTED: u16 = 0x8000;

const NFPROTO_IPV4: u8 = 2;

pub(crate) const NFT_MSG_NEWTABLE: u16 = 0;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_DELTABLE: u16 = 2;
const NFT_MSG_NEWCHAIN: u16 = 3;
const NFT_MSG_DELCHAIN: u16 = 5;
pub(crate) const NFT_MSG_NEWRULE: u16 = 6;
const NFT_MSG_GETRULE: u16 = 7;
const NFT_MSG_DELRULE: u16 = 8;
const NFT_MSG_NEWSET: u16 = 9;
const NFT_MSG_DELSET: u16 = 11;
pub(crate) const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_GETSETELEM: u16 = 13;
const NFT_MSG_DELSETELEM: u16 = 14;
pub(crate) const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;

pub(crate) const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_CHAIN_HOOK: u16 = 4;
const NFTA_CHAIN_POLICY: u16 = 5;
const NFTA_CHAIN_TYPE: u16 = 7;
const NFTA_CHAIN_USERDATA: u16 = 12;
const NFTA_HOOK_HOOKNUM: u16 = 1;
const NFTA_HOOK_PRIORITY: u16 = 2;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
pub(crate) const NFTA_RULE_HANDLE: u16 = 3;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
pub(crate) const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_DATA_TYPE: u16 = 6;
const NFTA_SET_DATA_LEN: u16 = 7;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_TIMEOUT: u16 = 11;
const NFTA_SET_USERDATA: u16 = 13;
pub(crate) const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
pub(crate) const NFTA_SET_ELEM_LIST_SET: u16 = 2;
pub(crate) const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
pub(crate) const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
pub(crate) const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
pub(crate) const NFTA_GEN_ID: u16 = 1;

const NFT_SET_MAP: u32 = 0x8;
const NFT_SET_TIMEOUT: u32 = 0x10;
const NFT_SET_EVAL: u32 = 0x20;
const NFT_DATA_VERDICT: u32 = 0xffff_ff00;

// Verdict codes.
const NF_DROP: i32 = 0;
const NF_ACCEPT: i32 = 1;
const NFT_JUMP: i32 = -3;
const NFT_GOTO: i32 = -4;
const NFT_RETURN: i32 = -5;

// Registers.
const REG_VERDICT: u32 = 0;
const REG_1: u32 = 1;
const REG_2: u32 = 2;
const REG32_01: u32 = 9;
const REG32_02: u32 = 10;
const REG32_03: u32 = 11;

// Expression attributes and values.
const PAYLOAD_NETWORK: u32 = 1;
const PAYLOAD_TRANSPORT: u32 = 2;
const META_MARK: u32 = 3;
const META_L4PROTO: u32 = 16;
const CMP_EQ: u32 = 0;
const CMP_NEQ: u32 = 1;
const CT_STATE: u32 = 0;
const CT_STATUS: u32 = 2;
const CT_STATE_NEW: u32 = 1 << 3;
const CT_STATUS_DNAT: u32 = 1 << 5;
const FIB_RESULT_ADDRTYPE: u32 = 3;
const FIB_F_SADDR: u32 = 1;
const FIB_F_DADDR: u32 = 2;
const RTN_LOCAL: u32 = 2;
const NAT_DNAT: u32 = 1;
const NAT_RANGE_PROTO_SPECIFIED: u32 = 2;
const NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 16;
const REJECT_ICMP_UNREACH: u32 = 0;
const REJECT_TCP_RST: u32 = 1;
const ICMP_PORT_UNREACH: u8 = 3;
const DYNSET_OP_UPDATE: u32 = 1;

// nft's datatype numbers (for `nft list`; the kernel only stores them):
// concatenations are `(a << 6 | b) << 6 | c`.
const TYPE_INTEGER: u32 = 4;
const TYPE_IPADDR: u32 = 7;
const TYPE_IP6ADDR: u32 = 8;
const TYPE_INET_PROTOCOL: u32 = 12;
const TYPE_INET_SERVICE: u32 = 13;

// nft's set userdata (libnftnl TLVs), as `nft` 1.0.6 writes them for these
// key types, so `nft list` shows the sets as if `nft` had made them.
const UDATA_CONCAT_MAP: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0, 6, 4, 0, 0, 0, 0,
];
const UDATA_CONCAT_SET: &[u8] = &[0, 4, 0, 0, 0, 0, 3, 8, 0, 4, 13, 0, 0, 0, 1, 0];
const UDATA_BIG_ENDIAN_KEY: &[u8] = &[0, 4, 2, 0, 0, 0];

/// nft's set userdata for `typeof numgen inc mod N : ip daddr . tcp dport`
/// (as `nft` 1.0.6 writes it), with N at [`UDATA_ENDPOINT_MAP_MODULUS`]
/// (u32, host order) and the transport protocol's header description at
/// [`UDATA_ENDPOINT_MAP_PROTO`].
const UDATA_ENDPOINT_MAP: [u8; 100] = [
    0, 4, 1, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0, 1, 18, 0, 4, 0, 0, 0, 0, 1, 4, 3,
    0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44, 0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0,
    4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 8, 0, 0, 0, 1, 4, 2,
    0, 0, 0, 6, 4, 0, 0, 0, 0,
];
const UDATA_ENDPOINT_MAP_MODULUS: usize = 30;
const UDATA_ENDPOINT_MAP_PROTO: usize = 84;

/// nft's set userdata for [`super::ruleset::BUCKET_MAP_TYPE`] (as `nft`
/// 1.0.6 writes it).
const UDATA_BUCKET_MAP: &[u8] = &[
    0, 4, 0, 0, 0, 0, 1, 4, 0, 0, 0, 0, 3, 96, 0, 4, 13, 0, 0, 0, 1, 88, 0, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 14, 0, 4, 9, 0, 0, 0, 1, 6, 0, 4, 16, 0, 0, 0,
    2, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 3, 26, 0, 4, 23, 0, 0, 0,
    1, 18, 0, 4, 0, 0, 0, 0, 1, 4, 1, 0, 0, 0, 2, 4, 0, 0, 0, 0, 4, 52, 0, 4, 13, 0, 0, 0, 1, 44,
    0, 20, 0, 4, 7, 0, 0, 0, 1, 12, 0, 4, 12, 0, 0, 0, 1, 4, 12, 0, 0, 0, 1, 20, 0, 4, 7, 0, 0, 0,
    1, 12, 0, 4, 11, 0, 0, 0, 1, 4, 2, 0, 0, 0, 6, 4, 0, 0, 0, 0,
];

/// The userdata of an endpoint map of `modulus` entries for `proto`.
fn endpoint_map_udata(modulus: u32, proto: Protocol) -> [u8; 100] {
    let mut u = UDATA_ENDPOINT_MAP;
    u[UDATA_ENDPOINT_MAP_MODULUS..UDATA_ENDPOINT_MAP_MODULUS + 4]
        .copy_from_slice(&modulus.to_ne_bytes());
    // nft's transport header descriptions: udp 6, tcp 8, sctp 10.
    u[UDATA_ENDPOINT_MAP_PROTO] = match proto {
        Protocol::Udp => 6,
        Protocol::Tcp => 8,
        Protocol::Sctp => 10,
    };
    u
}

/// The key of an endpoint map entry: the frontend as a dispatch key
/// ([`key_bytes`]) in a shared map, then `numgen`'s output (host order).
pub fn endpoint_key(key: &EntryKey) -> Vec<u8> {
    let mut v = key.frontend.as_ref().map(key_bytes).unwrap_or_default();
    v.extend_from_slice(&key.index.to_ne_bytes());
    v
}

/// The data of an endpoint map entry: `ip . port`, each part padded to 4
/// bytes.
pub fn endpoint_data(to: SocketAddrV4) -> [u8; 8] {
    let mut d = [0u8; 8];
    d[..4].copy_from_slice(&to.ip().octets());
    d[4..6].copy_from_slice(&to.port().to_be_bytes());
    d
}

/// How many elements go into one message (the element list is one
/// attribute, whose length is 16 bits).
const ELEMENTS_PER_MESSAGE: usize = 512;

// ---- attribute writing -----------------------------------------------------

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn pad(buf: &mut Vec<u8>) {
    buf.resize(align4(buf.len()), 0);
}

/// Append one attribute (netlink order header, 4-byte padded). Shared
/// with ctnetlink ([`crate::proxy::conntrack`]).
pub(crate) fn attr(buf: &mut Vec<u8>, ty: u16, data: &[u8]) {
    let len = 4 + data.len();
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(data);
    pad(buf);
}

fn attr_u32(buf: &mut Vec<u8>, ty: u16, v: u32) {
    attr(buf, ty, &v.to_be_bytes());
}

fn attr_str(buf: &mut Vec<u8>, ty: u16, s: &str) {
    let len = 4 + s.len() + 1;
    buf.extend_from_slice(&(len as u16).to_ne_bytes());
    buf.extend_from_slice(&ty.to_ne_bytes());
    buf.extend_from_slice(s.as_bytes());
    buf.push(0);
    pad(buf);
}

/// Write a nested attribute whose contents `f` writes.
pub(crate) fn nest(buf: &mut Vec<u8>, ty: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(ty | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// `nft`'s comment userdata: TLV type 0, NUL-terminated.
fn comment_udata(c: &str) -> Vec<u8> {
    let mut v = vec![0u8, (c.len() + 1).min(255) as u8];
    v.extend_from_slice(c.as_bytes());
    v.push(0);
    v
}

// ---- expressions -----------------------------------------------------------

fn expr(buf: &mut Vec<u8>, name: &str, f: impl FnOnce(&mut Vec<u8>)) {
    nest(buf, NFTA_LIST_ELEM, |b| {
        attr_str(b, NFTA_EXPR_NAME, name);
        nest(b, NFTA_EXPR_DATA, f);
    });
}

fn data_value(buf: &mut Vec<u8>, ty: u16, value: &[u8]) {
    nest(buf, ty, |b| attr(b, NFTA_DATA_VALUE, value));
}

fn verdict_data(buf: &mut Vec<u8>, ty: u16, v: &Verdict) {
    let (code, chain) = match v {
        Verdict::Jump(c) => (NFT_JUMP, Some(c.as_str())),
        Verdict::Goto(c) => (NFT_GOTO, Some(c.as_str())),
        Verdict::Return => (NFT_RETURN, None),
        Verdict::Drop => (NF_DROP, None),
    };
    nest(buf, ty, |b| {
        nest(b, NFTA_DATA_VERDICT, |b| {
            attr_u32(b, NFTA_VERDICT_CODE, code as u32);
            if let Some(c) = chain {
                attr_str(b, NFTA_VERDICT_CHAIN, c);
            }
        })
    });
}

fn payload(buf: &mut Vec<u8>, dreg: u32, base: u32, offset: u32, len: u32) {
    expr(buf, "payload", |b| {
        attr_u32(b, 1, dreg);
        attr_u32(b, 2, base);
        attr_u32(b, 3, offset);
        attr_u32(b, 4, len);
    });
}

fn meta_load(buf: &mut Vec<u8>, key: u32, dreg: u32) {
    expr(buf, "meta", |b| {
        attr_u32(b, 2, key);
        attr_u32(b, 1, dreg);
    });
}

fn meta_set(buf: &mut Vec<u8>, key: u32, sreg: u32) {
    expr(buf, "meta", |b| {
        attr_u32(b, 2, key);
        attr_u32(b, 3, sreg);
    });
}

fn cmp(buf: &mut Vec<u8>, sreg: u32, op: u32, value: &[u8]) {
    expr(buf, "cmp", |b| {
        attr_u32(b, 1, sreg);
        attr_u32(b, 2, op);
        data_value(b, 3, value);
    });
}

/// `reg = (reg & mask) ^ xor` over 4 bytes.
fn bitwise(buf: &mut Vec<u8>, reg: u32, mask: u32, xor: u32) {
    expr(buf, "bitwise", |b| {
        attr_u32(b, 1, reg);
        attr_u32(b, 2, reg);
        attr_u32(b, 3, 4);
        data_value(b, 4, &mask.to_ne_bytes());
        data_value(b, 5, &xor.to_ne_bytes());
    });
}

/// `ip saddr` (at `offset` 12) or `ip daddr` (16) `==` / `!=` a prefix:
/// the address masked to its first `prefix` bits, compared with the
/// network's (masks and addresses in network order).
fn prefix_match(buf: &mut Vec<u8>, offset: u32, (net, prefix): (Ipv4Addr, u8), op: u32) {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(prefix.min(32)))
        .unwrap_or(0);
    payload(buf, REG_1, PAYLOAD_NETWORK, offset, 4);
    bitwise(buf, REG_1, u32::from_ne_bytes(mask.to_be_bytes()), 0);
    cmp(buf, REG_1, op, &(u32::from(net) & mask).to_be_bytes());
}

fn ct_load(buf: &mut Vec<u8>, key: u32, dreg: u32) {
    expr(buf, "ct", |b| {
        attr_u32(b, 2, key);
        attr_u32(b, 1, dreg);
    });
}

fn immediate_verdict(buf: &mut Vec<u8>, v: &Verdict) {
    expr(buf, "immediate", |b| {
        attr_u32(b, 1, REG_VERDICT);
        verdict_data(b, 2, v);
    });
}

fn immediate_value(buf: &mut Vec<u8>, dreg: u32, value: &[u8]) {
    expr(buf, "immediate", |b| {
        attr_u32(b, 1, dreg);
        data_value(b, 2, value);
    });
}

/// Look the key in `sreg` up in a set (`dreg` None) or a verdict map.
fn lookup(buf: &mut Vec<u8>, set: &str, sreg: u32, verdict_map: bool) {
    expr(buf, "lookup", |b| {
        attr_u32(b, 2, sreg);
        if verdict_map {
            attr_u32(b, 3, REG_VERDICT);
        }
        attr_str(b, 1, set);
    });
}

fn numgen_inc(buf: &mut Vec<u8>, dreg: u32, modulus: u32) {
    expr(buf, "numgen", |b| {
        attr_u32(b, 1, dreg);
        attr_u32(b, 2, modulus);
        attr_u32(b, 3, 0);
        attr_u32(b, 4, 0);
    });
}

fn fib_addrtype(buf: &mut Vec<u8>, flags: u32, dreg: u32) {
    expr(buf, "fib", |b| {
        attr_u32(b, 3, flags);
        attr_u32(b, 2, FIB_RESULT_ADDRTYPE);
        attr_u32(b, 1, dreg);
    });
}

/// `dnat to <ip>:<port>` (`nft` requires a `meta l4proto <p>` match in
/// front of a DNAT with a port, and [`Target::Dnat`] renders it; the kernel
/// does not need it: every chain with a DNAT is reached only through a
/// dispatch map whose key includes the protocol. Leaving it out saves 2 of
/// the rule's 7 expressions, and the kernel's work per transaction is
/// proportional to the expressions it parses and validates.)
fn dnat(buf: &mut Vec<u8>, to: SocketAddrV4) {
    immediate_value(buf, REG_1, &to.ip().octets());
    immediate_value(buf, REG_2, &to.port().to_be_bytes());
    expr(buf, "nat", |b| {
        attr_u32(b, 1, NAT_DNAT);
        attr_u32(b, 2, NFPROTO_IPV4 as u32);
        attr_u32(b, 3, REG_1);
        attr_u32(b, 5, REG_2);
        attr_u32(b, 7, NAT_RANGE_PROTO_SPECIFIED);
    });
}

/// `meta l4proto . th dport` into REG_1 and REG32_01.
fn proto_dport(buf: &mut Vec<u8>, first: u32, second: u32) {
    meta_load(buf, META_L4PROTO, first);
    payload(buf, second, PAYLOAD_TRANSPORT, 2, 2);
}

/// Append the expressions of `rule` (an `NFTA_RULE_EXPRESSIONS` list's
/// contents).
pub fn encode_rule(buf: &mut Vec<u8>, rule: &Rule) {
    match rule {
        Rule::CtStateNew(v) => {
            ct_load(buf, CT_STATE, REG_1);
            bitwise(buf, REG_1, CT_STATE_NEW, 0);
            cmp(buf, REG_1, CMP_NEQ, &0u32.to_ne_bytes());
            immediate_verdict(buf, v);
        }
        Rule::DispatchFrontends(map) => {
            payload(buf, REG_1, PAYLOAD_NETWORK, 16, 4);
            proto_dport(buf, REG32_01, REG32_02);
            lookup(buf, map.as_str(), REG_1, true);
        }
        Rule::DispatchNodeports(np, map) => {
            match np {
                NodeportMatch::LocalNonLoopback => {
                    fib_addrtype(buf, FIB_F_DADDR, REG_1);
                    cmp(buf, REG_1, CMP_EQ, &RTN_LOCAL.to_ne_bytes());
                    payload(buf, REG_1, PAYLOAD_NETWORK, 16, 1);
                    cmp(buf, REG_1, CMP_NEQ, &[127]);
                }
                NodeportMatch::Address(a) => {
                    payload(buf, REG_1, PAYLOAD_NETWORK, 16, 4);
                    cmp(buf, REG_1, CMP_EQ, &a.octets());
                }
            }
            proto_dport(buf, REG_1, REG32_01);
            lookup(buf, map.as_str(), REG_1, true);
        }
        Rule::Hairpin(v) => {
            ct_load(buf, CT_STATUS, REG_1);
            bitwise(buf, REG_1, CT_STATUS_DNAT, 0);
            cmp(buf, REG_1, CMP_NEQ, &0u32.to_ne_bytes());
            payload(buf, REG_1, PAYLOAD_NETWORK, 12, 4);
            payload(buf, REG32_01, PAYLOAD_NETWORK, 16, 4);
            lookup(buf, MapName::HairpinEndpoints.as_str(), REG_1, false);
            immediate_verdict(buf, v);
        }
        Rule::ReturnUnlessMarked(m) => {
            meta_load(buf, META_MARK, REG_1);
            bitwise(buf, REG_1, *m, 0);
            cmp(buf, REG_1, CMP_EQ, &0u32.to_ne_bytes());
            immediate_verdict(buf, &Verdict::Return);
        }
        Rule::MarkXor(m) => {
            meta_load(buf, META_MARK, REG_1);
            bitwise(buf, REG_1, u32::MAX, *m);
            meta_set(buf, META_MARK, REG_1);
        }
        Rule::MarkOr(m) => {
            meta_load(buf, META_MARK, REG_1);
            bitwise(buf, REG_1, !*m, *m);
            meta_set(buf, META_MARK, REG_1);
        }
        Rule::Masquerade => expr(buf, "masq", |b| {
            attr_u32(b, 1, NAT_RANGE_PROTO_RANDOM_FULLY);
        }),
        Rule::MasqueradeLeaving { from, inside } => {
            prefix_match(buf, 12, *from, CMP_EQ);
            prefix_match(buf, 16, *inside, CMP_NEQ);
            expr(buf, "masq", |_| {});
        }
        Rule::DropUntranslated(range) => {
            prefix_match(buf, 16, *range, CMP_EQ);
            fib_addrtype(buf, FIB_F_DADDR, REG_1);
            cmp(buf, REG_1, CMP_NEQ, &RTN_LOCAL.to_ne_bytes());
            immediate_verdict(buf, &Verdict::Drop);
        }
        Rule::RejectTcpReset => {
            meta_load(buf, META_L4PROTO, REG_1);
            cmp(buf, REG_1, CMP_EQ, &[Protocol::Tcp.number()]);
            expr(buf, "reject", |b| {
                attr_u32(b, 1, REJECT_TCP_RST);
                attr(b, 2, &[0]);
            });
        }
        Rule::Reject => expr(buf, "reject", |b| {
            attr_u32(b, 1, REJECT_ICMP_UNREACH);
            attr(b, 2, &[ICMP_PORT_UNREACH]);
        }),
        Rule::Verdict(v) => immediate_verdict(buf, v),
        Rule::FromLocal(v) => {
            fib_addrtype(buf, FIB_F_SADDR, REG_1);
            cmp(buf, REG_1, CMP_EQ, &RTN_LOCAL.to_ne_bytes());
            immediate_verdict(buf, v);
        }
        Rule::AffinityHit { set, then } => {
            payload(buf, REG_1, PAYLOAD_NETWORK, 12, 4);
            lookup(buf, set, REG_1, false);
            immediate_verdict(buf, then);
        }
        Rule::AffinityUpdate(set) => {
            payload(buf, REG_1, PAYLOAD_NETWORK, 12, 4);
            expr(buf, "dynset", |b| {
                attr_u32(b, 4, REG_1);
                attr_u32(b, 3, DYNSET_OP_UPDATE);
                attr_str(b, 1, set);
            });
        }
        Rule::DnatMap { modulus, map, .. } => {
            // No protocol match either (see `dnat`).
            numgen_inc(buf, REG_1, *modulus);
            dnat_from_map(buf, map);
        }
        Rule::DnatBucketMap {
            modulus, bucket, ..
        } => {
            // As `nft` encodes `ip daddr . meta l4proto . th dport .
            // numgen inc mod N map @m`: the key in four registers.
            payload(buf, REG_1, PAYLOAD_NETWORK, 16, 4);
            meta_load(buf, META_L4PROTO, REG32_01);
            payload(buf, REG32_02, PAYLOAD_TRANSPORT, 2, 2);
            numgen_inc(buf, REG32_03, *modulus);
            dnat_from_map(buf, bucket_map(*bucket));
        }
        Rule::Frontend {
            ip,
            proto,
            port,
            then,
        } => {
            // As `nft` encodes `ip daddr <ip> <proto> dport <port>`: the
            // address first, so the other buckets' rules fail after two
            // expressions.
            payload(buf, REG_1, PAYLOAD_NETWORK, 16, 4);
            cmp(buf, REG_1, CMP_EQ, &ip.octets());
            meta_load(buf, META_L4PROTO, REG_1);
            cmp(buf, REG_1, CMP_EQ, &[proto.number()]);
            payload(buf, REG_1, PAYLOAD_TRANSPORT, 2, 2);
            cmp(buf, REG_1, CMP_EQ, &port.to_be_bytes());
            encode_rule(buf, then);
        }
        Rule::Pick { modulus, target } => {
            if let Some(n) = modulus {
                numgen_inc(buf, REG_1, *n);
                cmp(buf, REG_1, CMP_EQ, &0u32.to_ne_bytes());
            }
            match target {
                Target::Dnat { to, .. } => dnat(buf, *to),
                Target::Goto(c) => immediate_verdict(buf, &Verdict::Goto(c.clone())),
            }
        }
    }
}

/// Look the key in REG_1 (onward) up in endpoint map `map` and DNAT to
/// the `ip . port` found (REG_1, REG32_01).
fn dnat_from_map(buf: &mut Vec<u8>, map: &str) {
    expr(buf, "lookup", |b| {
        attr_u32(b, 2, REG_1);
        attr_u32(b, 3, REG_1);
        attr_str(b, 1, map);
    });
    expr(buf, "nat", |b| {
        attr_u32(b, 1, NAT_DNAT);
        attr_u32(b, 2, NFPROTO_IPV4 as u32);
        attr_u32(b, 3, REG_1);
        attr_u32(b, 5, REG32_01);
    });
}

/// An element key as the kernel stores it (concatenation parts padded to
/// 4 bytes).
pub fn key_bytes(key: &Key) -> Vec<u8> {
    match key {
        Key::Frontend(ip, p, port) => {
            let mut v = ip.octets().to_vec();
            v.extend_from_slice(&[p.number(), 0, 0, 0]);
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            v
        }
        Key::NodePort(p, port) => {
            let mut v = vec![p.number(), 0, 0, 0];
            v.extend_from_slice(&port.to_be_bytes());
            v.extend_from_slice(&[0, 0]);
            v
        }
        Key::Pair(a, b) => {
            let mut v = a.octets().to_vec();
            v.extend_from_slice(&b.octets());
            v
        }
        Key::Fingerprint(h) => h.to_be_bytes().to_vec(),
    }
}

// ---- messages --------------------------------------------------------------

/// A batch under construction: one transaction.
pub struct Batch {
    buf: Vec<u8>,
    seq: u32,
    /// The first sequence number of the batch's messages (after BEGIN).
    first_seq: u32,
    /// For each message, the index of the (first) operation it carries.
    msg_ops: Vec<usize>,
    next_set_id: u32,
    /// An open element message: (map, delete?, start offset, elements
    /// start offset, count).
    open: Option<OpenElements>,
}

struct OpenElements {
    table: String,
    set: String,
    delete: bool,
    msg_start: usize,
    list_start: usize,
    count: usize,
}

impl Batch {
    /// A new batch whose messages are numbered from `seq`.
    pub fn new(seq: u32) -> Batch {
        let mut b = Batch {
            buf: Vec::with_capacity(4096),
            seq,
            first_seq: seq.wrapping_add(1),
            msg_ops: Vec::new(),
            next_set_id: 1,
            open: None,
        };
        let start = b.begin_msg(NFNL_MSG_BATCH_BEGIN, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        b.end_msg(start);
        b
    }

    fn begin_msg(&mut self, ty: u16, flags: u16, family: u8, res_id: u16) -> usize {
        let start = self.buf.len();
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.extend_from_slice(&ty.to_ne_bytes());
        self.buf.extend_from_slice(&flags.to_ne_bytes());
        self.buf.extend_from_slice(&self.seq.to_ne_bytes());
        self.buf.extend_from_slice(&0u32.to_ne_bytes());
        self.buf.push(family);
        self.buf.push(0);
        self.buf.extend_from_slice(&res_id.to_be_bytes());
        start
    }

    fn end_msg(&mut self, start: usize) {
        let len = (self.buf.len() - start) as u32;
        self.buf[start..start + 4].copy_from_slice(&len.to_ne_bytes());
        self.seq = self.seq.wrapping_add(1);
    }

    /// Start a message for operation `op_index`.
    fn msg(&mut self, op_index: usize, ty: u16, flags: u16) -> usize {
        self.close_elements();
        self.msg_ops.push(op_index);
        self.begin_msg(
            (NFNL_SUBSYS_NFTABLES << 8) | ty,
            NLM_F_REQUEST | flags,
            NFPROTO_IPV4,
            0,
        )
    }

    /// Declare an endpoint map: `key` (type, length) to `ip . port`.
    fn endpoint_map(
        &mut self,
        t: &str,
        op_index: usize,
        name: &str,
        key: (u32, u32),
        udata: &[u8],
    ) {
        let s = self.msg(op_index, NFT_MSG_NEWSET, NLM_F_CREATE);
        let b = &mut self.buf;
        attr_str(b, NFTA_SET_TABLE, t);
        attr_str(b, NFTA_SET_NAME, name);
        attr_u32(b, NFTA_SET_FLAGS, NFT_SET_MAP);
        attr_u32(b, NFTA_SET_KEY_TYPE, key.0);
        attr_u32(b, NFTA_SET_KEY_LEN, key.1);
        attr_u32(
            b,
            NFTA_SET_DATA_TYPE,
            (TYPE_IPADDR << 6) | TYPE_INET_SERVICE,
        );
        attr_u32(b, NFTA_SET_DATA_LEN, 8);
        attr_u32(b, NFTA_SET_ID, self.next_set_id);
        attr(b, NFTA_SET_USERDATA, udata);
        self.next_set_id += 1;
        self.end_msg(s);
    }

    fn close_elements(&mut self) {
        if let Some(o) = self.open.take() {
            let len = (self.buf.len() - o.list_start) as u16;
            self.buf[o.list_start..o.list_start + 2].copy_from_slice(&len.to_ne_bytes());
            self.end_msg(o.msg_start);
        }
    }

    /// Append one operation (the `op_index`-th of its script) on table `t`.
    pub fn push(&mut self, t: &str, op_index: usize, op: &Op) {
        match op {
            Op::AddTable { comment } => {
                let s = self.msg(op_index, NFT_MSG_NEWTABLE, NLM_F_CREATE);
                attr_str(&mut self.buf, NFTA_TABLE_NAME, t);
                if let Some(c) = comment {
                    attr(&mut self.buf, NFTA_TABLE_USERDATA, &comment_udata(c));
                }
                self.end_msg(s);
            }
            Op::DeleteTable => {
                let s = self.msg(op_index, NFT_MSG_DELTABLE, 0);
                attr_str(&mut self.buf, NFTA_TABLE_NAME, t);
                self.end_msg(s);
            }
            Op::AddMap(m) => {
                let s = self.msg(op_index, NFT_MSG_NEWSET, NLM_F_CREATE);
                let b = &mut self.buf;
                attr_str(b, NFTA_SET_TABLE, t);
                attr_str(b, NFTA_SET_NAME, m.as_str());
                let (key_type, key_len) = match m {
                    MapName::ServiceIps | MapName::NoEndpointServices => (
                        ((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6 | TYPE_INET_SERVICE,
                        12,
                    ),
                    MapName::ServiceNodeports | MapName::NoEndpointNodeports => {
                        ((TYPE_INET_PROTOCOL << 6) | TYPE_INET_SERVICE, 8)
                    }
                    MapName::HairpinEndpoints => ((TYPE_IPADDR << 6) | TYPE_IPADDR, 8),
                    MapName::Fingerprint => (TYPE_IP6ADDR, 16),
                };
                attr_u32(b, NFTA_SET_FLAGS, if m.is_set() { 0 } else { NFT_SET_MAP });
                attr_u32(b, NFTA_SET_KEY_TYPE, key_type);
                attr_u32(b, NFTA_SET_KEY_LEN, key_len);
                if !m.is_set() {
                    attr_u32(b, NFTA_SET_DATA_TYPE, NFT_DATA_VERDICT);
                    attr_u32(b, NFTA_SET_DATA_LEN, 0);
                }
                attr_u32(b, NFTA_SET_ID, self.next_set_id);
                let udata = match m {
                    MapName::HairpinEndpoints => UDATA_CONCAT_SET,
                    MapName::Fingerprint => UDATA_BIG_ENDIAN_KEY,
                    _ => UDATA_CONCAT_MAP,
                };
                attr(b, NFTA_SET_USERDATA, udata);
                self.next_set_id += 1;
                self.end_msg(s);
            }
            Op::AddSet(set) => {
                let s = self.msg(op_index, NFT_MSG_NEWSET, NLM_F_CREATE);
                let b = &mut self.buf;
                attr_str(b, NFTA_SET_TABLE, t);
                attr_str(b, NFTA_SET_NAME, &set.name);
                attr_u32(b, NFTA_SET_FLAGS, NFT_SET_TIMEOUT | NFT_SET_EVAL);
                attr_u32(b, NFTA_SET_KEY_TYPE, TYPE_IPADDR);
                attr_u32(b, NFTA_SET_KEY_LEN, 4);
                attr_u32(b, NFTA_SET_ID, self.next_set_id);
                attr(
                    b,
                    NFTA_SET_TIMEOUT,
                    &(set.timeout_secs.saturating_mul(1000)).to_be_bytes(),
                );
                attr(b, NFTA_SET_USERDATA, UDATA_BIG_ENDIAN_KEY);
                self.next_set_id += 1;
                self.end_msg(s);
            }
            Op::AddEndpointMap(m) => self.endpoint_map(
                t,
                op_index,
                &m.name,
                (TYPE_INTEGER, 4),
                &endpoint_map_udata(m.endpoints.len() as u32, m.proto),
            ),
            Op::AddBucketMap(bucket) => self.endpoint_map(
                t,
                op_index,
                bucket_map(*bucket),
                (
                    (((TYPE_IPADDR << 6) | TYPE_INET_PROTOCOL) << 6 | TYPE_INET_SERVICE) << 6
                        | TYPE_INTEGER,
                    16,
                ),
                UDATA_BUCKET_MAP,
            ),
            Op::AddMapEntry { map, key, to } => {
                self.element(t, op_index, map, false);
                nest(&mut self.buf, NFTA_LIST_ELEM, |b| {
                    data_value(b, NFTA_SET_ELEM_KEY, &endpoint_key(key));
                    data_value(b, NFTA_SET_ELEM_DATA, &endpoint_data(*to));
                });
            }
            Op::DeleteMapEntry { map, key } => {
                self.element(t, op_index, map, true);
                nest(&mut self.buf, NFTA_LIST_ELEM, |b| {
                    data_value(b, NFTA_SET_ELEM_KEY, &endpoint_key(key));
                });
            }
            Op::DeleteSet(name) => {
                let s = self.msg(op_index, NFT_MSG_DELSET, 0);
                attr_str(&mut self.buf, NFTA_SET_TABLE, t);
                attr_str(&mut self.buf, NFTA_SET_NAME, name);
                self.end_msg(s);
            }
            Op::AddBaseChain(bc) => {
                let s = self.msg(op_index, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
                let b = &mut self.buf;
                attr_str(b, NFTA_CHAIN_TABLE, t);
                attr_str(b, NFTA_CHAIN_NAME, bc.name);
                attr_str(b, NFTA_CHAIN_TYPE, bc.kind);
                attr_u32(b, NFTA_CHAIN_POLICY, NF_ACCEPT as u32);
                nest(b, NFTA_CHAIN_HOOK, |b| {
                    attr_u32(b, NFTA_HOOK_HOOKNUM, bc.hook.number());
                    attr_u32(b, NFTA_HOOK_PRIORITY, bc.priority as u32);
                });
                self.end_msg(s);
            }
            Op::AddChain { name, comment } => {
                let s = self.msg(op_index, NFT_MSG_NEWCHAIN, NLM_F_CREATE);
                attr_str(&mut self.buf, NFTA_CHAIN_TABLE, t);
                attr_str(&mut self.buf, NFTA_CHAIN_NAME, name);
                if let Some(c) = comment {
                    attr(&mut self.buf, NFTA_CHAIN_USERDATA, &comment_udata(c));
                }
                self.end_msg(s);
            }
            Op::FlushChain(name) => {
                // DELRULE without a handle deletes every rule of the chain.
                let s = self.msg(op_index, NFT_MSG_DELRULE, 0);
                attr_str(&mut self.buf, NFTA_RULE_TABLE, t);
                attr_str(&mut self.buf, NFTA_RULE_CHAIN, name);
                self.end_msg(s);
            }
            Op::DeleteChain(name) => {
                let s = self.msg(op_index, NFT_MSG_DELCHAIN, 0);
                attr_str(&mut self.buf, NFTA_CHAIN_TABLE, t);
                attr_str(&mut self.buf, NFTA_CHAIN_NAME, name);
                self.end_msg(s);
            }
            Op::AddRule {
                chain,
                rule,
                comment,
            } => {
                let s = self.msg(op_index, NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND);
                attr_str(&mut self.buf, NFTA_RULE_TABLE, t);
                attr_str(&mut self.buf, NFTA_RULE_CHAIN, chain);
                nest(&mut self.buf, NFTA_RULE_EXPRESSIONS, |b| {
                    encode_rule(b, rule)
                });
                if let Some(c) = comment {
                    attr(&mut self.buf, NFTA_RULE_USERDATA, &comment_udata(c));
                }
                self.end_msg(s);
            }
            Op::DeleteRule { chain, handle, .. } => {
                let s = self.msg(op_index, NFT_MSG_DELRULE, 0);
                attr_str(&mut self.buf, NFTA_RULE_TABLE, t);
                attr_str(&mut self.buf, NFTA_RULE_CHAIN, chain);
                attr(&mut self.buf, NFTA_RULE_HANDLE, &handle.to_be_bytes());
                self.end_msg(s);
            }
            Op::AddElement { map, key, verdict } => {
                self.element(t, op_index, map.as_str(), false);
                let b = &mut self.buf;
                nest(b, NFTA_LIST_ELEM, |b| {
                    data_value(b, NFTA_SET_ELEM_KEY, &key_bytes(key));
                    if let Some(v) = verdict {
                        verdict_data(b, NFTA_SET_ELEM_DATA, v);
                    }
                });
            }
            Op::DeleteElement { map, key } => {
                self.element(t, op_index, map.as_str(), true);
                nest(&mut self.buf, NFTA_LIST_ELEM, |b| {
                    data_value(b, NFTA_SET_ELEM_KEY, &key_bytes(key));
                });
            }
        }
    }

    /// Make sure an element message for `map` is open, with room.
    fn element(&mut self, t: &str, op_index: usize, set: &str, delete: bool) {
        if let Some(o) = &mut self.open {
            if o.set == set && o.delete == delete && o.count < ELEMENTS_PER_MESSAGE && o.table == t
            {
                o.count += 1;
                return;
            }
        }
        let ty = if delete {
            NFT_MSG_DELSETELEM
        } else {
            NFT_MSG_NEWSETELEM
        };
        let s = self.msg(op_index, ty, if delete { 0 } else { NLM_F_CREATE });
        attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_TABLE, t);
        attr_str(&mut self.buf, NFTA_SET_ELEM_LIST_SET, set);
        let list_start = self.buf.len();
        self.buf.extend_from_slice(&[0, 0]);
        self.buf
            .extend_from_slice(&(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED).to_ne_bytes());
        self.open = Some(OpenElements {
            table: t.to_string(),
            set: set.to_string(),
            delete,
            msg_start: s,
            list_start,
            count: 1,
        });
    }

    /// Close the batch; the bytes to send in one `send`.
    pub fn finish(mut self) -> FinishedBatch {
        self.close_elements();
        let (first, last) = (self.first_seq, self.seq.wrapping_sub(1));
        let s = self.begin_msg(NFNL_MSG_BATCH_END, NLM_F_REQUEST, 0, NFNL_SUBSYS_NFTABLES);
        self.end_msg(s);
        FinishedBatch {
            bytes: self.buf,
            first_seq: first,
            last_seq: last,
            msg_ops: self.msg_ops,
            next_seq: self.seq,
        }
    }
}

/// A closed batch.
pub struct FinishedBatch {
    pub bytes: Vec<u8>,
    pub first_seq: u32,
    pub last_seq: u32,
    msg_ops: Vec<usize>,
    /// The next free sequence number.
    pub next_seq: u32,
}

impl FinishedBatch {
    /// The operation (index into the script) a message carries.
    pub fn op_index(&self, seq: u32) -> Option<usize> {
        let i = seq.wrapping_sub(self.first_seq) as usize;
        self.msg_ops.get(i).copied()
    }
}

/// Encode a script's operations, each on its table (`base` names the main
/// table), as one batch.
pub fn encode(base: &str, ops: &[(TableId, Op)], seq: u32) -> FinishedBatch {
    let mut b = Batch::new(seq);
    for (i, (t, op)) in ops.iter().enumerate() {
        b.push(&table_name(base, *t), i, op);
    }
    b.finish()
}

/// A dump request for every `ip` table.
pub fn gettable_request(seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(20);
    request_header(
        &mut buf,
        NFT_MSG_GETTABLE,
        NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK,
        seq,
        NFPROTO_IPV4,
    );
    finish_request(buf)
}

/// A standalone request (not in a batch): `NFT_MSG_GETGEN`.
pub fn getgen_request(seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(20);
    request_header(&mut buf, NFT_MSG_GETGEN, NLM_F_REQUEST | NLM_F_ACK, seq, 0);
    finish_request(buf)
}

/// A dump request of nf_tables type `ty` for the objects under one named
/// object of table `t` (the elements of a set, the rules of a chain).
fn dump_request(ty: u16, t: (u16, &str), name: (u16, &str), seq: u32) -> Vec<u8> {
    let mut buf = Vec::with_capacity(64);
    request_header(
        &mut buf,
        ty,
        NLM_F_REQUEST | NLM_F_DUMP | NLM_F_ACK,
        seq,
        NFPROTO_IPV4,
    );
    attr_str(&mut buf, t.0, t.1);
    attr_str(&mut buf, name.0, name.1);
    finish_request(buf)
}

/// A dump request for the elements of set `set` in table `t`.
pub fn getsetelem_request(t: &str, set: &str, seq: u32) -> Vec<u8> {
    dump_request(
        NFT_MSG_GETSETELEM,
        (NFTA_SET_ELEM_LIST_TABLE, t),
        (NFTA_SET_ELEM_LIST_SET, set),
        seq,
    )
}

/// A dump request for the rules of chain `chain` in table `t`.
pub fn getrule_request(t: &str, chain: &str, seq: u32) -> Vec<u8> {
    dump_request(
        NFT_MSG_GETRULE,
        (NFTA_RULE_TABLE, t),
        (NFTA_RULE_CHAIN, chain),
        seq,
    )
}

/// Walk every message of a batch and its nested attributes: the lengths
/// must add up exactly (what the kernel checks before it reads a batch).
/// Returns the number of messages. For tests and fuzzing.
pub fn check_well_formed(bytes: &[u8]) -> Result<usize, String> {
    fn walk(buf: &[u8]) -> Result<(), String> {
        let mut off = 0;
        while off < buf.len() {
            if off + 4 > buf.len() {
                return Err(format!("truncated attribute header at {off}"));
            }
            let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
            let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]);
            if len < 4 || off + len > buf.len() {
                return Err(format!("bad attribute length {len} at {off}"));
            }
            if ty & NLA_F_NESTED != 0 {
                walk(&buf[off + 4..off + len])?;
            }
            off += align4(len);
        }
        if off != buf.len() {
            return Err("attributes overrun their parent".into());
        }
        Ok(())
    }
    let mut msgs = 0;
    let mut total = 0;
    for m in messages(bytes) {
        msgs += 1;
        total += align4(16 + m.payload.len());
        walk(
            m.payload
                .get(4..)
                .ok_or("message without its nfgenmsg header")?,
        )?;
    }
    if total != bytes.len() {
        return Err(format!(
            "messages cover {total} of the batch's {} bytes",
            bytes.len()
        ));
    }
    Ok(msgs)
}

/// A rule's handle and comment, from the body of an `NFT_MSG_NEWRULE`
/// message (after its 4-byte nfgenmsg header).
pub fn rule_handle_comment(body: &[u8]) -> Option<(u64, String)> {
    let mut handle = None;
    let mut comment = String::new();
    for (ty, v) in attrs(body) {
        match ty {
            NFTA_RULE_HANDLE => handle = Some(u64::from_be_bytes(v.try_into().ok()?)),
            NFTA_RULE_USERDATA => comment = udata_comment(v).unwrap_or_default(),
            _ => {}
        }
    }
    Some((handle?, comment))
}

/// The comment in `nft`'s userdata TLVs (type 0, NUL-terminated).
fn udata_comment(mut u: &[u8]) -> Option<String> {
    while u.len() >= 2 {
        let (ty, len) = (u[0], u[1] as usize);
        let v = u.get(2..2 + len)?;
        if ty == 0 {
            let s = v.split(|b| *b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        u = &u[2 + len..];
    }
    None
}

fn request_header(buf: &mut Vec<u8>, ty: u16, flags: u16, seq: u32, family: u8) {
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | ty).to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
    buf.push(family);
    buf.push(0);
    buf.extend_from_slice(&0u16.to_be_bytes());
}

fn finish_request(mut buf: Vec<u8>) -> Vec<u8> {
    let len = buf.len() as u32;
    buf[0..4].copy_from_slice(&len.to_ne_bytes());
    buf
}

// ---- parsing replies -------------------------------------------------------

/// One netlink message of a reply.
pub struct Msg<'a> {
    pub ty: u16,
    pub seq: u32,
    /// After the netlink header.
    pub payload: &'a [u8],
}

/// Split a received buffer into messages.
pub fn messages(buf: &[u8]) -> impl Iterator<Item = Msg<'_>> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off + 16 > buf.len() {
            return None;
        }
        let len = u32::from_ne_bytes(buf[off..off + 4].try_into().ok()?) as usize;
        if len < 16 || off + len > buf.len() {
            return None;
        }
        let ty = u16::from_ne_bytes(buf[off + 4..off + 6].try_into().ok()?);
        let seq = u32::from_ne_bytes(buf[off + 8..off + 12].try_into().ok()?);
        let m = Msg {
            ty,
            seq,
            payload: &buf[off + 16..off + len],
        };
        off += align4(len);
        Some(m)
    })
}

/// The attributes in `buf`: (type without flags, value).
pub fn attrs(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut off = 0usize;
    std::iter::from_fn(move || {
        if off + 4 > buf.len() {
            return None;
        }
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let ty = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & 0x3fff;
        if len < 4 || off + len > buf.len() {
            return None;
        }
        let v = &buf[off + 4..off + len];
        off += align4(len);
        Some((ty, v))
    })
}

/// The error code of an `NLMSG_ERROR` payload (0 = an acknowledgement).
pub fn error_code(payload: &[u8]) -> i32 {
    payload
        .get(0..4)
        .and_then(|b| b.try_into().ok())
        .map(i32::from_ne_bytes)
        .unwrap_or(-libc::EPROTO)
}

/// The nf_tables message type of a netlink type (`None`: another
/// subsystem).
pub fn nft_type(ty: u16) -> Option<u16> {
    (ty >> 8 == NFNL_SUBSYS_NFTABLES).then_some(ty & 0xff)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::nftables::ruleset::tests::{cfg, golden_state};
    use crate::proxy::nftables::{diff, ruleset::Ruleset};

    fn check_well_formed(bytes: &[u8]) -> usize {
        super::check_well_formed(bytes).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn full_batch_is_well_formed_and_numbered() {
        for shards in [1, 4] {
            let r = Ruleset::build_sharded(cfg(), shards, &golden_state());
            let mut b = Batch::new(100);
            let (mut ops, mut elements) = (0, 0);
            diff::full_ops(&r, &[], &mut |t, op| {
                b.push(&table_name("fairlead", t), ops, op);
                ops += 1;
                elements += matches!(op, Op::AddElement { .. }) as usize;
            });
            let b = b.finish();
            let msgs = check_well_formed(&b.bytes);
            // BEGIN + one message per non-element op + element messages + END.
            assert!(msgs >= ops - elements + 2);
            assert_eq!(b.first_seq, 101);
            assert_eq!(b.op_index(101), Some(0));
            assert_eq!(b.op_index(b.last_seq + 1), None);
        }
    }

    #[test]
    fn partial_batch_is_numbered() {
        let r = Ruleset::build(cfg(), &golden_state());
        let script = diff::partial(&r, &[]);
        assert!(script.is_empty());
        let ops = vec![(0, Op::AddTable { comment: None }), (2, Op::DeleteTable)];
        let b = encode("fairlead", &ops, 100);
        assert_eq!(check_well_formed(&b.bytes), 4);
        assert_eq!(b.first_seq, 101);
        assert_eq!(b.op_index(101), Some(0));
        assert_eq!(b.op_index(b.last_seq + 1), None);
    }

    #[test]
    fn dnat_rule_matches_nft() {
        // `nft --debug=netlink` for `numgen inc mod 2 == 0 meta l4proto tcp
        // dnat to 10.244.0.31:80`: numgen, cmp, meta, cmp, immediate x2,
        // nat; without the protocol match (see `dnat`).
        let rule = Rule::Pick {
            modulus: Some(2),
            target: Target::Dnat {
                proto: Protocol::Tcp,
                to: "10.244.0.31:80".parse().unwrap(),
            },
        };
        let mut b = Vec::new();
        encode_rule(&mut b, &rule);
        let names: Vec<String> = attrs(&b)
            .map(|(_, e)| {
                let (_, name) = attrs(e).next().unwrap();
                String::from_utf8_lossy(&name[..name.len() - 1]).into_owned()
            })
            .collect();
        assert_eq!(names, ["numgen", "cmp", "immediate", "immediate", "nat"]);
        // The exact bytes of `nft`'s numgen expression (from --debug=mnl).
        let numgen = attrs(&b).next().unwrap().1;
        let data = attrs(numgen).nth(1).unwrap().1;
        assert_eq!(
            data,
            [
                8, 0, 1, 0, 0, 0, 0, 1, 8, 0, 2, 0, 0, 0, 0, 2, 8, 0, 3, 0, 0, 0, 0, 0, 8, 0, 4, 0,
                0, 0, 0, 0
            ]
        );
    }

    #[test]
    fn element_messages_are_split() {
        let keys: Vec<Key> = (0..1200u32)
            .map(|i| Key::Pair(i.into(), i.into()))
            .collect();
        let ops: Vec<(TableId, Op)> = keys
            .iter()
            .map(|k| {
                (
                    0,
                    Op::AddElement {
                        map: MapName::HairpinEndpoints,
                        key: *k,
                        verdict: None,
                    },
                )
            })
            .collect();
        let b = encode("t", &ops, 0);
        // BEGIN, 3 element messages (512 + 512 + 176), END.
        assert_eq!(check_well_formed(&b.bytes), 5);
        assert_eq!(b.op_index(b.first_seq + 1), Some(512));
    }
}
