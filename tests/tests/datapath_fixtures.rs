//! Both XDP programs run in the real kernel through BPF_PROG_TEST_RUN on
//! frames built here: verdicts, output frames and map contents.

use std::os::fd::AsFd;

use aya::{
    maps::{MapData, PerCpuArray},
    programs::ProgramFd,
    Ebpf,
};
use prober_common::{
    cookie::probe_cookie, encap, expected, family, map_names, probe_kind, program_names,
    target_flags, BatchCursor, DatapathCounters, Expectation, ProbeConfig, ProbeEvent,
    ProbeResults, ProbeState, ProbeTarget,
};
use prober_tests::packets::*;
use prober_user::{
    datapath::{load_programs, program_fd, take_probe_maps},
    probe::{addr16, reply_key, ProbeMaps, ProbeSpec},
    test_run::run_xdp,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const XDP_REDIRECT: u32 = 4;

const SECRET: [u64; 2] = [0x0123_4567_89ab_cdef, 0x0fed_cba9_8765_4321];
const PREVIOUS_SECRET: [u64; 2] = [7, 9];
const DIRECTOR: [u8; 4] = [192, 0, 2, 1];
const RS: [u8; 4] = [192, 0, 2, 2];
const VIP: [u8; 4] = [203, 0, 113, 10];
const TCP_LOCAL_PORT: u16 = 61000;
const ICMP_ID: u16 = 61001;
const SERVICE_PORT: u16 = 80;
/// Target ids in the fixture.
const TCP_TARGET: u32 = 0;
const ICMP_TARGET: u32 = 1;

struct Fixture {
    _ebpf: Ebpf,
    maps: ProbeMaps,
    counters: PerCpuArray<MapData, DatapathCounters>,
    rx: ProgramFd,
    tx: ProgramFd,
}

fn fixture() -> Fixture {
    let mut ebpf = load_programs().unwrap();
    let rx = program_fd(&ebpf, program_names::XDP_INGRESS).unwrap();
    let tx = program_fd(&ebpf, program_names::PROBE_TX).unwrap();
    let mut maps = take_probe_maps(&mut ebpf).unwrap();
    let counters = PerCpuArray::try_from(ebpf.take_map(map_names::COUNTERS).unwrap()).unwrap();
    let config = ProbeConfig {
        secret: SECRET,
        previous_secret: PREVIOUS_SECRET,
        local_port_min: 61000,
        local_port_max: 65535,
        ..Default::default()
    };
    maps.config.set(0, config, 0).unwrap();
    let tcp_spec: ProbeSpec = "tcp:192.0.2.2:80".parse().unwrap();
    let icmp_spec: ProbeSpec = "icmp:192.0.2.2".parse().unwrap();
    maps.reply_index
        .insert(reply_key(&tcp_spec, TCP_LOCAL_PORT), TCP_TARGET, 0)
        .unwrap();
    maps.reply_index
        .insert(reply_key(&icmp_spec, ICMP_ID), ICMP_TARGET, 0)
        .unwrap();
    // A probe is outstanding for both targets.
    for id in [TCP_TARGET, ICMP_TARGET] {
        maps.state
            .set(
                id,
                ProbeState {
                    sent: 1,
                    timed_out: 0,
                    last_sent_ns: 1,
                    last_reply_ns: 0,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
    }
    Fixture {
        _ebpf: ebpf,
        maps,
        counters,
        rx,
        tx,
    }
}

impl Fixture {
    fn rx(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = run_xdp(self.rx.as_fd(), frame, 1).unwrap();
        (run.action, run.frame)
    }

    fn results(&self, id: u32) -> ProbeResults {
        let per_cpu = self.maps.results.get(&id, 0).unwrap();
        per_cpu.iter().fold(ProbeResults::default(), |mut sum, r| {
            sum.answered += r.answered;
            sum.refused += r.refused;
            sum.unreachable += r.unreachable;
            sum
        })
    }

    fn counters(&self) -> DatapathCounters {
        self.counters
            .get(&0, 0)
            .unwrap()
            .iter()
            .fold(DatapathCounters::default(), |s, c| s.saturating_add(*c))
    }
}

/// The cookie of the fixture's outstanding probe (each target has sent one).
fn cookie(secret: [u64; 2], local_port: u16, remote_port: u16, protocol: u8) -> u32 {
    cookie_of_send(secret, local_port, remote_port, protocol, 1)
}

/// The cookie of a target's `nonce`-th probe.
fn cookie_of_send(
    secret: [u64; 2],
    local_port: u16,
    remote_port: u16,
    protocol: u8,
    nonce: u32,
) -> u32 {
    probe_cookie(
        secret,
        &addr16(DIRECTOR.into()),
        &addr16(RS.into()),
        local_port.to_be(),
        remote_port.to_be(),
        protocol,
        nonce,
    )
}

fn syn_ack(ack: u32) -> Vec<u8> {
    tcp_frame(
        RS,
        DIRECTOR,
        &Tcp {
            src_port: SERVICE_PORT,
            dst_port: TCP_LOCAL_PORT,
            seq: 777,
            ack,
            flags: SYN | ACK,
            options: &[2, 4, 5, 0xb4],
        },
    )
}

/// The RST a closed port answers a probe's SYN with.
fn refusal(ack: u32) -> Vec<u8> {
    tcp_frame(
        RS,
        DIRECTOR,
        &Tcp {
            src_port: SERVICE_PORT,
            dst_port: TCP_LOCAL_PORT,
            seq: 0,
            ack,
            flags: RST | ACK,
            options: &[],
        },
    )
}

fn valid_syn_ack() -> Vec<u8> {
    syn_ack(cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1))
}

#[test]
fn valid_syn_ack_is_answered_and_turned_into_a_reset() {
    let f = fixture();
    let (action, out) = f.rx(&valid_syn_ack());
    assert_eq!(action, XDP_TX);
    assert_eq!(out.len(), 14 + 20 + 20, "RST without options or padding");
    assert_eq!(&out[0..6], &MAC_A, "back to the sender's MAC");
    assert_eq!(&out[6..12], &MAC_B);
    assert_eq!(checksum(&out[14..34]), 0, "IPv4 header checksum");
    assert_eq!(be16(&out, 16), 40, "IPv4 total length");
    assert_eq!((&out[26..30], &out[30..34]), (&DIRECTOR[..], &RS[..]));
    let tcp = &out[34..];
    assert_eq!((be16(tcp, 0), be16(tcp, 2)), (TCP_LOCAL_PORT, SERVICE_PORT));
    assert_eq!(
        be32(tcp, 4),
        cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1),
        "seq = the SYN-ACK's ack"
    );
    assert_eq!(tcp[13], RST);
    assert_eq!(tcp_checksum(DIRECTOR, RS, tcp), 0, "TCP checksum");
    assert_eq!(f.results(TCP_TARGET).answered, 1);
    let state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
    assert!(state.last_reply_ns > state.last_sent_ns);
    let c = f.counters();
    assert_eq!(
        (c.replies_matched, c.resets_sent, c.replies_rejected),
        (1, 1, 0)
    );

    // A retransmitted SYN-ACK still gets its RST but is not counted twice.
    let (action, _) = f.rx(&valid_syn_ack());
    assert_eq!(action, XDP_TX);
    assert_eq!(f.results(TCP_TARGET).answered, 1);
}

#[test]
fn a_tunnel_probes_reset_goes_back_in_ipip_to_the_real_server() {
    // The target was probed through IPIP: its VIP (here RS's address)
    // answers from a real server that only the tunnel reaches.
    let mut f = fixture();
    let tunnel_rs = [198, 51, 100, 20];
    let mut target = tx_target(
        probe_kind::TCP_SYN,
        encap::IPIP,
        RS,
        SERVICE_PORT,
        TCP_LOCAL_PORT,
    );
    target.real_server = addr16(tunnel_rs.into());
    f.maps.targets.set(TCP_TARGET, target, 0).unwrap();
    let (action, out) = f.rx(&valid_syn_ack());
    assert_eq!(action, XDP_TX);
    assert_eq!(out.len(), 14 + 20 + 20 + 20, "outer IPv4, inner IPv4, RST");
    assert_eq!(&out[0..6], &MAC_A, "back to the sender's MAC");
    let outer = &out[14..34];
    assert_eq!(checksum(outer), 0, "outer header checksum");
    assert_eq!(
        (outer[9], &outer[12..16], &outer[16..20]),
        (4, &DIRECTOR[..], &tunnel_rs[..])
    );
    assert_eq!(be16(outer, 2), 60, "outer total length");
    let inner = &out[34..54];
    assert_eq!(checksum(inner), 0, "inner header checksum");
    assert_eq!(
        (inner[9], &inner[12..16], &inner[16..20]),
        (6, &DIRECTOR[..], &RS[..])
    );
    let tcp = &out[54..];
    assert_eq!(tcp[13], RST);
    assert_eq!((be16(tcp, 0), be16(tcp, 2)), (TCP_LOCAL_PORT, SERVICE_PORT));
    assert_eq!(tcp_checksum(DIRECTOR, RS, tcp), 0, "TCP checksum");
    assert_eq!(f.results(TCP_TARGET).answered, 1);
}

#[test]
fn a_reply_answers_only_the_probe_it_echoes() {
    // The target has sent its first probe: an answer to a probe before it
    // (nonce 0) or to one not yet sent (nonce 2) is no answer, and the late
    // one is counted as late, not as forged.
    let f = fixture();
    let late = syn_ack(cookie_of_send(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6, 0).wrapping_add(1));
    let (action, out) = f.rx(&late);
    assert_eq!((action, out), (XDP_PASS, late));
    let early = syn_ack(cookie_of_send(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6, 2).wrapping_add(1));
    assert_eq!(f.rx(&early).0, XDP_PASS);
    assert_eq!(f.results(TCP_TARGET).answered, 0);
    let c = f.counters();
    assert_eq!(
        (c.replies_late, c.replies_rejected, c.replies_matched),
        (1, 1, 0)
    );
    // Its own answer counts.
    assert_eq!(f.rx(&valid_syn_ack()).0, XDP_TX);
    assert_eq!(f.results(TCP_TARGET).answered, 1);
}

#[test]
fn a_late_echo_reply_is_no_answer() {
    let f = fixture();
    let late = cookie_of_send(SECRET, ICMP_ID, 0, 1, 0);
    let (action, _) = f.rx(&echo_reply_with(late));
    assert_eq!(action, XDP_PASS);
    assert_eq!(f.results(ICMP_TARGET).answered, 0);
    assert_eq!(f.counters().replies_late, 1);
    let (action, _) = f.rx(&echo_reply_with(cookie(SECRET, ICMP_ID, 0, 1)));
    assert_eq!(action, XDP_DROP);
    assert_eq!(f.results(ICMP_TARGET).answered, 1);
}

#[test]
fn previous_secret_matches_older_ones_do_not() {
    let f = fixture();
    let (action, _) = f.rx(&syn_ack(
        cookie(PREVIOUS_SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1),
    ));
    assert_eq!(action, XDP_TX);
    let f = fixture();
    let (action, out) = f.rx(&syn_ack(
        cookie([1, 1], TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1),
    ));
    assert_eq!(action, XDP_PASS);
    assert_eq!(
        out,
        syn_ack(cookie([1, 1], TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1))
    );
}

#[test]
fn forged_ack_is_rejected_passed_untouched_and_counted() {
    let f = fixture();
    let forged = syn_ack(cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(2));
    let (action, out) = f.rx(&forged);
    assert_eq!((action, &out), (XDP_PASS, &forged));
    assert_eq!(f.results(TCP_TARGET).answered, 0);
    assert_eq!(f.counters().replies_rejected, 1);
}

#[test]
fn reset_from_a_closed_port_is_refused_and_dropped() {
    let f = fixture();
    let rst = refusal(cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1));
    assert_eq!(f.rx(&rst).0, XDP_DROP);
    let r = f.results(TCP_TARGET);
    assert_eq!((r.answered, r.refused), (0, 1));
}

