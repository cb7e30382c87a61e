//! The demo behind `cargo xtask demo`, run inside the qemu guest (real
//! IPVS): a director and four real servers on a bridged LAN, a NAT service
//! and a direct-routing service, and `prober run` managing their weights.
//! Real server 1 is slow (netem 40 ms), 2 refuses (nothing listens until
//! half-way), 3 is black-holed after a few seconds (its replies go
//! nowhere). The direct-routing
//! service also has an HTTP check, which reaches the VIP on each real
//! server; the alerts prober raised are printed at the end.

use std::{
    collections::HashMap,
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context, Result};
use prober_tests::{
    http::{HttpServer, Route},
    prober_bin, run, unique_name, Daemon, Lan, PinDir, LAN_IF,
};

const NAT_VS: &str = "203.0.113.10:80";
const DR_VS: &str = "203.0.113.20:80";
const RUN_FOR: Duration = Duration::from_secs(22);
const BLACKHOLE_AT: Duration = Duration::from_secs(4);
const COMEBACK_AT: Duration = Duration::from_secs(10);
const CHECK_FAILS_AT: Duration = Duration::from_secs(14);

const CONFIG: &str = r#"[daemon]
interval = "200ms"
rise = 2
fall = 3
discovery = "1s"

[weights]
decay = "3s"
slow_start = "5s"

[alerts]
notify = ["/bin/sh", "-c", "cat >> EVENTS"]

[[service]]
match = "tcp:203.0.113.20:80"
[service.check]
type = "http"
path = "/health"
body = "ok"
"#;

