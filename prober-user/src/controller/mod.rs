//! The controller: IPVS and the config give targets, the datapath probes
//! them and the checker runs their L7 checks, results feed each probe's
//! and check's health and latency, agents add their own word, each virtual
//! service's weights follow, and changed weights go to IPVS in batches,
//! read and written on a thread of its own (`ipvs_worker`). Health changes
//! also go to the alerts, which name one root cause each.
//!
//! config/IPVS -> targets -> probes -> results -> health -> weights -> IPVS

mod act;
mod decide;
mod diagnosis;
mod discover;
mod ipvs_worker;
mod observe;
mod send;
mod status;
mod tracks;

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use prober_common::{expected, outcome, Expectation, HealthRecord, ProbeEvent};
use prober_ipvs::{
    ChangeOutcome, Destination, DestinationKey, ServiceKey, WeightChange, WeightUpdate,
};
// The controller's own tables are keyed by what IPVS and the
// configuration name, never by what arrives from the network: a fast
// unkeyed hash is safe there, and SipHash was a sixth of a tick's CPU.
use rustc_hash::FxHashMap;
use tokio::{sync::mpsc, task::AbortHandle};
use tracing::{debug, info, warn};

use crate::{
    agents::{AgentState, Agents},
    checks::{self, CheckReport, CheckSpec, Checker, Outcome},
    config::{Config, ManualWeights, DEFAULT_DISCOVERY},
    director_fault::{self, DirectorPath},
    events::{sink::Sink, Alerts},
    health::{Cause, Health, Observations, State},
    ipvs_changes::{fallback_discovery, Changed, IpvsChangeSignal},
    passive::{self, Passive},
    probe::{
        schedule::{self, MOST_SLOTS_PER_TICK},
        MonotonicClock, ProbeSpec, Prober,
    },
    state::{health_key, weight_key, StateStore},
    targets::{self, CheckSettings, Plan},
    weights::{pool_weights, LatencyEwma, Member},
};

/// Server resets plus resent client SYNs in one interval that are logged
/// (at debug) when they outnumber the handshakes that succeeded.
const PASSIVE_BURST: u64 = 5;

/// Latency estimates are saved for restarts this often.
const LATENCY_SAVE: Duration = Duration::from_secs(2);
/// After the carrier comes back, how long next hops still being resolved
/// keep the director suspected.
const LINK_SETTLE: Duration = Duration::from_secs(10);
/// While every probe is silent, the next hops of this many silent hosts
/// are asked (ARP), this often: one answer shows the director's path works.
const NEIGHBOURS_ASKED: usize = 4;
const NEIGHBOUR_ASK_EVERY: Duration = Duration::from_millis(250);
/// Unprobed destinations named one by one in a discovery's warnings.
const UNCHECKED_NAMED: usize = 20;
/// Batches of IPVS writes this large are logged with their duration.
const LARGE_BATCH: usize = 100;

struct CheckTrack {
    settings: CheckSettings,
    task: AbortHandle,
    health: Health,
    evidence: bool,
    /// The weight the last run gave (commands may print one).
    weight: Option<u32>,
    /// Why the last run failed.
    failure: Option<String>,
}

impl Drop for CheckTrack {
    fn drop(&mut self) {
        self.task.abort();
    }
}

struct DestTrack {
    configured: u32,
    written: Option<u32>,
    /// The weight in IPVS, as dumped or as written since.
    current: u32,
    /// What the policy last wanted (written or not).
    computed: Option<u32>,
    /// A weight prober tried to write when the socket failed mid-batch:
    /// found in IPVS, it is prober's own, not an operator's.
    unsure: Option<u32>,
    /// Boxed: most destinations of a large director never change.
    last_change: Option<Box<crate::status::Change>>,
}

impl DestTrack {
    /// Whether `weight`, found in IPVS, is the write of unknown outcome
    /// (which is then taken as prober's own and no longer pending).
    fn own_unsure_write(&mut self, weight: u32) -> bool {
        if self.unsure.take() != Some(weight) {
            return false;
        }
        self.written = Some(weight);
        self.current = weight;
        true
    }
}

