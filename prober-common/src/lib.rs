//! Types shared by the eBPF programs and the userspace daemon.
//!
//! Rules for map keys and values: `#[repr(C)]`, fixed-size integer fields
//! only (no bool, Option or enum: small integer codes instead), explicit
//! padding fields so that no byte is left uninitialised (the verifier and
//! `bpftool` see every byte), and `aya::Pod` implemented behind the `user`
//! feature. Addresses are 16 bytes everywhere (IPv4 in the first 4) so IPv6
//! needs no new layouts.
#![no_std]

pub mod cookie;
mod passive;
mod verdict;

pub use passive::*;
pub use verdict::*;

/// Directory under bpffs where prober pins its maps.
pub const PIN_DIR: &str = "/sys/fs/bpf/prober";

/// Names of the maps in the eBPF object; a pinned map's file has the same name.
pub mod map_names {
    /// Per-CPU [`DatapathCounters`](crate::DatapathCounters).
    pub const COUNTERS: &str = "COUNTERS";
    /// Target id -> [`ProbeTarget`](crate::ProbeTarget): how to build its probe.
    pub const PROBE_TARGETS: &str = "PROBE_TARGETS";
    /// [`ReplyKey`](crate::ReplyKey) -> target id: which target a reply answers.
    pub const REPLY_INDEX: &str = "REPLY_INDEX";
    /// Target id -> [`ProbeState`](crate::ProbeState): send times and counts.
    pub const PROBE_STATE: &str = "PROBE_STATE";
    /// Target id -> [`Expectation`](crate::Expectation): what userspace
    /// holds of each target, written only by userspace.
    pub const PROBE_EXPECT: &str = "PROBE_EXPECT";
    /// Ring buffer of [`ProbeEvent`](crate::ProbeEvent)s: the outcomes
    /// that go against what userspace expects, and latency moves.
    pub const PROBE_EVENTS: &str = "PROBE_EVENTS";
    /// Target id -> per-CPU [`ProbeResults`](crate::ProbeResults).
    pub const PROBE_RESULTS: &str = "PROBE_RESULTS";
    /// Target id -> per-CPU [`RttHistogram`](crate::RttHistogram).
    pub const PROBE_RTT: &str = "PROBE_RTT";
    /// Slot 0: [`ProbeConfig`](crate::ProbeConfig) (secrets, local port range).
    pub const PROBE_CONFIG: &str = "PROBE_CONFIG";
    /// Index -> target id: the send wheel, every target once, ordered by
    /// the slot of the interval it is sent in; a slot's run is a range.
    pub const PROBE_BATCH: &str = "PROBE_BATCH";
    /// Slot 0: [`BatchCursor`](crate::BatchCursor) of the batch being sent.
    pub const BATCH_CURSOR: &str = "BATCH_CURSOR";
    /// [`WeightKey`](crate::WeightKey) -> [`WeightRecord`](crate::WeightRecord):
    /// the controller's memory of each destination, kept across restarts.
    pub const WEIGHT_STATE: &str = "WEIGHT_STATE";
    /// [`HealthKey`](crate::HealthKey) -> [`HealthRecord`](crate::HealthRecord):
    /// each probe's health and latency, kept across restarts.
    pub const HEALTH_STATE: &str = "HEALTH_STATE";
    /// [`ServerKey`](crate::ServerKey) -> server id: the real servers whose
    /// traffic is measured passively (NAT destinations), filled by userspace.
    pub const PASSIVE_SERVERS: &str = "PASSIVE_SERVERS";
    /// Slot port / 64: bit port % 64 set when some tracked server uses that
    /// port, so untracked traffic is told apart with one array read.
    pub const PASSIVE_PORTS: &str = "PASSIVE_PORTS";
    /// LRU [`FlowKey`](crate::FlowKey) -> [`FlowState`](crate::FlowState):
    /// half-open flows (SYN seen, the client's ACK not yet).
    pub const PASSIVE_FLOWS: &str = "PASSIVE_FLOWS";
    /// LRU [`FlowKey`](crate::FlowKey) -> [`FlowState`](crate::FlowState):
    /// connections whose client answered the SYN-ACK, apart from the
    /// half-open ones so that a SYN flood cannot evict them.
    pub const PASSIVE_CONNS: &str = "PASSIVE_CONNS";
    /// Server id -> per-CPU [`PassiveStats`](crate::PassiveStats).
    pub const PASSIVE_STATS: &str = "PASSIVE_STATS";
    /// Server id -> 1 when a sample was taken since userspace last looked
    /// (it clears them): only those servers' statistics are read.
    pub const PASSIVE_SEEN: &str = "PASSIVE_SEEN";
    /// Slot 0: [`IpvsChanges`](crate::IpvsChanges), IPVS configuration
    /// changes made by other processes.
    pub const IPVS_CHANGES: &str = "IPVS_CHANGES";
    /// [`DrCheckKey`](crate::DrCheckKey) -> [`DrCheckFlow`](crate::DrCheckFlow):
    /// connections of L7 checks to the VIP on a direct-routing real server,
    /// filled by userspace for each check's life.
    pub const DR_CHECKS: &str = "DR_CHECKS";
    /// IPv4 address (network order) -> [`AgentReport`](crate::AgentReport):
    /// the last report of each real server's agent. Userspace creates one
    /// entry per real server; reports from other addresses are refused.
    pub const AGENTS: &str = "AGENTS";
    /// Slot [`SEND_PATH_PROBE_TX`](crate::SEND_PATH_PROBE_TX): `probe_tx`,
    /// which `prober_xdp` tail-calls for the daemon's send requests.
    pub const SEND_PATH: &str = "SEND_PATH";
}

