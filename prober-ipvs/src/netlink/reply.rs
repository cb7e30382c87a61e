//! Parsing replies: datagrams into messages, messages into acks, errors
//! and data, attributes into IPVS's types. Never panics; says what was
//! wrong and where.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use super::*;
use crate::{
    Destination, Family, Forwarding, IpvsInfo, Protocol, Service, ServiceKey, Stats, Tunnel,
    TunnelType,
};

/// One netlink message of a received datagram.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Message<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    /// Everything after the netlink header.
    pub payload: &'a [u8],
}

/// The messages of one datagram, in order; stops at the first malformed one.
pub fn messages(datagram: &[u8]) -> impl Iterator<Item = Result<Message<'_>, ParseError>> {
    let mut rest = datagram;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let header = rest.get(..NLMSG_HDR_LEN).ok_or_else(|| {
                error(format!(
                    "{} bytes left in the datagram, less than a netlink header",
                    rest.len()
                ))
            })?;
            let len = u32_at(header, 0) as usize;
            if len < NLMSG_HDR_LEN || len > rest.len() {
                return Err(error(format!(
                    "netlink message length {len} does not fit the {} bytes left",
                    rest.len()
                )));
            }
            let message = Message {
                kind: u16_at(header, 4),
                flags: u16_at(header, 6),
                seq: u32_at(header, 8),
                payload: &rest[NLMSG_HDR_LEN..len],
            };
            rest = rest.get(align4(len)..).unwrap_or(&[]);
            Ok(message)
        })();
        failed = parsed.is_err();
        Some(parsed)
    })
}

/// What a message says, for the request it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reply<'a> {
    /// A generic netlink message: its command and attributes.
    Data { cmd: u8, attributes: &'a [u8] },
    /// NLMSG_ERROR with 0: the request was applied.
    Ack,
    /// NLMSG_ERROR with an errno (positive here).
    Error { errno: i32 },
    /// NLMSG_DONE: the end of a dump.
    Done,
    /// NLMSG_NOOP / NLMSG_OVERRUN: nothing for us.
    Ignored,
}

pub fn reply<'a>(message: &Message<'a>) -> Result<Reply<'a>, ParseError> {
    match message.kind {
        NLMSG_ERROR => {
            let code = message
                .payload
                .get(..4)
                .map(|b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| error("NLMSG_ERROR shorter than its error code"))?;
            Ok(if code == 0 {
                Reply::Ack
            } else {
                Reply::Error {
                    errno: code.saturating_neg(),
                }
            })
        }
        NLMSG_DONE => {
            // A dump that failed part way carries the errno in DONE.
            match message.payload.get(..4) {
                Some(b) if i32::from_ne_bytes([b[0], b[1], b[2], b[3]]) < 0 => Ok(Reply::Error {
                    errno: i32::from_ne_bytes([b[0], b[1], b[2], b[3]]).saturating_neg(),
                }),
                _ => Ok(Reply::Done),
            }
        }
        NLMSG_NOOP | NLMSG_OVERRUN => Ok(Reply::Ignored),
        _ => {
            let header = message
                .payload
                .get(..GENL_HDR_LEN)
                .ok_or_else(|| error("generic netlink message shorter than its header"))?;
            Ok(Reply::Data {
                cmd: header[0],
                attributes: &message.payload[GENL_HDR_LEN..],
            })
        }
    }
}

/// One attribute: its type (without the nested/byte-order flags) and value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Attribute<'a> {
    pub kind: u16,
    pub value: &'a [u8],
}

/// The attributes in `data`, in order; stops at the first malformed one.
pub fn attributes(data: &[u8]) -> impl Iterator<Item = Result<Attribute<'_>, ParseError>> {
    let mut rest = data;
    let mut failed = false;
    std::iter::from_fn(move || {
        if failed || rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let header = rest.get(..NLA_HDR_LEN).ok_or_else(|| {
                error(format!(
                    "{} trailing bytes, less than an attribute header",
                    rest.len()
                ))
            })?;
            let len = u16_at(header, 0) as usize;
            let kind = u16_at(header, 2) & NLA_TYPE_MASK;
            if len < NLA_HDR_LEN || len > rest.len() {
                return Err(error(format!(
                    "attribute {kind} claims {len} bytes, {} are left",
                    rest.len()
                )));
            }
            let attribute = Attribute {
                kind,
                value: &rest[NLA_HDR_LEN..len],
            };
            rest = rest.get(align4(len)..).unwrap_or(&[]);
            Ok(attribute)
        })();
        failed = parsed.is_err();
        Some(parsed)
    })
}