/// Running totals for `prober status` and the metrics.
#[derive(Default)]
struct Totals {
    weight_writes: u64,
    weight_write_errors: u64,
    netlink_errors: u64,
    events: BTreeMap<String, u64>,
    /// The most probes sent in one tick, and the sends that went out over
    /// half an interval after their grid point (see `probe::schedule`).
    largest_send: u64,
    sends_late: u64,
    late_to_say: SaidEveryMinute,
    /// Probe frames the probing interface dropped as they were sent.
    frames_dropped_here: u64,
    /// Wheel entries a full ring left unwalked until their next turn.
    sends_held_back: u64,
    drops_to_say: SaidEveryMinute,
    /// Outcomes the datapath reported (only news: see `take_probe_events`).
    probe_events: u64,
    /// Wheel slots not walked in their turn (a whole turn behind).
    slots_skipped: u64,
    /// Pools recomputed (see `pool_settled`).
    pools_recomputed: u64,
    /// Where the wakes' time went.
    wake_ms: crate::status::WakeTimes,
    skipped_to_say: SaidEveryMinute,
    /// Full IPVS dumps asked for; configuration calls signalled.
    ipvs_dumps: u64,
    ipvs_changes_signalled: u64,
}

/// A count logged at most once a minute: what accrued since it was last
/// said.
#[derive(Default)]
struct SaidEveryMinute {
    unsaid: u64,
    said_at: Option<Instant>,
}

impl SaidEveryMinute {
    /// Adds `n`; returns the count to say now, if it is time.
    fn add(&mut self, n: u64, now: Instant) -> Option<u64> {
        self.unsaid += n;
        let recently = self
            .said_at
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(60));
        if self.unsaid == 0 || recently {
            return None;
        }
        self.said_at = Some(now);
        Some(std::mem::take(&mut self.unsaid))
    }
}

/// Slots a full ring stopped the walk of: `count` slots from `first`,
/// of which the last `left` entries are still to walk.
#[derive(Debug, Clone, Copy)]
struct SlotsLeft {
    first: u32,
    count: u32,
    left: u32,
    /// When the next part goes.
    resume_at: Instant,
}

