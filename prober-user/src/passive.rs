//! The userspace side of passive measurement: tells the datapath which real
//! servers to follow (NAT destinations from IPVS) and reads what their own
//! traffic showed.

use std::{
    collections::{HashMap, HashSet},
    net::IpAddr,
    path::Path,
};

use anyhow::{Context, Result};
use aya::maps::{Array, HashMap as BpfHashMap, MapData, PerCpuArray};
use prober_common::{family, map_names, PassiveStats, ServerKey, MAX_PASSIVE_SERVERS};
use serde::Serialize;

use crate::{
    map_batch::ArraySnapshot,
    probe::{addr16, report::open_pinned},
};

pub struct PassiveMaps {
    pub servers: BpfHashMap<MapData, ServerKey, u32>,
    pub ports: Array<MapData, u64>,
    pub stats: PerCpuArray<MapData, PassiveStats>,
    /// Servers with a sample since the last look.
    pub seen: Array<MapData, u8>,
}

/// What one real server's traffic showed since the last look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Delta {
    pub handshakes: u64,
    pub handshake_rtt_sum_ns: u64,
    pub responses: u64,
    pub response_time_sum_ns: u64,
    pub resets: u64,
    pub syn_retransmits: u64,
}

impl Delta {
    pub fn add(&mut self, o: Delta) {
        self.handshakes += o.handshakes;
        self.handshake_rtt_sum_ns += o.handshake_rtt_sum_ns;
        self.responses += o.responses;
        self.response_time_sum_ns += o.response_time_sum_ns;
        self.resets += o.resets;
        self.syn_retransmits += o.syn_retransmits;
    }

    pub fn mean_handshake_ns(&self) -> Option<f64> {
        (self.handshakes > 0).then(|| self.handshake_rtt_sum_ns as f64 / self.handshakes as f64)
    }

    pub fn mean_response_ns(&self) -> Option<f64> {
        (self.responses > 0).then(|| self.response_time_sum_ns as f64 / self.responses as f64)
    }
}

fn total(per_cpu: impl IntoIterator<Item = PassiveStats>) -> Delta {
    let mut d = Delta::default();
    for c in per_cpu {
        d.add(Delta {
            handshakes: c.handshakes,
            handshake_rtt_sum_ns: c.handshake_rtt_sum_ns,
            responses: c.responses,
            response_time_sum_ns: c.response_time_sum_ns,
            resets: c.resets,
            syn_retransmits: c.syn_retransmits,
        });
    }
    d
}

fn minus(a: Delta, b: Delta) -> Delta {
    Delta {
        handshakes: a.handshakes.saturating_sub(b.handshakes),
        handshake_rtt_sum_ns: a
            .handshake_rtt_sum_ns
            .saturating_sub(b.handshake_rtt_sum_ns),
        responses: a.responses.saturating_sub(b.responses),
        response_time_sum_ns: a
            .response_time_sum_ns
            .saturating_sub(b.response_time_sum_ns),
        resets: a.resets.saturating_sub(b.resets),
        syn_retransmits: a.syn_retransmits.saturating_sub(b.syn_retransmits),
    }
}

pub type Server = (IpAddr, u16);

pub struct Passive {
    maps: PassiveMaps,
    ids: HashMap<Server, u32>,
    /// Who holds each id (the reverse of `ids`).
    servers: Vec<Option<Server>>,
    /// By id: the counters as last read (a map of them cost 100 bytes a
    /// server).
    last: Vec<Delta>,
    /// PASSIVE_SEEN and the PASSIVE_STATS read from it at the last
    /// `take_deltas`, and the zeros that clear the flags (buffers reused).
    seen: ArraySnapshot<u8>,
    stats: ArraySnapshot<PassiveStats>,
    zeros: Vec<u8>,
    seen_ids: Vec<u32>,
    /// NAT servers past the table's size, as last said.
    unfollowed: usize,
}

impl Passive {
    pub fn new(maps: PassiveMaps) -> Self {
        Self {
            maps,
            ids: HashMap::new(),
            servers: Vec::new(),
            last: Vec::new(),
            seen: ArraySnapshot::default(),
            stats: ArraySnapshot::default(),
            zeros: Vec::new(),
            seen_ids: Vec::new(),
            unfollowed: 0,
        }
    }

