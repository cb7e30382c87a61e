//! What the datapath recorded per probe, read back for `status`: every
//! probe's report, in one batch.

use super::*;

/// Every probe's results as [`Prober::reports`] read them.
pub struct ProbeReports {
    states: ArraySnapshot<ProbeState>,
    results: ArraySnapshot<ProbeResults>,
    rtt: ArraySnapshot<RttHistogram>,
}

impl ProbeReports {
    /// Probe `id`'s report (all zero if it was not read).
    pub fn get(&self, id: u32) -> ProbeReport {
        let id = id as usize;
        let state = self.states.get(id, 0).unwrap_or_default();
        let mut report = ProbeReport {
            sent: state.sent,
            timed_out: state.timed_out,
            rtt_log2_us: vec![0; prober_common::RTT_BUCKETS],
            ..Default::default()
        };
        for cpu in self.results.per_cpu(id) {
            report.answered += cpu.answered;
            report.refused += cpu.refused;
            report.unreachable += cpu.unreachable;
        }
        for cpu in self.rtt.per_cpu(id) {
            for (sum, n) in report.rtt_log2_us.iter_mut().zip(cpu.log2_us) {
                *sum += n;
            }
        }
        report
    }
}

/// One probe's results, for `status`.
#[derive(Debug, Clone, Default)]
pub struct ProbeReport {
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub timed_out: u64,
    pub rtt_log2_us: Vec<u64>,
}

impl Prober {
    /// Every probe's results, each map read in one batch (three syscalls
    /// in all, not three per probe: `status` at 100,000 probes runs on the
    /// daemon's thread between ticks).
    pub fn reports(&self) -> Result<ProbeReports> {
        let count = self.targets.len() as u32;
        let mut states = ArraySnapshot::default();
        let mut results = ArraySnapshot::default();
        let mut rtt = ArraySnapshot::default();
        if count > 0 {
            states
                .read(&self.maps.state, count)
                .context("reading PROBE_STATE")?;
            results
                .read_per_cpu(&self.maps.results, count, self.cpus)
                .context("reading PROBE_RESULTS")?;
            rtt.read_per_cpu(&self.maps.rtt, count, self.cpus)
                .context("reading PROBE_RTT")?;
        }
        Ok(ProbeReports {
            states,
            results,
            rtt,
        })
    }
}