pub struct Controller {
    config: Config,
    /// IPVS, read and written on a thread of its own.
    ipvs: ipvs_worker::IpvsWorker,
    /// Whether the last dump succeeded: weights are decided only then.
    ipvs_read: bool,
    /// The batch being written, with why each weight changed.
    writing: Vec<(WeightChange, String)>,
    /// Changes decided while a batch was being written: they go in the
    /// next one, each against the weight the first left.
    writes_waiting: FxHashMap<(ServiceKey, DestinationKey), (WeightChange, String)>,
    /// When the batch being written was handed over.
    write_started: Option<Instant>,
    /// The dump the plan was last built from, hashed; forgotten whenever
    /// prober writes a weight or reloads.
    dump_fingerprint: Option<u64>,
    prober: Prober,
    passive: Passive,
    store: Option<StateStore>,
    plan: Plan,
    probes: tracks::ProbeTracks,
    checker: Checker,
    check_reports: mpsc::UnboundedReceiver<CheckReport>,
    checks: FxHashMap<CheckSpec, CheckTrack>,
    agents: Option<Agents>,
    alerts: Alerts,
    sink: Sink,
    dests: FxHashMap<(ServiceKey, DestinationKey), DestTrack>,
    panicking: HashSet<ServiceKey>,
    /// Whether the director's own path is the likely fault (then every
    /// weight is kept).
    path: DirectorPath,
    /// Whether the interface had carrier at the last tick.
    link_was_up: bool,
    /// When the carrier last came back.
    link_back_at: Option<Instant>,
    /// When the last director-side fault was over.
    fault_cleared_at: Option<Instant>,
    /// Unchecked destinations already warned about.
    warned_unchecked: HashSet<(ServiceKey, DestinationKey)>,
    /// Hosts without their L3 probe for capacity, as last said.
    undiagnosed: usize,
    /// State records not saved (a full map), as last said.
    not_saved: u64,
    totals: Totals,
    next_discovery: Instant,
    ipvs_changes: Option<IpvsChangeSignal>,
    /// Changes signalled and not yet followed by a dump (one in flight
    /// may have begun before them).
    ipvs_changed: Option<Changed>,
    ipvs_problem: Option<String>,
    /// When the send wheel's slot 0 first came, and the next slot to
    /// walk, counted from it.
    epoch: Instant,
    next_slot: u64,
    /// The range of slots (`first`, `count`) a full ring stopped, and how
    /// many of its entries are left.
    slot_left: Option<SlotsLeft>,
    /// This tick's unresolved targets of a slot (kept to reuse).
    due_ids: Vec<u32>,
    /// When each target waiting for its next hop's MAC was last settled
    /// as a timeout, by target id: few at a time, so not in every track.
    unresolved_settled: FxHashMap<u32, Instant>,
    probe_events: Vec<prober_common::ProbeEvent>,
    /// This tick's passive samples (kept to reuse).
    passive_deltas: Vec<(passive::Server, passive::Delta)>,
    /// Hosts whose failed checks wait for their diagnosis, this tick
    /// (sorted), and last tick (kept to reuse).
    diagnosis_hosts: Vec<IpAddr>,
    diagnosis_before: Vec<IpAddr>,
    /// Hosts whose L3 probe goes out because another of their probes fails.
    failing_hosts: diagnosis::FailingHosts,
    /// What the datapath had heard (matched replies, ARP replies) at the
    /// last tick.
    heard: crate::probe::Heard,
    /// When the next hops of silent probes were last asked (ARP).
    neighbours_asked_at: Option<Instant>,
    /// Probes up now: counted at each discovery, kept by each transition
    /// (every wake asks, and a count would cost a pass over every probe).
    up_probes: usize,
    /// Services whose pools a health change touched this tick: recomputed
    /// at once, the others in turn, a share per tick.
    touched: HashSet<ServiceKey>,
    /// Latency-aware services whose pools an RTT move touched since the
    /// last regular tick: recomputed then, once, however many moves came
    /// (on a noisy path nearly every reply moves an estimate, and each
    /// pool would otherwise be recomputed at every wake).
    latency_touched: HashSet<ServiceKey>,
    /// The next pool (index into `plan.by_service`) to recompute in turn,
    /// when pools were last taken in turn, and this tick's pools (kept to
    /// reuse its allocation).
    pool_cursor: usize,
    pools_rotated_at: Option<Instant>,
    /// Pools owed to the rotation, in fractions of one.
    pool_credit: f64,
    /// By pool (index into `plan.by_service`): its last recomputation
    /// changed nothing and nothing in it moves with time (no step to take,
    /// no slow start, no agent, check weight or client response times), so
    /// only a change touching it recomputes it, not the rotation. Reset
    /// with the plan.
    pool_settled: Vec<bool>,
    pools_due: Vec<usize>,
    /// A pool's members as decide weighs them, kept from pool to pool.
    candidates: Vec<decide::Candidate>,
    pool_members: Vec<crate::weights::Member>,
    /// Tests only: each discovery takes this much longer, as one under
    /// load or behind a slow netlink reply does (PROBER_DEBUG_SLOW_DISCOVERY_MS).
    discovery_delay: Option<Duration>,
    /// Until then latency moves no weight: estimates (fresh, or restored
    /// from a run that may have saved them up to `LATENCY_SAVE` ago) first
    /// follow one decay period of live samples, so a restart moves nothing.
    latency_hold_until: Instant,
}

/// Opens the state store when IPVS is first seen (a daemon on a host
/// without IPVS pins nothing that outlives it).
pub type OpenStore<'a> = &'a mut dyn FnMut() -> Result<StateStore>;

/// The controller's optional parts.
pub struct Extras {
    /// Lets L7 checks reach the VIP on direct-routing real servers.
    pub gate: Option<checks::dr::Gate>,
    /// Agent reports (when `[agent]` is configured).
    pub agents: Option<Agents>,
    /// IPVS configuration changes signalled by the kernel; None: the
    /// kernel refused the kretprobes, IPVS is dumped periodically only.
    pub ipvs_changes: Option<IpvsChangeSignal>,
}

