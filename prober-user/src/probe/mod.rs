//! Active probing: turns probe specs into `PROBE_TARGETS` entries (with
//! addresses and MACs from the kernel), sends each round as one
//! BPF_PROG_TEST_RUN batch of `probe_tx`, rotates the cookie secret, and
//! reads back what the ingress program recorded.

mod counts;
pub mod delivery;
mod paths;
pub mod report;
pub mod schedule;
mod send;
pub mod spec;
pub mod transmit;
mod verdicts;
mod wheel;

use std::{
    collections::HashMap,
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray, PerCpuValues},
    programs::ProgramFd,
};
use prober_common::{
    encap, family, probe_kind, target_flags, BatchCursor, Expectation, ProbeConfig, ProbeResults,
    ProbeState, ProbeTarget, ReplyKey, RttHistogram, PROBE_FRAME_MAX,
};
use tracing::{info, warn};

pub use counts::{ProbeReport, ProbeReports};
use paths::{NeighbourKeepalive, Nudges, RESOLUTION_BACKOFF};
pub use send::Sent;
pub use spec::{Forwarding, ProbeKind, ProbeSpec};
pub use verdicts::{Heard, MonotonicClock};

use crate::{
    map_batch::ArraySnapshot,
    rtnetlink::{ChangeWatch, RouteSocket},
};

/// Routes are looked up again at least this often, in case a change
/// notification went missing without the socket saying so (a lost one
/// says ENOBUFS, and every route is read again at once). A route lookup
/// per target: at 30 s, 100,000 targets took 3,300 lookups a second at
/// rest.
pub const ROUTE_REFRESH: Duration = Duration::from_secs(300);
/// Targets whose route a wake looks up during that periodic check.
const ROUTES_PER_WAKE: usize = 500;

/// Local ports for probes by default: above Linux's ephemeral range
/// (32768-60999), so no local connection shares a probe's 4-tuple.
pub const DEFAULT_LOCAL_PORTS: (u16, u16) = (61000, 65535);

/// An RTT estimate that moved by more than this share (per mille) of
/// the last reported one plus the weights' slack is reported. A weight
/// goes as (typical + slack) / (own + slack), so the estimate userspace
/// holds puts a weight at most 2 % off (5 % was enough, with the
/// weights' 10 % hysteresis, to write a fast server down to 84 in the
/// demo when a faster one came back).
pub const RTT_REPORT_BAND_PERMILLE: u16 = 20;

/// How often the cookie secret changes; replies to the previous secret's
/// probes are still accepted, older ones are not.
pub const SECRET_ROTATION: Duration = Duration::from_secs(60);

/// How far an agent's clock (its reports' sequence) may be from ours when
/// reports are authenticated; the window moves every second.
pub const AGENT_CLOCK_WINDOW: Duration = Duration::from_secs(60);

/// The maps the prober writes, taken out of the loaded object.
pub struct ProbeMaps {
    pub targets: Array<MapData, ProbeTarget>,
    pub reply_index: BpfHashMap<MapData, ReplyKey, u32>,
    pub config: Array<MapData, ProbeConfig>,
    pub batch: Array<MapData, u32>,
    pub cursor: Array<MapData, BatchCursor>,
    pub state: Array<MapData, ProbeState>,
    pub results: PerCpuArray<MapData, ProbeResults>,
    /// Read for `status` and metrics only, never per tick.
    pub rtt: PerCpuArray<MapData, RttHistogram>,
    /// What the controller holds of each target (see [`Expectation`]).
    pub expect: Array<MapData, Expectation>,
    /// Outcomes that go against it, from both programs.
    pub events: aya::maps::RingBuf<MapData>,
}

