//! Alerts: one event per root cause. The controller reports health
//! changes of checks (L4 probes, L7 checks, commands), of hosts (the L3
//! diagnosis probe) and of whole virtual services; this module decides
//! what to tell the operator:
//!
//! - a host that stops answering at L3, with none of its L4 probes
//!   answering either and some check of it down, is one event naming every
//!   service that uses it ("RS 10.0.0.2 down at L3: 14 services
//!   affected"); the failures of its checks are not reported on their own.
//!   L3 is only trusted for hosts that have answered it at least once
//!   (some filter ICMP);
//! - a check that fails while its host still answers is one event naming
//!   the services that share it, once L3 has had time to decide;
//! - a virtual service left without any healthy real server is one event;
//! - a subject that changes state more than `flap_limit` times within
//!   `flap_window` gets one "flapping" event and then silence until it has
//!   been stable for a whole window.
//!
//! Events go to the log, to the notify command and to the webhook.

pub mod sink;
pub mod webhook;

use std::{
    collections::{BTreeSet, HashMap, HashSet, VecDeque},
    net::IpAddr,
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use crate::config::AlertConfig;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Kind {
    /// A real server host stopped answering at L3.
    HostDown,
    HostUp,
    /// One check (L4, L7 or command) of a host that still answers failed.
    CheckDown,
    CheckUp,
    /// A virtual service has no healthy real server left.
    ServiceEmpty,
    ServiceRestored,
    /// Too many changes: further events about the subject are held back.
    Flapping,
    /// A flapping subject has been stable for a whole window.
    Stable,
    /// The evidence points at the director's own path (its interface, its
    /// network): weights are kept instead of emptying pools.
    DirectorFault,
    /// Probes are answered again: weights follow health again.
    DirectorRecovered,
}

impl Kind {
    /// The name in events' JSON, `PROBER_EVENT` and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            Kind::HostDown => "host_down",
            Kind::HostUp => "host_up",
            Kind::CheckDown => "check_down",
            Kind::CheckUp => "check_up",
            Kind::ServiceEmpty => "service_empty",
            Kind::ServiceRestored => "service_restored",
            Kind::Flapping => "flapping",
            Kind::Stable => "stable",
            Kind::DirectorFault => "director_fault",
            Kind::DirectorRecovered => "director_recovered",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    pub kind: Kind,
    /// What the event is about: a host address, a check, a service.
    pub subject: String,
    /// "L3", "L4", "L7", "command"; empty for services.
    pub layer: &'static str,
    pub reason: String,
    /// Every virtual service affected.
    pub services: Vec<String>,
    /// The one line an operator reads.
    pub message: String,
    /// Seconds since the Unix epoch.
    pub time: f64,
}

struct CheckDown {
    host: IpAddr,
    layer: &'static str,
    reason: String,
    services: Vec<String>,
    since: Instant,
    /// The host's L3 and L4 probe outcomes settled by then.
    probes_at: [u64; 2],
    /// How long the check takes to come back once its host does.
    recovery: Duration,
    reported: bool,
}

#[derive(Default)]
struct HostState {
    down: bool,
    reported: bool,
    /// When the host last came back up (at L3, or at L4 first).
    up_at: Option<Instant>,
    /// When L3 last went down.
    down_since: Option<Instant>,
    reason: String,
    /// Probes the host's L3 probe and its L4 probes sent so far (each
    /// send settles the one before).
    probes_settled: [u64; 2],
}

#[derive(Default)]
struct Flap {
    changes: VecDeque<Instant>,
    quiet: bool,
    last_message: String,
}

/// Which services use each real server host: every service name once
/// (sorted), and each (host, service index) pair once, sorted (24 bytes
/// a pair: a table of hosts with a list each cost 85 bytes a host).
#[derive(Debug, Default)]
pub struct Topology {
    services: Vec<String>,
    pairs: Vec<(IpAddr, u32)>,
}

impl Topology {
    /// From (host, service) pairs, in any order, repeats allowed.
    pub fn of<'a>(pairs: impl Iterator<Item = (IpAddr, &'a str)> + Clone) -> Self {
        let mut names: Vec<&str> = pairs.clone().map(|(_, s)| s).collect();
        names.sort_unstable();
        names.dedup();
        let services: Vec<String> = names.into_iter().map(String::from).collect();
        let mut pairs: Vec<(IpAddr, u32)> = pairs
            .map(|(host, service)| {
                let k = services
                    .binary_search_by(|s| s.as_str().cmp(service))
                    .unwrap_or(0) as u32;
                (host, k)
            })
            .collect();
        pairs.sort_unstable();
        pairs.dedup();
        pairs.shrink_to_fit();
        Self { services, pairs }
    }

    /// The (host, service index) pairs of `host`.
    fn of_host(&self, host: IpAddr) -> &[(IpAddr, u32)] {
        let start = self.pairs.partition_point(|&(h, _)| h < host);
        let len = self.pairs[start..].partition_point(|&(h, _)| h == host);
        &self.pairs[start..start + len]
    }

    fn has_host(&self, host: IpAddr) -> bool {
        !self.of_host(host).is_empty()
    }
}

