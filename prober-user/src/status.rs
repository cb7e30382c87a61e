//! What `prober status` shows and the metrics endpoint exports: a snapshot
//! of every virtual service and real server as the running controller
//! sees it, taken on request through the control socket.

use std::{collections::BTreeMap, fmt::Write as _};

use prober_common::RTT_BUCKETS;
use serde::{Deserialize, Serialize};

/// Where the daemon's wakes spent their time since it started, in ms
/// summed over wakes: discovery and the kernel's route changes, sending,
/// taking what the datapath, checks and agents said, deciding weights,
/// and the rest (alerts); and the longest wake.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct WakeTimes {
    pub wakes: u64,
    pub discover_ms: f64,
    pub send_ms: f64,
    pub observe_ms: f64,
    pub decide_ms: f64,
    pub alerts_ms: f64,
    pub longest_ms: f64,
    /// How late wakes came for the slot they were for (the run loop's
    /// timer and the scheduler), summed.
    #[serde(default)]
    pub late_ms: f64,
}

impl WakeTimes {
    /// A wake came this late for its slot.
    pub fn late(&mut self, by: std::time::Duration) {
        self.late_ms += by.as_secs_f64() * 1e3;
    }

    /// One wake: when it began, its phases ended (discover, send,
    /// observe, decide), and when it ended.
    pub fn record(&mut self, laps: [std::time::Instant; 5], end: std::time::Instant) {
        let ms = |a: std::time::Instant, b: std::time::Instant| {
            b.saturating_duration_since(a).as_secs_f64() * 1e3
        };
        self.wakes += 1;
        self.discover_ms += ms(laps[0], laps[1]);
        self.send_ms += ms(laps[1], laps[2]);
        self.observe_ms += ms(laps[2], laps[3]);
        self.decide_ms += ms(laps[3], laps[4]);
        self.alerts_ms += ms(laps[4], end);
        self.longest_ms = self.longest_ms.max(ms(laps[0], end));
    }
}

/// Resident memory, and the allocator's view of it: what the heap holds
/// in live allocations, and what it keeps free (fragmentation, or memory
/// not yet returned after a peak).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Memory {
    pub rss_kib: u64,
    pub heap_in_use_kib: u64,
    pub heap_free_kib: u64,
}

