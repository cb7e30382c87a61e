//! `cargo xtask demo`: builds everything, boots the qemu guest (the only
//! place with IPVS here) and runs the demo program of the tests crate
//! (`tests/src/bin/demo.rs`) in it, its output streamed to this terminal.

use std::{process::Command, time::Duration};

use anyhow::{bail, Result};

use crate::{
    build_ebpf, run_command,
    setup::{self, require_root},
    vm, workspace_root,
};

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
        "build",
        "--quiet",
        "--package",
        "prober-tests",
        "--bin",
        "demo",
    ]))?;
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let demo = vm::GuestProgram {
        name: "demo".into(),
        path: target.join("debug").join("demo"),
        args: Vec::new(),
        alone: true,
    };
    let results = vm::run_programs(&[demo], Duration::from_secs(600), vm::GuestShape::TESTS)?;
    if results.iter().any(|r| r.status != Some(0)) {
        bail!("the demo failed in the guest");
    }
    Ok(())
}