pub struct Alerts {
    config: AlertConfig,
    /// How long a failed check waits for L3 to decide whether its host is
    /// down (zero without diagnosis).
    settle: Duration,
    /// And until the host's L3 and L4 probes have each settled this many
    /// outcomes since (fall + 1): a director that falls behind delays
    /// the verdicts, not the evidence they need.
    settle_probes: u64,
    /// Whether hosts are probed at L3 at all.
    diagnose: bool,
    /// When each host's L3 probe last answered: every host has one, so
    /// apart from the few hosts with more to say (`hosts`), which a poll
    /// goes through (a record each cost 120 bytes a host, and a scan of
    /// 100,000 a tick).
    answered: rustc_hash::FxHashMap<IpAddr, Instant>,
    hosts: HashMap<IpAddr, HostState>,
    checks: HashMap<String, CheckDown>,
    /// Every service using each host, for host events.
    topology: Topology,
    empty_services: BTreeSet<String>,
    flaps: HashMap<String, Flap>,
    out: Vec<Event>,
}

impl Alerts {
    /// `diagnosis`: how long a failed check waits for its host's L3 probe
    /// to decide (none: hosts are not probed at L3).
    pub fn new(config: AlertConfig, diagnosis: Option<Duration>) -> Self {
        Self {
            config,
            settle: diagnosis.unwrap_or_default(),
            settle_probes: 0,
            diagnose: diagnosis.is_some(),
            answered: Default::default(),
            hosts: HashMap::new(),
            checks: HashMap::new(),
            topology: Topology::default(),
            empty_services: BTreeSet::new(),
            flaps: HashMap::new(),
            out: Vec::new(),
        }
    }

    /// A new diagnosis window (on reload).
    pub fn set_diagnosis(&mut self, diagnosis: Option<Duration>) {
        self.settle = diagnosis.unwrap_or_default();
        self.diagnose = diagnosis.is_some();
    }

    /// How many outcomes of each of a host's probes a failed check waits
    /// for (besides the window) before it is reported on its own.
    pub fn set_settle_probes(&mut self, outcomes: u64) {
        self.settle_probes = outcomes;
    }

    /// How many probes the host's L3 probe and its L4 probes have sent so
    /// far (the datapath's counts, read for the hosts that matter: see
    /// [`Alerts::hosts_awaiting_diagnosis`]).
    pub fn host_probes_sent(&mut self, host: IpAddr, sent: [u64; 2]) {
        if self.diagnose {
            self.hosts.entry(host).or_default().probes_settled = sent;
        }
    }

    /// The hosts of failed checks not yet reported, waiting for their
    /// host's own verdict, into `out` (cleared first).
    pub fn hosts_awaiting_diagnosis(&self, out: &mut Vec<IpAddr>) {
        out.clear();
        if !self.diagnose {
            return;
        }
        out.extend(self.checks.values().filter(|c| !c.reported).map(|c| c.host));
        out.sort_unstable();
        out.dedup();
    }

    /// New flapping settings (on reload).
    pub fn set_config(&mut self, config: AlertConfig) {
        self.config = config;
    }

    /// Which services use which host, and which checks exist (after each
    /// IPVS discovery): what is gone is forgotten.
    pub fn set_topology(&mut self, topology: Topology, checks: &HashSet<String>) {
        self.hosts.retain(|h, _| topology.has_host(*h));
        self.answered.retain(|h, _| topology.has_host(*h));
        self.checks
            .retain(|subject, c| topology.has_host(c.host) && checks.contains(subject));
        self.empty_services
            .retain(|s| topology.services.binary_search(s).is_ok());
        self.topology = topology;
    }

    /// A check went down; `recovery` is how long it needs to come back
    /// up once its host does (so a host's return is not followed by
    /// reports of its checks still on their way up).
    #[allow(clippy::too_many_arguments)]
    pub fn check_down(
        &mut self,
        host: IpAddr,
        subject: String,
        layer: &'static str,
        reason: String,
        services: Vec<String>,
        recovery: Duration,
        now: Instant,
    ) {
        let probes_at = self.hosts.get(&host).map_or([0; 2], |h| h.probes_settled);
        self.checks.insert(
            subject,
            CheckDown {
                host,
                layer,
                reason,
                services,
                since: now,
                probes_at,
                recovery,
                reported: false,
            },
        );
    }

