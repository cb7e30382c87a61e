//! `cargo xtask bench <name>`: builds everything, then runs the benchmark
//! program of the tests crate (`tests/src/bin/bench.rs`), optimised, as root.
//! `passive-flood` is the ignored `bench_passive_flood` of
//! `tests/tests/passive_flood.rs`, which shares its flood with the test
//! that proves what a flood evicts.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, run_command, setup, test::require_root, workspace_root};

pub fn run(name: &str) -> Result<()> {
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    let mut command = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    command.current_dir(workspace_root());
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
