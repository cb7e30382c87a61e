//! At scale, in the qemu guest with real IPVS. 35,100 real servers, each
//! with its L4 probe and its host's L3 probe, are 70,200 probes: more than
//! the datapath's compiled 65,536, so the daemon must size its maps from
//! IPVS and probe them all. One burst of every probe per interval
//! overflowed the rings and judged healthy servers DOWN, and an operator's
//! `ipvsadm -Ln` during deaths stalled the daemon: sends must be spread
//! over the interval, no probe sent twice in one, and no server but the
//! dead one judged DOWN while `ipvsadm -Ln` runs (a probe lost in the
//! director's own ring counts against no server, once in a row). Past a
//! capacity set by `max_probes` nothing is capped in silence, and a
//! restart with room again grows the pinned state without losing it.

use std::{
    net::SocketAddrV4,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    time::{Duration, Instant},
};

use prober_tests::{unique_name, wait_for, Daemon, NetNs, PeerXdp, PinDir};

const PER_SERVICE: usize = 50;

fn real_server(i: usize) -> String {
    let n = i + 1;
    format!("10.64.{}.{}", n / 256, n % 256)
}

fn service(s: usize) -> String {
    format!("10.200.{}.{}:80", s / 250, s % 250 + 1)
}

/// A director and one namespace that owns 10.64.0.0/16 (an AnyIP route:
/// every address answers, as that many hosts would), one next hop away,
/// and NAT services of 50 of the first `n` real servers each.
struct Bed {
    director: NetNs,
    servers: NetNs,
    _peer: PeerXdp,
    _listener: std::net::TcpListener,
}

impl Bed {
    fn new(n: usize) -> Self {
        let director = NetNs::new("prbd").unwrap();
        let servers = NetNs::new("prbs").unwrap();
        let veth = [
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &servers.name,
        ];
        director.ip(&veth).unwrap();
        director
            .ip(&["addr", "add", "192.0.2.1/24", "dev", "eth0"])
            .unwrap();
        servers
            .ip(&["addr", "add", "192.0.2.2/24", "dev", "eth0"])
            .unwrap();
        director.ip(&["link", "set", "eth0", "up"]).unwrap();
        servers.ip(&["link", "set", "eth0", "up"]).unwrap();
        servers
            .ip(&["route", "add", "local", "10.64.0.0/16", "dev", "lo"])
            .unwrap();
        director
            .ip(&["route", "add", "10.64.0.0/16", "via", "192.0.2.2"])
            .unwrap();
        servers.sysctl("net.core.somaxconn", "65535").unwrap();
        servers
            .sysctl("net.ipv4.tcp_max_syn_backlog", "65535")
            .unwrap();
        let peer = PeerXdp::attach(&servers, "eth0").unwrap();
        let listener = servers
            .listen(SocketAddrV4::new(std::net::Ipv4Addr::UNSPECIFIED, 80))
            .unwrap();
        let mut rules = String::new();
        for s in 0..n / PER_SERVICE {
            rules.push_str(&format!("-A -t {} -s wrr\n", service(s)));
            for i in s * PER_SERVICE..(s + 1) * PER_SERVICE {
                rules.push_str(&format!(
                    "-a -t {} -r {}:80 -m -w 100\n",
                    service(s),
                    real_server(i)
                ));
            }
        }
        director.run_with_input("ipvsadm", &["-R"], &rules).unwrap();
        Self {
            director,
            servers,
            _peer: peer,
            _listener: listener,
        }
    }

    fn start(&self, pin_dir: &PinDir, config: &str) -> Daemon {
        let path = std::env::temp_dir().join(format!("{}.toml", unique_name("scale-")));
        std::fs::write(&path, config).unwrap();
        Daemon::start_with(
            &self.director,
            "eth0",
            pin_dir,
            &["--config", path.to_str().unwrap()],
        )
        .unwrap()
    }

    /// Both ends' link counters (drops at the veth rings among them).
    fn link_counters(&self) -> String {
        [&self.director, &self.servers]
            .iter()
            .map(|ns| {
                ns.ip(&["-s", "-s", "link", "show", "eth0"])
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default()
            })
            .collect::<Vec<_>>()
            .join("")
    }

