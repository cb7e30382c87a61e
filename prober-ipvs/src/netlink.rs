//! Generic netlink messages for IPVS: building requests and parsing
//! replies. Pure functions over byte slices, so they are unit-tested on byte
//! fixtures; parsing never panics and reports what was wrong and where.

use std::{
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use crate::{
    Destination, Family, Forwarding, IpvsInfo, Protocol, Service, ServiceKey, Stats, Tunnel,
    TunnelType,
};

// netlink(7)
pub const NLMSG_HDR_LEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
/// Set on a dump message when the data changed while the dump ran.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_DUMP: u16 = 0x300;
const NLA_HDR_LEN: usize = 4;
/// Flag bits of an attribute type, not part of the type itself.
const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

// genetlink.h
pub const GENL_HDR_LEN: usize = 4;
pub const GENL_ID_CTRL: u16 = 0x10;
const CTRL_CMD_GETFAMILY: u8 = 3;
const CTRL_ATTR_FAMILY_ID: u16 = 1;
const CTRL_ATTR_FAMILY_NAME: u16 = 2;

// ip_vs.h
pub const IPVS_GENL_NAME: &str = "IPVS";
pub const IPVS_GENL_VERSION: u8 = 1;
pub const IPVS_CMD_NEW_SERVICE: u8 = 1;
pub const IPVS_CMD_GET_SERVICE: u8 = 4;
pub const IPVS_CMD_NEW_DEST: u8 = 5;
pub const IPVS_CMD_SET_DEST: u8 = 6;
pub const IPVS_CMD_GET_DEST: u8 = 8;
pub const IPVS_CMD_SET_INFO: u8 = 14;
pub const IPVS_CMD_GET_INFO: u8 = 15;

const IPVS_CMD_ATTR_SERVICE: u16 = 1;
const IPVS_CMD_ATTR_DEST: u16 = 2;

const IPVS_SVC_ATTR_AF: u16 = 1;
const IPVS_SVC_ATTR_PROTOCOL: u16 = 2;
const IPVS_SVC_ATTR_ADDR: u16 = 3;
const IPVS_SVC_ATTR_PORT: u16 = 4;
const IPVS_SVC_ATTR_FWMARK: u16 = 5;
const IPVS_SVC_ATTR_SCHED_NAME: u16 = 6;
const IPVS_SVC_ATTR_FLAGS: u16 = 7;
const IPVS_SVC_ATTR_TIMEOUT: u16 = 8;
const IPVS_SVC_ATTR_NETMASK: u16 = 9;
const IPVS_SVC_ATTR_STATS: u16 = 10;
const IPVS_SVC_ATTR_PE_NAME: u16 = 11;
const IPVS_SVC_ATTR_STATS64: u16 = 12;

const IPVS_DEST_ATTR_ADDR: u16 = 1;
const IPVS_DEST_ATTR_PORT: u16 = 2;
const IPVS_DEST_ATTR_FWD_METHOD: u16 = 3;
const IPVS_DEST_ATTR_WEIGHT: u16 = 4;
const IPVS_DEST_ATTR_U_THRESH: u16 = 5;
const IPVS_DEST_ATTR_L_THRESH: u16 = 6;
const IPVS_DEST_ATTR_ACTIVE_CONNS: u16 = 7;
const IPVS_DEST_ATTR_INACT_CONNS: u16 = 8;
const IPVS_DEST_ATTR_PERSIST_CONNS: u16 = 9;
const IPVS_DEST_ATTR_STATS: u16 = 10;
const IPVS_DEST_ATTR_ADDR_FAMILY: u16 = 11;
const IPVS_DEST_ATTR_STATS64: u16 = 12;
const IPVS_DEST_ATTR_TUN_TYPE: u16 = 13;
const IPVS_DEST_ATTR_TUN_PORT: u16 = 14;
const IPVS_DEST_ATTR_TUN_FLAGS: u16 = 15;

const IPVS_INFO_ATTR_VERSION: u16 = 1;
const IPVS_INFO_ATTR_CONN_TAB_SIZE: u16 = 2;

/// Why a reply could not be parsed: what was wrong and in which attribute.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseError(pub String);

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ParseError {}

fn error(message: impl Into<String>) -> ParseError {
    ParseError(message.into())
}

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

// ---------------------------------------------------------------- building

/// Builds one netlink message with a generic netlink header and attributes;
/// nests are opened and closed around the attributes they hold.
pub struct MessageBuilder {
    buf: Vec<u8>,
    open_nests: Vec<usize>,
}

impl MessageBuilder {
    pub fn new(kind: u16, flags: u16, seq: u32, cmd: u8, version: u8) -> Self {
        let mut buf = Vec::with_capacity(160);
        buf.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
        buf.extend_from_slice(&kind.to_ne_bytes());
        buf.extend_from_slice(&flags.to_ne_bytes());
        buf.extend_from_slice(&seq.to_ne_bytes());
        buf.extend_from_slice(&0u32.to_ne_bytes()); // port id: the kernel fills it
        buf.extend_from_slice(&[cmd, version, 0, 0]);
        Self {
            buf,
            open_nests: Vec::new(),
        }
    }

    pub fn bytes(&mut self, kind: u16, value: &[u8]) -> &mut Self {
        let len = NLA_HDR_LEN + value.len();
        self.buf.extend_from_slice(&(len as u16).to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self.buf.extend_from_slice(value);
        self.buf.resize(align4(self.buf.len()), 0);
        self
    }

    pub fn u8(&mut self, kind: u16, value: u8) -> &mut Self {
        self.bytes(kind, &[value])
    }

    pub fn u16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.bytes(kind, &value.to_ne_bytes())
    }

    /// A port or other network-order 16-bit value.
    pub fn be16(&mut self, kind: u16, value: u16) -> &mut Self {
        self.bytes(kind, &value.to_be_bytes())
    }

    pub fn u32(&mut self, kind: u16, value: u32) -> &mut Self {
        self.bytes(kind, &value.to_ne_bytes())
    }

    /// A NUL-terminated string.
    pub fn string(&mut self, kind: u16, value: &str) -> &mut Self {
        let mut bytes = value.as_bytes().to_vec();
        bytes.push(0);
        self.bytes(kind, &bytes)
    }

    /// An address as IPVS wants it: 16 bytes, an IPv4 one in the first 4.
    pub fn addr(&mut self, kind: u16, addr: &IpAddr) -> &mut Self {
        let mut bytes = [0u8; 16];
        match addr {
            IpAddr::V4(v4) => bytes[..4].copy_from_slice(&v4.octets()),
            IpAddr::V6(v6) => bytes.copy_from_slice(&v6.octets()),
        }
        self.bytes(kind, &bytes)
    }

    pub fn begin_nest(&mut self, kind: u16) -> &mut Self {
        self.open_nests.push(self.buf.len());
        self.buf.extend_from_slice(&0u16.to_ne_bytes());
        self.buf.extend_from_slice(&kind.to_ne_bytes());
        self
    }

    pub fn end_nest(&mut self) -> &mut Self {
        let start = self
            .open_nests
            .pop()
            .expect("end_nest without begin_nest: a bug in a request builder");
        let len = (self.buf.len() - start) as u16;
        self.buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        assert!(
            self.open_nests.is_empty(),
            "unclosed nest: a bug in a request builder"
        );
        let len = self.buf.len() as u32;
        self.buf[..4].copy_from_slice(&len.to_ne_bytes());
        self.buf
    }
}

/// CTRL_CMD_GETFAMILY for "IPVS".
pub fn get_family_request(seq: u32) -> Vec<u8> {
    let mut msg = MessageBuilder::new(GENL_ID_CTRL, NLM_F_REQUEST, seq, CTRL_CMD_GETFAMILY, 1);
    msg.string(CTRL_ATTR_FAMILY_NAME, IPVS_GENL_NAME);
    msg.finish()
}

pub fn get_info_request(family: u16, seq: u32) -> Vec<u8> {
    ipvs_message(family, NLM_F_REQUEST, seq, IPVS_CMD_GET_INFO).finish()
}

pub fn dump_services_request(family: u16, seq: u32) -> Vec<u8> {
    ipvs_message(
        family,
        NLM_F_REQUEST | NLM_F_DUMP,
        seq,
        IPVS_CMD_GET_SERVICE,
    )
    .finish()
}

/// GET_SERVICE without the dump flag: ESRCH when the service is absent.
pub fn get_service_request(family: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut msg = ipvs_message(family, NLM_F_REQUEST, seq, IPVS_CMD_GET_SERVICE);
    put_service_key(&mut msg, key);
    msg.finish()
}

pub fn dump_destinations_request(family: u16, seq: u32, key: &ServiceKey) -> Vec<u8> {
    let mut msg = ipvs_message(family, NLM_F_REQUEST | NLM_F_DUMP, seq, IPVS_CMD_GET_DEST);
    put_service_key(&mut msg, key);
    msg.finish()
}

/// SET_DEST with `weight` and everything else of `dest` as dumped: the
/// kernel replaces forwarding, thresholds and tunnel fields with what the
/// request carries, so all of them go back unchanged (shared/docs/ipvs-netlink.md).
pub fn set_destination_request(
    family: u16,
    seq: u32,
    service: &ServiceKey,
    dest: &Destination,
    weight: u32,
) -> Vec<u8> {
    let mut msg = ipvs_message(family, NLM_F_REQUEST | NLM_F_ACK, seq, IPVS_CMD_SET_DEST);
    put_service_key(&mut msg, service);
    msg.begin_nest(IPVS_CMD_ATTR_DEST)
        .addr(IPVS_DEST_ATTR_ADDR, &dest.addr)
        .be16(IPVS_DEST_ATTR_PORT, dest.port)
        .u16(IPVS_DEST_ATTR_ADDR_FAMILY, Family::of(&dest.addr).to_raw())
        .u32(IPVS_DEST_ATTR_FWD_METHOD, dest.forwarding.to_raw())
        .u32(IPVS_DEST_ATTR_WEIGHT, weight)
        .u32(IPVS_DEST_ATTR_U_THRESH, dest.upper_threshold)
        .u32(IPVS_DEST_ATTR_L_THRESH, dest.lower_threshold);
    // Absent tunnel attributes reset to 0, which is what a non-tunnel
    // destination has; send them whenever they carry anything.
    if dest.forwarding == Forwarding::Tunnel || dest.tunnel != Tunnel::default() {
        msg.u8(IPVS_DEST_ATTR_TUN_TYPE, dest.tunnel.kind.to_raw())
            .be16(IPVS_DEST_ATTR_TUN_PORT, dest.tunnel.port)
            .u16(IPVS_DEST_ATTR_TUN_FLAGS, dest.tunnel.flags);
    }
    msg.end_nest();
    msg.finish()
}

fn ipvs_message(family: u16, flags: u16, seq: u32, cmd: u8) -> MessageBuilder {
    MessageBuilder::new(family, flags, seq, cmd, IPVS_GENL_VERSION)
}

fn put_service_key(msg: &mut MessageBuilder, key: &ServiceKey) {
    msg.begin_nest(IPVS_CMD_ATTR_SERVICE)
        .u16(IPVS_SVC_ATTR_AF, key.family().to_raw());
    match key {
        ServiceKey::Address {
            protocol,
            addr,
            port,
        } => {
            msg.u16(IPVS_SVC_ATTR_PROTOCOL, protocol.to_raw())
                .addr(IPVS_SVC_ATTR_ADDR, addr)
                .be16(IPVS_SVC_ATTR_PORT, *port);
        }
        ServiceKey::Fwmark { mark, .. } => {
            msg.u32(IPVS_SVC_ATTR_FWMARK, *mark);
        }
    }
    msg.end_nest();
}

// ----------------------------------------------------------------- parsing

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
struct AttributeTable<'a> {
    /// What is being parsed, for error messages.
    context: &'static str,
    slots: Vec<Option<&'a [u8]>>,
}

