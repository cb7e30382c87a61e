//! `probe_tx`: one run writes one probe frame. `PROBE_BATCH` holds the
//! send wheel (every target, ordered by the slot of the interval it goes
//! in); for each slot the daemon points `BATCH_CURSOR` at the slot's range
//! and runs the program over it in BPF_PROG_TEST_RUN calls (live frames),
//! each run on the same scratch frame of `PROBE_FRAME_MAX` bytes, until
//! the cursor reaches the end. A run sends the next target that is due
//! (its interval nearly gone by since its last send, and its last probe
//! answered or past its timeout) and has a path: the daemon does nothing
//! per target.
//!
//! A SYN whose probe went unanswered is followed by a RST for it first
//! (one run that leaves the cursor where it is): if it was the SYN-ACK
//! that was lost, the real server holds that 4-tuple half-open
//! (SYN_RECV), and takes the next SYN, whose sequence lies outside that
//! connection's window, for a stray segment: no SYN-ACK, one more miss.

use core::mem::size_of;

use aya_ebpf::{
    bindings::xdp_action,
    helpers::{bpf_ktime_get_ns, bpf_redirect, bpf_xdp_adjust_tail},
    programs::XdpContext,
};
use prober_common::{
    cookie::probe_cookie, encap, family, outcome, probe_kind, target_flags, BatchCursor,
    Expectation, ProbeConfig, ProbeState, ProbeTarget,
};

use crate::{
    counters, packet::*, verdict, BATCH_CURSOR, PROBE_BATCH, PROBE_CONFIG, PROBE_STATE,
    PROBE_TARGETS,
};

/// A TCP SYN with one option, MSS 1460, so it looks like any client's SYN.
#[repr(C)]
#[derive(Clone, Copy)]
struct TcpSyn {
    tcp: TcpHdr,
    mss_option: [u8; 4],
}

/// An ICMP echo request whose payload carries the full 32-bit cookie.
#[repr(C)]
#[derive(Clone, Copy)]
struct IcmpEcho {
    icmp: IcmpHdr,
    cookie: [u8; 4],
    zero: [u8; 4],
}

/// Entries one run may walk past (not due, or without a path) before it
/// gives up sending: bounds a run's work and the verifier's loop.
const WALK: u32 = 32;

