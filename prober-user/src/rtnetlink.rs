//! Just enough rtnetlink to address probe frames: the route (and so the
//! interface, next hop and source address) to a real server, the next hop's
//! MAC from the kernel's neighbour table, and an interface's own MAC. The
//! kernel is the authority: an unresolved neighbour is reported, not guessed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use anyhow::{bail, Context, Result};
use netlink_sys::{protocols::NETLINK_ROUTE, Socket, SocketAddr};

const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWLINK: u16 = 16;
const RTM_DELLINK: u16 = 17;
const RTM_GETLINK: u16 = 18;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const RTM_NEWROUTE: u16 = 24;
const RTM_DELROUTE: u16 = 25;
const RTM_GETROUTE: u16 = 26;
const RTM_NEWNEIGH: u16 = 28;
const RTM_DELNEIGH: u16 = 29;
const RTM_GETNEIGH: u16 = 30;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_DUMP: u16 = 0x300;
const NLM_F_CREATE: u16 = 0x400;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
const RTA_GATEWAY: u16 = 5;
const RTA_PREFSRC: u16 = 7;
const NDA_DST: u16 = 1;
const NDA_LLADDR: u16 = 2;
const IFLA_ADDRESS: u16 = 1;
const NTF_USE: u8 = 0x01;
const RTN_UNICAST: u8 = 1;
const RTN_LOCAL: u8 = 2;
/// Neighbour states whose MAC can be used (REACHABLE, STALE, DELAY, PROBE,
/// NOARP, PERMANENT).
const NUD_USABLE: u16 = 0x02 | 0x04 | 0x08 | 0x10 | 0x40 | 0x80;

/// Where the kernel would send a packet to an address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    pub ifindex: u32,
    /// The next hop when it is not the destination itself.
    pub gateway: Option<IpAddr>,
    /// The source address the kernel would pick.
    pub source: Option<IpAddr>,
}

