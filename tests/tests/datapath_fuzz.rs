//! Hostile frames through every eBPF program in the real kernel
//! (BPF_PROG_TEST_RUN): a million generated and mutated frames each for the
//! ingress XDP program and the TC egress program, and random target
//! entries for `probe_tx`. Frames are built from templates of everything
//! the programs parse (probe replies with wrong cookies, passive flows,
//! agent datagrams, DR check answers, ICMP errors, IPv6 with extension
//! headers, VLAN and QinQ, ARP) and then truncated at every offset, given
//! bad lengths, checksums, options and fragment bits, or replaced by random
//! bytes. A deterministic generator: a failure prints the seed and index.
//!
//! Checked after every frame: a non-probe frame passes unchanged (no verdict
//! but pass, no byte changed); nothing counts as an answer (no false "up");
//! afterwards, the maps userspace owns are exactly as written.

use std::os::fd::AsFd;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    Ebpf,
};
use prober_common::{
    agent_wire, map_names, program_names, DatapathCounters, ProbeConfig, ProbeResults, ProbeState,
    ReplyKey,
};
use prober_tests::packets::*;
use prober_user::{
    datapath::{load_programs, program_fd},
    probe::{reply_key, ProbeSpec},
    test_run::run_xdp,
};

const XDP_PASS: u32 = 2;
const TC_ACT_UNSPEC: u32 = u32::MAX;
const DIRECTOR: [u8; 4] = [192, 0, 2, 1];
const RS: [u8; 4] = [192, 0, 2, 2];
const FRAMES: u64 = 1_000_000;
const SEED: u64 = 0x9e37_79b9_7f4a_7c15;

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next() as u8).collect()
    }

    /// Up to `max` random bytes.
    fn some_bytes(&mut self, max: u64) -> Vec<u8> {
        let n = self.below(max) as usize;
        self.bytes(n)
    }
}

fn tcp_segment(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    ack: u32,
    payload: usize,
) -> Vec<u8> {
    let mut segment = tcp(
        src,
        dst,
        &Tcp {
            src_port: sport,
            dst_port: dport,
            seq: 7,
            ack,
            flags,
            options: &[],
        },
    );
    segment.extend(std::iter::repeat_n(b'x', payload));
    segment
}

