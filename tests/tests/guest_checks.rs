//! Layered checks against real IPVS in the qemu guest: L7 checks of real
//! HTTP servers in namespaces, one root-cause event when a host is
//! unplugged, a check reaching the VIP on a direct-routing real server, and
//! agents whose tagged reports move weights until they fall silent while
//! forged and replayed ones move nothing.

use std::{
    net::{SocketAddrV4, UdpSocket},
    path::{Path, PathBuf},
    process::{Child, Stdio},
    thread,
    time::{Duration, Instant},
};

use prober_tests::{
    field, find_target,
    http::{HttpServer, Route},
    prober_bin, unique_name, wait_for, Daemon, Lan, PinDir, LAN_IF,
};

const FAST: &str = r#"
[daemon]
interval = "200ms"
rise = 2
fall = 3
discovery = "1s"

[weights]
latency_aware = false
slow_start = "0s"
panic_threshold = 0.0
"#;

fn temp_path(prefix: &str, extension: &str) -> PathBuf {
    std::env::temp_dir().join(format!("{}.{extension}", unique_name(prefix)))
}

fn start(lan: &Lan, pin_dir: &PinDir, config_text: &str) -> Daemon {
    let path = temp_path("prober-config-", "toml");
    std::fs::write(&path, config_text).unwrap();
    Daemon::start_with(
        &lan.director,
        LAN_IF,
        pin_dir,
        &["--config", path.to_str().unwrap()],
    )
    .unwrap()
}

fn http_server(lan: &Lan, i: usize, addr: std::net::Ipv4Addr) -> HttpServer {
    HttpServer::serve(lan.servers[i].listen(SocketAddrV4::new(addr, 80)).unwrap())
}

fn weight(lan: &Lan, service: &str, rs: &str) -> u32 {
    lan.weights(service).unwrap()[rs]
}