impl Route {
    pub fn next_hop(&self, destination: IpAddr) -> IpAddr {
        self.gateway.unwrap_or(destination)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Neighbour {
    pub ifindex: u32,
    pub addr: IpAddr,
    /// Present only when the entry is usable.
    pub mac: Option<[u8; 6]>,
    pub state: u16,
}

pub struct RouteSocket {
    socket: Socket,
    seq: u32,
}

impl RouteSocket {
    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        socket.bind_auto().context("binding the rtnetlink socket")?;
        socket
            .connect(&SocketAddr::new(0, 0))
            .context("connecting the rtnetlink socket")?;
        Ok(Self { socket, seq: 0 })
    }

    /// The kernel's route to `destination` (`ip route get`).
    pub fn route_to(&mut self, destination: IpAddr) -> Result<Route> {
        let (family, addr) = family_and_bytes(destination);
        let mut body = vec![family, (addr.len() * 8) as u8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        push_attr(&mut body, RTA_DST, &addr);
        let replies = self
            .request(RTM_GETROUTE, NLM_F_REQUEST, &body)
            .with_context(|| format!("looking up the route to {destination}"))?;
        for (kind, payload) in replies {
            if kind != RTM_NEWROUTE || payload.len() < 12 {
                continue;
            }
            let route_type = payload[7];
            if route_type == RTN_LOCAL {
                bail!("{destination} is an address of this host, not a real server");
            }
            if route_type != RTN_UNICAST {
                bail!("no unicast route to {destination} (route type {route_type})");
            }
            let mut route = Route {
                ifindex: 0,
                gateway: None,
                source: None,
            };
            for (attr, data) in attrs(&payload[12..]) {
                match attr {
                    RTA_OIF if data.len() == 4 => {
                        route.ifindex = u32::from_ne_bytes(data.try_into()?)
                    }
                    RTA_GATEWAY => route.gateway = ip_from_bytes(data),
                    RTA_PREFSRC => route.source = ip_from_bytes(data),
                    _ => {}
                }
            }
            return Ok(route);
        }
        bail!("the kernel returned no route to {destination}")
    }

    /// Every neighbour entry of the family of `sample` (`ip neigh show`).
    pub fn neighbours(&mut self, ipv6: bool) -> Result<Vec<Neighbour>> {
        let family = if ipv6 { libc::AF_INET6 } else { libc::AF_INET } as u8;
        let body = [family, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0];
        let replies = self
            .request(RTM_GETNEIGH, NLM_F_REQUEST | NLM_F_DUMP, &body)
            .context("dumping the neighbour table")?;
        Ok(replies
            .into_iter()
            .filter(|(kind, _)| *kind == RTM_NEWNEIGH)
            .filter_map(|(_, payload)| parse_neighbour(&payload, false))
            .collect())
    }

    /// Asks the kernel to resolve `addr` on `ifindex` (NTF_USE: it sends an
    /// ARP request or neighbour solicitation as it would for traffic).
    pub fn request_resolution(&mut self, ifindex: u32, addr: IpAddr) -> Result<()> {
        self.request(
            RTM_NEWNEIGH,
            NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE,
            &resolution_body(ifindex, addr),
        )
        .with_context(|| format!("asking the kernel to resolve {addr} on interface {ifindex}"))?;
        Ok(())
    }

    /// [`RouteSocket::request_resolution`] for each of `hops` (interface
    /// index, address), in one datagram and without acknowledgements: the
    /// kernel handles the batch within the send, so its refusals are
    /// waiting on the socket when it returns. Returns how many it refused
    /// (all, when more refusals came than the socket holds: each echoes
    /// its request).
    pub fn request_resolutions(&mut self, hops: &[(u32, IpAddr)]) -> Result<usize> {
        let mut batch = Vec::with_capacity(hops.len() * 40);
        for &(ifindex, addr) in hops {
            self.seq = self.seq.wrapping_add(1);
            let body = resolution_body(ifindex, addr);
            batch.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
            batch.extend_from_slice(&RTM_NEWNEIGH.to_ne_bytes());
            batch.extend_from_slice(&(NLM_F_REQUEST | NLM_F_CREATE).to_ne_bytes());
            batch.extend_from_slice(&self.seq.to_ne_bytes());
            batch.extend_from_slice(&0u32.to_ne_bytes());
            batch.extend_from_slice(&body);
        }
        if batch.is_empty() {
            return Ok(0);
        }
        self.socket
            .send(&batch, 0)
            .context("asking the kernel to resolve next hops")?;
        let mut refused = 0;
        let mut overflowed = false;
        let mut buf = Vec::with_capacity(4096);
        // Bounded: at most one refusal per request, and one overflow.
        for _ in 0..hops.len() + 2 {
            buf.clear();
            match self.socket.recv(&mut buf, libc::MSG_DONTWAIT) {
                Ok(_) => {
                    refused += messages(&buf)
                        .filter(|(kind, payload)| {
                            *kind == NLMSG_ERROR && payload.get(0..4) != Some(&[0; 4][..])
                        })
                        .count();
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => overflowed = true,
                Err(e) => {
                    return Err(e).context("reading the kernel's answers to resolution requests")
                }
            }
        }
        Ok(if overflowed { hops.len() } else { refused })
    }

    /// An interface's MAC address (`ip link show`).
    pub fn link_mac(&mut self, ifindex: u32) -> Result<[u8; 6]> {
        let mut body = vec![0u8; 16];
        body[4..8].copy_from_slice(&(ifindex as i32).to_ne_bytes());
        let replies = self
            .request(RTM_GETLINK, NLM_F_REQUEST, &body)
            .with_context(|| format!("reading interface {ifindex}"))?;
        for (_, payload) in replies {
            if payload.len() < 16 {
                continue;
            }
            for (attr, data) in attrs(&payload[16..]) {
                if attr == IFLA_ADDRESS && data.len() == 6 {
                    return Ok(data.try_into()?);
                }
            }
        }
        bail!("interface {ifindex} has no Ethernet address")
    }

    /// Sends one request and collects the replies' (type, payload) until the
    /// answer is complete: one message, an ACK, or NLMSG_DONE for dumps.
    fn request(&mut self, kind: u16, flags: u16, body: &[u8]) -> Result<Vec<(u16, Vec<u8>)>> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut msg = Vec::with_capacity(16 + body.len());
        msg.extend_from_slice(&((16 + body.len()) as u32).to_ne_bytes());
        msg.extend_from_slice(&kind.to_ne_bytes());
        msg.extend_from_slice(&flags.to_ne_bytes());
        msg.extend_from_slice(&seq.to_ne_bytes());
        msg.extend_from_slice(&0u32.to_ne_bytes());
        msg.extend_from_slice(body);
        self.socket.send(&msg, 0)?;

        let dump = flags & NLM_F_DUMP == NLM_F_DUMP;
        let mut out = Vec::new();
        // Bounded: a dump of any size ends with NLMSG_DONE; 100k chunks is
        // far beyond any neighbour table.
        for _ in 0..100_000 {
            let mut buf = Vec::with_capacity(64 * 1024);
            self.socket.recv(&mut buf, 0)?;
            let mut rest = &buf[..];
            while rest.len() >= 16 {
                let len = u32::from_ne_bytes(rest[0..4].try_into()?) as usize;
                if len < 16 || len > rest.len() {
                    bail!("malformed netlink message (length {len})");
                }
                let msg_kind = u16::from_ne_bytes(rest[4..6].try_into()?);
                let msg_seq = u32::from_ne_bytes(rest[8..12].try_into()?);
                let payload = &rest[16..len];
                rest = &rest[align4(len).min(rest.len())..];
                if msg_seq != seq {
                    continue;
                }
                match msg_kind {
                    NLMSG_DONE => return Ok(out),
                    NLMSG_ERROR => {
                        let errno = i32::from_ne_bytes(
                            payload.get(0..4).context("short NLMSG_ERROR")?.try_into()?,
                        );
                        if errno == 0 {
                            return Ok(out); // ACK
                        }
                        return Err(std::io::Error::from_raw_os_error(-errno).into());
                    }
                    _ => {
                        out.push((msg_kind, payload.to_vec()));
                        if !dump && flags & NLM_F_ACK == 0 {
                            return Ok(out);
                        }
                    }
                }
            }
        }
        bail!("netlink answer did not end")
    }
}

/// Resolution requests sent in one datagram by the neighbour keepalive:
/// their refusals (should every one be refused) still fit the socket's
/// receive queue.
pub const KEEPALIVE_BATCH: usize = 128;

/// What changed since the last look, as far as probe paths care.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Changes {
    /// Routes, addresses or links: every path must be looked up again.
    pub routes: bool,
    /// Neighbour entries changed: those [`ChangeWatch::take_neighbours`]
    /// gives, or any of them when `all_neighbours`.
    pub neighbours: bool,
    /// More neighbour changes than are worth following one by one, or
    /// some lost: the table must be read again.
    pub all_neighbours: bool,
    /// Notifications were lost (ENOBUFS: more changes than the socket
    /// buffer holds), so everything counts as changed.
    pub lost: bool,
}

/// A non-blocking rtnetlink socket subscribed to neighbour, route, address
/// and link notifications, so paths follow the kernel without polling it.
pub struct ChangeWatch {
    socket: Socket,
    /// The receive buffer, reused from read to read.
    buf: Vec<u8>,
    /// The neighbour entries the last poll was told of, in order.
    neighbours: Vec<Neighbour>,
}

impl ChangeWatch {
    const RTNLGRP_LINK: u32 = 1;
    const RTNLGRP_NEIGH: u32 = 3;
    const RTNLGRP_IPV4_IFADDR: u32 = 5;
    const RTNLGRP_IPV4_ROUTE: u32 = 7;

