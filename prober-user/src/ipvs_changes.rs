//! The change signal for IPVS's configuration (see the eBPF side,
//! `prober-ebpf/src/ipvs_changes.rs`): kretprobes count the configuration
//! calls other processes make; the controller reads the count (one array
//! lookup, no dump) each tick and re-reads IPVS only when it moved, with
//! a slow periodic dump as the fallback.

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, MapData},
    programs::KProbe,
    Ebpf,
};
use prober_common::{map_names, IpvsChanges, IPVS_CONFIG_CALLS};

/// How often IPVS is dumped in full while the signal works and the
/// configuration names no `discovery`: only a safety net (a change in a
/// way the probes do not see, such as a network namespace going away).
pub const FALLBACK_DISCOVERY: std::time::Duration = std::time::Duration::from_secs(60);

/// Destinations up to which the fallback dump comes every
/// [`FALLBACK_DISCOVERY`].
const FALLBACK_SIZE: usize = 10_000;

/// The fallback dump's period for `destinations`: [`FALLBACK_DISCOVERY`]
/// up to 10,000, then in proportion to their number, so its cost a second
/// at rest stays what it is at 10,000 (a dump of 100,000 took 4 s of the
/// IPVS thread under emulation, every minute).
pub fn fallback_discovery(destinations: usize) -> std::time::Duration {
    let scale = destinations.max(FALLBACK_SIZE) as f64 / FALLBACK_SIZE as f64;
    FALLBACK_DISCOVERY.mul_f64(scale)
}

pub struct IpvsChangeSignal {
    changes: Array<MapData, IpvsChanges>,
    seen: u64,
}

/// Changes made since the last [`IpvsChangeSignal::take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Changed {
    pub calls: u64,
    /// The process that made the last one, and its command name.
    pub last_pid: u32,
    pub last_command: String,
}

impl IpvsChangeSignal {
    /// Loads and attaches the kretprobes, and takes their map out of
    /// `ebpf` (which keeps the programs attached while it lives).
    pub fn attach(ebpf: &mut Ebpf) -> Result<Self> {
        for (program, function) in IPVS_CONFIG_CALLS {
            let probe: &mut KProbe = ebpf
                .program_mut(program)
                .ok_or_else(|| anyhow!("the eBPF object has no program {program}"))?
                .try_into()?;
            probe
                .load()
                .with_context(|| format!("the kernel rejected kretprobe {program}"))?;
            probe.attach(function, 0).with_context(|| {
                format!("attaching a kretprobe to {function} (is the ip_vs module loaded?)")
            })?;
        }
        let map = ebpf
            .take_map(map_names::IPVS_CHANGES)
            .ok_or_else(|| anyhow!("the eBPF object has no map {}", map_names::IPVS_CHANGES))?;
        let changes: Array<MapData, IpvsChanges> = Array::try_from(map)?;
        let seen = changes.get(&0, 0)?.count;
        Ok(Self { changes, seen })
    }

    /// What changed since the last call, if anything. A failed read is
    /// taken as a change: a dump too many is harmless, one too few is not.
    pub fn take(&mut self) -> Option<Changed> {
        let now = match self.changes.get(&0, 0) {
            Ok(now) => now,
            Err(_) => {
                return Some(Changed {
                    calls: 0,
                    last_pid: 0,
                    last_command: "unknown (the signal map could not be read)".into(),
                })
            }
        };
        if now.count == self.seen {
            return None;
        }
        let calls = now.count.wrapping_sub(self.seen);
        self.seen = now.count;
        let name = now.last_comm.split(|b| *b == 0).next().unwrap_or_default();
        Some(Changed {
            calls,
            last_pid: now.last_tgid,
            last_command: String::from_utf8_lossy(name).into_owned(),
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::fallback_discovery;

    #[test]
    fn the_fallback_dump_slows_with_size_past_ten_thousand() {
        for (destinations, secs) in [
            (0, 60),
            (1_000, 60),
            (10_000, 60),
            (20_000, 120),
            (100_000, 600),
        ] {
            assert_eq!(
                fallback_discovery(destinations),
                Duration::from_secs(secs),
                "{destinations}"
            );
        }
    }
}
