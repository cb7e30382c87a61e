//! The passive-measurement programs in the real kernel through
//! BPF_PROG_TEST_RUN: the TC egress classifier on forwarded client packets,
//! the ingress XDP program on the real server's answers.

use std::{os::fd::AsFd, thread, time::Duration};

use aya::{
    maps::{Array, HashMap, MapData, PerCpuArray},
    programs::ProgramFd,
    Ebpf,
};
use prober_common::{
    family, flow_flags, map_names, program_names, FlowKey, FlowState, PassiveStats, ServerKey,
};
use prober_tests::packets::*;
use prober_user::{
    datapath::{load_programs, program_fd},
    probe::addr16,
    test_run::run_xdp,
};

/// TC_ACT_UNSPEC (-1): the next filter decides.
const TC_ACT_UNSPEC: u32 = u32::MAX;
const XDP_PASS: u32 = 2;
const CLIENT: [u8; 4] = [198, 51, 100, 7];
const RS: [u8; 4] = [192, 0, 2, 10];
const OTHER_RS: [u8; 4] = [192, 0, 2, 11];
const CLIENT_PORT: u16 = 40000;
const RS_PORT: u16 = 80;
const SERVER_ID: u32 = 3;

struct Fixture {
    _ebpf: Ebpf,
    egress: ProgramFd,
    ingress: ProgramFd,
    flows: HashMap<MapData, FlowKey, FlowState>,
    stats: PerCpuArray<MapData, PassiveStats>,
    seen: Array<MapData, u8>,
}

fn fixture() -> Fixture {
    let mut ebpf = load_programs().unwrap();
    let egress = program_fd(&ebpf, program_names::PASSIVE_EGRESS).unwrap();
    let ingress = program_fd(&ebpf, program_names::XDP_INGRESS).unwrap();
    let mut servers: HashMap<MapData, ServerKey, u32> =
        HashMap::try_from(ebpf.take_map(map_names::PASSIVE_SERVERS).unwrap()).unwrap();
    let mut ports: Array<MapData, u64> =
        Array::try_from(ebpf.take_map(map_names::PASSIVE_PORTS).unwrap()).unwrap();
    let flows = HashMap::try_from(ebpf.take_map(map_names::PASSIVE_FLOWS).unwrap()).unwrap();
    let stats = PerCpuArray::try_from(ebpf.take_map(map_names::PASSIVE_STATS).unwrap()).unwrap();
    let seen = Array::try_from(ebpf.take_map(map_names::PASSIVE_SEEN).unwrap()).unwrap();
    servers
        .insert(
            ServerKey {
                addr: addr16(RS.into()),
                port: RS_PORT.to_be(),
                family: family::IPV4,
                _pad: 0,
            },
            SERVER_ID,
            0,
        )
        .unwrap();
    ports
        .set(RS_PORT as u32 / 64, 1u64 << (RS_PORT % 64), 0)
        .unwrap();
    Fixture {
        _ebpf: ebpf,
        egress,
        ingress,
        flows,
        stats,
        seen,
    }
}

impl Fixture {
    /// A client packet forwarded to the real server, through TC egress.
    fn out(&self, frame: &[u8]) {
        let run = run_xdp(self.egress.as_fd(), frame, 1).unwrap();
        assert_eq!(
            run.action, TC_ACT_UNSPEC,
            "egress hands every packet on to the next filter"
        );
        assert_eq!(run.frame, frame, "egress never changes a packet");
    }

    /// The real server's packet, through the ingress program.
    fn back(&self, frame: &[u8]) {
        let run = run_xdp(self.ingress.as_fd(), frame, 1).unwrap();
        assert_eq!(run.action, XDP_PASS, "real server traffic always passes");
        assert_eq!(run.frame, frame);
    }

    fn stats(&self) -> PassiveStats {
        self.stats
            .get(&SERVER_ID, 0)
            .unwrap()
            .iter()
            .fold(PassiveStats::default(), |mut s, c| {
                s.handshakes += c.handshakes;
                s.handshake_rtt_sum_ns += c.handshake_rtt_sum_ns;
                s.responses += c.responses;
                s.response_time_sum_ns += c.response_time_sum_ns;
                s.resets += c.resets;
                s.syn_retransmits += c.syn_retransmits;
                for (a, b) in s.handshake_log2_us.iter_mut().zip(c.handshake_log2_us) {
                    *a += b;
                }
                s
            })
    }

    /// The servers the datapath marked seen (a sample to read).
    fn seen(&self) -> Vec<u32> {
        (0..8)
            .filter(|&id| self.seen.get(&id, 0).unwrap() != 0)
            .collect()
    }

    fn flow(&self) -> Option<FlowState> {
        self.flows.get(&key(RS, CLIENT_PORT), 0).ok()
    }
}

fn key(server: [u8; 4], client_port: u16) -> FlowKey {
    FlowKey {
        server_addr: addr16(server.into()),
        client_addr: addr16(CLIENT.into()),
        server_port: RS_PORT.to_be(),
        client_port: client_port.to_be(),
        family: family::IPV4,
        _pad: [0; 3],
    }
}

