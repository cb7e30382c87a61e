//! Decide: each pool's weights from its members' health, latency,
//! agents and slow start, for the pools a change touched and, in turn,
//! every other pool once an interval.

use super::*;

impl Controller {
    /// Works out the weights of the pools a health change touched this
    /// tick and of the next share of all pools (each recomputed once an
    /// interval, for slow start and latency, a slice per tick so no tick
    /// stalls the sends behind it), and writes the changed ones in one
    /// batch.
    pub(super) fn update_weights(&mut self, now: Instant) {
        if !self.ipvs_read || self.store.is_none() {
            return;
        }
        let mut due = std::mem::take(&mut self.pools_due);
        self.collect_pools_due(now, &mut due);
        self.totals.pools_recomputed += due.len() as u64;
        let by_service = std::mem::take(&mut self.plan.by_service);
        let mut updates = Vec::new();
        for &k in &due {
            let Some((service, members_idx)) = by_service.get(k) else {
                continue;
            };
            let service = *service;
            let slow_start = self.config.weights_for(&service).1.slow_start;
            let mut members = std::mem::take(&mut self.candidates);
            members.clear();
            // Whether something in this pool moves without a change
            // touching it (see `pool_settled`).
            let mut live = now < self.latency_hold_until;
            for &i in members_idx {
                let b = &self.plan.bindings[i];
                let (Some(dest), Some(probe)) = (
                    self.dests.get(&(b.service, b.destination.key())),
                    self.prober
                        .id_of(&b.probe)
                        .and_then(|id| self.probes.get(id)),
                ) else {
                    continue;
                };
                // The first failing check, by its place in the binding.
                let failing = b.checks.iter().position(|c| {
                    self.checks
                        .get(c)
                        .is_some_and(|t| t.health.state() == State::Down)
                });
                // A command's weight, else the agent's, else the configured.
                let check_weight = b
                    .checks
                    .iter()
                    .filter_map(|c| self.checks.get(c)?.weight)
                    .min();
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
                let ramping = probe
                    .came_up_at
                    .is_some_and(|at| now.duration_since(at) < slow_start);
                live |= check_weight.is_some()
                    || agent.is_some()
                    || ramping
                    || !probe.evidence
                    || probe.clients.is_some();
                let why = Reason::of(&ReasonInputs {
                    probe_down: probe.health.state() == State::Down,
                    failing_check: failing,
                    agent: agent.map(|a| a.state),
                    check_weight,
                    configured,
                    slow_start: ramping,
                    current: dest.current,
                });
                let given = check_weight.is_some() || agent.is_some();
                members.push(Candidate {
                    index: i,
                    overridden: configured != dest.configured,
                    evidence: probe.evidence
                        || agent.is_some()
                        || b.checks
                            .iter()
                            .any(|c| self.checks.get(c).is_some_and(|t| t.evidence)),
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
            // Suspected, or still asking the neighbours whether to be.
            let holding = self.path.holding();
            if !holding {
                self.alerts
                    .service_health(&service.to_string(), healthy, members.len(), now);
            }
            // Clients' response times weigh a pool when every server in it
            // that is up has a fresh one; else probe RTTs for all, so the
            // servers are compared on one measure.
            let fresh = |probe: &tracks::ProbeTrack| {
                probe
                    .clients
                    .as_ref()
                    .and_then(|c| c.response_at)
                    .is_some_and(|at| now.duration_since(at) < self.config.policy.decay)
            };
            let use_responses = members_idx.iter().all(|&i| {
                let b = &self.plan.bindings[i];
                self.prober
                    .id_of(&b.probe)
                    .and_then(|id| self.probes.get(id))
                    .is_none_or(|p| p.health.state() == State::Down || fresh(p))
            });
            if use_responses {
                for m in &mut members {
                    let probe = self
                        .prober
                        .id_of(&self.plan.bindings[m.index].probe)
                        .and_then(|id| self.probes.get(id));
                    m.member.latency_ns = probe
                        .and_then(|p| p.clients.as_ref())
                        .and_then(|c| c.response)
                        .map(|r| r.value_ns());
                }
            }
            let (latency_aware, policy) = self.config.weights_for(&service);
            if !latency_aware {
                for m in &mut members {
                    m.member.latency_ns = None;
                }
            }
            self.pool_settled[k] = false;
            if holding {
                // Fail open: the director, not the pool, may be at fault.
                self.candidates = members;
                continue;
            }
            let mut pool = std::mem::take(&mut self.pool_members);
            pool.clear();
            pool.extend(members.iter().map(|m| m.member));
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
                self.candidates = members;
                self.pool_members = pool;
                continue;
            }
            if self.panicking.remove(&service) {
                info!(%service, "panic over: weights follow health again");
            }
            // Only latency-aware pools have latency-made weights to keep.
            let hold_latency = latency_aware && now < self.latency_hold_until;
            let written_before = updates.len();
            for (m, weight) in members.drain(..).zip(result.weights) {
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
                    m.why.describe(b, &self.checks),
                ));
            }
            // Nothing to write and nothing moving: a change must touch it.
            self.pool_settled[k] = !live && updates.len() == written_before;
            self.candidates = members;
            self.pool_members = pool;
        }
        self.plan.by_service = by_service;
        self.pools_due = due;
        self.write_weights(updates);
    }

