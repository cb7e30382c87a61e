//! `cargo xtask bench <name>`: builds everything, then runs the benchmark
//! program of the tests crate (`tests/src/bin/bench.rs`), optimised, as root.
//! `passive-flood` is the ignored `bench_passive_flood` of
//! `tests/tests/passive_flood.rs`, which shares its flood with the test
//! that proves what a flood evicts. `scale` runs `tests/src/bin/scale.rs`
//! in the guest (real IPVS) against keepalived and writes BENCHMARKS.md.

use std::{fmt::Write as _, process::Command, time::Duration};

use anyhow::{bail, Context, Result};

use crate::{
    build_ebpf, run_command,
    setup::{self, command_stdout, require_root},
    vm, workspace_root,
};

pub fn run(name: &str, args: &[String]) -> Result<()> {
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    if name == "scale" {
        return scale(args);
    }
    if !args.is_empty() {
        bail!("benchmark '{name}' takes no arguments (only scale does)");
    }
    let mut command = cargo();
    if name == "passive-flood" {
        command.args([
            "test",
            "--quiet",
            "--release",
            "--package",
            "prober-tests",
            "--test",
            "passive_flood",
            "--",
            "--ignored",
            "--exact",
            "bench_passive_flood",
            "--nocapture",
        ]);
    } else {
        command.args([
            "run",
            "--quiet",
            "--release",
            "--package",
            "prober-tests",
            "--bin",
            "bench",
            "--",
            name,
        ]);
    }
    run_command(&mut command)
}

fn cargo() -> Command {
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
    command
}

/// keepalived is the checker compared against: Debian's package, run in
/// the guest from the host's root like every other program there.
/// ethtool turns GRO on at the director's veth end (see scale.rs: its
/// receive work then runs in a kernel thread that is counted as the
/// checker's).
const SCALE_PACKAGES: &[&str] = &["keepalived", "ethtool"];

/// One vCPU for the director (the checker, IPVS) and one of their own for
/// the real servers, so their kernel work is not charged to the checker.
/// Not three: the host has two cores, and a third vCPU thread made every
/// figure in the guest grow with the contention (10,000 at 1 s: prober's
/// userspace time 3x, 8,112 checks/s instead of 9,995). 8 GiB: at 100,000
/// real servers, 2 GiB ran out while the bed was built (the kernel's
/// compaction stalled, and the OOM killer took the benchmark).
const SCALE_GUEST: vm::GuestShape = vm::GuestShape {
    cpus: 2,
    memory_mib: 8192,
};

/// `cargo xtask bench scale [-- --runs N --cases 1000@1s,...]`.
fn scale(args: &[String]) -> Result<()> {
    setup::install_debian_packages("[bench]", SCALE_PACKAGES)?;
    run_command(cargo().args(["build", "--quiet", "--release", "--package", "prober-user"]))?;
    run_command(cargo().args([
        "build",
        "--quiet",
        "--release",
        "--package",
        "prober-tests",
        "--bin",
        "scale",
    ]))?;
    let release = vm::target_dir().join("release");
    // The guest's writable share: emptied when the guest starts.
    let table = vm::target_dir().join("vm-test").join("scale.md");
    let mut program_args = vec![
        "--prober".to_string(),
        release.join("prober").display().to_string(),
        "--out".to_string(),
        table.display().to_string(),
    ];
    program_args.extend(args.iter().cloned());
    let program = vm::GuestProgram {
        name: "scale".into(),
        path: release.join("scale"),
        args: program_args.clone(),
        alone: true,
    };
    let started = std::time::Instant::now();
    let outcome = vm::run_programs(&[program], Duration::from_secs(4 * 3600), SCALE_GUEST);
    let finished = matches!(&outcome, Ok(results) if results.iter().all(|r| r.status == Some(0)));
    let table = std::fs::read_to_string(&table)
        .with_context(|| format!("the benchmark wrote no table to {}", table.display()))?;
    // A run cut short (qemu stopped, or the guest failed) still leaves
    // the runs measured so far, marked as such.
    let table = if finished {
        table
    } else {
        format!("**Incomplete:** the benchmark did not finish; the runs measured before it stopped:\n\n{table}")
    };
    let path = workspace_root().join("BENCHMARKS.md");
    std::fs::write(&path, benchmarks_page(&table, args, started.elapsed())?)?;
    println!("[bench] table written to {}", path.display());
    outcome?;
    if !finished {
        bail!("the scale benchmark failed in the guest (its runs so far are in BENCHMARKS.md)");
    }
    Ok(())
}