/// One frame of a kind the programs parse, valid before mutation.
fn template(rng: &mut Rng) -> Vec<u8> {
    let eth = |payload: &[u8]| ethernet(MAC_B, MAC_A, 0x0800, payload);
    match rng.below(12) {
        // A SYN-ACK / RST to the probe's own port: right addresses and
        // ports, a wrong cookie (the generator never knows the secret).
        0 => {
            let flags = [SYN | ACK, RST | ACK, ACK][rng.below(3) as usize];
            let ack = rng.next() as u32;
            eth(&ipv4(
                RS,
                DIRECTOR,
                6,
                0,
                &[],
                &tcp_segment(RS, DIRECTOR, 80, 61000, flags, ack, 0),
            ))
        }
        // Any TCP to a probe port or a DR check port.
        1 => {
            let dport = [61000, 61001, 65535, 60000, 60500][rng.below(5) as usize];
            let flags = rng.next() as u8;
            eth(&ipv4(
                RS,
                DIRECTOR,
                6,
                0,
                &[],
                &tcp_segment(
                    RS,
                    DIRECTOR,
                    80,
                    dport,
                    flags,
                    rng.next() as u32,
                    rng.below(40) as usize,
                ),
            ))
        }
        // Passive: client traffic to and from a tracked NAT server.
        2 => {
            let client = [198, 51, 100, rng.below(255) as u8];
            let (src, dst, sport, dport) = if rng.below(2) == 0 {
                (client, RS, 40000 + rng.below(100) as u16, 80)
            } else {
                (RS, client, 80, 40000 + rng.below(100) as u16)
            };
            let flags = [SYN, SYN | ACK, ACK, RST, 0x01 | ACK, 0x08 | ACK][rng.below(6) as usize];
            eth(&ipv4(
                src,
                dst,
                6,
                0,
                &[],
                &tcp_segment(src, dst, sport, dport, flags, 0, rng.below(100) as usize),
            ))
        }
        // Agent datagrams (the agent port is 5555), good-looking and not.
        3 => {
            let mut wire = agent_datagram(rng);
            if rng.below(2) == 0 {
                let at = rng.below(agent_wire::LEN as u64) as usize;
                wire[at] = rng.next() as u8;
            }
            udp_frame(RS, DIRECTOR, 40000, 5555, &wire, rng.below(2) == 0)
        }
        // Other UDP, DNS-like.
        4 => udp_frame(
            RS,
            DIRECTOR,
            53,
            40000 + rng.below(20000) as u16,
            &rng.some_bytes(64),
            true,
        ),
        // ICMP echo reply with a wrong cookie, to a probe id.
        5 => {
            let id_seq = [0xee, 0x48, 0, rng.next() as u8];
            eth(&ipv4(
                RS,
                DIRECTOR,
                1,
                0,
                &[],
                &icmp(0, 0, id_seq, &rng.bytes(8)),
            ))
        }
        // ICMP unreachable quoting something that looks like a probe.
        6 => {
            let quoted_tcp = tcp_segment(DIRECTOR, RS, 61000, 80, SYN, 0, 0);
            let quoted = ipv4(DIRECTOR, RS, 6, 0, &[], &quoted_tcp[..8]);
            eth(&ipv4(
                RS,
                DIRECTOR,
                1,
                0,
                &[],
                &icmp(3, rng.below(16) as u8, [0; 4], &quoted),
            ))
        }
        // IPv6 with a chain of extension headers, then TCP.
        7 => {
            let mut v6 = vec![0x60, 0, 0, 0, 0, 40, 0, 64];
            v6.extend(rng.bytes(32)); // addresses
            v6[6] = [0, 43, 44, 60, 6][rng.below(5) as usize];
            v6.extend(rng.bytes(40));
            ethernet(MAC_B, MAC_A, 0x86dd, &v6)
        }
        // VLAN and QinQ around an IPv4 probe-port segment.
        8 => {
            let inner = ipv4(
                RS,
                DIRECTOR,
                6,
                0,
                &[],
                &tcp_segment(RS, DIRECTOR, 80, 61000, SYN | ACK, 1, 0),
            );
            let mut tagged = Vec::new();
            if rng.below(2) == 0 {
                tagged.extend_from_slice(&[0, 10, 0x81, 0x00]); // outer tag, then inner 802.1Q
            }
            tagged.extend_from_slice(&[0, 20, 0x08, 0x00]);
            tagged.extend(inner);
            let outer_type = if tagged.len() > 4 && tagged[2] == 0x81 {
                0x88a8
            } else {
                0x8100
            };
            ethernet(MAC_B, MAC_A, outer_type, &tagged)
        }
        // ARP.
        9 => ethernet(MAC_B, MAC_A, 0x0806, &rng.bytes(28)),
        // IPv4 with options or fragment bits.
        10 => {
            let options = [1u8, 1, 1, 0].repeat(rng.below(10) as usize);
            let frag = [0u16, 0x2000, 0x0001, 0x4000][rng.below(4) as usize];
            eth(&ipv4(
                RS,
                DIRECTOR,
                6,
                frag,
                &options,
                &tcp_segment(RS, DIRECTOR, 80, 61000, SYN | ACK, 1, 0),
            ))
        }
        // Random bytes.
        _ => rng.some_bytes(200),
    }
}