/// One configured probe and what the kernel told us about its path.
#[derive(Debug, Clone)]
pub struct Target {
    pub spec: ProbeSpec,
    pub local_port: u16,
    /// The kernel's route to the real server, or why there is none usable.
    pub path: Result<Path, String>,
    /// The next hop's MAC in the entry written to `PROBE_TARGETS`, once
    /// its path is known (the rest of the entry follows from the spec, the
    /// path and the interface's MAC: a copy of it cost 88 bytes a target).
    pub written_mac: Option<[u8; 6]>,
    /// The path changed since the entry was written.
    pub path_changed: bool,
    /// Why the probe cannot be sent (route, neighbour), hashed (0: it
    /// can): enough to say each change once, without a string a target.
    pub problem: u32,
    /// The route is fine but the next hop's MAC is not known: the host does
    /// not answer ARP, which counts against it.
    pub neighbour_unresolved: bool,
    /// Not sent for now (see [`Prober::set_paused`]).
    pub paused: bool,
}

/// The part of a route a probe frame needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Path {
    pub ifindex: u32,
    /// The real server itself, or the gateway to it.
    pub next_hop: IpAddr,
    /// The director's address the kernel would use.
    pub source: IpAddr,
}

pub struct Prober {
    maps: ProbeMaps,
    /// The program a send test-runs: `prober_xdp` as the daemon sets it up
    /// (it hands the runs to `probe_tx`), or `probe_tx` itself in tests.
    sender: ProgramFd,
    ifindex: u32,
    interface: String,
    /// Indexed by target id; None: a free id.
    targets: Vec<Option<Target>>,
    /// How many of them are paused.
    paused: usize,
    ids: rustc_hash::FxHashMap<ProbeSpec, u32>,
    config: ProbeConfig,
    last_rotation: Instant,
    routes: RouteSocket,
    changes: ChangeWatch,
    last_route_lookup: Instant,
    /// How far the periodic check of every route has got (target ids).
    route_pass: Option<usize>,
    frame: Vec<u8>,
    /// NTF_USE after unanswered probes: at most once a second per next
    /// hop. It costs nothing while the kernel's entry is fresh, and at most
    /// its few unicast re-checks once it is stale.
    revalidations: Nudges,
    /// Resolution requests for next hops without a MAC (each a broadcast
    /// ARP request): backed off to one a minute, so a dead rack costs a
    /// few ARP requests a minute per server, not one per tick.
    resolutions: Nudges,
    /// When neighbours were last read because some target had none.
    last_unresolved_refresh: Option<Instant>,
    /// Times rtnetlink notifications were lost, and when that was logged.
    notifications_lost: u64,
    /// Whole neighbour table reads, and neighbour entries followed one by
    /// one (see `paths`).
    neighbour_table_reads: u64,
    neighbour_changes_followed: u64,
    lost_logged: Option<Instant>,
    /// When the window of acceptable agent sequences was last moved.
    agent_window_at: Option<Instant>,
    /// Whether probe frames seem to vanish (a veth without an XDP peer).
    delivery: delivery::DeliveryWatch,
    /// Live frames, or a packet socket where the kernel refuses them.
    transmit: transmit::Transmit,
    keepalive: NeighbourKeepalive,
    cpus: usize,
    send_buffers: send::SendBuffers,
    /// The datapath's counters, for the replies it matched (the director
    /// path's evidence); None in tests without a pinned map.
    counters: Option<PerCpuArray<MapData, prober_common::DatapathCounters>>,
    /// Every target, by the slot it is sent in (see `wheel`).
    wheel: wheel::Wheel,
    /// Targets whose next hop has no MAC, in id order.
    unresolved: Vec<u32>,
    /// Target ids by next hop (sorted), and whether a path changed since
    /// it was built: neighbour notifications find their targets by it.
    by_hop: Vec<((u32, IpAddr), u32)>,
    hops_stale: bool,
    /// The neighbour entries the last notifications told of (kept to reuse).
    neighbours_told: Vec<crate::rtnetlink::Neighbour>,
    /// What `PROBE_EXPECT` holds, by target id (it has two writers here:
    /// the controller's expectation, the send path's lossy nonce).
    expectations: Vec<Expectation>,
    /// The probing interface's MAC as last read (the source of every
    /// entry written).
    src_mac: Option<[u8; 6]>,
    /// Sends ARP requests while every probe is silent (opened then).
    arp_socket: Option<transmit::PacketSocket>,
}