#[test]
fn frames_that_are_not_probe_replies_pass_untouched() {
    let f = fixture();
    let ack = cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6).wrapping_add(1);
    let segment = tcp(
        RS,
        DIRECTOR,
        &Tcp {
            src_port: SERVICE_PORT,
            dst_port: TCP_LOCAL_PORT,
            seq: 1,
            ack,
            flags: SYN | ACK,
            options: &[],
        },
    );
    let mut cases: Vec<(&str, Vec<u8>)> = vec![
        (
            "wrong port",
            tcp_frame(
                RS,
                DIRECTOR,
                &Tcp {
                    src_port: SERVICE_PORT,
                    dst_port: 40000,
                    seq: 1,
                    ack,
                    flags: SYN | ACK,
                    options: &[],
                },
            ),
        ),
        (
            "unknown target",
            tcp_frame(
                VIP,
                DIRECTOR,
                &Tcp {
                    src_port: SERVICE_PORT,
                    dst_port: TCP_LOCAL_PORT,
                    seq: 1,
                    ack,
                    flags: SYN | ACK,
                    options: &[],
                },
            ),
        ),
        (
            "plain ACK",
            tcp_frame(
                RS,
                DIRECTOR,
                &Tcp {
                    src_port: SERVICE_PORT,
                    dst_port: TCP_LOCAL_PORT,
                    seq: 1,
                    ack,
                    flags: ACK,
                    options: &[],
                },
            ),
        ),
        (
            "IP options",
            ethernet(
                MAC_B,
                MAC_A,
                0x0800,
                &ipv4(RS, DIRECTOR, 6, 0, &[1, 1, 1, 0], &segment),
            ),
        ),
        (
            "fragment",
            ethernet(
                MAC_B,
                MAC_A,
                0x0800,
                &ipv4(RS, DIRECTOR, 6, 0x2000, &[], &segment),
            ),
        ),
        (
            "UDP",
            ethernet(
                MAC_B,
                MAC_A,
                0x0800,
                &ipv4(RS, DIRECTOR, 17, 0, &[], &[0xee, 0x48, 0, 80, 0, 8, 0, 0]),
            ),
        ),
        ("ARP", ethernet(MAC_B, MAC_A, 0x0806, &[0u8; 28])),
        ("IPv6", ethernet(MAC_B, MAC_A, 0x86dd, &[0x60; 60])),
    ];
    let mut vlan = vec![0x00, 0x64, 0x08, 0x00];
    vlan.extend_from_slice(&ipv4(RS, DIRECTOR, 6, 0, &[], &segment));
    cases.push(("VLAN-tagged", ethernet(MAC_B, MAC_A, 0x8100, &vlan)));
    for (name, frame) in cases {
        let (action, out) = f.rx(&frame);
        assert_eq!(action, XDP_PASS, "{name}");
        assert_eq!(out, frame, "{name}: frame changed");
    }
    assert_eq!(f.results(TCP_TARGET).answered, 0);
    assert_eq!(f.counters().replies_matched, 0);
}

