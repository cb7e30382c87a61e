//! IPVS over generic netlink: the only way prober acts on the director.
//!
//! [`IpvsClient`] reads every virtual service and its real servers
//! ([`IpvsClient::dump`]) and changes weights by read-modify-write
//! ([`IpvsClient::set_weights`]), keeping each destination's forwarding
//! method, thresholds and tunnel settings as the kernel reported them. It
//! never creates or deletes services or destinations.
//!
//! Wire facts: `shared/docs/ipvs-netlink.md`; messages are built and parsed
//! by the pure functions in [`netlink`], the socket lives in [`client`].

pub mod client;
mod error;
pub mod netlink;

use std::{
    fmt,
    net::{IpAddr, SocketAddr},
};

use serde::Serialize;

pub use client::{ChangeOutcome, IpvsClient, WeightChange, WeightFailure, WeightUpdate};
pub use error::IpvsError;

/// Largest weight IPVS takes: the kernel stores it in an `int` and rejects
/// negative values with ERANGE.
pub const MAX_WEIGHT: u32 = i32::MAX as u32;

/// An address family as IPVS encodes it (`AF_INET` / `AF_INET6`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    Ipv4,
    Ipv6,
}

impl Family {
    pub fn of(addr: &IpAddr) -> Self {
        match addr {
            IpAddr::V4(_) => Family::Ipv4,
            IpAddr::V6(_) => Family::Ipv6,
        }
    }

    pub(crate) fn to_raw(self) -> u16 {
        match self {
            Family::Ipv4 => libc::AF_INET as u16,
            Family::Ipv6 => libc::AF_INET6 as u16,
        }
    }

    pub(crate) fn from_raw(raw: u16) -> Option<Self> {
        match raw as i32 {
            libc::AF_INET => Some(Family::Ipv4),
            libc::AF_INET6 => Some(Family::Ipv6),
            _ => None,
        }
    }
}

/// The transport protocol of an address+port service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

impl Protocol {
    pub(crate) fn to_raw(self) -> u16 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u16,
            Protocol::Udp => libc::IPPROTO_UDP as u16,
            Protocol::Sctp => libc::IPPROTO_SCTP as u16,
        }
    }

    pub(crate) fn from_raw(raw: u16) -> Option<Self> {
        match raw as i32 {
            libc::IPPROTO_TCP => Some(Protocol::Tcp),
            libc::IPPROTO_UDP => Some(Protocol::Udp),
            libc::IPPROTO_SCTP => Some(Protocol::Sctp),
            _ => None,
        }
    }

    /// The name ipvsadm prints.
    pub fn name(self) -> &'static str {
        match self {
            Protocol::Tcp => "TCP",
            Protocol::Udp => "UDP",
            Protocol::Sctp => "SCTP",
        }
    }
}

/// What identifies a virtual service to the kernel: protocol, address and
/// port, or a firewall mark with an address family.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum ServiceKey {
    Address {
        protocol: Protocol,
        addr: IpAddr,
        port: u16,
    },
    Fwmark {
        family: Family,
        mark: u32,
    },
}

impl ServiceKey {
    pub fn family(&self) -> Family {
        match self {
            ServiceKey::Address { addr, .. } => Family::of(addr),
            ServiceKey::Fwmark { family, .. } => *family,
        }
    }
}

/// Prints as ipvsadm does: `TCP 192.0.2.1:80`, `UDP [2001:db8::1]:53`,
/// `FWM 7` (`FWM 7 IPv6` for an IPv6 mark service).
impl fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ServiceKey::Address {
                protocol,
                addr,
                port,
            } => write!(f, "{} {}", protocol.name(), SocketAddr::new(*addr, *port)),
            ServiceKey::Fwmark {
                family: Family::Ipv4,
                mark,
            } => write!(f, "FWM {mark}"),
            ServiceKey::Fwmark {
                family: Family::Ipv6,
                mark,
            } => write!(f, "FWM {mark} IPv6"),
        }
    }
}

/// A real server within a service: its address and port (port 0 for
/// services that forward any port, such as most fwmark services).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct DestinationKey {
    pub addr: IpAddr,
    pub port: u16,
}

impl fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", SocketAddr::new(self.addr, self.port))
    }
}

/// Traffic counters and rates; the kernel's 64-bit set when it has one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub conns: u64,
    pub in_packets: u64,
    pub out_packets: u64,
    pub in_bytes: u64,
    pub out_bytes: u64,
    /// Rates, per second, as estimated by the kernel every 2 s.
    pub cps: u64,
    pub in_pps: u64,
    pub out_pps: u64,
    pub in_bps: u64,
    pub out_bps: u64,
}

