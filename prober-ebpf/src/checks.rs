//! What the datapath does for the daemon's other checks:
//!
//! - L7 checks of direct-routing real servers: the daemon connects to the
//!   real server's own address from a port in `DR_CHECK_PORT_MIN..=MAX`
//!   registered in `DR_CHECKS`; egress rewrites the destination to the VIP
//!   (the frame already goes to the real server's MAC), ingress rewrites
//!   the answers' source VIP back, so the socket sees its own peer. Only
//!   registered connections are touched (local address and port, remote
//!   port and protocol in the key, the remote address checked against the
//!   value); any other packet goes on to the rest of the code unchanged.
//! - Agent reports: UDP datagrams to the agent address and port are
//!   recorded in `AGENTS` at line rate (no socket per agent) and consumed;
//!   datagrams there that are no valid report of a known real server are
//!   counted and passed (they may be someone else's). With a shared key
//!   set, a report needs a good tag and a sequence above the last one taken
//!   and within a minute of the director's clock (`agent_wire`); refused
//!   ones are counted and passed.

use aya_ebpf::{
    bindings::{xdp_action, BPF_F_MARK_MANGLED_0, BPF_F_PSEUDO_HDR},
    helpers::bpf_ktime_get_ns,
    programs::{TcContext, XdpContext},
};
use prober_common::{
    agent_wire, DrCheckFlow, DrCheckKey, ProbeConfig, DR_CHECK_PORT_MAX, DR_CHECK_PORT_MIN,
};

use crate::{counters, packet::*, AGENTS, DR_CHECKS};

const L4: usize = ETH_HLEN + IPV4_HLEN;
const UDP_HLEN: usize = 8;
/// Offsets of the checksum in the TCP and UDP headers.
const TCP_CHECK: usize = 16;
const UDP_CHECK: usize = 6;
const IP_SADDR: usize = ETH_HLEN + 12;
const IP_DADDR: usize = ETH_HLEN + 16;
const IP_CHECK: usize = ETH_HLEN + 10;

#[inline(always)]
pub fn is_check_port(port_be: u16) -> bool {
    let port = u16::from_be(port_be);
    (DR_CHECK_PORT_MIN..=DR_CHECK_PORT_MAX).contains(&port)
}

#[inline(always)]
fn flow(
    local_addr: [u8; 4],
    local_port: u16,
    remote_port: u16,
    protocol: u8,
) -> Option<DrCheckFlow> {
    let key = DrCheckKey {
        local_addr,
        local_port,
        remote_port,
        protocol,
        _pad: [0; 3],
    };
    // SAFETY: the value is copied out at once.
    unsafe { DR_CHECKS.get(key) }.copied()
}

/// Ingress, TCP or UDP to a check port: an answer from the VIP to a
/// registered check gets the real server's address back as its source.
/// Returns whether it was one; the frame passes either way.
#[inline(always)]
pub fn dr_ingress(ctx: &XdpContext, ip: &Ipv4Hdr, ports: [u16; 2]) -> Result<bool, ()> {
    let [remote_port, local_port] = ports;
    let Some(flow) = flow(ip.daddr, local_port, remote_port, ip.protocol) else {
        return Ok(false);
    };
    if ip.saddr != flow.vip {
        return Ok(false);
    }
    let check_at = if ip.protocol == IPPROTO_TCP {
        L4 + TCP_CHECK
    } else {
        L4 + UDP_CHECK
    };
    let l4_check: u16 = read_at(ctx, check_at)?;
    // A UDP checksum of 0 means none: it stays 0.
    if ip.protocol == IPPROTO_TCP || l4_check != 0 {
        let updated = replace4(l4_check, flow.vip, flow.real_server);
        write_at(ctx, check_at, if updated == 0 { 0xffff } else { updated })?;
    }
    write_at(
        ctx,
        IP_CHECK,
        replace4(ip.check, flow.vip, flow.real_server),
    )?;
    write_at(ctx, IP_SADDR, flow.real_server)?;
    Ok(true)
}

/// Egress, TCP or UDP from a check port: a registered check's packet to
/// the real server goes to the VIP on it instead. Returns whether it was
/// one; the packet goes on either way.
#[inline(always)]
pub fn dr_egress(ctx: &TcContext, ip: &Ipv4Hdr, ports: [u16; 2]) -> Result<bool, ()> {
    let [local_port, remote_port] = ports;
    let Some(flow) = flow(ip.saddr, local_port, remote_port, ip.protocol) else {
        return Ok(false);
    };
    if ip.daddr != flow.real_server {
        return Ok(false);
    }
    let from = u32::from_ne_bytes(flow.real_server) as u64;
    let to = u32::from_ne_bytes(flow.vip) as u64;
    let (check_at, flags) = if ip.protocol == IPPROTO_TCP {
        (L4 + TCP_CHECK, 0)
    } else {
        (L4 + UDP_CHECK, BPF_F_MARK_MANGLED_0 as u64)
    };
    // The helpers handle checksum offload (CHECKSUM_PARTIAL) too.
    ctx.l4_csum_replace(check_at, from, to, BPF_F_PSEUDO_HDR as u64 | flags | 4)
        .map_err(|_| ())?;
    ctx.l3_csum_replace(IP_CHECK, from, to, 4).map_err(|_| ())?;
    ctx.store(IP_DADDR, &flow.vip, 0).map_err(|_| ())?;
    Ok(true)
}

