//! Active probes end to end: `prober run` in a director namespace probes
//! real listeners in a real-server namespace across veth, with delay and
//! loss imposed by netem.

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    time::Duration,
};

use prober_tests::{field, target, wait_for, wait_rounds, Daemon, PeerXdp, PinDir, VethPair, VETH};
use serde_json::Value;

/// A real server answering on port 8080 (and refusing 8081).
fn listening_on_8080() -> (VethPair, PeerXdp, std::net::TcpListener) {
    let pair = VethPair::new().unwrap();
    let peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))
        .unwrap();
    (pair, peer, listener)
}

/// This host's kernel has no netem (nor any delaying qdisc), so here the
/// RTT is veth's own; the 20 ms netem check runs with real IPVS in the guest.
#[test]
fn open_port_answers_closed_port_refuses_and_nothing_stays_half_open() {
    let (pair, _peer, _listener) = listening_on_8080();
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080", "tcp:192.0.2.2:8081", "icmp:192.0.2.2"];
    let mut daemon = Daemon::probing(&pair.client, &pin_dir, "100ms", &probes).unwrap();
    let stats = wait_rounds(&daemon, &probes, 5);

    let open = target(&stats, "tcp:192.0.2.2:8080");
    assert!(open["answered"].as_u64().unwrap() >= 5, "{open}");
    assert_eq!(
        (open["refused"].as_u64(), open["unreachable"].as_u64()),
        (Some(0), Some(0)),
        "{open}"
    );
    let rtt_ms = open["last_rtt_ns"].as_u64().unwrap() as f64 / 1e6;
    assert!(
        rtt_ms > 0.0 && rtt_ms < 10.0,
        "SYN-ACK RTT {rtt_ms} ms across one veth"
    );
    // Every answer is in the histogram, in a bucket below 16 ms.
    let histogram: Vec<u64> = open["rtt_log2_us"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b.as_u64().unwrap())
        .collect();
    assert_eq!(
        histogram[..14].iter().sum::<u64>(),
        open["answered"].as_u64().unwrap(),
        "{histogram:?}"
    );

    let closed = target(&stats, "tcp:192.0.2.2:8081");
    assert!(closed["refused"].as_u64().unwrap() >= 5, "{closed}");
    assert_eq!(closed["answered"].as_u64(), Some(0), "{closed}");

    let icmp = target(&stats, "icmp:192.0.2.2");
    assert!(icmp["answered"].as_u64().unwrap() >= 5, "{icmp}");
    let icmp_ms = icmp["last_rtt_ns"].as_u64().unwrap() as f64 / 1e6;
    assert!(icmp_ms > 0.0 && icmp_ms < 10.0, "echo RTT {icmp_ms} ms");
    for p in probes {
        assert_eq!(
            field(&stats, p, "timed_out"),
            0,
            "{p} timed out with a 100 ms interval"
        );
    }
    assert!(stats["resets_sent"].as_u64().unwrap() >= 5);
    assert_eq!(stats["replies_rejected"].as_u64(), Some(0));

    daemon.stop(libc::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(
        pair.server.half_open_connections().unwrap(),
        0,
        "half-open connections left on the real server"
    );
}

#[test]
fn a_dropped_path_times_out() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let _listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))
        .unwrap();
    // The real server's replies to the director go nowhere.
    pair.server
        .ip(&["route", "add", "blackhole", "192.0.2.1/32"])
        .unwrap();
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080", "icmp:192.0.2.2"];
    let daemon = Daemon::probing(&pair.client, &pin_dir, "50ms", &probes).unwrap();
    let stats = wait_rounds(&daemon, &probes, 5);
    for p in probes {
        let t = target(&stats, p);
        assert_eq!(t["answered"].as_u64(), Some(0), "{t}");
        assert!(t["timed_out"].as_u64().unwrap() >= 5, "{t}");
        assert!(
            t["timed_out"].as_u64().unwrap() + 1 >= t["sent"].as_u64().unwrap(),
            "{t}"
        );
    }
}