/// The attributes of one level, indexed by type (the last one wins, as in
/// the kernel's nla_parse).
pub(super) struct AttributeTable<'a> {
    /// What is being parsed, for error messages.
    context: &'static str,
    slots: Vec<Option<&'a [u8]>>,
}

impl<'a> AttributeTable<'a> {
    pub(super) fn parse(
        context: &'static str,
        data: &'a [u8],
        max_kind: u16,
    ) -> Result<Self, ParseError> {
        let mut slots = vec![None; max_kind as usize + 1];
        for attribute in attributes(data) {
            let attribute = attribute.map_err(|e| error(format!("{context}: {e}")))?;
            if let Some(slot) = slots.get_mut(attribute.kind as usize) {
                *slot = Some(attribute.value);
            } // newer kernels' attributes beyond what we know are skipped
        }
        Ok(Self { context, slots })
    }

    pub(super) fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.slots.get(kind as usize).copied().flatten()
    }

    pub(super) fn required(&self, kind: u16, name: &str) -> Result<&'a [u8], ParseError> {
        self.get(kind)
            .ok_or_else(|| error(format!("{}: attribute {name} is missing", self.context)))
    }

    pub(super) fn fixed<const N: usize>(
        &self,
        value: &[u8],
        name: &str,
    ) -> Result<[u8; N], ParseError> {
        value
            .get(..N)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                error(format!(
                    "{}: attribute {name} has {} bytes, expected {N}",
                    self.context,
                    value.len()
                ))
            })
    }

    pub(super) fn u8(&self, kind: u16, name: &str) -> Result<Option<u8>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<1>(v, name).map(|b| b[0]))
            .transpose()
    }

    pub(super) fn u16(&self, kind: u16, name: &str) -> Result<Option<u16>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<2>(v, name).map(u16::from_ne_bytes))
            .transpose()
    }

    pub(super) fn be16(&self, kind: u16, name: &str) -> Result<Option<u16>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<2>(v, name).map(u16::from_be_bytes))
            .transpose()
    }

    pub(super) fn u32(&self, kind: u16, name: &str) -> Result<Option<u32>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<4>(v, name).map(u32::from_ne_bytes))
            .transpose()
    }

    pub(super) fn be32(&self, kind: u16, name: &str) -> Result<Option<u32>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<4>(v, name).map(u32::from_be_bytes))
            .transpose()
    }

    pub(super) fn u64(&self, kind: u16, name: &str) -> Result<Option<u64>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<8>(v, name).map(u64::from_ne_bytes))
            .transpose()
    }

    pub(super) fn required_u32(&self, kind: u16, name: &str) -> Result<u32, ParseError> {
        self.required(kind, name)?;
        Ok(self.u32(kind, name)?.unwrap_or_default())
    }

    pub(super) fn string(&self, kind: u16, name: &str) -> Result<Option<String>, ParseError> {
        self.get(kind)
            .map(|v| {
                let text = v.split(|b| *b == 0).next().unwrap_or_default();
                std::str::from_utf8(text)
                    .map(str::to_string)
                    .map_err(|_| error(format!("{}: attribute {name} is not UTF-8", self.context)))
            })
            .transpose()
    }

    pub(super) fn addr(&self, kind: u16, name: &str, family: Family) -> Result<IpAddr, ParseError> {
        let value = self.required(kind, name)?;
        match family {
            Family::Ipv4 => Ok(IpAddr::V4(Ipv4Addr::from(self.fixed::<4>(value, name)?))),
            Family::Ipv6 => Ok(IpAddr::V6(Ipv6Addr::from(self.fixed::<16>(value, name)?))),
        }
    }
}

/// The family id in a CTRL_CMD_NEWFAMILY reply.
pub fn parse_family_id(attributes: &[u8]) -> Result<u16, ParseError> {
    let table = AttributeTable::parse("family reply", attributes, CTRL_ATTR_FAMILY_NAME)?;
    table
        .u16(CTRL_ATTR_FAMILY_ID, "CTRL_ATTR_FAMILY_ID")?
        .ok_or_else(|| error("family reply: attribute CTRL_ATTR_FAMILY_ID is missing"))
}