impl Controller {
    /// Must be called within a tokio runtime (checks run as tasks).
    pub fn new(
        config: Config,
        prober: Prober,
        passive: Passive,
        extras: Extras,
        now: Instant,
    ) -> Self {
        let (checker, check_reports) = Checker::new(config.max_checks, extras.gate);
        let diagnosis = diagnosis_window(&config);
        let mut prober = prober;
        if let Err(e) = set_rtt_estimate(&mut prober, &config) {
            warn!("{e:#}: the datapath's RTT estimate takes each sample as it comes");
        }
        if let Err(e) = prober.set_send_turn(shortest_interval(&config)) {
            warn!("{e:#}: targets are sent at every turn of the send wheel");
        }
        Self {
            checker,
            check_reports,
            checks: FxHashMap::default(),
            agents: extras.agents,
            alerts: {
                let mut alerts = Alerts::new(config.alerts.clone(), diagnosis);
                alerts.set_settle_probes(u64::from(config.limits.fall) + 1);
                alerts
            },
            sink: Sink::new(&config.alerts),
            // Tests only: a netlink receive queue too small for a batch's
            // acks, so writes apply but their acks are lost to ENOBUFS.
            ipvs: ipvs_worker::IpvsWorker::start(
                std::env::var("PROBER_DEBUG_NETLINK_RECEIVE_QUEUE")
                    .ok()
                    .and_then(|bytes| bytes.parse().ok()),
            ),
            ipvs_read: false,
            writing: Vec::new(),
            writes_waiting: FxHashMap::default(),
            write_started: None,
            dump_fingerprint: None,
            prober,
            passive,
            probe_events: Vec::new(),
            passive_deltas: Vec::new(),
            diagnosis_hosts: Vec::new(),
            diagnosis_before: Vec::new(),
            failing_hosts: Default::default(),
            heard: Default::default(),
            neighbours_asked_at: None,
            store: None,
            plan: Plan::default(),
            probes: tracks::ProbeTracks::default(),
            dests: FxHashMap::default(),
            panicking: HashSet::new(),
            path: DirectorPath::new(),
            link_was_up: true,
            link_back_at: None,
            fault_cleared_at: None,
            warned_unchecked: HashSet::new(),
            undiagnosed: 0,
            not_saved: 0,
            totals: Totals::default(),
            next_discovery: now,
            ipvs_changes: extras.ipvs_changes,
            ipvs_changed: None,
            ipvs_problem: None,
            latency_hold_until: now + config.policy.decay,
            epoch: now,
            next_slot: 0,
            slot_left: None,
            due_ids: Vec::new(),
            unresolved_settled: FxHashMap::default(),
            touched: HashSet::new(),
            latency_touched: HashSet::new(),
            pool_cursor: 0,
            pools_rotated_at: None,
            pool_credit: 0.0,
            pool_settled: Vec::new(),
            pools_due: Vec::new(),
            candidates: Vec::new(),
            pool_members: Vec::new(),
            up_probes: 0,
            discovery_delay: std::env::var("PROBER_DEBUG_SLOW_DISCOVERY_MS")
                .ok()
                .and_then(|ms| ms.parse().ok())
                .map(Duration::from_millis),
            config,
        }
    }