    pub fn open() -> Result<Self> {
        let mut socket = Socket::new(NETLINK_ROUTE).context("opening an rtnetlink socket")?;
        socket.bind_auto().context("binding the rtnetlink socket")?;
        for group in [
            Self::RTNLGRP_LINK,
            Self::RTNLGRP_NEIGH,
            Self::RTNLGRP_IPV4_IFADDR,
            Self::RTNLGRP_IPV4_ROUTE,
        ] {
            socket
                .add_membership(group)
                .with_context(|| format!("joining rtnetlink group {group}"))?;
        }
        // Tests only: a receive queue a flood of changes overflows however
        // fast the daemon reads.
        if let Some(bytes) = std::env::var("PROBER_DEBUG_RTNETLINK_RECEIVE_QUEUE")
            .ok()
            .and_then(|b| b.parse::<usize>().ok())
        {
            socket
                .set_rx_buf_sz(bytes)
                .context("setting the rtnetlink socket's receive queue")?;
        }
        socket.set_non_blocking(true)?;
        Ok(Self {
            socket,
            buf: Vec::with_capacity(64 * 1024),
            neighbours: Vec::new(),
        })
    }

    /// The neighbour entries the last [`ChangeWatch::poll`] was told of,
    /// oldest first (taken: the next poll starts afresh).
    pub fn take_neighbours(&mut self, into: &mut Vec<Neighbour>) {
        into.clear();
        std::mem::swap(into, &mut self.neighbours);
    }

