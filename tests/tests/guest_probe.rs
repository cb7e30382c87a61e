//! Active probes in the qemu guest (Debian 6.1 kernel), for what this host's
//! kernel cannot do: netem delays, IPIP decapsulation, and transmitting
//! live frames from XDP (this host's policy refuses them).

use std::net::{Ipv4Addr, SocketAddrV4};

use prober_tests::{field, run, target, wait_rounds, Daemon, PeerXdp, PinDir, VethPair, VETH};

#[test]
fn probe_rtt_matches_the_delay_netem_imposes() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    pair.server.netem(VETH, &["delay", "20ms"]).unwrap();
    let _listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))
        .unwrap();
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080", "icmp:192.0.2.2"];
    let daemon = Daemon::probing(&pair.client, &pin_dir, "100ms", &probes).unwrap();
    // The last RTT after each of 7 rounds: their median, as the emulated
    // guest stretches the odd one (a busy host stalls it for milliseconds).
    let mut samples: Vec<Vec<f64>> = vec![Vec::new(); probes.len()];
    let mut stats = serde_json::Value::Null;
    for round in 5..12 {
        stats = wait_rounds(&daemon, &probes, round);
        for (i, probe) in probes.iter().enumerate() {
            samples[i].push(field(&stats, probe, "last_rtt_ns") as f64 / 1e6);
        }
    }
    for (probe, mut rtts) in probes.into_iter().zip(samples) {
        let t = target(&stats, probe);
        let answered = t["answered"].as_u64().unwrap();
        assert!(answered >= 5, "{t}");
        rtts.sort_by(f64::total_cmp);
        let rtt_ms = rtts[rtts.len() / 2];
        println!("{probe}: median of the last RTT over 7 rounds {rtt_ms:.3} ms with netem delay 20 ms ({rtts:.3?})");
        assert!(
            (17.0..=23.0).contains(&rtt_ms),
            "{probe}: RTT {rtt_ms} ms, netem imposes 20 ms"
        );
        // 20 ms = 20,000 µs: log2 bucket 14 ([16384, 32768) µs) holds most
        // of them (emulation in the guest stretches the odd one).
        let in_bucket = t["rtt_log2_us"][14].as_u64().unwrap();
        assert!(
            in_bucket * 10 >= answered * 8,
            "{in_bucket} of {answered} in the 16-32 ms bucket: {t}"
        );
    }
}

#[test]
fn tunnel_probe_reaches_the_vip_through_ipip() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    run(std::process::Command::new("modprobe").arg("ipip")).unwrap();
    // As with IPVS tunnelling: the real server decapsulates on tunl0 and
    // holds the VIP on lo; it replies straight to the director.
    pair.server.ip(&["link", "set", "tunl0", "up"]).unwrap();
    for key in [
        "net.ipv4.conf.all.rp_filter",
        "net.ipv4.conf.tunl0.rp_filter",
    ] {
        pair.server.sysctl(key, "0").unwrap();
    }
    pair.server
        .ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"])
        .unwrap();
    let _listener = pair
        .server
        .listen(SocketAddrV4::new(Ipv4Addr::new(203, 0, 113, 10), 80))
        .unwrap();
    let pin_dir = PinDir::new();
    let probes = [
        "tcp:203.0.113.10:80,tun=192.0.2.2",
        "tcp:203.0.113.10:81,tun=192.0.2.2",
    ];
    let daemon = Daemon::probing(&pair.client, &pin_dir, "100ms", &probes).unwrap();
    let stats = wait_rounds(&daemon, &probes, 3);
    assert!(
        field(&stats, probes[0], "answered") >= 3,
        "VIP:80 through the tunnel: {stats:#}"
    );
    assert!(
        field(&stats, probes[1], "refused") >= 3,
        "VIP:81 through the tunnel: {stats:#}"
    );
    // While probes run, a SYN may sit between its SYN-ACK and the RST the
    // datapath sends back: count once the daemon has stopped.
    drop(daemon);
    prober_tests::wait_for(std::time::Duration::from_secs(3), || {
        Ok((pair.server.half_open_connections()? == 0).then_some(()))
    })
    .expect("no half-open connection left on the real server");
}