    /// Into `due` (indexes into `plan.by_service`, sorted, no repeats):
    /// the pools touched this tick, and the share of all pools that the
    /// time since the last call asks for, taken in turn.
    fn collect_pools_due(&mut self, now: Instant, due: &mut Vec<usize>) {
        due.clear();
        let pools = &self.plan.by_service;
        let n = pools.len();
        if n == 0 {
            return;
        }
        for service in &self.touched {
            if let Ok(k) = pools.binary_search_by(|(key, _)| key.cmp(service)) {
                due.push(k);
            }
        }
        if self.pool_settled.len() != n {
            self.pool_settled = vec![false; n];
        }
        // Exactly n pools an interval (each once: damping's steps are per
        // interval), the fraction carried from wake to wake; settled pools
        // are passed over.
        let share = match self.pools_rotated_at {
            None => n,
            Some(at) => {
                let part =
                    now.duration_since(at).as_secs_f64() / self.tick_interval().as_secs_f64();
                self.pool_credit = (self.pool_credit + n as f64 * part).min(n as f64);
                let whole = self.pool_credit.floor();
                self.pool_credit -= whole;
                whole as usize
            }
        };
        self.pools_rotated_at = Some(now);
        for i in 0..share {
            let k = (self.pool_cursor + i) % n;
            if !self.pool_settled[k] {
                due.push(k);
            }
        }
        self.pool_cursor = (self.pool_cursor + share) % n;
        due.sort_unstable();
        due.dedup();
    }
}

/// One member of a pool as this tick sees it.
pub(super) struct Candidate {
    /// Its binding.
    index: usize,
    /// An agent or a command set its weight.
    overridden: bool,
    /// Something has spoken about it this run.
    evidence: bool,
    /// What drives its weight now, said when a change is written.
    why: Reason,
    member: Member,
}

/// Why a destination's weight is what it is. Decided for every member of
/// every pool recomputed, formatted only for the changes written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Reason {
    ProbeDown,
    /// The binding's check at this place is failing.
    CheckDown(usize),
    AgentDown,
    AgentDrain,
    CommandWeight(u32),
    AgentWeight(u32),
    SlowStart,
    BackInService,
    Latency,
}

/// What [`Reason::of`] picks from.
struct ReasonInputs {
    probe_down: bool,
    failing_check: Option<usize>,
    agent: Option<AgentState>,
    check_weight: Option<u32>,
    /// The weight it is given (configured, or a command's or agent's).
    configured: u32,
    slow_start: bool,
    current: u32,
}