pub fn parse_info(attributes: &[u8]) -> Result<IpvsInfo, ParseError> {
    let table = AttributeTable::parse("GET_INFO reply", attributes, IPVS_INFO_ATTR_CONN_TAB_SIZE)?;
    Ok(IpvsInfo {
        version: table.required_u32(IPVS_INFO_ATTR_VERSION, "VERSION")?,
        connection_table_size: table
            .u32(IPVS_INFO_ATTR_CONN_TAB_SIZE, "CONN_TAB_SIZE")?
            .unwrap_or_default(),
    })
}

/// A service from the attributes of one GET_SERVICE reply message.
pub fn parse_service(attributes: &[u8]) -> Result<Service, ParseError> {
    let top = AttributeTable::parse("service message", attributes, IPVS_CMD_ATTR_DEST)?;
    let nest = top.required(IPVS_CMD_ATTR_SERVICE, "SERVICE")?;
    let table = AttributeTable::parse("service", nest, IPVS_SVC_ATTR_STATS64)?;
    let key = parse_service_key(&table)?;
    // Service flags travel as {flags, mask}; the kernel fills the mask.
    let flags = match table.get(IPVS_SVC_ATTR_FLAGS) {
        Some(value) => u32::from_ne_bytes(table.fixed::<4>(value, "FLAGS")?),
        None => 0,
    };
    Ok(Service {
        key,
        scheduler: table
            .string(IPVS_SVC_ATTR_SCHED_NAME, "SCHED_NAME")?
            .unwrap_or_default(),
        flags,
        timeout: table.u32(IPVS_SVC_ATTR_TIMEOUT, "TIMEOUT")?.unwrap_or(0),
        // An IPv4 mask travels in network order, an IPv6 prefix length in
        // host order (libipvs, ip_vs_ctl.c).
        netmask: match key.family() {
            Family::Ipv4 => table.be32(IPVS_SVC_ATTR_NETMASK, "NETMASK")?.unwrap_or(0),
            Family::Ipv6 => table.u32(IPVS_SVC_ATTR_NETMASK, "NETMASK")?.unwrap_or(0),
        },
        persistence_engine: table
            .string(IPVS_SVC_ATTR_PE_NAME, "PE_NAME")?
            .filter(|name| !name.is_empty()),
        stats: parse_stats_of(&table, IPVS_SVC_ATTR_STATS64, IPVS_SVC_ATTR_STATS)?,
    })
}

fn parse_service_key(table: &AttributeTable<'_>) -> Result<ServiceKey, ParseError> {
    let raw_family = table
        .u16(IPVS_SVC_ATTR_AF, "AF")?
        .ok_or_else(|| error("service: attribute AF is missing"))?;
    let family = Family::from_raw(raw_family)
        .ok_or_else(|| error(format!("service: unknown address family {raw_family}")))?;
    match table.u32(IPVS_SVC_ATTR_FWMARK, "FWMARK")? {
        Some(mark) if mark != 0 => Ok(ServiceKey::Fwmark { family, mark }),
        _ => {
            let raw_protocol = table
                .u16(IPVS_SVC_ATTR_PROTOCOL, "PROTOCOL")?
                .ok_or_else(|| error("service: neither FWMARK nor PROTOCOL is present"))?;
            let protocol = Protocol::from_raw(raw_protocol)
                .ok_or_else(|| error(format!("service: unknown protocol {raw_protocol}")))?;
            let addr = table.addr(IPVS_SVC_ATTR_ADDR, "ADDR", family)?;
            let port = table
                .be16(IPVS_SVC_ATTR_PORT, "PORT")?
                .ok_or_else(|| error("service: attribute PORT is missing"))?;
            Ok(ServiceKey::Address {
                protocol,
                addr,
                port,
            })
        }
    }
}

