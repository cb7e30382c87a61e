//! Passive response times from the traffic the director forwards to NAT
//! real servers: the TC egress program sees client SYNs and requests leave
//! for a tracked real server, the ingress XDP program sees its SYN-ACKs and
//! first response bytes come back, both before IPVS rewrites them back.
//!
//! Per real server: handshake RTT (SYN forwarded -> SYN-ACK; not for resent
//! SYNs, after Karn), response time (request data forwarded -> first
//! response data; one request at a time per connection), server RSTs, and
//! SYNs resent by clients (no SYN-ACK in time).
//!
//! Flows live in two LRU tables of 262,144 entries each, so that a SYN
//! flood or scan cannot push out the connections that give response times:
//! - `PASSIVE_FLOWS`, half-open: a SYN opens an entry there, the SYN-ACK
//!   takes the handshake sample. Flood and scan SYNs only ever land here
//!   and evict each other and handshakes in flight, oldest first.
//! - `PASSIVE_CONNS`, connections: the client's first ACK after the
//!   SYN-ACK (a client that really answered the real server) moves its flow
//!   here; request -> first response byte is timed here. A spoofed source
//!   never answers, a SYN scan answers with RST, so a flood adds nothing
//!   here; only new real connections evict old ones.
//!
//! FIN or RST from either side ends a flow in whichever table holds it.
//! Untracked traffic costs one array read (the port bitmap); a packet of an
//! established connection one lookup each way.

use aya_ebpf::{bindings::TC_ACT_UNSPEC, helpers::bpf_ktime_get_ns, programs::TcContext};
use prober_common::{family, flow_flags, rtt_bucket, FlowKey, FlowState, PassiveStats, ServerKey};

use crate::{
    packet::*, PASSIVE_CONNS, PASSIVE_FLOWS, PASSIVE_PORTS, PASSIVE_SEEN, PASSIVE_SERVERS,
    PASSIVE_STATS,
};

const L4: usize = ETH_HLEN + IPV4_HLEN;

/// True if some tracked real server uses this port (network byte order).
#[inline(always)]
fn tracked_port(port_be: u16) -> bool {
    let port = u16::from_be(port_be) as u32;
    match PASSIVE_PORTS.get(port / 64) {
        Some(bits) => *bits & (1u64 << (port % 64)) != 0,
        None => false,
    }
}

#[inline(always)]
fn flow_key(server: [u8; 4], server_port: u16, client: [u8; 4], client_port: u16) -> FlowKey {
    FlowKey {
        server_addr: v4_to_16(server),
        client_addr: v4_to_16(client),
        server_port,
        client_port,
        family: family::IPV4,
        _pad: [0; 3],
    }
}

/// TCP payload length from the IPv4 total length (the frame may be padded).
#[inline(always)]
fn payload_len(ip: &Ipv4Hdr, tcp: &TcpHdr) -> u32 {
    let total = u16::from_be(ip.tot_len) as u32;
    let headers = IPV4_HLEN as u32 + ((tcp.doff >> 4) as u32) * 4;
    total.saturating_sub(headers)
}

#[inline(always)]
fn now() -> u64 {
    // SAFETY: a helper without arguments.
    unsafe { bpf_ktime_get_ns() }
}

/// This CPU's statistics of a server, about to take a sample: the server
/// is marked seen, so userspace reads only servers with news.
#[inline(always)]
fn stats(server_id: u32) -> Option<&'static mut PassiveStats> {
    if let Some(seen) = PASSIVE_SEEN.get_ptr_mut(server_id) {
        // SAFETY: an array slot; every writer stores a constant, so a
        // race between CPUs (or with userspace clearing it) loses nothing.
        unsafe { *seen = 1 };
    }
    // SAFETY: this CPU's slot of a per-CPU array, valid for the run.
    PASSIVE_STATS
        .get_ptr_mut(server_id)
        .map(|p| unsafe { &mut *p })
}