    /// Real server `i`'s weight in the first service.
    fn weight(&self, i: usize) -> anyhow::Result<u32> {
        let first = service(0);
        let table =
            prober_tests::run(self.director.command("ipvsadm").args(["-Ln", "-t", &first]))?;
        let text = String::from_utf8_lossy(&table.stdout).into_owned();
        Ok(text
            .lines()
            .map(|l| l.split_whitespace().collect::<Vec<_>>())
            .find(|f| {
                f.first() == Some(&"->")
                    && f.get(1) == Some(&format!("{}:80", real_server(i)).as_str())
            })
            .and_then(|f| f.get(3)?.parse().ok())
            .unwrap_or(u32::MAX))
    }

    /// Waits until real server `i`'s L4 probe has been answered, so its
    /// death is news (asking every 2 s: at this size each `prober stats`
    /// is a lot of work for the emulated guest).
    fn wait_answered(&self, daemon: &Daemon, i: usize) {
        wait_for(Duration::from_secs(300), || {
            std::thread::sleep(Duration::from_secs(2));
            let stats = daemon.stats()?;
            Ok(
                prober_tests::find_target(&stats, &format!("tcp:{}:80", real_server(i)))
                    .is_some_and(|t| t["answered"].as_u64() > Some(0))
                    .then_some(()),
            )
        })
        .unwrap_or_else(|e| panic!("{e}: {}", tail(&daemon.log())));
    }

    /// Real server `i` dies (its SYNs vanish); waits for its weight 0.
    fn kill(&self, daemon: &Daemon, i: usize) {
        let route = format!("{}/32", real_server(i));
        self.servers
            .ip(&["route", "add", "blackhole", &route, "table", "local"])
            .unwrap();
        wait_for(Duration::from_secs(300), || {
            Ok((self.weight(i)? == 0).then_some(()))
        })
        .unwrap_or_else(|e| panic!("{e}: {}", tail(&daemon.log())));
    }
}

/// 3,510 probes a second: about what the emulated guest's daemon keeps
/// up with while `ipvsadm -Ln` runs beside it (at twice that rate it fell
/// behind and late batches overflowed the veth ring; see the README).
const CONFIG: &str = "[daemon]\ninterval = \"20s\"\ntimeout = \"3s\"\nrise = 1\nfall = 2\ndiscovery = \"120s\"\n[weights]\nlatency_aware = false\n";
/// The probe interval `CONFIG` sets.
const INTERVAL: Duration = Duration::from_secs(20);