/// Frames sent from XDP onto a veth whose peer runs no XDP program vanish:
/// the daemon notices that no probe ever got a reply and says how to fix
/// it, once.
#[test]
fn probes_vanishing_on_a_veth_without_an_xdp_peer_get_one_warning_with_the_fix() {
    let pair = VethPair::new().unwrap(); // no XDP program on the peer
    let pin_dir = PinDir::new();
    let args = [
        "--interval",
        "100ms",
        "--probe",
        "icmp:192.0.2.2",
        "--transmit",
        "live",
    ];
    let daemon = Daemon::start_with(&pair.client, VETH, &pin_dir, &args).unwrap();
    let warning = "is a veth and no probe sent on it has had any reply";
    prober_tests::wait_for(std::time::Duration::from_secs(10), || {
        Ok(daemon.log().contains(warning).then_some(()))
    })
    .unwrap_or_else(|e| panic!("{e}: {}", daemon.log()));
    let stats = daemon.stats().unwrap();
    assert_eq!(field(&stats, "icmp:192.0.2.2", "answered"), 0, "{stats}");
    std::thread::sleep(std::time::Duration::from_secs(1));
    let log = daemon.log();
    assert_eq!(log.matches(warning).count(), 1, "once: {log}");
    assert!(log.contains("ethtool -K PEER gro on"), "{log}");
}

/// Packets the real server's egress filter dropped (`tc -s`'s "dropped").
fn dropped_by_filter(pair: &VethPair) -> u64 {
    let out = pair
        .server
        .command("tc")
        .args(["-s", "filter", "show", "dev", VETH, "egress"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    text.split("(dropped ")
        .nth(1)
        .and_then(|rest| rest.split(',').next())
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop count in: {text}"))
}

#[test]
fn a_lost_syn_ack_costs_one_probe_not_two() {
    let pair = VethPair::new().unwrap();
    let _peer = PeerXdp::attach(&pair.server, VETH).unwrap();
    let _listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))
        .unwrap();
    // Every third SYN-ACK of the real server is lost on its way out: the
    // server holds that 4-tuple half-open (SYN_RECV), and without the RST
    // prober sends first, it takes the next probe's SYN (a sequence out of
    // that connection's window) for a stray segment: a second miss.
    for module in ["cls_flower", "act_gact"] {
        run(std::process::Command::new("modprobe").arg(module)).unwrap();
    }
    let tc = |args: &[&str]| {
        let out = pair.server.command("tc").args(args).output().unwrap();
        assert!(out.status.success(), "tc {args:?}: {out:?}");
    };
    tc(&["qdisc", "add", "dev", VETH, "clsact"]);
    tc(&[
        "filter",
        "add",
        "dev",
        VETH,
        "egress",
        "protocol",
        "ip",
        "flower",
        "ip_proto",
        "tcp",
        "tcp_flags",
        "0x12/0x17",
        "action",
        "gact",
        "pass",
        "random",
        "determ",
        "drop",
        "3",
    ]);
    let pin_dir = PinDir::new();
    let probes = ["tcp:192.0.2.2:8080"];
    let daemon = Daemon::probing(&pair.client, &pin_dir, "100ms", &probes).unwrap();
    let stats = wait_rounds(&daemon, &probes, 24);
    let dropped = dropped_by_filter(&pair);
    let t = target(&stats, probes[0]);
    let (sent, answered, timed_out) = (
        t["sent"].as_u64().unwrap(),
        t["answered"].as_u64().unwrap(),
        t["timed_out"].as_u64().unwrap(),
    );
    let resets = stats["resets_before_probe"].as_u64().unwrap();
    println!(
        "{sent} probes, every third SYN-ACK dropped ({dropped}): {answered} answered, {timed_out} timed out, {resets} RSTs before a probe"
    );
    assert!(dropped >= 5, "{stats}");
    // One miss per SYN-ACK lost (two, without the RST: ~2x dropped), and
    // one RST per miss.
    assert!(timed_out <= dropped + 1, "{stats}");
    assert!(
        resets + 1 >= timed_out && resets <= timed_out + 1,
        "{stats}"
    );
    assert_eq!(t["refused"].as_u64(), Some(0), "{stats}");
    assert!(pair.server.half_open_connections().unwrap() <= 1);
}