    /// Applies a new configuration (`prober reload`, SIGHUP) without
    /// detaching anything or forgetting health: the next tick re-reads
    /// IPVS and works out targets, checks and weights with it; weights the
    /// change does not touch are not written. `agent_address` is where
    /// agents report when the new config has `[agent]`.
    pub fn reload(
        &mut self,
        config: Config,
        agent_address: Option<std::net::Ipv4Addr>,
        now: Instant,
    ) -> Result<()> {
        if config.max_probes != self.config.max_probes {
            warn!(
                "max_probes {:?} -> {:?}: takes effect at the next start (the datapath holds {} probes)",
                self.config.max_probes,
                config.max_probes,
                self.prober.capacity()
            );
        }
        if config.max_checks != self.config.max_checks {
            warn!(
                "max_checks {} -> {}: takes effect at the next start",
                self.config.max_checks, config.max_checks
            );
        }
        match (config.agent, agent_address) {
            (Some(agent), Some(address)) => {
                self.prober.set_agent(address, agent.port, agent.key)?
            }
            _ => self
                .prober
                .set_agent(std::net::Ipv4Addr::UNSPECIFIED, 0, None)?,
        }
        if let Some(agents) = &mut self.agents {
            agents.set_deadline(config.agent.map(|a| a.deadline));
        }
        if config.alerts != self.config.alerts {
            self.sink = Sink::new(&config.alerts);
            self.alerts.set_config(config.alerts.clone());
        }
        self.alerts.set_diagnosis(diagnosis_window(&config));
        self.alerts
            .set_settle_probes(u64::from(config.limits.fall) + 1);
        set_rtt_estimate(&mut self.prober, &config)?;
        let turn = shortest_interval(&config);
        if turn != self.tick_interval() {
            // Slots of another length: the wheel starts its turns afresh.
            self.prober.set_send_turn(turn)?;
            self.epoch = now;
            self.next_slot = 0;
            self.slot_left = None;
        }
        self.config = config;
        self.next_discovery = now;
        self.dump_fingerprint = None;
        Ok(())
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When the send wheel's next slot comes: `tick` should run then
    /// (with `full` false if the regular tick is not due).
    pub fn next_wake(&self) -> Option<Instant> {
        let since = self.slot_len().as_nanos() * u128::from(self.next_slot);
        let next_slot = self
            .epoch
            .checked_add(Duration::from_nanos(u64::try_from(since).ok()?))?;
        Some(match &self.slot_left {
            Some(part) => part.resume_at.min(next_slot),
            None => next_slot,
        })
    }

    /// The shortest probe interval: how often `tick` should run.
    /// Notified when IPVS has answered (a dump, a batch written): the
    /// next tick should come now and take the answer.
    pub fn ipvs_wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.ipvs.wake()
    }

    pub fn tick_interval(&self) -> Duration {
        shortest_interval(&self.config)
    }

    /// One pass: probes due now are settled and sent; a `full` tick (the
    /// regular one, every `tick_interval`) also takes passive samples and
    /// agents; every pass recomputes the pools a health change touched and
    /// its share of the others.
    pub fn tick(&mut self, now: Instant, full: bool, open_store: OpenStore<'_>) -> Result<()> {
        let began = Instant::now();
        // How late this wake came for the slot it was for.
        let late = self
            .next_wake()
            .map_or(Duration::ZERO, |due| began.saturating_duration_since(due));
        self.totals.wake_ms.late(late);
        self.take_ipvs_results(now, open_store);
        self.discover_when_due(now);
        if let Err(e) = self.prober.follow_kernel() {
            warn!("following route and neighbour changes: {e:#}");
        }
        // Discovery may have taken a while: probe times are judged
        // against the clock as it is now, not as the tick began.
        let now = Instant::now();
        self.touched.clear();
        self.send_due_slots(now);
        let sent = Instant::now();
        self.take_probe_events(now);
        // After the sends: reading every followed server's samples is the
        // regular tick's longest step, and must not make them late.
        if full {
            let mut deltas = std::mem::take(&mut self.passive_deltas);
            match self.passive.take_deltas(&mut deltas) {
                Ok(()) => {
                    for &(server, delta) in &deltas {
                        self.observe_passive(server, delta, now);
                    }
                }
                Err(e) => warn!("reading passive measurements: {e:#}"),
            }
            self.passive_deltas = deltas;
        }
        self.judge_director_path(now);
        self.restart_ended_checks();
        self.take_check_reports(now);
        if full {
            self.touched.extend(self.latency_touched.drain());
            if let Some(agents) = &mut self.agents {
                agents.refresh();
                // Their pools follow a new view now (a settled pool is
                // recomputed only when touched).
                if !agents.changed().is_empty() {
                    observe::touch_pools_using(&mut self.touched, &self.plan, |b| {
                        agents.changed().contains(&b.destination.addr)
                    });
                }
            }
        }
        let observed = Instant::now();
        self.update_weights(now);
        let decided = Instant::now();
        let laps = [began, now, sent, observed, decided];
        // Alerts' timers run at the regular tick and on health changes,
        // not on every wake that only sends (a pass over every host).
        if !full && self.touched.is_empty() {
            self.totals.wake_ms.record(laps, decided);
            return Ok(());
        }
        self.feed_diagnosis();
        // Asked only about hosts whose L3 probe is down: the hosts with an
        // L4 probe up are gathered once, on the first question of a tick.
        let probes = &self.probes;
        let prober = &self.prober;
        let l4_up_hosts = std::cell::OnceCell::new();
        let l4_alive = |host: IpAddr| {
            l4_up_hosts
                .get_or_init(|| {
                    probes
                        .iter()
                        .filter(|(_, track)| track.health.state() == State::Up)
                        .filter_map(|(id, _)| prober.spec_of(id))
                        .filter(|spec| matches!(spec.kind, crate::probe::ProbeKind::TcpSyn { .. }))
                        .map(|spec| spec.real_server())
                        .collect::<HashSet<IpAddr>>()
                })
                .contains(&host)
        };
        for event in self.alerts.poll(now, l4_alive) {
            *self
                .totals
                .events
                .entry(event.kind.name().to_string())
                .or_default() += 1;
            self.sink.send(&event);
        }
        self.totals.wake_ms.record(laps, Instant::now());
        Ok(())
    }
}