fn benchmarks_page(table: &str, args: &[String], took: Duration) -> Result<String> {
    let text = |program: &str, args: &[&str]| {
        command_stdout(Command::new(program).args(args))
            .map(|s| s.trim().to_string())
            .unwrap_or_else(|_| "unknown".into())
    };
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into());
    let commit = text(
        "git",
        &[
            "-C",
            &workspace_root().display().to_string(),
            "rev-parse",
            "--short",
            "HEAD",
        ],
    );
    let dirty = !text(
        "git",
        &[
            "-C",
            &workspace_root().display().to_string(),
            "status",
            "--porcelain",
            "--untracked-files=no",
        ],
    )
    .is_empty();
    let keepalived = text("dpkg-query", &["-W", "-f", "${Version}", "keepalived"]);
    let mut page = String::from("# Benchmarks\n\n");
    let _ = writeln!(
        page,
        "## Scale: prober against keepalived\n\n\
         Written by `cargo xtask bench scale{}` on {}, in {:.0} min. Medians of the runs \
         shown in each ratio row.\n",
        if args.is_empty() {
            String::new()
        } else {
            format!(" -- {}", args.join(" "))
        },
        text("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        took.as_secs_f64() / 60.0
    );
    let _ = writeln!(
        page,
        "- **Machine:** {cpu}, {} cores, host kernel {}; the guest (both checkers, IPVS) \
         is qemu with TCG (software emulation, {} vCPUs, {} GiB) running {}.\n\
         - **Commit:** {commit}{}; prober release build.\n\
         - **keepalived:** {keepalived} (Debian).\n",
        text("nproc", &[]),
        text("uname", &["-r"]),
        SCALE_GUEST.cpus,
        SCALE_GUEST.memory_mib / 1024,
        guest_kernel(),
        if dirty {
            " with uncommitted changes"
        } else {
            ""
        },
    );
    page.push_str(table);
    page.push_str(METHOD);
    Ok(page)
}

fn guest_kernel() -> String {
    std::fs::read_dir("/lib/modules")
        .ok()
        .and_then(|d| {
            d.flatten()
                .filter_map(|e| e.file_name().into_string().ok())
                .filter(|r| r.starts_with("6.1."))
                .max()
        })
        .unwrap_or_else(|| "unknown".into())
}

const METHOD: &str = "
### How it is measured

- **The bed**, built once per size inside the guest: a director namespace (IPVS, its `dir0`)
  joined by veth to a real-server namespace (`srv0`) that owns 10.64.0.0/15 as local addresses
  (AnyIP: every address answers, as N hosts would) with one listener on 0.0.0.0:80 that
  accepts and closes. NAT services `TCP 10.200.x.y:80` of 50 real servers each.
- **Both checkers, same settings**, one after the other on the same bed, alternating
  run by run: prober with its L4 SYN probes (`interval` = `timeout` = the case's interval,
  `fall = 3`, `diagnose = false`, `panic_threshold = 0`, everything else default);
  keepalived (`--check`) with a `TCP_CHECK` per real server, `delay_loop` = `connect_timeout` =
  `delay_before_retry` = the interval, `retry 2` (3 failures in a row, like `fall = 3`),
  `inhibit_on_failure` (weight 0, like prober's down). prober finds the services in IPVS;
  keepalived puts them there itself.
- **CPU** is the checker's own work over a 10 s window after 5 s of warm-up: user + system
  time of its processes (keepalived: its parent and its checker process) from
  `/proc/PID/stat`, plus the kernel thread that receives at the director's veth end (threaded
  NAPI: prober's XDP on the replies, keepalived's socket receive), with the kernel's share in
  brackets. The real servers' kernel work (their SYN-ACKs, RSTs, accepts and FINs) runs in the
  real servers' veth end's own kernel thread, pinned with the listener and the benchmark's own
  polling to the guest's last vCPU; the checker and its receive thread are pinned to the
  others (the director's vCPUs), so none of it is charged to the checker. Without that, on
  veth, the real servers' side of each exchange runs in the sender's system call.
  *Director vCPUs* is the director vCPUs' busy time from `/proc/stat` (softirqs and timers
  included). IPVS's rate estimation (a timer over every destination every 2 s) is
  off in the director for both checkers. The guest has 2 vCPUs, one per host core (a third, for more director room, made
  every figure grow with the host's contention). **Checks** are the client SYNs reaching the real servers
  in the window, counted by one tc filter for both. **RSS** is VmRSS at the end of the window,
  the peak (VmHWM, at the end of the run, after the mass death) in brackets, summed over
  keepalived's processes.
- **Death -> weight 0**: one real server's address is blackholed (its SYNs vanish, as when a
  host dies); the time until IPVS shows its weight 0, polled over netlink every 5 ms.
- **Latency -> weight**: one real server's replies are delayed 50 ms by netem; the time until
  its weight in IPVS is at or below 80 % of what it was (keepalived never weighs by latency:
  it is given 10 s).
- **All weights 0 after**: every real server's address is blackholed at once; the time until
  IPVS (dumped over netlink) has no weight above 0. **IPVS writes/s**: prober's own log of its
  write batches (\"IPVS batch of N weights written in X ms\"); keepalived writes one weight
  per failed check, so its figure is the servers taken down divided by the time from the first
  weight 0 seen to the last.
- **TCG** slows everything in the guest, kernel and user space alike, by a large and uneven
  factor, so absolute figures are far above what the same programs cost on hardware. Both
  checkers run under the same emulation, so the ratios are the comparison.
";