/// Breaks a frame the ways an attacker or a broken NIC would.
fn mutate(rng: &mut Rng, mut frame: Vec<u8>) -> Vec<u8> {
    match rng.below(6) {
        0 => frame, // as built
        1 => {
            let len = rng.below(frame.len() as u64 + 1) as usize;
            frame.truncate(len);
            frame
        }
        2 => {
            for _ in 0..=rng.below(4) {
                if !frame.is_empty() {
                    let at = rng.below(frame.len() as u64) as usize;
                    frame[at] = rng.next() as u8;
                }
            }
            frame
        }
        3 => {
            // IPv4 total length, IHL or checksum.
            if frame.len() > 25 {
                let at = [16, 17, 14, 24, 25][rng.below(5) as usize];
                frame[at] = rng.next() as u8;
            }
            frame
        }
        4 => {
            // L4 length / checksum fields.
            if frame.len() > 42 {
                let at = 34 + rng.below(8) as usize;
                frame[at] = rng.next() as u8;
            }
            frame
        }
        _ => {
            frame.extend(rng.some_bytes(64));
            frame
        }
    }
}

struct Fixture {
    counters: PerCpuArray<MapData, DatapathCounters>,
    results: PerCpuArray<MapData, ProbeResults>,
    state: Array<MapData, ProbeState>,
    reply_index: HashMap<MapData, ReplyKey, u32>,
}

fn fixture(ebpf: &mut Ebpf) -> Fixture {
    let mut config: Array<MapData, ProbeConfig> =
        Array::try_from(ebpf.take_map(map_names::PROBE_CONFIG).unwrap()).unwrap();
    config
        .set(
            0,
            ProbeConfig {
                secret: [1, 2],
                previous_secret: [3, 4],
                local_port_min: 61000,
                local_port_max: 65535,
                agent_port: 0,
                ..Default::default()
            },
            0,
        )
        .unwrap();
    let mut reply_index: HashMap<MapData, ReplyKey, u32> =
        HashMap::try_from(ebpf.take_map(map_names::REPLY_INDEX).unwrap()).unwrap();
    let tcp: ProbeSpec = "tcp:192.0.2.2:80".parse().unwrap();
    let echo: ProbeSpec = "icmp:192.0.2.2".parse().unwrap();
    reply_index.insert(reply_key(&tcp, 61000), 0, 0).unwrap();
    reply_index.insert(reply_key(&echo, 61000), 1, 0).unwrap();
    let mut state: Array<MapData, ProbeState> =
        Array::try_from(ebpf.take_map(map_names::PROBE_STATE).unwrap()).unwrap();
    for id in [0, 1] {
        let outstanding = ProbeState {
            sent: 1,
            timed_out: 0,
            last_sent_ns: 1,
            last_reply_ns: 0,
            ..Default::default()
        };
        state.set(id, outstanding, 0).unwrap();
    }
    Fixture {
        counters: PerCpuArray::try_from(ebpf.take_map(map_names::COUNTERS).unwrap()).unwrap(),
        results: PerCpuArray::try_from(ebpf.take_map(map_names::PROBE_RESULTS).unwrap()).unwrap(),
        state,
        reply_index,
    }
}

