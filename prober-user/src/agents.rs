//! Agent feedback, the controller's side: real servers report their state
//! and weight in UDP datagrams (wire format: `prober_common::agent_wire`,
//! sender: `prober agent`) that the ingress program records in the AGENTS
//! map at line rate. The controller creates one entry per real-server
//! address (reports from anyone else are refused and counted by the
//! datapath) and reads them each tick. A report is honoured until the
//! agent has been silent past the deadline; then active checks alone
//! decide again.

use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, Ipv4Addr},
    time::Duration,
};

use anyhow::Result;
use aya::maps::{HashMap as BpfHashMap, MapData};
use prober_common::{agent_wire, AgentReport};
use tracing::{debug, info, warn};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentState {
    Up,
    Down,
    /// Finish existing connections, take no new ones: weight 0.
    Drain,
}

/// A fresh report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentView {
    pub state: AgentState,
    pub weight: u32,
}

pub struct Agents {
    map: BpfHashMap<MapData, u32, AgentReport>,
    /// None: agents are not configured; reports are ignored.
    deadline: Option<Duration>,
    hosts: HashSet<Ipv4Addr>,
    fresh: HashMap<Ipv4Addr, AgentView>,
    /// Hosts whose view changed at the last refresh.
    changed: Vec<IpAddr>,
    /// Hosts the table had no room for, as last said.
    refused: usize,
}

impl Agents {
    pub fn new(map: BpfHashMap<MapData, u32, AgentReport>, deadline: Option<Duration>) -> Self {
        Self {
            map,
            deadline,
            hosts: HashSet::new(),
            fresh: HashMap::new(),
            changed: Vec::new(),
            refused: 0,
        }
    }

    /// Makes exactly these real servers' reports acceptable.
    pub fn sync(&mut self, hosts: impl IntoIterator<Item = IpAddr>) -> Result<()> {
        let wanted: HashSet<Ipv4Addr> = hosts
            .into_iter()
            .filter_map(|h| match h {
                IpAddr::V4(v4) => Some(v4),
                IpAddr::V6(_) => None,
            })
            .collect();
        // Those gone first: their room goes to the new ones.
        for host in self.hosts.difference(&wanted) {
            let _ = self.map.remove(&key(*host));
            self.fresh.remove(host);
        }
        // A full table refuses the rest: their reports are not accepted
        // (their probes still run), said once per change of that count;
        // the discovery goes on.
        let mut refused = 0;
        let mut accepted = HashSet::with_capacity(wanted.len());
        for host in &wanted {
            if self.hosts.contains(host) {
                accepted.insert(*host);
                continue;
            }
            match self.map.insert(key(*host), AgentReport::default(), 0) {
                Ok(()) => {
                    accepted.insert(*host);
                }
                Err(e) => {
                    if refused == 0 {
                        debug!(%host, "adding to AGENTS: {e}");
                    }
                    refused += 1;
                }
            }
        }
        if refused != self.refused {
            self.refused = refused;
            if refused > 0 {
                warn!(
                    refused,
                    "agent reports of that many real server hosts are not accepted: the AGENTS table is full (their probes still run)"
                );
            }
        }
        self.hosts = accepted;
        Ok(())
    }

    /// Turns agents on (with their deadline) or off (on reload).
    pub fn set_deadline(&mut self, deadline: Option<Duration>) {
        self.deadline = deadline;
        if deadline.is_none() {
            self.fresh.clear();
        }
    }

    /// Reads every report; logs agents that start or stop reporting.
    pub fn refresh(&mut self) {
        self.changed.clear();
        let Some(deadline) = self.deadline else {
            return;
        };
        let now = monotonic_ns();
        for host in &self.hosts {
            let report = match self.map.get(&key(*host), 0) {
                Ok(report) => report,
                Err(e) => {
                    warn!(%host, "reading AGENTS: {e}");
                    continue;
                }
            };
            let age = Duration::from_nanos(now.saturating_sub(report.last_ns));
            let view = (report.last_ns != 0 && age <= deadline).then_some(AgentView {
                state: match report.state {
                    agent_wire::STATE_DOWN => AgentState::Down,
                    agent_wire::STATE_DRAIN => AgentState::Drain,
                    _ => AgentState::Up,
                },
                weight: report.weight,
            });
            let before = self.fresh.get(host).copied();
            if before != view {
                self.changed.push(IpAddr::V4(*host));
            }
            match (before, view) {
                (None, Some(v)) => {
                    info!(%host, state = ?v.state, weight = v.weight, "agent reporting");
                }
                (Some(_), None) => {
                    warn!(%host, "agent silent for more than {deadline:?}: active checks alone decide");
                }
                (Some(a), Some(b)) if a != b => {
                    info!(%host, state = ?b.state, weight = b.weight, "agent report changed");
                }
                _ => {}
            }
            match view {
                Some(v) => self.fresh.insert(*host, v),
                None => self.fresh.remove(host),
            };
        }
    }

    /// The real server's fresh report, if its agent speaks.
    /// The hosts whose view changed (came, went, or said something new)
    /// at the last [`Agents::refresh`].
    pub fn changed(&self) -> &[IpAddr] {
        &self.changed
    }

    pub fn view(&self, host: IpAddr) -> Option<AgentView> {
        match host {
            IpAddr::V4(v4) => self.fresh.get(&v4).copied(),
            IpAddr::V6(_) => None,
        }
    }
}

fn key(host: Ipv4Addr) -> u32 {
    u32::from_ne_bytes(host.octets())
}

/// CLOCK_MONOTONIC in ns: the clock of bpf_ktime_get_ns.
fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes the timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}
