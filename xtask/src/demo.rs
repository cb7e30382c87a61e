//! `cargo xtask demo`: builds everything, then runs the demo program of the
//! tests crate (`tests/src/bin/demo.rs`) as root.

use std::process::Command;

use anyhow::Result;

use crate::{build_ebpf, run_command, setup, test::require_root, workspace_root};

pub fn run() -> Result<()> {
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    let cargo = || {
        let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
        cmd.current_dir(workspace_root());
        cmd
    };
    run_command(cargo().args(["build", "--quiet", "--package", "prober-user"]))?;
    run_command(cargo().args([
        "run",
        "--quiet",
        "--package",
        "prober-tests",
        "--bin",
        "demo",
    ]))
}
