//! The datapath's part in L7 checks and agent feedback, in the real kernel
//! through BPF_PROG_TEST_RUN: agent datagrams recorded, refused and
//! counted; the VIP rewrite of direct-routing checks on the way out (TC
//! egress) and back (XDP ingress), with valid checksums, and nothing else
//! touched.

use std::os::fd::AsFd;

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::ProgramFd,
    Ebpf,
};
use prober_common::{
    agent_wire, map_names, program_names, AgentReport, DatapathCounters, DrCheckFlow, DrCheckKey,
    ProbeConfig,
};
use prober_tests::packets::*;
use prober_user::{
    agent::{encode, AgentKey, Report},
    datapath::{load_programs, program_fd},
    test_run::run_xdp,
};

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;
/// TC_ACT_UNSPEC (-1): the next filter decides.
const TC_ACT_UNSPEC: u32 = u32::MAX;
const DIRECTOR: [u8; 4] = [192, 0, 2, 1];
const RS: [u8; 4] = [192, 0, 2, 10];
const STRANGER: [u8; 4] = [198, 51, 100, 66];
const VIP: [u8; 4] = [203, 0, 113, 10];
const AGENT_PORT: u16 = 5555;
const CHECK_PORT: u16 = 60_005;

struct Fixture {
    _ebpf: Ebpf,
    ingress: ProgramFd,
    egress: ProgramFd,
    agents: HashMap<MapData, u32, AgentReport>,
    counters: PerCpuArray<MapData, DatapathCounters>,
}

fn fixture(agent_port: u16) -> Fixture {
    fixture_with_key(agent_port, None)
}

fn fixture_with_key(agent_port: u16, key: Option<AgentKey>) -> Fixture {
    fixture_with_window(agent_port, key, 0..=u64::MAX)
}

/// `window`: the sequences the director's clock accepts now.
fn fixture_with_window(
    agent_port: u16,
    key: Option<AgentKey>,
    window: std::ops::RangeInclusive<u64>,
) -> Fixture {
    let mut ebpf = load_programs().unwrap();
    let ingress = program_fd(&ebpf, program_names::XDP_INGRESS).unwrap();
    let egress = program_fd(&ebpf, program_names::PASSIVE_EGRESS).unwrap();
    let mut config: Array<MapData, ProbeConfig> =
        Array::try_from(ebpf.take_map(map_names::PROBE_CONFIG).unwrap()).unwrap();
    config
        .set(
            0,
            ProbeConfig {
                local_port_min: 61000,
                local_port_max: 65535,
                agent_port,
                agent_addr: DIRECTOR,
                agent_auth: key.is_some() as u8,
                agent_key: key.map_or([0; 2], |k| k.0),
                agent_sequence_min: *window.start(),
                agent_sequence_max: *window.end(),
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
    let mut checks: HashMap<MapData, DrCheckKey, DrCheckFlow> =
        HashMap::try_from(ebpf.take_map(map_names::DR_CHECKS).unwrap()).unwrap();
    for (protocol, remote_port) in [(6u8, 80u16), (17, 53)] {
        checks
            .insert(
                DrCheckKey {
                    local_addr: DIRECTOR,
                    local_port: CHECK_PORT.to_be(),
                    remote_port: remote_port.to_be(),
                    protocol,
                    _pad: [0; 3],
                },
                DrCheckFlow {
                    real_server: RS,
                    vip: VIP,
                },
                0,
            )
            .unwrap();
    }
    let counters = PerCpuArray::try_from(ebpf.take_map(map_names::COUNTERS).unwrap()).unwrap();
    Fixture {
        _ebpf: ebpf,
        ingress,
        egress,
        agents,
        counters,
    }
}

impl Fixture {
    fn rx(&self, frame: &[u8]) -> (u32, Vec<u8>) {
        let run = run_xdp(self.ingress.as_fd(), frame, 1).unwrap();
        (run.action, run.frame)
    }

    fn tx(&self, frame: &[u8]) -> Vec<u8> {
        let run = run_xdp(self.egress.as_fd(), frame, 1).unwrap();
        assert_eq!(run.action, TC_ACT_UNSPEC, "egress lets every packet go on");
        run.frame
    }

    fn agent(&self) -> AgentReport {
        self.agents.get(&u32::from_ne_bytes(RS), 0).unwrap()
    }

    fn counters(&self) -> DatapathCounters {
        self.counters
            .get(&0, 0)
            .unwrap()
            .iter()
            .fold(DatapathCounters::default(), |s, c| s.saturating_add(*c))
    }
}

fn report(state: u8, weight: u32, sequence: u64) -> [u8; agent_wire::LEN] {
    signed(state, weight, sequence, None, RS)
}

fn signed(
    state: u8,
    weight: u32,
    sequence: u64,
    key: Option<AgentKey>,
    source: [u8; 4],
) -> [u8; agent_wire::LEN] {
    let director = (std::net::Ipv4Addr::from(DIRECTOR), AGENT_PORT).into();
    encode(
        Report { state, weight },
        sequence,
        key,
        source.into(),
        director,
    )
}

#[test]
fn agent_reports_from_real_servers_are_recorded_and_consumed() {
    let f = fixture(AGENT_PORT);
    let datagram = report(agent_wire::STATE_UP, 37, 9);
    let (action, _) = f.rx(&udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &datagram, true));
    assert_eq!(action, XDP_DROP, "an agent report is ours: consumed");
    let entry = f.agent();
    assert_eq!(
        (entry.state, entry.weight, entry.sequence, entry.reports),
        (agent_wire::STATE_UP, 37, 9, 1)
    );
    assert!(entry.last_ns > 0);
    let drain = report(agent_wire::STATE_DRAIN, 0, 10);
    f.rx(&udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &drain, false));
    assert_eq!(
        (f.agent().state, f.agent().reports),
        (agent_wire::STATE_DRAIN, 2)
    );
    let c = f.counters();
    assert_eq!(
        (c.agent_reports, c.agent_malformed, c.agent_unknown),
        (2, 0, 0)
    );
}

