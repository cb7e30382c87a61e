//! `prober`: health checks and response-time weights for IPVS, with the
//! probing done in eBPF.

mod ipvs_list;

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::{Parser, Subcommand};
use prober_user::{
    agent, agents, checks, config, controller, datapath, passive, preflight, probe, stats,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{info, warn};

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
    /// Attach the datapath to an interface and run until SIGINT or SIGTERM
    /// (then detach and unpin): manage the weights of every IPVS service,
    /// or, with --probe, only probe and report.
    Run {
        /// The director's interface: probes leave by it, replies are matched
        /// on it.
        #[arg(long, value_name = "INTERFACE")]
        iface: String,
        /// A probe: icmp:ADDR, tcp:ADDR:PORT, tcp:VIP:PORT,dr=RS or
        /// tcp:VIP:PORT,tun=RS. Repeat for more. With probes given, prober
        /// only probes them and reports (`prober stats`), leaving IPVS alone.
        #[arg(long = "probe", value_name = "SPEC")]
        probes: Vec<probe::ProbeSpec>,
        /// Time between two probes of a target (e.g. 200ms, 1s); overrides
        /// the config's `interval` (default 1s).
        #[arg(long, value_parser = humantime::parse_duration)]
        interval: Option<Duration>,
        /// Configuration file (TOML, see the README); without one every
        /// setting has its default.
        #[arg(long, value_name = "FILE")]
        config: Option<PathBuf>,
    },
    /// Print the running daemon's counters and per-probe results (from its
    /// pinned maps).
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run on a real server: report its state and weight to the director's
    /// agent port every interval (see README, "Agent feedback").
    Agent {
        /// The director's address and agent port, e.g. 10.0.0.1:5555.
        #[arg(long, value_name = "ADDR:PORT")]
        director: std::net::SocketAddr,
        /// Time between two reports.
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        interval: Duration,
        /// State to report: up, drain or down.
        #[arg(long, default_value = "up", value_parser = ["up", "drain", "down"])]
        state: String,
        /// Weight to report while up (0-65535).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(0..=65535))]
        weight: u32,
        /// Read "STATE [WEIGHT]" (e.g. "up 80", "drain") from this file's
        /// first line before each report, when it exists.
        #[arg(long, value_name = "FILE")]
        from_file: Option<PathBuf>,
        /// Stop after this many reports (default: run until killed).
        #[arg(long)]
        count: Option<u64>,
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
        Command::Run {
            iface,
            probes,
            interval,
            config,
        } => run(&iface, &cli.pin_dir, &probes, interval, config.as_deref()),
        Command::Stats { json } => print_stats(&cli.pin_dir, json),
        Command::Agent {
            director,
            interval,
            state,
            weight,
            from_file,
            count,
        } => agent::parse_report(&format!("{state} {weight}"), weight)
            .map_err(anyhow::Error::msg)
            .and_then(|fixed| agent::run(director, interval, fixed, from_file.as_deref(), count)),
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

/// What the daemon does each tick.
enum Mode {
    /// Probes from the command line: probe and report only.
    ProbesOnly(Box<probe::Prober>),
    /// Every IPVS service, as the config says.
    Ipvs(Box<controller::Controller>),
}

fn run(
    interface: &str,
    pin_dir: &Path,
    probes: &[probe::ProbeSpec],
    interval: Option<Duration>,
    config_path: Option<&Path>,
) -> Result<()> {
    let mut config = match config_path {
        Some(path) => config::Config::load(path)?,
        None => config::Config::default(),
    };
    if let Some(interval) = interval {
        if interval < Duration::from_millis(10) {
            anyhow::bail!("--interval {interval:?} is below the 10ms minimum");
        }
        config.interval = interval;
        config.timeout = config.timeout.min(interval);
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Signal handlers first: a signal during attach must not kill us
        // before we can clean up.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut datapath = datapath::Datapath::attach(interface, pin_dir)?;
        let (maps, probe_tx) = datapath.prober_parts()?;
        let ifindex = preflight::interface_index(interface)?;
        let mut prober = probe::Prober::new(maps, probe_tx, interface, ifindex, probes)?;
        let mut mode = if probes.is_empty() {
            let passive = passive::Passive::new(datapath.passive_maps()?);
            let agents = match config.agent {
                Some(agent) => {
                    let address = match agent.address {
                        Some(address) => address,
                        None => preflight::interface_ipv4(interface).ok_or_else(|| {
                            anyhow::anyhow!(
                                "[agent]: interface '{interface}' has no IPv4 address for agents to report to; set `address`"
                            )
                        })?,
                    };
                    prober.set_agent(address, agent.port)?;
                    info!(%address, port = agent.port, deadline = ?agent.deadline, "agent reports accepted");
                    Some(agents::Agents::new(datapath.agents_map()?, agent.deadline))
                }
                None => None,
            };
            let extras = controller::Extras {
                gate: Some(checks::dr::Gate::new(datapath.dr_checks_map()?)),
                agents,
            };
            Mode::Ipvs(Box::new(controller::Controller::new(
                config.clone(),
                prober,
                passive,
                extras,
                Instant::now(),
            )))
        } else {
            Mode::ProbesOnly(Box::new(prober))
        };
        let tick = match &mode {
            Mode::Ipvs(c) => c.tick_interval(),
            Mode::ProbesOnly(_) => config.interval,
        };
        info!(
            probes = probes.len(),
            mode = if matches!(mode, Mode::Ipvs(_)) {
                "IPVS"
            } else {
                "probes only"
            },
            ?tick,
            "running; stop with SIGINT or SIGTERM"
        );
        let mut ticker = tokio::time::interval(tick);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let name = loop {
            tokio::select! {
                _ = interrupt.recv() => break "SIGINT",
                _ = terminate.recv() => break "SIGTERM",
                _ = ticker.tick() => match &mut mode {
                    Mode::Ipvs(controller) => {
                        let mut open_store = || datapath.open_state();
                        if let Err(e) = controller.tick(Instant::now(), &mut open_store) {
                            warn!("controller: {e:#}");
                        }
                    }
                    Mode::ProbesOnly(prober) => {
                        if let Err(e) = prober.follow_kernel() {
                            warn!("following route and neighbour changes: {e:#}");
                        }
                        if let Err(e) = prober.send_round() {
                            warn!("sending probes: {e:#}");
                        }
                    }
                },
            }
        };
        info!(signal = name, "stopping");
        drop(mode);
        datapath.detach()
    })
}

fn print_stats(pin_dir: &Path, json: bool) -> Result<()> {
    let stats = stats::read(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&stats)?);
        return Ok(());
    }
    println!(
        "ingress: {} frames, {} bytes; replies matched {}, rejected {}; resets sent {}; probes built {}, errors {}",
        stats.packets,
        stats.bytes,
        stats.replies_matched,
        stats.replies_rejected,
        stats.resets_sent,
        stats.probes_built,
        stats.probe_errors
    );
    if stats.agent_reports + stats.agent_malformed + stats.agent_unknown > 0 {
        println!(
            "agent datagrams: {} recorded, {} malformed, {} from outside the pool",
            stats.agent_reports, stats.agent_malformed, stats.agent_unknown
        );
    }
    if !stats.targets.is_empty() {
        println!(
            "{:>5}  {:<40} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
            "id", "probe", "sent", "answered", "refused", "unreach", "timeout", "last rtt"
        );
        for t in &stats.targets {
            let rtt = if t.last_rtt_ns == 0 {
                "-".to_string()
            } else {
                format!("{:.3} ms", t.last_rtt_ns as f64 / 1e6)
            };
            println!(
                "{:>5}  {:<40} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
                t.id, t.probe, t.sent, t.answered, t.refused, t.unreachable, t.timed_out, rtt
            );
        }
    }
    Ok(())
}