/// `SEND_PATH`'s slot of `probe_tx`.
pub const SEND_PATH_PROBE_TX: u32 = 0;

/// The ingress interface a test run without a device gets (the loopback,
/// the first interface of every network namespace): a frame with it at
/// `prober_xdp` is the daemon's send request, never one off the wire of
/// the probing interface.
pub const SEND_REQUEST_IFINDEX: u32 = 1;

/// Names of the programs in the eBPF object.
pub mod program_names {
    /// Ingress XDP program of the director's interface: counts, matches probe
    /// replies, passes everything else.
    pub const XDP_INGRESS: &str = "prober_xdp";
    /// XDP program that writes one probe frame per run and redirects it
    /// out: tail-called by `prober_xdp` for the daemon's send requests
    /// (BPF_PROG_TEST_RUN with live frames).
    pub const PROBE_TX: &str = "probe_tx";
    /// TC egress classifier of the director's interface: notes when
    /// forwarded SYNs and requests leave for tracked real servers.
    pub const PASSIVE_EGRESS: &str = "passive_egress";
    /// kretprobe on IPVS's generic netlink configuration call (ipvsadm,
    /// keepalived): counts the changes other processes make.
    pub const IPVS_CHANGED_NETLINK: &str = "ipvs_changed_netlink";
    /// kretprobe on IPVS's setsockopt configuration call (older tools).
    pub const IPVS_CHANGED_SOCKOPT: &str = "ipvs_changed_sockopt";
}

/// The kernel functions through which IPVS's configuration changes, as
/// (program, function): hooked on return, once the change is in place.
pub const IPVS_CONFIG_CALLS: [(&str, &str); 2] = [
    (program_names::IPVS_CHANGED_NETLINK, "ip_vs_genl_set_cmd"),
    (program_names::IPVS_CHANGED_SOCKOPT, "do_ip_vs_set_ctl"),
];

/// Capacity of each passive flow table, half-open and connections (LRU:
/// the oldest flows go first).
pub const MAX_PASSIVE_FLOWS: u32 = 262_144;

/// Capacity of the tracked real-server set.
pub const MAX_PASSIVE_SERVERS: u32 = 65_536;

/// `FlowState::flags`.
pub mod flow_flags {
    /// The client sent its SYN again: the handshake RTT is ambiguous (Karn).
    pub const SYN_RETRANSMITTED: u32 = 1;
    /// The SYN-ACK was seen.
    pub const HANDSHAKE_DONE: u32 = 2;
    /// Client data left for the server; its first response byte is awaited.
    pub const AWAITING_RESPONSE: u32 = 4;
}

/// Local ports of L7 checks to a VIP on a direct-routing real server
/// (inclusive): the datapath rewrites only connections from these ports,
/// and only those registered in `DR_CHECKS`.
pub const DR_CHECK_PORT_MIN: u16 = 60_000;
pub const DR_CHECK_PORT_MAX: u16 = 60_999;

/// Capacity of the agent table (one entry per real-server address).
pub const MAX_AGENTS: u32 = 65_536;

/// Agent datagrams (UDP to the configured agent port), all integers in
/// network byte order:
///
/// | offset | size | field |
/// | --- | --- | --- |
/// | 0 | 4 | magic `PRAG` |
/// | 4 | 1 | version, 2 |
/// | 5 | 1 | state: 1 up, 2 down, 3 drain |
/// | 6 | 2 | reserved, 0 |
/// | 8 | 4 | weight (0-65535; larger is taken as 65535) |
/// | 12 | 4 | reserved, 0 |
/// | 16 | 8 | sequence: strictly increasing (the sender uses microseconds since the Unix epoch) |
/// | 24 | 8 | tag: [`agent_wire::tag`] under the shared key, 0 without one |
///
/// Exactly 32 bytes; anything else is malformed and counted. A director
/// with a key takes a report only if its tag is right (an off-path sender
/// without the key cannot forge one) and its sequence is above the last
/// one taken from that real server and within a minute of the director's
/// clock (a captured report cannot be replayed).
pub mod agent_wire {
    pub const MAGIC: [u8; 4] = *b"PRAG";
    pub const VERSION: u8 = 2;
    pub const LEN: usize = 32;
    /// Bytes covered by the tag: everything before it.
    pub const SIGNED_LEN: usize = 24;
    pub const STATE_UP: u8 = 1;
    pub const STATE_DOWN: u8 = 2;
    pub const STATE_DRAIN: u8 = 3;