#[test]
fn strangers_and_malformed_datagrams_are_refused_counted_and_passed() {
    let f = fixture(AGENT_PORT);
    let good = report(agent_wire::STATE_DOWN, 5, 1);
    let stranger = udp_frame(STRANGER, DIRECTOR, 40000, AGENT_PORT, &good, true);
    assert_eq!(
        f.rx(&stranger),
        (XDP_PASS, stranger.clone()),
        "not a report of ours: passed untouched"
    );
    assert!(
        f.agents.get(&u32::from_ne_bytes(STRANGER), 0).is_err(),
        "no entry for an address outside the pool"
    );
    let mut malformed: Vec<Vec<u8>> = Vec::new();
    for (at, value) in [
        (0, b'X'),
        (4, 1),
        (5, 0),
        (5, 4),
        (6, 1),
        (7, 1),
        (12, 1),
        (15, 1),
    ] {
        let mut bad = good;
        bad[at] = value;
        malformed.push(bad.to_vec());
    }
    for len in 0..48 {
        if len != agent_wire::LEN {
            malformed.push(good.iter().copied().cycle().take(len).collect());
        }
    }
    for bad in &malformed {
        let frame = udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, bad, true);
        assert_eq!(f.rx(&frame), (XDP_PASS, frame.clone()), "{bad:?}");
    }
    let c = f.counters();
    assert_eq!(
        (c.agent_reports, c.agent_malformed, c.agent_unknown),
        (0, malformed.len() as u64, 1)
    );
    assert_eq!(f.agent(), AgentReport::default(), "nothing recorded");
    // Truncated frames (the UDP header cut short) are no agent report.
    let frame = udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &good, true);
    for len in 34..frame.len() {
        assert_eq!(f.rx(&frame[..len]).0, XDP_PASS, "length {len}");
    }
    assert_eq!(f.agent(), AgentReport::default());
}

#[test]
fn other_udp_and_a_disabled_agent_port_pass_untouched() {
    let f = fixture(AGENT_PORT);
    let datagram = report(agent_wire::STATE_UP, 37, 9);
    let other = udp_frame(RS, DIRECTOR, 40000, 53, &datagram, true);
    assert_eq!(f.rx(&other), (XDP_PASS, other.clone()));
    // The agent port of another address (a UDP virtual service, say).
    let to_vip = udp_frame(RS, VIP, 40000, AGENT_PORT, &datagram, true);
    assert_eq!(f.rx(&to_vip), (XDP_PASS, to_vip.clone()));
    assert_eq!(f.agent(), AgentReport::default());
    let off = fixture(0);
    let to_port = udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &datagram, true);
    assert_eq!(off.rx(&to_port), (XDP_PASS, to_port.clone()));
    assert_eq!(off.agent(), AgentReport::default());
}