#[test]
fn arp_replies_are_counted_and_pass_untouched_requests_are_not_counted() {
    let f = fixture();
    let arp = |op: u8| {
        let mut body = vec![0, 1, 8, 0, 6, 4, 0, op];
        body.extend_from_slice(&MAC_B);
        body.extend_from_slice(&RS);
        body.extend_from_slice(&MAC_A);
        body.extend_from_slice(&DIRECTOR);
        ethernet(MAC_A, MAC_B, 0x0806, &body)
    };
    for (op, counted) in [(1, 0), (2, 1), (2, 2), (1, 2)] {
        let frame = arp(op);
        let (action, out) = f.rx(&frame);
        assert_eq!(action, XDP_PASS, "ARP op {op}");
        assert_eq!(out, frame, "ARP op {op}: frame changed");
        assert_eq!(f.counters().arp_replies, counted, "after ARP op {op}");
    }
    // Cut short before its operation: passed, not counted.
    let short = &arp(2)[..18];
    assert_eq!(f.rx(short).0, XDP_PASS);
    assert_eq!(f.counters().arp_replies, 2);
}

#[test]
fn truncated_replies_pass_untouched_at_every_length() {
    let f = fixture();
    let full = valid_syn_ack();
    // BPF_PROG_TEST_RUN refuses XDP frames shorter than an Ethernet header.
    for len in 14..full.len() - 4 {
        let frame = &full[..len];
        let (action, out) = f.rx(frame);
        assert_eq!(action, XDP_PASS, "cut at {len}");
        assert_eq!(out, frame, "cut at {len}");
    }
    assert_eq!(f.results(TCP_TARGET).answered, 0);
}

/// An echo reply to the fixture's echo target carrying `cookie`.
fn echo_reply_with(cookie: u32) -> Vec<u8> {
    let mut payload = cookie.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0; 4]);
    let mut rest = ICMP_ID.to_be_bytes().to_vec();
    rest.extend_from_slice(&(cookie as u16).to_be_bytes());
    ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(
            RS,
            DIRECTOR,
            1,
            0,
            &[],
            &icmp(0, 0, rest.try_into().unwrap(), &payload),
        ),
    )
}

#[test]
fn echo_reply_with_the_cookie_is_answered() {
    let f = fixture();
    let good = cookie(SECRET, ICMP_ID, 0, 1);
    let mut payload = good.to_be_bytes().to_vec();
    payload.extend_from_slice(&[0; 4]);
    let mut rest = ICMP_ID.to_be_bytes().to_vec();
    rest.extend_from_slice(&(good as u16).to_be_bytes());
    let reply = ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(
            RS,
            DIRECTOR,
            1,
            0,
            &[],
            &icmp(0, 0, rest.clone().try_into().unwrap(), &payload),
        ),
    );
    let forged_payload = [0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0];
    let forged = ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(
            RS,
            DIRECTOR,
            1,
            0,
            &[],
            &icmp(0, 0, rest.try_into().unwrap(), &forged_payload),
        ),
    );
    assert_eq!(f.rx(&forged), (XDP_PASS, forged.clone()));
    assert_eq!(f.rx(&reply).0, XDP_DROP);
    assert_eq!(f.results(ICMP_TARGET).answered, 1);
    assert_eq!(f.counters().replies_rejected, 1);
}

#[test]
fn icmp_unreachable_quoting_a_probe_is_recorded() {
    let f = fixture();
    let seq = cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6);
    let probe = tcp(
        DIRECTOR,
        RS,
        &Tcp {
            src_port: TCP_LOCAL_PORT,
            dst_port: SERVICE_PORT,
            seq,
            ack: 0,
            flags: SYN,
            options: &[],
        },
    );
    let quoted_ip = ipv4(DIRECTOR, RS, 6, 0, &[], &probe);
    let quote = &quoted_ip[..28]; // IPv4 header + first 8 bytes, as routers send
    let router = [198, 51, 100, 1];
    let unreachable = ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(router, DIRECTOR, 1, 0, &[], &icmp(3, 1, [0; 4], quote)),
    );
    assert_eq!(f.rx(&unreachable).0, XDP_DROP);
    assert_eq!(f.results(TCP_TARGET).unreachable, 1);

    // One quoting a segment with another sequence number is not ours.
    let f = fixture();
    let other = tcp(
        DIRECTOR,
        RS,
        &Tcp {
            src_port: TCP_LOCAL_PORT,
            dst_port: SERVICE_PORT,
            seq: seq ^ 1,
            ack: 0,
            flags: SYN,
            options: &[],
        },
    );
    let quoted = ipv4(DIRECTOR, RS, 6, 0, &[], &other);
    let frame = ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(
            router,
            DIRECTOR,
            1,
            0,
            &[],
            &icmp(3, 1, [0; 4], &quoted[..28]),
        ),
    );
    assert_eq!(f.rx(&frame), (XDP_PASS, frame.clone()));
    assert_eq!(f.results(TCP_TARGET).unreachable, 0);
}