    /// The tag of a datagram: SipHash-2-4 under the shared key of its first
    /// 24 bytes, the sender's and the director's IPv4 addresses and the
    /// agent port, so a report is good only from the real server it names
    /// and to the director it was sent to. Written little-endian.
    #[inline(always)]
    pub fn tag(
        key: [u64; 2],
        signed: &[u8; SIGNED_LEN],
        source: [u8; 4],
        director: [u8; 4],
        port: u16,
    ) -> u64 {
        let word = |i: usize| {
            u64::from_le_bytes([
                signed[i],
                signed[i + 1],
                signed[i + 2],
                signed[i + 3],
                signed[i + 4],
                signed[i + 5],
                signed[i + 6],
                signed[i + 7],
            ])
        };
        // Little-endian words on every side, whatever the sender's CPU.
        let addresses =
            u32::from_le_bytes(source) as u64 | (u32::from_le_bytes(director) as u64) << 32;
        crate::cookie::siphash24_words(key, [word(0), word(8), word(16), addresses, port as u64])
    }
}

/// Capacity of the per-target maps as compiled, and the least the daemon
/// gives them: it sizes them at load from what IPVS holds (or
/// `max_probes`), up to [`MOST_TARGETS`].
pub const MAX_TARGETS: u32 = 65_536;

/// The most probes the per-target maps are ever sized for.
pub const MOST_TARGETS: u32 = 4 << 20;

/// Number of log2 RTT buckets: bucket i counts RTTs in [2^i, 2^(i+1)) µs,
/// bucket 0 also counts RTTs under 1 µs, the last one everything above.
pub const RTT_BUCKETS: usize = 24;

/// Length of the frame the daemon hands to `probe_tx`: the largest probe
/// (IPIP + IPv4 + TCP SYN with MSS). The program shrinks it per probe.
pub const PROBE_FRAME_MAX: usize = 14 + 20 + 20 + 24;

/// `ProbeTarget::kind`.
pub mod probe_kind {
    /// L3: ICMP echo request to the real server's address.
    pub const ICMP_ECHO: u8 = 1;
    /// L4: TCP SYN to the service port; SYN-ACK = up, RST = refused.
    pub const TCP_SYN: u8 = 2;
}

/// `ProbeTarget::encap`.
pub mod encap {
    /// The probe packet goes on the wire as it is.
    pub const NONE: u8 = 0;
    /// IPIP: an outer IPv4 header to the real server wraps the probe packet
    /// (for IPVS tunnel-mode real servers).
    pub const IPIP: u8 = 1;
}

/// [`ProbeTarget::flags`] bits.
pub mod target_flags {
    /// Not sent while set (the entry is kept, so replies still match): a
    /// host's L3 diagnosis probe while every check of the host answers.
    pub const PAUSED: u8 = 1;
}

/// Address family codes in map entries.
pub mod family {
    pub const IPV4: u8 = 4;
    pub const IPV6: u8 = 6;
}

/// Counters of the datapath as a whole, one value per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "user", derive(serde::Serialize, serde::Deserialize))]
#[cfg_attr(feature = "user", serde(default))]
pub struct DatapathCounters {
    /// Frames seen by the ingress program.
    pub packets: u64,
    /// Sum of their lengths from the Ethernet header on.
    pub bytes: u64,
    /// Replies matched to a probe with a valid cookie.
    pub replies_matched: u64,
    /// Replies to a probe port whose cookie did not match: forged or stale.
    pub replies_rejected: u64,
    /// Replies to the probe before the outstanding one: later than the
    /// next send, so a timeout, never an answer.
    pub replies_late: u64,
    /// RSTs sent back for SYN-ACKs (no half-open connection left behind).
    pub resets_sent: u64,
    /// Probe frames written by `probe_tx`.
    pub probes_built: u64,
    /// `probe_tx` runs that sent nothing (bad target entry, batch overrun).
    pub probe_errors: u64,
    /// Agent datagrams recorded.
    pub agent_reports: u64,
    /// Datagrams to the agent port that are not a valid agent report.
    pub agent_malformed: u64,
    /// Valid agent reports from an address that is not a real server.
    pub agent_unknown: u64,
    /// Reports refused for a wrong tag (a key is set).
    pub agent_unauthenticated: u64,
    /// Reports refused for a sequence not above the last one taken, or
    /// outside the window of the director's clock.
    pub agent_replayed: u64,
    /// RSTs `probe_tx` sent for an unanswered SYN before the next one: the
    /// SYN-ACK may have been lost, leaving the real server's end of that
    /// 4-tuple half-open, where it would swallow the next SYN.
    pub resets_before_probe: u64,
    /// Probe events the ring buffer had no room for (userspace behind).
    pub events_lost: u64,
    /// Batch entries `probe_tx` walked past: not due yet, or without a
    /// path (no MAC for their next hop).
    pub entries_not_due: u64,
    /// Unanswered probes not counted as timeouts: sent in a chunk whose
    /// frames the director's own interface dropped (once in a row).
    pub timeouts_excused: u64,
    /// ARP replies that reached the interface: a neighbour answered, so
    /// the director's own path works (see the director-fault rule).
    pub arp_replies: u64,
    /// Due targets the walk passed over because their last probe, sent
    /// late, is unanswered and still inside its timeout: never judged
    /// before it, they go at their next turn.
    pub sends_held_for_timeout: u64,
}

