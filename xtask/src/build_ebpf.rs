//! Builds the eBPF object with nightly, -Z build-std=core and bpf-linker,
//! with BTF so maps and their fields have names in the kernel.

use std::{path::PathBuf, process::Command};

use anyhow::{Context, Result};

use crate::{run_command, setup::Tools, workspace_root};

pub const EBPF_TARGET: &str = "bpfel-unknown-none";

/// Where the object lands (prober-user's build script embeds it from here).
pub fn object_path() -> PathBuf {
    target_dir()
        .join(EBPF_TARGET)
        .join("release")
        .join("prober-ebpf")
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// A cargo of the nightly toolchain, cleared of what the outer (stable)
/// cargo put in the environment.
pub fn nightly_cargo(tools: &Tools) -> Result<Command> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    let mut paths = vec![tools.bpf_linker_bin_dir.clone()];
    paths.extend(std::env::split_paths(&path));
    let mut cmd = Command::new("rustup");
    cmd.args(["run", "nightly", "cargo"])
        .current_dir(workspace_root())
        .env(
            "PATH",
            std::env::join_paths(paths).context("building PATH")?,
        );
    for var in [
        "RUSTUP_TOOLCHAIN",
        "RUSTC",
        "RUSTC_WRAPPER",
        "RUSTC_WORKSPACE_WRAPPER",
        "RUSTDOC",
        "CARGO",
        "RUSTFLAGS",
        "CARGO_ENCODED_RUSTFLAGS",
    ] {
        cmd.env_remove(var);
    }
    Ok(cmd)
}

pub fn run(tools: &Tools) -> Result<()> {
    println!("[build-ebpf] building prober-ebpf for {EBPF_TARGET}");
    run_command(
        nightly_cargo(tools)?
            .args(["build", "--package", "prober-ebpf", "--release"])
            .args(["--target", EBPF_TARGET, "-Z", "build-std=core"])
            .env("CARGO_ENCODED_RUSTFLAGS", ebpf_rustflags()),
    )?;
    let object = object_path();
    let size = std::fs::metadata(&object)
        .with_context(|| format!("the build did not produce {}", object.display()))?
        .len();
    println!("[build-ebpf] {} ({size} bytes)", object.display());
    Ok(())
}

/// BTF (`--btf` to bpf-linker, from full debug info) gives maps and their
/// key/value fields names that `bpftool map dump` prints.
pub fn ebpf_rustflags() -> String {
    ["-C", "debuginfo=2", "-C", "link-arg=--btf"].join("\x1f")
}