#[test]
fn seventy_thousand_probes_are_all_sent_spread_and_only_the_dead_server_goes_out() {
    const N: usize = 35_100;
    let bed = Bed::new(N);
    let pin_dir = PinDir::new();
    let daemon = bed.start(&pin_dir, CONFIG);
    let sized = "needed=70200 capacity=131072";
    assert!(
        daemon.log().contains(sized),
        "sized from IPVS: {}",
        tail(&daemon.log())
    );
    bed.wait_answered(&daemon, 0);
    // Every probe goes out (the first sends of 70,200 new probes are
    // spread, and a daemon behind sends at most twice a phase's share a
    // phase, so this may take some intervals under emulation).
    let sent_of = |stats: &serde_json::Value| -> std::collections::HashMap<String, u64> {
        stats["targets"]
            .as_array()
            .unwrap()
            .iter()
            .map(|t| {
                (
                    t["probe"].as_str().unwrap().to_string(),
                    t["sent"].as_u64().unwrap(),
                )
            })
            .collect()
    };
    wait_for(Duration::from_secs(600), || {
        std::thread::sleep(Duration::from_secs(5));
        let sent = sent_of(&daemon.stats()?);
        Ok((sent.len() == 2 * N && sent.values().all(|&n| n > 0)).then_some(()))
    })
    .unwrap_or_else(|e| panic!("every probe sent: {e}: {}", tail(&daemon.log())));

    // Over a window of three intervals no probe goes out more often than
    // once an interval (its sends fall on a grid).
    let before = Instant::now();
    let first_stats = daemon.stats().unwrap();
    let recomputed = |status: serde_json::Value| status["pools_recomputed"].as_u64().unwrap();
    let recomputed_before = recomputed(daemon.status().unwrap());
    std::thread::sleep(INTERVAL * 3);
    let second_stats = daemon.stats().unwrap();
    let span = before.elapsed();
    // Nothing changes: the pools' weights are not worked out again (a
    // rotation would recompute each once an interval, 3 x {pools}); at
    // most the last of them settling, once.
    let pools = N.div_ceil(PER_SERVICE) as u64;
    let recomputed_in_window = recomputed(daemon.status().unwrap()) - recomputed_before;
    println!(
        "pools recomputed over three intervals at rest: {recomputed_in_window} of {pools} pools"
    );
    assert!(
        recomputed_in_window <= pools,
        "{recomputed_in_window} pool recomputations in three quiet intervals ({pools} pools)"
    );
    let most = (span.as_nanos() / INTERVAL.as_nanos()) as u64 + 1;
    let (first_sent, second_sent) = (sent_of(&first_stats), sent_of(&second_stats));
    assert_eq!(second_sent.len(), 2 * N, "every probe is a target");
    for (probe, n) in &second_sent {
        let delta = n - first_sent.get(probe).copied().unwrap_or(0);
        assert!(
            delta <= most,
            "{probe}: {delta} probes sent in {span:?}, at most {most} at one an interval"
        );
    }
    // At rest the hosts' L3 probes rest too: one probe per check goes
    // out, not one more per host (three intervals of every L3 probe would
    // be 3 x {N}).
    let l3_sent: u64 = second_sent
        .iter()
        .filter(|(probe, _)| probe.starts_with("icmp:"))
        .map(|(probe, n)| n - first_sent.get(probe).copied().unwrap_or(0))
        .sum();
    let paused = daemon.status().unwrap()["l3_probes_paused"]
        .as_u64()
        .unwrap();
    println!("at rest: {paused} of {N} hosts' L3 probes paused, {l3_sent} L3 probes sent over three intervals");
    assert!(l3_sent <= N as u64 / 2, "{l3_sent} L3 probes sent at rest");

    // The first real server dies while an operator lists IPVS over and
    // over (each listing holds IPVS's lock for a while at this size).
    let listing = Arc::new(AtomicBool::new(true));
    let lister = {
        let listing = listing.clone();
        let mut command = bed.director.command("ipvsadm");
        command.args(["-Ln"]).stdout(std::process::Stdio::null());
        std::thread::spawn(move || {
            let mut runs = 0;
            let until = Instant::now() + Duration::from_secs(600);
            // As an operator would, again and again, but not back to
            // back: a tight loop of 35,100-line listings starved the
            // emulated guest so that the director's own veth ring
            // overflowed on most sends (see the README).
            while listing.load(Ordering::Relaxed) && runs < 1000 && Instant::now() < until {
                let _ = command.status();
                runs += 1;
                std::thread::sleep(Duration::from_secs(2));
            }
            runs
        })
    };
    bed.kill(&daemon, 0);
    // Two more intervals: a false verdict caused by the stall would come
    // by then.
    std::thread::sleep(INTERVAL * 2);
    listing.store(false, Ordering::Relaxed);
    let listings = lister.join().unwrap();
    let log = daemon.log();
    println!(
        "{} probes in a datapath sized from IPVS ({sized}), the dead server at 0 while `ipvsadm -Ln` ran {listings} times",
        2 * N
    );
    assert!(listings > 0);
    assert!(!log.contains("no L3 diagnosis"), "{}", tail(&log));
    assert!(!log.contains("not probed"), "{}", tail(&log));
    assert!(!log.contains("reading IPVS"), "{}", tail(&log));
    // The run loop's own report of a failed tick (not the controller's
    // log lines, whose target also ends in "controller").
    let failed_ticks = log
        .lines()
        .filter(|l| l.contains(" controller: ") && !l.contains("prober_user::controller"))
        .count();
    assert_eq!(failed_ticks, 0, "no tick failed: {}", tail(&log));
    // Sends spread over the interval: no tick sent more than a slot's
    // budget, far from all at once.
    let largest = log
        .lines()
        .filter(|l| l.contains("largest probe send so far"))
        .filter_map(|l| {
            l.split("probes=")
                .nth(1)?
                .split_whitespace()
                .next()?
                .parse::<usize>()
                .ok()
        })
        .max()
        .expect("the largest send is said");
    // The slots one tick may walk at most, each probe with a RST before
    // it at worst.
    use prober_user::probe::schedule;
    let budget = schedule::most_in_a_slot(2 * N) * 2 * schedule::MOST_SLOTS_PER_TICK as usize;
    println!("largest send of one slot: {largest} frames (at most {budget})");
    assert!(largest <= budget, "{largest} frames in one slot");
    assert!(largest < 2 * N / 10, "never a tenth of all probes at once");
    // No healthy server was judged DOWN: only the dead one's probes.
    let dead = real_server(0);
    let false_downs: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("real server DOWN"))
        .filter(|l| !l.contains(&format!(":{dead}:")) && !l.contains(&format!(":{dead} ")))
        .collect();
    // What the daemon said of its own pace, to tell a stall from a loss.
    let counters = bed.link_counters();
    let pace: Vec<&str> = log
        .lines()
        .filter(|l| {
            [
                "half an interval late",
                "largest probe send",
                "dropped probe frames",
            ]
            .iter()
            .any(|said| l.contains(said))
        })
        .collect();
    assert!(
        false_downs.is_empty(),
        "{} healthy probes judged DOWN, e.g. {:?}\n{}\n{counters}",
        false_downs.len(),
        &false_downs[..false_downs.len().min(5)],
        pace.join("\n")
    );
}

