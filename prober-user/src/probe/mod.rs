//! Active probing: turns probe specs into `PROBE_TARGETS` entries (with
//! addresses and MACs from the kernel), sends each round as one
//! BPF_PROG_TEST_RUN batch of `probe_tx`, rotates the cookie secret, and
//! reads back what the ingress program recorded.

pub mod delivery;
pub mod report;
pub mod schedule;
mod send;
pub mod spec;
pub mod transmit;

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
    encap, family, probe_kind, BatchCursor, ProbeConfig, ProbeResults, ProbeState, ProbeTarget,
    ReplyKey, PROBE_FRAME_MAX,
};
use tracing::{info, warn};

pub use send::Sent;
pub use spec::{Forwarding, ProbeKind, ProbeSpec};

use crate::{
    map_batch::ArraySnapshot,
    rtnetlink::{ChangeWatch, RouteSocket},
};

/// Routes are looked up again at least this often, in case a change
/// notification was lost.
pub const ROUTE_REFRESH: Duration = Duration::from_secs(30);

/// Local ports for probes by default: above Linux's ephemeral range
/// (32768-60999), so no local connection shares a probe's 4-tuple.
pub const DEFAULT_LOCAL_PORTS: (u16, u16) = (61000, 65535);

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
}

/// A pass over every next hop in use, marking each used in turn.
struct NeighbourKeepalive {
    hops: Vec<(u32, IpAddr)>,
    cursor: usize,
    /// When the last slice was done, and when this pass began.
    at: Instant,
    pass_started: Option<Instant>,
    /// How long one whole pass takes.
    period: Duration,
}

impl NeighbourKeepalive {
    fn new(interface: &str) -> Self {
        // A third of the time after which the kernel may collect an idle
        // entry (procfs shows this namespace's value).
        let stale = std::fs::read_to_string(format!(
            "/proc/sys/net/ipv4/neigh/{interface}/gc_stale_time"
        ))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .unwrap_or(60);
        Self {
            hops: Vec::new(),
            cursor: 0,
            at: Instant::now(),
            pass_started: None, // the first pass is due at once
            period: Duration::from_secs(stale.max(3) / 3),
        }
    }
}

/// Least time between two resolution requests for one next hop: a dead
/// rack costs few ARP requests.
const RESOLUTION_BACKOFF: Duration = Duration::from_secs(60);

/// What the datapath recorded for one target so far (per-CPU slots summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    pub unreachable: u64,
    /// RTT of the newest positive reply, ns (0: none yet).
    pub last_rtt_ns: u64,
}

impl Counts {
    /// Replies of any kind: answers, refusals, ICMP errors.
    pub fn replies(&self) -> u64 {
        self.answered + self.refused + self.unreachable
    }
}

/// One target's state and its per-CPU results folded into [`Counts`].
fn sum_counts(state: ProbeState, results: impl Iterator<Item = ProbeResults>) -> Counts {
    let mut counts = Counts {
        sent: state.sent,
        ..Default::default()
    };
    let mut newest = 0;
    for cpu in results {
        counts.answered += cpu.answered;
        counts.refused += cpu.refused;
        counts.unreachable += cpu.unreachable;
        if cpu.last_reply_ns > newest {
            newest = cpu.last_reply_ns;
            counts.last_rtt_ns = cpu.last_rtt_ns;
        }
    }
    counts
}

/// Every probe's results as [`Prober::reports`] read them.
pub struct ProbeReports {
    states: ArraySnapshot<ProbeState>,
    results: ArraySnapshot<ProbeResults>,
}

impl ProbeReports {
    /// Probe `id`'s report (all zero if it was not read).
    pub fn get(&self, id: u32) -> ProbeReport {
        let id = id as usize;
        let state = self.states.get(id, 0).unwrap_or_default();
        let mut report = ProbeReport {
            sent: state.sent,
            timed_out: state.timed_out,
            rtt_log2_us: vec![0; prober_common::RTT_BUCKETS],
            ..Default::default()
        };
        for cpu in self.results.per_cpu(id) {
            report.answered += cpu.answered;
            report.refused += cpu.refused;
            report.unreachable += cpu.unreachable;
            for (sum, n) in report.rtt_log2_us.iter_mut().zip(cpu.rtt_log2_us) {
                *sum += n;
            }
        }
        report
    }
}

/// One probe's results, for `status`.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub timed_out: u64,
    pub rtt_log2_us: Vec<u64>,
}

