//! `prober_xdp`: the ingress program. Its fast path rejects everything that
//! cannot be a probe reply (not IPv4, not TCP/ICMP, not to a probe port) after
//! a few header reads and passes it untouched.
//!
//! A reply counts only if its cookie matches (current or previous secret).
//! Matched replies are ours and do not reach the stack: a SYN-ACK is turned
//! into a RST and sent back (XDP_TX), so the real server keeps no half-open
//! connection; RSTs, echo replies and ICMP errors are dropped once recorded.
//! Not matched here, and so passed: IPv6, VLAN-tagged frames, IPv4 with
//! options, fragments (probes never carry them).

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use prober_common::{
    cookie::probe_cookie, encap, family, outcome, rtt_bucket, ProbeConfig, ReplyKey,
};

use crate::{
    counters, packet::*, verdict, PROBE_CONFIG, PROBE_RESULTS, PROBE_RTT, PROBE_STATE,
    PROBE_TARGETS, REPLY_INDEX,
};

const L4: usize = ETH_HLEN + IPV4_HLEN;

/// What a matched reply says about its target.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Outcome {
    Answered,
    Refused,
    Unreachable,
}

/// Counts ARP replies: a neighbour answering is the evidence that the
/// director's own path works when every probe goes silent at once.
#[inline(always)]
fn count_arp_reply(ctx: &XdpContext) {
    let Ok(op) = read_at::<_, u16>(ctx, ETH_HLEN + ARP_OP_OFFSET) else {
        return;
    };
    if op == ARP_OP_REPLY.to_be() {
        if let Some(c) = counters() {
            c.arp_replies += 1;
        }
    }
}

pub fn try_prober_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    if let Some(c) = counters() {
        c.packets += 1;
        c.bytes += (ctx.data_end() - ctx.data()) as u64;
    }
    let eth: EthHdr = read_at(ctx, 0)?;
    if eth.ether_type != ETH_P_IP.to_be() {
        if eth.ether_type == ETH_P_ARP.to_be() {
            count_arp_reply(ctx);
        }
        return Ok(xdp_action::XDP_PASS);
    }
    let ip: Ipv4Hdr = read_at(ctx, ETH_HLEN)?;
    if ip.version_ihl != IPV4_VERSION_IHL_PLAIN
        || u16::from_be(ip.frag_off) & IPV4_FRAGMENT_MASK != 0
    {
        return Ok(xdp_action::XDP_PASS);
    }
    match ip.protocol {
        IPPROTO_TCP => {
            let ports: [u16; 2] = read_at(ctx, L4)?;
            if crate::checks::is_check_port(ports[1]) && crate::checks::dr_ingress(ctx, &ip, ports)?
            {
                return Ok(xdp_action::XDP_PASS);
            }
            tcp_reply(ctx, &ip)
        }
        IPPROTO_UDP => crate::checks::udp(ctx, &ip, config()?),
        IPPROTO_ICMP => icmp_reply(ctx, &ip),
        _ => Ok(xdp_action::XDP_PASS),
    }
}

#[inline(always)]
fn config() -> Result<&'static ProbeConfig, ()> {
    PROBE_CONFIG.get(0).ok_or(())
}

#[inline(always)]
fn is_probe_port(config: &ProbeConfig, port_be: u16) -> bool {
    let port = u16::from_be(port_be);
    port >= config.local_port_min && port <= config.local_port_max && config.local_port_max != 0
}

/// Which probe a reply's cookie answers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answers {
    /// The outstanding probe.
    Current,
    /// The probe before it: the reply came after the next send.
    Previous,
    /// None of ours: forged, stale or misrouted.
    Nothing,
}

/// The nonce of a target's outstanding probe (its send count).
#[inline(always)]
fn outstanding_nonce(target_id: u32) -> u32 {
    PROBE_STATE.get(target_id).map_or(0, |s| s.sent as u32)
}

/// Which probe `value` answers, under the current or the previous secret;
/// `cookie_of(secret, nonce)` computes a cookie (`mask` keeps the bits a
/// reply carries: all of them, or the 16 an ICMP error quotes of an echo).
#[inline(always)]
fn answers(
    config: &ProbeConfig,
    value: u32,
    mask: u32,
    nonce: u32,
    cookie_of: impl Fn([u64; 2], u32) -> u32,
) -> Answers {
    let matches = |n: u32| {
        value == cookie_of(config.secret, n) & mask
            || value == cookie_of(config.previous_secret, n) & mask
    };
    if matches(nonce) {
        Answers::Current
    } else if matches(nonce.wrapping_sub(1)) {
        Answers::Previous
    } else {
        Answers::Nothing
    }
}