pub fn try_probe_tx(ctx: &XdpContext) -> Result<u32, ()> {
    // SAFETY: single-slot arrays; BPF_PROG_TEST_RUN runs the batch serially
    // on one CPU, so nothing else writes the cursor meanwhile.
    let cursor = unsafe { &mut *BATCH_CURSOR.get_ptr_mut(0).ok_or(())? };
    if cursor.next >= cursor.len {
        return Err(()); // run past the end of the walk
    }
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let Some((index, target_id)) = next_due(cursor, now)? else {
        return Ok(xdp_action::XDP_DROP); // none due in this stretch: no frame
    };
    let target = PROBE_TARGETS.get(target_id).ok_or(())?;
    let config = PROBE_CONFIG.get(0).ok_or(())?;
    if target.family != family::IPV4 {
        return Err(()); // IPv6 probes: the layouts are ready, the writer is not
    }
    // SAFETY: an array slot, shared with the ingress program, which on a
    // reply to the outstanding probe stores last_reply_ns, the runs and
    // the RTT estimate (field by field; a reply to the probe this run
    // replaces is late, and recorded nowhere).
    let state = unsafe { &mut *PROBE_STATE.get_ptr_mut(target_id).ok_or(())? };
    // This probe's nonce: the send count it makes (the ingress program
    // checks replies against the count as it stands).
    let nonce = state.sent.wrapping_add(1) as u32;
    let secret = config.secret;
    let unanswered = state.last_sent_ns != 0 && state.last_reply_ns < state.last_sent_ns;
    let last_nonce = state.sent as u32;
    // After every miss, not only the first few: once a stall ends, the
    // first SYN must find the 4-tuple clean. To a dead host it is one
    // small frame more per probe.
    if target.kind == probe_kind::TCP_SYN && unanswered && state.reset_nonce != last_nonce {
        let ip = match target.encap {
            encap::NONE => ETH_HLEN,
            encap::IPIP => ETH_HLEN + IPV4_HLEN,
            _ => return Err(()),
        };
        resize(ctx, ip + IPV4_HLEN + size_of::<TcpHdr>())?;
        write_eth(ctx, target)?;
        if target.encap == encap::IPIP {
            write_outer_ipip(ctx, target, IPV4_HLEN + size_of::<TcpHdr>())?;
            write_tcp_reset::<{ ETH_HLEN + IPV4_HLEN }>(ctx, target, secret, last_nonce)?;
        } else {
            write_tcp_reset::<ETH_HLEN>(ctx, target, secret, last_nonce)?;
        }
        state.reset_nonce = last_nonce;
        // The same entry again on the next run: its SYN.
        cursor.next = index;
        if let Some(c) = counters() {
            c.resets_before_probe += 1;
        }
        // SAFETY: as for the probe below.
        return Ok(unsafe { bpf_redirect(target.ifindex, 0) } as u32);
    }

    match (target.kind, target.encap) {
        (probe_kind::TCP_SYN, encap::NONE) => {
            resize(ctx, ETH_HLEN + IPV4_HLEN + size_of::<TcpSyn>())?;
            write_eth(ctx, target)?;
            write_tcp_syn::<ETH_HLEN>(ctx, target, secret, nonce)?;
        }
        (probe_kind::TCP_SYN, encap::IPIP) => {
            resize(ctx, ETH_HLEN + 2 * IPV4_HLEN + size_of::<TcpSyn>())?;
            write_eth(ctx, target)?;
            write_outer_ipip(ctx, target, IPV4_HLEN + size_of::<TcpSyn>())?;
            write_tcp_syn::<{ ETH_HLEN + IPV4_HLEN }>(ctx, target, secret, nonce)?;
        }
        (probe_kind::ICMP_ECHO, encap::NONE) => {
            resize(ctx, ETH_HLEN + IPV4_HLEN + size_of::<IcmpEcho>())?;
            write_eth(ctx, target)?;
            write_icmp_echo::<ETH_HLEN>(ctx, target, secret, nonce)?;
        }
        (probe_kind::ICMP_ECHO, encap::IPIP) => {
            resize(ctx, ETH_HLEN + 2 * IPV4_HLEN + size_of::<IcmpEcho>())?;
            write_eth(ctx, target)?;
            write_outer_ipip(ctx, target, IPV4_HLEN + size_of::<IcmpEcho>())?;
            write_icmp_echo::<{ ETH_HLEN + IPV4_HLEN }>(ctx, target, secret, nonce)?;
        }
        _ => return Err(()),
    }

    let expect = verdict::expectation(target_id);
    if unanswered {
        state.timed_out += 1;
        state.misses_in_row = state.misses_in_row.saturating_add(1);
        // Lost in the director's own ring: no evidence, once in a row (a
        // ring that overflows on every send must not hide a death).
        let excused_before =
            state.excused_nonce != 0 && state.excused_nonce == last_nonce.wrapping_sub(1);
        let lost_here = last_nonce != 0 && expect.lossy_nonce == last_nonce && !excused_before;
        if lost_here {
            state.excused_nonce = last_nonce;
            if let Some(c) = counters() {
                c.timeouts_excused += 1;
            }
        } else {
            verdict::settle(target_id, state, &expect, outcome::TIMED_OUT, last_nonce, 0);
        }
    } else {
        state.misses_in_row = 0;
    }
    state.sent += 1;
    state.last_sent_ns = now;
    state.next_send_ns = next_send(now, &expect, config);
    if let Some(c) = counters() {
        c.probes_built += 1;
    }
    // SAFETY: a helper taking plain integers. XDP_REDIRECT on success,
    // XDP_ABORTED for a bad ifindex.
    let action = unsafe { bpf_redirect(target.ifindex, 0) };
    Ok(action as u32)
}