fn to_server(server: [u8; 4], flags: u8, payload: usize) -> Vec<u8> {
    segment(CLIENT, server, CLIENT_PORT, RS_PORT, flags, payload)
}

fn from_server(flags: u8, payload: usize) -> Vec<u8> {
    segment(RS, CLIENT, RS_PORT, CLIENT_PORT, flags, payload)
}

fn segment(
    src: [u8; 4],
    dst: [u8; 4],
    sport: u16,
    dport: u16,
    flags: u8,
    payload: usize,
) -> Vec<u8> {
    let mut tcp_bytes = tcp(
        src,
        dst,
        &Tcp {
            src_port: sport,
            dst_port: dport,
            // The server's sequence numbers from 1000, the client's from
            // 1: a client's ACK acknowledges the SYN-ACK.
            seq: if sport == RS_PORT { 1000 } else { 1 },
            ack: if sport == RS_PORT { 1 } else { 1001 },
            flags,
            options: &[],
        },
    );
    tcp_bytes.extend(std::iter::repeat_n(b'x', payload));
    ethernet(MAC_B, MAC_A, 0x0800, &ipv4(src, dst, 6, 0, &[], &tcp_bytes))
}

const FIN: u8 = 0x01;
const PSH: u8 = 0x08;

#[test]
fn handshake_rtt_is_syn_forwarded_to_syn_ack_back() {
    let f = fixture();
    f.out(&to_server(RS, SYN, 0));
    assert!(f.flow().is_some(), "the SYN opened a flow");
    thread::sleep(Duration::from_millis(3));
    f.back(&from_server(SYN | ACK, 0));
    let s = f.stats();
    assert_eq!(s.handshakes, 1);
    let rtt_ms = s.handshake_rtt_sum_ns as f64 / 1e6;
    assert!(
        (3.0..50.0).contains(&rtt_ms),
        "handshake RTT {rtt_ms} ms, 3 ms imposed"
    );
    assert_eq!(s.handshake_log2_us.iter().sum::<u64>(), 1);
    // A second SYN-ACK (retransmitted by the server) is not a new sample.
    f.back(&from_server(SYN | ACK, 0));
    assert_eq!(f.stats().handshakes, 1);
}

#[test]
fn clients_on_the_ports_of_direct_routing_checks_are_measured_too() {
    // 60000-60999 are also ordinary client ports: without a check
    // registered there, the flow is measured like any other.
    let f = fixture();
    let client_port = 60_500;
    f.out(&segment(CLIENT, RS, client_port, RS_PORT, SYN, 0));
    f.back(&segment(RS, CLIENT, RS_PORT, client_port, SYN | ACK, 0));
    assert_eq!(f.stats().handshakes, 1);
}

/// A blind sender (spoofed client address, no view of the real server's
/// answers) cannot turn flows into connections: its ACK does not
/// acknowledge the SYN-ACK, so nothing it sends is timed and no connection
/// table entry is spent on it.
#[test]
fn an_ack_not_acknowledging_the_syn_ack_makes_no_connection() {
    let f = fixture();
    f.out(&to_server(RS, SYN, 0));
    f.back(&from_server(SYN | ACK, 0));
    let blind = |ack: u32, flags: u8, payload: usize| {
        let mut bytes = tcp(
            CLIENT,
            RS,
            &Tcp {
                src_port: CLIENT_PORT,
                dst_port: RS_PORT,
                seq: 1,
                ack,
                flags,
                options: &[],
            },
        );
        bytes.extend(std::iter::repeat_n(b'x', payload));
        ethernet(MAC_B, MAC_A, 0x0800, &ipv4(CLIENT, RS, 6, 0, &[], &bytes))
    };
    for guess in [0, 1, 1000, 1002, 0xdead_beef] {
        f.out(&blind(guess, ACK, 0));
        f.out(&blind(guess, ACK | PSH, 100));
    }
    f.back(&from_server(ACK | PSH, 1400));
    assert_eq!(f.stats().responses, 0, "a blind ACK made a connection");
    // The real client's ACK (1001: the server's 1000 + 1) does.
    f.out(&to_server(RS, ACK | PSH, 100));
    f.back(&from_server(ACK | PSH, 1400));
    assert_eq!(f.stats().responses, 1);
}

#[test]
fn first_response_byte_after_each_request() {
    let f = fixture();
    f.out(&to_server(RS, SYN, 0));
    f.back(&from_server(SYN | ACK, 0));
    f.out(&to_server(RS, ACK, 0));
    f.out(&to_server(RS, ACK | PSH, 120)); // the request
    thread::sleep(Duration::from_millis(5));
    f.back(&from_server(ACK, 0)); // a bare ACK is no response
    assert_eq!(f.stats().responses, 0);
    f.back(&from_server(ACK | PSH, 1400)); // first response byte
    f.back(&from_server(ACK | PSH, 1400)); // more of the same response
    let s = f.stats();
    assert_eq!(s.responses, 1);
    let ms = s.response_time_sum_ns as f64 / 1e6;
    assert!(
        (5.0..50.0).contains(&ms),
        "first byte after {ms} ms, 5 ms imposed"
    );
    // Keep-alive: the next request is timed on its own.
    f.out(&to_server(RS, ACK | PSH, 80));
    f.back(&from_server(ACK | PSH, 500));
    assert_eq!(f.stats().responses, 2);
}

