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
        let held = data.info()?.max_entries();
        let wanted = match ebpf.map(name) {
            Some(map) => map_size(map)?,
            None => held,
        };
        let same_layout = ebpf.map(name).is_some_and(|map| {
            let (Map::HashMap(new), Ok(old)) = (map, data.info()) else {
                return false;
            };
            new.info().is_ok_and(|new| {
                (new.key_size(), new.value_size()) == (old.key_size(), old.value_size())
            })
        });
        // Another layout is replaced by `open_typed`; a large enough map
        // is kept.
        if held >= wanted || !same_layout {
            tracing::info!(path = %path.display(), "resuming state pinned by an earlier run");
            return Ok(Map::from_map_data(data)?);
        }
        // Sized for fewer destinations than this run holds: its records
        // move to this object's larger map, which takes the pin.
        let old = Map::from_map_data(data)?;
        let new = ebpf
            .take_map(name)
            .with_context(|| format!("the eBPF object has no map {name}"))?;
        let moved =
            copy_records(&old, &new).with_context(|| format!("growing {}", path.display()))?;
        drop(old);
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        new.pin(&path)
            .with_context(|| format!("pinning {}", path.display()))?;
        tracing::info!(path = %path.display(), from = held, to = wanted, moved, "pinned state grown to this run's size");
        return Ok(new);
    }
    let map = ebpf
        .take_map(name)
        .with_context(|| format!("the eBPF object has no map {name}"))?;
    std::fs::create_dir_all(pin_dir)?;
    map.pin(&path)
        .with_context(|| format!("pinning {}", path.display()))?;
    Ok(map)
}

fn map_size(map: &Map) -> Result<u32> {
    let data = match map {
        Map::HashMap(data) => data,
        _ => anyhow::bail!("a state map is not a hash map"),
    };
    Ok(data.info()?.max_entries())
}

/// Copies every record of `from` into `to` (both of one layout), as raw
/// bytes: the layout was checked when `from` was opened.
fn copy_records(from: &Map, to: &Map) -> Result<usize> {
    let (Map::HashMap(from), Map::HashMap(to)) = (from, to) else {
        anyhow::bail!("a state map is not a hash map");
    };
    let (key_size, value_size) = {
        let info = from.info()?;
        (info.key_size() as usize, info.value_size() as usize)
    };
    let (from_fd, to_fd) = (raw_fd(from), raw_fd(to));
    let mut key = vec![0u8; key_size];
    let mut next = vec![0u8; key_size];
    let mut value = vec![0u8; value_size];
    let mut moved = 0;
    let mut first = true;
    loop {
        if !raw::next_key(from_fd, (!first).then_some(&key[..]), &mut next)? {
            break;
        }
        first = false;
        std::mem::swap(&mut key, &mut next);
        if raw::lookup(from_fd, &key, &mut value)? {
            raw::update(to_fd, &key, &value)?;
            moved += 1;
        }
    }
    Ok(moved)
}

fn raw_fd(map: &MapData) -> i32 {
    use std::os::fd::{AsFd, AsRawFd};
    map.fd().as_fd().as_raw_fd()
}

/// The three map commands the copy needs, on raw bytes (aya's typed maps
/// need the types, which a copy does not).
mod raw {
    const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
    const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
    const BPF_MAP_GET_NEXT_KEY: libc::c_long = 4;

    /// The `map_elem` member of `union bpf_attr`.
    #[repr(C)]
    #[derive(Default)]
    struct ElemAttr {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value_or_next: u64,
        flags: u64,
    }

    fn bpf(cmd: libc::c_long, attr: &mut ElemAttr) -> std::io::Result<()> {
        // SAFETY: the element member; callers pass buffers of the map's
        // key and value sizes.
        unsafe { crate::map_batch::bpf(cmd, attr) }
    }

    /// The key after `key` (the first with None); false at the end.
    pub fn next_key(fd: i32, key: Option<&[u8]>, next: &mut [u8]) -> std::io::Result<bool> {
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            key: key.map_or(0, |k| k.as_ptr() as u64),
            value_or_next: next.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_GET_NEXT_KEY, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// false: no such key (gone since).
    pub fn lookup(fd: i32, key: &[u8], value: &mut [u8]) -> std::io::Result<bool> {
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value_or_next: value.as_mut_ptr() as u64,
            ..Default::default()
        };
        match bpf(BPF_MAP_LOOKUP_ELEM, &mut attr) {
            Ok(()) => Ok(true),
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
            Err(e) => Err(e),
        }
    }

    pub fn update(fd: i32, key: &[u8], value: &[u8]) -> std::io::Result<()> {
        let mut attr = ElemAttr {
            map_fd: fd as u32,
            key: key.as_ptr() as u64,
            value_or_next: value.as_ptr() as u64,
            ..Default::default()
        };
        bpf(BPF_MAP_UPDATE_ELEM, &mut attr)
    }

    #[test]
    fn the_attribute_matches_the_kernels_layout() {
        // struct { u32 map_fd; u64 key; u64 value/next_key; u64 flags; }
        // in include/uapi/linux/bpf.h, the u64s 8-byte aligned.
        assert_eq!(std::mem::size_of::<ElemAttr>(), 32);
    }
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