    /// Drains the pending notifications. A lost notification (ENOBUFS), or
    /// more neighbour changes than are worth following one by one, reports
    /// everything as changed.
    pub fn poll(&mut self) -> Changes {
        /// Past this many in one poll a dump of the table is cheaper.
        const MOST_NEIGHBOURS: usize = 4096;
        let mut changes = Changes::default();
        self.neighbours.clear();
        // Bounded: the queue drains; 10k reads is far more than one tick's.
        for _ in 0..10_000 {
            self.buf.clear();
            match self.socket.recv(&mut self.buf, 0) {
                Ok(_) => {
                    for (kind, payload) in messages(&self.buf) {
                        match kind {
                            RTM_NEWNEIGH | RTM_DELNEIGH => {
                                changes.neighbours = true;
                                match parse_neighbour(payload, kind == RTM_DELNEIGH) {
                                    Some(n) if self.neighbours.len() < MOST_NEIGHBOURS => {
                                        self.neighbours.push(n)
                                    }
                                    Some(_) => changes.all_neighbours = true,
                                    None => {}
                                }
                            }
                            RTM_NEWLINK | RTM_DELLINK | RTM_NEWADDR | RTM_DELADDR
                            | RTM_NEWROUTE | RTM_DELROUTE => changes.routes = true,
                            _ => {}
                        }
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(_) => {
                    return Changes {
                        routes: true,
                        neighbours: true,
                        all_neighbours: true,
                        lost: true,
                    };
                }
            }
        }
        changes
    }
}

/// A neighbour message (RTM_NEWNEIGH, or RTM_DELNEIGH when `deleted`:
/// the entry is gone, no MAC); None when it is malformed or names no
/// address.
fn parse_neighbour(payload: &[u8], deleted: bool) -> Option<Neighbour> {
    if payload.len() < 12 {
        return None;
    }
    let ifindex = i32::from_ne_bytes(payload[4..8].try_into().ok()?) as u32;
    let state = u16::from_ne_bytes(payload[8..10].try_into().ok()?);
    let mut addr = None;
    let mut mac = None;
    for (attr, data) in attrs(&payload[12..]) {
        match attr {
            NDA_DST => addr = ip_from_bytes(data),
            NDA_LLADDR if data.len() == 6 => mac = <[u8; 6]>::try_from(data).ok(),
            _ => {}
        }
    }
    Some(Neighbour {
        ifindex,
        addr: addr?,
        mac: mac.filter(|_| !deleted && state & NUD_USABLE != 0),
        state,
    })
}

/// The body of an NTF_USE request for `addr` on `ifindex`.
fn resolution_body(ifindex: u32, addr: IpAddr) -> Vec<u8> {
    let (family, bytes) = family_and_bytes(addr);
    let mut body = vec![family, 0, 0, 0];
    body.extend_from_slice(&(ifindex as i32).to_ne_bytes());
    body.extend_from_slice(&0u16.to_ne_bytes()); // state: left to the kernel
    body.extend_from_slice(&[NTF_USE, 0]);
    push_attr(&mut body, NDA_DST, &bytes);
    body
}

/// The (type, payload) of each whole message in a netlink datagram.
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < 16 {
            return None;
        }
        let len = u32::from_ne_bytes([rest[0], rest[1], rest[2], rest[3]]) as usize;
        if len < 16 || len > rest.len() {
            return None;
        }
        let message = (u16::from_ne_bytes([rest[4], rest[5]]), &rest[16..len]);
        rest = &rest[align4(len).min(rest.len())..];
        Some(message)
    })
}

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

fn push_attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    buf.extend_from_slice(&((4 + data.len()) as u16).to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(align4(buf.len()), 0);
}

/// Iterates over (type, data) of netlink attributes; stops at the first
/// malformed one instead of reading past the buffer.
fn attrs(mut buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    std::iter::from_fn(move || {
        if buf.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([buf[0], buf[1]]) as usize;
        let kind = u16::from_ne_bytes([buf[2], buf[3]]) & 0x3fff; // no NLA_F_NESTED/NET_BYTEORDER
        if len < 4 || len > buf.len() {
            return None;
        }
        let data = &buf[4..len];
        buf = &buf[align4(len).min(buf.len())..];
        Some((kind, data))
    })
}