#[test]
fn a_resent_syn_gives_no_handshake_sample_and_is_counted() {
    let f = fixture();
    f.out(&to_server(RS, SYN, 0));
    f.out(&to_server(RS, SYN, 0));
    f.back(&from_server(SYN | ACK, 0));
    let s = f.stats();
    assert_eq!(
        (s.syn_retransmits, s.handshakes),
        (1, 0),
        "Karn: an ambiguous RTT is no sample"
    );
}

#[test]
fn server_resets_are_counted_and_fin_or_rst_end_the_flow() {
    let f = fixture();
    f.out(&to_server(RS, SYN, 0));
    f.back(&from_server(RST | ACK, 0));
    assert_eq!(f.stats().resets, 1);
    assert!(f.flow().is_none());
    f.out(&to_server(RS, SYN, 0));
    f.out(&to_server(RS, FIN | ACK, 0));
    assert!(f.flow().is_none(), "the client's FIN ended the flow");
}

#[test]
fn a_sample_marks_its_server_seen_and_foreign_traffic_marks_nothing() {
    let mut f = fixture();
    // Answers with no flow behind them, an untracked server: nothing.
    f.back(&from_server(SYN | ACK, 0));
    f.out(&to_server(OTHER_RS, SYN, 0));
    assert_eq!(f.seen(), Vec::<u32>::new());
    f.out(&to_server(RS, SYN, 0));
    f.back(&from_server(SYN | ACK, 0));
    assert_eq!(f.stats().handshakes, 1);
    assert_eq!(f.seen(), vec![SERVER_ID], "only the sampled server");
    // Userspace clears the flag after reading; the next sample sets it.
    f.seen.set(SERVER_ID, 0, 0).unwrap();
    f.out(&to_server(RS, ACK, 0));
    f.out(&to_server(RS, ACK | PSH, 100));
    f.back(&from_server(ACK | PSH, 100));
    assert_eq!(f.stats().responses, 1);
    assert_eq!(f.seen(), vec![SERVER_ID]);
}

#[test]
fn out_of_order_and_foreign_packets_take_no_sample() {
    let f = fixture();
    // Answers with no flow behind them.
    f.back(&from_server(SYN | ACK, 0));
    f.back(&from_server(ACK | PSH, 100));
    // A response before any request.
    f.out(&to_server(RS, SYN, 0));
    f.back(&from_server(SYN | ACK, 0));
    f.back(&from_server(ACK | PSH, 100));
    let s = f.stats();
    assert_eq!((s.handshakes, s.responses), (1, 0));
    // An untracked server on a tracked port, and UDP, open no flow.
    f.out(&to_server(OTHER_RS, SYN, 0));
    assert!(f.flows.get(&key(OTHER_RS, CLIENT_PORT), 0).is_err());
    let udp = ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(CLIENT, RS, 17, 0, &[], &[0x9c, 0x40, 0, 80, 0, 8, 0, 0]),
    );
    f.out(&udp);
    f.back(&udp);
}

#[test]
fn truncated_packets_pass_untouched_at_every_length() {
    let f = fixture();
    let syn = to_server(RS, SYN, 0);
    let data = from_server(ACK | PSH, 40);
    // The kernel hands TC no IPv4 skb shorter than an IP header (its test
    // run refuses one too): cut the TCP header at every length.
    for len in 14 + 20..syn.len() {
        f.out(&syn[..len]);
    }
    for len in 14..data.len() - 1 {
        f.back(&data[..len]);
    }
    assert!(f.flow().is_none(), "no flow from a truncated SYN");
}

#[test]
fn a_full_flow_table_evicts_old_flows_without_corrupting_others() {
    let mut f = fixture();
    // Fill the table from userspace with other clients' flows.
    let filler = FlowState {
        syn_ns: 1,
        request_ns: 0,
        server_id: SERVER_ID,
        flags: flow_flags::HANDSHAKE_DONE,
    };
    for i in 0..prober_common::MAX_PASSIVE_FLOWS {
        let mut k = key(RS, 1);
        k.client_addr[4..8].copy_from_slice(&i.to_ne_bytes());
        f.flows.insert(k, filler, 0).unwrap();
    }
    // A real flow through the programs still works end to end.
    f.out(&to_server(RS, SYN, 0));
    assert!(f.flow().is_some(), "the new flow replaced an old one");
    f.back(&from_server(SYN | ACK, 0));
    assert_eq!(f.stats().handshakes, 1);
    // Entries that survived are intact.
    let survivors: Vec<FlowState> = f
        .flows
        .iter()
        .filter_map(Result::ok)
        .map(|(_, v)| v)
        .collect();
    assert!(survivors.len() as u32 <= prober_common::MAX_PASSIVE_FLOWS);
    assert!(survivors
        .iter()
        .filter(|v| v.syn_ns == 1)
        .all(|v| *v == filler));
}