impl<'a> AttributeTable<'a> {
    fn parse(context: &'static str, data: &'a [u8], max_kind: u16) -> Result<Self, ParseError> {
        let mut slots = vec![None; max_kind as usize + 1];
        for attribute in attributes(data) {
            let attribute = attribute.map_err(|e| error(format!("{context}: {e}")))?;
            if let Some(slot) = slots.get_mut(attribute.kind as usize) {
                *slot = Some(attribute.value);
            } // newer kernels' attributes beyond what we know are skipped
        }
        Ok(Self { context, slots })
    }

    fn get(&self, kind: u16) -> Option<&'a [u8]> {
        self.slots.get(kind as usize).copied().flatten()
    }

    fn required(&self, kind: u16, name: &str) -> Result<&'a [u8], ParseError> {
        self.get(kind)
            .ok_or_else(|| error(format!("{}: attribute {name} is missing", self.context)))
    }

    fn fixed<const N: usize>(&self, value: &[u8], name: &str) -> Result<[u8; N], ParseError> {
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

    fn u8(&self, kind: u16, name: &str) -> Result<Option<u8>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<1>(v, name).map(|b| b[0]))
            .transpose()
    }

    fn u16(&self, kind: u16, name: &str) -> Result<Option<u16>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<2>(v, name).map(u16::from_ne_bytes))
            .transpose()
    }

    fn be16(&self, kind: u16, name: &str) -> Result<Option<u16>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<2>(v, name).map(u16::from_be_bytes))
            .transpose()
    }

    fn u32(&self, kind: u16, name: &str) -> Result<Option<u32>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<4>(v, name).map(u32::from_ne_bytes))
            .transpose()
    }

    fn be32(&self, kind: u16, name: &str) -> Result<Option<u32>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<4>(v, name).map(u32::from_be_bytes))
            .transpose()
    }

    fn u64(&self, kind: u16, name: &str) -> Result<Option<u64>, ParseError> {
        self.get(kind)
            .map(|v| self.fixed::<8>(v, name).map(u64::from_ne_bytes))
            .transpose()
    }

    fn required_u32(&self, kind: u16, name: &str) -> Result<u32, ParseError> {
        self.required(kind, name)?;
        Ok(self.u32(kind, name)?.unwrap_or_default())
    }

    fn string(&self, kind: u16, name: &str) -> Result<Option<String>, ParseError> {
        self.get(kind)
            .map(|v| {
                let text = v.split(|b| *b == 0).next().unwrap_or_default();
                std::str::from_utf8(text)
                    .map(str::to_string)
                    .map_err(|_| error(format!("{}: attribute {name} is not UTF-8", self.context)))
            })
            .transpose()
    }

    fn addr(&self, kind: u16, name: &str, family: Family) -> Result<IpAddr, ParseError> {
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

fn u16_at(bytes: &[u8], at: usize) -> u16 {
    u16::from_ne_bytes([bytes[at], bytes[at + 1]])
}

fn u32_at(bytes: &[u8], at: usize) -> u32 {
    u32::from_ne_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]])
}