/// One configured probe and what the kernel told us about its path.
#[derive(Debug, Clone)]
pub struct Target {
    pub spec: ProbeSpec,
    pub local_port: u16,
    /// The kernel's route to the real server, or why there is none usable.
    pub path: Result<Path, String>,
    /// The entry written to `PROBE_TARGETS`, once its path is known.
    pub entry: Option<ProbeTarget>,
    /// Why the probe cannot be sent (route, neighbour), if it cannot.
    pub problem: Option<String>,
    /// The route is fine but the next hop's MAC is not known: the host does
    /// not answer ARP, which counts against it.
    pub neighbour_unresolved: bool,
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
    probe_tx: ProgramFd,
    ifindex: u32,
    interface: String,
    /// Indexed by target id; None: a free id.
    targets: Vec<Option<Target>>,
    ids: HashMap<ProbeSpec, u32>,
    config: ProbeConfig,
    last_rotation: Instant,
    routes: RouteSocket,
    changes: ChangeWatch,
    last_route_lookup: Instant,
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
    lost_logged: Option<Instant>,
    /// When the window of acceptable agent sequences was last moved.
    agent_window_at: Option<Instant>,
    /// The blocks read by [`Prober::read_counts`]: one syscall per map per
    /// block due, not one per target, and no allocation per tick.
    states: ArraySnapshot<ProbeState>,
    results: ArraySnapshot<ProbeResults>,
    /// Counters of the ids read by the last `read_counts` (those whose
    /// generation is the current one).
    cached: Vec<(u64, Counts)>,
    generation: u64,
    /// Whether probe frames seem to vanish (a veth without an XDP peer).
    delivery: delivery::DeliveryWatch,
    /// Live frames, or a packet socket where the kernel refuses them.
    transmit: transmit::Transmit,
    keepalive: NeighbourKeepalive,
    cpus: usize,
    send_buffers: send::SendBuffers,
}