#[test]
fn direct_routing_probe_reaches_the_vip_on_the_real_server() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let vip = Ipv4Addr::new(203, 0, 113, 10);
    // As with IPVS-DR: the real server holds the VIP on lo and answers only
    // there; the director holds it too.
    for ns in [&pair.server, &pair.client] {
        ns.ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"])
            .unwrap();
    }
    let _listener = pair.server.listen(SocketAddrV4::new(vip, 80)).unwrap();
    let pin_dir = PinDir::new();
    let probes = [
        "tcp:203.0.113.10:80,dr=192.0.2.2",
        "tcp:203.0.113.10:81,dr=192.0.2.2",
        "tcp:192.0.2.2:80",
    ];
    let daemon = Daemon::probing(&pair.client, &pin_dir, "50ms", &probes).unwrap();
    let stats = wait_rounds(&daemon, &probes, 3);
    assert!(
        field(&stats, probes[0], "answered") >= 3,
        "VIP:80 on the real server: {stats:#}"
    );
    assert!(
        field(&stats, probes[1], "refused") >= 3,
        "VIP:81 is closed: {stats:#}"
    );
    // The same port on the real server's own address is closed: the answer
    // above came from the VIP.
    assert!(field(&stats, probes[2], "refused") >= 3, "{stats:#}");
    assert_eq!(field(&stats, probes[2], "answered"), 0);
}

#[test]
fn a_real_server_mac_change_is_followed_and_an_unresolved_neighbour_reported() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let _listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))
        .unwrap();
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080"];
    // 192.0.2.99 is on the link but nobody holds it.
    let daemon = Daemon::probing(
        &pair.client,
        &pin_dir,
        "50ms",
        &[probes[0], "tcp:192.0.2.99:80"],
    )
    .unwrap();
    wait_rounds(&daemon, &probes, 3);
    assert!(
        daemon
            .log()
            .contains("neighbour 192.0.2.99 on veth0 is not resolved yet"),
        "{}",
        daemon.log()
    );
    let stats = daemon.stats().unwrap();
    assert!(
        stats["targets"]
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t["probe"] != "tcp:192.0.2.99:80"),
        "a probe without a next-hop MAC must not be sent: {stats:#}"
    );

    // The real server gets a new MAC (a replaced NIC, a failover); the
    // director's entry for it goes and ARP learns the new one.
    let new_mac = "02:00:00:00:00:99";
    pair.server
        .ip(&["link", "set", "dev", VETH, "address", new_mac])
        .unwrap();
    // Counts only grow: read before the entry goes (the target is not in
    // the maps while its next hop is unresolved).
    let before = field(&daemon.stats().unwrap(), probes[0], "answered");
    pair.client
        .ip(&["neigh", "del", "192.0.2.2", "dev", VETH])
        .unwrap();
    let entry = wait_for(Duration::from_secs(10), || {
        let out = prober_tests::run(
            std::process::Command::new("bpftool")
                .args(["-j", "map", "lookup", "pinned"])
                .arg(pin_dir.join("PROBE_TARGETS"))
                .args(["key", "0", "0", "0", "0"]),
        )?;
        let entry: Value = serde_json::from_slice(&out.stdout)?;
        let mac: Vec<String> = entry["formatted"]["value"]["dst_mac"]
            .as_array()
            .map(|b| {
                b.iter()
                    .map(|x| format!("{:02x}", x.as_u64().unwrap_or(0)))
                    .collect()
            })
            .unwrap_or_default();
        Ok((mac.join(":") == new_mac).then_some(entry))
    })
    .unwrap();
    assert_eq!(entry["formatted"]["value"]["kind"], 2);
    let answered_after = wait_for(Duration::from_secs(10), || {
        let stats = daemon.stats()?;
        let answered = prober_tests::find_target(&stats, probes[0])
            .and_then(|t| t["answered"].as_u64())
            .unwrap_or(0);
        Ok((answered >= before + 3).then_some(answered))
    })
    .unwrap();
    assert!(answered_after >= before + 3);
}

