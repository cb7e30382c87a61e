//! The IPVS client against the kernel's real IPVS. Needs a kernel with
//! ip_vs and ipvsadm: `cargo xtask vm-test` runs it in a qemu guest booted
//! from Debian's 6.1 kernel (this machine's kernel has no IPVS).
//!
//! Services and real servers are made with ipvsadm and read back through
//! the client; weights are written through the client and read back with
//! ipvsadm. Addresses come from the documentation ranges and exist only in
//! the guest's IPVS table: no packet is sent anywhere.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::{Read, Write},
    net::{IpAddr, Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::{Command, Stdio},
    sync::{Mutex, MutexGuard},
    thread,
    time::{Duration, Instant},
};

use prober_ipvs::{
    Destination, DestinationKey, Family, Forwarding, IpvsClient, IpvsError, Protocol, Service,
    ServiceKey, Stats, Tunnel, TunnelType, VirtualService, WeightUpdate, MAX_WEIGHT,
};
use prober_tests::{prober_bin, run};

/// Every test changes the kernel's one IPVS table: one test at a time,
/// each starting from an empty table.
static IPVS_TABLE: Mutex<()> = Mutex::new(());

fn empty_table() -> MutexGuard<'static, ()> {
    let guard = IPVS_TABLE.lock().unwrap_or_else(|p| p.into_inner());
    ipvsadm(&["-C"]);
    guard
}

fn ipvsadm(args: &[&str]) -> String {
    let out = run(Command::new("ipvsadm").args(args)).unwrap();
    String::from_utf8(out.stdout).unwrap()
}

