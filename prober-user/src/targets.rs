//! From IPVS and the config to probe targets: which probe checks each
//! destination, one probe per (real server, port, kind) however many
//! virtual services share it, which L7 checks run on it (one per real
//! server, port and check), and which L3 probe diagnoses each real server
//! host.

use std::{collections::HashMap, net::IpAddr};

use rustc_hash::{FxHashMap, FxHashSet};

use prober_ipvs::{
    Destination, DestinationKey, Forwarding as IpvsForwarding, Protocol, ServiceKey, TunnelType,
    VirtualService,
};

use crate::{
    checks::{CheckSpec, CheckTiming},
    config::{Config, ProbeChoice},
    health::RiseFall,
    probe::{Forwarding, ProbeKind, ProbeSpec},
};

/// What a binding keeps of its IPVS destination: which it is, how IPVS
/// forwards to it and its weight as dumped (not its counters: a plan
/// holds one per real server, 100,000 on a large director).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BoundDestination {
    pub addr: IpAddr,
    pub port: u16,
    pub forwarding: IpvsForwarding,
    pub weight: u32,
}

impl BoundDestination {
    pub fn key(&self) -> DestinationKey {
        DestinationKey {
            addr: self.addr,
            port: self.port,
        }
    }
}

impl From<&Destination> for BoundDestination {
    fn from(d: &Destination) -> Self {
        Self {
            addr: d.addr,
            port: d.port,
            forwarding: d.forwarding,
            weight: d.weight,
        }
    }
}

/// A destination of a virtual service and the probe that checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Binding {
    pub service: ServiceKey,
    /// As last dumped.
    pub destination: BoundDestination,
    pub probe: ProbeSpec,
    /// L7 checks and commands: all must pass for the destination to be up.
    pub checks: Vec<CheckSpec>,
}

/// How often and how strictly one probe runs: the strictest settings of the
/// services that use it (see [`ProbeSettings::strictest`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ProbeSettings {
    pub interval: std::time::Duration,
    pub timeout: std::time::Duration,
    pub limits: RiseFall,
}

impl ProbeSettings {
    /// A probe shared by services runs as the most demanding of them asks:
    /// the shortest interval and timeout and the smallest fall, whatever
    /// order IPVS lists them in. Rise is the largest: no service sees a
    /// server back sooner than it asked.
    fn strictest(self, other: Self) -> Self {
        Self {
            interval: self.interval.min(other.interval),
            timeout: self.timeout.min(other.timeout),
            limits: self.limits.strictest(other.limits),
        }
    }
}

/// How often and how strictly one L7 check runs: the strictest settings of
/// the services that use it, as for probes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CheckSettings {
    pub timing: CheckTiming,
    pub limits: RiseFall,
}

impl CheckSettings {
    fn strictest(self, other: Self) -> Self {
        Self {
            timing: CheckTiming {
                interval: self.timing.interval.min(other.timing.interval),
                timeout: self.timing.timeout.min(other.timing.timeout),
            },
            limits: self.limits.strictest(other.limits),
        }
    }
}

/// A probe of the plan: how it runs (an index into
/// `Plan::probe_settings`: a large director has 100,000 probes and a few
/// distinct settings), and which bindings it checks (a range of
/// `Plan::probe_bindings`, set by `Plan::index`: most probes have one
/// binding, and a list of one cost 100 bytes a probe).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PlannedProbe {
    settings: u32,
    bindings_start: u32,
    bindings_len: u32,
}

impl PlannedProbe {
    fn new(settings: u32) -> Self {
        Self {
            settings,
            bindings_start: 0,
            bindings_len: 0,
        }
    }
}

/// The distinct probe settings of a plan being built, each once.
#[derive(Default)]
struct SettingsTable {
    list: Vec<ProbeSettings>,
    index: FxHashMap<ProbeSettings, u32>,
}

impl SettingsTable {
    fn intern(&mut self, settings: ProbeSettings) -> u32 {
        *self.index.entry(settings).or_insert_with(|| {
            self.list.push(settings);
            (self.list.len() - 1) as u32
        })
    }