impl DatapathCounters {
    /// Adds another CPU's counters (userspace sums the per-CPU slots).
    pub fn saturating_add(self, o: Self) -> Self {
        Self {
            packets: self.packets.saturating_add(o.packets),
            bytes: self.bytes.saturating_add(o.bytes),
            replies_matched: self.replies_matched.saturating_add(o.replies_matched),
            replies_rejected: self.replies_rejected.saturating_add(o.replies_rejected),
            replies_late: self.replies_late.saturating_add(o.replies_late),
            resets_sent: self.resets_sent.saturating_add(o.resets_sent),
            probes_built: self.probes_built.saturating_add(o.probes_built),
            probe_errors: self.probe_errors.saturating_add(o.probe_errors),
            agent_reports: self.agent_reports.saturating_add(o.agent_reports),
            agent_malformed: self.agent_malformed.saturating_add(o.agent_malformed),
            agent_unknown: self.agent_unknown.saturating_add(o.agent_unknown),
            agent_unauthenticated: self
                .agent_unauthenticated
                .saturating_add(o.agent_unauthenticated),
            agent_replayed: self.agent_replayed.saturating_add(o.agent_replayed),
            resets_before_probe: self
                .resets_before_probe
                .saturating_add(o.resets_before_probe),
            events_lost: self.events_lost.saturating_add(o.events_lost),
            entries_not_due: self.entries_not_due.saturating_add(o.entries_not_due),
            timeouts_excused: self.timeouts_excused.saturating_add(o.timeouts_excused),
            arp_replies: self.arp_replies.saturating_add(o.arp_replies),
            sends_held_for_timeout: self
                .sends_held_for_timeout
                .saturating_add(o.sends_held_for_timeout),
        }
    }
}

/// Everything `probe_tx` needs to write one target's probe frame.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeTarget {
    /// Next hop: the real server's MAC for direct routing, else the MAC of
    /// the real server or gateway the route points at.
    pub dst_mac: [u8; 6],
    /// The director interface's MAC.
    pub src_mac: [u8; 6],
    /// [`probe_kind`]; 0 = slot unused.
    pub kind: u8,
    /// [`family`] of the addresses.
    pub family: u8,
    /// [`encap`].
    pub encap: u8,
    /// [`target_flags`].
    pub flags: u8,
    /// Destination port, network byte order (TCP).
    pub dst_port: u16,
    /// Source port (TCP) or echo identifier (ICMP), network byte order:
    /// unique per target so replies find their target.
    pub src_port: u16,
    /// Interface the probe leaves by.
    pub ifindex: u32,
    /// The director's address: source of the probe.
    pub src_addr: [u8; 16],
    /// Destination of the probe packet: the real server (NAT, L3 checks) or
    /// the VIP (direct routing, tunnel).
    pub dst_addr: [u8; 16],
    /// Outer IPIP header source (tunnel only).
    pub outer_src: [u8; 16],
    /// The real server: the outer IPIP destination in tunnel mode; in the
    /// other modes not written on the wire, kept so tools can name the target.
    pub real_server: [u8; 16],
}

/// Key of the reply index: what a reply's headers say about the probe it
/// answers. Ports in network byte order.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ReplyKey {
    /// The reply's source: the probe's destination.
    pub remote_addr: [u8; 16],
    /// The reply's source port (TCP); 0 for ICMP.
    pub remote_port: u16,
    /// The reply's destination port (TCP) or echo identifier (ICMP).
    pub local_port: u16,
    /// [`family`].
    pub family: u8,
    /// IP protocol of the probe: 6 TCP, 1 ICMP.
    pub protocol: u8,
    pub _pad: [u8; 2],
}

