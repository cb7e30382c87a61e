//! The controller: IPVS and the config give targets, the datapath probes
//! them and the checker runs their L7 checks, results feed each probe's
//! and check's health and latency, agents add their own word, each virtual
//! service's weights follow, and changed weights go to IPVS in one batch.
//! Health changes also go to the alerts, which name one root cause each.
//!
//! config/IPVS -> targets -> probes -> results -> health -> weights -> IPVS

use std::{
    collections::{BTreeMap, BTreeSet, HashMap, HashSet},
    net::IpAddr,
    time::{Duration, Instant},
};

use anyhow::Result;
use prober_common::HealthRecord;
use prober_ipvs::{
    Destination, DestinationKey, IpvsClient, ServiceKey, WeightChange, WeightUpdate,
};
use tokio::{sync::mpsc, task::AbortHandle};
use tracing::{debug, info, warn};

use crate::{
    agents::{AgentState, Agents},
    checks::{self, CheckReport, CheckSpec, Checker, Outcome},
    config::{Config, ManualWeights},
    director_fault::{self, DirectorPath},
    events::{sink::Sink, Alerts},
    health::{Cause, Health, Observations, State},
    passive::{self, Passive},
    probe::{
        schedule::{self, Send},
        Counts, ProbeSpec, Prober,
    },
    state::{health_key, weight_key, StateStore},
    targets::{self, CheckSettings, Plan, ProbeSettings},
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
/// Unprobed destinations named one by one in a discovery's warnings.
const UNCHECKED_NAMED: usize = 20;
/// Batches of IPVS writes this large are logged with their duration.
const LARGE_BATCH: usize = 100;

struct ProbeTrack {
    settings: ProbeSettings,
    health: Health,
    /// Whether this run has seen any result yet: until then the weights
    /// this probe decides are left as IPVS has them.
    evidence: bool,
    latency: Option<LatencyEwma>,
    /// Response time (request -> first response byte) from passive
    /// measurement, and when it last had a sample.
    response: Option<LatencyEwma>,
    response_at: Option<Instant>,
    last: Counts,
    /// The grid point of its next send (see `probe::schedule`).
    grid: Instant,
    /// When it is next looked at: its only valid entry in the queue (None:
    /// not queued yet, it has no target id).
    queued_at: Option<Instant>,
    /// A probe is out and not yet settled.
    outstanding: bool,
    /// When the outstanding probe was handed to the kernel (at the latest).
    sent_at: Instant,
    /// When it last came up in this run (slow start).
    came_up_at: Option<Instant>,
    latency_saved_at: Instant,
}

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
    destination: Destination,
    /// What the policy last wanted (written or not).
    computed: Option<u32>,
    /// A weight prober tried to write when the socket failed mid-batch:
    /// found in IPVS, it is prober's own, not an operator's.
    unsure: Option<u32>,
    last_change: Option<crate::status::Change>,
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
    /// When late sends were last said, and how many since.
    late_said: Option<Instant>,
    late_unsaid: u64,
}

pub struct Controller {
    config: Config,
    ipvs: Option<IpvsClient>,
    prober: Prober,
    passive: Passive,
    /// Passive measurements not yet taken by their probe's evaluation.
    pending: HashMap<passive::Server, passive::Delta>,
    store: Option<StateStore>,
    plan: Plan,
    probes: HashMap<ProbeSpec, ProbeTrack>,
    checker: Checker,
    check_reports: mpsc::UnboundedReceiver<CheckReport>,
    checks: HashMap<CheckSpec, CheckTrack>,
    agents: Option<Agents>,
    alerts: Alerts,
    sink: Sink,
    dests: HashMap<(ServiceKey, DestinationKey), DestTrack>,
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
    ipvs_problem: Option<String>,
    /// Probes by when they are next to be settled or sent.
    queue: schedule::Queue,
    /// Where every probe's send grid starts.
    epoch: Instant,
    /// Buffers reused by every tick (nothing allocated per tick).
    popped: Vec<(Instant, u32)>,
    due_ids: Vec<u32>,
    sending: Vec<u32>,
    /// A tick that used its whole budget: the next waits until then.
    hold_until: Option<Instant>,
    /// Probes up now: counted at each discovery, kept by each transition
    /// (every wake asks, and a count would cost a pass over every probe).
    up_probes: usize,
    /// When the last tick's sends were worked out (the budget grows with
    /// the time since).
    last_send_pass: Option<Instant>,
    /// Services whose pools a health change touched this tick: recomputed
    /// at once, the others at the regular tick.
    touched: HashSet<ServiceKey>,
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
        Self {
            checker,
            check_reports,
            checks: HashMap::new(),
            agents: extras.agents,
            alerts: Alerts::new(config.alerts.clone(), diagnosis),
            sink: Sink::new(&config.alerts),
            ipvs: None,
            prober,
            passive,
            pending: HashMap::new(),
            store: None,
            plan: Plan::default(),
            probes: HashMap::new(),
            dests: HashMap::new(),
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
            ipvs_problem: None,
            latency_hold_until: now + config.policy.decay,
            queue: schedule::Queue::default(),
            epoch: now,
            popped: Vec::new(),
            due_ids: Vec::new(),
            sending: Vec::new(),
            touched: HashSet::new(),
            last_send_pass: None,
            up_probes: 0,
            hold_until: None,
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
        self.config = config;
        self.next_discovery = now;
        Ok(())
    }