    /// Adds `settings` for `probe`, merged with what other services asked.
    fn merge_into(
        &mut self,
        probes: &mut FxHashMap<ProbeSpec, PlannedProbe>,
        probe: ProbeSpec,
        settings: ProbeSettings,
    ) {
        let merged = match probes.get(&probe) {
            Some(p) => self.list[p.settings as usize].strictest(settings),
            None => settings,
        };
        let index = self.intern(merged);
        probes
            .entry(probe)
            .or_insert(PlannedProbe::new(index))
            .settings = index;
    }
}

/// The L3 (ICMP) probe that diagnoses real server host `host`.
pub fn host_probe(host: IpAddr) -> ProbeSpec {
    ProbeSpec {
        kind: ProbeKind::IcmpEcho,
        destination: host,
        forwarding: Forwarding::Direct,
    }
}

/// Adds `settings` for `key`, merged with what other services asked.
fn merge_into<K: std::hash::Hash + Eq, S: Copy>(
    map: &mut HashMap<K, S>,
    key: K,
    settings: S,
    strictest: fn(S, S) -> S,
) {
    map.entry(key)
        .and_modify(|s| *s = strictest(*s, settings))
        .or_insert(settings);
}

#[derive(Debug, Default)]
pub struct Plan {
    pub bindings: Vec<Binding>,
    /// Every probe to send: those of the bindings and the hosts' L3
    /// probes. Keyed by what IPVS names, never by what the network sends:
    /// a fast unkeyed hash is safe.
    pub probes: FxHashMap<ProbeSpec, PlannedProbe>,
    /// The distinct settings of `probes`.
    probe_settings: Vec<ProbeSettings>,
    pub checks: HashMap<CheckSpec, CheckSettings>,
    /// The real server hosts that have their L3 probe ([`host_probe`]), for
    /// root-cause diagnosis (none when `diagnose` is off).
    pub hosts: FxHashSet<IpAddr>,
    /// Destinations left alone, and why.
    pub skipped: Vec<(ServiceKey, DestinationKey, &'static str)>,
    /// Hosts left without their L3 diagnosis probe to fit the capacity.
    pub undiagnosed: usize,
    /// Indexes into `bindings`, grouped by probe (see [`PlannedProbe`]):
    /// who is affected when a probe's state changes, without a scan of
    /// every binding (100,000 at scale).
    probe_bindings: Vec<u32>,
    /// Indexes into `bindings` by service, in service order: each pool's
    /// members, and the order pools are recomputed in.
    pub by_service: Vec<(ServiceKey, Vec<usize>)>,
}

impl Plan {
    /// The indexes into `bindings` of the bindings `probe` checks.
    pub fn bindings_of(&self, probe: &ProbeSpec) -> impl Iterator<Item = usize> + '_ {
        let (start, len) = self
            .probes
            .get(probe)
            .map_or((0, 0), |p| (p.bindings_start, p.bindings_len));
        self.probe_bindings[start as usize..(start + len) as usize]
            .iter()
            .map(|&i| i as usize)
    }

    /// How the plan runs `probe`, if it is one of its probes.
    pub fn settings_of(&self, probe: &ProbeSpec) -> Option<ProbeSettings> {
        Some(self.probe_settings[self.probes.get(probe)?.settings as usize])
    }

    /// The L3 probe diagnosing `host`, if it has one.
    pub fn host_probe(&self, host: IpAddr) -> Option<ProbeSpec> {
        self.hosts.contains(&host).then(|| host_probe(host))
    }

    /// The names of the services whose bindings use `probe`, sorted.
    pub fn services_of_probe(&self, probe: &ProbeSpec) -> Vec<String> {
        let names: std::collections::BTreeSet<String> = self
            .bindings_of(probe)
            .map(|i| self.bindings[i].service.to_string())
            .collect();
        names.into_iter().collect()
    }

