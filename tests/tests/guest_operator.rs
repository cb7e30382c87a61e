//! What an operator runs against the daemon, in the qemu guest with real
//! IPVS: `prober status --json` against IPVS and the pinned maps, the
//! Prometheus endpoint through a real Prometheus text parser, and reloads
//! (SIGHUP and `prober reload`), good and broken.

use std::{
    io::{Read, Write},
    net::{SocketAddrV4, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Output},
    thread,
    time::Duration,
};

use prober_tests::{prober_bin, unique_name, wait_for, Daemon, Lan, PinDir, LAN_IF};

const VS: &str = "203.0.113.10:80";
const METRICS: &str = "127.0.0.1:9464";

fn config_text(interval: &str) -> String {
    format!(
        r#"
[daemon]
interval = "{interval}"
discovery = "1s"

[weights]
latency_aware = false
panic_threshold = 0.0

[metrics]
listen = "{METRICS}"
"#
    )
}

fn write_config(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
}

/// Two NAT real servers listening, both at weight 100.
fn service() -> (Lan, Vec<std::net::TcpListener>) {
    let lan = Lan::new(2).unwrap();
    let listeners = (0..2)
        .map(|i| {
            lan.servers[i]
                .listen(SocketAddrV4::new(Lan::server_addr(i), 80))
                .unwrap()
        })
        .collect();
    lan.ipvsadm(&["-A", "-t", VS, "-s", "wrr"]).unwrap();
    for i in 0..2 {
        let rs = format!("{}:80", Lan::server_addr(i));
        lan.ipvsadm(&["-a", "-t", VS, "-r", &rs, "-m", "-w", "100"])
            .unwrap();
    }
    (lan, listeners)
}

fn prober(pin_dir: &Path, args: &[&str]) -> Output {
    Command::new(prober_bin())
        .arg("--pin-dir")
        .arg(pin_dir)
        .args(args)
        .output()
        .unwrap()
}