/// Kernel-style replies for the client's unit tests.
#[cfg(test)]
pub(crate) mod fixtures {
    use super::*;

    /// One GET_SERVICE dump message for `key` (scheduler rr, no stats).
    pub fn service_message(family: u16, seq: u32, flags: u16, key: &ServiceKey) -> Vec<u8> {
        let mut full = MessageBuilder::new(family, flags, seq, IPVS_CMD_NEW_SERVICE, 1);
        full.begin_nest(IPVS_CMD_ATTR_SERVICE)
            .u16(IPVS_SVC_ATTR_AF, key.family().to_raw());
        match key {
            ServiceKey::Address {
                protocol,
                addr,
                port,
            } => {
                full.u16(IPVS_SVC_ATTR_PROTOCOL, protocol.to_raw())
                    .addr(IPVS_SVC_ATTR_ADDR, addr)
                    .be16(IPVS_SVC_ATTR_PORT, *port);
            }
            ServiceKey::Fwmark { mark, .. } => {
                full.u32(IPVS_SVC_ATTR_FWMARK, *mark);
            }
        }
        full.string(IPVS_SVC_ATTR_SCHED_NAME, "rr");
        full.end_nest();
        full.finish()
    }

    /// One GET_DEST dump message for `dest`.
    pub fn destination_message(family: u16, seq: u32, dest: &Destination) -> Vec<u8> {
        let mut full = MessageBuilder::new(family, NLM_F_MULTI, seq, IPVS_CMD_NEW_DEST, 1);
        full.begin_nest(IPVS_CMD_ATTR_DEST)
            .addr(IPVS_DEST_ATTR_ADDR, &dest.addr)
            .be16(IPVS_DEST_ATTR_PORT, dest.port)
            .u32(IPVS_DEST_ATTR_FWD_METHOD, dest.forwarding.to_raw())
            .u32(IPVS_DEST_ATTR_WEIGHT, dest.weight)
            .u32(IPVS_DEST_ATTR_U_THRESH, dest.upper_threshold)
            .u32(IPVS_DEST_ATTR_L_THRESH, dest.lower_threshold);
        full.end_nest();
        full.finish()
    }