/// A destination from the attributes of one GET_DEST reply message.
/// `service_family` is its address family when the kernel does not say
/// (kernels before 4.15 send no ADDR_FAMILY).
pub fn parse_destination(
    attributes: &[u8],
    service_family: Family,
) -> Result<Destination, ParseError> {
    let top = AttributeTable::parse("destination message", attributes, IPVS_CMD_ATTR_DEST)?;
    let nest = top.required(IPVS_CMD_ATTR_DEST, "DEST")?;
    let table = AttributeTable::parse("destination", nest, IPVS_DEST_ATTR_TUN_FLAGS)?;
    let family = match table.u16(IPVS_DEST_ATTR_ADDR_FAMILY, "ADDR_FAMILY")? {
        Some(raw) => Family::from_raw(raw)
            .ok_or_else(|| error(format!("destination: unknown address family {raw}")))?,
        None => service_family,
    };
    let addr = table.addr(IPVS_DEST_ATTR_ADDR, "ADDR", family)?;
    let in_destination = |e: ParseError| error(format!("{e} (destination {addr})"));
    let parse = || -> Result<Destination, ParseError> {
        Ok(Destination {
            addr,
            port: table
                .be16(IPVS_DEST_ATTR_PORT, "PORT")?
                .ok_or_else(|| error("destination: attribute PORT is missing"))?,
            forwarding: Forwarding::from_raw(
                table.required_u32(IPVS_DEST_ATTR_FWD_METHOD, "FWD_METHOD")?,
            ),
            weight: table.required_u32(IPVS_DEST_ATTR_WEIGHT, "WEIGHT")?,
            // Required: a weight change sends them back as they are.
            upper_threshold: table.required_u32(IPVS_DEST_ATTR_U_THRESH, "U_THRESH")?,
            lower_threshold: table.required_u32(IPVS_DEST_ATTR_L_THRESH, "L_THRESH")?,
            tunnel: Tunnel {
                kind: TunnelType::from_raw(
                    table.u8(IPVS_DEST_ATTR_TUN_TYPE, "TUN_TYPE")?.unwrap_or(0),
                ),
                port: table
                    .be16(IPVS_DEST_ATTR_TUN_PORT, "TUN_PORT")?
                    .unwrap_or(0),
                flags: table
                    .u16(IPVS_DEST_ATTR_TUN_FLAGS, "TUN_FLAGS")?
                    .unwrap_or(0),
            },
            active_conns: table
                .u32(IPVS_DEST_ATTR_ACTIVE_CONNS, "ACTIVE_CONNS")?
                .unwrap_or(0),
            inactive_conns: table
                .u32(IPVS_DEST_ATTR_INACT_CONNS, "INACT_CONNS")?
                .unwrap_or(0),
            persistent_conns: table
                .u32(IPVS_DEST_ATTR_PERSIST_CONNS, "PERSIST_CONNS")?
                .unwrap_or(0),
            stats: parse_stats_of(&table, IPVS_DEST_ATTR_STATS64, IPVS_DEST_ATTR_STATS)?,
        })
    };
    parse().map_err(in_destination)
}

/// STATS64 when present (kernel 4.1+), else the 32-bit STATS.
fn parse_stats_of(
    table: &AttributeTable<'_>,
    stats64: u16,
    stats32: u16,
) -> Result<Stats, ParseError> {
    if let Some(nest) = table.get(stats64) {
        parse_stats(nest, true)
    } else if let Some(nest) = table.get(stats32) {
        parse_stats(nest, false)
    } else {
        Ok(Stats::default())
    }
}

const IPVS_STATS_ATTR_OUTBPS: u16 = 10;

fn parse_stats(nest: &[u8], wide: bool) -> Result<Stats, ParseError> {
    let table = AttributeTable::parse(
        if wide { "STATS64" } else { "STATS" },
        nest,
        IPVS_STATS_ATTR_OUTBPS,
    )?;
    let field = |kind: u16, name: &str| -> Result<u64, ParseError> {
        Ok(if wide {
            table.u64(kind, name)?.unwrap_or(0)
        } else {
            table.u32(kind, name)?.map(u64::from).unwrap_or(0)
        })
    };
    Ok(Stats {
        conns: field(1, "CONNS")?,
        in_packets: field(2, "INPKTS")?,
        out_packets: field(3, "OUTPKTS")?,
        in_bytes: field(4, "INBYTES")?,
        out_bytes: field(5, "OUTBYTES")?,
        cps: field(6, "CPS")?,
        in_pps: field(7, "INPPS")?,
        out_pps: field(8, "OUTPPS")?,
        in_bps: field(9, "INBPS")?,
        out_bps: field(10, "OUTBPS")?,
    })
}

pub(super) fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

pub(super) fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}
