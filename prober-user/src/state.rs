//! What the controller must remember across restarts, so that a restart
//! changes no weight: each destination's configured and last-written
//! weight, each probe's health and latency. Kept in two pinned BTF maps
//! (`WEIGHT_STATE`, `HEALTH_STATE`) that, unlike the datapath's maps, stay
//! pinned when the daemon stops; remove them to make prober forget.

use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    maps::{HashMap, Map, MapData},
    Ebpf,
};
use prober_common::{map_names, HealthKey, HealthRecord, WeightKey, WeightRecord};
use prober_ipvs::{DestinationKey, Family, Protocol, ServiceKey};

use crate::probe::{addr16, Forwarding, ProbeKind, ProbeSpec};

pub struct StateStore {
    weights: HashMap<MapData, WeightKey, WeightRecord>,
    health: HashMap<MapData, HealthKey, HealthRecord>,
    /// Records not kept because a map was full (E2BIG): those
    /// destinations and probes start afresh after a restart.
    pub not_saved: u64,
}

impl StateStore {
    /// Opens the pinned state of an earlier run, or pins this object's
    /// empty maps.
    pub fn open(ebpf: &mut Ebpf, pin_dir: &Path) -> Result<Self> {
        Ok(Self {
            weights: open_typed(ebpf, pin_dir, map_names::WEIGHT_STATE)?,
            health: open_typed(ebpf, pin_dir, map_names::HEALTH_STATE)?,
            not_saved: 0,
        })
    }

    /// Forgets what the pinned state holds about destinations and probes
    /// that `keep` rejects (gone while prober was stopped). Returns how
    /// many records went.
    pub fn retain(
        &mut self,
        keep_weight: impl Fn(&WeightKey) -> bool,
        keep_health: impl Fn(&HealthKey) -> bool,
    ) -> usize {
        let weights: Vec<WeightKey> = self
            .weights
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep_weight(k))
            .collect();
        let health: Vec<HealthKey> = self
            .health
            .keys()
            .filter_map(Result::ok)
            .filter(|k| !keep_health(k))
            .collect();
        for key in &weights {
            let _ = self.weights.remove(key);
        }
        for key in &health {
            let _ = self.health.remove(key);
        }
        weights.len() + health.len()
    }

    pub fn weight(&self, key: &WeightKey) -> Option<WeightRecord> {
        self.weights.get(key, 0).ok()
    }

    /// Saves a destination's record; a full map is counted in
    /// [`StateStore::not_saved`], not an error.
    pub fn set_weight(&mut self, key: WeightKey, record: WeightRecord) -> Result<()> {
        let result = self.weights.insert(key, record, 0);
        self.count_full(result).context("writing WEIGHT_STATE")
    }

    fn count_full(
        &mut self,
        result: Result<(), aya::maps::MapError>,
    ) -> Result<(), aya::maps::MapError> {
        match result {
            Err(aya::maps::MapError::SyscallError(e))
                if e.io_error.raw_os_error() == Some(libc::E2BIG) =>
            {
                self.not_saved += 1;
                Ok(())
            }
            other => other,
        }
    }

    pub fn remove_weight(&mut self, key: &WeightKey) {
        let _ = self.weights.remove(key);
    }

    pub fn health(&self, key: &HealthKey) -> Option<HealthRecord> {
        self.health.get(key, 0).ok()
    }

    /// Saves a probe's record; a full map is counted, not an error.
    pub fn set_health(&mut self, key: HealthKey, record: HealthRecord) -> Result<()> {
        let result = self.health.insert(key, record, 0);
        self.count_full(result).context("writing HEALTH_STATE")
    }

    pub fn remove_health(&mut self, key: &HealthKey) {
        let _ = self.health.remove(key);
    }
}

/// A state map of the expected layout: a pinned one of another layout (left
/// by another version of prober) is replaced, with a warning.
fn open_typed<K: aya::Pod, V: aya::Pod>(
    ebpf: &mut Ebpf,
    pin_dir: &Path,
    name: &str,
) -> Result<HashMap<MapData, K, V>> {
    match HashMap::try_from(open_or_pin(ebpf, pin_dir, name)?) {
        Ok(map) => Ok(map),
        Err(e) => {
            let path = pin_dir.join(name);
            tracing::warn!(path = %path.display(), "pinned state has another layout ({e}): starting afresh");
            std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            Ok(HashMap::try_from(open_or_pin(ebpf, pin_dir, name)?)?)
        }
    }
}

fn open_or_pin(ebpf: &mut Ebpf, pin_dir: &Path, name: &str) -> Result<Map> {
    let path = pin_dir.join(name);
    if path.exists() {
        let data =
            MapData::from_pin(&path).with_context(|| format!("opening {}", path.display()))?;
        tracing::info!(path = %path.display(), "resuming state pinned by an earlier run");
        return Ok(Map::from_map_data(data)?);
    }
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    std::fs::create_dir_all(pin_dir)?;
    map.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(map)
}

pub fn weight_key(service: &ServiceKey, dest: &DestinationKey) -> WeightKey {
    let (service_addr, service_port, protocol, fwmark, family) = match *service {
        ServiceKey::Address {
            protocol,
            addr,
            port,
        } => {
            let raw = match protocol {
                Protocol::Tcp => libc::IPPROTO_TCP,
                Protocol::Udp => libc::IPPROTO_UDP,
                Protocol::Sctp => libc::IPPROTO_SCTP,
            } as u8;
            (
                addr16(addr),
                port,
                raw,
                0,
                if addr.is_ipv4() { 4 } else { 6 },
            )
        }
        ServiceKey::Fwmark { family, mark } => (
            [0; 16],
            0,
            0,
            mark,
            if family == Family::Ipv4 { 4 } else { 6 },
        ),
    };
    WeightKey {
        service_addr,
        dest_addr: addr16(dest.addr),
        fwmark,
        service_port,
        dest_port: dest.port,
        protocol,
        family,
        _pad: [0; 2],
    }
}

pub fn health_key(spec: &ProbeSpec) -> HealthKey {
    let (port, kind) = match spec.kind {
        ProbeKind::TcpSyn { port } => (port, prober_common::probe_kind::TCP_SYN),
        ProbeKind::IcmpEcho => (0, prober_common::probe_kind::ICMP_ECHO),
    };
    HealthKey {
        destination: addr16(spec.destination),
        real_server: addr16(spec.real_server()),
        port,
        kind,
        forwarding: match spec.forwarding {
            Forwarding::Direct => 0,
            Forwarding::DirectRouting { .. } => 1,
            Forwarding::Tunnel { .. } => 2,
        },
    }
}
