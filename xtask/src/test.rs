//! `cargo xtask test`: every check CI runs, in order, each one named.

use std::{process::Command, time::Instant};

use anyhow::{Context, Result};

use crate::{
    build_ebpf, fuzz, run_command,
    setup::{self, require_root},
    vm, workspace_root,
};

/// How long `cargo xtask fuzz` runs each target in the test command.
const FUZZ_SECONDS: u64 = 30;

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn run() -> Result<()> {
    let started = Instant::now();
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;

    step("formatting", cargo().args(["fmt", "--all", "--check"]))?;
    step(
        "clippy, userspace crates",
        cargo()
            .args([
                "clippy",
                "--workspace",
                "--exclude",
                "prober-ebpf",
                "--all-targets",
                // Lints the guest-only tests too (they are not run here).
                "--features",
                "prober-tests/guest",
            ])
            .args(["--", "-D", "warnings"]),
    )?;
    step(
        "clippy, eBPF crate",
        build_ebpf::nightly_cargo(&tools)?
            .args(["clippy", "--package", "prober-ebpf", "--release"])
            .args(["--target", build_ebpf::EBPF_TARGET, "-Z", "build-std=core"])
            .args(["--", "-D", "warnings"]),
    )?;
    // The integration tests run the daemon binary itself.
    step(
        "build prober",
        cargo().args(["build", "--package", "prober-user"]),
    )?;
    step(
        "unit and integration tests",
        cargo().args(["test", "--workspace", "--exclude", "prober-ebpf"]),
    )?;
    // The parsers of untrusted input (config file, IPVS's netlink replies)
    // under libFuzzer, briefly: a new panic in them shows here.
    let started_fuzz = Instant::now();
    println!("[test] fuzzing ({FUZZ_SECONDS} s per target)");
    fuzz::run(FUZZ_SECONDS, &[])
        .and_then(|outcomes| fuzz::check(&outcomes))
        .context("step failed: fuzzing")?;
    println!(
        "[test] fuzzing: ok ({:.1} s)",
        started_fuzz.elapsed().as_secs_f64()
    );
    // Not optional: the IPVS client is only proven against a real IPVS.
    let started_guest = Instant::now();
    println!("[test] guest tests (real IPVS in a qemu guest)");
    vm::test_in_guest(&vm::VmTestOptions::default())
        .context("step failed: guest tests (real IPVS in a qemu guest)")?;
    println!(
        "[test] guest tests (real IPVS in a qemu guest): ok ({:.1} s)",
        started_guest.elapsed().as_secs_f64()
    );
    println!(
        "[test] all checks passed in {:.0} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

fn step(name: &str, cmd: &mut Command) -> Result<()> {
    let started = Instant::now();
    println!("[test] {name}");
    run_command(cmd).with_context(|| format!("step failed: {name}"))?;
    println!(
        "[test] {name}: ok ({:.1} s)",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