    /// A check came back; reported only if its failure was.
    pub fn check_up(&mut self, subject: &str, now: Instant) {
        let Some(down) = self.checks.remove(subject) else {
            return;
        };
        if down.reported {
            let message = format!(
                "RS {subject} up again at {}: {} service{} ({})",
                down.layer,
                down.services.len(),
                plural(down.services.len()),
                down.services.join(", ")
            );
            self.emit(
                Kind::CheckUp,
                subject.to_string(),
                down.layer,
                String::new(),
                down.services,
                message,
                now,
            );
        }
    }

    /// The L3 probe of a host answered (`answered`) or went down/up.
    pub fn host_answered(&mut self, host: IpAddr, at: Instant) {
        self.answered
            .entry(host)
            .and_modify(|before| *before = (*before).max(at))
            .or_insert(at);
    }

    /// The host's L3 probe went down; reported once L4 agrees (`poll`).
    pub fn host_down(&mut self, host: IpAddr, reason: String, now: Instant) {
        if !self.answered.contains_key(&host) {
            return; // never answered L3: it says nothing about the host
        }
        let state = self.hosts.entry(host).or_default();
        state.down = true;
        state.reason = reason;
        state.down_since = Some(now);
    }

    pub fn host_up(&mut self, host: IpAddr, now: Instant) {
        self.answered.insert(host, now);
        let state = self.hosts.entry(host).or_default();
        state.down = false;
        state.up_at = Some(now);
        if !std::mem::take(&mut state.reported) {
            return;
        }
        let services = self.services_of(host);
        let message = format!(
            "RS {host} up again at L3: {} service{} ({})",
            services.len(),
            plural(services.len()),
            services.join(", ")
        );
        self.emit(
            Kind::HostUp,
            host.to_string(),
            "L3",
            String::new(),
            services,
            message,
            now,
        );
    }

    /// The director's own path is suspected (one event, whatever the
    /// number of servers whose probes fail).
    pub fn director_fault(&mut self, reason: String, now: Instant) {
        let message = format!(
            "director-side fault suspected: {reason}; keeping every weight as it is (fail open)"
        );
        self.emit(
            Kind::DirectorFault,
            "director".into(),
            "",
            reason,
            self.all_services(),
            message,
            now,
        );
    }

    pub fn director_recovered(&mut self, now: Instant) {
        self.emit(
            Kind::DirectorRecovered,
            "director".into(),
            "",
            String::new(),
            self.all_services(),
            "director-side fault over: probes are answered again, weights follow health".into(),
            now,
        );
    }

    fn all_services(&self) -> Vec<String> {
        self.topology.services.clone()
    }

    /// How many members of a virtual service are healthy.
    pub fn service_health(&mut self, service: &str, healthy: usize, total: usize, now: Instant) {
        if total == 0 {
            return;
        }
        let empty = healthy == 0;
        if empty && self.empty_services.insert(service.to_string()) {
            let message =
                format!("virtual service {service} has no healthy real server (0 of {total})");
            self.emit(
                Kind::ServiceEmpty,
                service.to_string(),
                "",
                String::new(),
                vec![service.to_string()],
                message,
                now,
            );
        } else if !empty && self.empty_services.remove(service) {
            let message = format!(
                "virtual service {service} has healthy real servers again ({healthy} of {total})"
            );
            self.emit(
                Kind::ServiceRestored,
                service.to_string(),
                "",
                String::new(),
                vec![service.to_string()],
                message,
                now,
            );
        }
    }

