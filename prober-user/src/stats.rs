//! Reads what the running daemon pinned: datapath counters and per-target
//! probe results.

use std::path::Path;

use anyhow::Result;
use aya::maps::{MapData, PerCpuArray};
use prober_common::{map_names, DatapathCounters};
use serde::Serialize;

use crate::probe::report::{self, TargetReport};

#[derive(Debug, Serialize)]
pub struct Stats {
    /// Ingress frames and bytes, summed over CPUs.
    pub packets: u64,
    pub bytes: u64,
    pub replies_matched: u64,
    pub replies_rejected: u64,
    pub resets_sent: u64,
    pub probes_built: u64,
    pub probe_errors: u64,
    /// Agent datagrams recorded, malformed, and from outside the pool.
    pub agent_reports: u64,
    pub agent_malformed: u64,
    pub agent_unknown: u64,
    /// Ingress frames per CPU, in CPU order.
    pub packets_per_cpu: Vec<u64>,
    pub targets: Vec<TargetReport>,
    /// Real servers followed passively (NAT destinations), totals.
    pub passive: Vec<crate::passive::ServerReport>,
}

/// The datapath counters summed over CPUs.
pub fn read_counters(pin_dir: &Path) -> Result<DatapathCounters> {
    let array: PerCpuArray<MapData, DatapathCounters> =
        report::open_pinned(pin_dir, map_names::COUNTERS)?;
    Ok(array
        .get(&0, 0)?
        .iter()
        .fold(DatapathCounters::default(), |sum, c| sum.saturating_add(*c)))
}

pub fn read(pin_dir: &Path) -> Result<Stats> {
    let array: PerCpuArray<MapData, DatapathCounters> =
        report::open_pinned(pin_dir, map_names::COUNTERS)?;
    let slots = array.get(&0, 0)?;
    let total = slots
        .iter()
        .fold(DatapathCounters::default(), |sum, c| sum.saturating_add(*c));
    Ok(Stats {
        packets: total.packets,
        bytes: total.bytes,
        replies_matched: total.replies_matched,
        replies_rejected: total.replies_rejected,
        resets_sent: total.resets_sent,
        probes_built: total.probes_built,
        probe_errors: total.probe_errors,
        agent_reports: total.agent_reports,
        agent_malformed: total.agent_malformed,
        agent_unknown: total.agent_unknown,
        packets_per_cpu: slots.iter().map(|c| c.packets).collect(),
        targets: report::read_pinned(pin_dir)?,
        passive: crate::passive::read_pinned(pin_dir)?,
    })
}