    /// Every virtual service and real server as the controller sees them.
    pub fn status(&self, now: Instant) -> crate::status::Status {
        use crate::status::*;
        let state_name = |s: State| if s == State::Up { "up" } else { "down" }.to_string();
        let mut services: BTreeMap<ServiceKey, ServiceStatus> = BTreeMap::new();
        for b in &self.plan.bindings {
            let Some(dest) = self.dests.get(&(b.service, b.destination.key())) else {
                continue;
            };
            let probe = self.probes.get(&b.probe);
            let report = self
                .prober
                .id_of(&b.probe)
                .and_then(|id| self.prober.report(id).ok())
                .unwrap_or_default();
            let l4 = probe.map(|p| ProbeStatus {
                probe: b.probe.to_string(),
                state: state_name(p.health.state()),
                sent: report.sent,
                answered: report.answered,
                refused: report.refused,
                unreachable: report.unreachable,
                timed_out: report.timed_out,
                rtt_log2_us: report.rtt_log2_us.clone(),
            });
            let l3 = self
                .plan
                .hosts
                .get(&b.destination.addr)
                .and_then(|spec| self.probes.get(spec))
                .map(|t| state_name(t.health.state()));
            let l7: Vec<CheckStatus> = b
                .checks
                .iter()
                .filter_map(|spec| {
                    let c = self.checks.get(spec)?;
                    Some(CheckStatus {
                        check: spec.to_string(),
                        layer: spec.check.layer().into(),
                        state: state_name(c.health.state()),
                        failure: c.failure.clone(),
                    })
                })
                .collect();
            let agent = self
                .agents
                .as_ref()
                .and_then(|a| a.view(b.destination.addr));
            let up = probe.is_some_and(|p| p.health.state() == State::Up)
                && l7.iter().all(|c| c.state == "up")
                && agent.is_none_or(|a| a.state != AgentState::Down);
            let state = match agent {
                Some(a) if up && a.state == AgentState::Drain => "drain",
                _ if up => "up",
                _ => "down",
            };
            let passive = (b.destination.forwarding == prober_ipvs::Forwarding::Masquerade)
                .then(|| {
                    self.passive
                        .histograms(&(b.destination.addr, b.destination.port))
                })
                .flatten();
            let (handshake, response) = passive.unwrap_or_default();
            let rtt = RttStatus {
                active_ewma_ms: probe.and_then(|p| p.latency).map(|l| l.value_ns() / 1e6),
                active_p50_ms: quantile_ms(&report.rtt_log2_us, 0.5),
                active_p99_ms: quantile_ms(&report.rtt_log2_us, 0.99),
                handshake_p50_ms: quantile_ms(&handshake, 0.5),
                handshake_p99_ms: quantile_ms(&handshake, 0.99),
                response_p50_ms: quantile_ms(&response, 0.5),
                response_p99_ms: quantile_ms(&response, 0.99),
                handshake_log2_us: handshake,
                response_log2_us: response,
            };
            let service = services.entry(b.service).or_insert_with(|| ServiceStatus {
                service: b.service.to_string(),
                panic: self.panicking.contains(&b.service),
                servers: Vec::new(),
            });
            service.servers.push(ServerStatus {
                server: format!("{}", b.destination.key()),
                forwarding: forwarding_name(b.destination.forwarding),
                state: state.into(),
                l3,
                l4,
                l7,
                agent: agent.map(|a| AgentStatus {
                    state: format!("{:?}", a.state).to_lowercase(),
                    weight: a.weight,
                }),
                weight: WeightStatus {
                    configured: dest.configured,
                    computed: dest.computed,
                    ipvs: dest.current,
                },
                rtt,
                last_change: dest.last_change.clone(),
            });
        }
        let _ = now;
        Status {
            ipvs_problem: self.ipvs_problem.clone(),
            director_fault: self.path.suspected().map(|s| s.to_string()),
            weight_writes: self.totals.weight_writes,
            weight_write_errors: self.totals.weight_write_errors,
            netlink_errors: self.totals.netlink_errors,
            largest_send: self.totals.largest_send,
            capacity: self.prober.capacity(),
            sends_late: self.totals.sends_late,
            events: self.totals.events.clone(),
            services: services.into_values().collect(),
            unchecked: self
                .plan
                .skipped
                .iter()
                .map(|(service, dest, why)| UncheckedStatus {
                    service: service.to_string(),
                    server: dest.to_string(),
                    why: why.to_string(),
                })
                .collect(),
            undiagnosed_hosts: self.plan.undiagnosed,
            ..Default::default()
        }
    }

    /// The configuration in force.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// When a probe is next to be settled or sent: `tick` should run
    /// then (with `full` false if the regular tick is not due), so
    /// timeouts are exact and sends keep to their grid.
    pub fn next_wake(&self) -> Option<Instant> {
        let next = self.queue.next()?;
        Some(self.hold_until.map_or(next, |hold| next.max(hold)))
    }

    /// The shortest probe interval: how often `tick` should run.
    pub fn tick_interval(&self) -> Duration {
        self.config
            .services
            .iter()
            .filter_map(|s| s.interval)
            .chain([self.config.interval])
            .min()
            .unwrap_or(self.config.interval)
    }