impl Reason {
    /// The first that holds: its own probe, its checks, its agent's
    /// state, a weight given by a command or the agent, slow start, a
    /// return to service, latency.
    fn of(i: &ReasonInputs) -> Self {
        if i.probe_down {
            Reason::ProbeDown
        } else if let Some(check) = i.failing_check {
            Reason::CheckDown(check)
        } else if i.agent == Some(AgentState::Down) {
            Reason::AgentDown
        } else if i.agent == Some(AgentState::Drain) {
            Reason::AgentDrain
        } else if i.check_weight.is_some() {
            Reason::CommandWeight(i.configured)
        } else if i.agent.is_some() {
            Reason::AgentWeight(i.configured)
        } else if i.slow_start {
            Reason::SlowStart
        } else if i.current == 0 {
            Reason::BackInService
        } else {
            Reason::Latency
        }
    }

    /// As the log and `prober status` say it.
    fn describe(
        self,
        binding: &crate::targets::Binding,
        checks: &FxHashMap<CheckSpec, CheckTrack>,
    ) -> String {
        match self {
            Reason::ProbeDown => format!(
                "down: {} probe {} failing",
                layer_of(&binding.probe),
                binding.probe
            ),
            Reason::CheckDown(at) => match binding.checks.get(at) {
                Some(spec) => format!(
                    "down: {} {spec} failing ({})",
                    spec.check.layer(),
                    checks
                        .get(spec)
                        .and_then(|t| t.failure.as_deref())
                        .unwrap_or("no answer")
                ),
                None => "down: a check failing".into(),
            },
            Reason::AgentDown => "down: its agent says so".into(),
            Reason::AgentDrain => "drained by its agent".into(),
            Reason::CommandWeight(w) => format!("weight {w} from its command check"),
            Reason::AgentWeight(w) => format!("weight {w} from its agent"),
            Reason::SlowStart => "up: slow start".into(),
            Reason::BackInService => "up: back in service".into(),
            Reason::Latency => "latency".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{AgentState, Reason, ReasonInputs};

    #[test]
    fn the_reason_is_the_first_cause_that_holds() {
        let healthy = ReasonInputs {
            probe_down: false,
            failing_check: None,
            agent: None,
            check_weight: None,
            configured: 100,
            slow_start: false,
            current: 100,
        };
        let with = |f: &dyn Fn(&mut ReasonInputs)| {
            let mut i = ReasonInputs { ..healthy };
            f(&mut i);
            Reason::of(&i)
        };
        let table: [(&str, Reason, Reason); 10] = [
            ("nothing special", with(&|_| {}), Reason::Latency),
            (
                "at 0, healthy",
                with(&|i| i.current = 0),
                Reason::BackInService,
            ),
            (
                "ramping up",
                with(&|i| i.slow_start = true),
                Reason::SlowStart,
            ),
            (
                "agent weight",
                with(&|i| {
                    i.agent = Some(AgentState::Up);
                    i.configured = 40;
                }),
                Reason::AgentWeight(40),
            ),
            (
                "command weight over agent",
                with(&|i| {
                    i.agent = Some(AgentState::Up);
                    i.check_weight = Some(7);
                    i.configured = 7;
                }),
                Reason::CommandWeight(7),
            ),
            (
                "drain over weights",
                with(&|i| {
                    i.agent = Some(AgentState::Drain);
                    i.check_weight = Some(7);
                }),
                Reason::AgentDrain,
            ),
            (
                "agent down",
                with(&|i| i.agent = Some(AgentState::Down)),
                Reason::AgentDown,
            ),
            (
                "a failing check over the agent",
                with(&|i| {
                    i.agent = Some(AgentState::Down);
                    i.failing_check = Some(1);
                }),
                Reason::CheckDown(1),
            ),
            (
                "its probe first",
                with(&|i| {
                    i.probe_down = true;
                    i.failing_check = Some(0);
                    i.agent = Some(AgentState::Down);
                }),
                Reason::ProbeDown,
            ),
            (
                "slow start after a down probe is not",
                with(&|i| {
                    i.probe_down = true;
                    i.slow_start = true;
                }),
                Reason::ProbeDown,
            ),
        ];
        for (case, got, want) in table {
            assert_eq!(got, want, "{case}");
        }
    }
}