/// The shortest probe interval configured: the tick, and the send
/// wheel's turn.
fn shortest_interval(config: &Config) -> Duration {
    config
        .services
        .iter()
        .filter_map(|s| s.interval)
        .chain([config.interval])
        .min()
        .unwrap_or(config.interval)
}

/// The datapath keeps each target's RTT estimate as the weight policy
/// says.
fn set_rtt_estimate(prober: &mut Prober, config: &Config) -> Result<()> {
    let policy = &config.policy;
    prober.set_rtt_estimate(policy.decay, policy.peak_ewma, policy.latency_slack)
}

/// How long a failed check waits for its host's L3 probe: time for it to
/// go down, plus one interval (none without diagnosis).
fn diagnosis_window(config: &Config) -> Option<Duration> {
    config
        .diagnose
        .then(|| config.interval * (config.limits.fall + 1))
}

fn layer_of(probe: &ProbeSpec) -> &'static str {
    match probe.kind {
        crate::probe::ProbeKind::IcmpEcho => "L3",
        crate::probe::ProbeKind::TcpSyn { .. } => "L4",
    }
}

fn record(track: &DestTrack) -> prober_common::WeightRecord {
    prober_common::WeightRecord {
        configured: track.configured,
        written: track.written.unwrap_or(0),
        has_written: track.written.is_some() as u32,
        pending: 0,
        has_pending: 0,
        _pad: 0,
    }
}

/// A weight in IPVS that differs from the one prober expects there (the
/// one it wrote, or the one IPVS held before): someone changed it by hand.
fn manual_change(
    config: &Config,
    service: &ServiceKey,
    dest: &targets::BoundDestination,
    expected: u32,
    track: &mut DestTrack,
) {
    match config.manual_weights {
        ManualWeights::Respect => {
            info!(
                %service,
                destination = %dest.key(),
                "weight changed by hand from {expected} to {}: taking it as the configured weight",
                dest.weight
            );
            track.configured = dest.weight;
            track.written = Some(dest.weight);
        }
        ManualWeights::Overwrite => {
            warn!(
                %service,
                destination = %dest.key(),
                "weight changed by hand from {expected} to {}: writing prober's weight back (manual_weights = \"overwrite\")",
                dest.weight
            );
        }
    }
}

fn cause_text(cause: Cause) -> String {
    match cause {
        Cause::Answered => "answered",
        Cause::Refused => "refused (RST)",
        Cause::Unreachable => "ICMP unreachable",
        Cause::TimedOut => "no answer",
    }
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_count_is_said_at_most_once_a_minute_with_what_accrued() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut said = SaidEveryMinute::default();
        assert_eq!(said.add(0, at(0)), None, "nothing to say");
        assert_eq!(said.add(3, at(1)), Some(3));
        assert_eq!(said.add(2, at(30)), None, "said 29 s ago");
        assert_eq!(said.add(4, at(60)), None);
        assert_eq!(said.add(1, at(61)), Some(7), "all since it was said");
        assert_eq!(said.add(0, at(200)), None);
    }
}
