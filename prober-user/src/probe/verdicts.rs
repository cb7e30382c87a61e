//! What the datapath settles (see prober-ebpf's `verdict.rs`): its events
//! taken from the ring, what the controller holds of each target written
//! back so only news is reported, and the count of matched replies.

use aya::maps::{MapData, PerCpuArray};
use prober_common::{DatapathCounters, Expectation, ProbeEvent, ProbeState};

use tracing::debug;

use super::*;

impl Prober {
    /// Moves the events reported since the last call into `out` (cleared
    /// first; its allocation is kept from call to call).
    pub fn take_events(&mut self, out: &mut Vec<ProbeEvent>) {
        out.clear();
        while let Some(item) = self.maps.events.next() {
            if item.len() >= std::mem::size_of::<ProbeEvent>() {
                // SAFETY: the program writes whole ProbeEvents; read
                // unaligned from the ring's bytes.
                out.push(unsafe { std::ptr::read_unaligned(item.as_ptr().cast()) });
            }
        }
    }

    /// Drops the events reported so far (probes without a controller).
    pub fn discard_events(&mut self) {
        while self.maps.events.next().is_some() {}
    }

    /// Tells the datapath what the controller holds of target `id`, when
    /// that changed (its lossy nonce is the prober's own: kept).
    pub fn set_expectation(&mut self, id: u32, expectation: Expectation) -> Result<()> {
        let index = id as usize;
        if self.expectations.len() <= index {
            self.expectations.resize(index + 1, Expectation::default());
        }
        let held = self.expectations[index];
        let wanted = Expectation {
            lossy_nonce: held.lossy_nonce,
            ..expectation
        };
        if wanted == held {
            return Ok(());
        }
        self.write_expectation(id, wanted)
    }

    fn write_expectation(&mut self, id: u32, expectation: Expectation) -> Result<()> {
        self.maps
            .expect
            .set(id, expectation, 0)
            .with_context(|| format!("writing PROBE_EXPECT[{id}]"))?;
        if let Some(slot) = self.expectations.get_mut(id as usize) {
            *slot = expectation;
        }
        Ok(())
    }

    /// The targets of wheel entries `range` sent since `since_ns` went out
    /// in a chunk whose frames the probing interface dropped: their
    /// probes' silence is excused once in a row (see `probe_tx`). Reads
    /// and writes each of them: only when the ring overflows.
    pub(super) fn mark_lossy(&mut self, range: std::ops::Range<u32>, since_ns: u64) {
        for index in range {
            let Some(id) = self.wheel.id_at(index) else {
                continue;
            };
            let Some(state) = self.state_of(id) else {
                continue;
            };
            if state.last_sent_ns < since_ns {
                continue; // walked past, not sent in this chunk
            }
            let index = id as usize;
            if self.expectations.len() <= index {
                self.expectations.resize(index + 1, Expectation::default());
            }
            let marked = Expectation {
                lossy_nonce: state.sent as u32,
                ..self.expectations[index]
            };
            if let Err(e) = self.write_expectation(id, marked) {
                debug!("marking a probe lost in the director's ring: {e:#}");
            }
        }
    }

    /// Target `id`'s send state as it stands (one map read).
    pub fn state_of(&self, id: u32) -> Option<ProbeState> {
        self.maps.state.get(&id, 0).ok()
    }

    /// Lets [`Prober::replies_matched`] read the datapath's counters.
    pub fn watch_counters(&mut self, counters: PerCpuArray<MapData, DatapathCounters>) {
        self.counters = Some(counters);
    }

    /// Frames `probe_tx` wrote so far, all CPUs (0: not watched).
    pub(super) fn frames_built(&self) -> u64 {
        let Some(per_cpu) = self.counters.as_ref().and_then(|c| c.get(&0, 0).ok()) else {
            return 0;
        };
        per_cpu
            .iter()
            .map(|c| c.probes_built + c.resets_before_probe)
            .sum()
    }

    /// What the datapath heard so far, all CPUs, in one read (None: not
    /// watched, or unreadable).
    pub fn heard(&self) -> Option<Heard> {
        let per_cpu = self.counters.as_ref()?.get(&0, 0).ok()?;
        Some(Heard {
            replies_matched: per_cpu.iter().map(|c| c.replies_matched).sum(),
            arp_replies: per_cpu.iter().map(|c| c.arp_replies).sum(),
        })
    }
}

/// What the datapath heard on the probing interface, counted since it
/// was loaded: the director path's evidence.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Heard {
    /// Replies matched to a probe.
    pub replies_matched: u64,
    /// ARP replies (a neighbour answered).
    pub arp_replies: u64,
}

/// CLOCK_MONOTONIC now, in ns: the clock of bpf_ktime_get_ns.
pub(super) fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// The datapath's clock (CLOCK_MONOTONIC, bpf_ktime_get_ns) read beside
/// an [`Instant`], which on Linux counts the same clock: datapath times
/// become instants.
#[derive(Debug, Clone, Copy)]
pub struct MonotonicClock {
    at: Instant,
    ns: u64,
}

impl MonotonicClock {
    pub fn now() -> Self {
        Self {
            at: Instant::now(),
            ns: monotonic_ns(),
        }
    }

    /// The instant of datapath time `ns` (0, never: None).
    pub fn instant_of(&self, ns: u64) -> Option<Instant> {
        if ns == 0 {
            return None;
        }
        Some(if ns <= self.ns {
            self.at
                .checked_sub(Duration::from_nanos(self.ns - ns))
                .unwrap_or(self.at)
        } else {
            self.at + Duration::from_nanos(ns - self.ns)
        })
    }
}
