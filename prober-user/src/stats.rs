//! Reads the counters that the running daemon pinned.

use std::path::Path;

use anyhow::{Context, Result};
use aya::maps::{Map, MapData, PerCpuArray};
use prober_common::{map_names, InterfaceCounters};
use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct InterfaceStats {
    pub packets: u64,
    pub bytes: u64,
    /// One entry per possible CPU, in CPU order.
    pub per_cpu: Vec<CpuCounters>,
}

#[derive(Debug, Serialize)]
pub struct CpuCounters {
    pub packets: u64,
    pub bytes: u64,
}

pub fn read_interface_stats(pin_dir: &Path) -> Result<InterfaceStats> {
    let path = pin_dir.join(map_names::INTERFACE_COUNTERS);
    if !path.exists() {
        anyhow::bail!(
            "prober is not running: there is no pinned map at {} \
             (start the daemon with `prober run --iface <interface>`)",
            path.display()
        );
    }
    let map_data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    let map = Map::from_map_data(map_data)?;
    let array: PerCpuArray<_, InterfaceCounters> = PerCpuArray::try_from(map)
        .with_context(|| format!("{} is not prober's per-CPU counter array", path.display()))?;
    let slots = array.get(&0, 0)?;
    let total = slots.iter().fold(InterfaceCounters::default(), |sum, c| {
        sum.saturating_add(*c)
    });
    let per_cpu = slots
        .iter()
        .map(|c| CpuCounters {
            packets: c.packets,
            bytes: c.bytes,
        })
        .collect();
    Ok(InterfaceStats {
        packets: total.packets,
        bytes: total.bytes,
        per_cpu,
    })
}