impl Prober {
    pub fn new(
        maps: ProbeMaps,
        probe_tx: ProgramFd,
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
        };
        let mut prober = Self {
            maps,
            probe_tx,
            ifindex,
            interface: interface.to_string(),
            targets: Vec::new(),
            ids: HashMap::new(),
            config,
            last_rotation: Instant::now(),
            routes: RouteSocket::open()?,
            changes: ChangeWatch::open()?,
            last_route_lookup: Instant::now(),
            frame: vec![0u8; PROBE_FRAME_MAX],
            revalidations: Nudges::new(Duration::from_secs(1)),
            resolutions: Nudges::new(RESOLUTION_BACKOFF),
            last_unresolved_refresh: None,
            notifications_lost: 0,
            lost_logged: None,
            agent_window_at: None,
            states: ArraySnapshot::default(),
            results: ArraySnapshot::default(),
            cached: Vec::new(),
            generation: 0,
            delivery: delivery::DeliveryWatch::new(interface),
            transmit: transmit::Transmit::new(transmit::TransmitMode::Auto)?,
            keepalive: NeighbourKeepalive::new(interface),
            cpus: aya::util::nr_cpus()
                .map_err(|(what, e)| anyhow::anyhow!("reading {what}: {e}"))?,
            send_buffers: send::SendBuffers::default(),
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

    /// Lifts the back-off on neighbour resolution requests (the link just
    /// came back and the kernel forgot every neighbour).
    pub fn resolve_neighbours_now(&mut self) {
        self.resolutions = Nudges::new(RESOLUTION_BACKOFF);
    }

    /// The interface probes leave by.
    pub fn interface(&self) -> &str {
        &self.interface
    }

    /// The id of a probe, if it is a target.
    pub fn id_of(&self, spec: &ProbeSpec) -> Option<u32> {
        self.ids.get(spec).copied()
    }

    /// Whether some target waits for its next hop's MAC.
    pub fn any_neighbour_unresolved(&self) -> bool {
        self.targets
            .iter()
            .flatten()
            .any(|t| t.neighbour_unresolved)
    }

    /// Whether target `id` waits for its next hop's MAC.
    pub fn neighbour_unresolved(&self, id: u32) -> bool {
        self.targets
            .get(id as usize)
            .and_then(Option::as_ref)
            .is_some_and(|t| t.neighbour_unresolved)
    }

    /// Target `id`'s probe went unanswered: the real server may have a new
    /// MAC address that the kernel's neighbour entry does not know yet (our
    /// probes bypass the stack, so nothing else makes the kernel check).
    /// NTF_USE is a no-op while the entry is fresh; once it is stale the
    /// kernel probes it again, and a new MAC reaches the maps through the
    /// neighbour notification. At most once a second per next hop.
    pub fn revalidate_neighbour(&mut self, id: u32) -> Result<()> {
        let Some(Ok(path)) = self
            .targets
            .get(id as usize)
            .and_then(Option::as_ref)
            .map(|t| t.path.as_ref())
        else {
            return Ok(());
        };
        let (ifindex, next_hop) = (path.ifindex, path.next_hop);
        if !self
            .revalidations
            .allow(next_hop, Instant::now(), self.ids.len())
        {
            return Ok(());
        }
        self.routes.request_resolution(ifindex, next_hop)
    }

    /// What the datapath recorded for target `id`.
    pub fn counts(&self, id: u32) -> Result<Counts> {
        let state = self.maps.state.get(&id, 0)?;
        Ok(sum_counts(
            state,
            self.maps.results.get(&id, 0)?.iter().copied(),
        ))
    }

    /// Reads the counters of `ids` (sorted), one batched read per map for
    /// each block of ids that share a phase (see `schedule`), for
    /// [`Prober::fresh_counts`]. A block that cannot be read is read one by
    /// one by `fresh_counts`.
    pub fn read_counts(&mut self, ids: &[u32]) -> Result<()> {
        self.generation += 1;
        let len = self.targets.len();
        if self.cached.len() < len {
            self.cached.resize(len, (0, Counts::default()));
        }
        let mut result = Ok(());
        let mut i = 0;
        while i < ids.len() {
            let block = ids[i] / schedule::BLOCK;
            let first = ids[i];
            let mut last = first;
            while i < ids.len() && ids[i] / schedule::BLOCK == block {
                last = ids[i];
                i += 1;
            }
            let count = last - first + 1;
            let read = self
                .states
                .read_range(&self.maps.state, first, count)
                .context("reading PROBE_STATE")
                .and_then(|()| {
                    self.results
                        .read_per_cpu_range(&self.maps.results, first, count, self.cpus)
                        .context("reading PROBE_RESULTS")
                });
            if let Err(e) = read {
                result = Err(e);
                continue;
            }
            for id in first..=last {
                let Some(state) = self.states.get(id as usize, 0) else {
                    continue;
                };
                if let Some(slot) = self.cached.get_mut(id as usize) {
                    *slot = (
                        self.generation,
                        sum_counts(state, self.results.per_cpu(id as usize)),
                    );
                }
            }
        }
        result
    }

    /// [`Prober::counts`] as of the last [`Prober::read_counts`] that
    /// read `id` (read directly otherwise).
    pub fn fresh_counts(&self, id: u32) -> Result<Counts> {
        match self.cached.get(id as usize) {
            Some((generation, counts)) if *generation == self.generation => Ok(*counts),
            _ => self.counts(id),
        }
    }

    /// The probe with target id `id`.
    pub fn spec_of(&self, id: u32) -> Option<ProbeSpec> {
        Some(self.targets.get(id as usize)?.as_ref()?.spec)
    }

    /// Every probe's results, each map read in one batch (two syscalls in
    /// all, not two per probe: `status` at 100,000 probes runs on the
    /// daemon's thread between ticks).
    pub fn reports(&self) -> Result<ProbeReports> {
        let count = self.targets.len() as u32;
        let mut states = ArraySnapshot::default();
        let mut results = ArraySnapshot::default();
        if count > 0 {
            states
                .read(&self.maps.state, count)
                .context("reading PROBE_STATE")?;
            results
                .read_per_cpu(&self.maps.results, count, self.cpus)
                .context("reading PROBE_RESULTS")?;
        }
        Ok(ProbeReports { states, results })
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
        let mut added = false;
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
                entry: None,
                problem: None,
                neighbour_unresolved: false,
            });
            self.ids.insert(*spec, id as u32);
            free_from = id + 1;
            added = true;
        }
        if added {
            self.look_up_routes();
        }
        self.refresh_neighbours()
    }

    /// Frees a target id: no entry, no reply index, counters back to zero.
    fn clear_slot(&mut self, id: u32) -> Result<()> {
        if let Some(target) = self.targets.get_mut(id as usize).and_then(Option::take) {
            if target.entry.is_some() {
                let _ = self
                    .maps
                    .reply_index
                    .remove(&reply_key(&target.spec, target.local_port));
            }
        }
        self.maps.targets.set(id, ProbeTarget::default(), 0)?;
        self.maps.state.set(id, ProbeState::default(), 0)?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let zeros = PerCpuValues::try_from(vec![ProbeResults::default(); cpus])?;
        self.maps.results.set(id, zeros, 0)?;
        Ok(())
    }

    /// Follows the kernel: routes again after route, address or link
    /// changes (and every `ROUTE_REFRESH` in case a notification was
    /// missed), MACs again after neighbour changes or while some are
    /// unresolved. Cheap when nothing changed: one non-blocking read.
    pub fn follow_kernel(&mut self) -> Result<()> {
        let changes = self.changes.poll();
        if changes.lost {
            self.notifications_lost += 1;
            if self
                .lost_logged
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(60))
            {
                info!(
                    times = self.notifications_lost,
                    "route and neighbour notifications lost (ENOBUFS): reading every path again"
                );
                self.lost_logged = Some(Instant::now());
            }
        }
        let stale = self.last_route_lookup.elapsed() >= ROUTE_REFRESH;
        if changes.routes || stale {
            self.look_up_routes();
        }
        // Targets without a neighbour are retried once a second: the
        // kernel's answer also comes as a notification.
        let unresolved_due = self
            .last_unresolved_refresh
            .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
            && self.targets.iter().flatten().any(|t| t.entry.is_none());
        if unresolved_due {
            self.last_unresolved_refresh = Some(Instant::now());
        }
        if changes.routes || changes.neighbours || stale || unresolved_due {
            self.refresh_neighbours()?;
        }
        self.keep_neighbours_alive();
        Ok(())
    }

    /// Frames sent from XDP never confirm a neighbour entry, and replies
    /// dropped in XDP never reach the neighbour code: with more on-link real
    /// servers than gc_thresh1 (128) the kernel would collect the idle
    /// entries, and probes would wait for ARP. Each next hop in use is
    /// marked used (NTF_USE, as traffic would: a stale entry is re-probed)
    /// once per a third of the interface's gc_stale_time, spread over the
    /// ticks. A failed request skips that hop.
    fn keep_neighbours_alive(&mut self) {
        let now = Instant::now();
        let period = self.keepalive.period;
        let since = now.saturating_duration_since(self.keepalive.at);
        self.keepalive.at = now;
        if self.keepalive.cursor >= self.keepalive.hops.len() {
            // One pass per period: the next starts when it is due.
            if self
                .keepalive
                .pass_started
                .is_some_and(|at| now.saturating_duration_since(at) < period)
            {
                return;
            }
            self.keepalive.pass_started = Some(now);
            let hops: std::collections::BTreeSet<(u32, IpAddr)> = self
                .targets
                .iter()
                .flatten()
                .filter(|t| t.entry.is_some())
                .filter_map(|t| t.path.as_ref().ok())
                .map(|p| (p.ifindex, p.next_hop))
                .collect();
            self.keepalive.hops = hops.into_iter().collect();
            self.keepalive.cursor = 0;
        }
        let len = self.keepalive.hops.len();
        let budget = ((since.as_secs_f64() / period.as_secs_f64()) * len as f64).ceil() as usize;
        let end = (self.keepalive.cursor + budget.max(1)).min(len);
        let mut failed = 0;
        for i in self.keepalive.cursor..end {
            let (ifindex, hop) = self.keepalive.hops[i];
            if self.routes.request_resolution(ifindex, hop).is_err() {
                failed += 1;
            }
        }
        self.keepalive.cursor = end;
        if failed > 0 {
            tracing::debug!(
                failed,
                "keeping neighbour entries alive: some requests failed"
            );
        }
    }

    /// One route lookup per distinct real server.
    fn look_up_routes(&mut self) {
        let mut by_server: HashMap<IpAddr, Result<Path, String>> = HashMap::new();
        for target in self.targets.iter_mut().flatten() {
            let server = target.spec.real_server();
            let path = by_server
                .entry(server)
                .or_insert_with(|| {
                    route_for(&mut self.routes, server, self.ifindex, &self.interface)
                        .map_err(|e| format!("{e:#}"))
                })
                .clone();
            target.path = match (path, target.spec.forwarding) {
                (Ok(path), Forwarding::DirectRouting { .. }) if path.next_hop != server => {
                    Err(format!(
                        "direct-routing real server {server} is not on-link (route via {})",
                        path.next_hop
                    ))
                }
                (path, _) => path,
            };
        }
        self.last_route_lookup = Instant::now();
    }

    /// Reads the neighbour table once and rewrites the entries whose MAC
    /// (or path) changed; asks the kernel to resolve missing next hops.
    pub fn refresh_neighbours(&mut self) -> Result<()> {
        let neighbours: HashMap<(u32, IpAddr), [u8; 6]> = self
            .routes
            .neighbours(false)?
            .into_iter()
            .filter_map(|n| Some(((n.ifindex, n.addr), n.mac?)))
            .collect();
        let src_mac = self.routes.link_mac(self.ifindex)?;
        let now = Instant::now();
        // A hop resolved again starts its backoff afresh next time.
        for (_, addr) in neighbours.keys() {
            self.resolutions.forget(addr);
        }
        let mut resolution_requested = std::collections::HashSet::new();
        for id in 0..self.targets.len() {
            let Some(target) = &self.targets[id] else {
                continue;
            };
            let resolved = match &target.path {
                Err(problem) => Err(problem.clone()),
                Ok(path) => match neighbours.get(&(path.ifindex, path.next_hop)) {
                    Some(mac) => Ok(probe_entry(
                        &target.spec,
                        target.local_port,
                        path,
                        src_mac,
                        *mac,
                    )),
                    None => {
                        if resolution_requested.insert(path.next_hop)
                            && self.resolutions.allow(path.next_hop, now, self.ids.len())
                        {
                            // A failed request skips this hop, not the rest.
                            if let Err(e) =
                                self.routes.request_resolution(path.ifindex, path.next_hop)
                            {
                                warn!("{e:#}");
                            }
                        }
                        Err(format!(
                            "neighbour {} on {} is not resolved yet (resolution requested)",
                            path.next_hop, self.interface
                        ))
                    }
                },
            };
            let unresolved = matches!(&target.path, Ok(path) if !neighbours.contains_key(&(path.ifindex, path.next_hop)));
            let (entry, problem) = match resolved {
                Ok(entry) => (Some(entry), None),
                Err(problem) => (None, Some(problem)),
            };
            let Some(target) = &mut self.targets[id] else {
                continue;
            };
            target.neighbour_unresolved = unresolved;
            if target.problem != problem {
                match &problem {
                    Some(p) => warn!(probe = %target.spec, "cannot probe: {p}"),
                    None => info!(probe = %target.spec, "path resolved"),
                }
            }
            if entry != target.entry {
                let written = entry.unwrap_or_default(); // kind 0: slot unused
                self.maps
                    .targets
                    .set(id as u32, written, 0)
                    .context("writing PROBE_TARGETS")?;
                let key = reply_key(&target.spec, target.local_port);
                if entry.is_some() {
                    self.maps
                        .reply_index
                        .insert(key, id as u32, 0)
                        .context("writing REPLY_INDEX")?;
                } else if target.entry.is_some() {
                    let _ = self.maps.reply_index.remove(&key);
                }
                target.entry = entry;
            }
            target.problem = problem;
        }
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

/// Requests to the kernel about next hops, at most one per next hop per
/// backoff: 1 s, doubling up to `most` (1 s: no backoff), fresh again after
/// a quiet `most`.
struct Nudges {
    most: Duration,
    next: HashMap<IpAddr, (Instant, Duration)>,
}

impl Nudges {
    const FIRST: Duration = Duration::from_secs(1);

    fn new(most: Duration) -> Self {
        Self {
            most,
            next: HashMap::new(),
        }
    }

    /// Whether `hop` may be nudged now; if so, books the next time.
    fn allow(&mut self, hop: IpAddr, now: Instant, targets: usize) -> bool {
        let backoff = match self.next.get(&hop) {
            Some((next, _)) if now < *next => return false,
            Some((next, backoff)) if now < *next + self.most => (*backoff * 2).min(self.most),
            _ => Self::FIRST,
        };
        if self.next.len() > 2 * targets + 1024 {
            let most = self.most;
            self.next.retain(|_, (next, _)| now < *next + most);
        }
        self.next.insert(hop, (now + backoff, backoff));
        true
    }

    fn forget(&mut self, hop: &IpAddr) {
        self.next.remove(hop);
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

/// The kernel's route to `real_server`, checked to leave by the probed
/// interface (replies are matched there) and to have a source address.
fn route_for(
    routes: &mut RouteSocket,
    real_server: IpAddr,
    probe_ifindex: u32,
    interface: &str,
) -> Result<Path> {
    let route = routes.route_to(real_server)?;
    if route.ifindex != probe_ifindex {
        bail!(
            "the route to {real_server} leaves by interface index {}, not by {interface}, where replies are matched",
            route.ifindex
        );
    }
    let source = route
        .source
        .with_context(|| format!("no source address on the route to {real_server}"))?;
    Ok(Path {
        ifindex: route.ifindex,
        next_hop: route.next_hop(real_server),
        source,
    })
}

/// The `PROBE_TARGETS` entry of a probe whose path and next-hop MAC are known.
pub fn probe_entry(
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
        _pad0: 0,
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
