//! Observe: what the datapath settled (see `send` for the wheel that
//! sends) and passive samples turned into each target's health and
//! latency, L7 check reports taken, and the director's own path judged.

use super::*;

impl Controller {
    /// Takes what the datapath settled since the last tick: only outcomes
    /// that go against what is held of a target, the ones that end such a
    /// run, and RTT moves (a steady target costs nothing here). Then the
    /// replies it matched, for the director path's verdict.
    pub(super) fn take_probe_events(&mut self, now: Instant) {
        let mut events = std::mem::take(&mut self.probe_events);
        self.prober.take_events(&mut events);
        if !events.is_empty() {
            let clock = MonotonicClock::now();
            for event in &events {
                self.observe_probe_event(event, now, Some(&clock));
            }
            self.totals.probe_events += events.len() as u64;
        }
        self.probe_events = events;
        if let Some(heard) = self.prober.heard() {
            let before = std::mem::replace(&mut self.heard, heard);
            if heard.replies_matched != before.replies_matched {
                self.path.answered();
            }
            if heard.arp_replies != before.arp_replies {
                self.path.neighbour_answered();
            }
        }
    }

    /// Decides, from this tick's probe results and the link, whether the
    /// director itself is the likely fault; says so once each way.
    pub(super) fn judge_director_path(&mut self, now: Instant) {
        // Probes that must all go silent: those up and sent (a paused L3
        // probe is up and says nothing, see `diagnosis`).
        let up = self.up_probes.saturating_sub(self.prober.paused_count());
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
        let change = self.path.end_tick(up, link_up && !settling, now);
        if self.path.asking_neighbours()
            && self
                .neighbours_asked_at
                .is_none_or(|at| now.duration_since(at) >= NEIGHBOUR_ASK_EVERY)
        {
            self.neighbours_asked_at = Some(now);
            let silent = self.path.silent_probes().copied();
            if let Err(e) = self.prober.ask_neighbours(silent, NEIGHBOURS_ASKED) {
                warn!("asking the next hops (ARP) whether the director's path works: {e:#}");
            }
        }
        match change {
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
            Some(director_fault::Change::ServersSilent { probes, hosts }) => {
                warn!(
                    interface = self.prober.interface(),
                    probes,
                    hosts,
                    "every probe that was answering went silent at once, but the next hops answer ARP: the director's path works, so the real servers are taken as silent (they go down as fall counts)"
                );
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
                    if track.weight != *weight {
                        // A command's weight: its pools follow it now.
                        touch_pools_using(&mut self.touched, &self.plan, |b| {
                            b.checks.contains(&report.spec)
                        });
                    }
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
            touch_pools_using(&mut self.touched, &self.plan, |b| {
                b.checks.contains(&report.spec)
            });
            let services = services_using(&self.plan, |b| b.checks.contains(&report.spec));
            let subject = report.spec.to_string();
            match transition.to {
                State::Down => {
                    let why = track.failure.clone().unwrap_or_default();
                    warn!(check = %subject, services = ?services, "check DOWN: {why}");
                    let timing = track.settings.timing;
                    let recovery =
                        timing.interval * (track.settings.limits.rise + 1) + timing.timeout;
                    self.feed_host_probes(report.spec.address, &MonotonicClock::now());
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

    /// Feeds one settled outcome into its probe's health and latency.
    /// `clock` places the datapath's times (None: settled here, now).
    pub(super) fn observe_probe_event(
        &mut self,
        event: &ProbeEvent,
        now: Instant,
        clock: Option<&MonotonicClock>,
    ) {
        let id = event.target_id;
        let Some(spec) = self.prober.spec_of(id) else {
            return; // a slot freed since
        };
        let Some(track) = self.probes.get_mut(id) else {
            return;
        };
        let mut seen = Observations::default();
        match event.outcome {
            outcome::ANSWERED => seen.answered = 1,
            outcome::REFUSED => seen.refused = 1,
            outcome::UNREACHABLE => seen.unreachable = 1,
            outcome::TIMED_OUT | outcome::SLOW => seen.timed_out = 1,
            _ => return,
        }
        // A slow answer is a failure of the server, but the director's
        // path carried it.
        let replied = event.outcome != outcome::TIMED_OUT;
        // Only the active probe's own result says whether the path works;
        // a timeout counts against it only for a probe that was up (a
        // dead server's silence is old news).
        if replied || track.health.state() == State::Up {
            self.path.probe_result(spec, spec.real_server(), replied);
        }
        // While the director's own path is suspected, silence is no
        // evidence against the server: its health waits, so nothing is
        // taken out when the path comes back. Nor is the silence of a
        // probe sent while it was suspected and settled just after.
        let sent_at = clock.and_then(|c| c.instant_of(event.sent_ns));
        let sent_during_fault = self
            .fault_cleared_at
            .zip(sent_at)
            .is_some_and(|(cleared, sent)| sent <= cleared);
        // (While the neighbours are asked, too: the datapath's run length
        // comes with the next failure, so nothing is lost if they answer.)
        if !replied && (self.path.holding() || sent_during_fault) {
            seen.timed_out = 0;
        }
        if event.outcome == outcome::TIMED_OUT && clock.is_some() {
            if let Err(e) = self.prober.revalidate_neighbour(id) {
                warn!(probe = %spec, "asking the kernel to check the neighbour: {e:#}");
            }
        }
        let track = self.probes.get_mut(id).expect("looked up above");
        if event.rtt_ewma_ns > 0 && track.active_rtt_ns != event.rtt_ewma_ns {
            track.active_rtt_ns = event.rtt_ewma_ns;
            track.latency = combined_latency(track, now);
            // A move beyond the band: the latency-aware pools it weighs
            // in follow at the next regular tick.
            let config = &self.config;
            touch_pools_of_probe(&mut self.latency_touched, &self.plan, &spec, |service| {
                config.weights_for(service).0
            });
        }
        let host = spec.real_server();
        let diagnoses_host = self.plan.host_probe(host) == Some(spec);
        if diagnoses_host {
            // What the host answered before this outcome (down L3 needs a
            // host that answered once) and with it.
            let answered = clock.and_then(|c| c.instant_of(event.answered_before_ns));
            if let Some(at) = answered {
                self.alerts.host_answered(host, at);
            }
            if seen.answered > 0 {
                self.alerts.host_answered(host, now);
            }
        }
        if seen == Observations::default() {
            self.save_health(spec, false, now);
            return; // excused: no evidence either way
        }
        let Some(settings) = self.plan.settings_of(&spec) else {
            return; // in the datapath, not (yet) in the plan
        };
        let track = self.probes.get_mut(id).expect("looked up above");
        let first_evidence = !std::mem::replace(&mut track.evidence, true);
        let transition = track
            .health
            .observe_settled(seen, event.in_row, settings.limits, now);
        if let Some(t) = transition {
            self.on_transition(spec, t, now);
        }
        // Saved once known in this run (a paused L3 probe says nothing
        // more), then on each change.
        self.save_health(spec, transition.is_some() || first_evidence, now);
        self.write_expectation(spec);
        self.steer_diagnosis(id, spec, seen.answered == 0);
    }

    /// A probe's state changed: its pools are recomputed, logs and alerts.
    fn on_transition(&mut self, spec: ProbeSpec, t: crate::health::Transition, now: Instant) {
        let Some(track) = self
            .prober
            .id_of(&spec)
            .and_then(|id| self.probes.get_mut(id))
        else {
            return;
        };
        if t.to == State::Up {
            track.came_up_at = Some(now);
            self.up_probes += 1;
        } else {
            self.up_probes = self.up_probes.saturating_sub(1);
        }
        let recovery = self
            .plan
            .settings_of(&spec)
            .map_or(Duration::ZERO, |s| s.interval * (s.limits.rise + 1));
        touch_pools_of_probe(&mut self.touched, &self.plan, &spec, |_| true);
        let host = spec.real_server();
        let diagnoses_host = self.plan.host_probe(host) == Some(spec);
        let names = self.plan.services_of_probe(&spec);
        let layer = layer_of(&spec);
        // While the director is suspected its one alert stands for every
        // server it cannot reach.
        let director_suspected = self.path.suspected().is_some();
        // Probes sent so far, to tell a verdict's timing in probes (one
        // map read per change of state).
        let sent = self
            .prober
            .id_of(&spec)
            .and_then(|id| self.prober.state_of(id))
            .map_or(0, |s| s.sent);
        match t.to {
            State::Down => {
                warn!(probe = %spec, cause = ?t.cause, sent, services = ?names, "real server DOWN");
                if diagnoses_host && !director_suspected {
                    self.alerts.host_down(host, cause_text(t.cause), now);
                }
                if !names.is_empty() && !director_suspected {
                    self.feed_host_probes(host, &MonotonicClock::now());
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
                info!(probe = %spec, sent, services = ?names, "real server UP");
                if diagnoses_host {
                    self.alerts.host_up(host, now);
                }
                self.alerts.check_up(&spec.to_string(), now);
            }
        }
    }

    pub(super) fn feed_host_probes(&mut self, host: IpAddr, clock: &MonotonicClock) {
        let state = |spec: &ProbeSpec| {
            self.prober
                .id_of(spec)
                .and_then(|id| self.prober.state_of(id))
        };
        let l3 = self.plan.host_probe(host).and_then(|spec| state(&spec));
        // A scan of the probes, only while a check of this host waits.
        let l4: u64 = self
            .probes
            .iter()
            .filter_map(|(id, _)| self.prober.spec_of(id))
            .filter(|spec| {
                spec.real_server() == host
                    && matches!(spec.kind, crate::probe::ProbeKind::TcpSyn { .. })
            })
            .filter_map(|spec| state(&spec))
            .map(|s| s.sent)
            .sum();
        if let Some(at) = l3.and_then(|s| clock.instant_of(s.last_reply_ns)) {
            self.alerts.host_answered(host, at);
        }
        self.alerts
            .host_probes_sent(host, [l3.map_or(0, |s| s.sent), l4]);
    }

    /// Saves the probe's health and latency for restarts: on a change of
    /// state, and its latency at most every `LATENCY_SAVE`.
    fn save_health(&mut self, spec: ProbeSpec, changed: bool, now: Instant) {
        let track = self
            .prober
            .id_of(&spec)
            .and_then(|id| self.probes.get_mut(id));
        let (Some(store), Some(track)) = (self.store.as_mut(), track) else {
            return;
        };
        if !changed && now.duration_since(track.latency_saved_at) < LATENCY_SAVE {
            return;
        }
        track.latency_saved_at = now;
        let record = HealthRecord {
            latency_ns: track.latency.map_or(0, |l| l.value_ns() as u64),
            state: if track.health.state() == State::Up {
                1
            } else {
                2
            },
            _pad: [0; 7],
        };
        if let Err(e) = store.set_health(health_key(&spec), record) {
            warn!(probe = %spec, "saving its health: {e:#}");
        }
    }

    /// Tells the datapath what is held of the probe's target, when that
    /// changed: its state once there is evidence (nothing before, so its
    /// first outcome is reported), and the timeout past which an answer
    /// is slow.
    pub(super) fn write_expectation(&mut self, spec: ProbeSpec) {
        let Some(id) = self.prober.id_of(&spec) else {
            return;
        };
        let (Some(track), Some(settings)) = (self.probes.get(id), self.plan.settings_of(&spec))
        else {
            return;
        };
        let wanted = Expectation {
            state: match (track.evidence, track.health.state()) {
                (false, _) => expected::UNKNOWN,
                (true, State::Up) => expected::UP,
                (true, State::Down) => expected::DOWN,
            },
            _pad: [0; 3],
            timeout_us: micros(settings.timeout),
            interval_us: micros(settings.interval),
            lossy_nonce: 0, // the prober's own (see `Prober::set_expectation`)
        };
        if let Err(e) = self.prober.set_expectation(id, wanted) {
            warn!(probe = %spec, "{e:#}");
        }
    }

    /// Folds a server's passive samples (see README, "Passive
    /// measurement") into its probe's latency and response time. Client
    /// handshakes feed the RTT estimate; server resets and resent client
    /// SYNs are never a failure: any client can send duplicate SYNs or
    /// stray segments through the VIP, and nothing a stranger sends may
    /// take a server out (its own probes decide).
    pub(super) fn observe_passive(
        &mut self,
        server: passive::Server,
        passive: passive::Delta,
        now: Instant,
    ) {
        let spec = ProbeSpec {
            kind: crate::probe::ProbeKind::TcpSyn { port: server.1 },
            destination: server.0,
            forwarding: crate::probe::Forwarding::Direct,
        };
        let decay = self.config.policy.decay;
        let peak = self.config.policy.peak_ewma;
        let Some(track) = self
            .prober
            .id_of(&spec)
            .and_then(|id| self.probes.get_mut(id))
        else {
            return;
        };
        // Its pools weigh client times from now on (and keep recomputing
        // while they do): a settled pool must hear of the first.
        let first = track.clients.is_none();
        if let Some(handshake) = passive.mean_handshake_ns() {
            let clients = track.clients.get_or_insert_default();
            match &mut clients.handshake {
                Some(ewma) => ewma.observe(handshake, now, decay, peak),
                None => clients.handshake = Some(LatencyEwma::new(handshake, now)),
            }
            track.latency = combined_latency(track, now);
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
            let clients = track.clients.get_or_insert_default();
            match &mut clients.response {
                Some(ewma) => ewma.observe(response, now, decay, peak),
                None => clients.response = Some(LatencyEwma::new(response, now)),
            }
            clients.response_at = Some(now);
        }
        if first && track.clients.is_some() {
            touch_pools_of_probe(&mut self.touched, &self.plan, &spec, |_| true);
        }
    }
}

fn micros(d: Duration) -> u32 {
    d.as_micros().min(u32::MAX as u128) as u32
}

/// A probe's latency: the datapath's estimate from its probes and the one
/// from client handshakes (NAT servers), averaged when both exist.
fn combined_latency(track: &tracks::ProbeTrack, now: Instant) -> Option<LatencyEwma> {
    let passive = track
        .clients
        .as_ref()
        .and_then(|c| c.handshake)
        .map(|l| l.value_ns());
    let active = (track.active_rtt_ns > 0).then_some(track.active_rtt_ns as f64);
    let value = match (active, passive) {
        (Some(a), Some(p)) => (a + p) / 2.0,
        (Some(v), None) | (None, Some(v)) => v,
        (None, None) => return track.latency,
    };
    Some(LatencyEwma::new(value, now))
}

/// Marks for recomputing the pools of the services whose bindings match
/// (a settled pool is recomputed only when touched).
pub(super) fn touch_pools_using(
    touched: &mut HashSet<ServiceKey>,
    plan: &Plan,
    uses: impl Fn(&targets::Binding) -> bool,
) {
    touched.extend(plan.bindings.iter().filter(|b| uses(b)).map(|b| b.service));
}

/// Marks for recomputing the pools `spec` weighs in whose service
/// `wanted` accepts.
fn touch_pools_of_probe(
    touched: &mut HashSet<ServiceKey>,
    plan: &Plan,
    spec: &ProbeSpec,
    wanted: impl Fn(&ServiceKey) -> bool,
) {
    for i in plan.bindings_of(spec) {
        let service = plan.bindings[i].service;
        if wanted(&service) {
            touched.insert(service);
        }
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