fn wait_weight(lan: &Lan, service: &str, rs: &str, want: u32, limit: Duration) -> Duration {
    let started = Instant::now();
    wait_for(limit, || {
        Ok((weight(lan, service, rs) == want).then_some(()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{service} {rs}: weight {} not {want}: {e}",
            weight(lan, service, rs)
        )
    });
    started.elapsed()
}

const SERVICES: [&str; 4] = [
    "203.0.113.10:80",
    "203.0.113.11:80",
    "203.0.113.12:80",
    "203.0.113.13:80",
];

#[test]
fn wrong_status_missing_substring_and_slow_body_each_take_down_only_their_service() {
    let lan = Lan::new(1).unwrap();
    let rs = format!("{}:80", Lan::server_addr(0));
    let server = http_server(&lan, 0, Lan::server_addr(0));
    server.route("/a", Route::ok("fine"));
    server.route("/b", Route::ok("status: ready"));
    server.route("/c", Route::ok("quick"));
    for vs in SERVICES {
        lan.ipvsadm(&["-A", "-t", vs, "-s", "wrr"]).unwrap();
        lan.ipvsadm(&["-a", "-t", vs, "-r", &rs, "-m", "-w", "100"])
            .unwrap();
    }
    // Three services share one real server, each with its own check; the
    // fourth has only the L4 probe.
    let check = |vs: &str, extra: &str| {
        format!(
            "[[service]]\nmatch = \"tcp:{vs}\"\n[[service.check]]\ntype = \"http\"\ninterval = \"300ms\"\ntimeout = \"250ms\"\n{extra}\n"
        )
    };
    let events_file = temp_path("prober-events-", "jsonl");
    let config = format!(
        "{FAST}\n[alerts]\nnotify = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\n{}{}{}",
        events_file.display(),
        check(SERVICES[0], "path = \"/a\"\nstatus = [200]"),
        check(SERVICES[1], "path = \"/b\"\nbody = \"ready\""),
        check(SERVICES[2], "path = \"/c\"\nbody_regex = \"^qu\""),
    );
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    thread::sleep(Duration::from_secs(2));
    for vs in SERVICES {
        assert_eq!(weight(&lan, vs, &rs), 100, "{}", daemon.log());
    }
    let seen = server.seen();
    for path in ["/a", "/b", "/c"] {
        let hits: Vec<_> = seen.iter().filter(|s| s.path == path).collect();
        assert!(hits.len() >= 3, "{path} checked: {seen:?}");
        assert_eq!(
            hits[0].host, "192.0.2.10",
            "default Host: the address checked"
        );
    }

    let broken = [
        (
            "/a",
            Route {
                status: 500,
                body: "fine".into(),
                pause: Duration::ZERO,
            },
            "wrong status",
        ),
        ("/b", Route::ok("status: starting"), "missing substring"),
        (
            "/c",
            Route {
                status: 200,
                body: "quick".into(),
                pause: Duration::from_secs(2),
            },
            "slow body",
        ),
    ];
    for (i, (path, route, what)) in broken.into_iter().enumerate() {
        let healthy = server_route(path);
        server.route(path, route);
        let took = wait_weight(&lan, SERVICES[i], &rs, 0, Duration::from_secs(10));
        println!("{what}: {} at weight 0 after {took:?}", SERVICES[i]);
        // The alerts: that check down (host up), naming that service
        // only, and that service empty.
        let service = format!("TCP {}", SERVICES[i]);
        let found = wait_for(Duration::from_secs(5), || {
            let seen = events(&events_file);
            let down = seen.iter().find(|e| {
                e["kind"] == "check_down" && e["message"].as_str().unwrap().contains(path)
            });
            let empty = seen
                .iter()
                .any(|e| e["kind"] == "service_empty" && e["subject"] == service.as_str());
            Ok(down.filter(|_| empty).cloned())
        })
        .unwrap_or_else(|e| panic!("{what}: {e}: {:#?}", events(&events_file)));
        assert_eq!(found["services"], serde_json::json!([service]), "{what}");
        assert_eq!(found["layer"], "L7");
        println!("{what}: event: {}", found["message"].as_str().unwrap());
        for (j, other) in SERVICES.iter().enumerate() {
            if j != i {
                assert_eq!(
                    weight(&lan, other, &rs),
                    100,
                    "{what} on {path} moved {other}: {}",
                    daemon.log()
                );
            }
        }
        server.route(path, healthy);
        wait_weight(&lan, SERVICES[i], &rs, 100, Duration::from_secs(10));
    }
    let log = daemon.log();
    assert!(log.contains("HTTP status 500, expected 200"), "{log}");
    assert!(log.contains("body has no \"ready\""), "{log}");
    assert!(log.contains("no answer within 250ms"), "{log}");
}

/// The healthy answer of each path in the test above.
fn server_route(path: &str) -> Route {
    match path {
        "/a" => Route::ok("fine"),
        "/b" => Route::ok("status: ready"),
        _ => Route::ok("quick"),
    }
}

fn events(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

#[test]
fn an_unplugged_host_is_one_root_cause_event_naming_every_service() {
    let lan = Lan::new(2).unwrap();
    let servers: Vec<HttpServer> = (0..2)
        .map(|i| http_server(&lan, i, Lan::server_addr(i)))
        .collect();
    for s in &servers {
        s.route("/health", Route::ok("ok"));
    }
    let services = &SERVICES[..3];
    for vs in services {
        lan.ipvsadm(&["-A", "-t", vs, "-s", "wrr"]).unwrap();
        for i in 0..2 {
            let rs = format!("{}:80", Lan::server_addr(i));
            lan.ipvsadm(&["-a", "-t", vs, "-r", &rs, "-m", "-w", "100"])
                .unwrap();
        }
    }
    // The webhook receiver, inside the director's namespace.
    let hook = HttpServer::serve(
        lan.director
            .enter(|| std::net::TcpListener::bind("127.0.0.1:8099"))
            .unwrap()
            .unwrap(),
    );
    hook.route("/hook", Route::ok(""));
    let events_file = temp_path("prober-events-", "jsonl");
    let config = format!(
        "{FAST}\n[alerts]\nnotify = [\"/bin/sh\", \"-c\", \"cat >> {}\"]\nwebhook = \"http://127.0.0.1:8099/hook\"\n\
         [[service]]\nmatch = \"tcp:{}\"\n[service.check]\ntype = \"http\"\npath = \"/health\"\ntimeout = \"150ms\"\n\
         [[service]]\nmatch = \"tcp:{}\"\n[service.check]\ntype = \"tcp\"\n",
        events_file.display(),
        services[0],
        services[1]
    );
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    // Each host's L3 probe answers once, then rests while its checks
    // answer; the TCP probes go on.
    let l3 = |i: usize| format!("icmp:{}", Lan::server_addr(i));
    let tcp = format!("tcp:{}", Lan::server_addr(0));
    let paused = |stats: &serde_json::Value, i: usize| {
        find_target(stats, &l3(i)).is_some_and(|t| t["paused"] == true)
    };
    let rested = wait_for(Duration::from_secs(20), || {
        let stats = daemon.stats()?;
        Ok((paused(&stats, 0) && paused(&stats, 1)).then_some(stats))
    })
    .unwrap_or_else(|e| panic!("L3 probes paused: {e}\n{}", daemon.log()));
    thread::sleep(Duration::from_secs(2)); // ten intervals
    let stats = daemon.stats().unwrap();
    for i in 0..2 {
        assert_eq!(
            field(&stats, &l3(i), "sent"),
            field(&rested, &l3(i), "sent"),
            "{} paused sends nothing: {stats}",
            l3(i)
        );
        assert!(field(&stats, &l3(i), "answered") > 0, "answered once");
    }
    let tcp_sent = |stats: &serde_json::Value| {
        stats["targets"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|t| t["probe"].as_str().unwrap().starts_with(&tcp))
            .map(|t| t["sent"].as_u64().unwrap())
            .sum::<u64>()
    };
    assert!(
        tcp_sent(&stats) >= tcp_sent(&rested) + 5,
        "the checks go on"
    );
    assert!(events(&events_file).is_empty(), "no events while healthy");

    lan.servers[0].ip(&["link", "set", LAN_IF, "down"]).unwrap();
    let unplugged = Instant::now();
    let rs0 = format!("{}:80", Lan::server_addr(0));
    for vs in services {
        wait_weight(&lan, vs, &rs0, 0, Duration::from_secs(10));
    }
    wait_for(Duration::from_secs(10), || {
        Ok((!events(&events_file).is_empty()).then_some(()))
    })
    .unwrap();
    println!("first event {:?} after unplugging", unplugged.elapsed());
    // Time for any per-service event to show up, were there one.
    thread::sleep(Duration::from_secs(3));
    let seen = events(&events_file);
    assert_eq!(
        seen.len(),
        1,
        "one event for one cause: {seen:#?}\n{}",
        daemon.log()
    );
    let event = &seen[0];
    assert_eq!(event["kind"], "host_down");
    assert_eq!(event["subject"], "192.0.2.10");
    let named: Vec<&str> = event["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    let expected: Vec<String> = services.iter().map(|s| format!("TCP {s}")).collect();
    assert_eq!(named, expected, "every affected service");
    let message = event["message"].as_str().unwrap();
    assert!(
        message.starts_with("RS 192.0.2.10 down at L3") && message.contains("3 services affected"),
        "{message}"
    );
    println!("event: {message}");
    for vs in services {
        assert_eq!(
            weight(&lan, vs, &format!("{}:80", Lan::server_addr(1))),
            100
        );
    }
    // The webhook got the same event.
    let posted = wait_for(Duration::from_secs(5), || {
        Ok(hook.seen().into_iter().find(|s| s.path == "/hook"))
    })
    .unwrap();
    assert_eq!(posted.method, "POST");
    let body: serde_json::Value = serde_json::from_str(&posted.body).unwrap();
    assert_eq!(body["kind"], "host_down");
    assert_eq!(body["services"].as_array().unwrap().len(), 3);
    // The dead host's L3 probe went out again to say so; the other rests.
    let stats = daemon.stats().unwrap();
    assert!(!paused(&stats, 0), "{stats}");
    assert!(field(&stats, &l3(0), "timed_out") >= 3, "{stats}");
    assert!(paused(&stats, 1), "{stats}");
    assert_eq!(daemon.status().unwrap()["l3_probes_paused"], 1);

    lan.servers[0].ip(&["link", "set", LAN_IF, "up"]).unwrap();
    for vs in services {
        wait_weight(&lan, vs, &rs0, 100, Duration::from_secs(15));
    }
    wait_for(Duration::from_secs(10), || {
        Ok((events(&events_file).len() >= 2).then_some(()))
    })
    .unwrap();
    thread::sleep(Duration::from_secs(1));
    let seen = events(&events_file);
    assert_eq!(seen.len(), 2, "{seen:#?}");
    assert_eq!(seen[1]["kind"], "host_up");
    // Back up, the host's L3 probe rests again.
    wait_for(Duration::from_secs(20), || {
        Ok(paused(&daemon.stats()?, 0).then_some(()))
    })
    .unwrap_or_else(|e| panic!("L3 probe paused again: {e}\n{}", daemon.log()));
}

#[test]
fn a_check_of_a_direct_routing_real_server_reaches_the_vip_on_it() {
    let lan = Lan::new(1).unwrap();
    let vip = "203.0.113.20";
    let service = format!("{vip}:80");
    let rs = format!("{}:80", Lan::server_addr(0));
    let host = &lan.servers[0];
    // The usual direct-routing real server: the VIP on lo, never answering
    // ARP for it; its service listens on the VIP only.
    host.ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])
        .unwrap();
    host.sysctl("net.ipv4.conf.all.arp_ignore", "1").unwrap();
    host.sysctl("net.ipv4.conf.all.arp_announce", "2").unwrap();
    let server = http_server(&lan, 0, vip.parse().unwrap());
    server.route("/dr", Route::ok("on the vip"));
    lan.director
        .ip(&["addr", "add", &format!("{vip}/32"), "dev", "lo"])
        .unwrap();
    lan.ipvsadm(&["-A", "-t", &service, "-s", "wrr"]).unwrap();
    lan.ipvsadm(&["-a", "-t", &service, "-r", &rs, "-g", "-w", "100"])
        .unwrap();
    let config = format!(
        "{FAST}\n[[service]]\nmatch = \"tcp:{service}\"\n[service.check]\ntype = \"http\"\npath = \"/dr\"\nbody = \"vip\"\n"
    );
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    wait_for(Duration::from_secs(10), || {
        Ok((server.seen().len() >= 3).then_some(()))
    })
    .unwrap_or_else(|e| panic!("the check never reached the VIP: {e}\n{}", daemon.log()));
    let seen = server.seen();
    assert_eq!(seen[0].host, vip, "Host: the VIP");
    assert_eq!(weight(&lan, &service, &rs), 100);
    assert!(!daemon.log().contains("check DOWN"), "{}", daemon.log());

    server.route(
        "/dr",
        Route {
            status: 503,
            body: "draining".into(),
            pause: Duration::ZERO,
        },
    );
    let took = wait_weight(&lan, &service, &rs, 0, Duration::from_secs(10));
    println!("503 on the VIP: weight 0 after {took:?}");
    server.route("/dr", Route::ok("on the vip"));
    wait_weight(&lan, &service, &rs, 100, Duration::from_secs(10));
    assert_eq!(host.half_open_connections().unwrap(), 0);
}

/// A `prober agent` process, killed on drop.
struct Agent(Child);

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn agent_weights_reach_ipvs_and_a_silent_agent_falls_back_to_active_checks() {
    let lan = Lan::new(3).unwrap();
    let vs = SERVICES[0];
    let _listeners: Vec<_> = (0..2)
        .map(|i| {
            lan.servers[i]
                .listen(SocketAddrV4::new(Lan::server_addr(i), 80))
                .unwrap()
        })
        .collect();
    lan.ipvsadm(&["-A", "-t", vs, "-s", "wrr"]).unwrap();
    for i in 0..2 {
        let rs = format!("{}:80", Lan::server_addr(i));
        lan.ipvsadm(&["-a", "-t", vs, "-r", &rs, "-m", "-w", "100"])
            .unwrap();
    }
    let rs0 = format!("{}:80", Lan::server_addr(0));
    let rs1 = format!("{}:80", Lan::server_addr(1));
    let key_file = temp_path("prober-agent-", "key");
    std::fs::write(&key_file, "00112233445566778899aabbccddeeff\n").unwrap();
    std::fs::set_permissions(
        &key_file,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let pin_dir = PinDir::new();
    let daemon = start(
        &lan,
        &pin_dir,
        &format!(
            "{FAST}\n[agent]\nport = 5555\ndeadline = \"1s\"\nkey_file = {:?}\n",
            key_file.display().to_string()
        ),
    );
    thread::sleep(Duration::from_millis(1500));

    let report = temp_path("prober-agent-", "txt");
    std::fs::write(&report, "up 37\n").unwrap();
    let agent = Agent(
        lan.servers[0]
            .command(prober_bin())
            .args([
                "agent",
                "--director",
                "192.0.2.1:5555",
                "--interval",
                "200ms",
            ])
            .arg("--from-file")
            .arg(&report)
            .arg("--key-file")
            .arg(&key_file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let took = wait_weight(&lan, vs, &rs0, 37, Duration::from_secs(10));
    println!("agent weight 37 in IPVS after {took:?}");
    // A weight the agent gives is written as it is, in one step.
    let writes_of_rs0 = |log: &str| -> Vec<String> {
        log.lines()
            .filter(|l| l.contains("set weight") && l.contains(&rs0))
            .map(|l| l.split_once("set weight ").unwrap().1.to_string())
            .collect()
    };
    let writes = writes_of_rs0(&daemon.log());
    assert!(
        writes.len() == 1 && writes[0].starts_with("100 -> 37"),
        "{writes:?}"
    );
    assert_eq!(weight(&lan, vs, &rs1), 100, "the other server is untouched");
    std::fs::write(&report, "drain\n").unwrap();
    wait_weight(&lan, vs, &rs0, 0, Duration::from_secs(10));
    std::fs::write(&report, "up 60\n").unwrap();
    wait_weight(&lan, vs, &rs0, 60, Duration::from_secs(10));

    let before_silence = writes_of_rs0(&daemon.log()).len();
    drop(agent);
    let silent = Instant::now();
    wait_weight(&lan, vs, &rs0, 100, Duration::from_secs(10));
    let took = silent.elapsed();
    println!("agent stopped: back to the configured weight after {took:?} (deadline 1 s)");
    let log = daemon.log();
    assert!(log.contains("agent silent"), "{log}");
    // Past the deadline the probe's own weight returns in latency steps
    // of at most max_step: 60 -> 85 -> 100, two writes.
    let after: Vec<String> = writes_of_rs0(&log)[before_silence..].to_vec();
    assert!(
        after.len() <= 2
            && after
                .last()
                .is_some_and(|w| w.starts_with("85 -> 100") || w.starts_with("60 -> 100")),
        "{after:?}"
    );

    // Forgeries from a real server's address: untagged reports (no
    // --key-file), a tag under another key, and a replay of an old report
    // of rs0's agent: refused, counted, no weight moves.
    let untagged = lan.servers[1]
        .command(prober_bin())
        .args(["agent", "--director", "192.0.2.1:5555"])
        .args(["--interval", "50ms", "--weight", "1", "--count", "3"])
        .status()
        .unwrap();
    assert!(untagged.success());
    let director = "192.0.2.1:5555".parse().unwrap();
    let up_1 = prober_user::agent::Report {
        state: 1,
        weight: 1,
    };
    let wrong_key = prober_user::agent::AgentKey([1, 2]);
    let forged = prober_user::agent::encode(
        up_1,
        u64::MAX,
        Some(wrong_key),
        Lan::server_addr(1),
        director,
    );
    let key = prober_user::agent::read_key(&key_file).unwrap();
    let replayed = prober_user::agent::encode(up_1, 1, Some(key), Lan::server_addr(0), director);
    for (i, datagram) in [(1, forged), (0, replayed)] {
        lan.servers[i]
            .enter(move || {
                let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
                socket.send_to(&datagram, "192.0.2.1:5555").unwrap();
            })
            .unwrap();
    }
    // A report from an address outside the pool, and a malformed one:
    // ignored, counted, no weight moves.
    let stranger = lan.servers[2]
        .command(prober_bin())
        .args([
            "agent",
            "--director",
            "192.0.2.1:5555",
            "--interval",
            "50ms",
        ])
        .args(["--weight", "1", "--count", "3"])
        .status()
        .unwrap();
    assert!(stranger.success());
    lan.servers[1]
        .enter(|| {
            let socket = UdpSocket::bind("0.0.0.0:0").unwrap();
            socket
                .send_to(b"PRAG not a report", "192.0.2.1:5555")
                .unwrap();
        })
        .unwrap();
    let stats = wait_for(Duration::from_secs(5), || {
        let stats = daemon.stats()?;
        Ok((stats["agent_unknown"] == 3
            && stats["agent_malformed"] == 1
            && stats["agent_unauthenticated"] == 4
            && stats["agent_replayed"] == 1)
            .then_some(stats))
    })
    .unwrap_or_else(|e| panic!("{e}: {:#}", daemon.stats().unwrap()));
    println!(
        "agent datagrams: {} recorded, {} malformed, {} from outside the pool, {} with a wrong tag, {} replayed",
        stats["agent_reports"],
        stats["agent_malformed"],
        stats["agent_unknown"],
        stats["agent_unauthenticated"],
        stats["agent_replayed"]
    );
    thread::sleep(Duration::from_millis(600));
    assert_eq!(weight(&lan, vs, &rs0), 100);
    assert_eq!(weight(&lan, vs, &rs1), 100);
}

#[test]
fn a_command_check_sets_the_weight_and_its_failure_takes_the_server_out() {
    let lan = Lan::new(2).unwrap();
    let vs = SERVICES[0];
    let _listeners: Vec<_> = (0..2)
        .map(|i| {
            lan.servers[i]
                .listen(SocketAddrV4::new(Lan::server_addr(i), 80))
                .unwrap()
        })
        .collect();
    lan.ipvsadm(&["-A", "-t", vs, "-s", "wrr"]).unwrap();
    for i in 0..2 {
        let rs = format!("{}:80", Lan::server_addr(i));
        lan.ipvsadm(&["-a", "-t", vs, "-r", &rs, "-m", "-w", "100"])
            .unwrap();
    }
    // The command prints what a file for its real server says, and fails
    // when the file holds "fail" (keepalived's MISC_CHECK with a weight).
    let dir = temp_path("prober-misc-", "d");
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..2 {
        std::fs::write(dir.join(Lan::server_addr(i).to_string()), "100\n").unwrap();
    }
    let script = format!(
        "answer=$(cat {}/$1); [ \"$answer\" != fail ] && echo \"weight=$answer\"",
        dir.display()
    );
    // A generous timeout: a shell's fork and exec in the emulated guest
    // took over a second on a loaded host (then the healthy server's
    // checks timed out); the failing one exits at once, so it costs nothing.
    let config = format!(
        "{FAST}\n[[service]]\nmatch = \"tcp:{vs}\"\n[service.check]\ntype = \"command\"\ncommand = [\"/bin/sh\", \"-c\", {script:?}, \"check\", \"{{address}}\"]\ninterval = \"300ms\"\ntimeout = \"10s\"\n"
    );
    let pin_dir = PinDir::new();
    let daemon = start(&lan, &pin_dir, &config);
    let rs0 = format!("{}:80", Lan::server_addr(0));
    let rs1 = format!("{}:80", Lan::server_addr(1));
    thread::sleep(Duration::from_secs(2));
    assert_eq!(weight(&lan, vs, &rs0), 100, "{}", daemon.log());

    std::fs::write(dir.join(Lan::server_addr(0).to_string()), "40\n").unwrap();
    let took = wait_weight(&lan, vs, &rs0, 40, Duration::from_secs(10));
    println!("command says weight=40: in IPVS after {took:?}");
    std::fs::write(dir.join(Lan::server_addr(0).to_string()), "fail\n").unwrap();
    let took = wait_weight(&lan, vs, &rs0, 0, Duration::from_secs(10));
    println!("command fails: weight 0 after {took:?}");
    assert_eq!(
        weight(&lan, vs, &rs1),
        100,
        "the other server is untouched: {}",
        daemon.log()
    );
    assert!(daemon.log().contains("exited with 1"), "{}", daemon.log());
}