/// Off-path forged SYN-ACKs (right addresses and ports, wrong cookie) count
/// as no answer and move nothing (they are passed on to the stack, which
/// resets them); each is counted as rejected, and with `--ebpf-log debug`
/// the datapath says so in the log.
#[test]
fn forged_syn_acks_are_rejected_counted_and_logged_at_debug_level() {
    use prober_tests::packets::{ethernet, ipv4, tcp, Tcp, ACK, SYN};
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let _listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))
        .unwrap();
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080"];
    let daemon = Daemon::start_with(
        &pair.client,
        VETH,
        &pin_dir,
        &[
            "--interval",
            "100ms",
            "--probe",
            probes[0],
            "--ebpf-log",
            "debug",
        ],
    )
    .unwrap();
    let stats = wait_rounds(&daemon, &probes, 3);
    let rejected_before = stats["replies_rejected"].as_u64().unwrap();
    let client_mac = pair.client.mac_bytes(VETH).unwrap();
    let server_mac = pair.server.mac_bytes(VETH).unwrap();
    let (rs, director) = (pair.server_addr.octets(), pair.client_addr.octets());
    // The probe's local port is one of the first of the range.
    let forged = 10u64;
    for port in 61000..61000 + forged as u16 {
        let segment = tcp(
            rs,
            director,
            &Tcp {
                src_port: 8080,
                dst_port: port,
                seq: 1,
                ack: 0xdead_beef,
                flags: SYN | ACK,
                options: &[],
            },
        );
        let frame = ethernet(
            client_mac,
            server_mac,
            0x0800,
            &ipv4(rs, director, 6, 0, &[], &segment),
        );
        pair.server.send_frame(VETH, frame).unwrap();
    }
    let stats = wait_for(Duration::from_secs(5), || {
        let stats = daemon.stats()?;
        Ok((stats["replies_rejected"].as_u64().unwrap() > rejected_before).then_some(stats))
    })
    .unwrap();
    let rejected = stats["replies_rejected"].as_u64().unwrap() - rejected_before;
    println!("{rejected} of {forged} forged SYN-ACKs hit the probe's port and were rejected");
    assert_eq!(rejected, 1, "exactly the one aimed at the probe's own port");
    let logged = wait_for(Duration::from_secs(5), || {
        Ok(daemon
            .log()
            .lines()
            .find(|l| l.contains("rejected: its cookie matches none"))
            .map(String::from))
    })
    .unwrap();
    assert!(logged.contains("192.0.2.2"), "{logged}");
    println!("eBPF log: {logged}");
    prober_tests::record(
        "spoofing",
        "forged SYN-ACKs from the real server's address to 10 local ports, the probe's among them, through a running daemon",
        forged,
        "the one reaching the probe's port rejected by cookie, counted and logged at debug; the probe stayed down (refused)",
        "nothing",
    );
    let t = target(&stats, probes[0]);
    assert_eq!(
        t["refused"].as_u64(),
        Some(0),
        "a forged answer moves nothing: {t}"
    );
}

/// `ip netns exec` runs the daemon with /sys remounted for the namespace,
/// without a BPF filesystem: the daemon mounts one itself and says so,
/// instead of refusing to start.
#[test]
fn it_starts_under_ip_netns_exec_without_a_bpffs() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let pin_dir = format!("/sys/fs/bpf/{}", prober_tests::unique_name("prober-exec-"));
    let log_path = std::env::temp_dir().join(prober_tests::unique_name("prober-exec-log-"));
    let mut child = std::process::Command::new("ip")
        .args(["netns", "exec", &pair.client.name])
        .arg(prober_tests::prober_bin())
        .args(["--pin-dir", &pin_dir, "run", "--iface", VETH])
        .args(["--interval", "100ms", "--probe", "icmp:192.0.2.2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log_path).unwrap())
        .spawn()
        .unwrap();
    let log = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let ready = wait_for(Duration::from_secs(30), || {
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("prober exited with {status}: {}", log());
        }
        Ok(log().contains(prober_tests::READY_LINE).then_some(()))
    });
    if ready.is_err() {
        let _ = child.kill();
    }
    ready.unwrap();
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        child.try_wait().unwrap().is_none(),
        "still running: {}",
        log()
    );
    // SAFETY: a plain kill(2) of our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    let log = log();
    assert!(status.success(), "{status}: {log}");
    assert!(
        log.contains("no BPF filesystem was mounted at /sys/fs/bpf") && log.contains("mounted one"),
        "{log}"
    );
}

/// The packet-socket path (`--transmit socket`, what `auto` falls back to
/// on a kernel that refuses live frames) sends the frames `probe_tx`
/// writes: answered, refused and echoed like live ones, nothing half open.
#[test]
fn probes_sent_through_a_packet_socket_are_answered_like_live_ones() {
    let (pair, _peer, _listener) = listening_on_8080();
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080", "tcp:192.0.2.2:8081", "icmp:192.0.2.2"];
    let mut args = vec!["--interval", "100ms", "--transmit", "socket"];
    for p in probes {
        args.extend(["--probe", p]);
    }
    let mut daemon = Daemon::start_with(&pair.client, VETH, &pin_dir, &args).unwrap();
    let stats = wait_rounds(&daemon, &probes, 5);
    assert!(field(&stats, probes[0], "answered") >= 5, "{stats}");
    assert!(field(&stats, probes[1], "refused") >= 5, "{stats}");
    assert!(field(&stats, probes[2], "answered") >= 5, "{stats}");
    for p in probes {
        assert_eq!(field(&stats, p, "timed_out"), 0, "{p}: {stats}");
    }
    assert_eq!(stats["replies_rejected"].as_u64(), Some(0));
    daemon.stop(libc::SIGTERM).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(pair.server.half_open_connections().unwrap(), 0);
}