    fn key(server: &Server) -> ServerKey {
        ServerKey {
            addr: addr16(server.0),
            port: server.1.to_be(),
            family: if server.0.is_ipv4() {
                family::IPV4
            } else {
                family::IPV6
            },
            _pad: 0,
        }
    }

    /// Follows exactly `servers` (IPv4 ones; the datapath parses IPv4 only).
    pub fn sync(&mut self, servers: &[Server]) -> Result<()> {
        let wanted: HashSet<Server> = servers.iter().filter(|s| s.0.is_ipv4()).copied().collect();
        let gone: Vec<Server> = self
            .ids
            .keys()
            .filter(|s| !wanted.contains(s))
            .copied()
            .collect();
        for server in gone {
            let _ = self.maps.servers.remove(&Self::key(&server));
            if let Some(id) = self.ids.remove(&server) {
                if let Some(last) = self.last.get_mut(id as usize) {
                    *last = Delta::default();
                }
                if let Some(slot) = self.servers.get_mut(id as usize) {
                    *slot = None;
                }
            }
        }
        let used: HashSet<u32> = self.ids.values().copied().collect();
        let mut free = (0..MAX_PASSIVE_SERVERS)
            .filter(|i| !used.contains(i))
            .collect::<Vec<_>>()
            .into_iter();
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let mut unfollowed = 0;
        for server in &wanted {
            if self.ids.contains_key(server) {
                continue;
            }
            // Past the table's size a server is only probed, not measured
            // passively: said once per change of that number.
            let Some(id) = free.next() else {
                unfollowed += 1;
                continue;
            };
            // Counters and histograms of an earlier holder of this id go.
            let zeros = aya::maps::PerCpuValues::try_from(vec![PassiveStats::default(); cpus])?;
            self.maps
                .stats
                .set(id, zeros, 0)
                .context("clearing PASSIVE_STATS")?;
            if self.last.len() <= id as usize {
                self.last.resize(id as usize + 1, Delta::default());
            }
            self.last[id as usize] = Delta::default();
            self.maps
                .servers
                .insert(Self::key(server), id, 0)
                .context("writing PASSIVE_SERVERS")?;
            self.ids.insert(*server, id);
            if self.servers.len() <= id as usize {
                self.servers.resize(id as usize + 1, None);
            }
            self.servers[id as usize] = Some(*server);
        }
        // Ids past the last held one are never read.
        while self.servers.last() == Some(&None) {
            self.servers.pop();
        }
        if unfollowed != self.unfollowed {
            self.unfollowed = unfollowed;
            if unfollowed > 0 {
                tracing::warn!(
                    "{unfollowed} NAT real servers are not measured passively: the passive table holds {MAX_PASSIVE_SERVERS} (their probes still run)"
                );
            }
        }
        let mut bitmap = vec![0u64; 1024];
        for (_, port) in self.ids.keys() {
            bitmap[*port as usize / 64] |= 1 << (port % 64);
        }
        for (slot, bits) in bitmap.into_iter().enumerate() {
            if self.maps.ports.get(&(slot as u32), 0)? != bits {
                self.maps
                    .ports
                    .set(slot as u32, bits, 0)
                    .context("writing PASSIVE_PORTS")?;
            }
        }
        Ok(())
    }

