//! Observe: probes settled and sent on their grid, their results and
//! passive samples turned into each target's health and latency, L7
//! check reports taken, and the director's own path judged.

use super::*;

impl Controller {
    /// Settles the probes whose reply is in or whose own timeout (counted
    /// from their own send) has passed, and sends those whose grid point
    /// has come, at most `schedule::budget` in one tick. Only the probes
    /// due are looked at, their counters read a block at a time.
    pub(super) fn settle_and_send(&mut self, now: Instant) {
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
        let sent = match self.prober.send(&sending) {
            Ok(sent) => sent,
            Err(e) => {
                warn!("sending probes: {e:#}");
                crate::probe::Sent {
                    attempted: sending.len(),
                    ..Default::default()
                }
            }
        };
        // What a full ring kept back goes at its next grid point.
        let held_back = sending.len() - sent.attempted.min(sending.len());
        sending.truncate(sent.attempted);
        self.note_sends(sending.len() as u64, budget, late, now);
        self.note_director_drops(sent.dropped, held_back as u64, now);
        // Taken after the send returned: no probe left later than this,
        // so no timeout counted from it is ever short.
        let sent_at = Instant::now();
        for (k, &id) in sending.iter().enumerate() {
            let Some(track) = self
                .prober
                .spec_of(id)
                .and_then(|spec| self.probes.get_mut(&spec))
            else {
                continue;
            };
            track.outstanding = true;
            track.sent_at = sent_at;
            // Which frames of the chunk the ring dropped is not known.
            track.sent_into_drops = sent.lossy.contains(&k);
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
    pub(super) fn note_sends(&mut self, sent: u64, budget: usize, late: u64, now: Instant) {
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
        if let Some(late) = totals.late_to_say.add(late, now) {
            warn!(
                late,
                "probe sends went out over half an interval late (the daemon was stalled or cannot keep up); they are spread, at most a slot's budget per tick, not sent at once"
            );
        }
    }

    /// Counts probe frames the director's own interface dropped (a full
    /// ring when a late batch went out at once): their probes' silence
    /// counts against no server. Said at most once a minute.
    fn note_director_drops(&mut self, dropped: u64, held_back: u64, now: Instant) {
        let totals = &mut self.totals;
        totals.frames_dropped_here += dropped;
        totals.sends_held_back += held_back;
        if let Some(dropped) = totals.drops_to_say.add(dropped, now) {
            warn!(
                dropped,
                interface = %self.prober.interface(),
                held_back = totals.sends_held_back,
                "the probing interface dropped probe frames as they were sent (its ring was full): a probe of the chunk that overflowed that gets no answer counts against no server (once in a row), and the rest of the batch waited for its next grid point"
            );
        }
    }

    /// Decides, from this tick's probe results and the link, whether the
    /// director itself is the likely fault; says so once each way.
    pub(super) fn judge_director_path(&mut self, now: Instant) {
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
    pub(super) fn take_check_reports(&mut self, now: Instant) {
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

    /// Turns what the datapath counted since the last probe into one
    /// interval's observations and feeds health and latency.
    /// Returns whether to send the next active probe: not when the real
    /// server's own traffic just showed it answering.
    pub(super) fn evaluate(&mut self, spec: ProbeSpec, now: Instant) -> Result<bool> {
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
            // Lost in the director's own ring: no evidence, once in a row
            // (a ring that overflows on every send must not hide a death).
            let dropped_here = track.sent_into_drops && !track.excused_last;
            track.excused_last = !replied && dropped_here;
            if !replied && (self.path.suspected().is_some() || sent_during_fault || dropped_here) {
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
        if diagnoses_host || matches!(spec.kind, crate::probe::ProbeKind::TcpSyn { .. }) {
            self.alerts.probe_settled(host, diagnoses_host);
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