/// An off-path attacker knows the addresses and ports but not the cookie:
/// it can only guess. Forged SYN-ACKs, RSTs, echo replies and ICMP errors
/// with guessed cookies (and the real one plus or minus small offsets) move
/// no result of either probe; every one is passed and the rejected
/// replies counted.
#[test]
fn guessed_cookies_in_forged_replies_move_no_probe_result() {
    let f = fixture();
    let tcp_cookie = cookie(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6);
    let icmp_cookie = cookie(SECRET, ICMP_ID, 0, 1);
    let mut guess = 0x9e37_79b9u32;
    let mut next_guess = |real: u32| loop {
        guess ^= guess << 13;
        guess ^= guess >> 17;
        guess ^= guess << 5;
        // Near misses and random guesses, never the value that counts.
        let candidate = if guess.is_multiple_of(4) {
            real.wrapping_add(2 + guess % 64)
        } else {
            guess
        };
        if candidate != real.wrapping_add(1) && candidate != real {
            return candidate;
        }
    };
    let tcp_to_us = |flags: u8, ack: u32| {
        tcp_frame(
            RS,
            DIRECTOR,
            &Tcp {
                src_port: SERVICE_PORT,
                dst_port: TCP_LOCAL_PORT,
                seq: 777,
                ack,
                flags,
                options: &[],
            },
        )
    };
    let rounds = 2_500u64;
    let mut forged = 0u64;
    for _ in 0..rounds {
        let mut frames = vec![
            tcp_to_us(SYN | ACK, next_guess(tcp_cookie)),
            tcp_to_us(RST | ACK, next_guess(tcp_cookie)),
        ];
        let echo_cookie = next_guess(icmp_cookie);
        let mut rest = ICMP_ID.to_be_bytes().to_vec();
        rest.extend_from_slice(&(echo_cookie as u16).to_be_bytes());
        let mut payload = echo_cookie.to_be_bytes().to_vec();
        payload.extend_from_slice(&[0; 4]);
        frames.push(ethernet(
            MAC_B,
            MAC_A,
            0x0800,
            &ipv4(
                RS,
                DIRECTOR,
                1,
                0,
                &[],
                &icmp(0, 0, rest.try_into().unwrap(), &payload),
            ),
        ));
        let quoted_probe = tcp(
            DIRECTOR,
            RS,
            &Tcp {
                src_port: TCP_LOCAL_PORT,
                dst_port: SERVICE_PORT,
                seq: next_guess(tcp_cookie.wrapping_sub(1)),
                ack: 0,
                flags: SYN,
                options: &[],
            },
        );
        let quoted = ipv4(DIRECTOR, RS, 6, 0, &[], &quoted_probe);
        frames.push(ethernet(
            MAC_B,
            MAC_A,
            0x0800,
            &ipv4(
                [198, 51, 100, 1],
                DIRECTOR,
                1,
                0,
                &[],
                &icmp(3, 1, [0; 4], &quoted[..28]),
            ),
        ));
        for frame in frames {
            assert_eq!(
                f.rx(&frame),
                (XDP_PASS, frame.clone()),
                "a forgery was taken"
            );
            forged += 1;
        }
    }
    for target in [TCP_TARGET, ICMP_TARGET] {
        let r = f.results(target);
        assert_eq!(
            (r.answered, r.refused, r.unreachable),
            (0, 0, 0),
            "target {target} moved"
        );
    }
    let rejected = f.counters().replies_rejected;
    assert!(rejected >= 3 * rounds, "{rejected} rejected of {forged}");
    println!(
        "{forged} forged replies with guessed cookies: 0 taken, {rejected} counted as rejected"
    );
    prober_tests::record(
        "spoofing",
        "forged SYN-ACKs, RSTs, echo replies and ICMP unreachables with guessed cookies (right addresses and ports)",
        forged,
        &format!("0 taken: no probe marked up, refused or unreachable; all passed unchanged, {rejected} counted as rejected"),
        "nothing",
    );
}

fn tx_target(kind: u8, encapsulation: u8, dst: [u8; 4], port: u16, local_port: u16) -> ProbeTarget {
    ProbeTarget {
        dst_mac: MAC_B,
        src_mac: MAC_A,
        kind,
        family: family::IPV4,
        encap: encapsulation,
        flags: 0,
        dst_port: port.to_be(),
        src_port: local_port.to_be(),
        ifindex: 1,
        src_addr: addr16(DIRECTOR.into()),
        dst_addr: addr16(dst.into()),
        outer_src: addr16(DIRECTOR.into()),
        real_server: addr16(RS.into()),
    }
}

/// Runs probe_tx once for `target` and returns verdict and frame.
fn transmit(f: &mut Fixture, target: ProbeTarget) -> (u32, Vec<u8>) {
    f.maps.targets.set(5, target, 0).unwrap();
    f.maps.batch.set(0, 5, 0).unwrap();
    f.maps
        .cursor
        .set(0, BatchCursor { next: 0, len: 1 }, 0)
        .unwrap();
    let run = run_xdp(f.tx.as_fd(), &[0u8; prober_common::PROBE_FRAME_MAX], 1).unwrap();
    (run.action, run.frame)
}

#[test]
fn probe_tx_writes_a_syn_with_the_cookie() {
    let mut f = fixture();
    let (action, frame) = transmit(
        &mut f,
        tx_target(probe_kind::TCP_SYN, encap::NONE, RS, 8080, 61234),
    );
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(frame.len(), 14 + 20 + 24);
    assert_eq!(
        (&frame[0..6], &frame[6..12], be16(&frame, 12)),
        (&MAC_B[..], &MAC_A[..], 0x0800)
    );
    assert_eq!(checksum(&frame[14..34]), 0);
    assert_eq!(
        (frame[23], &frame[26..30], &frame[30..34]),
        (6, &DIRECTOR[..], &RS[..])
    );
    let tcp = &frame[34..];
    assert_eq!((be16(tcp, 0), be16(tcp, 2), tcp[13]), (61234, 8080, SYN));
    assert_eq!(
        be32(tcp, 4),
        probe_cookie(
            SECRET,
            &addr16(DIRECTOR.into()),
            &addr16(RS.into()),
            61234u16.to_be(),
            8080u16.to_be(),
            6,
            1
        )
    );
    assert_eq!(tcp_checksum(DIRECTOR, RS, tcp), 0);
    let state = f.maps.state.get(&5, 0).unwrap();
    assert_eq!(state.sent, 1);
    assert!(state.last_sent_ns > 0);
}

/// Marks the last probe `transmit` sent as answered.
fn mark_answered(f: &mut Fixture) {
    let mut state = f.maps.state.get(&5, 0).unwrap();
    state.last_reply_ns = state.last_sent_ns;
    f.maps.state.set(5, state, 0).unwrap();
}

/// Runs probe_tx once more on the batch as the last run left it.
fn run_tx(f: &Fixture) -> (u32, Vec<u8>) {
    let run = run_xdp(f.tx.as_fd(), &[0u8; prober_common::PROBE_FRAME_MAX], 1).unwrap();
    (run.action, run.frame)
}