impl Prober {
    pub fn new(
        maps: ProbeMaps,
        sender: ProgramFd,
        interface: &str,
        ifindex: u32,
        specs: &[ProbeSpec],
    ) -> Result<Self> {
        let (local_port_min, local_port_max) = DEFAULT_LOCAL_PORTS;
        let config = ProbeConfig {
            secret: random_secret()?,
            previous_secret: random_secret()?,
            local_port_min,
            local_port_max,
            agent_port: 0,
            _pad: [0; 2],
            agent_addr: [0; 4],
            agent_auth: 0,
            _pad2: [0; 3],
            agent_key: [0; 2],
            agent_sequence_min: 0,
            agent_sequence_max: 0,
            rtt_decay_us: 0,
            rtt_band_permille: RTT_REPORT_BAND_PERMILLE,
            rtt_peak: 0,
            _pad3: 0,
            rtt_slack_us: 0,
            send_turn_us: 0,
        };
        let mut prober = Self {
            maps,
            sender,
            ifindex,
            interface: interface.to_string(),
            targets: Vec::new(),
            paused: 0,
            ids: rustc_hash::FxHashMap::default(),
            config,
            last_rotation: Instant::now(),
            routes: RouteSocket::open()?,
            changes: ChangeWatch::open()?,
            last_route_lookup: Instant::now(),
            route_pass: None,
            frame: vec![0u8; PROBE_FRAME_MAX],
            revalidations: Nudges::new(Duration::from_secs(1)),
            resolutions: Nudges::new(RESOLUTION_BACKOFF),
            last_unresolved_refresh: None,
            notifications_lost: 0,
            neighbour_table_reads: 0,
            neighbour_changes_followed: 0,
            lost_logged: None,
            agent_window_at: None,
            delivery: delivery::DeliveryWatch::new(interface),
            transmit: transmit::Transmit::new(transmit::TransmitMode::Auto)?,
            keepalive: NeighbourKeepalive::new(interface),
            cpus: aya::util::nr_cpus()
                .map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}"))?,
            send_buffers: send::SendBuffers::default(),
            counters: None,
            wheel: wheel::Wheel::default(),
            unresolved: Vec::new(),
            by_hop: Vec::new(),
            hops_stale: true,
            neighbours_told: Vec::new(),
            expectations: Vec::new(),
            arp_socket: None,
            src_mac: None,
        };
        prober
            .maps
            .config
            .set(0, prober.config, 0)
            .context("writing PROBE_CONFIG")?;
        prober.sync_targets(specs)?;
        Ok(prober)
    }

    /// How many probes the datapath holds (its maps' size, set at load).
    pub fn capacity(&self) -> u32 {
        self.maps.targets.len()
    }

    /// The targets with their ids.
    pub fn targets(&self) -> impl Iterator<Item = (u32, &Target)> {
        self.targets
            .iter()
            .enumerate()
            .filter_map(|(id, t)| Some((id as u32, t.as_ref()?)))
    }

    /// One past the highest target id in use (or freed and not reused).
    pub fn targets_len(&self) -> usize {
        self.targets.len()
    }

    /// The interface probes leave by.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The id of a probe, if it is a target.
    pub fn id_of(&self, spec: &ProbeSpec) -> Option<u32> {
        self.ids.get(spec).copied()
    }

    /// The probe with target id `id`.
    pub fn spec_of(&self, id: u32) -> Option<ProbeSpec> {
        Some(self.targets.get(id as usize)?.as_ref()?.spec)
    }

    /// Whole neighbour table reads, and neighbour entries followed one by
    /// one from the kernel's notifications, so far.
    pub fn neighbour_reads(&self) -> (u64, u64) {
        (self.neighbour_table_reads, self.neighbour_changes_followed)
    }

    /// How many probes are paused.
    pub fn paused_count(&self) -> usize {
        self.paused
    }

    /// Whether probe `id` is paused (see [`Prober::set_paused`]).
    pub fn paused(&self, id: u32) -> bool {
        self.targets
            .get(id as usize)
            .and_then(Option::as_ref)
            .is_some_and(|t| t.paused)
    }

    /// Stops sending probe `id` (its entry stays, so a reply to its last
    /// probe still counts) or sends it again from its next turn: its
    /// counts and state carry on. A change of an entry not yet written
    /// goes with its first write.
    pub fn set_paused(&mut self, id: u32, paused: bool) -> Result<()> {
        let Some(target) = self.targets.get_mut(id as usize).and_then(Option::as_mut) else {
            return Ok(());
        };
        if target.paused == paused {
            return Ok(());
        }
        target.paused = paused;
        if paused {
            self.paused += 1;
        } else {
            self.paused -= 1;
        }
        // A changed path is written with its new MAC by the next
        // neighbour read, flag and all.
        if let (Some(mac), Ok(path), Some(src_mac), false) = (
            target.written_mac,
            &target.path,
            self.src_mac,
            target.path_changed,
        ) {
            let entry = probe_entry(target, path, src_mac, mac);
            self.maps
                .targets
                .set(id, entry, 0)
                .context("writing PROBE_TARGETS")?;
        }
        Ok(())
    }

    /// Makes the target set exactly `specs`: a probe already there keeps
    /// its id, local port and counters; a new one gets a free id and a local
    /// port no other probe to the same address and port uses; a dropped one
    /// is cleared from the maps. Then paths are resolved for all.
    pub fn sync_targets(&mut self, specs: &[ProbeSpec]) -> Result<()> {
        let wanted: std::collections::HashSet<ProbeSpec> = specs.iter().copied().collect();
        if wanted.len() > self.capacity() as usize {
            bail!(
                "{} probes needed; the datapath holds at most {}",
                wanted.len(),
                self.capacity()
            );
        }
        let gone: Vec<(ProbeSpec, u32)> = self
            .ids
            .iter()
            .filter(|(spec, _)| !wanted.contains(spec))
            .map(|(s, id)| (*s, *id))
            .collect();
        if !gone.is_empty() {
            self.wheel_changed();
        }
        for (spec, id) in gone {
            self.clear_slot(id)?;
            self.ids.remove(&spec);
        }
        // Local ports must differ only among probes to the same remote
        // address and port (e.g. one VIP behind many DR real servers).
        let group = |spec: &ProbeSpec| {
            let port = match spec.kind {
                ProbeKind::TcpSyn { port } => Some(port),
                ProbeKind::IcmpEcho => None,
            };
            (spec.destination, port)
        };
        let mut used: HashMap<(IpAddr, Option<u16>), std::collections::HashSet<u16>> =
            HashMap::new();
        for target in self.targets.iter().flatten() {
            used.entry(group(&target.spec))
                .or_default()
                .insert(target.local_port);
        }
        let mut added = Vec::new();
        // Grown once, to size: pushed one by one, the table of 200-byte
        // targets doubled its way to up to twice what it holds.
        let free = self.targets.iter().filter(|t| t.is_none()).count();
        let new = specs.len().saturating_sub(self.ids.len());
        self.targets.reserve_exact(new.saturating_sub(free));
        // Free ids are searched from where the last one was found.
        let mut free_from = 0;
        for spec in specs {
            if self.ids.contains_key(spec) {
                continue;
            }
            let taken = used.entry(group(spec)).or_default();
            let local_port = (self.config.local_port_min..=self.config.local_port_max)
                .find(|p| !taken.contains(p))
                .with_context(|| {
                    format!(
                        "probe '{spec}': every local port is taken by probes to {}",
                        spec.destination
                    )
                })?;
            taken.insert(local_port);
            let id = match self.targets[free_from..].iter().position(Option::is_none) {
                Some(free) => free_from + free,
                None => {
                    self.targets.push(None);
                    self.targets.len() - 1
                }
            };
            self.targets[id] = Some(Target {
                spec: *spec,
                local_port,
                path: Err("not looked up yet".into()),
                written_mac: None,
                path_changed: false,
                problem: 0,
                neighbour_unresolved: false,
                paused: false,
            });
            self.ids.insert(*spec, id as u32);
            free_from = id + 1;
            added.push(id);
        }
        if !added.is_empty() {
            self.wheel_changed();
            // Only new targets: the others' routes are followed already.
            self.look_up_routes(added);
        }
        self.refresh_neighbours()
    }

    /// Frees a target id: no entry, no reply index, counters back to zero.
    fn clear_slot(&mut self, id: u32) -> Result<()> {
        if let Some(target) = self.targets.get_mut(id as usize).and_then(Option::take) {
            if target.paused {
                self.paused -= 1;
            }
            if target.neighbour_unresolved {
                if let Ok(i) = self.unresolved.binary_search(&id) {
                    self.unresolved.remove(i);
                }
            }
            self.hops_stale = true;
            if target.written_mac.is_some() {
                let _ = self
                    .maps
                    .reply_index
                    .remove(&reply_key(&target.spec, target.local_port));
            }
        }
        self.maps.targets.set(id, ProbeTarget::default(), 0)?;
        self.maps.state.set(id, ProbeState::default(), 0)?;
        self.maps.expect.set(id, Expectation::default(), 0)?;
        if let Some(slot) = self.expectations.get_mut(id as usize) {
            *slot = Expectation::default();
        }
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = PerCpuValues::try_from(vec![ProbeResults::default(); cpus])?;
        self.maps.results.set(id, zeros, 0)?;
        let zeros = PerCpuValues::try_from(vec![RttHistogram::default(); cpus])?;
        self.maps.rtt.set(id, zeros, 0)?;
        Ok(())
    }

    /// Lets the ingress program record agent reports sent to
    /// `address`:`port`, only tagged ones when there is a key.
    pub fn set_agent(
        &mut self,
        address: std::net::Ipv4Addr,
        port: u16,
        key: Option<crate::agent::AgentKey>,
    ) -> Result<()> {
        self.config.agent_port = port;
        self.config.agent_addr = address.octets();
        self.config.agent_auth = key.is_some() as u8;
        self.config.agent_key = key.map_or([0; 2], |k| k.0);
        self.move_agent_window()
    }

    /// Accepts agent sequences within [`AGENT_CLOCK_WINDOW`] of now.
    fn move_agent_window(&mut self) -> Result<()> {
        let now_us = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let slack = AGENT_CLOCK_WINDOW.as_micros() as u64;
        self.config.agent_sequence_min = now_us.saturating_sub(slack);
        self.config.agent_sequence_max = now_us.saturating_add(slack);
        self.agent_window_at = Some(Instant::now());
        self.maps
            .config
            .set(0, self.config, 0)
            .context("writing PROBE_CONFIG")
    }

    /// How the datapath keeps each target's RTT estimate: the weight
    /// policy's time constant and peak rule, and the slack its band
    /// counts in (see [`ProbeConfig::rtt_band_permille`]).
    pub fn set_rtt_estimate(&mut self, decay: Duration, peak: bool, slack: Duration) -> Result<()> {
        self.config.rtt_decay_us = decay.as_micros().min(u32::MAX as u128) as u32;
        self.config.rtt_peak = u8::from(peak);
        self.config.rtt_slack_us = slack.as_micros().min(u32::MAX as u128) as u32;
        self.maps
            .config
            .set(0, self.config, 0)
            .context("writing PROBE_CONFIG")
    }

    /// How long the send wheel takes to turn: the shortest interval
    /// (see [`ProbeConfig::send_turn_us`]).
    pub fn set_send_turn(&mut self, turn: Duration) -> Result<()> {
        self.config.send_turn_us = turn.as_micros().min(u32::MAX as u128) as u32;
        self.maps
            .config
            .set(0, self.config, 0)
            .context("writing PROBE_CONFIG")
    }

    pub fn rotate_secret(&mut self) -> Result<()> {
        self.config.previous_secret = self.config.secret;
        self.config.secret = random_secret()?;
        self.maps
            .config
            .set(0, self.config, 0)
            .context("writing PROBE_CONFIG")?;
        self.last_rotation = Instant::now();
        Ok(())
    }
}

