//! L3 diagnosis on demand: a host's ICMP probe (see `targets::host_probe`)
//! goes out only while it has something to tell the alerts: until it has
//! answered in this run (L3 is trusted only for hosts that answered it),
//! while another probe of the host fails, while a failed check of the
//! host waits for it, and while it is down itself.
//! Otherwise the datapath walks past it: at rest the director sends one
//! probe per check, not one more per host (at 100,000 one-service real
//! servers, half the frames). An L3 probe that is itself a check (UDP
//! services) always goes.

use super::*;

/// Hosts with failing probes other than their L3 one, and how many: few
/// at a time.
#[derive(Default)]
pub(super) struct FailingHosts(FxHashMap<IpAddr, u32>);

impl FailingHosts {
    /// Counts a probe of `host` that started (`true`) or stopped failing.
    fn count(&mut self, host: IpAddr, failing: bool) {
        if failing {
            *self.0.entry(host).or_default() += 1;
        } else if let Some(n) = self.0.get_mut(&host) {
            *n -= 1;
            if *n == 0 {
                self.0.remove(&host);
            }
        }
    }

    /// A dropped probe's failure no longer counts for its host.
    pub(super) fn forget(&mut self, spec: &ProbeSpec, track: &tracks::ProbeTrack) {
        if track.failing {
            self.count(spec.real_server(), false);
        }
    }

    fn any(&self, host: IpAddr) -> bool {
        self.0.contains_key(&host)
    }
}

impl Controller {
    /// Notes a settled outcome of `spec` (target `id`): a failure of a
    /// check sends its host's L3 probe, the answer that ends the last
    /// failure lets it pause; an outcome of the L3 probe itself may too.
    pub(super) fn steer_diagnosis(&mut self, id: u32, spec: ProbeSpec, failed: bool) {
        let host = spec.real_server();
        if self.plan.host_probe(host) != Some(spec) {
            let Some(track) = self.probes.get_mut(id) else {
                return;
            };
            if track.failing == failed {
                return;
            }
            track.failing = failed;
            self.failing_hosts.count(host, failed);
        }
        self.pace_host_probe(host);
    }

    /// Tells the alerts what the probes of hosts with a failed check did
    /// (the datapath's counts, read for those hosts only): whether the
    /// host still answers, and whether its probes had their chance. Hosts
    /// that start or stop waiting have their L3 probe resumed or paused.
    pub(super) fn feed_diagnosis(&mut self) {
        let mut hosts = std::mem::take(&mut self.diagnosis_before);
        std::mem::swap(&mut hosts, &mut self.diagnosis_hosts);
        // `hosts` now holds last tick's list; this tick's is built in place.
        self.alerts
            .hosts_awaiting_diagnosis(&mut self.diagnosis_hosts);
        if !self.diagnosis_hosts.is_empty() {
            let clock = MonotonicClock::now();
            for i in 0..self.diagnosis_hosts.len() {
                self.feed_host_probes(self.diagnosis_hosts[i], &clock);
            }
        }
        if hosts != self.diagnosis_hosts {
            // Few hosts wait at a time: those of both lists are paced
            // again (a host in both stays as it is).
            for &host in hosts.iter() {
                self.pace_host_probe(host);
            }
            for i in 0..self.diagnosis_hosts.len() {
                self.pace_host_probe(self.diagnosis_hosts[i]);
            }
        }
        self.diagnosis_before = hosts;
    }

    /// Pauses or resumes `host`'s L3 probe as the module doc says.
    pub(super) fn pace_host_probe(&mut self, host: IpAddr) {
        let Some(spec) = self.plan.host_probe(host) else {
            return; // no diagnosis, or not for this host
        };
        let Some(id) = self.prober.id_of(&spec) else {
            return;
        };
        let settled_up = self
            .probes
            .get(id)
            .is_some_and(|t| t.evidence && t.health.state() == State::Up);
        let is_a_check = self.plan.bindings_of(&spec).next().is_some();
        let awaited = self.diagnosis_hosts.binary_search(&host).is_ok();
        let paused = settled_up && !is_a_check && !awaited && !self.failing_hosts.any(host);
        if let Err(e) = self.prober.set_paused(id, paused) {
            warn!(probe = %spec, paused, "{e:#}");
        }
    }
}
