//! Per-target probe results as the maps hold them, for `prober stats` and
//! (later) the health state machine.

use std::{net::IpAddr, path::Path};

use anyhow::{Context, Result};
use aya::maps::{Array, Map, MapData, PerCpuArray};
use prober_common::{
    encap, map_names, probe_kind, target_flags, ProbeResults, ProbeState, ProbeTarget,
    RttHistogram, RTT_BUCKETS,
};
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct TargetReport {
    pub id: u32,
    /// The probe in `ProbeSpec` notation (`tcp:VIP:PORT,dr=RS`...).
    pub probe: String,
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub timed_out: u64,
    /// RTT of the newest positive reply, ns (0: none yet).
    pub last_rtt_ns: u64,
    /// Log2 buckets of positive-reply RTTs: bucket i = [2^i, 2^(i+1)) µs.
    pub rtt_log2_us: Vec<u64>,
    pub last_sent_ns: u64,
    pub last_reply_ns: u64,
    /// Not sent for now: a host's L3 diagnosis probe while the host's
    /// checks answer.
    pub paused: bool,
}

/// Opens the map `name` pinned in `pin_dir`, as a typed map; a missing pin
/// means the daemon is not running.
pub fn open_pinned<T>(pin_dir: &Path, name: &str) -> Result<T>
where
    T: TryFrom<Map>,
    <T as TryFrom<Map>>::Error: std::error::Error + Send + Sync + 'static,
{
    let path = pin_dir.join(name);
    if !path.exists() {
        anyhow::bail!(
            "prober is not running: there is no pinned map at {} \
             (start the daemon with `prober run --iface <interface>`)",
            path.display()
        );
    }
    let data = MapData::from_pin(&path)
        .with_context(|| format!("opening pinned map {}", path.display()))?;
    T::try_from(Map::from_map_data(data)?)
        .with_context(|| format!("{} has an unexpected type", path.display()))
}

/// Reports of every target slot in use, from the maps pinned in `pin_dir`.
pub fn read_pinned(pin_dir: &Path) -> Result<Vec<TargetReport>> {
    let targets: Array<MapData, ProbeTarget> = open_pinned(pin_dir, map_names::PROBE_TARGETS)?;
    let states: Array<MapData, ProbeState> = open_pinned(pin_dir, map_names::PROBE_STATE)?;
    let results: PerCpuArray<MapData, ProbeResults> =
        open_pinned(pin_dir, map_names::PROBE_RESULTS)?;
    let rtt: PerCpuArray<MapData, RttHistogram> = open_pinned(pin_dir, map_names::PROBE_RTT)?;
    let mut reports = Vec::new();
    for id in 0..targets.len() {
        let target = targets.get(&id, 0)?;
        if target.kind == 0 {
            continue;
        }
        let state = states.get(&id, 0)?;
        let per_cpu = results.get(&id, 0)?;
        let mut report = TargetReport {
            id,
            probe: describe(&target),
            sent: state.sent,
            answered: 0,
            refused: 0,
            unreachable: 0,
            timed_out: state.timed_out,
            last_rtt_ns: 0,
            rtt_log2_us: vec![0; RTT_BUCKETS],
            last_sent_ns: state.last_sent_ns,
            last_reply_ns: state.last_reply_ns,
            paused: target.flags & target_flags::PAUSED != 0,
        };
        let mut newest = 0;
        for cpu in per_cpu.iter() {
            report.answered += cpu.answered;
            report.refused += cpu.refused;
            report.unreachable += cpu.unreachable;
            if cpu.last_reply_ns > newest {
                newest = cpu.last_reply_ns;
                report.last_rtt_ns = cpu.last_rtt_ns;
            }
        }
        for cpu in rtt.get(&id, 0)?.iter() {
            for (sum, n) in report.rtt_log2_us.iter_mut().zip(cpu.log2_us) {
                *sum += n;
            }
        }
        reports.push(report);
    }
    Ok(reports)
}

fn addr(bytes: &[u8; 16], family: u8) -> IpAddr {
    if family == prober_common::family::IPV4 {
        IpAddr::from([bytes[0], bytes[1], bytes[2], bytes[3]])
    } else {
        IpAddr::from(*bytes)
    }
}

/// A map entry in the operator's notation.
pub fn describe(target: &ProbeTarget) -> String {
    let dst = addr(&target.dst_addr, target.family);
    let rs = addr(&target.real_server, target.family);
    let mut text = match target.kind {
        probe_kind::ICMP_ECHO => format!("icmp:{dst}"),
        probe_kind::TCP_SYN => format!("tcp:{dst}:{}", u16::from_be(target.dst_port)),
        other => format!("kind{other}:{dst}"),
    };
    if target.encap == encap::IPIP {
        text += &format!(",tun={rs}");
    } else if rs != dst {
        text += &format!(",dr={rs}");
    }
    text
}
