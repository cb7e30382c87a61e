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
        let by_service = std::mem::take(&mut self.plan.by_service);
        let mut updates = Vec::new();
        for &k in &due {
            let Some((service, members_idx)) = by_service.get(k) else {
                continue;
            };
            let service = *service;
            let slow_start = self.config.weights_for(&service).1.slow_start;
            let mut members: Vec<Candidate> = Vec::with_capacity(members_idx.len());
            for &i in members_idx {
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
        // Exactly n pools an interval (each once: damping's steps are per
        // interval), the fraction carried from wake to wake.
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
            due.push((self.pool_cursor + i) % n);
        }
        self.pool_cursor = (self.pool_cursor + share) % n;
        due.sort_unstable();
        due.dedup();
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