/// Per-target send state and verdict runs. Written by `probe_tx` (sends,
/// timeouts) and by the ingress program (replies). `sent` is also the
/// nonce of the outstanding probe's cookie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeState {
    /// Probes sent.
    pub sent: u64,
    /// Probes that got no reply before the next one was sent.
    pub timed_out: u64,
    /// When the last probe was sent (bpf_ktime_get_ns, CLOCK_MONOTONIC).
    pub last_sent_ns: u64,
    /// When the last valid reply arrived (CLOCK_MONOTONIC).
    pub last_reply_ns: u64,
    /// Probes in a row that got no reply (up to the last one sent).
    pub misses_in_row: u32,
    /// The nonce whose 4-tuple `probe_tx` last reset (see
    /// [`DatapathCounters::resets_before_probe`]); 0: none.
    pub reset_nonce: u32,
    /// Settled outcomes in a row that were answers (see [`outcome`]).
    pub successes_in_row: u32,
    /// Settled outcomes in a row that were failures: timeouts, slow
    /// answers, refusals, ICMP errors.
    pub failures_in_row: u32,
    /// Answer RTT estimate, ns (0: none yet): an EWMA whose weight for a
    /// sample `dt` after the last is dt / (dt + decay), the first-order
    /// form of userspace's 1 - exp(-dt / decay).
    pub rtt_ewma_ns: u64,
    /// When the estimate last took a sample (CLOCK_MONOTONIC).
    pub rtt_ewma_at_ns: u64,
    /// The estimate last reported to userspace.
    pub rtt_reported_ns: u64,
    /// Not sent before this (CLOCK_MONOTONIC): half a turn of the send
    /// wheel short of a full interval after the last send (see
    /// [`ProbeConfig::send_turn_us`]); 0: due.
    pub next_send_ns: u64,
    /// The nonce of the last unanswered probe excused as lost in the
    /// director's own ring ([`Expectation::lossy_nonce`]); the one after
    /// it is never excused.
    pub excused_nonce: u32,
    /// The last two answer RTTs, µs (0: none yet): with the new one, the
    /// estimate takes their median (see `verdict::filtered_sample`).
    pub rtt_last_us: u32,
    pub rtt_before_last_us: u32,
    pub _pad: u32,
}

/// Per-target reply results, one value per CPU: what the controller
/// reads for each probe it judges, so kept small (the RTT histogram,
/// read only for `status` and metrics, is in [`RttHistogram`]).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeResults {
    /// Positive replies: SYN-ACK (L4 up) or echo reply (L3 up).
    pub answered: u64,
    /// RSTs: the host is up, nothing listens on the port.
    pub refused: u64,
    /// ICMP destination-unreachable quoting one of our probes.
    pub unreachable: u64,
    /// RTT of this CPU's last positive reply, ns.
    pub last_rtt_ns: u64,
    /// When this CPU saw that reply (CLOCK_MONOTONIC), to pick the newest.
    pub last_reply_ns: u64,
}

/// Per-target log2 histogram of positive-reply RTTs in µs (see
/// [`RTT_BUCKETS`]), one value per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RttHistogram {
    pub log2_us: [u64; RTT_BUCKETS],
}

impl Default for RttHistogram {
    fn default() -> Self {
        Self {
            log2_us: [0; RTT_BUCKETS],
        }
    }
}

/// The RTT histogram bucket of an RTT in nanoseconds.
#[inline(always)]
pub fn rtt_bucket(rtt_ns: u64) -> usize {
    let us = rtt_ns / 1000;
    if us == 0 {
        return 0;
    }
    let log2 = 63 - us.leading_zeros() as usize;
    if log2 >= RTT_BUCKETS {
        RTT_BUCKETS - 1
    } else {
        log2
    }
}

/// Probe-wide settings, written by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeConfig {
    /// SipHash key of the cookies put in probes now.
    pub secret: [u64; 2],
    /// The key before the last rotation: replies to probes sent just before
    /// a rotation still match.
    pub previous_secret: [u64; 2],
    /// Local ports (TCP source ports and echo identifiers) used by probes,
    /// host byte order, inclusive: replies to other ports are not looked at.
    pub local_port_min: u16,
    pub local_port_max: u16,
    /// UDP port agents report to, host byte order; 0: no agents.
    pub agent_port: u16,
    pub _pad: [u8; 2],
    /// The director's address agents report to (IPv4, network order):
    /// datagrams to other addresses are not agents' and pass.
    pub agent_addr: [u8; 4],
    /// 1: agent reports must carry a good tag under `agent_key` and a
    /// fresh sequence; 0: tags and sequences are not checked.
    pub agent_auth: u8,
    pub _pad2: [u8; 3],
    /// Key shared with the agents (SipHash-2-4, see [`agent_wire::tag`]).
    pub agent_key: [u64; 2],
    /// With `agent_auth`: sequences (the agents' clocks, µs since the Unix
    /// epoch) outside this window of the director's clock are refused, so
    /// a captured report is stale within a minute even for an entry that
    /// was just created, and a clock far ahead cannot lock an agent out.
    /// Userspace moves the window every second.
    pub agent_sequence_min: u64,
    pub agent_sequence_max: u64,
    /// Time constant of the RTT estimate, µs; 0: each sample replaces it.
    pub rtt_decay_us: u32,
    /// An answer moving the estimate by more than this share (per mille)
    /// of the value last reported plus `rtt_slack_us` is reported (the
    /// slack the weights add to every latency, so sub-millisecond jitter
    /// reports nothing).
    pub rtt_band_permille: u16,
    /// 1: a sample above the estimate replaces it (peak EWMA).
    pub rtt_peak: u8,
    pub _pad3: u8,
    pub rtt_slack_us: u32,
    /// How long the send wheel takes to walk every target once (the
    /// shortest interval): a target is due when less than half a turn is
    /// left of its interval, so a walk a little late or early still sends
    /// it once per interval.
    pub send_turn_us: u32,
}