    /// NLMSG_DONE for `seq`.
    pub fn done(seq: u32) -> Vec<u8> {
        control_message(NLMSG_DONE, NLM_F_MULTI, seq, 0)
    }

    /// NLMSG_ERROR for `seq`: 0 is an ack, else a positive errno.
    pub fn ack(seq: u32, errno: i32) -> Vec<u8> {
        let mut msg = control_message(NLMSG_ERROR, 0, seq, -errno);
        // NETLINK_CAP_ACK: the request's header follows, its payload not.
        msg.extend_from_slice(&[0u8; NLMSG_HDR_LEN]);
        let len = msg.len() as u32;
        msg[..4].copy_from_slice(&len.to_ne_bytes());
        msg
    }

    fn control_message(kind: u16, flags: u16, seq: u32, code: i32) -> Vec<u8> {
        let mut msg = Vec::new();
        msg.extend_from_slice(&20u32.to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(&code.to_ne_bytes());
        msg
    }
}

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

    use super::*;

    fn hex(text: &str) -> Vec<u8> {
        let digits: String = text.chars().filter(|c| c.is_ascii_hexdigit()).collect();
        (0..digits.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&digits[i..i + 2], 16).unwrap())
            .collect()
    }

    fn v4(a: u8, b: u8, c: u8, d: u8) -> IpAddr {
        IpAddr::V4(Ipv4Addr::new(a, b, c, d))
    }

    fn dr_destination() -> Destination {
        Destination {
            addr: v4(10, 0, 0, 2),
            port: 80,
            forwarding: Forwarding::DirectRoute,
            weight: 1,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: Tunnel::default(),
            active_conns: 0,
            inactive_conns: 0,
            persistent_conns: 0,
            stats: Stats::default(),
        }
    }

    fn tcp_service() -> ServiceKey {
        ServiceKey::Address {
            protocol: Protocol::Tcp,
            addr: v4(10, 0, 0, 1),
            port: 80,
        }
    }

    /// The worked example of shared/docs/ipvs-netlink.md, byte for byte.
    #[test]
    fn set_dest_matches_the_worked_example() {
        let message = set_destination_request(0x22, 7, &tcp_service(), &dr_destination(), 50);
        let expected_attributes = hex("30000100
               0600010002000000
               0600020006000000
               140003000a000001000000000000000000000000
               0600040000500000
             48000200
               140001000a000002000000000000000000000000
               0600020000500000
               06000b0002000000
               0800030003000000
               0800040032000000
               0800050000000000
               0800060000000000");
        assert_eq!(&message[20..], &expected_attributes[..]);
        // netlink header: length, family id, REQUEST|ACK, seq, port 0;
        // genl header: SET_DEST, version 1.
        assert_eq!(u32_at(&message, 0) as usize, message.len());
        assert_eq!(u16_at(&message, 4), 0x22);
        assert_eq!(u16_at(&message, 6), NLM_F_REQUEST | NLM_F_ACK);
        assert_eq!(u32_at(&message, 8), 7);
        assert_eq!(u32_at(&message, 12), 0);
        assert_eq!(&message[16..20], &[IPVS_CMD_SET_DEST, 1, 0, 0]);
    }

    #[test]
    fn set_dest_keeps_tunnel_settings_and_thresholds() {
        let dest = Destination {
            forwarding: Forwarding::Tunnel,
            upper_threshold: 100,
            lower_threshold: 10,
            tunnel: Tunnel {
                kind: TunnelType::Gue,
                port: 6080,
                flags: 1,
            },
            ..dr_destination()
        };
        let message = set_destination_request(0x22, 1, &tcp_service(), &dest, 9);
        let top = AttributeTable::parse("test", &message[20..], IPVS_CMD_ATTR_DEST).unwrap();
        let nest = top.required(IPVS_CMD_ATTR_DEST, "DEST").unwrap();
        let table = AttributeTable::parse("dest", nest, IPVS_DEST_ATTR_TUN_FLAGS).unwrap();
        let u32_of = |k| table.u32(k, "").unwrap().unwrap();
        assert_eq!(u32_of(IPVS_DEST_ATTR_FWD_METHOD), 2);
        assert_eq!(u32_of(IPVS_DEST_ATTR_WEIGHT), 9);
        assert_eq!(u32_of(IPVS_DEST_ATTR_U_THRESH), 100);
        assert_eq!(u32_of(IPVS_DEST_ATTR_L_THRESH), 10);
        assert_eq!(table.u8(IPVS_DEST_ATTR_TUN_TYPE, "").unwrap(), Some(1));
        assert_eq!(
            table.get(IPVS_DEST_ATTR_TUN_PORT),
            Some(&6080u16.to_be_bytes()[..])
        );
        assert_eq!(table.u16(IPVS_DEST_ATTR_TUN_FLAGS, "").unwrap(), Some(1));
    }

    #[test]
    fn fwmark_and_ipv6_service_keys() {
        let key = ServiceKey::Fwmark {
            family: Family::Ipv6,
            mark: 7,
        };
        let message = dump_destinations_request(0x22, 3, &key);
        assert_eq!(u16_at(&message, 6), NLM_F_REQUEST | NLM_F_DUMP);
        assert_eq!(
            &message[20..],
            &hex("14000100 06000100 0a000000 08000500 07000000")[..]
        );

        let key = ServiceKey::Address {
            protocol: Protocol::Udp,
            addr: "2001:db8::1".parse().unwrap(),
            port: 53,
        };
        let message = get_service_request(0x22, 3, &key);
        assert_eq!(u16_at(&message, 6), NLM_F_REQUEST);
        assert_eq!(
            &message[20..],
            &hex("30000100 06000100 0a000000 06000200 11000000
                 14000300 20010db8000000000000000000000001 06000400 00350000")[..]
        );
    }

    /// A GET_SERVICE reply as a 6.1 kernel sends it: TCP 10.0.0.1:80, wrr,
    /// persistent 300 s, with STATS and STATS64.
    fn service_reply_attributes() -> Vec<u8> {
        let mut msg = MessageBuilder::new(0x22, NLM_F_MULTI, 1, IPVS_CMD_NEW_SERVICE, 1);
        msg.begin_nest(IPVS_CMD_ATTR_SERVICE)
            .u16(IPVS_SVC_ATTR_AF, 2)
            .u16(IPVS_SVC_ATTR_PROTOCOL, 6)
            .addr(IPVS_SVC_ATTR_ADDR, &v4(10, 0, 0, 1))
            .be16(IPVS_SVC_ATTR_PORT, 80)
            .string(IPVS_SVC_ATTR_SCHED_NAME, "wrr")
            .bytes(IPVS_SVC_ATTR_FLAGS, &hex("03000000 ffffffff"))
            .u32(IPVS_SVC_ATTR_TIMEOUT, 300)
            .bytes(IPVS_SVC_ATTR_NETMASK, &[255, 255, 255, 0]);
        msg.begin_nest(IPVS_SVC_ATTR_STATS);
        for kind in 1..=10 {
            msg.u32(kind, kind as u32);
        }
        msg.end_nest();
        msg.begin_nest(IPVS_SVC_ATTR_STATS64);
        msg.bytes(11, &[]); // PAD
        for kind in 1..=10u16 {
            msg.bytes(kind, &(u64::from(kind) << 33).to_ne_bytes());
        }
        msg.end_nest().end_nest();
        msg.finish()[20..].to_vec()
    }

    #[test]
    fn parses_a_service_with_64_bit_stats() {
        let service = parse_service(&service_reply_attributes()).unwrap();
        assert_eq!(service.key, tcp_service());
        assert_eq!(service.scheduler, "wrr");
        assert_eq!(service.flags, 3);
        assert_eq!(service.timeout, 300);
        assert_eq!(service.netmask, 0xffff_ff00);
        assert_eq!(service.persistence_engine, None);
        assert_eq!(service.stats.conns, 1 << 33);
        assert_eq!(service.stats.out_bps, 10 << 33);
    }

    fn destination_reply_attributes(family: Option<u16>, addr: &IpAddr) -> Vec<u8> {
        let mut msg = MessageBuilder::new(0x22, NLM_F_MULTI, 1, IPVS_CMD_NEW_DEST, 1);
        msg.begin_nest(IPVS_CMD_ATTR_DEST)
            .addr(IPVS_DEST_ATTR_ADDR, addr)
            .be16(IPVS_DEST_ATTR_PORT, 8080)
            .u32(IPVS_DEST_ATTR_FWD_METHOD, 2)
            .u32(IPVS_DEST_ATTR_WEIGHT, 7)
            .u8(IPVS_DEST_ATTR_TUN_TYPE, 1)
            .be16(IPVS_DEST_ATTR_TUN_PORT, 6080)
            .u16(IPVS_DEST_ATTR_TUN_FLAGS, 2)
            .u32(IPVS_DEST_ATTR_U_THRESH, 100)
            .u32(IPVS_DEST_ATTR_L_THRESH, 10)
            .u32(IPVS_DEST_ATTR_ACTIVE_CONNS, 4)
            .u32(IPVS_DEST_ATTR_INACT_CONNS, 5)
            .u32(IPVS_DEST_ATTR_PERSIST_CONNS, 6);
        if let Some(family) = family {
            msg.u16(IPVS_DEST_ATTR_ADDR_FAMILY, family);
        }
        msg.begin_nest(IPVS_DEST_ATTR_STATS);
        msg.u32(2, 77);
        msg.end_nest();
        msg.end_nest();
        msg.finish()[20..].to_vec()
    }

    #[test]
    fn parses_a_gue_tunnel_destination() {
        let attrs = destination_reply_attributes(Some(2), &v4(10, 0, 0, 2));
        let dest = parse_destination(&attrs, Family::Ipv4).unwrap();
        assert_eq!(dest.addr, v4(10, 0, 0, 2));
        assert_eq!(dest.port, 8080);
        assert_eq!(dest.forwarding, Forwarding::Tunnel);
        assert_eq!(dest.weight, 7);
        assert_eq!(
            dest.tunnel,
            Tunnel {
                kind: TunnelType::Gue,
                port: 6080,
                flags: 2
            }
        );
        assert_eq!((dest.upper_threshold, dest.lower_threshold), (100, 10));
        assert_eq!(
            (
                dest.active_conns,
                dest.inactive_conns,
                dest.persistent_conns
            ),
            (4, 5, 6)
        );
        // Only the 32-bit STATS: widened.
        assert_eq!(dest.stats.in_packets, 77);
    }

    #[test]
    fn an_ipv6_destination_in_an_ipv4_service_follows_its_addr_family() {
        let addr = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2));
        let attrs = destination_reply_attributes(Some(10), &addr);
        assert_eq!(parse_destination(&attrs, Family::Ipv4).unwrap().addr, addr);
        // Without ADDR_FAMILY (old kernels) the service's family applies.
        let attrs = destination_reply_attributes(None, &addr);
        assert_eq!(parse_destination(&attrs, Family::Ipv6).unwrap().addr, addr);
    }

    #[test]
    fn parses_messages_acks_errors_and_done() {
        let mut datagram = Vec::new();
        // NLMSG_ERROR 0 (ack) for seq 5, NLMSG_ERROR -ESRCH for seq 6, DONE.
        for (seq, code) in [(5u32, 0i32), (6, -libc::ESRCH)] {
            datagram.extend_from_slice(&36u32.to_ne_bytes());
            datagram.extend_from_slice(&NLMSG_ERROR.to_ne_bytes());
            datagram.extend_from_slice(&0u16.to_ne_bytes());
            datagram.extend_from_slice(&seq.to_ne_bytes());
            datagram.extend_from_slice(&0u32.to_ne_bytes());
            datagram.extend_from_slice(&code.to_ne_bytes());
            datagram.extend_from_slice(&[0u8; 16]);
        }
        datagram.extend_from_slice(&hex("14000000 0300 0200 07000000 00000000 00000000"));
        let parsed: Vec<_> = messages(&datagram).map(Result::unwrap).collect();
        assert_eq!(parsed.len(), 3);
        assert_eq!(parsed[0].seq, 5);
        assert_eq!(reply(&parsed[0]).unwrap(), Reply::Ack);
        assert_eq!(
            reply(&parsed[1]).unwrap(),
            Reply::Error { errno: libc::ESRCH }
        );
        assert_eq!(reply(&parsed[2]).unwrap(), Reply::Done);
        assert_eq!(parsed[2].flags, NLM_F_MULTI);
    }

    #[test]
    fn family_id_from_a_controller_reply() {
        let mut msg = MessageBuilder::new(GENL_ID_CTRL, 0, 1, 1, 2);
        msg.string(CTRL_ATTR_FAMILY_NAME, "IPVS")
            .u16(CTRL_ATTR_FAMILY_ID, 0x1f)
            .u32(3, 1); // CTRL_ATTR_VERSION, ignored
        assert_eq!(parse_family_id(&msg.finish()[20..]).unwrap(), 0x1f);
        assert_eq!(
            get_family_request(9)[20..],
            hex("09000200 49505653 00000000")[..]
        );
    }

    #[test]
    fn missing_and_short_attributes_are_named() {
        let mut msg = MessageBuilder::new(0x22, 0, 1, IPVS_CMD_NEW_DEST, 1);
        msg.begin_nest(IPVS_CMD_ATTR_DEST)
            .addr(IPVS_DEST_ATTR_ADDR, &v4(10, 0, 0, 2))
            .be16(IPVS_DEST_ATTR_PORT, 80)
            .u32(IPVS_DEST_ATTR_FWD_METHOD, 0)
            .u32(IPVS_DEST_ATTR_WEIGHT, 1)
            .u16(IPVS_DEST_ATTR_U_THRESH, 1); // 2 bytes where 4 belong
        msg.end_nest();
        let err = parse_destination(&msg.finish()[20..], Family::Ipv4).unwrap_err();
        assert_eq!(
            err.to_string(),
            "destination: attribute U_THRESH has 2 bytes, expected 4 (destination 10.0.0.2)"
        );

        let mut msg = MessageBuilder::new(0x22, 0, 1, IPVS_CMD_NEW_SERVICE, 1);
        msg.begin_nest(IPVS_CMD_ATTR_SERVICE)
            .u16(IPVS_SVC_ATTR_AF, 2);
        msg.end_nest();
        let err = parse_service(&msg.finish()[20..]).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service: neither FWMARK nor PROTOCOL is present"
        );

        let err = parse_service(&hex("08000300 02000000")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "service message: attribute SERVICE is missing"
        );
    }

    /// Every truncation and every single-byte corruption of real replies
    /// gives an error or a value, never a panic.
    #[test]
    fn malformed_input_never_panics() {
        let service = service_reply_attributes();
        let dest = destination_reply_attributes(Some(2), &v4(10, 0, 0, 2));
        for fixture in [&service, &dest] {
            for len in 0..fixture.len() {
                let _ = parse_service(&fixture[..len]);
                let _ = parse_destination(&fixture[..len], Family::Ipv4);
                let _ = messages(&fixture[..len]).count();
            }
            for at in 0..fixture.len() {
                for value in [0u8, 1, 3, 0x7f, 0x80, 0xff] {
                    let mut corrupt = fixture.clone();
                    corrupt[at] = value;
                    let _ = parse_service(&corrupt);
                    let _ = parse_destination(&corrupt, Family::Ipv6);
                    let _ = parse_info(&corrupt);
                    let _ = parse_family_id(&corrupt);
                    for message in messages(&corrupt).flatten() {
                        let _ = reply(&message);
                    }
                }
            }
        }
        assert!(messages(&[0u8; 3]).next().unwrap().is_err());
        assert!(reply(&Message {
            kind: NLMSG_ERROR,
            flags: 0,
            seq: 0,
            payload: &[1, 2]
        })
        .is_err());
        let err = attributes(&hex("ff000100 00000000"))
            .next()
            .unwrap()
            .unwrap_err();
        assert_eq!(err.to_string(), "attribute 1 claims 255 bytes, 8 are left");
    }

    #[test]
    fn info_reply() {
        let info = parse_info(&hex("08000100 01020100 08000200 00100000")).unwrap();
        assert_eq!(info.version_string(), "1.2.1");
        assert_eq!(info.connection_table_size, 4096);
    }
}