const KEY: AgentKey = AgentKey([0x0123_4567_89ab_cdef, 0xfedc_ba98_7654_3210]);

#[test]
fn with_a_key_only_tagged_fresh_reports_count_and_forgeries_are_refused() {
    let f = fixture_with_key(AGENT_PORT, Some(KEY));
    let frame = |wire: &[u8]| udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, wire, true);
    let good = signed(agent_wire::STATE_UP, 37, 1000, Some(KEY), RS);
    assert_eq!(f.rx(&frame(&good)).0, XDP_DROP, "a tagged report is taken");
    assert_eq!((f.agent().weight, f.agent().sequence), (37, 1000));

    // What an off-path attacker can send: reports from the real server's
    // address with no tag, a tag under another key, a tag made for another
    // sender, any one bit of a good report flipped.
    let other_key = AgentKey([1, 2]);
    let mut forged = vec![
        signed(agent_wire::STATE_DOWN, 0, 2000, None, RS),
        signed(agent_wire::STATE_DOWN, 0, 2000, Some(other_key), RS),
        signed(agent_wire::STATE_DOWN, 0, 2000, Some(KEY), STRANGER),
    ];
    let template = signed(agent_wire::STATE_UP, 1, 3000, Some(KEY), RS);
    for byte in [8, 9, 10, 11, 16, 20, 23, 24, 27, 31] {
        for bit in 0..8 {
            let mut flipped = template;
            flipped[byte] ^= 1 << bit;
            forged.push(flipped);
        }
    }
    for bad in &forged {
        let sent = frame(bad);
        assert_eq!(f.rx(&sent), (XDP_PASS, sent.clone()), "{bad:02x?}");
    }
    // A captured report sent again, and an older one: replays.
    let older = signed(agent_wire::STATE_DOWN, 0, 999, Some(KEY), RS);
    for replay in [good, older] {
        let sent = frame(&replay);
        assert_eq!(f.rx(&sent), (XDP_PASS, sent.clone()));
    }
    let entry = f.agent();
    assert_eq!(
        (entry.state, entry.weight, entry.sequence, entry.reports),
        (agent_wire::STATE_UP, 37, 1000, 1),
        "nothing refused moved the recorded report"
    );
    let c = f.counters();
    assert_eq!(
        (c.agent_reports, c.agent_unauthenticated, c.agent_replayed),
        (1, forged.len() as u64, 2)
    );
    // The next report of the real agent is taken.
    let next = signed(agent_wire::STATE_DRAIN, 0, 1001, Some(KEY), RS);
    assert_eq!(f.rx(&frame(&next)).0, XDP_DROP);
    assert_eq!(
        (f.agent().state, f.agent().reports),
        (agent_wire::STATE_DRAIN, 2)
    );
    println!(
        "{} forged and 2 replayed reports refused and counted; 2 tagged reports taken",
        forged.len()
    );
    prober_tests::record(
        "spoofing",
        "agent reports from a real server's address: untagged, another key's tag, another sender's tag, every bit of weight, sequence and tag flipped; replayed and older reports",
        forged.len() as u64 + 2,
        &format!(
            "{} refused as unauthenticated, 2 as replays, all counted; the recorded report never moved",
            forged.len()
        ),
        "nothing",
    );
}

/// Even the first report after the director (re)started, with no last
/// sequence to compare to, must be within a minute of the director's
/// clock: an old captured report is refused, and so is one from a clock
/// far ahead (which would otherwise lock the agent out).
#[test]
fn with_a_key_sequences_outside_the_clock_window_are_refused() {
    let f = fixture_with_window(AGENT_PORT, Some(KEY), 5_000..=9_000);
    let frame = |sequence: u64| {
        let wire = signed(agent_wire::STATE_UP, 30, sequence, Some(KEY), RS);
        udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &wire, true)
    };
    for stale_or_ahead in [1, 4_999, 9_001, u64::MAX] {
        let sent = frame(stale_or_ahead);
        assert_eq!(f.rx(&sent), (XDP_PASS, sent.clone()), "{stale_or_ahead}");
    }
    assert_eq!(f.agent(), AgentReport::default(), "nothing recorded");
    assert_eq!(f.rx(&frame(5_000)).0, XDP_DROP);
    assert_eq!(f.rx(&frame(9_000)).0, XDP_DROP);
    let c = f.counters();
    assert_eq!((c.agent_reports, c.agent_replayed), (2, 4));
}