    /// Indexes the bindings by probe and by service (after `fit`).
    fn index(&mut self) {
        let mut order: Vec<u32> = (0..self.bindings.len() as u32).collect();
        order.sort_unstable_by_key(|&i| self.bindings[i as usize].probe);
        let mut start = 0;
        for run in order
            .chunk_by(|a, b| self.bindings[*a as usize].probe == self.bindings[*b as usize].probe)
        {
            let probe = self.bindings[run[0] as usize].probe;
            if let Some(planned) = self.probes.get_mut(&probe) {
                planned.bindings_start = start;
                planned.bindings_len = run.len() as u32;
            }
            start += run.len() as u32;
        }
        self.probes.shrink_to_fit();
        self.probe_bindings = order;
        let mut by_service: std::collections::BTreeMap<ServiceKey, Vec<usize>> = Default::default();
        for (i, binding) in self.bindings.iter().enumerate() {
            by_service.entry(binding.service).or_default().push(i);
        }
        self.by_service = by_service
            .into_iter()
            .map(|(service, mut members)| {
                members.shrink_to_fit();
                (service, members)
            })
            .collect();
    }
}

/// The plan for every destination, with no limit on probes (to size the
/// datapath for it).
pub fn plan(services: &[VirtualService], config: &Config) -> Plan {
    plan_within(services, config, usize::MAX)
}

/// The probes a datapath is sized for when IPVS needs `needed` at start
/// and `max_probes` is not set: a quarter again as many, so IPVS can grow
/// without a restart, in whole steps of the compiled size (kernel memory
/// grows with it: one map is per-CPU).
pub fn capacity_for(needed: usize) -> u32 {
    let step = prober_common::MAX_TARGETS as usize;
    let roomy = needed
        .saturating_add(needed / 4)
        .div_ceil(step)
        .saturating_mul(step);
    roomy.clamp(
        prober_common::MAX_TARGETS as usize,
        prober_common::MOST_TARGETS as usize,
    ) as u32
}

/// The plan for a datapath that holds at most `capacity` probes. Over it,
/// the optional part goes first: L3 diagnosis probes of hosts (every
/// destination still checked); then, if the destinations' own probes
/// still do not fit, the destinations past the capacity (in a stable
/// order) are left unchecked, with the reason, never silently.
pub fn plan_within(services: &[VirtualService], config: &Config, capacity: usize) -> Plan {
    let mut plan = Plan::default();
    let mut settings_table = SettingsTable::default();
    plan.bindings
        .reserve_exact(services.iter().map(|vs| vs.destinations.len()).sum());
    for vs in services {
        let key = vs.service.key;
        let settings = config.service(&key);
        let choice = settings.and_then(|s| s.probe).unwrap_or(match key {
            ServiceKey::Address {
                protocol: Protocol::Tcp,
                ..
            }
            | ServiceKey::Fwmark { .. } => ProbeChoice::Tcp,
            // A SYN cannot check a UDP or SCTP service: check the host.
            ServiceKey::Address { .. } => ProbeChoice::Icmp,
        });
        let interval = settings.and_then(|s| s.interval).unwrap_or(config.interval);
        let probe_settings = ProbeSettings {
            interval,
            // A probe is settled before the next one goes out.
            timeout: settings
                .and_then(|s| s.timeout)
                .unwrap_or(config.timeout)
                .min(interval),
            limits: RiseFall {
                rise: settings.and_then(|s| s.rise).unwrap_or(config.limits.rise),
                fall: settings.and_then(|s| s.fall).unwrap_or(config.limits.fall),
            },
        };
        for dest in &vs.destinations {
            match probe_for(&key, dest, choice, settings.and_then(|s| s.port)) {
                Ok(probe) => {
                    settings_table.merge_into(&mut plan.probes, probe, probe_settings);
                    // Direct routing: the real server answers on the VIP,
                    // at the service's port, whatever the L4 probe is.
                    let vip = match (dest.forwarding, key) {
                        (
                            IpvsForwarding::DirectRoute,
                            ServiceKey::Address {
                                addr: IpAddr::V4(vip),
                                port,
                                ..
                            },
                        ) => Some((vip, port)),
                        _ => None,
                    };
                    let default_port = match (vip, probe.kind) {
                        (Some((_, port)), _) => port,
                        (None, ProbeKind::TcpSyn { port }) => port,
                        (None, ProbeKind::IcmpEcho) => dest.port,
                    };
                    let checks = settings
                        .map(|s| s.checks.as_slice())
                        .unwrap_or_default()
                        .iter()
                        .map(|c| {
                            let spec = CheckSpec {
                                address: dest.addr,
                                port: c.port.unwrap_or(default_port),
                                vip: vip.map(|(vip, _)| vip),
                                check: c.check.clone(),
                            };
                            let check_settings = CheckSettings {
                                timing: CheckTiming {
                                    interval: c.interval.unwrap_or(probe_settings.interval),
                                    timeout: c.timeout.unwrap_or(probe_settings.timeout),
                                },
                                limits: RiseFall {
                                    rise: c.rise.unwrap_or(probe_settings.limits.rise),
                                    fall: c.fall.unwrap_or(probe_settings.limits.fall),
                                },
                            };
                            merge_into(
                                &mut plan.checks,
                                spec.clone(),
                                check_settings,
                                CheckSettings::strictest,
                            );
                            spec
                        })
                        .collect();
                    if config.diagnose {
                        plan.hosts.insert(dest.addr);
                    }
                    plan.bindings.push(Binding {
                        service: key,
                        destination: dest.into(),
                        probe,
                        checks,
                    });
                }
                Err(why) => plan.skipped.push((key, dest.key(), why)),
            }
        }
    }
    // Host probes run at the daemon's own pace, unless a service already
    // probes the host that way.
    let host_settings = ProbeSettings {
        interval: config.interval,
        timeout: config.timeout.min(config.interval),
        limits: config.limits,
    };
    for &host in &plan.hosts {
        plan.probes
            .entry(host_probe(host))
            .or_insert(PlannedProbe::new(settings_table.intern(host_settings)));
    }
    plan.probe_settings = settings_table.list;
    fit(&mut plan, capacity);
    plan.bindings.shrink_to_fit();
    plan.index();
    plan
}