#[test]
fn past_max_probes_nothing_is_capped_in_silence_and_a_restart_with_room_grows_the_pinned_state() {
    // 600 real servers and their hosts: 1,200 probes where max_probes
    // gives 1,024, so 176 hosts go without L3 diagnosis.
    const N: usize = 600;
    let bed = Bed::new(N);
    let pin_dir = PinDir::new();
    let capped = CONFIG.replace("[daemon]\n", "[daemon]\nmax_probes = 1024\n");
    let mut daemon = bed.start(&pin_dir, &capped);
    let said = "176 real server hosts get no L3 diagnosis probe";
    wait_for(Duration::from_secs(120), || {
        Ok(daemon.log().contains(said).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", tail(&daemon.log())));
    bed.wait_answered(&daemon, 0);
    bed.kill(&daemon, 0);
    let log = daemon.log();
    assert_eq!(log.matches(said).count(), 1, "said once: {}", tail(&log));
    assert!(!log.contains("not probed"), "every destination checked");
    daemon.stop(libc::SIGTERM).unwrap();

    // Started again without max_probes: sized from IPVS, every host
    // diagnosed, the state pinned by the capped run moved into maps of
    // the new size, and the dead server still at 0, the others at 100.
    let daemon = bed.start(&pin_dir, CONFIG);
    bed.wait_answered(&daemon, 1);
    let log = daemon.log();
    println!(
        "{}",
        log.lines()
            .filter(|l| l.contains("grown"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert!(log.contains("needed=1200 capacity=65536"), "{}", tail(&log));
    for map in ["WEIGHT_STATE", "HEALTH_STATE"] {
        assert!(
            log.lines().any(|l| l.contains("pinned state grown")
                && l.contains(map)
                && l.contains("from=1024 to=65536")),
            "{map} grown: {}",
            tail(&log)
        );
    }
    assert!(!log.contains("no L3 diagnosis"), "{}", tail(&log));
    assert_eq!(bed.weight(0).unwrap(), 0, "the dead server stays out");
    assert_eq!(bed.weight(1).unwrap(), 100);
    assert!(
        !log.contains("set weight"),
        "a restart writes no weight: {}",
        tail(&log)
    );
}

/// The end of a long log.
fn tail(log: &str) -> &str {
    let mut start = log.len().saturating_sub(8000);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    &log[start..]
}
