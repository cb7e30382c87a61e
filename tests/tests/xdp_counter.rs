//! The XDP program on a real veth in a network namespace: it passes every
//! frame and its pinned per-CPU counters equal exactly what was sent.

use std::process::Command;

use prober_tests::{prober_bin, run, Daemon, PinDir, VethPair, UDP_FRAME_OVERHEAD, VETH};

#[test]
fn counts_exactly_the_frames_sent_and_passes_them_all() {
    let pair = VethPair::new().unwrap();
    let pin_dir = PinDir::new();
    let daemon = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
    assert!(
        pair.server.xdp_program_id(VETH).unwrap().is_some(),
        "no XDP program on the server's veth"
    );
    let before = daemon.stats().unwrap();
    assert_eq!(before["packets"], 0, "frames before any traffic: {before}");

    // 1,000 datagrams of varied sizes, each echoed: every one reached the
    // server's socket, so the program passed it.
    let sizes: Vec<usize> = (0..1000).map(|i| 1 + (i * 37) % 1400).collect();
    let expected_bytes: usize = sizes.iter().map(|s| s + UDP_FRAME_OVERHEAD).sum();
    let echoed = pair.udp_echo(sizes.clone()).unwrap();
    assert_eq!(
        echoed,
        sizes.len(),
        "datagrams that came back through the XDP program"
    );

    let stats = daemon.stats().unwrap();
    assert_eq!(stats["packets"], sizes.len() as u64, "{stats}");
    assert_eq!(stats["bytes"], expected_bytes as u64, "{stats}");
    let per_cpu_sum: u64 = stats["packets_per_cpu"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_u64().unwrap())
        .sum();
    assert_eq!(
        per_cpu_sum,
        sizes.len() as u64,
        "per-CPU slots add up to the total"
    );
}

#[test]
fn real_tcp_traffic_passes_untouched() {
    let pair = VethPair::new().unwrap();
    let pin_dir = PinDir::new();
    let daemon = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
    let echoed = pair.tcp_exchange(256 * 1024).unwrap();
    assert_eq!(echoed, 256 * 1024);
    let stats = daemon.stats().unwrap();
    // Handshake, data and ACKs all crossed the program: at least the client's
    // SYN, ACK and the data segments of 256 KiB.
    assert!(stats["packets"].as_u64().unwrap() >= 3, "{stats}");
    assert!(stats["bytes"].as_u64().unwrap() >= 256 * 1024, "{stats}");
}

#[test]
fn bpftool_shows_the_pinned_map_with_field_names() {
    let pair = VethPair::new().unwrap();
    let pin_dir = PinDir::new();
    let daemon = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
    pair.udp_echo(vec![100; 3]).unwrap();
    let out = run(Command::new("bpftool")
        .args(["-j", "map", "dump", "pinned"])
        .arg(daemon.pin_dir.join("COUNTERS")))
    .unwrap();
    let dump: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    // With BTF, bpftool's JSON carries a "formatted" copy with field names.
    let values = dump[0]["formatted"]["values"]
        .as_array()
        .unwrap_or_else(|| panic!("no formatted values: {dump}"));
    let total: u64 = values
        .iter()
        .map(|v| {
            v["value"]["packets"]
                .as_u64()
                .expect("a field named packets")
        })
        .sum();
    let bytes: u64 = values
        .iter()
        .map(|v| v["value"]["bytes"].as_u64().expect("a field named bytes"))
        .sum();
    assert_eq!(
        (total, bytes),
        (3, 3 * (100 + UDP_FRAME_OVERHEAD) as u64),
        "{dump}"
    );
}

#[test]
fn sigint_and_sigterm_detach_and_unpin() {
    for signal in [libc::SIGINT, libc::SIGTERM] {
        let pair = VethPair::new().unwrap();
        let pin_dir = PinDir::new();
        let mut daemon = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
        let status = daemon.stop(signal).unwrap();
        assert!(
            status.success(),
            "exit after signal {signal}: {status}; {}",
            daemon.log()
        );
        assert_eq!(
            pair.server.xdp_program_id(VETH).unwrap(),
            None,
            "XDP still attached"
        );
        assert!(!pin_dir.exists(), "{} left behind", pin_dir.display());
        // Traffic still flows with the program gone.
        assert_eq!(pair.udp_echo(vec![64; 10]).unwrap(), 10);
    }
}

#[test]
fn restart_after_sigkill_replaces_the_stale_pin() {
    let pair = VethPair::new().unwrap();
    let pin_dir = PinDir::new();
    let mut killed = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
    killed.stop(libc::SIGKILL).unwrap();
    assert!(pin_dir.join("COUNTERS").exists(), "SIGKILL cannot unpin");
    let daemon = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
    assert!(
        daemon.log().contains("replacing a pinned map"),
        "{}",
        daemon.log()
    );
    pair.udp_echo(vec![10; 5]).unwrap();
    assert_eq!(
        daemon.stats().unwrap()["packets"],
        5,
        "the new daemon's map is the pinned one"
    );
}

#[test]
fn a_second_daemon_on_the_same_pin_dir_is_refused() {
    let pair = VethPair::new().unwrap();
    let pin_dir = PinDir::new();
    let _first = Daemon::start(&pair.server, VETH, &pin_dir).unwrap();
    let out = pair
        .server
        .command(prober_bin())
        .arg("--pin-dir")
        .arg(&pin_dir)
        .args(["run", "--iface", VETH])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("another prober is already running"),
        "{stderr}"
    );
    // The first daemon's program and pins are untouched.
    assert!(pair.server.xdp_program_id(VETH).unwrap().is_some());
    assert!(pin_dir.join("COUNTERS").exists());
}