fn status(pin_dir: &Path) -> serde_json::Value {
    let out = prober(pin_dir, &["status", "--json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn start(lan: &Lan, pin_dir: &PinDir, config: &Path) -> Daemon {
    Daemon::start_with(
        &lan.director,
        LAN_IF,
        pin_dir,
        &["--config", config.to_str().unwrap()],
    )
    .unwrap()
}

fn temp_config() -> PathBuf {
    std::env::temp_dir().join(format!("{}.toml", unique_name("prober-op-")))
}

#[test]
fn status_json_matches_ipvs_and_the_maps() {
    let (lan, _listeners) = service();
    let config = temp_config();
    write_config(&config, &config_text("200ms"));
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    thread::sleep(Duration::from_secs(2));
    // One real server's weight changed by hand: status shows IPVS's.
    let rs1 = format!("{}:80", Lan::server_addr(1));
    lan.ipvsadm(&["-e", "-t", VS, "-r", &rs1, "-m", "-w", "60"])
        .unwrap();
    // Seen at the next discovery (1 s here, later if the emulator lags).
    let ipvs_weight_of = |s: &serde_json::Value, server: &str| {
        s["services"][0]["servers"]
            .as_array()
            .and_then(|servers| servers.iter().find(|x| x["server"] == server))
            .and_then(|x| x["weight"]["ipvs"].as_u64())
    };
    wait_for(Duration::from_secs(30), || {
        Ok((ipvs_weight_of(&status(&pin_dir), &rs1) == Some(60)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));

    let before = daemon.stats().unwrap();
    let s = status(&pin_dir);
    let after = daemon.stats().unwrap();
    let ipvs = lan.weights(VS).unwrap();
    assert_eq!(s["interface"], LAN_IF);
    assert_eq!(s["interval_ms"], 200);
    let services = s["services"].as_array().unwrap();
    assert_eq!(services.len(), 1, "{s:#}");
    assert_eq!(services[0]["service"], format!("TCP {VS}"));
    let servers = services[0]["servers"].as_array().unwrap();
    assert_eq!(servers.len(), 2);
    for server in servers {
        let name = server["server"].as_str().unwrap();
        assert_eq!(
            server["weight"]["ipvs"].as_u64().unwrap(),
            ipvs[name] as u64,
            "{name}: IPVS weight"
        );
        assert_eq!(server["state"], "up");
        assert_eq!(server["forwarding"], "masq");
        assert_eq!(server["l3"], "up", "the host's ICMP probe");
        let probe = &server["l4"];
        let probe_name = format!("tcp:{name}");
        assert_eq!(probe["probe"], probe_name.as_str());
        // The maps, read by `prober stats` just before and just after.
        let sent = probe["sent"].as_u64().unwrap();
        let field = |stats: &serde_json::Value, f: &str| prober_tests::field(stats, &probe_name, f);
        assert!(
            field(&before, "sent") <= sent && sent <= field(&after, "sent"),
            "{name}: sent {sent} between the maps' {} and {}",
            field(&before, "sent"),
            field(&after, "sent")
        );
        let answered = probe["answered"].as_u64().unwrap();
        assert!(field(&before, "answered") <= answered && answered <= field(&after, "answered"));
        let buckets: u64 = probe["rtt_log2_us"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b.as_u64().unwrap())
            .sum();
        assert_eq!(buckets, answered, "{name}: every answer in the histogram");
        // The percentiles come from that histogram (bucket i holds RTTs
        // of 2^i to 2^(i+1) us): within its occupied buckets. A LAN's
        // median is far below 50 ms; its p99 may catch one stall of the
        // emulator, so it is only held to the histogram.
        let p50 = server["rtt"]["active_p50_ms"].as_f64().unwrap();
        let p99 = server["rtt"]["active_p99_ms"].as_f64().unwrap();
        let occupied: Vec<usize> = probe["rtt_log2_us"]
            .as_array()
            .unwrap()
            .iter()
            .enumerate()
            .filter(|(_, n)| n.as_u64() > Some(0))
            .map(|(i, _)| i)
            .collect();
        let lowest_ms = match occupied[0] {
            0 => 0.0,
            i => (1u64 << i) as f64 / 1000.0,
        };
        let highest_ms = (1u64 << (occupied[occupied.len() - 1] + 1)) as f64 / 1000.0;
        assert!(
            lowest_ms <= p50 && p50 <= p99 && p99 <= highest_ms && p50 < 50.0,
            "{name}: p50 {p50} p99 {p99}, histogram {:?}",
            probe["rtt_log2_us"]
        );
        println!(
            "{name}: weight cfg {} / computed {} / ipvs {}, sent {sent}, rtt p50 {p50:.2} ms p99 {p99:.2} ms",
            server["weight"]["configured"], server["weight"]["computed"], server["weight"]["ipvs"]
        );
    }
    let manual = servers
        .iter()
        .find(|s| s["server"] == rs1.as_str())
        .unwrap();
    assert_eq!(manual["weight"]["configured"], 60, "taken as configured");
    assert!(s["datapath"]["packets"].as_u64().unwrap() >= after["packets"].as_u64().unwrap() / 2);

    // bpftool prints the pinned maps with field names (BTF).
    for map in ["WEIGHT_STATE", "AGENTS"] {
        let out = Command::new("bpftool")
            .args(["map", "dump", "pinned"])
            .arg(pin_dir.join(map))
            .output()
            .unwrap();
        let dump = String::from_utf8_lossy(&out.stdout);
        println!(
            "# bpftool map dump pinned {}/{map}\n{dump}",
            pin_dir.display()
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let field = if map == "AGENTS" {
            "\"last_ns\""
        } else {
            "\"configured\""
        };
        assert!(dump.contains(field), "{map}: {dump}");
    }

    // The table says the same, and names the columns.
    let table = String::from_utf8(prober(&pin_dir, &["status"]).stdout).unwrap();
    println!("{table}");
    assert!(table.contains(&format!("TCP {VS}")) && table.contains("weight cfg/cmp/ipvs"));
    assert!(table.contains(&rs1));
}

/// GET /metrics from inside the director's namespace.
fn scrape(lan: &Lan) -> (String, String) {
    lan.director
        .enter(|| {
            let mut stream = TcpStream::connect(METRICS).unwrap();
            stream
                .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            let mut answer = String::new();
            stream.read_to_string(&mut answer).unwrap();
            let (head, body) = answer.split_once("\r\n\r\n").unwrap();
            (head.to_string(), body.to_string())
        })
        .unwrap()
}

#[test]
fn the_metrics_endpoint_serves_valid_exposition_text() {
    let (lan, _listeners) = service();
    let config = temp_config();
    write_config(&config, &config_text("200ms"));
    let pin_dir = PinDir::new();
    let _daemon = start(&lan, &pin_dir, &config);
    thread::sleep(Duration::from_secs(2));
    let (head, body) = scrape(&lan);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.contains("application/openmetrics-text"), "{head}");
    assert!(body.ends_with("# EOF\n"), "OpenMetrics ends with # EOF");
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape =
        prometheus_parse::Scrape::parse(lines).expect("a Prometheus text parser accepts it");
    for line in body.lines().filter(|l| !l.starts_with('#')) {
        assert!(
            matches!(
                prometheus_parse::LineInfo::parse(line),
                prometheus_parse::LineInfo::Sample { .. }
            ),
            "not a sample line: {line}"
        );
    }
    let find = |name: &str, labels: &[(&str, &str)]| {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .unwrap_or_else(|| panic!("no {name} {labels:?} in:\n{body}"))
    };
    let service = format!("TCP {VS}");
    for i in 0..2 {
        let server = format!("{}:80", Lan::server_addr(i));
        let healthy = find(
            "prober_real_server_healthy",
            &[("service", &service), ("server", &server)],
        );
        assert!(matches!(healthy.value, prometheus_parse::Value::Gauge(v) if v == 1.0));
        let weight = find(
            "prober_real_server_weight",
            &[
                ("service", &service),
                ("server", &server),
                ("source", "ipvs"),
            ],
        );
        assert!(matches!(weight.value, prometheus_parse::Value::Gauge(v) if v == 100.0));
        let probe = format!("tcp:{server}");
        let sent = find("prober_probes_sent_total", &[("probe", &probe)]);
        assert!(
            matches!(sent.value, prometheus_parse::Value::Counter(v) | prometheus_parse::Value::Untyped(v) if v >= 5.0),
            "{sent:?}"
        );
        // The RTT histogram: cumulative buckets ending at +Inf = the count.
        let histogram = find("prober_probe_rtt_seconds", &[("probe", &probe)]);
        assert!(matches!(
            histogram.value,
            prometheus_parse::Value::Histogram(_)
        ));
        let buckets: Vec<f64> = body
            .lines()
            .filter(|l| {
                l.starts_with("prober_probe_rtt_seconds_bucket{")
                    && l.contains(&format!("probe=\"{probe}\""))
            })
            .map(|l| l.rsplit(' ').next().unwrap().parse().unwrap())
            .collect();
        assert_eq!(buckets.len(), 24, "one per log2 bucket");
        assert!(
            buckets.windows(2).all(|w| w[0] <= w[1]),
            "cumulative: {buckets:?}"
        );
        let last = *buckets.last().unwrap();
        let count_line = format!("prober_probe_rtt_seconds_count{{probe=\"{probe}\"}} ");
        let count: f64 = body
            .lines()
            .find_map(|l| l.strip_prefix(&count_line))
            .unwrap_or_else(|| panic!("no {count_line} in:\n{body}"))
            .trim()
            .parse()
            .unwrap();
        assert_eq!(count, last, "+Inf bucket = count");
        assert!(count >= 5.0, "{count} answers");
    }
    for name in [
        "prober_weight_writes_total",
        "prober_netlink_errors_total",
        "prober_xdp_runs_total",
        "prober_probe_tx_runs_total",
        "prober_up",
    ] {
        find(name, &[]);
    }
    println!(
        "{} samples in {} families, e.g. {}",
        scrape.samples.len(),
        scrape.docs.len(),
        body.lines()
            .find(|l| l.starts_with("prober_probe_rtt_seconds_bucket"))
            .unwrap()
    );
}

fn weight_writes(daemon: &Daemon) -> usize {
    daemon.log().matches("set weight").count()
}

#[test]
fn reload_applies_a_new_interval_without_writing_weights_and_refuses_a_broken_file() {
    let (lan, mut listeners) = service();
    let config = temp_config();
    write_config(&config, &config_text("200ms"));
    let pin_dir = PinDir::new();
    let mut daemon = start(&lan, &pin_dir, &config);
    thread::sleep(Duration::from_secs(2));
    assert_eq!(weight_writes(&daemon), 0, "{}", daemon.log());
    let health_before = status(&pin_dir);

    // SIGHUP with a new interval.
    write_config(&config, &config_text("500ms"));
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    wait_for(Duration::from_secs(5), || {
        Ok((status(&pin_dir)["interval_ms"] == 500).then_some(()))
    })
    .unwrap();
    let sent = |s: &serde_json::Value| {
        s["services"][0]["servers"][0]["l4"]["sent"]
            .as_u64()
            .unwrap()
    };
    let first = status(&pin_dir);
    thread::sleep(Duration::from_secs(3));
    let second = status(&pin_dir);
    let rate = (sent(&second) - sent(&first)) as f64 / 3.0;
    println!(
        "after SIGHUP: interval {} ms, {rate:.1} probes/s to one server (was 5/s)",
        second["interval_ms"]
    );
    assert!(rate <= 3.0, "{rate} probes/s at a 500 ms interval");
    assert_eq!(
        weight_writes(&daemon),
        0,
        "a reload writes no unchanged weight: {}",
        daemon.log()
    );
    assert!(
        daemon.log().contains("reload: configuration"),
        "{}",
        daemon.log()
    );
    for (a, b) in health_before["services"][0]["servers"]
        .as_array()
        .unwrap()
        .iter()
        .zip(second["services"][0]["servers"].as_array().unwrap())
    {
        assert_eq!(a["l4"]["state"], b["l4"]["state"], "health kept");
        assert!(
            sent(&second) > 0 && b["l4"]["sent"].as_u64() >= a["l4"]["sent"].as_u64(),
            "counters kept"
        );
    }

    // A broken file: SIGHUP and `prober reload` both refuse it, naming
    // file and line; the running configuration stays.
    write_config(&config, "[daemon]\ninterval = \"200ms\"\nfall = 0\n");
    unsafe { libc::kill(daemon.child.id() as i32, libc::SIGHUP) };
    let path = config.display().to_string();
    wait_for(Duration::from_secs(5), || {
        Ok(daemon.log().contains("reload refused").then_some(()))
    })
    .unwrap();
    let log = daemon.log();
    let refused = log.lines().find(|l| l.contains("reload refused")).unwrap();
    assert!(
        refused.contains(&path) && refused.contains("line 3"),
        "{refused}"
    );
    println!("SIGHUP, broken file: {refused}");
    let out = prober(&pin_dir, &["reload"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("reload refused") && err.contains("line 3"),
        "{err}"
    );
    println!("prober reload, broken file: {}", err.trim());
    assert_eq!(
        status(&pin_dir)["interval_ms"],
        500,
        "old configuration kept"
    );
    assert_eq!(weight_writes(&daemon), 0);

    // Fixed again: `prober reload` applies it.
    write_config(&config, &config_text("200ms"));
    let out = prober(&pin_dir, &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(status(&pin_dir)["interval_ms"], 200);

    // A server down (weight 0 written), then the service left alone by a
    // reload: IPVS gets its configured weight back, not prober's 0.
    let rs1 = format!("{}:80", Lan::server_addr(1));
    listeners.truncate(1);
    wait_for(Duration::from_secs(10), || {
        Ok((lan.weights(VS)?[&rs1] == 0).then_some(()))
    })
    .unwrap();
    write_config(
        &config,
        &format!(
            "{}\n[[service]]\nmatch = \"tcp:{VS}\"\nprobe = \"none\"\n",
            config_text("200ms")
        ),
    );
    let out = prober(&pin_dir, &["reload"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    wait_for(Duration::from_secs(10), || {
        Ok((lan.weights(VS)?[&rs1] == 100).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
    assert!(daemon
        .log()
        .contains("no longer managed: weight 0 back to its configured 100"));
    println!("probe = \"none\" by reload: {rs1} back to its configured weight 100");
    assert_eq!(daemon.stop(libc::SIGTERM).unwrap().code(), Some(0));
}

#[test]
fn destinations_prober_cannot_probe_are_warned_about_and_shown_unchecked() {
    let (lan, _listeners) = service();
    // An IPv6 NAT service and a GUE-tunnelled real server: neither is
    // probed yet, and the operator must be told so.
    lan.ipvsadm(&["-A", "-t", "[2001:db8::1]:80", "-s", "wrr"])
        .unwrap();
    lan.ipvsadm(&[
        "-a",
        "-t",
        "[2001:db8::1]:80",
        "-r",
        "[2001:db8::10]:80",
        "-m",
        "-w",
        "100",
    ])
    .unwrap();
    lan.ipvsadm(&[
        "-a",
        "-t",
        VS,
        "-r",
        "192.0.2.20:80",
        "-i",
        "--tun-type",
        "gue",
        "--tun-port",
        "6080",
        "-w",
        "100",
    ])
    .unwrap();
    let config = temp_config();
    write_config(&config, &config_text("200ms"));
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    let unchecked = wait_for(Duration::from_secs(10), || {
        let s = status(&pin_dir);
        let list = s["unchecked"].as_array().cloned().unwrap_or_default();
        Ok((list.len() == 2).then_some(list))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
    println!("{unchecked:#?}");
    let why = |server: &str| {
        unchecked
            .iter()
            .find(|u| u["server"].as_str().is_some_and(|s| s.contains(server)))
            .map(|u| u["why"].as_str().unwrap().to_string())
            .unwrap_or_else(|| panic!("{server} not unchecked: {unchecked:?}"))
    };
    assert!(why("2001:db8::10").contains("IPv6"));
    assert!(why("192.0.2.20").contains("GUE"));
    let log = daemon.log();
    let warnings: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("not probed, its weight left alone"))
        .collect();
    assert_eq!(warnings.len(), 2, "once each: {log}");
    let table = String::from_utf8(prober(&pin_dir, &["status"]).stdout).unwrap();
    assert_eq!(table.matches("UNCHECKED:").count(), 2, "{table}");
    // Several discoveries later, still warned only once each.
    thread::sleep(Duration::from_secs(3));
    let again = daemon
        .log()
        .lines()
        .filter(|l| l.contains("not probed, its weight left alone"))
        .count();
    assert_eq!(again, 2);
    assert_eq!(lan.weights(VS).unwrap()["192.0.2.20:80"], 100);
}

#[test]
fn ipvs_is_read_when_an_operator_changes_it_and_not_after_prober_s_own_writes() {
    // Three real servers listening, two of them in IPVS at first.
    let lan = Lan::new(3).unwrap();
    let mut listeners = lan.listen_everywhere(80);
    let rs = |i: usize| format!("{}:80", Lan::server_addr(i));
    lan.ipvsadm(&["-A", "-t", VS, "-s", "wrr"]).unwrap();
    for i in 0..2 {
        lan.ipvsadm(&["-a", "-t", VS, "-r", &rs(i), "-m", "-w", "100"])
            .unwrap();
    }
    // Periodic discovery an hour apart: whatever prober learns of IPVS
    // during the test, it learns from the kernel's change signal.
    let config = temp_config();
    write_config(
        &config,
        "[daemon]\ninterval = \"200ms\"\nrise = 1\nfall = 2\ndiscovery = \"1h\"\ndiagnose = false\n[weights]\nlatency_aware = false\npanic_threshold = 0.0\nslow_start = \"0s\"\n",
    );
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    let state_of = |s: &serde_json::Value, server: &str| {
        s["services"][0]["servers"]
            .as_array()
            .and_then(|servers| servers.iter().find(|x| x["server"] == server))
            .and_then(|x| x["state"].as_str().map(str::to_string))
    };
    wait_for(Duration::from_secs(60), || {
        let s = status(&pin_dir);
        Ok((0..2)
            .all(|i| state_of(&s, &rs(i)).as_deref() == Some("up"))
            .then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
    let counts = |s: &serde_json::Value| {
        (
            s["ipvs_dumps"].as_u64().unwrap(),
            s["ipvs_changes_signalled"]
                .as_u64()
                .unwrap_or_else(|| panic!("no change signal in the guest: {}", daemon.log())),
        )
    };
    let (dumps_at_start, signalled_at_start) = counts(&status(&pin_dir));
    assert_eq!(signalled_at_start, 0, "{}", daemon.log());

    // prober's own write (server 1 refuses, weight 0) is no change to
    // read back.
    listeners[1] = None;
    wait_for(Duration::from_secs(60), || {
        Ok((lan.weights(VS)?[&rs(1)] == 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
    let (dumps_after_own_write, signalled) = counts(&status(&pin_dir));
    assert_eq!(
        (dumps_after_own_write, signalled),
        (dumps_at_start, 0),
        "prober's own write read back as a change: {}",
        daemon.log()
    );

    // The operator adds server 2 and reweighs server 0: both are taken
    // without waiting for the hourly dump.
    lan.ipvsadm(&["-a", "-t", VS, "-r", &rs(2), "-m", "-w", "100"])
        .unwrap();
    lan.ipvsadm(&["-e", "-t", VS, "-r", &rs(0), "-m", "-w", "60"])
        .unwrap();
    let s = wait_for(Duration::from_secs(60), || {
        let s = status(&pin_dir);
        let configured = s["services"][0]["servers"]
            .as_array()
            .and_then(|servers| servers.iter().find(|x| x["server"] == rs(0).as_str()))
            .and_then(|x| x["weight"]["configured"].as_u64());
        Ok((state_of(&s, &rs(2)).as_deref() == Some("up") && configured == Some(60)).then_some(s))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
    let (dumps, signalled) = counts(&s);
    println!(
        "2 operator changes: {signalled} signalled, {} dumps after them ({dumps_at_start} before, none after prober's own write)",
        dumps - dumps_at_start
    );
    assert_eq!(signalled, 2, "{}", daemon.log());
    assert!(
        (1..=2).contains(&(dumps - dumps_at_start)),
        "one dump per tick that saw a change: {dumps_at_start} -> {dumps}"
    );
    let log = daemon.log();
    assert!(
        log.lines()
            .any(|l| l.contains("IPVS configuration changed") && l.contains("ipvsadm")),
        "{log}"
    );
    assert_eq!(lan.weights(VS).unwrap()[&rs(1)], 0, "{log}");
    drop(listeners);
}