/// Brings the plan within `capacity` probes (see [`plan_within`]).
fn fit(plan: &mut Plan, capacity: usize) {
    if plan.probes.len() <= capacity {
        return;
    }
    let checked: std::collections::HashSet<ProbeSpec> =
        plan.bindings.iter().map(|b| b.probe).collect();
    let mut hosts: Vec<IpAddr> = plan.hosts.iter().copied().collect();
    hosts.sort();
    // The last hosts in address order lose their diagnosis first.
    while plan.probes.len() > capacity {
        let Some(host) = hosts.pop() else { break };
        let spec = host_probe(host);
        if !checked.contains(&spec) {
            plan.probes.remove(&spec);
            plan.hosts.remove(&host);
            plan.undiagnosed += 1;
        }
    }
    if plan.probes.len() <= capacity {
        return;
    }
    let mut kept: Vec<ProbeSpec> = plan.probes.keys().copied().collect();
    kept.sort_by_key(|p| p.to_string());
    let dropped: std::collections::HashSet<ProbeSpec> =
        kept.split_off(capacity).into_iter().collect();
    for spec in &dropped {
        plan.probes.remove(spec);
    }
    plan.hosts
        .retain(|&host| !dropped.contains(&host_probe(host)));
    let (keep, over): (Vec<Binding>, Vec<Binding>) = std::mem::take(&mut plan.bindings)
        .into_iter()
        .partition(|b| !dropped.contains(&b.probe));
    plan.bindings = keep;
    for b in over {
        plan.skipped
            .push((b.service, b.destination.key(), OVER_CAPACITY));
    }
    let used: std::collections::HashSet<&CheckSpec> =
        plan.bindings.iter().flat_map(|b| &b.checks).collect();
    plan.checks.retain(|c, _| used.contains(c));
}

/// Why a destination past the datapath's capacity is not checked.
pub const OVER_CAPACITY: &str =
    "over capacity: the datapath is full (it was sized at start from IPVS, or by max_probes; a restart sizes it again)";

