//! The demo behind `cargo xtask demo` (which builds everything first):
//! prober probing real servers across veth between two network namespaces.
//! (Once the controller exists, the demo becomes a topology with real IPVS.)

use std::{
    net::{Ipv4Addr, SocketAddrV4},
    process::Command,
    thread,
    time::Duration,
};

use anyhow::{Context, Result};
use prober_tests::{prober_bin, run, Daemon, PeerXdp, VethPair, VETH};

const PIN_DIR: &str = "/sys/fs/bpf/prober";
const PROBES: [&str; 4] = [
    "tcp:192.0.2.2:8080",
    "tcp:192.0.2.2:8081",
    "icmp:192.0.2.2",
    "tcp:203.0.113.10:80,dr=192.0.2.2",
];

fn main() -> Result<()> {
    println!("[demo] topology: director netns (192.0.2.1) <-veth-> real-server netns (192.0.2.2)");
    let pair = VethPair::new()?;
    // Frames XDP sends into a veth are delivered only if the peer runs XDP.
    let _peer = PeerXdp::attach(&pair.server, VETH)?;
    let vip = Ipv4Addr::new(203, 0, 113, 10);
    for ns in [&pair.server, &pair.client] {
        ns.ip(&["addr", "add", "203.0.113.10/32", "dev", "lo"])?;
    }
    let web = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, 8080))?;
    let _dr_web = pair.server.listen(SocketAddrV4::new(vip, 80))?;
    println!("[demo] real server listens on 192.0.2.2:8080 and on the VIP 203.0.113.10:80 (held on its lo, as with IPVS-DR); 8081 is closed");

    let listed: Vec<String> = PROBES.iter().map(|p| format!("--probe {p}")).collect();
    println!(
        "[demo] prober run --iface {VETH} --interval 200ms {} (in {})",
        listed.join(" "),
        pair.client.name
    );
    let mut daemon = Daemon::probing(&pair.client, PIN_DIR.as_ref(), "200ms", &PROBES)?;
    thread::sleep(Duration::from_secs(2));
    show_stats("after 2 s")?;

    println!("\n[demo] the service on 192.0.2.2:8080 stops");
    drop(web);
    thread::sleep(Duration::from_secs(1));
    show_stats("1 s later")?;
    println!(
        "\n[demo] half-open connections left on the real server (`ss state syn-recv`): {}",
        pair.server.half_open_connections()?
    );

    println!("\n[demo] bpftool map lookup pinned {PIN_DIR}/PROBE_STATE key 0 0 0 0");
    let out = run(Command::new("bpftool").args([
        "map",
        "lookup",
        "pinned",
        &format!("{PIN_DIR}/PROBE_STATE"),
        "key",
        "0",
        "0",
        "0",
        "0",
    ]))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n[demo] SIGINT to prober");
    let status = daemon.stop(libc::SIGINT)?;
    let attached = pair.client.xdp_program_id(VETH)?;
    println!(
        "[demo] prober exited ({status}); XDP still attached: {}; {PIN_DIR} exists: {}",
        attached.map_or("no".to_string(), |id| format!("yes (id {id})")),
        std::path::Path::new(PIN_DIR).exists()
    );
    println!("[demo] done: namespaces removed");
    Ok(())
}

fn show_stats(when: &str) -> Result<()> {
    let out = run(Command::new(prober_bin()).args(["stats"])).context("prober stats")?;
    println!("[demo] `prober stats` {when}:");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