#[test]
fn a_million_hostile_frames_pass_untouched_and_mark_nothing_up() {
    let mut ebpf = load_programs().unwrap();
    let ingress = program_fd(&ebpf, program_names::XDP_INGRESS).unwrap();
    let egress = program_fd(&ebpf, program_names::PASSIVE_EGRESS).unwrap();
    let f = fixture(&mut ebpf);
    let mut rng = Rng(SEED);
    let (mut ran, mut refused_by_kernel) = (0u64, 0u64);
    for i in 0..FRAMES {
        let built = template(&mut rng);
        let frame = mutate(&mut rng, built);
        for (program, pass, name) in [
            (&ingress, XDP_PASS, "prober_xdp"),
            (&egress, TC_ACT_UNSPEC, "passive_egress"),
        ] {
            match run_xdp(program.as_fd(), &frame, 1) {
                Ok(run) => {
                    ran += 1;
                    assert_eq!(
                        run.action, pass,
                        "{name}, seed {SEED:#x} frame {i}: verdict {} for {frame:02x?}",
                        run.action
                    );
                    assert_eq!(
                        run.frame, frame,
                        "{name}, seed {SEED:#x} frame {i}: changed"
                    );
                }
                // Shorter than the kernel accepts for this program type:
                // it never reaches the program.
                Err(_) => refused_by_kernel += 1,
            }
        }
    }
    let answered: u64 = [0u32, 1]
        .iter()
        .flat_map(|id| {
            f.results
                .get(id, 0)
                .unwrap()
                .iter()
                .map(|r| r.answered + r.refused + r.unreachable)
                .collect::<Vec<_>>()
        })
        .sum();
    assert_eq!(answered, 0, "no forged frame counted as an answer");
    for id in [0u32, 1] {
        let s = f.state.get(&id, 0).unwrap();
        assert_eq!(
            (s.sent, s.last_reply_ns),
            (1, 0),
            "PROBE_STATE {id} untouched"
        );
    }
    assert_eq!(f.reply_index.keys().count(), 2, "REPLY_INDEX untouched");
    let c = f
        .counters
        .get(&0, 0)
        .unwrap()
        .iter()
        .fold(DatapathCounters::default(), |s, c| s.saturating_add(*c));
    assert_eq!((c.replies_matched, c.resets_sent), (0, 0));
    println!(
        "{FRAMES} frames, {ran} program runs (both programs), {refused_by_kernel} too short for the kernel to run; \
         {} probe-port replies rejected, 0 matched, 0 resets, 0 answers",
        c.replies_rejected
    );
    assert!(ran >= FRAMES, "most frames reach the programs");
    assert!(
        c.replies_rejected > 0,
        "the generator reaches the cookie check"
    );
    prober_tests::record(
        "hostile packets",
        "generated and mutated frames (truncated at every offset, bad lengths and checksums, IP options, fragments, VLAN/QinQ, IPv6 extension headers, random bytes) through the ingress XDP and TC egress programs",
        FRAMES,
        &format!(
            "{ran} program runs: every verdict pass with the frame unchanged; {} forged replies to probe ports rejected by cookie, 0 matched, 0 resets, no probe marked up, probe maps untouched",
            c.replies_rejected
        ),
        "nothing",
    );
}

/// An untagged agent report (the fixture sets no key) with a random
/// sequence.
fn agent_datagram(rng: &mut Rng) -> Vec<u8> {
    let mut wire = b"PRAG\x02\x01\x00\x00\x00\x00\x00\x25\x00\x00\x00\x00".to_vec();
    wire.extend_from_slice(&rng.next().to_be_bytes());
    wire.extend_from_slice(&[0; 8]);
    wire
}

/// What a valid agent report from RS to DIRECTOR:5555 looks like, parsed
/// here independently of the eBPF code.
fn is_valid_report(frame: &[u8]) -> bool {
    frame.len() >= 14 + 20 + 8 + 32
        && frame[12..14] == [0x08, 0x00]
        && frame[14] == 0x45
        && be16(frame, 20) & 0x3fff == 0
        && frame[23] == 17
        && be16(frame, 16) == 60
        && frame[26..30] == RS
        && frame[30..34] == DIRECTOR
        && be16(frame, 36) == 5555
        && be16(frame, 38) == 40
        && frame[42..46] == *b"PRAG"
        && frame[46] == 2
        && (1..=3).contains(&frame[47])
        && frame[48..50] == [0, 0]
        && frame[54..58] == [0, 0, 0, 0]
}

#[test]
fn hostile_agent_datagrams_are_consumed_only_when_valid() {
    let (consumed, passed, refused) = agent_datagrams(None);
    assert!(consumed > 0 && passed > 0);
    assert_eq!(refused, 0, "no key: no tag is checked");
    prober_tests::record(
        "hostile packets",
        "mutated agent datagrams, from a real server and strangers (no key set)",
        consumed + passed,
        &format!("{consumed} valid reports consumed and recorded, {passed} others passed unchanged; no entry for anyone outside the pool"),
        "nothing",
    );
}