    /// One pass: probes due now are settled and sent; a `full` tick (the
    /// regular one, every `tick_interval`) also takes passive samples and
    /// agents and recomputes every pool, the others only the pools a
    /// health change touched.
    pub fn tick(&mut self, now: Instant, full: bool, open_store: OpenStore<'_>) -> Result<()> {
        if now >= self.next_discovery {
            self.next_discovery = now + self.config.discovery;
            if let Err(e) = self.discover(now, open_store) {
                let problem = format!("{e:#}");
                self.totals.netlink_errors += 1;
                if self.ipvs_problem.as_ref() != Some(&problem) {
                    warn!(
                        "reading IPVS: {problem}; retrying every {:?}",
                        self.config.discovery
                    );
                    self.ipvs_problem = Some(problem);
                }
                self.ipvs = None;
            } else if self.ipvs_problem.take().is_some() {
                info!("IPVS read again");
            }
        }
        if let Err(e) = self.prober.follow_kernel() {
            warn!("following route and neighbour changes: {e:#}");
        }
        // Discovery may have taken a while: probe times are judged
        // against the clock as it is now, not as the tick began.
        let now = Instant::now();
        if full {
            match self.passive.take_deltas() {
                Ok(deltas) => {
                    for (server, delta) in deltas {
                        self.pending.entry(server).or_default().add(delta);
                    }
                }
                Err(e) => warn!("reading passive measurements: {e:#}"),
            }
        }
        self.touched.clear();
        self.settle_and_send(now);
        self.judge_director_path(now);
        self.restart_ended_checks();
        self.take_check_reports(now);
        if full {
            if let Some(agents) = &mut self.agents {
                agents.refresh();
            }
        }
        self.update_weights(now, full);
        // Alerts' timers run at the regular tick and on health changes,
        // not on every wake that only sends (a pass over every host).
        if !full && self.touched.is_empty() {
            return Ok(());
        }
        // Asked only about hosts whose L3 probe is down: the hosts with an
        // L4 probe up are gathered once, on the first question of a tick.
        let probes = &self.probes;
        let l4_up_hosts = std::cell::OnceCell::new();
        let l4_alive = |host: IpAddr| {
            l4_up_hosts
                .get_or_init(|| {
                    probes
                        .iter()
                        .filter(|(spec, track)| {
                            matches!(spec.kind, crate::probe::ProbeKind::TcpSyn { .. })
                                && track.health.state() == State::Up
                        })
                        .map(|(spec, _)| spec.real_server())
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
        Ok(())
    }

    /// Settles the probes whose reply is in or whose own timeout (counted
    /// from their own send) has passed, and sends those whose grid point
    /// has come, at most `schedule::budget` in one tick. Only the probes
    /// due are looked at, their counters read a block at a time.
    fn settle_and_send(&mut self, now: Instant) {
        let mut popped = std::mem::take(&mut self.popped);
        let mut ids = std::mem::take(&mut self.due_ids);
        let mut sending = std::mem::take(&mut self.sending);
        self.queue.pop_due(now, &mut popped);
        ids.clear();
        sending.clear();
        for &(at, id) in &popped {
            let queued = self
                .prober
                .spec_of(id)
                .and_then(|spec| self.probes.get(&spec))
                .is_some_and(|track| track.queued_at == Some(at));
            if queued {
                ids.push(id);
            }
        }
        ids.sort_unstable();
        ids.dedup();
        if let Err(e) = self.prober.read_counts(&ids) {
            warn!("reading probe results in batches: {e:#}; reading them one by one");
        }
        let since = self
            .last_send_pass
            .map_or(Duration::ZERO, |at| now.duration_since(at));
        self.last_send_pass = Some(now);
        let budget = schedule::budget(self.probes.len(), since, self.tick_interval());
        let mut late = 0u64;
        // Oldest first (the queue's order), so what the budget defers is
        // the newest.
        for &(at, id) in &popped {
            let Some(spec) = self.prober.spec_of(id) else {
                continue;
            };
            let Some(track) = self.probes.get_mut(&spec) else {
                continue;
            };
            if track.queued_at != Some(at) {
                continue; // left behind by a reschedule, or done already
            }
            let timing = track.settings;
            if track.outstanding {
                let replied = self
                    .prober
                    .fresh_counts(id)
                    .is_ok_and(|c| c.replies() > track.last.replies());
                let settles_at = track.sent_at + timing.timeout;
                if !replied && now < settles_at {
                    // Neither answered nor timed out: looked at again when
                    // its own timeout is up.
                    track.queued_at = Some(settles_at);
                    self.queue.push(settles_at, id);
                    continue;
                }
            }
            let grid = track.grid;
            let verdict = schedule::send_due(self.epoch, id, timing.interval, grid, now);
            let over_budget = matches!(verdict, Send::Now { .. }) && sending.len() >= budget;
            // One probe's unreadable counters must not stop the others.
            let send = if over_budget && !track.outstanding {
                true // nothing to settle; evaluated when it goes
            } else {
                self.evaluate(spec, now).unwrap_or_else(|e| {
                    warn!(probe = %spec, "reading probe results: {e:#}");
                    true
                })
            };
            let track = self.probes.get_mut(&spec).expect("due probes are tracked");
            track.outstanding = false;
            let next = match verdict {
                Send::Wait => grid,
                // Over the budget: it keeps its place (the oldest go
                // first next time), and the next tick waits a slot.
                Send::Now { .. } if over_budget => {
                    self.hold_until = Some(now + timing.interval / schedule::SLOTS);
                    at
                }
                Send::Now { next, late: behind } => {
                    if send {
                        sending.push(id);
                        late += behind as u64;
                    }
                    next
                }
            };
            if !over_budget {
                track.grid = next.max(grid);
            }
            track.queued_at = Some(next);
            self.queue.push(next, id);
        }
        if let Err(e) = self.prober.send(&sending) {
            warn!("sending probes: {e:#}");
        }
        self.note_sends(sending.len() as u64, budget, late, now);
        // Taken after the send returned: no probe left later than this,
        // so no timeout counted from it is ever short.
        let sent_at = Instant::now();
        for &id in &sending {
            let Some(track) = self
                .prober
                .spec_of(id)
                .and_then(|spec| self.probes.get_mut(&spec))
            else {
                continue;
            };
            track.outstanding = true;
            track.sent_at = sent_at;
            // Settled at its grid point if answered by then, else when its
            // timeout is up.
            let at = track.grid.min(sent_at + track.settings.timeout);
            track.queued_at = Some(at);
            self.queue.push(at, id);
        }
        if self.queue.len() > 2 * self.probes.len() + 1024 {
            // Entries left behind by reschedules.
            let (probes, prober) = (&self.probes, &self.prober);
            self.queue.retain(|at, id| {
                prober
                    .spec_of(id)
                    .and_then(|spec| probes.get(&spec))
                    .is_some_and(|t| t.queued_at == Some(at))
            });
        }
        self.popped = popped;
        self.due_ids = ids;
        self.sending = sending;
    }

    /// Counts a tick's sends: a new largest batch past a power of two, and
    /// late sends (at most once a minute), are said.
    fn note_sends(&mut self, sent: u64, budget: usize, late: u64, now: Instant) {
        let totals = &mut self.totals;
        if sent > totals.largest_send {
            if sent.ilog2() > totals.largest_send.max(1).ilog2() {
                info!(
                    probes = sent,
                    budget, "largest probe send so far (sends are spread over each interval)"
                );
            }
            totals.largest_send = sent;
        }
        totals.sends_late += late;
        totals.late_unsaid += late;
        if totals.late_unsaid > 0
            && totals
                .late_said
                .is_none_or(|at| now.duration_since(at) >= Duration::from_secs(60))
        {
            warn!(
                late = totals.late_unsaid,
                "probe sends went out over half an interval late (the daemon was stalled or cannot keep up); they are spread, at most a slot's budget per tick, not sent at once"
            );
            totals.late_said = Some(now);
            totals.late_unsaid = 0;
        }
    }

    /// Decides, from this tick's probe results and the link, whether the
    /// director itself is the likely fault; says so once each way.
    fn judge_director_path(&mut self, now: Instant) {
        let up = self.up_probes;
        let link_up = director_fault::link_up(self.prober.interface());
        if link_up && !std::mem::replace(&mut self.link_was_up, link_up) {
            // The kernel flushed its neighbours with the carrier: resolve
            // them again now, not after the usual back-off.
            self.prober.resolve_neighbours_now();
            self.link_back_at = Some(now);
        }
        self.link_was_up = link_up;
        // Back up, the link still counts as down while next hops are being
        // resolved again (for a while: a dead host never resolves).
        let settling = link_up
            && self
                .link_back_at
                .is_some_and(|at| now.duration_since(at) < LINK_SETTLE)
            && self.prober.any_neighbour_unresolved();
        match self.path.end_tick(up, link_up && !settling) {
            Some(director_fault::Change::Suspected(why)) => {
                // The silence that raised the suspicion counts against no
                // server either.
                for track in self.probes.values_mut() {
                    track.health.forgive_failures();
                }
                warn!(
                    interface = self.prober.interface(),
                    "director-side fault suspected: {why}; keeping every weight as it is (fail open) until probes are answered again"
                );
                self.alerts.director_fault(why.to_string(), now);
            }
            Some(director_fault::Change::Cleared) => {
                self.fault_cleared_at = Some(now);
                info!(
                    interface = self.prober.interface(),
                    "director-side fault over: weights follow health again"
                );
                self.alerts.director_recovered(now);
            }
            None => {}
        }
    }

    /// Feeds the L7 checks' results into their health.
    fn take_check_reports(&mut self, now: Instant) {
        while let Ok(report) = self.check_reports.try_recv() {
            let Some(track) = self.checks.get_mut(&report.spec) else {
                continue; // a check stopped since
            };
            track.evidence = true;
            let seen = match &report.outcome {
                Outcome::Passed { weight } => {
                    track.weight = *weight;
                    track.failure = None;
                    Observations {
                        answered: 1,
                        ..Default::default()
                    }
                }
                Outcome::Failed(why) => {
                    debug!(check = %report.spec, "check failed: {why}");
                    track.failure = Some(why.clone());
                    Observations {
                        timed_out: 1,
                        ..Default::default()
                    }
                }
            };
            let Some(transition) = track.health.observe(seen, track.settings.limits, now) else {
                continue;
            };
            for b in &self.plan.bindings {
                if b.checks.contains(&report.spec) {
                    self.touched.insert(b.service);
                }
            }
            let services = services_using(&self.plan, |b| b.checks.contains(&report.spec));
            let subject = report.spec.to_string();
            match transition.to {
                State::Down => {
                    let why = track.failure.clone().unwrap_or_default();
                    warn!(check = %subject, services = ?services, "check DOWN: {why}");
                    let timing = track.settings.timing;
                    let recovery =
                        timing.interval * (track.settings.limits.rise + 1) + timing.timeout;
                    self.alerts.check_down(
                        report.spec.address,
                        subject,
                        report.spec.check.layer(),
                        why,
                        services,
                        recovery,
                        now,
                    );
                }
                State::Up => {
                    info!(check = %subject, services = ?services, "check UP");
                    self.alerts.check_up(&subject, now);
                }
            }
        }
    }

    /// Reads IPVS, works out the targets, and notices weights changed by
    /// someone else.
    fn discover(&mut self, now: Instant, open_store: OpenStore<'_>) -> Result<()> {
        if self.ipvs.is_none() {
            self.ipvs = Some(IpvsClient::connect()?);
        }
        let services = self.ipvs.as_mut().expect("connected above").dump()?;
        if let Some(delay) = self.discovery_delay {
            std::thread::sleep(delay);
        }
        let opened = self.store.is_none();
        if opened {
            self.store = Some(open_store()?);
        }
        let plan = targets::plan_within(&services, &self.config, self.prober.capacity() as usize);
        let store = self.store.as_mut().expect("opened above");
        if opened {
            // What an earlier run pinned about destinations and probes
            // that left while prober was stopped would never be freed.
            let weights: HashSet<prober_common::WeightKey> = plan
                .bindings
                .iter()
                .map(|b| weight_key(&b.service, &b.destination.key()))
                .collect();
            let health: HashSet<prober_common::HealthKey> =
                plan.probes.keys().map(health_key).collect();
            let freed = store.retain(|k| weights.contains(k), |k| health.contains(k));
            if freed > 0 {
                info!("freed {freed} pinned state records of destinations and probes that left while prober was stopped");
            }
        }
        if plan.undiagnosed != self.undiagnosed {
            self.undiagnosed = plan.undiagnosed;
            if plan.undiagnosed > 0 {
                warn!(
                    "{} real server hosts get no L3 diagnosis probe: the datapath holds {} probes and every destination's own probe comes first",
                    plan.undiagnosed,
                    self.prober.capacity()
                );
            }
        }

        let mut seen = HashSet::new();
        for binding in &plan.bindings {
            let dest = &binding.destination;
            let key = (binding.service, dest.key());
            seen.insert(key);
            let wkey = weight_key(&binding.service, &dest.key());
            let dumped = dest.weight;
            match self.dests.get_mut(&key) {
                Some(track) => {
                    track.destination = dest.clone();
                    // A write of unknown outcome that IPVS holds: ours.
                    if track.unsure.take() == Some(dumped) {
                        track.written = Some(dumped);
                        track.current = dumped;
                        store.set_weight(wkey, record(track))?;
                    }
                    // What IPVS should hold: what prober wrote, else what
                    // it held before.
                    let expected = track.written.unwrap_or(track.current);
                    if dumped != expected {
                        manual_change(&self.config, &binding.service, dest, expected, track);
                        store.set_weight(wkey, record(track))?;
                    }
                    track.current = dumped;
                }
                None => {
                    let remembered = store.weight(&wkey);
                    let mut track = DestTrack {
                        configured: remembered.map_or(dumped, |r| r.configured),
                        written: remembered.filter(|r| r.has_written == 1).map(|r| r.written),
                        current: dumped,
                        destination: dest.clone(),
                        computed: None,
                        unsure: None,
                        last_change: None,
                    };
                    // A write an earlier run had started: its own, if IPVS
                    // holds it.
                    let pending = remembered.filter(|r| r.has_pending == 1).map(|r| r.pending);
                    if pending == Some(dumped) {
                        track.written = Some(dumped);
                    }
                    // What IPVS should hold after the earlier run: what it
                    // wrote, else the configured weight it remembered.
                    let expected = track.written.unwrap_or(track.configured);
                    if remembered.is_some() && dumped != expected {
                        manual_change(&self.config, &binding.service, dest, expected, &mut track);
                    }
                    track.current = dumped;
                    store.set_weight(wkey, record(&track))?;
                    self.dests.insert(key, track);
                }
            }
        }
        let gone: Vec<_> = self
            .dests
            .keys()
            .filter(|k| !seen.contains(k))
            .copied()
            .collect();
        let mut restores = Vec::new();
        for key in gone {
            let Some(track) = self.dests.remove(&key) else {
                continue;
            };
            store.remove_weight(&weight_key(&key.0, &key.1));
            // Still in IPVS but no longer managed (the config now leaves it
            // alone): hand it back at its configured weight, not at the
            // last one prober wrote.
            let still_there = services
                .iter()
                .filter(|vs| vs.service.key == key.0)
                .flat_map(|vs| &vs.destinations)
                .find(|d| d.key() == key.1);
            match still_there {
                Some(dest) if track.written.is_some() && dest.weight != track.configured => {
                    info!(service = %key.0, destination = %key.1, "no longer managed: weight {} back to its configured {}", dest.weight, track.configured);
                    restores.push(WeightUpdate {
                        service: key.0,
                        destination: dest.clone(),
                        weight: track.configured,
                    });
                }
                Some(_) => debug!(service = %key.0, destination = %key.1, "no longer managed"),
                None => debug!(service = %key.0, destination = %key.1, "destination left IPVS"),
            }
        }
        if !restores.is_empty() {
            let ipvs = self.ipvs.as_mut().expect("connected above");
            match ipvs.set_weights(&restores) {
                Ok(failures) => {
                    for f in failures {
                        warn!(service = %f.service, destination = %f.destination, "weight not restored: {}", f.error);
                    }
                }
                Err(e) => warn!("restoring weights: {e}"),
            }
        }

        for (spec, settings) in &plan.probes {
            match self.probes.get_mut(spec) {
                Some(track) => {
                    // A new interval (a reload) applies from now: the
                    // probe is queued again on its new grid below.
                    if track.settings.interval != settings.interval {
                        track.queued_at = None;
                    }
                    track.settings = *settings;
                }
                None => {
                    let remembered = store.health(&health_key(spec));
                    let state = match remembered.map(|r| r.state) {
                        Some(2) => State::Down,
                        _ => State::Up,
                    };
                    let latency = remembered
                        .filter(|r| r.latency_ns > 0)
                        .map(|r| LatencyEwma::new(r.latency_ns as f64, now));
                    self.probes.insert(
                        *spec,
                        ProbeTrack {
                            settings: *settings,
                            health: Health::new(state, now),
                            evidence: false,
                            latency,
                            response: None,
                            response_at: None,
                            last: Counts::default(),
                            grid: now,
                            queued_at: None,
                            outstanding: false,
                            sent_at: now,
                            came_up_at: None,
                            latency_saved_at: now,
                        },
                    );
                }
            }
        }
        let dropped: Vec<ProbeSpec> = self
            .probes
            .keys()
            .filter(|s| !plan.probes.contains_key(s))
            .copied()
            .collect();
        self.path.retain(|p| plan.probes.contains_key(p));
        for spec in dropped {
            self.probes.remove(&spec);
            store.remove_health(&health_key(&spec));
        }
        self.up_probes = self
            .probes
            .values()
            .filter(|t| t.health.state() == State::Up)
            .count();
        // An operator must not believe these are checked: each is said
        // once at warn level (an explicit `probe = "none"` at debug), the
        // first few by name and the rest in one line.
        let mut unnamed = 0;
        for (service, dest, why) in &plan.skipped {
            if why.starts_with("the config says") {
                debug!(%service, destination = %dest, "not probed: {why}");
            } else if self.warned_unchecked.insert((*service, *dest)) {
                if unnamed < UNCHECKED_NAMED {
                    warn!(%service, destination = %dest, "not probed, its weight left alone: {why}");
                }
                unnamed += 1;
            }
        }
        if unnamed > UNCHECKED_NAMED {
            warn!(
                "{} more destinations not probed, their weights left alone (prober status lists them)",
                unnamed - UNCHECKED_NAMED
            );
        }
        let skipped: HashSet<(ServiceKey, DestinationKey)> =
            plan.skipped.iter().map(|(s, d, _)| (*s, *d)).collect();
        self.warned_unchecked.retain(|k| skipped.contains(k));
        self.sync_checks(&plan, now);
        if let Some(agents) = &mut self.agents {
            agents.sync(plan.bindings.iter().map(|b| b.destination.addr))?;
        }
        let mut services_of_host: HashMap<IpAddr, BTreeSet<String>> = HashMap::new();
        for b in &plan.bindings {
            services_of_host
                .entry(b.destination.addr)
                .or_default()
                .insert(b.service.to_string());
        }
        let subjects: HashSet<String> = plan
            .checks
            .keys()
            .map(|c| c.to_string())
            .chain(plan.bindings.iter().map(|b| b.probe.to_string()))
            .collect();
        self.alerts.set_topology(services_of_host, &subjects);
        let specs: Vec<ProbeSpec> = plan.probes.keys().copied().collect();
        self.prober.sync_targets(&specs)?;
        // NAT real servers: the director sees both directions of their traffic.
        let nat: Vec<passive::Server> = plan
            .bindings
            .iter()
            .filter(|b| b.destination.forwarding == prober_ipvs::Forwarding::Masquerade)
            .map(|b| (b.destination.addr, b.destination.port))
            .collect();
        self.passive.sync(&nat)?;
        self.pending.retain(|server, _| nat.contains(server));
        // New probes (and those with a new interval) go on their grid from
        // now (not from the tick's start: this discovery may have taken
        // long, and their first sends must not all be overdue at once),
        // new ones from the datapath's counters as they stand (kept from
        // an earlier run).
        let now = Instant::now();
        for spec in &specs {
            let (Some(id), Some(track)) = (self.prober.id_of(spec), self.probes.get_mut(spec))
            else {
                continue;
            };
            if track.queued_at.is_some() {
                continue;
            }
            track.grid = schedule::next_send(self.epoch, id, track.settings.interval, now);
            // A new probe's slot starts with zeroed counters (freed slots
            // are cleared), so its `last` needs no read.
            let at = if track.outstanding {
                track.grid.min(track.sent_at + track.settings.timeout)
            } else {
                track.grid
            };
            track.queued_at = Some(at);
            self.queue.push(at, id);
        }
        self.plan = plan;
        if let Some(store) = &self.store {
            if store.not_saved > self.not_saved {
                warn!(
                    "the pinned state maps are full: {} records not saved ({} in all); those destinations and probes start afresh after a restart",
                    store.not_saved - self.not_saved,
                    store.not_saved
                );
                self.not_saved = store.not_saved;
            }
        }
        Ok(())
    }

    /// Starts the plan's new checks, restarts those whose timing changed
    /// (keeping their health) and stops those no service uses any more. A
    /// check replaced by an edited one on the same server and port (a
    /// reload) hands it its health: editing a failing check does not
    /// bring the server back before the new check has spoken.
    fn sync_checks(&mut self, plan: &Plan, now: Instant) {
        let removed: Vec<CheckSpec> = self
            .checks
            .keys()
            .filter(|spec| !plan.checks.contains_key(*spec))
            .cloned()
            .collect();
        let mut replaced: Vec<(CheckSpec, CheckTrack)> = removed
            .into_iter()
            .filter_map(|spec| self.checks.remove_entry(&spec))
            .collect();
        for (spec, settings) in &plan.checks {
            match self.checks.get_mut(spec) {
                Some(track) if track.settings == *settings => {}
                Some(track) => {
                    track.task.abort();
                    track.task = self.checker.start(spec.clone(), settings.timing);
                    track.settings = *settings;
                }
                None => {
                    let task = self.checker.start(spec.clone(), settings.timing);
                    let before = replaced
                        .iter()
                        .position(|(old, _)| {
                            (old.address, old.port, old.vip) == (spec.address, spec.port, spec.vip)
                        })
                        .map(|i| replaced.swap_remove(i).1);
                    let (health, failure) = match before {
                        Some(old) => (old.health.clone(), old.failure.clone()),
                        None => (Health::new(State::Up, now), None),
                    };
                    self.checks.insert(
                        spec.clone(),
                        CheckTrack {
                            settings: *settings,
                            task,
                            health,
                            evidence: false,
                            weight: None,
                            failure,
                        },
                    );
                }
            }
        }
    }

    /// A check task that ended (it panicked: a bug) is started again, so
    /// its health does not freeze.
    fn restart_ended_checks(&mut self) {
        for (spec, track) in &mut self.checks {
            if track.task.is_finished() {
                warn!(check = %spec, "check task ended unexpectedly: restarting it");
                track.task = self.checker.start(spec.clone(), track.settings.timing);
            }
        }
    }

    /// Turns what the datapath counted since the last probe into one
    /// interval's observations and feeds health and latency.
    /// Returns whether to send the next active probe: not when the real
    /// server's own traffic just showed it answering.
    fn evaluate(&mut self, spec: ProbeSpec, now: Instant) -> Result<bool> {
        let decay = self.config.policy.decay;
        let peak = self.config.policy.peak_ewma;
        let passive = passive_server(&spec)
            .and_then(|server| self.pending.remove(&server))
            .unwrap_or_default();
        let neighbour_unresolved = self
            .prober
            .id_of(&spec)
            .is_some_and(|id| self.prober.neighbour_unresolved(id));
        let Some(track) = self.probes.get_mut(&spec) else {
            return Ok(true);
        };
        let counts = match self.prober.id_of(&spec) {
            Some(id) => self.prober.fresh_counts(id)?,
            None => track.last,
        };
        let last = std::mem::replace(&mut track.last, counts);
        let mut seen = Observations::default();
        let mut rtt_sample = None;
        let mut revalidate = false;
        if track.outstanding {
            seen.answered = counts.answered.saturating_sub(last.answered);
            seen.refused = counts.refused.saturating_sub(last.refused);
            seen.unreachable = counts.unreachable.saturating_sub(last.unreachable);
            let slow = counts.last_rtt_ns as u128 > track.settings.timeout.as_nanos();
            if seen.answered > 0 && slow {
                seen.answered -= 1;
                seen.timed_out += 1;
            }
            if seen.answered > 0 && !slow {
                rtt_sample = Some(counts.last_rtt_ns as f64);
            }
            let sent = counts.sent > last.sent;
            if seen.answered + seen.refused + seen.unreachable + seen.timed_out == 0
                && (sent || neighbour_unresolved)
            {
                // No answer within the interval, or the real server does
                // not answer ARP. A probe that could not be sent for other
                // reasons (route by another interface...) is no evidence.
                seen.timed_out = 1;
                if sent {
                    revalidate = true;
                }
            }
        }
        if track.outstanding {
            // Only the active probe's own result says whether the path
            // works; a timeout counts against it only for a probe that
            // was up (a dead server's silence is old news).
            let replied = seen.answered + seen.refused + seen.unreachable > 0;
            if replied || (seen.timed_out > 0 && track.health.state() == State::Up) {
                self.path.probe_result(spec, spec.real_server(), replied);
            }
            // While the director's own path is suspected, silence is no
            // evidence against the server: its health waits, so nothing
            // is taken out when the path comes back.
            // Nor is the silence of a probe sent while it was suspected
            // and settled just after.
            let sent_during_fault = self
                .fault_cleared_at
                .is_some_and(|cleared| track.sent_at <= cleared);
            if !replied && (self.path.suspected().is_some() || sent_during_fault) {
                seen.timed_out = 0;
            }
        }
        if revalidate {
            if let Some(id) = self.prober.id_of(&spec) {
                if let Err(e) = self.prober.revalidate_neighbour(id) {
                    warn!(probe = %spec, "asking the kernel to check the neighbour: {e:#}");
                }
            }
        }
        // Passive evidence (see README, "Passive measurement"): client
        // handshakes count as one success and feed the RTT estimate.
        // Server resets and resent client SYNs are never a failure: any
        // client can send duplicate SYNs or stray segments through the
        // VIP, and nothing a stranger sends may take a server out (its own
        // probes decide).
        if let Some(handshake) = passive.mean_handshake_ns() {
            seen.answered += 1;
            rtt_sample = Some(rtt_sample.map_or(handshake, |active| (active + handshake) / 2.0));
        }
        let bad = passive.resets + passive.syn_retransmits;
        if bad >= PASSIVE_BURST && bad > passive.handshakes {
            debug!(
                probe = %spec,
                resets = passive.resets,
                syn_retransmits = passive.syn_retransmits,
                "client traffic saw resets or resent SYNs: shown, not judged"
            );
        }
        if let Some(response) = passive.mean_response_ns() {
            match &mut track.response {
                Some(ewma) => ewma.observe(response, now, decay, peak),
                None => track.response = Some(LatencyEwma::new(response, now)),
            }
            track.response_at = Some(now);
        }
        let send_next = passive.handshakes == 0;
        if seen == Observations::default() {
            return Ok(send_next); // nothing settled: no evidence either way
        }
        track.evidence = true;
        if let Some(sample) = rtt_sample {
            match &mut track.latency {
                Some(ewma) => ewma.observe(sample, now, decay, peak),
                None => track.latency = Some(LatencyEwma::new(sample, now)),
            }
        }
        let transition = track.health.observe(seen, track.settings.limits, now);
        let store = self.store.as_mut();
        let host = spec.real_server();
        let diagnoses_host = self.plan.hosts.get(&host) == Some(&spec);
        if diagnoses_host && seen.answered > seen.failures() {
            self.alerts.host_answered(host, now);
        }
        if let Some(t) = transition {
            if t.to == State::Up {
                track.came_up_at = Some(now);
                self.up_probes += 1;
            } else {
                self.up_probes = self.up_probes.saturating_sub(1);
            }
            for &i in self.plan.by_probe.get(&spec).into_iter().flatten() {
                self.touched.insert(self.plan.bindings[i].service);
            }
            let names = self.plan.services_of_probe(&spec);
            let layer = layer_of(&spec);
            // While the director is suspected its one alert stands for
            // every server it cannot reach.
            let director_suspected = self.path.suspected().is_some();
            match t.to {
                State::Down => {
                    warn!(probe = %spec, cause = ?t.cause, sent = counts.sent, services = ?names, "real server DOWN");
                    if diagnoses_host && !director_suspected {
                        self.alerts.host_down(host, cause_text(t.cause), now);
                    }
                    if !names.is_empty() && !director_suspected {
                        let recovery = track.settings.interval * (track.settings.limits.rise + 1);
                        self.alerts.check_down(
                            host,
                            spec.to_string(),
                            layer,
                            cause_text(t.cause),
                            names,
                            recovery,
                            now,
                        );
                    }
                }
                State::Up => {
                    info!(probe = %spec, sent = counts.sent, services = ?names, "real server UP");
                    if diagnoses_host {
                        self.alerts.host_up(host, now);
                    }
                    self.alerts.check_up(&spec.to_string(), now);
                }
            }
        }
        if let Some(store) = store {
            if transition.is_some() || now.duration_since(track.latency_saved_at) >= LATENCY_SAVE {
                track.latency_saved_at = now;
                store.set_health(
                    health_key(&spec),
                    HealthRecord {
                        latency_ns: track.latency.map_or(0, |l| l.value_ns() as u64),
                        state: if track.health.state() == State::Up {
                            1
                        } else {
                            2
                        },
                        _pad: [0; 7],
                    },
                )?;
            }
        }
        Ok(send_next)
    }

    /// Works out the weights of every managed service (`all`), or of those
    /// a health change touched this tick, and writes the changed ones in
    /// one batch.
    fn update_weights(&mut self, now: Instant, all: bool) {
        if self.ipvs.is_none() || self.store.is_none() || (!all && self.touched.is_empty()) {
            return;
        }
        let mut pools: BTreeMap<ServiceKey, Vec<usize>> = BTreeMap::new();
        for (i, b) in self.plan.bindings.iter().enumerate() {
            if all || self.touched.contains(&b.service) {
                pools.entry(b.service).or_default().push(i);
            }
        }
        let mut updates = Vec::new();
        for (service, members_idx) in pools {
            let slow_start = self.config.weights_for(&service).1.slow_start;
            let mut members: Vec<Candidate> = Vec::with_capacity(members_idx.len());
            for &i in &members_idx {
                let b = &self.plan.bindings[i];
                let (Some(dest), Some(probe)) = (
                    self.dests.get(&(b.service, b.destination.key())),
                    self.probes.get(&b.probe),
                ) else {
                    continue;
                };
                let checks: Vec<(&CheckSpec, &CheckTrack)> = b
                    .checks
                    .iter()
                    .filter_map(|c| Some((c, self.checks.get(c)?)))
                    .collect();
                let failing = checks.iter().find(|(_, c)| c.health.state() == State::Down);
                // A command's weight, else the agent's, else the configured.
                let check_weight = checks.iter().filter_map(|(_, c)| c.weight).min();
                let agent = self
                    .agents
                    .as_ref()
                    .and_then(|a| a.view(b.destination.addr));
                // Down is unhealthy; drain is healthy at weight 0 (it
                // counts for neither panic mode nor "no healthy server").
                let agent_down = agent.is_some_and(|a| a.state == AgentState::Down);
                let configured = match agent {
                    Some(a) if a.state == AgentState::Drain => 0,
                    _ => check_weight
                        .or(agent.map(|a| a.weight))
                        .unwrap_or(dest.configured),
                };
                let why = if probe.health.state() == State::Down {
                    format!("down: {} probe {} failing", layer_of(&b.probe), b.probe)
                } else if let Some((spec, c)) = failing {
                    format!(
                        "down: {} {spec} failing ({})",
                        spec.check.layer(),
                        c.failure.as_deref().unwrap_or("no answer")
                    )
                } else if agent_down {
                    "down: its agent says so".into()
                } else if agent.is_some_and(|a| a.state == AgentState::Drain) {
                    "drained by its agent".into()
                } else if check_weight.is_some() {
                    format!("weight {configured} from its command check")
                } else if agent.is_some() {
                    format!("weight {configured} from its agent")
                } else if probe
                    .came_up_at
                    .is_some_and(|at| now.duration_since(at) < slow_start)
                {
                    "up: slow start".into()
                } else if dest.current == 0 {
                    "up: back in service".into()
                } else {
                    "latency".into()
                };
                let given = check_weight.is_some() || agent.is_some();
                members.push(Candidate {
                    index: i,
                    overridden: configured != dest.configured,
                    evidence: probe.evidence
                        || agent.is_some()
                        || checks.iter().any(|(_, c)| c.evidence),
                    why,
                    member: Member {
                        configured,
                        up: probe.health.state() == State::Up && failing.is_none() && !agent_down,
                        up_since: probe.came_up_at,
                        latency_ns: probe.latency.map(|l| l.value_ns()),
                        current: dest.current,
                        exact: given,
                    },
                });
            }
            let healthy = members
                .iter()
                .filter(|m| m.member.up && m.member.configured > 0)
                .count();
            let suspected = self.path.suspected().is_some();
            if !suspected {
                self.alerts
                    .service_health(&service.to_string(), healthy, members.len(), now);
            }
            // Clients' response times weigh a pool when every server in it
            // that is up has a fresh one; else probe RTTs for all, so the
            // servers are compared on one measure.
            let fresh = |probe: &ProbeTrack| {
                probe
                    .response_at
                    .is_some_and(|at| now.duration_since(at) < self.config.policy.decay)
            };
            let use_responses = members_idx.iter().all(|&i| {
                let b = &self.plan.bindings[i];
                self.probes
                    .get(&b.probe)
                    .is_none_or(|p| p.health.state() == State::Down || fresh(p))
            });
            if use_responses {
                for m in &mut members {
                    let probe = &self.probes[&self.plan.bindings[m.index].probe];
                    m.member.latency_ns = probe.response.map(|r| r.value_ns());
                }
            }
            let (latency_aware, policy) = self.config.weights_for(&service);
            if !latency_aware {
                for m in &mut members {
                    m.member.latency_ns = None;
                }
            }
            if suspected {
                continue; // fail open: the director, not the pool, is at fault
            }
            let pool: Vec<Member> = members.iter().map(|m| m.member).collect();
            let result = pool_weights(&pool, &policy, now);
            if result.panic {
                if self.panicking.insert(service) {
                    let serving = pool.iter().filter(|m| m.configured > 0);
                    let healthy = serving.clone().filter(|m| m.up).count();
                    warn!(
                        %service,
                        "PANIC: {healthy} of {} serving real servers healthy, below the panic threshold of {:.0} %: keeping the last weights (fail open)",
                        serving.count(),
                        policy.panic_threshold * 100.0
                    );
                }
                continue;
            }
            if self.panicking.remove(&service) {
                info!(%service, "panic over: weights follow health again");
            }
            // Only latency-aware pools have latency-made weights to keep.
            let hold_latency = latency_aware && now < self.latency_hold_until;
            for (m, weight) in members.into_iter().zip(result.weights) {
                let b = &self.plan.bindings[m.index];
                let key = (b.service, b.destination.key());
                if let Some(dest) = self.dests.get_mut(&key) {
                    dest.computed = Some(weight);
                }
                // Before its probe has spoken, and while latency is held,
                // a server that is up (and not ramping up) keeps its weight,
                // unless an agent or a command gave it a new one.
                let member = m.member;
                let steady_up = member.up && member.up_since.is_none() && member.current > 0;
                if !m.evidence
                    || weight == member.current
                    || (hold_latency && steady_up && !m.overridden)
                {
                    continue;
                }
                updates.push((
                    WeightChange {
                        service,
                        destination: key.1,
                        expected: member.current,
                        weight,
                    },
                    m.why,
                ));
            }
        }
        self.write_weights(updates);
    }

    /// Writes a batch of weight changes, each a fresh read-modify-write
    /// that yields to a change made by someone else since the last dump,
    /// and records what applied. A write whose outcome is unknown (the
    /// socket failed mid-batch) is remembered, so finding it in IPVS later
    /// is taken as prober's own write, not an operator's.
    fn write_weights(&mut self, updates: Vec<(WeightChange, String)>) {
        let (Some(ipvs), Some(store)) = (self.ipvs.as_mut(), self.store.as_mut()) else {
            return;
        };
        if updates.is_empty() {
            return;
        }
        for (update, _) in &updates {
            let key = (update.service, update.destination);
            if let Some(track) = self.dests.get(&key) {
                let mut intent = record(track);
                intent.pending = update.weight;
                intent.has_pending = 1;
                if let Err(e) = store.set_weight(weight_key(&key.0, &key.1), intent) {
                    warn!("saving state: {e:#}");
                }
            }
        }
        let batch: Vec<WeightChange> = updates.iter().map(|(u, _)| u.clone()).collect();
        let started = std::time::Instant::now();
        let outcome = ipvs.change_weights(&batch);
        // A large batch (a rack down, a mass recovery) gets one line with
        // its rate; single changes have their own lines below.
        if batch.len() >= LARGE_BATCH {
            info!(
                writes = batch.len(),
                "IPVS batch of {} weights written in {:.1} ms",
                batch.len(),
                started.elapsed().as_secs_f64() * 1e3
            );
        }
        let withdraw =
            |store: &mut StateStore, track: &DestTrack, key: &(ServiceKey, DestinationKey)| {
                if let Err(e) = store.set_weight(weight_key(&key.0, &key.1), record(track)) {
                    warn!("saving state: {e:#}");
                }
            };
        for failure in &outcome.failed {
            warn!(service = %failure.service, destination = %failure.destination, "weight not written: {}", failure.error);
            let key = (failure.service, failure.destination);
            if let Some(track) = self.dests.get(&key) {
                withdraw(store, track, &key);
            }
        }
        self.totals.weight_write_errors += outcome.failed.len() as u64;
        for &index in &outcome.not_sent {
            let key = (batch[index].service, batch[index].destination);
            if let Some(track) = self.dests.get(&key) {
                withdraw(store, track, &key);
            }
        }
        for &index in &outcome.gone {
            let key = (batch[index].service, batch[index].destination);
            debug!(service = %key.0, destination = %key.1, "not written: the destination left IPVS");
            if let Some(track) = self.dests.get(&key) {
                withdraw(store, track, &key);
            }
        }
        for (index, fresh) in &outcome.changed_by_others {
            let key = (batch[*index].service, batch[*index].destination);
            let Some(track) = self.dests.get_mut(&key) else {
                continue;
            };
            // Someone set this weight since the last dump: theirs stands,
            // as at a discovery; the next tick works from it.
            manual_change(&self.config, &key.0, fresh, track.current, track);
            track.current = fresh.weight;
            track.destination = fresh.clone();
            withdraw(store, track, &key);
        }
        if let Some((unknown, error)) = &outcome.unknown {
            warn!(
                "writing weights: {error}; {} writes may or may not have applied (the next discovery tells), {} not sent",
                unknown.len(),
                outcome.not_sent.len()
            );
            self.totals.netlink_errors += 1;
            for &index in unknown {
                let key = (batch[index].service, batch[index].destination);
                if let Some(track) = self.dests.get_mut(&key) {
                    // The intent saved above stays, for a restart too.
                    track.unsure = Some(batch[index].weight);
                }
            }
        }
        let mut written = vec![false; batch.len()];
        for &index in &outcome.applied {
            written[index] = true;
        }
        for (index, (update, why)) in updates.into_iter().enumerate() {
            if !written[index] {
                continue;
            }
            let key = (update.service, update.destination);
            self.totals.weight_writes += 1;
            if let Some(track) = self.dests.get_mut(&key) {
                info!(
                    service = %update.service,
                    destination = %key.1,
                    why = %why,
                    "set weight {} -> {}",
                    track.current,
                    update.weight
                );
                track.last_change = Some(change(track.current, update.weight, why));
                track.current = update.weight;
                track.written = Some(update.weight);
                track.unsure = None;
                if let Err(e) = store.set_weight(weight_key(&key.0, &key.1), record(track)) {
                    warn!("saving state: {e:#}");
                }
            }
        }
    }
}

/// One member of a pool as this tick sees it.
struct Candidate {
    /// Its binding.
    index: usize,
    /// An agent or a command set its weight.
    overridden: bool,
    /// Something has spoken about it this run.
    evidence: bool,
    /// What drives its weight now, for the log and `prober status`.
    why: String,
    member: Member,
}

fn change(from: u32, to: u32, why: String) -> crate::status::Change {
    crate::status::Change {
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        from,
        to,
        why,
    }
}

/// How long a failed check waits for its host's L3 probe: time for it to
/// go down, plus one interval (none without diagnosis).
fn diagnosis_window(config: &Config) -> Option<Duration> {
    config
        .diagnose
        .then(|| config.interval * (config.limits.fall + 1))
}

fn forwarding_name(f: prober_ipvs::Forwarding) -> String {
    match f {
        prober_ipvs::Forwarding::Masquerade => "masq".into(),
        prober_ipvs::Forwarding::DirectRoute => "route".into(),
        prober_ipvs::Forwarding::Tunnel => "tunnel".into(),
        prober_ipvs::Forwarding::Local => "local".into(),
        prober_ipvs::Forwarding::Other(n) => format!("other({n})"),
    }
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
    dest: &Destination,
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

/// The real server whose own traffic can stand in for this probe: a TCP
/// probe straight to it (NAT destinations are probed that way).
fn passive_server(spec: &ProbeSpec) -> Option<passive::Server> {
    match (spec.kind, spec.forwarding) {
        (crate::probe::ProbeKind::TcpSyn { port }, crate::probe::Forwarding::Direct) => {
            Some((spec.destination, port))
        }
        _ => None,
    }
}

/// The names of the services whose bindings match.
fn services_using(plan: &Plan, uses: impl Fn(&targets::Binding) -> bool) -> Vec<String> {
    let names: BTreeSet<String> = plan
        .bindings
        .iter()
        .filter(|b| uses(b))
        .map(|b| b.service.to_string())
        .collect();
    names.into_iter().collect()
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
