//! What the datapath recorded per probe, read back: the counters the
//! controller judges each tick, in blocks, and every probe's report for
//! `status`, in one batch.

use super::*;

/// What the datapath recorded for one target so far (per-CPU slots summed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    pub unreachable: u64,
    /// RTT of the newest positive reply, ns (0: none yet).
    pub last_rtt_ns: u64,
}

impl Counts {
    /// Replies of any kind: answers, refusals, ICMP errors.
    pub fn replies(&self) -> u64 {
        self.answered + self.refused + self.unreachable
    }
}

/// One target's state and its per-CPU results folded into [`Counts`].
pub(super) fn sum_counts(state: ProbeState, results: impl Iterator<Item = ProbeResults>) -> Counts {
    let mut counts = Counts {
        sent: state.sent,
        ..Default::default()
    };
    let mut newest = 0;
    for cpu in results {
        counts.answered += cpu.answered;
        counts.refused += cpu.refused;
        counts.unreachable += cpu.unreachable;
        if cpu.last_reply_ns > newest {
            newest = cpu.last_reply_ns;
            counts.last_rtt_ns = cpu.last_rtt_ns;
        }
    }
    counts
}

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
    /// What the datapath recorded for target `id`.
    pub fn counts(&self, id: u32) -> Result<Counts> {
        let state = self.maps.state.get(&id, 0)?;
        Ok(sum_counts(
            state,
            self.maps.results.get(&id, 0)?.iter().copied(),
        ))
    }

    /// Reads the counters of `ids` (sorted), one batched read per map for
    /// each block of ids that share a phase (see `schedule`), for
    /// [`Prober::fresh_counts`]. A block that cannot be read is read one by
    /// one by `fresh_counts`.
    pub fn read_counts(&mut self, ids: &[u32]) -> Result<()> {
        self.generation += 1;
        let len = self.targets.len();
        if self.cached.len() < len {
            self.cached.resize(len, (0, Counts::default()));
        }
        let mut result = Ok(());
        let mut i = 0;
        while i < ids.len() {
            let block = ids[i] / schedule::BLOCK;
            let first = ids[i];
            let mut last = first;
            while i < ids.len() && ids[i] / schedule::BLOCK == block {
                last = ids[i];
                i += 1;
            }
            let count = last - first + 1;
            let read = self
                .states
                .read_range(&self.maps.state, first, count)
                .context("reading PROBE_STATE")
                .and_then(|()| {
                    self.results
                        .read_per_cpu_range(&self.maps.results, first, count, self.cpus)
                        .context("reading PROBE_RESULTS")
                });
            if let Err(e) = read {
                result = Err(e);
                continue;
            }
            for id in first..=last {
                let Some(state) = self.states.get(id as usize, 0) else {
                    continue;
                };
                if let Some(slot) = self.cached.get_mut(id as usize) {
                    *slot = (
                        self.generation,
                        sum_counts(state, self.results.per_cpu(id as usize)),
                    );
                }
            }
        }
        result
    }

    /// [`Prober::counts`] as of the last [`Prober::read_counts`] that
    /// read `id` (read directly otherwise).
    pub fn fresh_counts(&self, id: u32) -> Result<Counts> {
        match self.cached.get(id as usize) {
            Some((generation, counts)) if *generation == self.generation => Ok(*counts),
            _ => self.counts(id),
        }
    }

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
