//! Project commands: `cargo xtask <command>`. Every command that needs tools
//! installs them first (see `setup`), so a fresh machine needs nothing else.

mod bench;
mod build_ebpf;
mod demo;
mod fuzz;
mod reliability;
mod setup;
mod test;
mod vm;

use std::path::PathBuf;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "prober's build, test and demo commands")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Install what this machine lacks: Debian packages, nightly rust-src,
    /// bpf-linker (built against nightly's LLVM), a mounted bpffs.
    Setup,
    /// Build the eBPF object (nightly, -Z build-std=core, bpf-linker, BTF).
    BuildEbpf,
    /// Run every check: formatting, clippy (userspace and eBPF), unit and
    /// integration tests (root needed).
    Test,
    /// Build everything and show prober at work on a throwaway topology.
    Demo,
    /// Fuzz the parsers of untrusted input (the config file, IPVS's netlink
    /// replies) with cargo-fuzz on nightly; installs cargo-fuzz first.
    Fuzz {
        /// How long to run each target.
        #[arg(long, default_value_t = fuzz::DEFAULT_SECONDS, value_name = "N")]
        seconds: u64,
        /// Targets to run (config, netlink); default: all.
        targets: Vec<String>,
    },
    /// Try every fault and hostile input (host tests, fuzzing, faults
    /// against real IPVS in the guest) and write RELIABILITY.md from what
    /// they recorded.
    Reliability,
    /// Run a benchmark and print its figures (medians of several runs).
    Bench {
        /// Which one: probe, passive, passive-flood, scale.
        name: String,
        /// Arguments for the benchmark (scale: --runs N, --cases
        /// SERVERS@INTERVAL,...).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run the guest test binaries (real IPVS) inside a qemu guest booted
    /// from Debian's 6.1 kernel; installs what the guest needs first.
    VmTest {
        /// A test target of prober-tests to run (repeatable); default: all
        /// guest tests.
        #[arg(long = "test", value_name = "NAME")]
        tests: Vec<String>,
        /// Kill the guest after this many seconds (a full run takes about
        /// half of the default here).
        #[arg(long, default_value_t = 3000, value_name = "SECONDS")]
        timeout: u64,
        /// Arguments for each test binary, e.g. a test name filter.
        #[arg(last = true)]
        test_args: Vec<String>,
    },
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Setup => setup::run().map(|_| ()),
        Command::BuildEbpf => {
            let tools = setup::run()?;
            build_ebpf::run(&tools)
        }
        Command::Test => test::run(),
        Command::Demo => demo::run(),
        Command::Fuzz { seconds, targets } => fuzz::command(seconds, &targets),
        Command::Reliability => reliability::run(),
        Command::Bench { name, args } => bench::run(&name, &args),
        Command::VmTest {
            tests,
            timeout,
            test_args,
        } => vm::run(&vm::VmTestOptions {
            tests,
            test_args,
            timeout: std::time::Duration::from_secs(timeout),
        }),
    }
}

/// The workspace root (xtask lives one level below it).
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask sits inside the workspace")
        .to_path_buf()
}

/// Runs a command, echoing it, and fails with the command line if it fails.
pub fn run_command(cmd: &mut std::process::Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}").replace('"', "");
    println!("$ {shown}");
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start `{shown}`: {e}"))?;
    if !status.success() {
        anyhow::bail!("`{shown}` failed with {status}");
    }
    Ok(())
}