/// RFC 1624 incremental update of a checksum for a 4-byte field changing
/// from `from` to `to` (native-endian words, like `sum16`).
#[inline(always)]
fn replace4(check: u16, from: [u8; 4], to: [u8; 4]) -> u16 {
    let word = |a: [u8; 4], i: usize| u16::from_ne_bytes([a[i], a[i + 1]]) as u32;
    let sum = (!check) as u32
        + (!word(from, 0) & 0xffff)
        + (!word(from, 2) & 0xffff)
        + word(to, 0)
        + word(to, 2);
    fold(sum)
}

/// Ingress UDP. To a check port: see `dr_ingress`. To the agent address
/// and port: a valid report of a known real server is recorded and
/// consumed; anything else there is counted and passed. Everything else
/// passes.
#[inline(always)]
pub fn udp(ctx: &XdpContext, ip: &Ipv4Hdr, config: &ProbeConfig) -> Result<u32, ()> {
    let ports: [u16; 2] = read_at(ctx, L4)?;
    if is_check_port(ports[1]) && dr_ingress(ctx, ip, ports)? {
        return Ok(xdp_action::XDP_PASS);
    }
    if config.agent_port == 0
        || u16::from_be(ports[1]) != config.agent_port
        || ip.daddr != config.agent_addr
    {
        return Ok(xdp_action::XDP_PASS);
    }
    let report = agent_report(ctx, ip, config);
    if let Some(c) = counters() {
        match report {
            Report::Recorded => c.agent_reports += 1,
            Report::Malformed => c.agent_malformed += 1,
            Report::Unknown => c.agent_unknown += 1,
            Report::Unauthenticated => c.agent_unauthenticated += 1,
            Report::Replayed => c.agent_replayed += 1,
        }
    }
    Ok(match report {
        Report::Recorded => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    })
}

enum Report {
    Recorded,
    Malformed,
    Unknown,
    Unauthenticated,
    Replayed,
}

#[inline(always)]
fn agent_report(ctx: &XdpContext, ip: &Ipv4Hdr, config: &ProbeConfig) -> Report {
    let udp_len: u16 = match read_at::<_, u16>(ctx, L4 + 4) {
        Ok(len) => u16::from_be(len),
        Err(()) => return Report::Malformed,
    };
    if udp_len as usize != UDP_HLEN + agent_wire::LEN
        || u16::from_be(ip.tot_len) as usize != IPV4_HLEN + UDP_HLEN + agent_wire::LEN
    {
        return Report::Malformed;
    }
    let Ok(signed) = read_at::<_, [u8; agent_wire::SIGNED_LEN]>(ctx, L4 + UDP_HLEN) else {
        return Report::Malformed;
    };
    let Ok(tag) = read_at::<_, [u8; 8]>(ctx, L4 + UDP_HLEN + agent_wire::SIGNED_LEN) else {
        return Report::Malformed;
    };
    let state = signed[5];
    if signed[0..4] != agent_wire::MAGIC
        || signed[4] != agent_wire::VERSION
        || !(agent_wire::STATE_UP..=agent_wire::STATE_DRAIN).contains(&state)
        || signed[6..8] != [0, 0]
        || signed[12..16] != [0, 0, 0, 0]
    {
        return Report::Malformed;
    }
    let key = u32::from_ne_bytes(ip.saddr);
    let Some(entry) = AGENTS.get_ptr_mut(key) else {
        return Report::Unknown;
    };
    // SAFETY: an entry of a hash map, valid for the run. Two CPUs writing
    // the same agent's entry at once can only mix two of its own reports.
    let entry = unsafe { &mut *entry };
    let sequence = u64::from_be_bytes([
        signed[16], signed[17], signed[18], signed[19], signed[20], signed[21], signed[22],
        signed[23],
    ]);
    if config.agent_auth != 0 {
        let expected = agent_wire::tag(
            config.agent_key,
            &signed,
            ip.saddr,
            ip.daddr,
            config.agent_port,
        );
        if u64::from_le_bytes(tag) != expected {
            return Report::Unauthenticated;
        }
        if sequence < config.agent_sequence_min
            || sequence > config.agent_sequence_max
            || (entry.reports != 0 && sequence <= entry.sequence)
        {
            return Report::Replayed;
        }
    }
    entry.weight = u32::from_be_bytes([signed[8], signed[9], signed[10], signed[11]]).min(65_535);
    entry.sequence = sequence;
    entry.state = state;
    entry.reports += 1;
    // SAFETY: a helper without arguments.
    entry.last_ns = unsafe { bpf_ktime_get_ns() };
    Report::Recorded
}