#[test]
fn an_unanswered_syn_is_reset_before_the_next_one() {
    let mut f = fixture();
    let target = tx_target(probe_kind::TCP_SYN, encap::NONE, RS, 8080, 61234);
    let (_, first) = transmit(&mut f, target);
    let first_seq = be32(&first[34..], 4);
    // Its SYN-ACK lost: the next send resets that 4-tuple first, with the
    // sequence the real server's half-open end expects, and stays on the
    // batch entry...
    let (action, rst) = transmit(&mut f, target);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(rst.len(), 14 + 20 + 20);
    assert_eq!(checksum(&rst[14..34]), 0);
    let tcp = &rst[34..];
    assert_eq!((be16(tcp, 0), be16(tcp, 2), tcp[13]), (61234, 8080, RST));
    assert_eq!(be32(tcp, 4), first_seq.wrapping_add(1));
    assert_eq!(tcp_checksum(DIRECTOR, RS, tcp), 0);
    assert_eq!(f.maps.cursor.get(&0, 0).unwrap().next, 0);
    // ...whose SYN, a new probe, goes on the next run and counts the
    // time-out.
    let (_, syn) = run_tx(&f);
    assert_eq!(syn[34 + 13], SYN);
    assert_ne!(be32(&syn[34..], 4), first_seq);
    assert_eq!(f.maps.cursor.get(&0, 0).unwrap().next, 1);
    let state = f.maps.state.get(&5, 0).unwrap();
    assert_eq!(
        (state.sent, state.timed_out, state.misses_in_row),
        (2, 1, 1)
    );
    assert_eq!(f.counters().resets_before_probe, 1);
    // Unanswered again: reset again.
    let (_, rst) = transmit(&mut f, target);
    assert_eq!(rst[34 + 13], RST);
    let (_, syn) = run_tx(&f);
    assert_eq!(syn[34 + 13], SYN);
    let state = f.maps.state.get(&5, 0).unwrap();
    assert_eq!(
        (state.sent, state.timed_out, state.misses_in_row),
        (3, 2, 2)
    );
    // Answered: no RST, and the run of misses ends.
    mark_answered(&mut f);
    let (_, frame) = transmit(&mut f, target);
    assert_eq!(frame[34 + 13], SYN);
    let state = f.maps.state.get(&5, 0).unwrap();
    assert_eq!(
        (state.sent, state.timed_out, state.misses_in_row),
        (4, 2, 0)
    );
    assert_eq!(f.counters().resets_before_probe, 2);
}

#[test]
fn probe_tx_direct_routing_keeps_the_vip_and_tunnel_wraps_it() {
    let mut f = fixture();
    let (_, dr) = transmit(
        &mut f,
        tx_target(probe_kind::TCP_SYN, encap::NONE, VIP, 80, 61000),
    );
    assert_eq!(
        &dr[30..34],
        &VIP,
        "direct routing: destination VIP, real server's MAC"
    );
    assert_eq!(&dr[0..6], &MAC_B);

    mark_answered(&mut f);
    let (action, tun) = transmit(
        &mut f,
        tx_target(probe_kind::TCP_SYN, encap::IPIP, VIP, 80, 61000),
    );
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(tun.len(), 14 + 20 + 20 + 24);
    assert_eq!(
        (tun[23], &tun[26..30], &tun[30..34]),
        (4, &DIRECTOR[..], &RS[..]),
        "outer IPIP header to the real server"
    );
    assert_eq!(checksum(&tun[14..34]), 0);
    assert_eq!(be16(&tun, 16), 20 + 20 + 24);
    assert_eq!(
        (tun[43], &tun[50..54]),
        (6, &VIP[..]),
        "inner TCP to the VIP"
    );
    assert_eq!(checksum(&tun[34..54]), 0);
    assert_eq!(tcp_checksum(DIRECTOR, VIP, &tun[54..]), 0);
}

#[test]
fn probe_tx_writes_an_echo_request_carrying_the_cookie() {
    let mut f = fixture();
    let (action, frame) = transmit(
        &mut f,
        tx_target(probe_kind::ICMP_ECHO, encap::NONE, RS, 0, 61001),
    );
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(frame.len(), 14 + 20 + 16);
    assert_eq!(frame[23], 1);
    let icmp = &frame[34..];
    assert_eq!((icmp[0], be16(icmp, 4)), (8, 61001));
    assert_eq!(checksum(icmp), 0);
    assert_eq!(
        be32(icmp, 8),
        probe_cookie(
            SECRET,
            &addr16(DIRECTOR.into()),
            &addr16(RS.into()),
            61001u16.to_be(),
            0,
            1,
            1
        )
    );
}

#[test]
fn a_paused_target_is_walked_past_and_sent_again_once_resumed() {
    let mut f = fixture();
    let mut target = tx_target(probe_kind::ICMP_ECHO, encap::NONE, RS, 0, 4242);
    let (action, _) = transmit(&mut f, target);
    assert_eq!(action, XDP_REDIRECT);
    mark_answered(&mut f);
    // Paused: nothing goes out, the walk counts it as not due, and its
    // counts stay as they were.
    target.flags = target_flags::PAUSED;
    let not_due = f.counters().entries_not_due;
    let (action, _) = transmit(&mut f, target);
    assert_eq!(action, XDP_DROP);
    assert_eq!(f.counters().entries_not_due, not_due + 1);
    assert_eq!(f.counters().probe_errors, 0);
    let state = f.maps.state.get(&5, 0).unwrap();
    assert_eq!((state.sent, state.timed_out), (1, 0));
    // Resumed: its next probe goes, the answered one no timeout.
    target.flags = 0;
    let (action, frame) = transmit(&mut f, target);
    assert_eq!(action, XDP_REDIRECT);
    assert_eq!(frame[23], 1, "an ICMP echo");
    let state = f.maps.state.get(&5, 0).unwrap();
    assert_eq!((state.sent, state.timed_out), (2, 0));
}

#[test]
fn probe_tx_past_the_end_of_the_batch_sends_nothing() {
    let mut f = fixture();
    f.maps
        .cursor
        .set(0, BatchCursor { next: 1, len: 1 }, 0)
        .unwrap();
    let run = run_xdp(f.tx.as_fd(), &[0u8; prober_common::PROBE_FRAME_MAX], 1).unwrap();
    assert_eq!(run.action, XDP_DROP);
    assert_eq!(f.counters().probe_errors, 1);
}