fn probe_for(
    service: &ServiceKey,
    dest: &Destination,
    choice: ProbeChoice,
    port: Option<u16>,
) -> Result<ProbeSpec, &'static str> {
    if choice == ProbeChoice::None {
        return Err("the config says probe = \"none\"");
    }
    if !dest.addr.is_ipv4() {
        return Err("IPv6 probes are not implemented yet");
    }
    let vip = match service {
        ServiceKey::Address { addr, port, .. } if addr.is_ipv4() => Some((*addr, *port)),
        ServiceKey::Address { .. } => return Err("IPv6 probes are not implemented yet"),
        ServiceKey::Fwmark { .. } => None,
    };
    // With direct routing and tunnels the real server answers on the VIP,
    // at the service's port: probe exactly that, through the same path.
    let (destination, forwarding, default_port) = match (dest.forwarding, vip) {
        (IpvsForwarding::Local, _) => return Err("local forwarding: the director itself"),
        (IpvsForwarding::Other(_), _) => return Err("unknown forwarding method"),
        (IpvsForwarding::DirectRoute, Some((vip, vport))) => (
            vip,
            Forwarding::DirectRouting {
                real_server: dest.addr,
            },
            vport,
        ),
        (IpvsForwarding::Tunnel, _) if dest.tunnel.kind != TunnelType::Ipip => {
            return Err("GUE and GRE tunnels are not probed yet (a plain SYN would miss the VIP)")
        }
        (IpvsForwarding::Tunnel, Some((vip, vport))) => (
            vip,
            Forwarding::Tunnel {
                real_server: dest.addr,
            },
            vport,
        ),
        // Fwmark services have no VIP to aim at: check the real server's
        // own address.
        _ => (dest.addr, Forwarding::Direct, dest.port),
    };
    let kind = match choice {
        ProbeChoice::Icmp => {
            return Ok(ProbeSpec {
                kind: ProbeKind::IcmpEcho,
                destination: dest.addr,
                forwarding: Forwarding::Direct,
            })
        }
        _ => {
            let port = port.unwrap_or(default_port);
            if port == 0 {
                return Err("no port to probe (set `port` for this service)");
            }
            ProbeKind::TcpSyn { port }
        }
    };
    Ok(ProbeSpec {
        kind,
        destination,
        forwarding,
    })
}

#[cfg(test)]
mod tests {
    use prober_ipvs::{Service, Stats, Tunnel};

    use super::*;

    fn dest(addr: &str, port: u16, forwarding: IpvsForwarding) -> Destination {
        Destination {
            addr: addr.parse().unwrap(),
            port,
            forwarding,
            weight: 100,
            upper_threshold: 0,
            lower_threshold: 0,
            tunnel: Tunnel::default(),
            active_conns: 0,
            inactive_conns: 0,
            persistent_conns: 0,
            stats: Stats::default(),
        }
    }

    fn vs(key: &str, destinations: Vec<Destination>) -> VirtualService {
        VirtualService {
            service: Service {
                key: crate::config::parse_service(key).unwrap(),
                scheduler: "wrr".into(),
                flags: 0,
                timeout: 0,
                netmask: 0,
                persistence_engine: None,
                stats: Stats::default(),
            },
            destinations,
        }
    }

    #[test]
    fn forwarding_method_decides_the_probe() {
        let services = vec![
            vs(
                "tcp:203.0.113.10:80",
                vec![
                    dest("192.0.2.2", 8080, IpvsForwarding::Masquerade),
                    dest("192.0.2.3", 80, IpvsForwarding::DirectRoute),
                    dest("192.0.2.4", 80, IpvsForwarding::Tunnel),
                    dest("127.0.0.1", 80, IpvsForwarding::Local),
                ],
            ),
            vs(
                "udp:203.0.113.10:53",
                vec![dest("192.0.2.2", 53, IpvsForwarding::Masquerade)],
            ),
            vs(
                "fwmark:7",
                vec![dest("192.0.2.5", 443, IpvsForwarding::DirectRoute)],
            ),
        ];
        let plan = plan(&services, &Config::default());
        let probes: Vec<String> = plan.bindings.iter().map(|b| b.probe.to_string()).collect();
        let mut hosts: Vec<String> = plan
            .hosts
            .iter()
            .map(|&h| host_probe(h).to_string())
            .collect();
        hosts.sort();
        assert_eq!(
            hosts,
            [
                "icmp:192.0.2.2",
                "icmp:192.0.2.3",
                "icmp:192.0.2.4",
                "icmp:192.0.2.5"
            ],
            "one L3 probe per real server host"
        );
        assert_eq!(
            probes,
            [
                "tcp:192.0.2.2:8080",
                "tcp:203.0.113.10:80,dr=192.0.2.3",
                "tcp:203.0.113.10:80,tun=192.0.2.4",
                "icmp:192.0.2.2",
                "tcp:192.0.2.5:443",
            ]
        );
        assert_eq!(plan.skipped.len(), 1);
        assert!(plan.skipped[0].2.contains("local"));
    }