/// Whether a checked reply counts; counts and logs the ones that do not.
#[inline(always)]
fn accept(ctx: &XdpContext, verdict: Answers, from: [u8; 4]) -> bool {
    match verdict {
        Answers::Current => true,
        Answers::Previous => {
            if let Some(c) = counters() {
                c.replies_late += 1;
            }
            false
        }
        Answers::Nothing => {
            rejected(ctx, from);
            false
        }
    }
}

fn tcp_reply(ctx: &XdpContext, ip: &Ipv4Hdr) -> Result<u32, ()> {
    let tcp: TcpHdr = read_at(ctx, L4)?;
    let config = config()?;
    if !is_probe_port(config, tcp.dest) {
        crate::passive::ingress(ip, &tcp);
        return Ok(xdp_action::XDP_PASS);
    }
    let is_syn_ack = tcp.flags & (TCP_SYN | TCP_ACK | TCP_RST | TCP_FIN) == TCP_SYN | TCP_ACK;
    let is_reset = tcp.flags & (TCP_RST | TCP_ACK) == TCP_RST | TCP_ACK;
    if !is_syn_ack && !is_reset {
        crate::passive::ingress(ip, &tcp);
        return Ok(xdp_action::XDP_PASS);
    }
    let remote = v4_to_16(ip.saddr);
    let local = v4_to_16(ip.daddr);
    let key = ReplyKey {
        remote_addr: remote,
        remote_port: tcp.source,
        local_port: tcp.dest,
        family: family::IPV4,
        protocol: IPPROTO_TCP,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let Some(&target_id) = (unsafe { REPLY_INDEX.get(key) }) else {
        // A client connection that happens to use a port of our range.
        crate::passive::ingress(ip, &tcp);
        return Ok(xdp_action::XDP_PASS);
    };
    // Our SYN carried seq = cookie: the answer acknowledges cookie + 1.
    let acked = u32::from_be_bytes(tcp.ack_seq).wrapping_sub(1);
    let verdict = answers(
        config,
        acked,
        u32::MAX,
        outstanding_nonce(target_id),
        |secret, nonce| {
            probe_cookie(
                secret,
                &local,
                &remote,
                tcp.dest,
                tcp.source,
                IPPROTO_TCP,
                nonce,
            )
        },
    );
    if !accept(ctx, verdict, ip.saddr) {
        crate::passive::ingress(ip, &tcp);
        return Ok(xdp_action::XDP_PASS);
    }
    if is_syn_ack {
        record(target_id, Outcome::Answered);
        // A tunnel probe's RST goes back the way the probe went: wrapped
        // in IPIP to the real server, which holds the VIP it answers for.
        let tunnel = PROBE_TARGETS
            .get(target_id)
            .filter(|t| t.encap == encap::IPIP)
            .map(|t| (v4(&t.outer_src), v4(&t.real_server)));
        reset_in_place(ctx, &eth_of(ctx)?, ip, &tcp, tunnel)?;
        if let Some(c) = counters() {
            c.resets_sent += 1;
        }
        Ok(xdp_action::XDP_TX)
    } else {
        record(target_id, Outcome::Refused);
        Ok(xdp_action::XDP_DROP)
    }
}

#[inline(always)]
fn eth_of(ctx: &XdpContext) -> Result<EthHdr, ()> {
    read_at(ctx, 0)
}

/// Rewrites the SYN-ACK in the frame into the RST that aborts the half-open
/// connection: addresses and ports swapped, seq = the SYN-ACK's ack, no
/// options, no payload; inside an outer IPv4 header (`tunnel`: its source
/// and destination) for a probe that went out in IPIP.
#[inline(always)]
fn reset_in_place(
    ctx: &XdpContext,
    eth: &EthHdr,
    ip: &Ipv4Hdr,
    syn_ack: &TcpHdr,
    tunnel: Option<([u8; 4], [u8; 4])>,
) -> Result<(), ()> {
    let mut rst = TcpHdr {
        source: syn_ack.dest,
        dest: syn_ack.source,
        seq: syn_ack.ack_seq,
        ack_seq: [0; 4],
        doff: ((TCP_HLEN / 4) as u8) << 4,
        flags: TCP_RST,
        window: 0,
        check: 0,
        urg_ptr: 0,
    };
    rst.check = tcp_checksum(ip.daddr, ip.saddr, &rst);
    let outer = if tunnel.is_some() { IPV4_HLEN } else { 0 };
    let len = L4 + outer + TCP_HLEN;
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    if delta != 0 {
        // SAFETY: the helper validates ctx and delta.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return Err(());
        }
    }
    write_at(
        ctx,
        0,
        EthHdr {
            dst: eth.src,
            src: eth.dst,
            ether_type: eth.ether_type,
        },
    )?;
    let inner = ipv4_header(ip.daddr, ip.saddr, IPPROTO_TCP, TCP_HLEN);
    match tunnel {
        Some((outer_src, real_server)) => {
            write_at(
                ctx,
                ETH_HLEN,
                ipv4_header(outer_src, real_server, IPPROTO_IPIP, IPV4_HLEN + TCP_HLEN),
            )?;
            write_at(ctx, ETH_HLEN + IPV4_HLEN, inner)?;
            write_at(ctx, L4 + IPV4_HLEN, rst)
        }
        None => {
            write_at(ctx, ETH_HLEN, inner)?;
            write_at(ctx, L4, rst)
        }
    }
}