/// `probe_tx` reads its input from maps, not from the wire: random target
/// entries (any kind, encapsulation, family, ports, addresses) and random
/// batch cursors and ids. Every run sends one well-formed IPv4 frame or
/// nothing (counted), never anything else.
#[test]
fn probe_tx_survives_random_target_entries_and_batch_cursors() {
    let mut f = fixture();
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    let mut next = || {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    };
    let runs = 100_000u64;
    let (mut sent, mut refused, mut passed_over) = (0u64, 0u64, 0u64);
    let errors_before = f.counters().probe_errors;
    for i in 0..runs {
        let mut bytes = [0u8; 16];
        bytes.iter_mut().for_each(|b| *b = next() as u8);
        let pick = |choices: &[u8], r: u64| choices[(r % choices.len() as u64) as usize];
        let target = ProbeTarget {
            dst_mac: MAC_B,
            src_mac: MAC_A,
            kind: pick(
                &[0, probe_kind::ICMP_ECHO, probe_kind::TCP_SYN, 3, 255],
                next(),
            ),
            family: pick(&[family::IPV4, family::IPV6, 0, 99], next()),
            encap: pick(&[encap::NONE, encap::IPIP, 2, 255], next()),
            flags: next() as u8,
            dst_port: next() as u16,
            src_port: next() as u16,
            ifindex: 1,
            src_addr: bytes,
            dst_addr: {
                let mut a = bytes;
                a.rotate_left(3);
                a
            },
            outer_src: bytes,
            real_server: bytes,
        };
        let slot = (next() % 8) as u32;
        f.maps.targets.set(slot, target, 0).unwrap();
        // Batch ids sometimes past the end of the target table.
        let id = if next() % 4 == 0 { next() as u32 } else { slot };
        f.maps.batch.set(0, id, 0).unwrap();
        let cursor = BatchCursor {
            next: (next() % 3) as u32,
            len: (next() % 3) as u32,
        };
        f.maps.cursor.set(0, cursor, 0).unwrap();
        let before = f.counters();
        let run = run_xdp(f.tx.as_fd(), &[0u8; prober_common::PROBE_FRAME_MAX], 1).unwrap();
        let after = f.counters();
        match run.action {
            XDP_DROP if after.probe_errors > before.probe_errors => refused += 1,
            // Entries without a path (kind 0) walked past, counted.
            XDP_DROP if after.entries_not_due > before.entries_not_due => passed_over += 1,
            XDP_DROP => panic!("run {i}: dropped, counted nowhere: {target:?}, {cursor:?}"),
            XDP_REDIRECT => {
                sent += 1;
                let frame = &run.frame;
                assert_eq!(be16(frame, 12), 0x0800, "run {i}: {target:?}");
                assert_eq!(checksum(&frame[14..34]), 0, "run {i}: IP checksum");
                assert_eq!(
                    be16(frame, 16) as usize,
                    frame.len() - 14,
                    "run {i}: IP length"
                );
                assert!(
                    [1, 4, 6].contains(&frame[23]),
                    "run {i}: protocol {}",
                    frame[23]
                );
            }
            other => panic!("run {i}: verdict {other} for {target:?}, cursor {cursor:?}"),
        }
    }
    let errors = f.counters().probe_errors - errors_before;
    println!("{runs} random probe_tx runs: {sent} well-formed frames sent, {refused} refused and counted, {passed_over} passed over an entry without a path");
    assert_eq!(errors, refused, "every refusal counted");
    assert!(sent > 0 && refused > 0);
    prober_tests::record(
        "hostile input",
        "random probe target entries and batch cursors handed to probe_tx",
        runs,
        &format!("{sent} well-formed IPv4 frames sent, {refused} runs refused and counted, {passed_over} walked past an entry without a path, no malformed frame"),
        "nothing",
    );
}

/// The controller reads every target's counters in one batch per map and
/// writes the send batch in one call: the values must be the ones a read
/// of each entry gives, per CPU too, and a read past the map's end stops
/// at it.
#[test]
fn batched_map_reads_and_writes_match_per_entry_ones() {
    use prober_user::map_batch::{write_array_prefix, ArraySnapshot};
    let mut ebpf = load_programs().unwrap();
    let mut maps = take_probe_maps(&mut ebpf).unwrap();
    let cpus = aya::util::nr_cpus().unwrap();
    const N: u32 = 300;
    for id in 0..N {
        let id64 = u64::from(id);
        maps.state
            .set(
                id,
                ProbeState {
                    sent: id64 * 3,
                    timed_out: id64,
                    last_sent_ns: 7,
                    last_reply_ns: id64 + 1,
                    ..Default::default()
                },
                0,
            )
            .unwrap();
        let per_cpu: Vec<ProbeResults> = (0..cpus as u64)
            .map(|cpu| ProbeResults {
                answered: id64 * 10 + cpu,
                last_rtt_ns: cpu + 1,
                ..Default::default()
            })
            .collect();
        maps.results
            .set(id, aya::maps::PerCpuValues::try_from(per_cpu).unwrap(), 0)
            .unwrap();
    }
    let mut states = ArraySnapshot::default();
    states.read(&maps.state, N).unwrap();
    assert_eq!(states.len(), N as usize);
    let mut results = ArraySnapshot::default();
    results.read_per_cpu(&maps.results, N, cpus).unwrap();
    assert_eq!(results.len(), N as usize);
    for id in 0..N {
        assert_eq!(
            states.get(id as usize, 0),
            Some(maps.state.get(&id, 0).unwrap())
        );
        let one_by_one = maps.results.get(&id, 0).unwrap();
        let batched: Vec<ProbeResults> = results.per_cpu(id as usize).collect();
        assert_eq!(batched.len(), cpus);
        for (cpu, value) in batched.iter().enumerate() {
            assert_eq!(
                value.answered, one_by_one[cpu].answered,
                "id {id} cpu {cpu}"
            );
            assert_eq!(value.last_rtt_ns, one_by_one[cpu].last_rtt_ns);
        }
    }
    assert_eq!(states.get(N as usize, 0), None);

    // BATCH_CURSOR has one entry: a read of five stops after it.
    let mut cursor = ArraySnapshot::<BatchCursor>::default();
    cursor.read(&maps.cursor, 5).unwrap();
    assert_eq!(cursor.len(), 1);

    write_array_prefix(&maps.batch, &[41, 42, 43]).unwrap();
    let written: Vec<u32> = (0..3).map(|i| maps.batch.get(&i, 0).unwrap()).collect();
    assert_eq!(written, [41, 42, 43]);
}

/// Sends the fixture's TCP target's next probe (target id `TCP_TARGET`,
/// whose replies the reply index knows).
fn send_tcp_probe(f: &mut Fixture) {
    let target = tx_target(
        probe_kind::TCP_SYN,
        encap::NONE,
        RS,
        SERVICE_PORT,
        TCP_LOCAL_PORT,
    );
    f.maps.targets.set(TCP_TARGET, target, 0).unwrap();
    f.maps.batch.set(0, TCP_TARGET, 0).unwrap();
    f.maps
        .cursor
        .set(0, BatchCursor { next: 0, len: 1 }, 0)
        .unwrap();
    // A RST before the SYN takes a run of its own.
    for _ in 0..2 {
        let _ = run_tx(f);
        if f.maps.cursor.get(&0, 0).unwrap().next == 1 {
            return;
        }
    }
    panic!("probe_tx did not send the SYN in two runs");
}