/// TC egress: always lets the packet go (TC_ACT_UNSPEC); only takes notes.
pub fn try_passive_egress(ctx: &TcContext) -> Result<i32, ()> {
    let eth: EthHdr = read_at(ctx, 0)?;
    if eth.ether_type != ETH_P_IP.to_be() {
        return Ok(TC_ACT_UNSPEC);
    }
    let ip: Ipv4Hdr = read_at(ctx, ETH_HLEN)?;
    if ip.version_ihl != IPV4_VERSION_IHL_PLAIN
        || u16::from_be(ip.frag_off) & IPV4_FRAGMENT_MASK != 0
    {
        return Ok(TC_ACT_UNSPEC);
    }
    if ip.protocol == IPPROTO_TCP || ip.protocol == IPPROTO_UDP {
        let ports: [u16; 2] = read_at(ctx, L4)?;
        if crate::checks::is_check_port(ports[0]) && crate::checks::dr_egress(ctx, &ip, ports)? {
            return Ok(TC_ACT_UNSPEC);
        }
    }
    if ip.protocol != IPPROTO_TCP {
        return Ok(TC_ACT_UNSPEC);
    }
    let tcp: TcpHdr = read_at(ctx, L4)?;
    if !tracked_port(tcp.dest) {
        return Ok(TC_ACT_UNSPEC);
    }
    let key = flow_key(ip.daddr, tcp.dest, ip.saddr, tcp.source);
    if tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN {
        if let Some(flow) = PASSIVE_FLOWS.get_ptr_mut(key) {
            // SAFETY: an entry of an LRU hash map, valid for the run.
            let flow = unsafe { &mut *flow };
            if flow.flags & flow_flags::HANDSHAKE_DONE == 0 {
                flow.flags |= flow_flags::SYN_RETRANSMITTED;
                if let Some(s) = stats(flow.server_id) {
                    s.syn_retransmits += 1;
                }
                return Ok(TC_ACT_UNSPEC);
            }
        }
        let server = ServerKey {
            addr: v4_to_16(ip.daddr),
            port: tcp.dest,
            family: family::IPV4,
            _pad: 0,
        };
        // SAFETY: the value is copied out at once.
        let Some(&server_id) = (unsafe { PASSIVE_SERVERS.get(server) }) else {
            return Ok(TC_ACT_UNSPEC);
        };
        let flow = FlowState {
            syn_ns: now(),
            request_ns: 0,
            server_id,
            flags: 0,
        };
        let _ = PASSIVE_FLOWS.insert(key, flow, 0);
        return Ok(TC_ACT_UNSPEC);
    }
    if tcp.flags & (TCP_FIN | TCP_RST) != 0 {
        if PASSIVE_CONNS.remove(key).is_err() {
            let _ = PASSIVE_FLOWS.remove(key);
        }
        return Ok(TC_ACT_UNSPEC);
    }
    let request = payload_len(&ip, &tcp) > 0;
    if let Some(flow) = PASSIVE_CONNS.get_ptr_mut(key) {
        // SAFETY: an entry of an LRU hash map, valid for the run.
        let flow = unsafe { &mut *flow };
        if request && flow.flags & flow_flags::AWAITING_RESPONSE == 0 {
            flow.request_ns = now();
            flow.flags |= flow_flags::AWAITING_RESPONSE;
        }
        return Ok(TC_ACT_UNSPEC);
    }
    if tcp.flags & TCP_ACK == 0 {
        return Ok(TC_ACT_UNSPEC);
    }
    // The client's first ACK after the real server's SYN-ACK: the flow
    // becomes a connection.
    // SAFETY: the value is copied out at once.
    let Some(&half_open) = (unsafe { PASSIVE_FLOWS.get(key) }) else {
        return Ok(TC_ACT_UNSPEC);
    };
    if half_open.flags & flow_flags::HANDSHAKE_DONE == 0
        || u32::from_be_bytes(tcp.ack_seq) as u64 != half_open.request_ns
    {
        return Ok(TC_ACT_UNSPEC);
    }
    let mut flow = half_open;
    flow.request_ns = 0;
    if request {
        flow.request_ns = now();
        flow.flags |= flow_flags::AWAITING_RESPONSE;
    }
    if PASSIVE_CONNS.insert(key, flow, 0).is_ok() {
        let _ = PASSIVE_FLOWS.remove(key);
    }
    Ok(TC_ACT_UNSPEC)
}