#[test]
fn with_a_key_no_forged_agent_datagram_is_consumed() {
    // The datagrams carry no tag or a mutated one: all forged.
    let (consumed, passed, refused) = agent_datagrams(Some([0x5eed, 0xc0ffee]));
    assert_eq!(consumed, 0, "a forged report was taken");
    assert!(refused > 10_000 && passed > 0, "{refused} refused");
    prober_tests::record(
        "spoofing",
        "forged agent datagrams (no or mutated tag) with a shared key set",
        consumed + passed,
        &format!("0 taken; {refused} well-formed ones refused for their tag and counted, all passed unchanged"),
        "nothing",
    );
}

/// Sends mutated agent datagrams (most from the real server, some from a
/// stranger) through the ingress program; checks every consumed one was
/// valid and recorded, every other passed unchanged. Returns the counts
/// consumed, passed, and refused for their tag.
fn agent_datagrams(key: Option<[u64; 2]>) -> (u64, u64, u64) {
    use prober_common::AgentReport;
    let mut ebpf = load_programs().unwrap();
    let ingress = program_fd(&ebpf, program_names::XDP_INGRESS).unwrap();
    let mut config: Array<MapData, ProbeConfig> =
        Array::try_from(ebpf.take_map(map_names::PROBE_CONFIG).unwrap()).unwrap();
    config
        .set(
            0,
            ProbeConfig {
                local_port_min: 61000,
                local_port_max: 65535,
                agent_port: 5555,
                agent_addr: DIRECTOR,
                agent_auth: key.is_some() as u8,
                agent_key: key.unwrap_or_default(),
                ..Default::default()
            },
            0,
        )
        .unwrap();
    let mut agents: HashMap<MapData, u32, AgentReport> =
        HashMap::try_from(ebpf.take_map(map_names::AGENTS).unwrap()).unwrap();
    agents
        .insert(u32::from_ne_bytes(RS), AgentReport::default(), 0)
        .unwrap();
    let mut rng = Rng(SEED ^ 0xa9e7);
    let (mut consumed, mut passed) = (0u64, 0u64);
    let frames = FRAMES / 5;
    for i in 0..frames {
        let built = if rng.below(4) == 0 {
            template(&mut rng)
        } else {
            // Mostly agent datagrams, from the real server or not.
            let mut wire = agent_datagram(&mut rng);
            wire[5] = 1 + rng.below(3) as u8;
            let source = if rng.below(4) == 0 {
                [198, 51, 100, 9]
            } else {
                RS
            };
            udp_frame(source, DIRECTOR, 40000, 5555, &wire, rng.below(2) == 0)
        };
        let frame = mutate(&mut rng, built);
        let Ok(run) = run_xdp(ingress.as_fd(), &frame, 1) else {
            continue;
        };
        if run.action == XDP_PASS {
            assert_eq!(run.frame, frame, "seed frame {i}: passed but changed");
            passed += 1;
        } else {
            assert_eq!(run.action, 1, "frame {i}: only XDP_DROP besides pass");
            assert!(
                is_valid_report(&frame),
                "frame {i}: consumed but not a valid report: {frame:02x?}"
            );
            consumed += 1;
        }
    }
    let entry = agents.get(&u32::from_ne_bytes(RS), 0).unwrap();
    assert_eq!(
        entry.reports, consumed,
        "every consumed report recorded, nothing else"
    );
    assert_eq!(agents.keys().count(), 1, "no entry for anyone else");
    let counters: PerCpuArray<MapData, DatapathCounters> =
        PerCpuArray::try_from(ebpf.take_map(map_names::COUNTERS).unwrap()).unwrap();
    let c = counters
        .get(&0, 0)
        .unwrap()
        .iter()
        .fold(DatapathCounters::default(), |s, c| s.saturating_add(*c));
    let refused = c.agent_unauthenticated + c.agent_replayed;
    println!(
        "{frames} frames{}: {consumed} valid reports consumed and recorded, {passed} passed unchanged, {} refused for their tag, {} as replays",
        if key.is_some() { " with a key" } else { "" },
        c.agent_unauthenticated,
        c.agent_replayed
    );
    (consumed, passed, refused)
}
