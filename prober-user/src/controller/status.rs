//! What `prober status` shows: every service and real server as the
//! controller sees them.

use super::*;

impl Controller {
    /// Every virtual service and real server as the controller sees them.
    pub fn status(&self, now: Instant) -> crate::status::Status {
        use crate::status::*;
        let state_name = |s: State| if s == State::Up { "up" } else { "down" }.to_string();
        let mut services: BTreeMap<ServiceKey, ServiceStatus> = BTreeMap::new();
        let reports = self.prober.reports();
        if let Err(e) = &reports {
            warn!("reading probe results for status: {e:#}");
        }
        let passive = self.passive.snapshot();
        if let Err(e) = &passive {
            warn!("reading passive measurements for status: {e:#}");
        }
        for b in &self.plan.bindings {
            let Some(dest) = self.dests.get(&(b.service, b.destination.key())) else {
                continue;
            };
            let probe_id = self.prober.id_of(&b.probe);
            let probe = probe_id.and_then(|id| self.probes.get(id));
            let report = match (probe_id, &reports) {
                (Some(id), Ok(reports)) => reports.get(id),
                _ => Default::default(),
            };
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
                .host_probe(b.destination.addr)
                .and_then(|spec| self.prober.id_of(&spec))
                .and_then(|id| self.probes.get(id))
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
            let passive = match &passive {
                Ok(passive) if b.destination.forwarding == prober_ipvs::Forwarding::Masquerade => {
                    passive.histograms(&(b.destination.addr, b.destination.port))
                }
                _ => None,
            };
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
                last_change: dest.last_change.as_deref().cloned(),
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
            frames_dropped_here: self.totals.frames_dropped_here,
            probe_events: self.totals.probe_events,
            slots_skipped: self.totals.slots_skipped,
            pools_recomputed: self.totals.pools_recomputed,
            wakes: self.totals.wake_ms,
            ipvs_dumps: self.totals.ipvs_dumps,
            ipvs_changes_signalled: self
                .ipvs_changes
                .as_ref()
                .map(|_| self.totals.ipvs_changes_signalled),
            neighbour_table_reads: self.prober.neighbour_reads().0,
            neighbour_changes_followed: self.prober.neighbour_reads().1,
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
            l3_probes_paused: self.prober.paused_count(),
            ..Default::default()
        }
    }
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
