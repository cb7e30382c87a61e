//! Discover: IPVS and the configuration give the plan (targets, checks,
//! bindings); weights changed by hand since the last dump are noticed.

use super::*;

impl Controller {
    /// Gives each of the plan's new probes its track (from what an
    /// earlier run saved, else up as IPVS has it), once the prober has
    /// given it an id.
    fn track_probes(&mut self, now: Instant) {
        self.probes.reserve(self.prober.targets_len());
        for spec in self.plan.probes.keys() {
            let Some(id) = self.prober.id_of(spec) else {
                continue;
            };
            if self.probes.get(id).is_some() {
                continue;
            }
            let remembered = self
                .store
                .as_ref()
                .and_then(|store| store.health(&health_key(spec)));
            let state = match remembered.map(|r| r.state) {
                Some(2) => State::Down,
                _ => State::Up,
            };
            let latency = remembered
                .filter(|r| r.latency_ns > 0)
                .map(|r| LatencyEwma::new(r.latency_ns as f64, now));
            let health = Health::new(state, now);
            let track = tracks::ProbeTrack::new(health, latency, now);
            self.probes.insert(id, track);
        }
        self.up_probes = self
            .probes
            .iter()
            .filter(|(_, t)| t.health.state() == State::Up)
            .count();
    }

    /// Takes what IPVS answered since the last tick, in order: dumps
    /// become the plan, written batches are recorded (and the changes
    /// that waited for them go out).
    pub(super) fn take_ipvs_results(&mut self, now: Instant, open_store: OpenStore<'_>) {
        while let Some(done) = self.ipvs.take() {
            match done {
                ipvs_worker::Done::Dump(dump, dumped_in) => {
                    let before = self.dump_fingerprint;
                    let started = Instant::now();
                    let mut destinations = 0;
                    let applied = dump.map_err(anyhow::Error::from).and_then(|services| {
                        destinations = services.iter().map(|vs| vs.destinations.len()).sum();
                        self.discover(now, &services, open_store)
                    });
                    self.note_ipvs_read(applied);
                    if self.dump_fingerprint != before {
                        info!(
                            destinations,
                            dump_ms = dumped_in.as_millis() as u64,
                            plan_ms = started.elapsed().as_millis() as u64,
                            "IPVS read and the plan worked out again (the dump on the IPVS thread, the plan on this one)"
                        );
                        // A rebuild held the dump and the old plan and the
                        // new at once: what it freed goes back to the
                        // system (glibc keeps it in its arenas otherwise,
                        // 16 MiB at 10,000 real servers).
                        // SAFETY: malloc_trim only walks the allocator's
                        // own free lists.
                        unsafe { libc::malloc_trim(0) };
                    }
                }
                ipvs_worker::Done::Written(outcome) => self.record_written(outcome),
            }
        }
    }

    /// Asks the IPVS thread for a dump when one is due: IPVS's change
    /// signal fired since the last, or the periodic discovery came round.
    /// A signal seen while a dump is in flight waits for the next one: the
    /// dump under way may have read IPVS before the change.
    pub(super) fn discover_when_due(&mut self, now: Instant) {
        if let Some(changed) = self.ipvs_changes.as_mut().and_then(|s| s.take()) {
            let calls = self.ipvs_changed.as_ref().map_or(0, |c| c.calls);
            self.ipvs_changed = Some(Changed {
                calls: calls + changed.calls,
                ..changed
            });
        }
        let signalled = self.ipvs_changed.is_some();
        if !(signalled || now >= self.next_discovery) || !self.ipvs.dump() {
            return;
        }
        if let Some(changed) = self.ipvs_changed.take() {
            info!(
                calls = changed.calls,
                by = %changed.last_command,
                pid = changed.last_pid,
                "IPVS configuration changed: reading it now"
            );
            self.totals.ipvs_changes_signalled += changed.calls;
        }
        self.totals.ipvs_dumps += 1;
        self.next_discovery = now + self.discovery_period();
    }

    /// How often IPVS is dumped in full when nothing signals a change.
    /// With the signal the dump is only a safety net, and its period
    /// grows with the destinations past 10,000 (10 minutes at 100,000),
    /// so that at rest it costs the same a second at every size.
    pub(super) fn discovery_period(&self) -> Duration {
        self.config
            .discovery
            .unwrap_or(if self.ipvs_changes.is_some() {
                fallback_discovery(self.dests.len())
            } else {
                DEFAULT_DISCOVERY
            })
    }

    /// Says once when IPVS stops being readable, and when it is again.
    fn note_ipvs_read(&mut self, read: Result<()>) {
        self.ipvs_read = read.is_ok();
        match read {
            Err(e) => {
                let problem = format!("{e:#}");
                self.totals.netlink_errors += 1;
                if self.ipvs_problem.as_ref() != Some(&problem) {
                    warn!(
                        "reading IPVS: {problem}; retrying every {:?}",
                        self.discovery_period()
                    );
                    self.ipvs_problem = Some(problem);
                }
            }
            Ok(()) => {
                if self.ipvs_problem.take().is_some() {
                    info!("IPVS read again");
                }
            }
        }
    }