/// Answers the TCP target's outstanding probe, as `rtt_ns` late when given
/// (its send time moved back that far).
fn answer_tcp_probe(f: &mut Fixture, rtt_ns: Option<u64>) {
    let mut state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
    if let Some(rtt) = rtt_ns {
        state.last_sent_ns = monotonic_ns() - rtt;
        // Still outstanding: the last answer before its (earlier) send.
        state.last_reply_ns = state.last_reply_ns.min(state.last_sent_ns - 1);
        f.maps.state.set(TCP_TARGET, state, 0).unwrap();
    }
    let cookie = cookie_of_send(SECRET, TCP_LOCAL_PORT, SERVICE_PORT, 6, state.sent as u32);
    let (action, _) = f.rx(&syn_ack(cookie.wrapping_add(1)));
    assert_eq!(action, XDP_TX);
}

/// CLOCK_MONOTONIC, the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer.
    assert_eq!(
        unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) },
        0
    );
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The events the datapath has reported since the last call, as
/// (outcome, run length, nonce).
fn events(f: &mut Fixture) -> Vec<(u8, u32, u32)> {
    let mut out = Vec::new();
    while let Some(item) = f.maps.events.next() {
        assert_eq!(item.len(), std::mem::size_of::<ProbeEvent>());
        // SAFETY: a ProbeEvent the program wrote, read unaligned.
        let event: ProbeEvent = unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) };
        assert_eq!(event.target_id, TCP_TARGET);
        out.push((event.outcome, event.in_row, event.nonce));
    }
    out
}

fn expect(f: &mut Fixture, state: u8, timeout_us: u32) {
    f.maps
        .expect
        .set(
            TCP_TARGET,
            Expectation {
                state,
                _pad: [0; 3],
                timeout_us,
                interval_us: 0,
                lossy_nonce: 0,
            },
            0,
        )
        .unwrap();
}

/// A fixture whose TCP target has sent nothing yet. Its RTT band is as
/// wide as it goes: a test run's RTT is however long the host took
/// between two syscalls, so only the first estimate is reported (tests
/// of the band set their own, with RTTs of their own making).
fn verdict_fixture() -> Fixture {
    let mut f = fixture();
    f.maps
        .state
        .set(TCP_TARGET, ProbeState::default(), 0)
        .unwrap();
    set_rtt_band(&mut f, u16::MAX, 5_000);
    f
}

fn set_rtt_band(f: &mut Fixture, permille: u16, slack_us: u32) {
    let mut config = f.maps.config.get(&0, 0).unwrap();
    config.rtt_band_permille = permille;
    config.rtt_slack_us = slack_us;
    f.maps.config.set(0, config, 0).unwrap();
}

#[test]
fn an_up_target_reports_only_its_failures_and_the_answer_that_ends_them() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    expect(&mut f, expected::UP, 0);
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, None);
    // The first answer gives the first RTT estimate: reported.
    assert_eq!(events(&mut f), [(ANSWERED, 1, 1)]);
    for _ in 0..3 {
        send_tcp_probe(&mut f);
        answer_tcp_probe(&mut f, None);
    }
    assert_eq!(
        events(&mut f),
        [],
        "answers of an up target within the band"
    );
    // Probes 5 and 6 go unanswered: each is settled by the next send.
    send_tcp_probe(&mut f);
    send_tcp_probe(&mut f);
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [(TIMED_OUT, 1, 5), (TIMED_OUT, 2, 6)]);
    // Probe 7 is answered: the run of failures ends, and userspace hears it.
    answer_tcp_probe(&mut f, None);
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, None);
    assert_eq!(events(&mut f), [(ANSWERED, 1, 7)]);
    let state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
    assert_eq!((state.successes_in_row, state.failures_in_row), (2, 0));
    assert_eq!(f.counters().events_lost, 0);
}

#[test]
fn a_down_target_reports_its_answers_and_the_failure_that_ends_them() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    expect(&mut f, expected::DOWN, 0);
    send_tcp_probe(&mut f);
    send_tcp_probe(&mut f);
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [], "a down target's silence is no news");
    answer_tcp_probe(&mut f, None);
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, None);
    assert_eq!(events(&mut f), [(ANSWERED, 1, 3), (ANSWERED, 2, 4)]);
    // A refusal ends the run of answers.
    let state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
    send_tcp_probe(&mut f);
    let cookie = cookie_of_send(
        SECRET,
        TCP_LOCAL_PORT,
        SERVICE_PORT,
        6,
        state.sent as u32 + 1,
    );
    let rst = refusal(cookie.wrapping_add(1));
    assert_eq!(f.rx(&rst).0, XDP_DROP);
    send_tcp_probe(&mut f);
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [(REFUSED, 1, 5)]);
}

#[test]
fn with_nothing_expected_every_outcome_is_reported() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, None);
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, None);
    send_tcp_probe(&mut f);
    send_tcp_probe(&mut f);
    assert_eq!(
        events(&mut f),
        [(ANSWERED, 1, 1), (ANSWERED, 2, 2), (TIMED_OUT, 1, 3)]
    );
}

#[test]
fn a_slow_answer_is_a_failure_and_an_rtt_move_beyond_the_band_is_reported() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    // The weights' default 5 ms slack, 5 % band.
    set_rtt_band(&mut f, 50, 5_000);
    expect(&mut f, expected::UP, 100_000);
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, Some(2_000_000));
    let first = f.maps.state.get(&TCP_TARGET, 0).unwrap().rtt_ewma_ns;
    // 2 ms and however long the host took to answer it.
    assert!((2_000_000..40_000_000).contains(&first), "{first}");
    assert_eq!(events(&mut f), [(ANSWERED, 1, 1)]);
    // 2 ms -> 40 ms: beyond 5 % of (2 ms + 5 ms slack), though the
    // target is up as expected.
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, Some(40_000_000));
    assert_eq!(events(&mut f), [(ANSWERED, 2, 2)]);
    // Past the 100 ms timeout: a failure.
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, Some(150_000_000));
    assert_eq!(events(&mut f), [(SLOW, 1, 3)]);
    let state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
    assert_eq!((state.successes_in_row, state.failures_in_row), (0, 1));
    assert!(
        state.rtt_ewma_ns < 50_000_000,
        "a slow answer is no RTT sample"
    );
}