    #[test]
    fn gue_and_gre_tunnels_and_ipv6_are_skipped_with_a_reason() {
        let mut gue = dest("192.0.2.4", 80, IpvsForwarding::Tunnel);
        gue.tunnel.kind = TunnelType::Gue;
        let services = vec![
            vs("tcp:203.0.113.10:80", vec![gue]),
            vs(
                "tcp:[2001:db8::1]:80",
                vec![dest("2001:db8::10", 80, IpvsForwarding::Masquerade)],
            ),
        ];
        let plan = plan(&services, &Config::default());
        assert!(plan.bindings.is_empty(), "{:?}", plan.bindings);
        let why: Vec<&str> = plan.skipped.iter().map(|s| s.2).collect();
        assert!(why[0].contains("GUE and GRE"), "{why:?}");
        assert!(why[1].contains("IPv6"), "{why:?}");
    }

    #[test]
    fn the_datapath_is_sized_with_room_to_grow() {
        assert_eq!(capacity_for(0), 65_536);
        assert_eq!(capacity_for(52_428), 65_536);
        assert_eq!(capacity_for(52_430), 131_072);
        assert_eq!(capacity_for(70_200), 131_072);
        // 100,000 real servers, each with its L3 probe.
        assert_eq!(capacity_for(200_000), 262_144);
        assert_eq!(capacity_for(usize::MAX / 2), prober_common::MOST_TARGETS);
    }

    #[test]
    fn over_capacity_diagnosis_goes_first_then_destinations_are_left_unchecked() {
        let dests = |n: u8| -> Vec<Destination> {
            (0..n)
                .map(|i| {
                    dest(
                        &format!("192.0.2.{}", 10 + i),
                        80,
                        IpvsForwarding::Masquerade,
                    )
                })
                .collect()
        };
        let services = vec![vs("tcp:203.0.113.10:80", dests(10))];
        // 10 L4 probes and 10 L3 ones: 14 fit, so 6 hosts lose diagnosis.
        let plan = plan_within(&services, &Config::default(), 14);
        assert_eq!((plan.probes.len(), plan.undiagnosed), (14, 6));
        assert_eq!(plan.bindings.len(), 10, "every destination still checked");
        assert!(plan.skipped.is_empty());
        // 8 fit: no diagnosis at all, and 2 destinations unchecked.
        let plan = plan_within(&services, &Config::default(), 8);
        assert_eq!(plan.probes.len(), 8);
        assert_eq!((plan.bindings.len(), plan.undiagnosed), (8, 10));
        assert_eq!(plan.skipped.len(), 2);
        assert!(plan.skipped.iter().all(|s| s.2 == OVER_CAPACITY));
        let indexed = plan
            .probes
            .keys()
            .filter(|p| plan.bindings_of(p).count() == 1);
        assert_eq!(indexed.count(), 8, "each kept probe finds its binding");
    }

    #[test]
    fn services_sharing_a_real_server_share_its_probe() {
        let services = vec![
            vs(
                "tcp:203.0.113.10:80",
                vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
            ),
            vs(
                "tcp:203.0.113.11:80",
                vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
            ),
        ];
        let plan = plan(&services, &Config::default());
        assert_eq!(plan.bindings.len(), 2);
        assert_eq!(
            plan.probes.len(),
            2,
            "one probe for two services, and the host's"
        );
    }