    /// Works out the targets from a dump of IPVS, and notices weights
    /// changed by someone else.
    fn discover(
        &mut self,
        now: Instant,
        services: &[prober_ipvs::VirtualService],
        open_store: OpenStore<'_>,
    ) -> Result<()> {
        if let Some(delay) = self.discovery_delay {
            std::thread::sleep(delay);
        }
        // The same services and destinations as at the last full pass:
        // the plan stands, and only the weights are compared with what
        // prober expects (its writes since, an operator's). Rebuilding the
        // plan after every minute's weight writes stalled the daemon for
        // seconds at 100,000 real servers.
        let fingerprint = dump_fingerprint(services);
        if self.dump_fingerprint == Some(fingerprint) && self.store.is_some() {
            return self.reconcile_weights(services);
        }
        let opened = self.store.is_none();
        if opened {
            self.store = Some(open_store()?);
        }
        let plan = targets::plan_within(services, &self.config, self.prober.capacity() as usize);
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
                    reconcile_weight(&self.config, store, &binding.service, dest, track)?;
                }
                None => {
                    let remembered = store.weight(&wkey);
                    let mut track = DestTrack {
                        configured: remembered.map_or(dumped, |r| r.configured),
                        written: remembered.filter(|r| r.has_written == 1).map(|r| r.written),
                        current: dumped,
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
        // Looked up by key: a scan of the dump for each would be quadratic
        // when many leave at once.
        let dumped: HashMap<(ServiceKey, DestinationKey), &Destination> = if gone.is_empty() {
            HashMap::new()
        } else {
            services
                .iter()
                .flat_map(|vs| {
                    vs.destinations
                        .iter()
                        .map(|d| ((vs.service.key, d.key()), d))
                })
                .collect()
        };
        for key in gone {
            let Some(track) = self.dests.remove(&key) else {
                continue;
            };
            store.remove_weight(&weight_key(&key.0, &key.1));
            // Still in IPVS but no longer managed (the config now leaves it
            // alone): hand it back at its configured weight, not at the
            // last one prober wrote.
            let still_there = dumped.get(&key).copied();
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
            self.ipvs.restore(restores);
        }

        // Dropped probes' tracks go before the prober frees their ids (see
        // `tracks::ProbeTracks`); new probes get theirs once it gives ids.
        let dropped: Vec<(u32, ProbeSpec)> = self
            .prober
            .targets()
            .filter(|(_, t)| !plan.probes.contains_key(&t.spec))
            .map(|(id, t)| (id, t.spec))
            .collect();
        self.path.retain(|p| plan.probes.contains_key(p));
        for (id, spec) in dropped {
            if let Some(track) = self.probes.remove(id) {
                self.failing_hosts.forget(&spec, &track);
            }
            self.unresolved_settled.remove(&id);
            store.remove_health(&health_key(&spec));
        }
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
        let names: HashMap<ServiceKey, String> = plan
            .by_service
            .iter()
            .map(|(service, _)| (*service, service.to_string()))
            .collect();
        let topology = crate::events::Topology::of(
            plan.bindings
                .iter()
                .map(|b| (b.destination.addr, names[&b.service].as_str())),
        );
        let subjects: HashSet<String> = plan
            .checks
            .keys()
            .map(|c| c.to_string())
            .chain(plan.bindings.iter().map(|b| b.probe.to_string()))
            .collect();
        self.alerts.set_topology(topology, &subjects);
        // NAT real servers: the director sees both directions of their traffic.
        let nat: Vec<passive::Server> = plan
            .bindings
            .iter()
            .filter(|b| b.destination.forwarding == prober_ipvs::Forwarding::Masquerade)
            .map(|b| (b.destination.addr, b.destination.port))
            .collect();
        self.passive.sync(&nat)?;
        let specs: Vec<ProbeSpec> = plan.probes.keys().copied().collect();
        self.prober.sync_targets(&specs)?;
        // From here the plan, its probes' ids and their tracks agree.
        self.plan = plan;
        self.track_probes(now);
        // A host's L3 probe may have become a check, or one of many.
        let hosts: Vec<IpAddr> = self.plan.hosts.iter().copied().collect();
        for host in hosts {
            self.pace_host_probe(host);
        }
        // The datapath learns what is held of new targets, and of those
        // whose interval or timeout changed (a write each; the rest cost a
        // comparison). New ones go out at their slot's next turn.
        for spec in &specs {
            self.write_expectation(*spec);
        }
        self.pool_settled.clear();
        self.dump_fingerprint = Some(fingerprint);
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

    /// The weights of a dump whose services and destinations the plan
    /// already has, against what prober expects of each (see
    /// [`reconcile_weight`]); a pool whose weight an operator changed is
    /// recomputed.
    fn reconcile_weights(&mut self, services: &[prober_ipvs::VirtualService]) -> Result<()> {
        let store = self.store.as_mut().expect("checked by the caller");
        for vs in services {
            let service = vs.service.key;
            for d in &vs.destinations {
                let Some(track) = self.dests.get_mut(&(service, d.key())) else {
                    continue; // not managed (skipped, or over capacity)
                };
                let before = (track.configured, track.current);
                reconcile_weight(&self.config, store, &service, &d.into(), track)?;
                if (track.configured, track.current) != before {
                    self.touched.insert(service);
                }
            }
        }
        Ok(())
    }

    /// Starts the plan's new checks, restarts those whose timing changed
    /// (keeping their health) and stops those no service uses any more. A
    /// check replaced by an edited one on the same server and port (a
    /// reload) hands it its health: editing a failing check does not
    /// bring the server back before the new check has spoken.
    pub(super) fn sync_checks(&mut self, plan: &Plan, now: Instant) {
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
    pub(super) fn restart_ended_checks(&mut self) {
        for (spec, track) in &mut self.checks {
            if track.task.is_finished() {
                warn!(check = %spec, "check task ended unexpectedly: restarting it");
                track.task = self.checker.start(spec.clone(), track.settings.timing);
            }
        }
    }
}

/// Compares the weight IPVS holds for a managed destination with what
/// prober expects there (what it wrote, else what IPVS held before): a
/// write of unknown outcome found there is prober's own; any other
/// difference is an operator's change.
fn reconcile_weight(
    config: &Config,
    store: &mut StateStore,
    service: &ServiceKey,
    dest: &targets::BoundDestination,
    track: &mut DestTrack,
) -> Result<()> {
    let wkey = weight_key(service, &dest.key());
    if track.own_unsure_write(dest.weight) {
        store.set_weight(wkey, record(track))?;
    }
    let expected = track.written.unwrap_or(track.current);
    if dest.weight != expected {
        manual_change(config, service, dest, expected, track);
        store.set_weight(wkey, record(track))?;
    }
    track.current = dest.weight;
    Ok(())
}

/// What a discovery works from in a dump, hashed: every service and
/// destination with its settings, not their weights (compared one by one,
/// see [`reconcile_weight`]) nor the counters that change from one dump
/// to the next.
fn dump_fingerprint(services: &[prober_ipvs::VirtualService]) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    services.len().hash(&mut hasher);
    for vs in services {
        let s = &vs.service;
        (s.key, &s.scheduler, s.flags, s.timeout, s.netmask).hash(&mut hasher);
        s.persistence_engine.hash(&mut hasher);
        vs.destinations.len().hash(&mut hasher);
        for d in &vs.destinations {
            (d.key(), d.forwarding).hash(&mut hasher);
            (d.upper_threshold, d.lower_threshold, d.tunnel).hash(&mut hasher);
        }
    }
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::dump_fingerprint;
    use prober_ipvs::{
        Destination, Forwarding, Protocol, Service, ServiceKey, Stats, Tunnel, VirtualService,
    };

    fn dump(weight: u32, conns: u32, bytes: u64) -> Vec<VirtualService> {
        let destination = |last: u8| Destination {
            addr: std::net::IpAddr::from([192, 0, 2, last]),
            port: 80,
            forwarding: Forwarding::Masquerade,
            weight,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: Tunnel::default(),
            active_conns: conns,
            inactive_conns: conns,
            persistent_conns: 0,
            stats: Stats {
                in_bytes: bytes,
                ..Stats::default()
            },
        };
        vec![VirtualService {
            service: Service {
                key: ServiceKey::Address {
                    protocol: Protocol::Tcp,
                    addr: std::net::IpAddr::from([203, 0, 113, 10]),
                    port: 80,
                },
                scheduler: "wrr".into(),
                flags: 0,
                timeout: 0,
                netmask: 0,
                persistence_engine: None,
                stats: Stats::default(),
            },
            destinations: vec![destination(10), destination(11)],
        }]
    }

    #[test]
    fn a_dump_differs_by_its_settings_not_its_weights_or_counters() {
        let base = dump_fingerprint(&dump(100, 0, 0));
        assert_eq!(base, dump_fingerprint(&dump(100, 7, 12_345)));
        assert_eq!(base, dump_fingerprint(&dump(50, 0, 0)));
        let mut one_less = dump(100, 0, 0);
        one_less[0].destinations.pop();
        assert_ne!(base, dump_fingerprint(&one_less));
        let mut thresholds = dump(100, 0, 0);
        thresholds[0].destinations[1].upper_threshold = 500;
        assert_ne!(base, dump_fingerprint(&thresholds));
    }
}