fn main() -> Result<()> {
    println!("[demo] building the topology: director 192.0.2.1 and real servers 192.0.2.10-13 on one bridge");
    let lan = Lan::new(4)?;
    let rs = |i: usize| Lan::server_addr(i);
    let vip = Ipv4Addr::new(203, 0, 113, 20);
    let mut listeners = Vec::new();
    let mut http_servers = Vec::new();
    for i in [0, 1, 3] {
        listeners.push(lan.servers[i].listen(SocketAddrV4::new(rs(i), 80))?);
    }
    for i in [0, 1] {
        // Direct routing: the real server holds the VIP on lo.
        lan.servers[i].ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])?;
        for key in [
            "net.ipv4.conf.all.arp_ignore",
            "net.ipv4.conf.all.arp_announce",
        ] {
            lan.servers[i].sysctl(key, if key.ends_with("ignore") { "1" } else { "2" })?;
        }
        let server = HttpServer::serve(lan.servers[i].listen(SocketAddrV4::new(vip, 80))?);
        server.route("/health", Route::ok("ok"));
        http_servers.push(server);
    }
    lan.servers[1].netem(LAN_IF, &["delay", "40ms"])?;
    println!("[demo] rs0 fast; rs1 +40 ms (netem); rs2 refuses (nothing on :80); rs3 fine until it is black-holed at {} s", BLACKHOLE_AT.as_secs());

    lan.ipvsadm(&["-A", "-t", NAT_VS, "-s", "wrr"])?;
    for i in 0..4 {
        lan.ipvsadm(&[
            "-a",
            "-t",
            NAT_VS,
            "-r",
            &format!("{}:80", rs(i)),
            "-m",
            "-w",
            "100",
        ])?;
    }
    lan.ipvsadm(&["-A", "-t", DR_VS, "-s", "wrr"])?;
    for i in [0, 1] {
        lan.ipvsadm(&[
            "-a",
            "-t",
            DR_VS,
            "-r",
            &format!("{}:80", rs(i)),
            "-g",
            "-w",
            "100",
        ])?;
    }
    println!("[demo] IPVS before prober (ipvsadm -Ln):");
    print!("{}", lan.ipvsadm(&["-Ln"])?);

    let config_path = std::env::temp_dir().join(format!("{}.toml", unique_name("demo-")));
    let events_path = std::env::temp_dir().join(format!("{}.jsonl", unique_name("demo-events-")));
    let config = CONFIG.replace("EVENTS", &events_path.display().to_string());
    std::fs::write(&config_path, &config)?;
    println!("[demo] config {}:\n{config}", config_path.display());
    let pin_dir = PinDir::new();
    println!(
        "[demo] prober run --iface {LAN_IF} --config {} (in the director's namespace)",
        config_path.display()
    );
    let mut daemon = Daemon::start_with(
        &lan.director,
        LAN_IF,
        &pin_dir,
        &["--config", config_path.to_str().context("path")?],
    )?;

    let started = Instant::now();
    let mut previous: HashMap<String, serde_json::Value> = HashMap::new();
    let mut came_back = false;
    let mut black_holed = false;
    let mut failed_check = false;
    while started.elapsed() < RUN_FOR {
        thread::sleep(Duration::from_secs(1));
        if !black_holed && started.elapsed() >= BLACKHOLE_AT {
            lan.servers[3].ip(&["route", "add", "blackhole", "192.0.2.1/32"])?;
            black_holed = true;
            println!(
                "\n[demo] rs3 is black-holed (its replies are dropped): the whole host is gone"
            );
        }
        if !came_back && started.elapsed() >= COMEBACK_AT {
            listeners.push(lan.servers[2].listen(SocketAddrV4::new(rs(2), 80))?);
            came_back = true;
            println!("\n[demo] rs2 starts listening on :80: it comes back through slow start");
        }
        if !failed_check && started.elapsed() >= CHECK_FAILS_AT {
            http_servers[1].route(
                "/health",
                Route {
                    status: 503,
                    body: "maintenance".into(),
                    pause: Duration::ZERO,
                },
            );
            failed_check = true;
            println!("\n[demo] rs1's HTTP health page on the VIP answers 503: the DR service takes it out, the NAT service keeps it");
        }
        print_table(&lan, &pin_dir, started.elapsed(), &mut previous)?;
    }

    println!("\n[demo] IPVS after {} s (ipvsadm -Ln):", RUN_FOR.as_secs());
    print!("{}", lan.ipvsadm(&["-Ln"])?);
    let log = daemon.log();
    println!("[demo] what prober logged about real servers and weights:");
    for line in log.lines().filter(|l| {
        l.contains("real server")
            || l.contains("check DOWN")
            || l.contains("check UP")
            || l.contains("PANIC")
            || l.contains("set weight")
    }) {
        println!(
            "  {}",
            line.split_once("Z ").map_or(line, |(_, rest)| rest).trim()
        );
    }
    println!("[demo] alerts (one per root cause; notify command's input):");
    for line in std::fs::read_to_string(&events_path)
        .unwrap_or_default()
        .lines()
    {
        let event: serde_json::Value = serde_json::from_str(line)?;
        println!(
            "  {:<16} {}",
            event["kind"].as_str().unwrap_or_default(),
            event["message"].as_str().unwrap_or_default()
        );
    }
    let events: Vec<serde_json::Value> = std::fs::read_to_string(&events_path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect();
    daemon.stop(libc::SIGTERM)?;
    println!("[demo] prober stopped (SIGTERM)");
    check_what_the_readme_says(&lan, &events, &log)
}