    #[test]
    fn config_can_leave_a_service_alone_or_change_its_probe() {
        let config = Config::parse(
            "[[service]]\nmatch = \"tcp:203.0.113.10:80\"\nprobe = \"none\"\n[[service]]\nmatch = \"tcp:203.0.113.11:80\"\nport = 9000\nfall = 7\n",
        )
        .unwrap();
        let services = vec![
            vs(
                "tcp:203.0.113.10:80",
                vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
            ),
            vs(
                "tcp:203.0.113.11:80",
                vec![dest("192.0.2.3", 8080, IpvsForwarding::Masquerade)],
            ),
        ];
        let plan = plan(&services, &config);
        assert_eq!(plan.bindings.len(), 1);
        assert_eq!(plan.bindings[0].probe.to_string(), "tcp:192.0.2.3:9000");
        let settings = plan.settings_of(&plan.bindings[0].probe).unwrap();
        assert_eq!(settings.limits.fall, 7);
    }

    #[test]
    fn a_shared_probe_runs_with_the_strictest_settings_in_any_order() {
        let config = Config::parse(
            r#"
[[service]]
match = "tcp:203.0.113.10:80"
interval = "500ms"
timeout = "400ms"
fall = 5
rise = 1
[service.check]
type = "http"
path = "/health"
interval = "3s"
fall = 4
[[service]]
match = "tcp:203.0.113.11:80"
interval = "2s"
timeout = "300ms"
fall = 2
rise = 3
[service.check]
type = "http"
path = "/health"
interval = "1s"
fall = 6
"#,
        )
        .unwrap();
        let a = vs(
            "tcp:203.0.113.10:80",
            vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
        );
        let b = vs(
            "tcp:203.0.113.11:80",
            vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
        );
        let forward = plan(&[a.clone(), b.clone()], &config);
        let backward = plan(&[b, a], &config);
        let probe = forward.bindings[0].probe;
        let settings = forward.settings_of(&probe).unwrap();
        assert_eq!(
            Some(settings),
            backward.settings_of(&probe),
            "IPVS order changes nothing"
        );
        assert_eq!(
            settings,
            ProbeSettings {
                interval: std::time::Duration::from_millis(500),
                timeout: std::time::Duration::from_millis(300),
                limits: RiseFall { rise: 3, fall: 2 },
            }
        );
        let check = &forward.bindings[0].checks[0];
        let check_settings = forward.checks[check];
        assert_eq!(check_settings, backward.checks[check]);
        assert_eq!(
            (check_settings.timing.interval, check_settings.limits.fall),
            (std::time::Duration::from_secs(1), 4)
        );
    }

    #[test]
    fn l7_checks_are_shared_and_reach_the_vip_with_direct_routing() {
        let config = Config::parse(
            r#"
[[service]]
match = "tcp:203.0.113.10:80"
[service.check]
type = "http"
path = "/health"
[[service]]
match = "tcp:203.0.113.11:80"
[[service.check]]
type = "http"
path = "/health"
[[service.check]]
type = "tcp"
port = 6379
expect = "+PONG"
fall = 5
[[service]]
match = "tcp:203.0.113.12:80"
[service.check]
type = "http"
path = "/health"
"#,
        )
        .unwrap();
        let services = vec![
            vs(
                "tcp:203.0.113.10:80",
                vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
            ),
            vs(
                "tcp:203.0.113.11:80",
                vec![dest("192.0.2.2", 8080, IpvsForwarding::Masquerade)],
            ),
            vs(
                "tcp:203.0.113.12:80",
                vec![dest("192.0.2.3", 80, IpvsForwarding::DirectRoute)],
            ),
        ];
        let plan = plan(&services, &config);
        assert_eq!(plan.bindings[0].checks.len(), 1);
        assert_eq!(plan.bindings[1].checks.len(), 2);
        assert_eq!(
            plan.bindings[0].checks[0], plan.bindings[1].checks[0],
            "the same check of the same real server runs once"
        );
        assert_eq!(plan.checks.len(), 3);
        let redis = &plan.bindings[1].checks[1];
        assert_eq!(redis.port, 6379);
        assert_eq!(plan.checks[redis].limits.fall, 5);
        let dr = &plan.bindings[2].checks[0];
        assert_eq!(
            (
                dr.address.to_string(),
                dr.port,
                dr.vip.map(|v| v.to_string())
            ),
            ("192.0.2.3".into(), 80, Some("203.0.113.12".into()))
        );
    }
}