#[test]
fn one_late_answer_moves_no_estimate_and_a_second_one_does() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    set_rtt_band(&mut f, 50, 5_000);
    expect(&mut f, expected::UP, 500_000);
    for _ in 0..3 {
        send_tcp_probe(&mut f);
        answer_tcp_probe(&mut f, Some(2_000_000));
    }
    let estimate = |f: &mut Fixture| f.maps.state.get(&TCP_TARGET, 0).unwrap().rtt_ewma_ns;
    let steady = estimate(&mut f);
    assert!((2_000_000..40_000_000).contains(&steady), "{steady}");
    let _ = events(&mut f);
    // One answer 300 ms late (a stall on the director's side, as often
    // as not): the median of the last three is still a steady one.
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, Some(300_000_000));
    assert!(estimate(&mut f) < 40_000_000, "{}", estimate(&mut f));
    assert_eq!(events(&mut f), [], "no move reported");
    // The next one late too: the server turned slow.
    send_tcp_probe(&mut f);
    answer_tcp_probe(&mut f, Some(300_000_000));
    assert!(estimate(&mut f) >= 300_000_000, "{}", estimate(&mut f));
    assert_eq!(events(&mut f), [(ANSWERED, 5, 5)]);
}

#[test]
fn the_walk_sends_the_targets_due_and_passes_over_the_rest() {
    let mut f = fixture();
    let probe = |port| tx_target(probe_kind::TCP_SYN, encap::NONE, RS, port, 61234);
    // The wheel: target 3 has no path (kind 0), 4 and 6 are due, each
    // every second of a one-second turn.
    for (id, target) in [(3, ProbeTarget::default()), (4, probe(81)), (6, probe(82))] {
        f.maps.targets.set(id, target, 0).unwrap();
        f.maps.state.set(id, ProbeState::default(), 0).unwrap();
        let every_second = Expectation {
            interval_us: 1_000_000,
            ..Default::default()
        };
        f.maps.expect.set(id, every_second, 0).unwrap();
    }
    let mut config = f.maps.config.get(&0, 0).unwrap();
    config.send_turn_us = 1_000_000;
    f.maps.config.set(0, config, 0).unwrap();
    for (index, id) in [3, 4, 6].into_iter().enumerate() {
        f.maps.batch.set(index as u32, id, 0).unwrap();
    }
    let walk = |f: &mut Fixture| {
        f.maps
            .cursor
            .set(0, BatchCursor { next: 0, len: 3 }, 0)
            .unwrap();
        let mut sent = vec![];
        for _ in 0..4 {
            if f.maps.cursor.get(&0, 0).unwrap().next >= 3 {
                break;
            }
            let (action, frame) = run_tx(f);
            if action == XDP_REDIRECT {
                sent.push(be16(&frame[34..], 2));
            } else {
                assert_eq!(action, XDP_DROP);
            }
        }
        sent
    };
    assert_eq!(
        walk(&mut f),
        [81, 82],
        "both due, the one without a path passed over"
    );
    assert_eq!(f.counters().entries_not_due, 1);
    let sent_at = f.maps.state.get(&4, 0).unwrap().last_sent_ns;
    let next = f.maps.state.get(&4, 0).unwrap().next_send_ns;
    assert_eq!(
        next - sent_at,
        500_000_000,
        "due half a turn before its interval is up"
    );
    // The same walk again at once: nothing is due, nothing is an error.
    assert_eq!(walk(&mut f), Vec::<u16>::new());
    assert_eq!(f.counters().entries_not_due, 4);
    assert_eq!(f.counters().probe_errors, 0);
    assert_eq!(f.maps.state.get(&4, 0).unwrap().sent, 1);
}

#[test]
fn a_turn_that_comes_early_after_a_late_send_waits_out_the_timeout() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    let every_second = Expectation {
        state: expected::UP,
        timeout_us: 1_000_000,
        interval_us: 1_000_000,
        ..Default::default()
    };
    f.maps.expect.set(TCP_TARGET, every_second, 0).unwrap();
    send_tcp_probe(&mut f);
    let _ = events(&mut f);
    // The wheel's next turn reaches the target 500 ms after its send (that
    // send was late): due by the interval, yet its probe has had half its
    // timeout. Nothing goes, nothing is judged.
    let sent_ago = |f: &mut Fixture, ago_ns: u64| {
        let mut state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
        state.last_sent_ns = monotonic_ns() - ago_ns;
        state.last_reply_ns = state.last_reply_ns.min(state.last_sent_ns - 1);
        state.next_send_ns = 0;
        f.maps.state.set(TCP_TARGET, state, 0).unwrap();
        f.maps
            .cursor
            .set(0, BatchCursor { next: 0, len: 1 }, 0)
            .unwrap();
    };
    sent_ago(&mut f, 500_000_000);
    let (action, _) = run_tx(&f);
    assert_eq!(action, XDP_DROP, "held");
    assert_eq!(f.counters().sends_held_for_timeout, 1);
    assert_eq!(f.maps.state.get(&TCP_TARGET, 0).unwrap().sent, 1);
    assert_eq!(events(&mut f), [], "not judged before its timeout");
    // Answered meanwhile: nothing to wait for, it goes.
    answer_tcp_probe(&mut f, Some(400_000_000));
    sent_ago(&mut f, 500_000_000);
    let mut state = f.maps.state.get(&TCP_TARGET, 0).unwrap();
    state.last_reply_ns = state.last_sent_ns + 1;
    f.maps.state.set(TCP_TARGET, state, 0).unwrap();
    assert_eq!(run_tx(&f).0, XDP_REDIRECT);
    assert_eq!(f.maps.state.get(&TCP_TARGET, 0).unwrap().sent, 2);
    // Unanswered, and its timeout all but gone (inside the eighth left to
    // the walks' jitter): judged, and the next probe goes.
    let _ = events(&mut f);
    sent_ago(&mut f, 900_000_000);
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [(TIMED_OUT, 1, 2)]);
    assert_eq!(f.counters().sends_held_for_timeout, 1);
}

#[test]
fn a_probe_lost_in_the_directors_ring_is_excused_once_in_a_row() {
    use prober_common::outcome::*;
    let mut f = verdict_fixture();
    let lossy = |f: &mut Fixture, nonce: u32| {
        let e = Expectation {
            state: expected::UP,
            lossy_nonce: nonce,
            ..Default::default()
        };
        f.maps.expect.set(TCP_TARGET, e, 0).unwrap();
    };
    // Probe 1 went out in a chunk the interface dropped frames of.
    send_tcp_probe(&mut f);
    lossy(&mut f, 1);
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [], "probe 1's silence is the director's");
    assert_eq!(f.counters().timeouts_excused, 1);
    // Probe 2 too: not excused, the one before it was.
    lossy(&mut f, 2);
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [(TIMED_OUT, 1, 2)]);
    assert_eq!(f.counters().timeouts_excused, 1);
    // Probe 3, not marked: a timeout as any.
    send_tcp_probe(&mut f);
    assert_eq!(events(&mut f), [(TIMED_OUT, 2, 3)]);
}