/// The next entry of the walk whose target is due, has a path and is not
/// paused, with its index, the cursor left after it; None when `WALK`
/// entries (or the rest of the walk) have none; an error for a walk past
/// the batch map.
#[inline(always)]
fn next_due(cursor: &mut BatchCursor, now: u64) -> Result<Option<(u32, u32)>, ()> {
    let mut passed = 0;
    let mut held = 0;
    let mut found = None;
    for _ in 0..WALK {
        let index = cursor.next;
        if index >= cursor.len {
            break;
        }
        cursor.next = index + 1;
        let Some(&id) = PROBE_BATCH.get(index) else {
            return Err(());
        };
        let has_path = PROBE_TARGETS
            .get(id)
            .is_some_and(|t| t.kind != 0 && t.flags & target_flags::PAUSED == 0);
        match PROBE_STATE.get(id) {
            Some(s) if has_path && s.next_send_ns <= now => {
                if awaiting_answer(id, s, now) {
                    held += 1;
                } else {
                    found = Some((index, id));
                    break;
                }
            }
            _ => passed += 1,
        }
    }
    if let Some(c) = counters() {
        c.entries_not_due += passed;
        c.sends_held_for_timeout += held;
    }
    Ok(found)
}

/// Whether the target's last probe is unanswered and still well inside
/// its timeout: a send now would judge it timed out early. That happens
/// when the last send came late (a stalled walk) and this turn comes on
/// time; the target goes at its next turn instead. An eighth of the
/// timeout is given to the jitter of walks, which would otherwise hold
/// every silent target a turn whenever this walk is a little less late
/// than the last.
#[inline(always)]
fn awaiting_answer(target_id: u32, state: &ProbeState, now: u64) -> bool {
    let sent = state.last_sent_ns;
    if sent == 0 || state.last_reply_ns >= sent {
        return false;
    }
    let timeout = verdict::expectation(target_id).timeout_us as u64 * 1000;
    now < sent + timeout - timeout / 8
}

/// When a target just sent is next due: its interval on, less half a
/// turn of the wheel, so the walk that comes a turn (or `interval`) later
/// finds it due even a little early; a target without an interval is
/// always due.
#[inline(always)]
fn next_send(now: u64, expect: &Expectation, config: &ProbeConfig) -> u64 {
    let interval = expect.interval_us as u64 * 1000;
    if interval == 0 {
        return 0;
    }
    let half_turn = (config.send_turn_us as u64 * 1000).min(interval) / 2;
    now + interval - half_turn
}

/// Grows or shrinks the scratch frame to `len` bytes.
#[inline(always)]
fn resize(ctx: &XdpContext, len: usize) -> Result<(), ()> {
    let delta = len as i32 - (ctx.data_end() - ctx.data()) as i32;
    if delta != 0 {
        // SAFETY: the helper validates ctx and delta.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, delta) } != 0 {
            return Err(());
        }
    }
    Ok(())
}

#[inline(always)]
fn write_eth(ctx: &XdpContext, target: &ProbeTarget) -> Result<(), ()> {
    write_at(
        ctx,
        0,
        EthHdr {
            dst: target.dst_mac,
            src: target.src_mac,
            ether_type: ETH_P_IP.to_be(),
        },
    )
}

#[inline(always)]
fn write_outer_ipip(ctx: &XdpContext, target: &ProbeTarget, inner_len: usize) -> Result<(), ()> {
    let outer = ipv4_header(
        v4(&target.outer_src),
        v4(&target.real_server),
        IPPROTO_IPIP,
        inner_len,
    );
    write_at(ctx, ETH_HLEN, outer)
}

/// The cookie a target's SYN of probe `nonce` carries as its sequence.
#[inline(always)]
fn syn_cookie(target: &ProbeTarget, secret: [u64; 2], nonce: u32) -> u32 {
    probe_cookie(
        secret,
        &target.src_addr,
        &target.dst_addr,
        target.src_port,
        target.dst_port,
        IPPROTO_TCP,
        nonce,
    )
}

