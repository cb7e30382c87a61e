//! `prober`: health checks and response-time weights for IPVS, with the
//! probing done in eBPF.

mod datapath;
mod ipvs_list;
mod preflight;
mod stats;

use std::{io::IsTerminal, path::PathBuf, process::ExitCode};

use anyhow::Result;
use clap::{Parser, Subcommand};
use tokio::signal::unix::{signal, SignalKind};
use tracing::info;

#[derive(Parser)]
#[command(
    name = "prober",
    version,
    about = "eBPF health checker for IPVS directors"
)]
struct Cli {
    /// Directory on bpffs where the daemon pins its maps.
    #[arg(long, global = true, default_value = prober_common::PIN_DIR, value_name = "DIR")]
    pin_dir: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath to an interface and run until SIGINT or SIGTERM,
    /// then detach and unpin.
    Run {
        /// The director's interface that carries real-server traffic.
        #[arg(long, value_name = "INTERFACE")]
        iface: String,
    },
    /// Print the counters of the running daemon (from its pinned maps).
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Read the kernel's IPVS table (needs CAP_NET_ADMIN).
    Ipvs {
        #[command(subcommand)]
        command: IpvsCommand,
    },
}

#[derive(Subcommand)]
enum IpvsCommand {
    /// Every virtual service and real server with forwarding, weight,
    /// connections, counters, thresholds and tunnel settings (like
    /// `ipvsadm -Ln --stats`).
    List {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PROBER_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run { iface } => run(&iface, &cli.pin_dir),
        Command::Stats { json } => print_stats(&cli.pin_dir, json),
        Command::Ipvs {
            command: IpvsCommand::List { json },
        } => ipvs_list::run(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prober: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(interface: &str, pin_dir: &std::path::Path) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Signal handlers first: a signal during attach must not kill us
        // before we can clean up.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut datapath = datapath::Datapath::attach(interface, pin_dir)?;
        info!("running; stop with SIGINT or SIGTERM");
        let name = tokio::select! {
            _ = interrupt.recv() => "SIGINT",
            _ = terminate.recv() => "SIGTERM",
        };
        info!(signal = name, "stopping");
        datapath.detach()
    })
}

fn print_stats(pin_dir: &std::path::Path, json: bool) -> Result<()> {
    let stats = stats::read_interface_stats(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
    } else {
        println!("XDP ingress counters (all CPUs)");
        println!("  packets  {}", stats.packets);
        println!("  bytes    {}", stats.bytes);
    }
    Ok(())
}
