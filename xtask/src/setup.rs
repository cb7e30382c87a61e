//! Installs what a fresh Debian 12 machine of this kind lacks. Every step
//! checks first and does nothing when its result is already there, so a
//! second run takes seconds.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
    time::Instant,
};

use anyhow::{bail, Context, Result};

use crate::run_command;

/// Debian packages the build, tests and demo use.
const DEBIAN_PACKAGES: &[&str] = &["bpftool", "iproute2", "util-linux", "iputils-ping"];

const BPF_LINKER_VERSION: &str = "0.13.0";

/// Paths of tools that setup guarantees.
pub struct Tools {
    /// Folder holding the bpf-linker binary, to put first on PATH.
    pub bpf_linker_bin_dir: PathBuf,
}

pub fn run() -> Result<Tools> {
    let started = Instant::now();
    install_debian_packages("[setup]", DEBIAN_PACKAGES)?;
    install_rust_src()?;
    let bpf_linker_bin_dir = install_bpf_linker()?;
    mount_bpffs()?;
    println!("[setup] done in {:.1} s", started.elapsed().as_secs_f64());
    Ok(Tools { bpf_linker_bin_dir })
}

/// Installs those of `packages` that are missing; `tag` prefixes progress lines.
pub fn install_debian_packages(tag: &str, packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages
        .iter()
        .copied()
        .filter(|p| !debian_package_installed(p))
        .collect();
    if missing.is_empty() {
        println!(
            "{tag} Debian packages: all present ({})",
            packages.join(", ")
        );
        return Ok(());
    }
    println!("{tag} Debian packages: installing {}", missing.join(", "));
    run_command(Command::new("apt-get").args(["update", "-q"]))
        .context("apt-get update (root and access to Debian's mirrors are needed)")?;
    run_command(
        Command::new("apt-get")
            .args(["install", "-y", "-q", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive"),
    )
    .context("installing Debian packages")?;
    Ok(())
}

fn debian_package_installed(package: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
        .unwrap_or(false)
}

fn install_rust_src() -> Result<()> {
    let out = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", "nightly"])
        .output()
        .context("running rustup (is rustup on PATH?)")?;
    if !out.status.success() {
        bail!(
            "the nightly toolchain is missing: `rustup toolchain list` must show nightly \
             (the eBPF crate needs it for -Z build-std)"
        );
    }
    if String::from_utf8_lossy(&out.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        println!("[setup] nightly rust-src: present");
        return Ok(());
    }
    println!("[setup] nightly rust-src: installing");
    run_command(Command::new("rustup").args([
        "component",
        "add",
        "rust-src",
        "--toolchain",
        "nightly",
    ]))
}

/// Builds bpf-linker against the nightly toolchain's own libLLVM, so their
/// LLVM majors always agree. The install is keyed by that library's file name:
/// a new nightly gets a new bpf-linker, an unchanged one reuses the cache.
fn install_bpf_linker() -> Result<PathBuf> {
    let sysroot = command_stdout(Command::new("rustc").args(["+nightly", "--print", "sysroot"]))?;
    let lib_dir = Path::new(sysroot.trim()).join("lib");
    let libllvm = fs::read_dir(&lib_dir)
        .with_context(|| format!("reading {}", lib_dir.display()))?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .find(|n| n.starts_with("libLLVM.so."))
        .with_context(|| format!("no libLLVM.so.* in {}", lib_dir.display()))?;
    // "libLLVM.so.22.1-rust-1.97.0-nightly" -> 22
    let llvm_major: u32 = libllvm["libLLVM.so.".len()..]
        .split(['.', '-'])
        .next()
        .and_then(|m| m.parse().ok())
        .with_context(|| format!("cannot read the LLVM version from {libllvm}"))?;

    let cache = cache_dir().join(format!("bpf-linker-{BPF_LINKER_VERSION}-{libllvm}"));
    let bin_dir = cache.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if linker.exists()
        && Command::new(&linker)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false)
    {
        println!(
            "[setup] bpf-linker {BPF_LINKER_VERSION} (LLVM {llvm_major}): present in {}",
            bin_dir.display()
        );
        return Ok(bin_dir);
    }

    // llvm-sys links "-lLLVM" from LLVM_PREFIX/lib and the binary loads the
    // library by its versioned name: both names must resolve.
    let llvm_prefix = cache.join("llvm");
    let llvm_lib = llvm_prefix.join("lib");
    fs::create_dir_all(&llvm_lib)?;
    for name in ["libLLVM.so", libllvm.as_str()] {
        let link = llvm_lib.join(name);
        let _ = fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir.join(&libllvm), &link)
            .with_context(|| format!("symlinking {}", link.display()))?;
    }
    println!(
        "[setup] bpf-linker {BPF_LINKER_VERSION}: building against nightly's LLVM {llvm_major} \
         (one time, about 3-5 minutes)"
    );
    run_command(
        Command::new("cargo")
            .args([
                "install",
                "bpf-linker",
                "--locked",
                "--version",
                BPF_LINKER_VERSION,
            ])
            .args([
                "--no-default-features",
                "--features",
                &format!("llvm-{llvm_major}"),
            ])
            .arg("--root")
            .arg(&cache)
            .env("LLVM_PREFIX", &llvm_prefix)
            .env_remove("RUSTUP_TOOLCHAIN")
            .env_remove("CARGO_TARGET_DIR"),
    )
    .context("building bpf-linker")?;
    Ok(bin_dir)
}

fn mount_bpffs() -> Result<()> {
    let mounts = fs::read_to_string("/proc/mounts").context("reading /proc/mounts")?;
    if mounts.lines().any(|l| {
        l.split_whitespace().nth(1) == Some("/sys/fs/bpf")
            && l.split_whitespace().nth(2) == Some("bpf")
    }) {
        println!("[setup] bpffs: mounted at /sys/fs/bpf");
        return Ok(());
    }
    println!("[setup] bpffs: mounting at /sys/fs/bpf");
    fs::create_dir_all("/sys/fs/bpf").ok();
    run_command(Command::new("mount").args(["-t", "bpf", "bpf", "/sys/fs/bpf"]))
}

/// Cache for built tools: survives across runs on one machine, never needed.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"))
        .join("prober")
}

pub fn command_stdout(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Setting up, testing, benches and the demo install packages, load eBPF
/// programs and create network namespaces.
pub fn require_root() -> Result<()> {
    let status =
        std::fs::read_to_string("/proc/self/status").context("reading /proc/self/status")?;
    let euid = status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        .unwrap_or("?");
    if euid != "0" {
        bail!("this command needs root (it installs packages, loads eBPF programs and creates network namespaces); run it as root");
    }
    Ok(())
}