/// The reply index key of a probe: what its replies carry.
pub fn reply_key(spec: &ProbeSpec, local_port: u16) -> ReplyKey {
    let (remote_port, protocol) = match spec.kind {
        ProbeKind::TcpSyn { port } => (port.to_be(), libc::IPPROTO_TCP as u8),
        ProbeKind::IcmpEcho => (0, libc::IPPROTO_ICMP as u8),
    };
    ReplyKey {
        remote_addr: addr16(spec.destination),
        remote_port,
        local_port: local_port.to_be(),
        family: family_code(spec.destination),
        protocol,
        _pad: [0; 2],
    }
}

/// The `PROBE_TARGETS` entry of a target whose path and next-hop MAC are
/// known.
pub fn probe_entry(
    target: &Target,
    path: &Path,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> ProbeTarget {
    let mut entry = spec_entry(&target.spec, target.local_port, path, src_mac, dst_mac);
    if target.paused {
        entry.flags |= target_flags::PAUSED;
    }
    entry
}

/// The `PROBE_TARGETS` entry of probe `spec` sent from `local_port`.
pub fn spec_entry(
    spec: &ProbeSpec,
    local_port: u16,
    path: &Path,
    src_mac: [u8; 6],
    dst_mac: [u8; 6],
) -> ProbeTarget {
    let (kind, dst_port) = match spec.kind {
        ProbeKind::TcpSyn { port } => (probe_kind::TCP_SYN, port.to_be()),
        ProbeKind::IcmpEcho => (probe_kind::ICMP_ECHO, 0),
    };
    ProbeTarget {
        dst_mac,
        src_mac,
        kind,
        family: family_code(spec.destination),
        encap: match spec.forwarding {
            Forwarding::Tunnel { .. } => encap::IPIP,
            _ => encap::NONE,
        },
        flags: 0,
        dst_port,
        src_port: local_port.to_be(),
        ifindex: path.ifindex,
        src_addr: addr16(path.source),
        dst_addr: addr16(spec.destination),
        outer_src: addr16(path.source),
        real_server: addr16(spec.real_server()),
    }
}

pub fn addr16(addr: IpAddr) -> [u8; 16] {
    match addr {
        IpAddr::V4(a) => {
            let mut out = [0u8; 16];
            out[..4].copy_from_slice(&a.octets());
            out
        }
        IpAddr::V6(a) => a.octets(),
    }
}

fn family_code(addr: IpAddr) -> u8 {
    if addr.is_ipv4() {
        family::IPV4
    } else {
        family::IPV6
    }
}

fn random_secret() -> Result<[u64; 2]> {
    let mut bytes = [0u8; 16];
    // SAFETY: getrandom fills at most bytes.len() bytes of our buffer.
    let n = unsafe { libc::getrandom(bytes.as_mut_ptr().cast(), bytes.len(), 0) };
    if n != bytes.len() as isize {
        bail!("getrandom: {}", std::io::Error::last_os_error());
    }
    Ok([
        u64::from_ne_bytes(bytes[..8].try_into()?),
        u64::from_ne_bytes(bytes[8..].try_into()?),
    ])
}