/// Ingress, from `prober_xdp` for TCP that is no probe reply. Never changes
/// the verdict: the caller passes the frame whatever happens here.
#[inline(always)]
pub fn ingress(ip: &Ipv4Hdr, tcp: &TcpHdr) {
    if !tracked_port(tcp.source) {
        return;
    }
    let key = flow_key(ip.saddr, tcp.source, ip.daddr, tcp.dest);
    // Time and stats only when a sample is taken: the common packet of a
    // connection (more data of a response) costs one lookup.
    if tcp.flags & TCP_RST != 0 {
        // Refused (half-open) or aborted (connection): counted either way.
        // Half-open first: a scan of a closed port is answered so.
        let server_id = if let Some(flow) = PASSIVE_FLOWS.get_ptr(key) {
            // SAFETY: an entry of an LRU hash map, read before its removal.
            let id = unsafe { (*flow).server_id };
            let _ = PASSIVE_FLOWS.remove(key);
            id
        } else if let Some(flow) = PASSIVE_CONNS.get_ptr(key) {
            // SAFETY: as above.
            let id = unsafe { (*flow).server_id };
            let _ = PASSIVE_CONNS.remove(key);
            id
        } else {
            return;
        };
        if let Some(s) = stats(server_id) {
            s.resets += 1;
        }
        return;
    }
    if tcp.flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK {
        let Some(flow) = PASSIVE_FLOWS.get_ptr_mut(key) else {
            return;
        };
        // SAFETY: an entry of an LRU hash map, valid for the run.
        let flow = unsafe { &mut *flow };
        if flow.flags & flow_flags::HANDSHAKE_DONE == 0 && flow.syn_ns != 0 {
            flow.flags |= flow_flags::HANDSHAKE_DONE;
            // The ACK that makes it a connection must acknowledge this
            // SYN-ACK: a blind sender cannot promote flows with made-up ACKs.
            flow.request_ns = u32::from_be_bytes(tcp.seq).wrapping_add(1) as u64;
            // A connection left from an earlier use of these ports (its
            // end unseen) must not stand in for this one. (A lookup first:
            // it is inlined and takes no lock, and there rarely is one.)
            if PASSIVE_CONNS.get_ptr(key).is_some() {
                let _ = PASSIVE_CONNS.remove(key);
            }
            if flow.flags & flow_flags::SYN_RETRANSMITTED == 0 {
                let Some(s) = stats(flow.server_id) else {
                    return;
                };
                let now = now();
                let rtt = now.saturating_sub(flow.syn_ns);
                s.handshakes += 1;
                s.handshake_rtt_sum_ns += rtt;
                s.last_sample_ns = now;
                if let Some(b) = s.handshake_log2_us.get_mut(rtt_bucket(rtt)) {
                    *b += 1;
                }
            }
        }
        return;
    }
    let Some(flow) = PASSIVE_CONNS.get_ptr_mut(key) else {
        if tcp.flags & TCP_FIN != 0 {
            let _ = PASSIVE_FLOWS.remove(key);
        }
        return;
    };
    // SAFETY: an entry of an LRU hash map, valid for the run.
    let flow = unsafe { &mut *flow };
    if flow.flags & flow_flags::AWAITING_RESPONSE != 0 && payload_len(ip, tcp) > 0 {
        flow.flags &= !flow_flags::AWAITING_RESPONSE;
        let Some(s) = stats(flow.server_id) else {
            return;
        };
        let now = now();
        let took = now.saturating_sub(flow.request_ns);
        s.responses += 1;
        s.response_time_sum_ns += took;
        s.last_sample_ns = now;
        if let Some(b) = s.response_log2_us.get_mut(rtt_bucket(took)) {
            *b += 1;
        }
    }
    if tcp.flags & TCP_FIN != 0 {
        let _ = PASSIVE_CONNS.remove(key);
    }
}