/// A TCP header of the target's 4-tuple; checksum left to fill in.
#[inline(always)]
fn tcp_header(target: &ProbeTarget, seq: u32, flags: u8, len: usize, window: u16) -> TcpHdr {
    TcpHdr {
        source: target.src_port,
        dest: target.dst_port,
        seq: seq.to_be_bytes(),
        ack_seq: [0; 4],
        doff: ((len / 4) as u8) << 4,
        flags,
        window: window.to_be(),
        check: 0,
        urg_ptr: 0,
    }
}

/// Writes the IPv4 header at `IP` and the TCP `segment` after it.
#[inline(always)]
fn write_tcp<const IP: usize, T: Copy>(
    ctx: &XdpContext,
    target: &ProbeTarget,
    segment: T,
) -> Result<(), ()> {
    let (saddr, daddr) = (v4(&target.src_addr), v4(&target.dst_addr));
    write_at(
        ctx,
        IP,
        ipv4_header(saddr, daddr, IPPROTO_TCP, size_of::<T>()),
    )?;
    write_at(ctx, IP + IPV4_HLEN, segment)
}

#[inline(always)]
fn write_tcp_syn<const IP: usize>(
    ctx: &XdpContext,
    target: &ProbeTarget,
    secret: [u64; 2],
    nonce: u32,
) -> Result<(), ()> {
    let cookie = syn_cookie(target, secret, nonce);
    let mut syn = TcpSyn {
        tcp: tcp_header(target, cookie, TCP_SYN, size_of::<TcpSyn>(), 64240),
        mss_option: [2, 4, 0x05, 0xb4],
    };
    syn.tcp.check = tcp_checksum(v4(&target.src_addr), v4(&target.dst_addr), &syn);
    write_tcp::<IP, _>(ctx, target, syn)
}

/// The RST for the SYN of probe `nonce`: seq = its cookie + 1, the next
/// sequence the real server expects on that 4-tuple, so a half-open
/// connection there takes it and is dropped (a RST out of window would be
/// ignored; to no connection at all, a RST gets no answer).
#[inline(always)]
fn write_tcp_reset<const IP: usize>(
    ctx: &XdpContext,
    target: &ProbeTarget,
    secret: [u64; 2],
    nonce: u32,
) -> Result<(), ()> {
    let seq = syn_cookie(target, secret, nonce).wrapping_add(1);
    let mut rst = tcp_header(target, seq, TCP_RST, size_of::<TcpHdr>(), 0);
    rst.check = tcp_checksum(v4(&target.src_addr), v4(&target.dst_addr), &rst);
    write_tcp::<IP, _>(ctx, target, rst)
}

#[inline(always)]
fn write_icmp_echo<const IP: usize>(
    ctx: &XdpContext,
    target: &ProbeTarget,
    secret: [u64; 2],
    nonce: u32,
) -> Result<(), ()> {
    let (saddr, daddr) = (v4(&target.src_addr), v4(&target.dst_addr));
    let cookie = probe_cookie(
        secret,
        &target.src_addr,
        &target.dst_addr,
        target.src_port,
        0,
        IPPROTO_ICMP,
        nonce,
    );
    let mut echo = IcmpEcho {
        icmp: IcmpHdr {
            icmp_type: ICMP_ECHO_REQUEST,
            code: 0,
            check: 0,
            id: target.src_port,
            // Lets an ICMP error quoting only 8 bytes still be checked.
            seq: (cookie as u16).to_be(),
        },
        cookie: cookie.to_be_bytes(),
        zero: [0; 4],
    };
    echo.icmp.check = fold(sum16(&echo));
    write_at(
        ctx,
        IP,
        ipv4_header(saddr, daddr, IPPROTO_ICMP, size_of::<IcmpEcho>()),
    )?;
    write_at(ctx, IP + IPV4_HLEN, echo)
}
