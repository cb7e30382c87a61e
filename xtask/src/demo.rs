//! `cargo xtask demo`: builds everything, then shows prober on a throwaway
//! topology: two network namespaces joined by veth, `prober run` attached to
//! the server side, real ICMP, UDP and TCP traffic, and what the pinned map
//! saw. (The IPVS demo replaces this once the controller exists.)

use std::{process::Command, thread, time::Duration};

use anyhow::{Context, Result};
use prober_tests::{run as run_checked, Daemon, VethPair, VETH};

use crate::{build_ebpf, run_command, setup, test::require_root, workspace_root};

const PIN_DIR: &str = "/sys/fs/bpf/prober";

pub fn run() -> Result<()> {
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    run_command(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root())
            .args(["build", "--quiet", "--package", "prober-user"]),
    )?;

    println!("\n[demo] topology: netns client (192.0.2.1) <-veth-> netns server (192.0.2.2)");
    let pair = VethPair::new()?;
    println!(
        "[demo] starting `prober run --iface {VETH}` in {} (maps pinned under {PIN_DIR})",
        pair.server.name
    );
    let mut daemon = Daemon::start(&pair.server, VETH, PIN_DIR.as_ref())?;
    let id = pair
        .server
        .xdp_program_id(VETH)?
        .context("no XDP program attached")?;
    println!(
        "[demo] XDP program id {id} attached to {VETH} in {}",
        pair.server.name
    );
    show_stats("before any traffic")?;

    println!("\n[demo] ping -c 5 from client to server");
    run_checked(
        Command::new("ip")
            .args(["netns", "exec", &pair.client.name])
            .args(["ping", "-c", "5", "-i", "0.2", "-q", "192.0.2.2"]),
    )
    .map(|out| print!("{}", String::from_utf8_lossy(&out.stdout)))?;
    show_stats("after 5 pings (5 echo requests arrive at the server: 5 x 98 bytes)")?;

    println!("\n[demo] 100 UDP datagrams of 500 bytes, each echoed back");
    let echoed = pair.udp_echo(vec![500; 100])?;
    println!("[demo] {echoed} of 100 echoes came back");
    show_stats("after UDP (+100 frames, +100 x 542 bytes)")?;

    println!("\n[demo] one TCP connection sending 1 MiB and reading it back");
    let read = pair.tcp_exchange(1 << 20)?;
    println!("[demo] {read} bytes came back over TCP");
    show_stats("after TCP")?;

    println!("\n[demo] bpftool map dump pinned {PIN_DIR}/COUNTERS");
    let out = run_checked(Command::new("bpftool").args([
        "map",
        "dump",
        "pinned",
        &format!("{PIN_DIR}/COUNTERS"),
    ]))?;
    print!("{}", String::from_utf8_lossy(&out.stdout));

    println!("\n[demo] SIGINT to prober");
    let status = daemon.stop(libc::SIGINT)?;
    thread::sleep(Duration::from_millis(100));
    let attached = pair.server.xdp_program_id(VETH)?;
    println!(
        "[demo] prober exited ({status}); XDP attached: {}; {PIN_DIR} exists: {}",
        attached.map_or("no".to_string(), |id| format!("yes (id {id})")),
        std::path::Path::new(PIN_DIR).exists()
    );
    println!("[demo] done: namespaces removed");
    Ok(())
}

fn show_stats(when: &str) -> Result<()> {
    let out = run_checked(Command::new(prober_tests::prober_bin()).args(["stats"]))?;
    println!("[demo] `prober stats` {when}:");
    print!("{}", String::from_utf8_lossy(&out.stdout));
    Ok(())
}