/// Key of `DR_CHECKS`: one L7 check connection as the director's side
/// sees it (its local address and port are its own, so unique).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct DrCheckKey {
    /// The director's address (IPv4, network order).
    pub local_addr: [u8; 4],
    /// Network byte order.
    pub local_port: u16,
    /// The service port on the real server, network byte order.
    pub remote_port: u16,
    /// 6 TCP, 17 UDP.
    pub protocol: u8,
    pub _pad: [u8; 3],
}

/// An L7 check's connection to the VIP on a direct-routing real server:
/// it connects to `real_server`; TC egress rewrites that destination to
/// `vip`, ingress XDP rewrites the answers' source `vip` back.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct DrCheckFlow {
    /// IPv4, network byte order.
    pub real_server: [u8; 4],
    pub vip: [u8; 4],
}

/// The last agent report of one real server, written by the ingress
/// program.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct AgentReport {
    /// When the last report arrived (CLOCK_MONOTONIC); 0: never.
    pub last_ns: u64,
    /// Reports recorded.
    pub reports: u64,
    /// Sequence of the last report taken.
    pub sequence: u64,
    pub weight: u32,
    /// [`agent_wire`] state code.
    pub state: u8,
    pub _pad: [u8; 3],
}

/// IPVS configuration calls that succeeded, made by processes other than
/// the prober that loaded the programs (its own writes are not a change to
/// follow), written by the kretprobes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IpvsChanges {
    /// Calls counted; only compared with the last value read.
    pub count: u64,
    /// Process (thread group) of the last one.
    pub last_tgid: u32,
    pub _pad: u32,
    /// Its command name, NUL-padded.
    pub last_comm: [u8; 16],
}

/// Progress of the walk `probe_tx` is making over `PROBE_BATCH`: a run
/// sends the first due target from `next` on (passing over a few that are
/// not), and leaves `next` after it; the walk ends at `len`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BatchCursor {
    pub next: u32,
    pub len: u32,
}

/// A destination of a virtual service (userspace-only map key).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct WeightKey {
    /// Service address (0 for fwmark services).
    pub service_addr: [u8; 16],
    pub dest_addr: [u8; 16],
    /// Firewall mark (0 for address services).
    pub fwmark: u32,
    pub service_port: u16,
    pub dest_port: u16,
    /// IP protocol of an address service (0 for fwmark services).
    pub protocol: u8,
    /// [`family`] of the service.
    pub family: u8,
    pub _pad: [u8; 2],
}

/// What the controller remembers of a destination.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WeightRecord {
    /// The operator's weight: the most prober gives.
    pub configured: u32,
    /// The weight prober last wrote (valid when `has_written` is 1).
    pub written: u32,
    pub has_written: u32,
    /// A weight being written (valid when `has_pending` is 1): saved before
    /// the IPVS write, so a daemon killed mid-batch does not mistake its own
    /// write for an operator's after restart.
    pub pending: u32,
    pub has_pending: u32,
    pub _pad: u32,
}

/// A probe (userspace-only map key): what it sends where.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct HealthKey {
    pub destination: [u8; 16],
    pub real_server: [u8; 16],
    /// Destination port (TCP), 0 for ICMP; host byte order.
    pub port: u16,
    /// [`probe_kind`].
    pub kind: u8,
    /// 0 direct, 1 direct routing, 2 tunnel.
    pub forwarding: u8,
}

/// What the controller remembers of a probe.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct HealthRecord {
    /// Peak-EWMA latency, ns (0: none yet).
    pub latency_ns: u64,
    /// 1 up, 2 down.
    pub state: u8,
    pub _pad: [u8; 7],
}