/// Feeds `rules` (ipvsadm command lines without "ipvsadm") to `ipvsadm -R`:
/// one process for thousands of rules.
fn ipvsadm_restore(rules: &str) {
    let mut child = Command::new("ipvsadm")
        .arg("-R")
        .stdin(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting ipvsadm (is the ipvsadm package installed?)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(rules.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "ipvsadm -R failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn ip(text: &str) -> IpAddr {
    text.parse().unwrap()
}

fn tcp(addr: &str, port: u16) -> ServiceKey {
    ServiceKey::Address {
        protocol: Protocol::Tcp,
        addr: ip(addr),
        port,
    }
}

/// One of each: TCP/UDP/SCTP, IPv4 and IPv6, fwmark services of both
/// families, NAT with thresholds, direct routing, IPIP/GUE/GRE tunnels
/// with checksum options, an IPv6 tunnel real server in an IPv4 service.
const MIXED_RULES: &str = "\
-A -t 198.51.100.1:80 -s wrr -p 300 -M 255.255.255.0
-a -t 198.51.100.1:80 -r 203.0.113.1:8080 -m -w 5 -x 100 -y 10
-a -t 198.51.100.1:80 -r 203.0.113.2:80 -g -w 0
-a -t 198.51.100.1:80 -r 203.0.113.3:80 -i -w 2
-a -t 198.51.100.1:80 -r 203.0.113.4:80 -i --tun-type gue --tun-port 6080 --tun-remcsum -w 3
-a -t 198.51.100.1:80 -r 203.0.113.5:80 -i --tun-type gre --tun-csum -w 6
-a -t 198.51.100.1:80 -r [2001:db8:2::5]:80 -i -w 7
-A -u 198.51.100.2:53 -s rr
-a -u 198.51.100.2:53 -r 203.0.113.10:5353 -m -w 1
-A --sctp-service 198.51.100.3:3868 -s sh
-a --sctp-service 198.51.100.3:3868 -r 203.0.113.11:3868 -m -w 1
-A -f 7 -s rr
-a -f 7 -r 203.0.113.20 -g -w 4
-A -f 8 -6 -s rr -p 60
-a -f 8 -6 -r [2001:db8:2::20]:0 -g -w 1
-A -t [2001:db8:1::1]:443 -s wlc
-a -t [2001:db8:1::1]:443 -r [2001:db8:2::1]:8443 -m -w 9 -x 50 -y 5
-a -t [2001:db8:1::1]:443 -r [2001:db8:2::2]:443 -i --tun-type gue --tun-port 6081 -w 1
";

/// IP_VS_SVC_F_PERSISTENT | IP_VS_SVC_F_HASHED, and HASHED alone: the
/// kernel reports a service in its table as hashed.
const PERSISTENT_HASHED: u32 = 0x1 | 0x2;
const HASHED: u32 = 0x2;

fn service(key: ServiceKey, scheduler: &str, flags: u32, timeout: u32, netmask: u32) -> Service {
    Service {
        key,
        scheduler: scheduler.to_string(),
        flags,
        timeout,
        netmask,
        persistence_engine: None,
        stats: Stats::default(),
    }
}

fn destination(
    addr: &str,
    port: u16,
    forwarding: Forwarding,
    weight: u32,
    thresholds: (u32, u32),
    tunnel: Tunnel,
) -> Destination {
    Destination {
        addr: ip(addr),
        port,
        forwarding,
        weight,
        upper_threshold: thresholds.0,
        lower_threshold: thresholds.1,
        tunnel,
        active_conns: 0,
        inactive_conns: 0,
        persistent_conns: 0,
        stats: Stats::default(),
    }
}

fn tunnel(kind: TunnelType, port: u16, flags: u16) -> Tunnel {
    Tunnel { kind, port, flags }
}

/// What MIXED_RULES must read back as, field for field.
fn mixed_expected() -> Vec<VirtualService> {
    use Forwarding::*;
    let none = prober_ipvs::Tunnel::default();
    let v4_full_mask = 0xffff_ffff;
    vec![
        VirtualService {
            service: service(
                tcp("198.51.100.1", 80),
                "wrr",
                PERSISTENT_HASHED,
                300,
                0xffff_ff00,
            ),
            destinations: vec![
                destination("203.0.113.1", 8080, Masquerade, 5, (100, 10), none),
                destination("203.0.113.2", 80, DirectRoute, 0, (0, 0), none),
                destination("203.0.113.3", 80, Tunnel, 2, (0, 0), none),
                destination(
                    "203.0.113.4",
                    80,
                    Tunnel,
                    3,
                    (0, 0),
                    tunnel(TunnelType::Gue, 6080, 2),
                ),
                destination(
                    "203.0.113.5",
                    80,
                    Tunnel,
                    6,
                    (0, 0),
                    tunnel(TunnelType::Gre, 0, 1),
                ),
                destination("2001:db8:2::5", 80, Tunnel, 7, (0, 0), none),
            ],
        },
        VirtualService {
            service: service(
                ServiceKey::Address {
                    protocol: Protocol::Udp,
                    addr: ip("198.51.100.2"),
                    port: 53,
                },
                "rr",
                HASHED,
                0,
                v4_full_mask,
            ),
            destinations: vec![destination(
                "203.0.113.10",
                5353,
                Masquerade,
                1,
                (0, 0),
                none,
            )],
        },
        VirtualService {
            service: service(
                ServiceKey::Address {
                    protocol: Protocol::Sctp,
                    addr: ip("198.51.100.3"),
                    port: 3868,
                },
                "sh",
                HASHED,
                0,
                v4_full_mask,
            ),
            destinations: vec![destination(
                "203.0.113.11",
                3868,
                Masquerade,
                1,
                (0, 0),
                none,
            )],
        },
        VirtualService {
            service: service(
                ServiceKey::Fwmark {
                    family: Family::Ipv4,
                    mark: 7,
                },
                "rr",
                HASHED,
                0,
                v4_full_mask,
            ),
            destinations: vec![destination("203.0.113.20", 0, DirectRoute, 4, (0, 0), none)],
        },
        VirtualService {
            service: service(
                ServiceKey::Fwmark {
                    family: Family::Ipv6,
                    mark: 8,
                },
                "rr",
                PERSISTENT_HASHED,
                60,
                128,
            ),
            destinations: vec![destination(
                "2001:db8:2::20",
                0,
                DirectRoute,
                1,
                (0, 0),
                none,
            )],
        },
        VirtualService {
            service: service(tcp("2001:db8:1::1", 443), "wlc", HASHED, 0, 128),
            destinations: vec![
                destination("2001:db8:2::1", 8443, Masquerade, 9, (50, 5), none),
                destination(
                    "2001:db8:2::2",
                    443,
                    Tunnel,
                    1,
                    (0, 0),
                    tunnel(TunnelType::Gue, 6081, 0),
                ),
            ],
        },
    ]
}

/// Dump order is the kernel's hash order: compare sorted.
fn sorted(mut services: Vec<VirtualService>) -> Vec<VirtualService> {
    services.sort_by_key(|s| s.service.key);
    for s in &mut services {
        s.destinations.sort_by_key(|d| d.key());
    }
    services
}

#[test]
fn services_made_by_ipvsadm_read_back_field_for_field() {
    let _table = empty_table();
    ipvsadm_restore(MIXED_RULES);
    let mut client = IpvsClient::connect().unwrap();
    let info = client.info().unwrap();
    assert_eq!(info.version_string(), "1.2.1");
    assert!(info.connection_table_size > 0, "{info:?}");

    let dumped = sorted(client.dump().unwrap());
    let expected = sorted(mixed_expected());
    assert_eq!(dumped.len(), expected.len(), "{dumped:#?}");
    for (got, want) in dumped.iter().zip(&expected) {
        assert_eq!(got.service, want.service);
        assert_eq!(
            got.destinations, want.destinations,
            "destinations of {}",
            want.service.key
        );
    }
    // The single-service calls agree with the full dump.
    for want in &expected {
        let key = want.service.key;
        assert_eq!(client.service(&key).unwrap(), want.service);
        let mut destinations = client.destinations(&key).unwrap();
        destinations.sort_by_key(|d| d.key());
        assert_eq!(destinations, want.destinations, "destinations of {key}");
    }
}

/// `ipvsadm -Ln` as (service, destination) -> (forward, weight).
fn ipvsadm_weights() -> BTreeMap<(String, String), (String, u32)> {
    let mut weights = BTreeMap::new();
    let mut current_service = String::new();
    for line in ipvsadm(&["-Ln"]).lines().skip(3) {
        let words: Vec<&str> = line.split_whitespace().collect();
        if let Some(dest) = line.strip_prefix("  -> ") {
            let words: Vec<&str> = dest.split_whitespace().collect();
            weights.insert(
                (current_service.clone(), words[0].to_string()),
                (words[1].to_string(), words[2].parse().unwrap()),
            );
        } else if words.get(2) == Some(&"IPv6") {
            current_service = format!("{} {} IPv6", words[0], words[1]);
        } else {
            current_service = format!("{} {}", words[0], words[1]);
        }
    }
    weights
}

/// ipvsadm's own views of thresholds and tunnel settings; the weight
/// column of --tun-info blanked, since that is what changes.
fn ipvsadm_settings_views() -> (String, String) {
    let thresholds = ipvsadm(&["-Ln", "--thresholds"]);
    let tunnels = ipvsadm(&["-Ln", "--tun-info"])
        .lines()
        .map(|line| match line.strip_prefix("  -> ") {
            Some(dest) => {
                let mut words: Vec<&str> = dest.split_whitespace().collect();
                if words.len() > 3 {
                    words[3] = "*";
                }
                format!("  -> {}", words.join(" "))
            }
            None => line.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n");
    (thresholds, tunnels)
}

#[test]
fn a_weight_set_by_the_client_shows_in_ipvsadm_and_nothing_else_changes() {
    let _table = empty_table();
    ipvsadm_restore(MIXED_RULES);
    let views_before = ipvsadm_settings_views();
    let mut client = IpvsClient::connect().unwrap();
    let before = sorted(client.dump().unwrap());

    // One at a time through read-modify-write, every kind of destination.
    let mut expected_weights = BTreeMap::new();
    for (i, entry) in before.iter().enumerate() {
        for (j, dest) in entry.destinations.iter().enumerate() {
            let weight = 1000 + 10 * i as u32 + j as u32;
            client
                .set_weight(&entry.service.key, &dest.key(), weight)
                .unwrap_or_else(|e| panic!("{e}"));
            expected_weights.insert((entry.service.key.to_string(), dest.key()), weight);
        }
    }

    let after = sorted(client.dump().unwrap());
    assert_eq!(after.len(), before.len());
    for (old, new) in before.iter().zip(&after) {
        assert_eq!(old.service, new.service);
        assert_eq!(old.destinations.len(), new.destinations.len());
        for (old_dest, new_dest) in old.destinations.iter().zip(&new.destinations) {
            let weight = expected_weights[&(old.service.key.to_string(), old_dest.key())];
            assert_eq!(
                new_dest,
                &Destination {
                    weight,
                    ..old_dest.clone()
                },
                "only the weight of {} in {} changes",
                old_dest.key(),
                old.service.key
            );
        }
    }

    // ipvsadm sees the new weights with unchanged forwarding...
    let shown = ipvsadm_weights();
    assert_eq!(shown.len(), expected_weights.len(), "{shown:#?}");
    for ((service, dest), weight) in &expected_weights {
        let (forward, shown_weight) = &shown[&(service.clone(), dest.to_string())];
        assert_eq!(
            shown_weight, weight,
            "ipvsadm's weight of {dest} in {service}"
        );
        let old = before
            .iter()
            .find(|s| s.service.key.to_string() == *service)
            .and_then(|s| s.destinations.iter().find(|d| d.key() == *dest))
            .unwrap();
        assert_eq!(forward, old.forwarding.name());
    }
    // ...and unchanged thresholds and tunnel settings.
    assert_eq!(ipvsadm_settings_views(), views_before);
}

/// 1,000 TCP services of 10 real servers each.
fn many_services_rules(services: u32, per_service: u32) -> String {
    let mut rules = String::new();
    for s in 0..services {
        let vip = format!("198.51.100.{}:{}", 1 + s / 1000, 10000 + s % 1000);
        rules.push_str(&format!("-A -t {vip} -s wrr\n"));
        for d in 0..per_service {
            rules.push_str(&format!(
                "-a -t {vip} -r 203.0.113.{}:{} -m -w 1\n",
                1 + d % 250,
                8000 + d / 250
            ));
        }
    }
    rules
}

#[test]
fn ten_thousand_destinations_dump_and_reweight_in_one_batch() {
    let _table = empty_table();
    let started = Instant::now();
    ipvsadm_restore(&many_services_rules(1000, 10));
    println!(
        "made 1,000 services x 10 destinations with ipvsadm -R in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let mut client = IpvsClient::connect().unwrap();

    let started = Instant::now();
    let dumped = client.dump().unwrap();
    let dump_time = started.elapsed();
    let destinations: usize = dumped.iter().map(|s| s.destinations.len()).sum();
    println!(
        "full dump: {} services, {destinations} destinations in {:.3} s",
        dumped.len(),
        dump_time.as_secs_f64()
    );
    assert_eq!(dumped.len(), 1000);
    assert_eq!(destinations, 10_000);
    assert!(dumped.iter().all(|s| s.destinations.len() == 10));
    let keys: BTreeSet<_> = dumped
        .iter()
        .flat_map(|s| s.destinations.iter().map(move |d| (s.service.key, d.key())))
        .collect();
    assert_eq!(keys.len(), 10_000, "no destination is repeated");

    let updates: Vec<WeightUpdate> = dumped
        .iter()
        .flat_map(|s| {
            s.destinations
                .iter()
                .enumerate()
                .map(|(i, d)| WeightUpdate {
                    service: s.service.key,
                    destination: d.clone(),
                    weight: 2 + i as u32,
                })
        })
        .collect();
    let started = Instant::now();
    let failures = client.set_weights(&updates).unwrap();
    let batch_time = started.elapsed();
    println!(
        "batch weight set: {} destinations in {:.3} s, {} failed",
        updates.len(),
        batch_time.as_secs_f64(),
        failures.len()
    );
    assert!(failures.is_empty(), "{failures:#?}");

    let started = Instant::now();
    let after = client.dump().unwrap();
    println!(
        "full dump after the batch: {:.3} s",
        started.elapsed().as_secs_f64()
    );
    let weights: BTreeMap<_, _> = after
        .iter()
        .flat_map(|s| {
            s.destinations
                .iter()
                .map(move |d| ((s.service.key, d.key()), d.weight))
        })
        .collect();
    assert_eq!(weights.len(), 10_000);
    for update in &updates {
        assert_eq!(
            weights[&(update.service, update.destination.key())],
            update.weight
        );
    }
    // ipvsadm agrees on a sample.
    let shown = ipvsadm_weights();
    assert_eq!(shown.len(), 10_000);
    for update in updates.iter().step_by(997) {
        let (_, weight) = &shown[&(
            update.service.to_string(),
            update.destination.key().to_string(),
        )];
        assert_eq!(*weight, update.weight);
    }
}

/// One service whose destination dump spans many 32 KiB chunks.
#[test]
fn a_destination_dump_of_many_chunks_is_read_whole() {
    let _table = empty_table();
    ipvsadm_restore(&many_services_rules(1, 3000));
    let mut client = IpvsClient::connect().unwrap();
    let dumped = client.dump().unwrap();
    assert_eq!(dumped.len(), 1);
    let keys: BTreeSet<_> = dumped[0].destinations.iter().map(|d| d.key()).collect();
    assert_eq!(keys.len(), 3000);
}

#[test]
fn errors_name_the_service_and_destination() {
    let _table = empty_table();
    ipvsadm_restore(MIXED_RULES);
    let mut client = IpvsClient::connect().unwrap();
    let known = tcp("198.51.100.1", 80);
    let unknown = tcp("198.51.100.99", 81);
    let known_dest = DestinationKey {
        addr: ip("203.0.113.1"),
        port: 8080,
    };
    let unknown_dest = DestinationKey {
        addr: ip("203.0.113.99"),
        port: 8080,
    };

    let err = client.set_weight(&unknown, &known_dest, 5).unwrap_err();
    assert!(
        matches!(err, IpvsError::NoSuchService { service, .. } if service == unknown),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "reading virtual service TCP 198.51.100.99:81: no such virtual service TCP 198.51.100.99:81"
    );
    let err = client.destinations(&unknown).unwrap_err();
    assert!(matches!(err, IpvsError::NoSuchService { .. }), "{err:?}");

    let err = client.set_weight(&known, &unknown_dest, 5).unwrap_err();
    assert!(
        matches!(err, IpvsError::NoSuchDestination { destination, .. } if destination == unknown_dest),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "setting the weight of 203.0.113.99:8080 in TCP 198.51.100.1:80: no real server \
         203.0.113.99:8080 in virtual service TCP 198.51.100.1:80"
    );

    let err = client
        .set_weight(&known, &known_dest, MAX_WEIGHT + 1)
        .unwrap_err();
    assert!(
        matches!(err, IpvsError::WeightOutOfRange { weight, .. } if weight == MAX_WEIGHT + 1),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        "weight 2147483648 for real server 203.0.113.1:8080 in virtual service TCP \
         198.51.100.1:80 is out of range: IPVS takes 0 to 2147483647"
    );
    client.set_weight(&known, &known_dest, MAX_WEIGHT).unwrap();

    // A batch goes on past failures and reports each one by destination;
    // here the kernel itself answers ESRCH and ENOENT.
    let dumped = client.destinations(&known).unwrap();
    let template = dumped.iter().find(|d| d.key() == known_dest).unwrap();
    let good = |weight| WeightUpdate {
        service: known,
        destination: template.clone(),
        weight,
    };
    let updates = vec![
        good(11),
        WeightUpdate {
            service: unknown,
            ..good(12)
        },
        WeightUpdate {
            destination: Destination {
                addr: unknown_dest.addr,
                ..template.clone()
            },
            ..good(13)
        },
        good(MAX_WEIGHT + 7),
        good(15),
    ];
    let failures = client.set_weights(&updates).unwrap();
    let summary: Vec<(usize, String)> = failures
        .iter()
        .map(|f| (f.index, f.error.to_string()))
        .collect();
    assert_eq!(
        summary,
        vec![
            (
                1,
                "setting the weight of 203.0.113.1:8080 in TCP 198.51.100.99:81 to 12: no such \
                 virtual service TCP 198.51.100.99:81"
                    .to_string()
            ),
            (
                2,
                "setting the weight of 203.0.113.99:8080 in TCP 198.51.100.1:80 to 13: no real \
                 server 203.0.113.99:8080 in virtual service TCP 198.51.100.1:80"
                    .to_string()
            ),
            (
                3,
                "weight 2147483654 for real server 203.0.113.1:8080 in virtual service TCP \
                 198.51.100.1:80 is out of range: IPVS takes 0 to 2147483647"
                    .to_string()
            ),
        ]
    );
    assert_eq!(failures[0].service, unknown);
    assert_eq!(failures[1].destination, unknown_dest);
    // The last good update won.
    let weight = client
        .destinations(&known)
        .unwrap()
        .into_iter()
        .find(|d| d.key() == known_dest)
        .unwrap()
        .weight;
    assert_eq!(weight, 15);
}

#[test]
fn prober_ipvs_list_matches_ipvsadm() {
    let _table = empty_table();
    ipvsadm_restore(MIXED_RULES);
    let out = run(Command::new(prober_bin()).args(["ipvs", "list"])).unwrap();
    let table = String::from_utf8(out.stdout).unwrap();
    println!("{table}");
    // The left part of each line is ipvsadm's own -Ln line; blocks (a
    // service with its real servers) compared as sets.
    let blocks = |text: &str, width: usize| -> BTreeSet<Vec<String>> {
        let mut blocks = BTreeSet::new();
        let mut block: Vec<String> = Vec::new();
        for line in text.lines().skip(3) {
            let left = line.get(..width).unwrap_or(line).trim_end().to_string();
            if !line.starts_with("  -> ") && !block.is_empty() {
                block[1..].sort();
                blocks.insert(std::mem::take(&mut block));
            }
            block.push(left);
        }
        if !block.is_empty() {
            block[1..].sort();
            blocks.insert(block);
        }
        blocks
    };
    let ipvsadm_text = ipvsadm(&["-Ln"]);
    assert_eq!(blocks(&table, 70), blocks(&ipvsadm_text, 200), "{table}");
    assert!(table.contains("tunnel gue port 6080 remcsum"), "{table}");
    assert!(table.contains("thresholds upper 100 lower 10"), "{table}");

    let out = run(Command::new(prober_bin()).args(["ipvs", "list", "--json"])).unwrap();
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["version"], "1.2.1");
    let services = json["services"].as_array().unwrap();
    assert_eq!(services.len(), 6);
    let gue = services
        .iter()
        .flat_map(|s| s["destinations"].as_array().unwrap())
        .find(|d| d["addr"] == "203.0.113.4")
        .unwrap();
    assert_eq!(gue["forwarding"], "tunnel");
    assert_eq!(gue["tunnel"]["kind"], "gue");
    assert_eq!(gue["tunnel"]["port"], 6080);
    assert_eq!(gue["stats"]["in_bytes"], 0);
}

#[test]
fn without_cap_net_admin_ipvs_list_says_so() {
    let _table = empty_table();
    let out = Command::new("setpriv")
        .args([
            "--reuid=65534",
            "--regid=65534",
            "--clear-groups",
            "--inh-caps=-all",
        ])
        .arg(prober_bin())
        .args(["ipvs", "list"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(
        stderr.trim(),
        "prober: error: reading IPVS info: permission denied: IPVS needs CAP_NET_ADMIN, for \
         reading as well as for changes (run as root)"
    );
}

/// `ipvsadm -Ln --stats --exact` as line label -> [conns, inpkts, outpkts,
/// inbytes, outbytes]; labels are "TCP 127.0.0.1:7000" and "-> 127.0.0.1:7000".
fn ipvsadm_exact_stats() -> BTreeMap<String, [u64; 5]> {
    ipvsadm(&["-Ln", "--stats", "--exact"])
        .lines()
        .skip(3)
        .filter_map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let numbers: Vec<u64> = words[2..].iter().filter_map(|w| w.parse().ok()).collect();
            let counters: [u64; 5] = numbers.try_into().ok()?;
            Some((format!("{} {}", words[0], words[1]), counters))
        })
        .collect()
}

fn counters(stats: &Stats) -> [u64; 5] {
    [
        stats.conns,
        stats.in_packets,
        stats.out_packets,
        stats.in_bytes,
        stats.out_bytes,
    ]
}

/// Real connections through IPVS, all on the guest's loopback: the
/// client reads the same 64-bit counters and connection counts as ipvsadm.
#[test]
fn counters_and_connections_of_real_traffic_read_back() {
    const PORT: u16 = 7000;
    const CONNECTIONS: usize = 3;
    let _table = empty_table();
    let vip = format!("127.0.0.1:{PORT}");
    ipvsadm(&["-A", "-t", &vip, "-s", "rr"]);
    ipvsadm(&["-a", "-t", &vip, "-r", &vip, "-m", "-w", "1"]);

    let listener = TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT)).unwrap();
    let server = thread::spawn(move || {
        for _ in 0..CONNECTIONS {
            let (mut conn, _) = listener.accept().unwrap();
            conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut request = [0u8; 100];
            conn.read_exact(&mut request).unwrap();
            conn.write_all(&[request, request].concat()).unwrap();
        }
    });
    for _ in 0..CONNECTIONS {
        let mut conn = TcpStream::connect_timeout(
            &SocketAddrV4::new(Ipv4Addr::LOCALHOST, PORT).into(),
            Duration::from_secs(5),
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        conn.write_all(&[b'x'; 100]).unwrap();
        let mut reply = [0u8; 200];
        conn.read_exact(&mut reply).unwrap();
    }
    server.join().unwrap();

    // The kernel folds its per-CPU counters into the totals every 2 s: wait
    // for all connections to show, then compare with a reading of ipvsadm
    // that did not change around the client's.
    let deadline = Instant::now() + Duration::from_secs(30);
    let service_label = format!("TCP {vip}");
    let mut client = IpvsClient::connect().unwrap();
    let (shown, dumped) = loop {
        let before = ipvsadm_exact_stats();
        let dumped = client.dump().unwrap();
        let after = ipvsadm_exact_stats();
        let all_counted = after.get(&service_label).map(|c| c[0]) == Some(CONNECTIONS as u64);
        if before == after && all_counted {
            break (after, dumped);
        }
        assert!(
            Instant::now() < deadline,
            "IPVS counters not settled after 30 s: {after:?}"
        );
        thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(dumped.len(), 1);
    let dest = &dumped[0].destinations[0];
    println!(
        "after {CONNECTIONS} connections: service {:?}, real server {:?}, active {}, inactive {}",
        dumped[0].service.stats, dest.stats, dest.active_conns, dest.inactive_conns
    );
    assert_eq!(counters(&dumped[0].service.stats), shown[&service_label]);
    assert_eq!(counters(&dest.stats), shown[&format!("-> {vip}")]);
    assert!(
        dest.stats.in_bytes >= 300 && dest.stats.out_bytes >= 600,
        "{dest:?}"
    );
    // Closed connections linger in TIME_WAIT: inactive, as ipvsadm says.
    let listing = ipvsadm(&["-Ln"]);
    let dest_line = listing
        .lines()
        .skip(3)
        .find(|l| l.starts_with("  -> "))
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(
        dest_line,
        format!(
            "-> {vip} Masq 1 {} {}",
            dest.active_conns, dest.inactive_conns
        )
    );
    assert_eq!(
        dest.active_conns + dest.inactive_conns,
        CONNECTIONS as u32,
        "{listing}"
    );
}
