//! `cargo xtask bench <name>`: builds everything, then runs the benchmark
//! program of the tests crate (`tests/src/bin/bench.rs`), optimised, as root.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, run_command, setup, test::require_root, workspace_root};

pub fn run(name: &str) -> Result<()> {
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    run_command(
        Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()))
            .current_dir(workspace_root())
            .args([
                "run",
                "--quiet",
                "--release",
                "--package",
                "prober-tests",
                "--bin",
                "bench",
                "--",
                name,
            ]),
    )
}