fn icmp_reply(ctx: &XdpContext, ip: &Ipv4Hdr) -> Result<u32, ()> {
    let icmp: IcmpHdr = read_at(ctx, L4)?;
    match icmp.icmp_type {
        ICMP_ECHO_REPLY => echo_reply(ctx, ip, &icmp),
        ICMP_DEST_UNREACH => unreachable(ctx),
        _ => Ok(xdp_action::XDP_PASS),
    }
}

fn echo_reply(ctx: &XdpContext, ip: &Ipv4Hdr, icmp: &IcmpHdr) -> Result<u32, ()> {
    let config = config()?;
    if !is_probe_port(config, icmp.id) {
        return Ok(xdp_action::XDP_PASS);
    }
    let remote = v4_to_16(ip.saddr);
    let local = v4_to_16(ip.daddr);
    let key = ReplyKey {
        remote_addr: remote,
        remote_port: 0,
        local_port: icmp.id,
        family: family::IPV4,
        protocol: IPPROTO_ICMP,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let Some(&target_id) = (unsafe { REPLY_INDEX.get(key) }) else {
        return Ok(xdp_action::XDP_PASS);
    };
    let cookie: [u8; 4] = read_at(ctx, L4 + size_of::<IcmpHdr>())?;
    let verdict = answers(
        config,
        u32::from_be_bytes(cookie),
        u32::MAX,
        outstanding_nonce(target_id),
        |secret, nonce| probe_cookie(secret, &local, &remote, icmp.id, 0, IPPROTO_ICMP, nonce),
    );
    if !accept(ctx, verdict, ip.saddr) {
        return Ok(xdp_action::XDP_PASS);
    }
    record(target_id, Outcome::Answered);
    Ok(xdp_action::XDP_DROP)
}

/// An ICMP destination-unreachable quoting one of our probes: the quoted
/// IPv4 header and first 8 bytes carry the probe's ports and cookie.
fn unreachable(ctx: &XdpContext) -> Result<u32, ()> {
    const QUOTED_IP: usize = L4 + size_of::<IcmpHdr>();
    const QUOTED_L4: usize = QUOTED_IP + IPV4_HLEN;
    let quoted: Ipv4Hdr = read_at(ctx, QUOTED_IP)?;
    if quoted.version_ihl != IPV4_VERSION_IHL_PLAIN {
        return Ok(xdp_action::XDP_PASS);
    }
    let config = config()?;
    let local = v4_to_16(quoted.saddr);
    let remote = v4_to_16(quoted.daddr);
    // Which probe the quoted headers name: its ports, then its cookie.
    let (remote_port, local_port, quoted_cookie, mask) = match quoted.protocol {
        IPPROTO_TCP => {
            // source port, destination port, sequence number
            let head: [u16; 4] = read_at(ctx, QUOTED_L4)?;
            let seq = (u16::from_be(head[2]) as u32) << 16 | u16::from_be(head[3]) as u32;
            (head[1], head[0], seq, u32::MAX)
        }
        IPPROTO_ICMP => {
            // Only the echo identifier and the cookie's low 16 bits are quoted.
            let echo: IcmpHdr = read_at(ctx, QUOTED_L4)?;
            if echo.icmp_type != ICMP_ECHO_REQUEST {
                return Ok(xdp_action::XDP_PASS);
            }
            (0, echo.id, u16::from_be(echo.seq) as u32, 0xffff)
        }
        _ => return Ok(xdp_action::XDP_PASS),
    };
    if !is_probe_port(config, local_port) {
        return Ok(xdp_action::XDP_PASS);
    }
    let key = ReplyKey {
        remote_addr: remote,
        remote_port,
        local_port,
        family: family::IPV4,
        protocol: quoted.protocol,
        _pad: [0; 2],
    };
    // SAFETY: the value is copied out at once.
    let target_id = match unsafe { REPLY_INDEX.get(key) } {
        Some(&id) => id,
        None => return Ok(xdp_action::XDP_PASS),
    };
    let protocol = quoted.protocol;
    let verdict = answers(
        config,
        quoted_cookie,
        mask,
        outstanding_nonce(target_id),
        |secret, nonce| {
            probe_cookie(
                secret,
                &local,
                &remote,
                local_port,
                remote_port,
                protocol,
                nonce,
            )
        },
    );
    if !accept(ctx, verdict, quoted.daddr) {
        return Ok(xdp_action::XDP_PASS);
    }
    record(target_id, Outcome::Unreachable);
    Ok(xdp_action::XDP_DROP)
}

/// A reply to a probe port whose cookie does not match: forged, stale or
/// misrouted. Counted; logged at debug level (nothing runs when eBPF
/// logging is off: the level is a constant the verifier prunes on).
#[inline(always)]
fn rejected(ctx: &XdpContext, from: [u8; 4]) {
    if let Some(c) = counters() {
        c.replies_rejected += 1;
    }
    aya_log_ebpf::debug!(
        ctx,
        "reply about a probe of {:i} rejected: its cookie matches none",
        u32::from_be_bytes(from)
    );
}

/// Records a matched reply and settles its probe. Only the first reply
/// to a probe counts and gives an RTT; a retransmitted SYN-ACK still gets
/// its RST.
#[inline(always)]
fn record(target_id: u32, outcome: Outcome) {
    if let Some(c) = counters() {
        c.replies_matched += 1;
    }
    let Some(state) = PROBE_STATE.get_ptr_mut(target_id) else {
        return;
    };
    let Some(results) = PROBE_RESULTS.get_ptr_mut(target_id) else {
        return;
    };
    // SAFETY: map slots valid for the run; `results` is this CPU's own.
    let (state, results) = unsafe { (&mut *state, &mut *results) };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let sent = state.last_sent_ns;
    if sent == 0 || state.last_reply_ns >= sent {
        return; // duplicate, or no probe outstanding
    }
    let expect = verdict::expectation(target_id);
    let nonce = state.sent as u32;
    let rtt = now.saturating_sub(sent);
    let settled = match outcome {
        Outcome::Answered => {
            results.answered += 1;
            results.last_rtt_ns = rtt;
            results.last_reply_ns = now;
            if let Some(histogram) = PROBE_RTT.get_ptr_mut(target_id) {
                // SAFETY: this CPU's own slot, valid for the run.
                let histogram = unsafe { &mut *histogram };
                if let Some(bucket) = histogram.log2_us.get_mut(rtt_bucket(rtt)) {
                    *bucket += 1;
                }
            }
            if expect.timeout_us != 0 && rtt > expect.timeout_us as u64 * 1000 {
                outcome::SLOW
            } else {
                outcome::ANSWERED
            }
        }
        Outcome::Refused => {
            results.refused += 1;
            outcome::REFUSED
        }
        Outcome::Unreachable => {
            results.unreachable += 1;
            outcome::UNREACHABLE
        }
    };
    let rtt = if matches!(outcome, Outcome::Answered) {
        rtt
    } else {
        0
    };
    verdict::settle(target_id, state, &expect, settled, nonce, rtt);
    // After settling: the event says when the target last answered before.
    state.last_reply_ns = now;
}