/// The README ("What the demo shows") promises these outcomes: the demo
/// fails when any of them did not happen.
fn check_what_the_readme_says(lan: &Lan, events: &[serde_json::Value], log: &str) -> Result<()> {
    let nat = lan.weights(NAT_VS)?;
    let dr = lan.weights(DR_VS)?;
    let rs = |i: usize| format!("{}:80", Lan::server_addr(i));
    let alert = |kind: &str, about: &str| {
        events
            .iter()
            .any(|e| e["kind"] == kind && e["message"].as_str().is_some_and(|m| m.contains(about)))
    };
    let promises = [
        (
            "the black-holed rs3 is out of the NAT service",
            nat[&rs(3)] == 0,
        ),
        (
            "the fast rs0 keeps its full weight",
            nat[&rs(0)] == 100 && dr[&rs(0)] == 100,
        ),
        (
            "the slow rs1 weighs less than rs0 in the NAT service",
            nat[&rs(1)] > 0 && nat[&rs(1)] < nat[&rs(0)],
        ),
        (
            "rs2 came back into service after it started listening",
            nat[&rs(2)] > 0,
        ),
        (
            "rs1 left the direct-routing service when its HTTP check failed",
            dr[&rs(1)] == 0,
        ),
        (
            "one L3 alert names rs3 as down",
            alert("host_down", "192.0.2.13 down at L3"),
        ),
        (
            "one L7 alert names rs1's HTTP check",
            alert("check_down", "192.0.2.11:80"),
        ),
        (
            "no pool failed open",
            !log.contains("PANIC") && !log.contains("director-side fault"),
        ),
    ];
    println!("[demo] what the README says the demo shows:");
    let mut broken = 0;
    for (promise, held) in promises {
        println!("  [{}] {promise}", if held { "ok" } else { "FAILED" });
        broken += usize::from(!held);
    }
    if broken > 0 {
        anyhow::bail!("{broken} of the README's promises did not hold (NAT {nat:?}, DR {dr:?})");
    }
    println!("[demo] done: every promise held");
    Ok(())
}

/// One row per real server of each service: what the probe saw in the last
/// second and the weight in IPVS.
fn print_table(
    lan: &Lan,
    pin_dir: &PinDir,
    at: Duration,
    previous: &mut HashMap<String, serde_json::Value>,
) -> Result<()> {
    let out = run(Command::new(prober_bin())
        .arg("--pin-dir")
        .arg(&**pin_dir)
        .args(["stats", "--json"]))?;
    let stats: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let by_probe: HashMap<String, serde_json::Value> = stats["targets"]
        .as_array()
        .map(|ts| {
            ts.iter()
                .map(|t| {
                    (
                        t["probe"].as_str().unwrap_or_default().to_string(),
                        t.clone(),
                    )
                })
                .collect()
        })
        .unwrap_or_default();
    println!("\n[demo] t = {:>4.1} s", at.as_secs_f64());
    println!(
        "  {:<22} {:<16} {:<34} {:<10} {:>9} {:>7}",
        "service", "real server", "probe", "seen (1 s)", "last RTT", "weight"
    );
    for (vs, dr) in [(NAT_VS, false), (DR_VS, true)] {
        for (dest, weight) in lan.weights(vs)? {
            let addr = dest.trim_end_matches(":80");
            let probe = if dr {
                format!("tcp:{vs},dr={addr}")
            } else {
                format!("tcp:{dest}")
            };
            let (seen, rtt) = match by_probe.get(&probe) {
                Some(t) => {
                    let delta = |f: &str| {
                        t[f].as_u64().unwrap_or(0)
                            - previous
                                .get(&probe)
                                .and_then(|p| p[f].as_u64())
                                .unwrap_or(0)
                    };
                    let seen = if delta("answered") > 0 {
                        "answers"
                    } else if delta("refused") > 0 {
                        "REFUSED"
                    } else if delta("timed_out") > 0 {
                        "NO REPLY"
                    } else {
                        "-"
                    };
                    let rtt = t["last_rtt_ns"].as_u64().unwrap_or(0);
                    (
                        seen,
                        if rtt == 0 {
                            "-".to_string()
                        } else {
                            format!("{:.1} ms", rtt as f64 / 1e6)
                        },
                    )
                }
                None => ("-", "-".to_string()),
            };
            println!(
                "  {:<22} {:<16} {:<34} {:<10} {:>9} {:>7}",
                format!("TCP {vs}"),
                dest,
                probe,
                seen,
                rtt,
                weight
            );
        }
    }
    for (probe, t) in by_probe {
        previous.insert(probe, t);
    }
    Ok(())
}