#[cfg(feature = "user")]
mod user {
    // SAFETY (all): plain old data: #[repr(C)], integers and integer arrays
    // only, no implicit padding (checked by the layout tests below).
    unsafe impl aya::Pod for super::DatapathCounters {}
    unsafe impl aya::Pod for super::ProbeTarget {}
    unsafe impl aya::Pod for super::ReplyKey {}
    unsafe impl aya::Pod for super::ProbeState {}
    unsafe impl aya::Pod for super::Expectation {}
    unsafe impl aya::Pod for super::ProbeEvent {}
    unsafe impl aya::Pod for super::ProbeResults {}
    unsafe impl aya::Pod for super::RttHistogram {}
    unsafe impl aya::Pod for super::ProbeConfig {}
    unsafe impl aya::Pod for super::BatchCursor {}
    unsafe impl aya::Pod for super::WeightKey {}
    unsafe impl aya::Pod for super::WeightRecord {}
    unsafe impl aya::Pod for super::HealthKey {}
    unsafe impl aya::Pod for super::HealthRecord {}
    unsafe impl aya::Pod for super::ServerKey {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::FlowState {}
    unsafe impl aya::Pod for super::PassiveStats {}
    unsafe impl aya::Pod for super::DrCheckKey {}
    unsafe impl aya::Pod for super::DrCheckFlow {}
    unsafe impl aya::Pod for super::AgentReport {}
    unsafe impl aya::Pod for super::IpvsChanges {}
}

#[cfg(test)]
mod tests {
    use core::mem::{align_of, offset_of, size_of};

    use super::*;

    /// Sums the sizes of the listed fields: equal to the struct size means
    /// there is no hidden padding.
    macro_rules! assert_no_holes {
        ($t:ty, $size:expr, { $($field:ident: $ft:ty),* $(,)? }) => {{
            let fields = 0 $(+ size_of::<$ft>())*;
            assert_eq!(size_of::<$t>(), $size, "size of {}", stringify!($t));
            assert_eq!(fields, size_of::<$t>(), "{} has padding holes", stringify!($t));
            let mut end = 0;
            $(
                assert_eq!(offset_of!($t, $field), end, "offset of {}::{}", stringify!($t), stringify!($field));
                end += size_of::<$ft>();
            )*
            let _ = end;
        }};
    }

    #[test]
    fn layouts_have_no_holes() {
        assert_no_holes!(DatapathCounters, 152, {
            packets: u64, bytes: u64, replies_matched: u64, replies_rejected: u64,
            replies_late: u64, resets_sent: u64, probes_built: u64, probe_errors: u64, agent_reports: u64,
            agent_malformed: u64, agent_unknown: u64, agent_unauthenticated: u64,
            agent_replayed: u64, resets_before_probe: u64, events_lost: u64, entries_not_due: u64,
            timeouts_excused: u64, arp_replies: u64, sends_held_for_timeout: u64,
        });
        assert_no_holes!(ProbeTarget, 88, {
            dst_mac: [u8; 6], src_mac: [u8; 6], kind: u8, family: u8, encap: u8, flags: u8,
            dst_port: u16, src_port: u16, ifindex: u32, src_addr: [u8; 16], dst_addr: [u8; 16],
            outer_src: [u8; 16], real_server: [u8; 16],
        });
        assert_no_holes!(ReplyKey, 24, {
            remote_addr: [u8; 16], remote_port: u16, local_port: u16, family: u8, protocol: u8,
            _pad: [u8; 2],
        });
        assert_no_holes!(ProbeState, 96, {
            sent: u64, timed_out: u64, last_sent_ns: u64, last_reply_ns: u64,
            misses_in_row: u32, reset_nonce: u32, successes_in_row: u32, failures_in_row: u32,
            rtt_ewma_ns: u64, rtt_ewma_at_ns: u64, rtt_reported_ns: u64, next_send_ns: u64,
            excused_nonce: u32, rtt_last_us: u32, rtt_before_last_us: u32, _pad: u32,
        });
        assert_no_holes!(Expectation, 16, {
            state: u8, _pad: [u8; 3], timeout_us: u32, interval_us: u32, lossy_nonce: u32,
        });
        assert_no_holes!(ProbeEvent, 48, {
            target_id: u32, outcome: u8, _pad: [u8; 3], in_row: u32, nonce: u32, sent_ns: u64,
            rtt_ns: u64, rtt_ewma_ns: u64, answered_before_ns: u64,
        });
        assert_no_holes!(ProbeResults, 40, {
            answered: u64, refused: u64, unreachable: u64, last_rtt_ns: u64, last_reply_ns: u64,
        });
        assert_no_holes!(RttHistogram, 8 * RTT_BUCKETS, { log2_us: [u64; RTT_BUCKETS] });
        assert_no_holes!(ProbeConfig, 96, {
            secret: [u64; 2], previous_secret: [u64; 2], local_port_min: u16, local_port_max: u16,
            agent_port: u16, _pad: [u8; 2], agent_addr: [u8; 4], agent_auth: u8, _pad2: [u8; 3],
            agent_key: [u64; 2], agent_sequence_min: u64, agent_sequence_max: u64,
            rtt_decay_us: u32, rtt_band_permille: u16, rtt_peak: u8, _pad3: u8,
            rtt_slack_us: u32, send_turn_us: u32,
        });
        assert_no_holes!(DrCheckKey, 12, {
            local_addr: [u8; 4], local_port: u16, remote_port: u16, protocol: u8, _pad: [u8; 3],
        });
        assert_no_holes!(DrCheckFlow, 8, { real_server: [u8; 4], vip: [u8; 4] });
        assert_no_holes!(AgentReport, 32, {
            last_ns: u64, reports: u64, sequence: u64, weight: u32, state: u8, _pad: [u8; 3],
        });
        assert_no_holes!(BatchCursor, 8, { next: u32, len: u32 });
        assert_no_holes!(IpvsChanges, 32, {
            count: u64, last_tgid: u32, _pad: u32, last_comm: [u8; 16],
        });
        assert_no_holes!(WeightKey, 44, {
            service_addr: [u8; 16], dest_addr: [u8; 16], fwmark: u32, service_port: u16,
            dest_port: u16, protocol: u8, family: u8, _pad: [u8; 2],
        });
        assert_no_holes!(WeightRecord, 24, {
            configured: u32, written: u32, has_written: u32, pending: u32, has_pending: u32, _pad: u32,
        });
        assert_no_holes!(HealthKey, 36, {
            destination: [u8; 16], real_server: [u8; 16], port: u16, kind: u8, forwarding: u8,
        });
        assert_no_holes!(HealthRecord, 16, { latency_ns: u64, state: u8, _pad: [u8; 7] });
        assert_no_holes!(ServerKey, 20, { addr: [u8; 16], port: u16, family: u8, _pad: u8 });
        assert_no_holes!(FlowKey, 40, {
            server_addr: [u8; 16], client_addr: [u8; 16], server_port: u16, client_port: u16,
            family: u8, _pad: [u8; 3],
        });
        assert_no_holes!(FlowState, 24, { syn_ns: u64, request_ns: u64, server_id: u32, flags: u32 });
        assert_no_holes!(PassiveStats, 64 + 2 * 8 * RTT_BUCKETS, {
            handshakes: u64, handshake_rtt_sum_ns: u64, responses: u64, response_time_sum_ns: u64,
            last_sample_ns: u64, resets: u64, syn_retransmits: u64, _pad: u64,
            handshake_log2_us: [u64; RTT_BUCKETS], response_log2_us: [u64; RTT_BUCKETS],
        });
        // Per-CPU values are placed at 8-byte alignment by the kernel.
        assert!(align_of::<ProbeResults>() <= 8 && align_of::<DatapathCounters>() <= 8);
    }