fn family_and_bytes(addr: IpAddr) -> (u8, Vec<u8>) {
    match addr {
        IpAddr::V4(a) => (libc::AF_INET as u8, a.octets().to_vec()),
        IpAddr::V6(a) => (libc::AF_INET6 as u8, a.octets().to_vec()),
    }
}

fn ip_from_bytes(data: &[u8]) -> Option<IpAddr> {
    match data.len() {
        4 => Some(IpAddr::V4(Ipv4Addr::from(<[u8; 4]>::try_from(data).ok()?))),
        16 => Some(IpAddr::V6(Ipv6Addr::from(<[u8; 16]>::try_from(data).ok()?))),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attribute_parser_stops_at_malformed_input() {
        let mut buf = Vec::new();
        push_attr(&mut buf, RTA_OIF, &7u32.to_ne_bytes());
        push_attr(&mut buf, RTA_DST, &[192, 0, 2, 1]);
        let parsed: Vec<_> = attrs(&buf).collect();
        assert_eq!(
            parsed,
            vec![
                (RTA_OIF, &7u32.to_ne_bytes()[..]),
                (RTA_DST, &[192, 0, 2, 1][..])
            ]
        );
        // A length pointing past the end yields nothing, never a panic.
        let mut bad = buf.clone();
        bad[0] = 200;
        assert_eq!(attrs(&bad).count(), 0);
        assert_eq!(attrs(&buf[..3]).count(), 0);
    }

    #[test]
    fn a_neighbour_message_gives_its_mac_only_while_usable_and_present() {
        const NUD_REACHABLE: u16 = 0x02;
        const NUD_INCOMPLETE: u16 = 0x01;
        let message = |state: u16, mac: Option<[u8; 6]>| {
            // struct ndmsg: family, pad, ifindex, state, flags, type.
            let mut buf = vec![libc::AF_INET as u8, 0, 0, 0];
            buf.extend_from_slice(&7i32.to_ne_bytes());
            buf.extend_from_slice(&state.to_ne_bytes());
            buf.extend_from_slice(&[0, 0]);
            push_attr(&mut buf, NDA_DST, &[192, 0, 2, 10]);
            if let Some(mac) = mac {
                push_attr(&mut buf, NDA_LLADDR, &mac);
            }
            buf
        };
        let mac = [2, 0, 0, 0, 0, 10];
        let reachable = parse_neighbour(&message(NUD_REACHABLE, Some(mac)), false).unwrap();
        assert_eq!(
            (reachable.ifindex, reachable.addr, reachable.mac),
            (7, "192.0.2.10".parse().unwrap(), Some(mac))
        );
        let deleted = parse_neighbour(&message(NUD_REACHABLE, Some(mac)), true).unwrap();
        assert_eq!(deleted.mac, None, "a deleted entry has no MAC");
        let incomplete = parse_neighbour(&message(NUD_INCOMPLETE, None), false).unwrap();
        assert_eq!(incomplete.mac, None);
        // Cut short or without an address: nothing, never a panic.
        assert!(parse_neighbour(&message(NUD_REACHABLE, Some(mac))[..10], false).is_none());
        assert!(parse_neighbour(&message(NUD_REACHABLE, Some(mac))[..12], false).is_none());
    }

    #[test]
    fn a_batch_of_resolution_requests_counts_each_refusal_and_leaves_the_socket_usable() {
        let mut socket = RouteSocket::open().unwrap();
        // No such interfaces: the kernel refuses each request of a batch
        // (as many as the keepalive sends at once), and of one too large
        // for its refusals to fit the socket.
        for n in [KEEPALIVE_BATCH, 2000] {
            let hops: Vec<(u32, IpAddr)> = (0..n as u32)
                .map(|i| (999_000 + i, IpAddr::V4(Ipv4Addr::new(192, 0, 2, i as u8))))
                .collect();
            assert_eq!(socket.request_resolutions(&hops).unwrap(), n);
        }
        assert_eq!(socket.request_resolutions(&[]).unwrap(), 0);
        // Nothing of the batch is left to confuse the next request.
        let err = socket.route_to("127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("address of this host"), "{err}");
    }

    #[test]
    fn loopback_route_is_local() {
        let mut socket = RouteSocket::open().unwrap();
        let err = socket.route_to("127.0.0.1".parse().unwrap()).unwrap_err();
        assert!(err.to_string().contains("address of this host"), "{err}");
    }
}