/// A virtual service as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Service {
    pub key: ServiceKey,
    /// Scheduler name: `rr`, `wlc`, `mh`, ...
    pub scheduler: String,
    /// `IP_VS_SVC_F_*` bits (persistent 0x1, hashed 0x2, one-packet 0x4, ...).
    pub flags: u32,
    /// Persistence timeout in seconds (0 when not persistent).
    pub timeout: u32,
    /// Persistence granularity: for IPv4 the mask as a number
    /// (0xffff_ff00 is 255.255.255.0), for IPv6 a prefix length.
    pub netmask: u32,
    /// Persistence engine (`sip`), if any.
    pub persistence_engine: Option<String>,
    pub stats: Stats,
}

/// How IPVS forwards packets to a real server (`IP_VS_CONN_F_FWD_MASK`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// NAT ("Masq" in ipvsadm).
    Masquerade,
    /// The director itself ("Local").
    Local,
    /// IP-in-IP, GUE or GRE tunnel ("Tunnel").
    Tunnel,
    /// Direct routing ("Route").
    DirectRoute,
    /// A value this client does not know; sent back unchanged.
    Other(u32),
}

impl Forwarding {
    pub(crate) fn to_raw(self) -> u32 {
        match self {
            Forwarding::Masquerade => 0,
            Forwarding::Local => 1,
            Forwarding::Tunnel => 2,
            Forwarding::DirectRoute => 3,
            Forwarding::Other(raw) => raw,
        }
    }

    pub(crate) fn from_raw(raw: u32) -> Self {
        match raw {
            0 => Forwarding::Masquerade,
            1 => Forwarding::Local,
            2 => Forwarding::Tunnel,
            3 => Forwarding::DirectRoute,
            other => Forwarding::Other(other),
        }
    }

    /// The word ipvsadm prints in its Forward column.
    pub fn name(self) -> &'static str {
        match self {
            Forwarding::Masquerade => "Masq",
            Forwarding::Local => "Local",
            Forwarding::Tunnel => "Tunnel",
            Forwarding::DirectRoute => "Route",
            Forwarding::Other(_) => "?",
        }
    }
}

/// The encapsulation of a tunnelled destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TunnelType {
    Ipip,
    Gue,
    Gre,
    /// A value this client does not know; sent back unchanged.
    Other(u8),
}

impl TunnelType {
    pub(crate) fn to_raw(self) -> u8 {
        match self {
            TunnelType::Ipip => 0,
            TunnelType::Gue => 1,
            TunnelType::Gre => 2,
            TunnelType::Other(raw) => raw,
        }
    }

    pub(crate) fn from_raw(raw: u8) -> Self {
        match raw {
            0 => TunnelType::Ipip,
            1 => TunnelType::Gue,
            2 => TunnelType::Gre,
            other => TunnelType::Other(other),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            TunnelType::Ipip => "ipip",
            TunnelType::Gue => "gue",
            TunnelType::Gre => "gre",
            TunnelType::Other(_) => "?",
        }
    }
}

/// Tunnel settings of a destination. The kernel reports them for every
/// destination; they matter when forwarding is [`Forwarding::Tunnel`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
pub struct Tunnel {
    pub kind: TunnelType,
    /// UDP port of a GUE tunnel (0 otherwise).
    pub port: u16,
    /// `IP_VS_TUNNEL_ENCAP_FLAG_*`: no checksum 0, checksum 1, remote checksum 2.
    pub flags: u16,
}

impl Default for Tunnel {
    fn default() -> Self {
        Self {
            kind: TunnelType::Ipip,
            port: 0,
            flags: 0,
        }
    }
}

/// A real server of a virtual service, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Destination {
    pub addr: IpAddr,
    pub port: u16,
    pub forwarding: Forwarding,
    pub weight: u32,
    /// Connection limits: 0 means none.
    pub upper_threshold: u32,
    pub lower_threshold: u32,
    pub tunnel: Tunnel,
    pub active_conns: u32,
    pub inactive_conns: u32,
    pub persistent_conns: u32,
    pub stats: Stats,
}

impl Destination {
    pub fn key(&self) -> DestinationKey {
        DestinationKey {
            addr: self.addr,
            port: self.port,
        }
    }
}

/// A service with its destinations, as one dump saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VirtualService {
    #[serde(flatten)]
    pub service: Service,
    pub destinations: Vec<Destination>,
}

/// What GET_INFO reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct IpvsInfo {
    /// Encoded as `major << 16 | minor << 8 | patch` (1.2.1 = 0x010201).
    pub version: u32,
    /// Size of the connection hash table.
    pub connection_table_size: u32,
}

impl IpvsInfo {
    /// `1.2.1`, as ipvsadm prints it.
    pub fn version_string(&self) -> String {
        format!(
            "{}.{}.{}",
            (self.version >> 16) & 0xff,
            (self.version >> 8) & 0xff,
            self.version & 0xff
        )
    }
}