    #[test]
    fn bpf_object_names_fit_the_kernel_limit() {
        // BPF_OBJ_NAME_LEN is 16 including the NUL: longer names are cut.
        for name in [
            map_names::COUNTERS,
            map_names::PROBE_TARGETS,
            map_names::REPLY_INDEX,
            map_names::PROBE_STATE,
            map_names::PROBE_RESULTS,
            map_names::PROBE_EXPECT,
            map_names::PROBE_EVENTS,
            map_names::PROBE_CONFIG,
            map_names::PROBE_BATCH,
            map_names::BATCH_CURSOR,
            map_names::WEIGHT_STATE,
            map_names::HEALTH_STATE,
            map_names::PASSIVE_SERVERS,
            map_names::PASSIVE_PORTS,
            map_names::PASSIVE_FLOWS,
            map_names::PASSIVE_CONNS,
            map_names::PASSIVE_STATS,
            map_names::DR_CHECKS,
            map_names::AGENTS,
            program_names::PASSIVE_EGRESS,
            program_names::XDP_INGRESS,
            program_names::PROBE_TX,
        ] {
            assert!(name.len() <= 15, "{name} is longer than 15 bytes");
        }
    }

    #[test]
    fn rtt_buckets_are_log2_microseconds() {
        assert_eq!(rtt_bucket(0), 0);
        assert_eq!(rtt_bucket(999), 0);
        assert_eq!(rtt_bucket(1_000), 0);
        assert_eq!(rtt_bucket(2_000), 1);
        assert_eq!(rtt_bucket(20_000_000), 14); // 20 ms = 20000 µs, 2^14 = 16384
        assert_eq!(rtt_bucket(u64::MAX), RTT_BUCKETS - 1);
    }

    #[test]
    fn per_cpu_sum_saturates() {
        let a = DatapathCounters {
            packets: u64::MAX - 1,
            bytes: 10,
            ..Default::default()
        };
        let b = DatapathCounters {
            packets: 5,
            bytes: 20,
            ..Default::default()
        };
        let sum = a.saturating_add(b);
        assert_eq!((sum.packets, sum.bytes), (u64::MAX, 30));
    }
}