    /// Decides the failures L3 has had time to explain, and returns every
    /// event due. `l4_alive` says whether some L4 probe of a host still
    /// has it up (then an L3 failure alone is not the host's death).
    pub fn poll(&mut self, now: Instant, l4_alive: impl Fn(IpAddr) -> bool) -> Vec<Event> {
        let mut dead: Vec<IpAddr> = Vec::new();
        for (host, state) in &mut self.hosts {
            if !state.down {
                continue;
            }
            if !l4_alive(*host) {
                dead.push(*host);
            } else if state.reported
                && state
                    .down_since
                    .is_some_and(|since| state.up_at.is_none_or(|up| up < since))
            {
                // Reported dead, answering at L4 again before L3: it is
                // coming back; its checks get their recovery time.
                state.up_at = Some(now);
            }
        }
        dead.sort();
        // Sets, not scans: a rack down is thousands of dead hosts against
        // tens of thousands of checks.
        let dead_set: HashSet<IpAddr> = dead.iter().copied().collect();
        let hosts_with_checks: HashSet<IpAddr> = if dead.is_empty() {
            HashSet::new()
        } else {
            self.checks.values().map(|c| c.host).collect()
        };
        for host in &dead {
            let confirmed = hosts_with_checks.contains(host);
            let state = self.hosts.get_mut(host).expect("listed above");
            if state.reported || !confirmed {
                continue;
            }
            state.reported = true;
            let reason = state.reason.clone();
            let services = self.services_of(*host);
            let message = format!(
                "RS {host} down at L3 ({reason}): {} service{} affected ({})",
                services.len(),
                plural(services.len()),
                services.join(", ")
            );
            self.emit(
                Kind::HostDown,
                host.to_string(),
                "L3",
                reason,
                services,
                message,
                now,
            );
        }
        let mut due = Vec::new();
        for (subject, down) in &self.checks {
            if down.reported {
                continue;
            }
            if dead_set.contains(&down.host) {
                continue; // the host's own event covers it
            }
            let host = self.hosts.get(&down.host);
            // Failed with its host, which is back: give it time to follow.
            let recovering = host
                .and_then(|h| h.up_at)
                .is_some_and(|up| up > down.since && now < up + down.recovery);
            if recovering {
                continue;
            }
            let host_alive = self
                .answered
                .get(&down.host)
                .is_some_and(|&at| at > down.since);
            // Each of the host's probes that reports has had its chance
            // (an L4 check does not wait for itself).
            let had_chance = |i: usize| {
                host.is_none_or(|h| {
                    h.probes_settled[i] == 0
                        || h.probes_settled[i] - down.probes_at[i] >= self.settle_probes
                })
            };
            let probes_had_chance = had_chance(0) && (down.layer == "L4" || had_chance(1));
            if host_alive || (now.duration_since(down.since) >= self.settle && probes_had_chance) {
                due.push(subject.clone());
            }
        }
        due.sort();
        for subject in due {
            let down = self.checks.get_mut(&subject).expect("collected above");
            down.reported = true;
            let (layer, reason, services) =
                (down.layer, down.reason.clone(), down.services.clone());
            // What L3 says about the host, in words.
            let answered = self.answered.contains_key(&down.host);
            let l3_down = self.hosts.get(&down.host).is_some_and(|h| h.down);
            let host = match (answered, l3_down) {
                _ if !self.diagnose => "",
                (true, true) => ", host down at L3 but up at L4",
                (true, false) => ", host up",
                (false, _) => ", host never answered L3",
            };
            let message = format!(
                "RS {subject} down at {layer} ({reason}){host}: {} service{} affected ({})",
                services.len(),
                plural(services.len()),
                services.join(", ")
            );
            self.emit(
                Kind::CheckDown,
                subject,
                layer,
                reason,
                services,
                message,
                now,
            );
        }
        // Flapping subjects quiet for a whole window speak again.
        let window = self.config.flap_window;
        let mut stable = Vec::new();
        for (subject, flap) in &mut self.flaps {
            while flap
                .changes
                .front()
                .is_some_and(|t| now.duration_since(*t) > window)
            {
                flap.changes.pop_front();
            }
            if flap.quiet && flap.changes.is_empty() {
                flap.quiet = false;
                stable.push((subject.clone(), flap.last_message.clone()));
            }
        }
        self.flaps.retain(|_, f| !f.changes.is_empty() || f.quiet);
        for (subject, last) in stable {
            let message = format!("{subject} stopped flapping; last state: {last}");
            self.out.push(event(
                Kind::Stable,
                subject,
                "",
                String::new(),
                Vec::new(),
                message,
            ));
        }
        std::mem::take(&mut self.out)
    }

    fn services_of(&self, host: IpAddr) -> Vec<String> {
        self.topology
            .of_host(host)
            .iter()
            .map(|&(_, k)| self.topology.services[k as usize].clone())
            .collect()
    }

    #[allow(clippy::too_many_arguments)]
    fn emit(
        &mut self,
        kind: Kind,
        subject: String,
        layer: &'static str,
        reason: String,
        services: Vec<String>,
        message: String,
        now: Instant,
    ) {
        let limit = self.config.flap_limit as usize;
        let flap = self.flaps.entry(subject.clone()).or_default();
        flap.changes.push_back(now);
        flap.last_message = message.clone();
        if flap.quiet {
            return;
        }
        if flap.changes.len() > limit {
            flap.quiet = true;
            let message = format!(
                "{subject} is flapping: {} changes within {:?}; holding its events back until it is stable for {:?}",
                flap.changes.len(),
                self.config.flap_window,
                self.config.flap_window
            );
            self.out.push(event(
                Kind::Flapping,
                subject,
                layer,
                reason,
                services,
                message,
            ));
            return;
        }
        self.out
            .push(event(kind, subject, layer, reason, services, message));
    }
}

fn event(
    kind: Kind,
    subject: String,
    layer: &'static str,
    reason: String,
    services: Vec<String>,
    message: String,
) -> Event {
    Event {
        kind,
        subject,
        layer,
        reason,
        services,
        message,
        time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

#[cfg(test)]
mod tests;