    /// Every followed server's statistics, read in one syscall (for
    /// `status`: never a read per server on the daemon's thread).
    pub fn snapshot(&self) -> Result<PassiveSnapshot<'_>> {
        let mut stats = ArraySnapshot::default();
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        stats
            .read_per_cpu(&self.maps.stats, self.servers.len() as u32, cpus)
            .context("reading PASSIVE_STATS")?;
        Ok(PassiveSnapshot {
            passive: self,
            stats,
        })
    }

    /// What each followed server's traffic showed since the last call,
    /// into `out` (servers without a new sample are left out). Only the
    /// servers the datapath marked seen are read: one read of the flags,
    /// one write clearing them, then each marked server's statistics (all
    /// of them in one read when most are marked). A sample that lands
    /// between the flags' read and their clearing is taken with the
    /// server's next one: statistics are totals, so nothing is lost.
    pub fn take_deltas(&mut self, out: &mut Vec<(Server, Delta)>) -> Result<()> {
        out.clear();
        let count = self.servers.len() as u32;
        if count == 0 {
            return Ok(());
        }
        self.seen
            .read(&self.maps.seen, count)
            .context("reading PASSIVE_SEEN")?;
        self.seen_ids.clear();
        self.seen_ids
            .extend((0..count).filter(|&id| self.seen.get(id as usize, 0).is_some_and(|s| s != 0)));
        if self.seen_ids.is_empty() {
            return Ok(());
        }
        self.zeros.resize(count as usize, 0);
        crate::map_batch::write_array_prefix(&self.maps.seen, &self.zeros)
            .context("clearing PASSIVE_SEEN")?;
        let cpus = aya::util::nr_cpus().map_err(|(_, e)| e)?;
        let whole = self.seen_ids.len() * 4 >= count as usize;
        if whole {
            self.stats
                .read_per_cpu(&self.maps.stats, count, cpus)
                .context("reading PASSIVE_STATS")?;
        }
        for &id in &self.seen_ids {
            let Some(server) = self.servers[id as usize] else {
                continue;
            };
            if !whole {
                self.stats
                    .read_per_cpu_range(&self.maps.stats, id, 1, cpus)
                    .context("reading PASSIVE_STATS")?;
            }
            let now = total(self.stats.per_cpu(id as usize));
            let before = match self.last.get_mut(id as usize) {
                Some(last) => std::mem::replace(last, now),
                None => Delta::default(),
            };
            let delta = minus(now, before);
            if delta != Delta::default() {
                out.push((server, delta));
            }
        }
        Ok(())
    }
}

/// Every followed server's statistics as of one read.
pub struct PassiveSnapshot<'a> {
    passive: &'a Passive,
    stats: ArraySnapshot<PassiveStats>,
}

impl PassiveSnapshot<'_> {
    /// A followed server's handshake and response-time histograms (log2
    /// µs), summed over CPUs.
    pub fn histograms(&self, server: &Server) -> Option<(Vec<u64>, Vec<u64>)> {
        let id = *self.passive.ids.get(server)? as usize;
        let mut handshake = vec![0u64; prober_common::RTT_BUCKETS];
        let mut response = vec![0u64; prober_common::RTT_BUCKETS];
        for cpu in self.stats.per_cpu(id) {
            for (sum, n) in handshake.iter_mut().zip(cpu.handshake_log2_us) {
                *sum += n;
            }
            for (sum, n) in response.iter_mut().zip(cpu.response_log2_us) {
                *sum += n;
            }
        }
        Some((handshake, response))
    }
}

/// Totals per followed real server, for `prober stats`.
#[derive(Debug, Clone, Serialize)]
pub struct ServerReport {
    pub server: String,
    pub handshakes: u64,
    pub mean_handshake_rtt_ns: u64,
    pub responses: u64,
    pub mean_response_time_ns: u64,
    pub resets: u64,
    pub syn_retransmits: u64,
}

pub fn read_pinned(pin_dir: &Path) -> Result<Vec<ServerReport>> {
    let servers: BpfHashMap<MapData, ServerKey, u32> =
        open_pinned(pin_dir, map_names::PASSIVE_SERVERS)?;
    let stats: PerCpuArray<MapData, PassiveStats> = open_pinned(pin_dir, map_names::PASSIVE_STATS)?;
    let mut out = Vec::new();
    for entry in servers.iter() {
        let (key, id) = entry?;
        let t = total(stats.get(&id, 0)?.iter().copied());
        let addr = IpAddr::from([key.addr[0], key.addr[1], key.addr[2], key.addr[3]]);
        out.push(ServerReport {
            server: format!("{addr}:{}", u16::from_be(key.port)),
            handshakes: t.handshakes,
            mean_handshake_rtt_ns: t.mean_handshake_ns().unwrap_or(0.0) as u64,
            responses: t.responses,
            mean_response_time_ns: t.mean_response_ns().unwrap_or(0.0) as u64,
            resets: t.resets,
            syn_retransmits: t.syn_retransmits,
        });
    }
    out.sort_by(|a, b| a.server.cmp(&b.server));
    Ok(out)
}
