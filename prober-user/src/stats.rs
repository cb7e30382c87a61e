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
    /// Summed over CPUs.
    #[serde(flatten)]
    pub counters: DatapathCounters,
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
        counters: total,
        packets_per_cpu: slots.iter().map(|c| c.packets).collect(),
        targets: report::read_pinned(pin_dir)?,
        passive: crate::passive::read_pinned(pin_dir)?,
    })
}