#[test]
fn without_a_key_tags_and_sequences_are_not_checked() {
    let f = fixture(AGENT_PORT);
    let tagged = signed(agent_wire::STATE_UP, 40, 5, Some(KEY), RS);
    let frame = udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &tagged, true);
    assert_eq!(f.rx(&frame).0, XDP_DROP);
    let older = report(agent_wire::STATE_UP, 41, 4);
    let frame = udp_frame(RS, DIRECTOR, 40000, AGENT_PORT, &older, true);
    assert_eq!(f.rx(&frame).0, XDP_DROP);
    assert_eq!((f.agent().weight, f.agent().reports), (41, 2));
}

fn tcp_segment(src: [u8; 4], dst: [u8; 4], src_port: u16, dst_port: u16) -> Vec<u8> {
    tcp_frame(
        src,
        dst,
        &Tcp {
            src_port,
            dst_port,
            seq: 1000,
            ack: 2000,
            flags: ACK,
            options: &[],
        },
    )
}

fn addresses(frame: &[u8]) -> ([u8; 4], [u8; 4]) {
    (
        frame[26..30].try_into().unwrap(),
        frame[30..34].try_into().unwrap(),
    )
}

#[test]
fn direct_routing_checks_reach_the_vip_and_answers_come_back_from_the_real_server() {
    let f = fixture(AGENT_PORT);
    // Out: the check connects to the real server; it leaves for the VIP.
    let out = f.tx(&tcp_segment(DIRECTOR, RS, CHECK_PORT, 80));
    assert_eq!(addresses(&out), (DIRECTOR, VIP));
    assert!(checksums_valid(&out), "TCP out: {out:?}");
    let out = f.tx(&udp_frame(DIRECTOR, RS, CHECK_PORT, 53, b"query", true));
    assert_eq!(addresses(&out), (DIRECTOR, VIP));
    assert!(checksums_valid(&out), "UDP out");

    // Back: the answer from the VIP reaches the socket as from the server.
    let (action, back) = f.rx(&tcp_segment(VIP, DIRECTOR, 80, CHECK_PORT));
    assert_eq!(action, XDP_PASS);
    assert_eq!(addresses(&back), (RS, DIRECTOR));
    assert!(checksums_valid(&back), "TCP back");
    let (_, back) = f.rx(&udp_frame(VIP, DIRECTOR, 53, CHECK_PORT, b"answer", true));
    assert_eq!(addresses(&back), (RS, DIRECTOR));
    assert!(checksums_valid(&back), "UDP back");
    let (_, back) = f.rx(&udp_frame(VIP, DIRECTOR, 53, CHECK_PORT, b"answer", false));
    assert_eq!(be16(&back, 40), 0, "no UDP checksum stays none");
    assert_eq!(addresses(&back), (RS, DIRECTOR));
}

#[test]
fn only_registered_check_connections_are_rewritten() {
    let f = fixture(AGENT_PORT);
    let untouched_out = [
        tcp_segment(DIRECTOR, RS, CHECK_PORT + 1, 80), // port not registered
        tcp_segment(DIRECTOR, STRANGER, CHECK_PORT, 80), // another destination
        tcp_segment(DIRECTOR, RS, CHECK_PORT, 8080),   // another remote port
        tcp_segment(STRANGER, RS, CHECK_PORT, 80),     // forwarded, not ours
        tcp_segment(DIRECTOR, RS, 40000, 80),          // not a check port
    ];
    for frame in &untouched_out {
        assert_eq!(&f.tx(frame), frame);
    }
    let untouched_in = [
        tcp_segment(VIP, DIRECTOR, 80, CHECK_PORT + 1),
        tcp_segment(STRANGER, DIRECTOR, 80, CHECK_PORT),
        tcp_segment(VIP, DIRECTOR, 8080, CHECK_PORT),
        tcp_segment(VIP, STRANGER, 80, CHECK_PORT), // a DR reply to a client
        tcp_segment(VIP, DIRECTOR, 80, 40000),
    ];
    for frame in &untouched_in {
        assert_eq!(f.rx(frame), (XDP_PASS, frame.clone()));
    }
    // Truncated at every length: passed, never rewritten past the data.
    let frame = tcp_segment(VIP, DIRECTOR, 80, CHECK_PORT);
    for len in 14..frame.len() {
        let (action, _) = f.rx(&frame[..len]);
        assert_eq!(action, XDP_PASS, "length {len}");
    }
}