impl Memory {
    /// This process now (zeros where unreadable).
    pub fn now() -> Self {
        let rss_kib = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse().ok())
            })
            .unwrap_or(0);
        // SAFETY: mallinfo2 only reads the allocator's own statistics.
        let info = unsafe { libc::mallinfo2() };
        Self {
            rss_kib,
            heap_in_use_kib: ((info.uordblks + info.hblkhd) / 1024) as u64,
            heap_free_kib: (info.fordblks / 1024) as u64,
        }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Status {
    pub pid: u32,
    pub interface: String,
    pub config: Option<String>,
    pub uptime_s: f64,
    /// The configured probe interval (changes with a reload).
    pub interval_ms: u64,
    /// Why IPVS cannot be read, while it cannot.
    pub ipvs_problem: Option<String>,
    /// Why the director's own path is suspected, while it is (every
    /// weight is then kept).
    #[serde(default)]
    pub director_fault: Option<String>,
    /// The datapath counters summed over CPUs.
    pub datapath: prober_common::DatapathCounters,
    pub weight_writes: u64,
    pub weight_write_errors: u64,
    pub netlink_errors: u64,
    /// The most probes sent in one tick (sends are spread over each
    /// interval), and sends that went out over half an interval late.
    #[serde(default)]
    pub largest_send: u64,
    /// Probes the datapath holds (sized at start).
    #[serde(default)]
    pub capacity: u32,
    #[serde(default)]
    pub sends_late: u64,
    /// Probe frames the probing interface dropped as they were sent.
    #[serde(default)]
    pub frames_dropped_here: u64,
    /// Probe outcomes the datapath reported: only those that go against
    /// what is held of a target, end such a run, or move its RTT beyond
    /// the band (a steady target reports nothing).
    #[serde(default)]
    pub probe_events: u64,
    /// Send-wheel slots not walked in their turn: the daemon was a whole
    /// turn behind (a stall), and their targets went a turn later.
    #[serde(default)]
    pub slots_skipped: u64,
    /// The daemon's memory as of the snapshot.
    #[serde(default)]
    pub memory: Memory,
    /// Where the daemon's wakes spent their time.
    #[serde(default)]
    pub wakes: WakeTimes,
    /// Pools whose weights were worked out again: those a change touched,
    /// and in turn those with something moving (a step, slow start, agent,
    /// command or client times). A steady director recomputes none.
    #[serde(default)]
    pub pools_recomputed: u64,
    /// Full IPVS dumps asked for, and IPVS configuration calls by other
    /// processes that the kernel signalled (None: no signal, IPVS is
    /// dumped every `discovery` only).
    #[serde(default)]
    pub ipvs_dumps: u64,
    #[serde(default)]
    pub ipvs_changes_signalled: Option<u64>,
    /// Reads of the whole neighbour table (after paths were read, while a
    /// next hop is unresolved, or when notifications were lost or too
    /// many), and neighbour entries followed one by one from the kernel's
    /// notifications.
    #[serde(default)]
    pub neighbour_table_reads: u64,
    #[serde(default)]
    pub neighbour_changes_followed: u64,
    /// Alerts raised, by kind.
    pub events: BTreeMap<String, u64>,
    pub services: Vec<ServiceStatus>,
    /// Destinations prober does not check, and why (their weights are
    /// left as IPVS has them).
    #[serde(default)]
    pub unchecked: Vec<UncheckedStatus>,
    /// Real server hosts without their L3 diagnosis probe: the datapath
    /// is full (their destinations are still checked).
    #[serde(default)]
    pub undiagnosed_hosts: usize,
    /// Hosts' L3 diagnosis probes resting while their checks answer.
    #[serde(default)]
    pub l3_probes_paused: usize,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct UncheckedStatus {
    pub service: String,
    pub server: String,
    pub why: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServiceStatus {
    /// As ipvsadm shows it: "TCP 203.0.113.10:80", "FWM 7".
    pub service: String,
    /// Weights kept because too much of the pool is down.
    pub panic: bool,
    pub servers: Vec<ServerStatus>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerStatus {
    /// "ADDR:PORT".
    pub server: String,
    /// "masq", "route", "tunnel", ...
    pub forwarding: String,
    /// "up", "down" or "drain" (agent), all layers together.
    pub state: String,
    /// The host's L3 (ICMP) probe: "up", "down", or none.
    pub l3: Option<String>,
    pub l4: Option<ProbeStatus>,
    pub l7: Vec<CheckStatus>,
    pub agent: Option<AgentStatus>,
    pub weight: WeightStatus,
    pub rtt: RttStatus,
    pub last_change: Option<Change>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeStatus {
    pub probe: String,
    pub state: String,
    pub sent: u64,
    pub answered: u64,
    pub refused: u64,
    pub unreachable: u64,
    pub timed_out: u64,
    /// Log2 buckets of answer RTTs: bucket i = [2^i, 2^(i+1)) µs.
    pub rtt_log2_us: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CheckStatus {
    pub check: String,
    /// "L7" or "command".
    pub layer: String,
    pub state: String,
    /// Why its last run failed.
    pub failure: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AgentStatus {
    pub state: String,
    pub weight: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WeightStatus {
    /// What the operator set (as IPVS had it, or as changed by hand).
    pub configured: u32,
    /// What prober's policy wants now (none before the first evaluation).
    pub computed: Option<u32>,
    /// What IPVS holds.
    pub ipvs: u32,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RttStatus {
    /// The latency estimate weights use (EWMA of probe and handshake RTTs).
    pub active_ewma_ms: Option<f64>,
    pub active_p50_ms: Option<f64>,
    pub active_p99_ms: Option<f64>,
    /// Passive, from the clients' own connections (NAT only).
    pub handshake_p50_ms: Option<f64>,
    pub handshake_p99_ms: Option<f64>,
    pub response_p50_ms: Option<f64>,
    pub response_p99_ms: Option<f64>,
    pub handshake_log2_us: Vec<u64>,
    pub response_log2_us: Vec<u64>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Change {
    /// Seconds since the Unix epoch.
    pub time: f64,
    pub from: u32,
    pub to: u32,
    pub why: String,
}

/// The `q` quantile (0..1) of a log2-µs histogram, in ms, interpolated
/// linearly inside its bucket; none without samples.
pub fn quantile_ms(buckets: &[u64], q: f64) -> Option<f64> {
    let total: u64 = buckets.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in buckets.iter().enumerate().take(RTT_BUCKETS) {
        if n == 0 {
            continue;
        }
        if (below + n) as f64 >= rank {
            let low = if i == 0 { 0.0 } else { (1u64 << i) as f64 };
            let high = (1u64 << (i + 1)) as f64;
            let within = ((rank - below as f64) / n as f64).clamp(0.0, 1.0);
            return Some((low + within * (high - low)) / 1000.0);
        }
        below += n;
    }
    None
}

fn ms(v: Option<f64>) -> String {
    match v {
        Some(v) if v >= 100.0 => format!("{v:.0}"),
        Some(v) => format!("{v:.1}"),
        None => "-".into(),
    }
}

/// The status as a table, one line per real server of each service.
pub fn table(status: &Status) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "prober (pid {}) on {}, up {:.0} s{}; IPVS weight writes {}, failed {}",
        status.pid,
        status.interface,
        status.uptime_s,
        status
            .config
            .as_ref()
            .map(|c| format!(", config {c}"))
            .unwrap_or_default(),
        status.weight_writes,
        status.weight_write_errors,
    );
    if let Some(problem) = &status.ipvs_problem {
        let _ = writeln!(out, "IPVS: {problem}");
    }
    if status.l3_probes_paused > 0 {
        let _ = writeln!(
            out,
            "L3 diagnosis: {} hosts' ICMP probes resting while their checks answer",
            status.l3_probes_paused
        );
    }
    if status.undiagnosed_hosts > 0 {
        let _ = writeln!(
            out,
            "CAPACITY: {} hosts without L3 diagnosis (the datapath holds {} probes)",
            status.undiagnosed_hosts, status.capacity
        );
    }
    for u in &status.unchecked {
        let _ = writeln!(
            out,
            "UNCHECKED: {} {}: {} (weight left as it is)",
            u.service, u.server, u.why
        );
    }
    if let Some(why) = &status.director_fault {
        let _ = writeln!(
            out,
            "DIRECTOR-SIDE FAULT SUSPECTED: {why}; every weight kept"
        );
    }
    let _ = writeln!(
        out,
        "{:<18} {:<6} {:<4} {:<5} {:<14} {:<6} {:>15} {:>13} {:>13} {:>15}  last change",
        "real server",
        "state",
        "L3",
        "L4",
        "L7",
        "agent",
        "rtt ewma/p50/p99",
        "hs p50/p99",
        "resp p50/p99",
        "weight cfg/cmp/ipvs"
    );
    for service in &status.services {
        let _ = writeln!(
            out,
            "{}{}",
            service.service,
            if service.panic {
                "  PANIC: weights kept"
            } else {
                ""
            }
        );
        for s in &service.servers {
            let l7 = if s.l7.is_empty() {
                "-".to_string()
            } else {
                let up = s.l7.iter().filter(|c| c.state == "up").count();
                format!("{up}/{} up", s.l7.len())
            };
            let agent = s
                .agent
                .as_ref()
                .map(|a| {
                    if a.state == "up" {
                        a.weight.to_string()
                    } else {
                        a.state.clone()
                    }
                })
                .unwrap_or_else(|| "-".into());
            let change = s
                .last_change
                .as_ref()
                .map(|c| format!("{} -> {}: {}", c.from, c.to, c.why))
                .unwrap_or_default();
            let _ = writeln!(
                out,
                "  {:<16} {:<6} {:<4} {:<5} {:<14} {:<6} {:>15} {:>13} {:>13} {:>15}  {}",
                s.server,
                s.state,
                s.l3.as_deref().unwrap_or("-"),
                s.l4.as_ref().map_or("-", |p| p.state.as_str()),
                l7,
                agent,
                format!(
                    "{}/{}/{}",
                    ms(s.rtt.active_ewma_ms),
                    ms(s.rtt.active_p50_ms),
                    ms(s.rtt.active_p99_ms)
                ),
                format!(
                    "{}/{}",
                    ms(s.rtt.handshake_p50_ms),
                    ms(s.rtt.handshake_p99_ms)
                ),
                format!(
                    "{}/{}",
                    ms(s.rtt.response_p50_ms),
                    ms(s.rtt.response_p99_ms)
                ),
                format!(
                    "{}/{}/{}",
                    s.weight.configured,
                    s.weight
                        .computed
                        .map_or_else(|| "-".to_string(), |w| w.to_string()),
                    s.weight.ipvs
                ),
                change
            );
            for check in s.l7.iter().filter(|c| c.state != "up") {
                let _ = writeln!(
                    out,
                    "      {} {}: {}",
                    check.layer,
                    check.check,
                    check.failure.as_deref().unwrap_or("down")
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_interpolate_inside_log2_buckets() {
        let mut b = vec![0u64; RTT_BUCKETS];
        assert_eq!(quantile_ms(&b, 0.5), None);
        b[10] = 100; // [1024, 2048) µs
        let p50 = quantile_ms(&b, 0.5).unwrap();
        assert!((p50 - 1.536).abs() < 1e-9, "{p50}");
        b[14] = 2; // two slow ones in [16384, 32768) µs
        let p99 = quantile_ms(&b, 0.99).unwrap();
        assert!((16.384..32.768).contains(&p99), "{p99}");
        assert!(quantile_ms(&b, 0.5).unwrap() < 2.048);
    }
}
