//! `prober`: health checks and response-time weights for IPVS, with the
//! probing done in eBPF.

mod client;
mod daemon;
mod ipvs_list;

use std::{io::IsTerminal, path::PathBuf, process::ExitCode, time::Duration};

use clap::{Parser, Subcommand, ValueEnum};
use prober_user::{agent, control, datapath, preflight, probe};

const EXIT_STATUS: &str = "\
EXIT STATUS
    0  success (for `run`: stopped by SIGINT or SIGTERM, datapath detached)
    1  an error, printed on standard error with what and where
    2  bad command line (usage printed)
    3  no daemon runs (status, reload, stats)
    4  `run`: its interface is missing or was removed (IPVS left as it was;
       the systemd unit starts it again until the interface is there)";

const FILES: &str = "\
FILES
    /sys/fs/bpf/prober/      pinned maps (--pin-dir); see the README's \"Pinned maps\"
    /run/prober/NAME.sock    control socket of the daemon whose pin directory is NAME
    /etc/prober/prober.toml  the usual configuration file (the systemd unit's)";

#[derive(Parser)]
#[command(
    name = "prober",
    version,
    about = "eBPF health checker for IPVS directors",
    long_about = "prober checks the real servers of every IPVS virtual service from an \
eBPF datapath (L3/L4 probes at line rate, passive response times of client traffic), \
runs L7 checks and user commands, listens to agents on the real servers, and sets \
each real server's IPVS weight from its health and response time.",
    after_long_help = format!("{EXIT_STATUS}\n\n{FILES}\n\nENVIRONMENT\n    PROBER_LOG    log filter (error, warn, info, debug, trace; or tracing directives)")
)]
struct Cli {
    /// Directory on bpffs where the daemon pins its maps.
    #[arg(long, global = true, default_value = prober_common::PIN_DIR, value_name = "DIR")]
    pin_dir: PathBuf,
    /// The daemon's control socket (default: /run/prober/<pin dir name>.sock).
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Log format on standard error.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    /// One JSON object per line (for log shippers).
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Attach the datapath to an interface and run until SIGINT or SIGTERM
    /// (then detach and unpin): manage the weights of every IPVS service,
    /// or, with --probe, only probe and report.
    #[command(after_long_help = format!("SIGNALS\n    SIGHUP        reload the configuration file (as `prober reload`)\n    SIGINT, SIGTERM  detach, unpin and exit 0\n\nEXAMPLES\n    prober run --iface eth0 --config /etc/prober/prober.toml\n    prober run --iface eth0 --probe tcp:10.0.0.2:80 --probe icmp:10.0.0.3 --interval 200ms\n\n{EXIT_STATUS}\n\n{FILES}"))]
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
        /// eBPF-side diagnostics (rejected replies, failed sends) into the
        /// log at this level and above; `off` removes them from the
        /// programs entirely (the verifier prunes them).
        #[arg(long, value_enum, default_value_t = datapath::EbpfLog::Off)]
        ebpf_log: datapath::EbpfLog,
        /// How probe frames leave: `auto` transmits them from XDP (live
        /// frames) and falls back to a packet socket, with a warning, on a
        /// kernel whose policy forbids that; `live` and `socket` force one.
        #[arg(long, value_enum, default_value_t = probe::transmit::TransmitMode::Auto)]
        transmit: probe::transmit::TransmitMode,
    },
    /// Every virtual service and real server as the running daemon sees
    /// them: state per layer, RTTs, weights, last change and why.
    #[command(after_long_help = format!("COLUMNS\n    state         up, down or drain, all layers together\n    L3 L4 L7      the host's ICMP probe, the L4 probe, the L7 checks passing\n    agent         the agent's weight or state, while it reports\n    rtt           latency estimate (EWMA) / p50 / p99 of probe RTTs, ms\n    hs, resp      passive handshake RTT and response time p50/p99, ms (NAT)\n    weight        configured / computed by prober / in IPVS\n\n{EXIT_STATUS}"))]
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Refresh in place every INTERVAL (default 1s) until interrupted.
        #[arg(long, value_name = "INTERVAL", num_args = 0..=1, default_missing_value = "1s", value_parser = humantime::parse_duration)]
        watch: Option<Duration>,
    },
    /// Make the running daemon re-read its configuration file (as SIGHUP):
    /// applied without detaching, resetting health or rewriting unchanged
    /// weights; a broken file is refused and the old configuration stays.
    #[command(after_long_help = EXIT_STATUS)]
    Reload,
    /// Print the running daemon's counters and per-probe results (from its
    /// pinned maps).
    #[command(after_long_help = EXIT_STATUS)]
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Run on a real server: report its state and weight to the director's
    /// agent port every interval (see README, "Agent feedback").
    #[command(
        after_long_help = "EXAMPLES\n    prober agent --director 10.0.0.1:5555 --weight 80\n    echo drain > /run/lb-state; prober agent --director 10.0.0.1:5555 --from-file /run/lb-state"
    )]
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
        /// Tag reports with the key shared with the director (the file its
        /// `[agent] key_file` names: 32 hex digits, mode 600).
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
    },
    /// Read the kernel's IPVS table (needs CAP_NET_ADMIN).
    #[command(after_long_help = EXIT_STATUS)]
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
    let cli = Cli::parse();
    // eBPF-side records are already filtered by `--ebpf-log` in the
    // programs themselves: let every one that was sent through.
    let filter = tracing_subscriber::EnvFilter::try_from_env("PROBER_LOG")
        .unwrap_or_else(|_| "info".into())
        .add_directive("prober_ebpf=trace".parse().expect("a valid directive"));
    let logs = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Text => logs.with_ansi(std::io::stderr().is_terminal()).init(),
        LogFormat::Json => logs.json().init(),
    }
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| control::socket_path(&cli.pin_dir));
    let result = match cli.command {
        Command::Run {
            iface,
            probes,
            interval,
            config,
            ebpf_log,
            transmit,
        } => daemon::run(&daemon::Daemon {
            ebpf_log,
            transmit,
            interface: iface,
            pin_dir: cli.pin_dir.clone(),
            socket,
            probes,
            interval,
            config_path: config,
        }),
        Command::Status { json, watch } => client::print_status(&socket, json, watch),
        Command::Reload => client::reload_daemon(&socket),
        Command::Stats { json } => client::print_stats(&cli.pin_dir, json),
        Command::Agent {
            director,
            interval,
            state,
            weight,
            from_file,
            count,
            key_file,
        } => (|| {
            let fixed = agent::parse_report(&format!("{state} {weight}"), weight)
                .map_err(anyhow::Error::msg)?;
            let key = key_file
                .map(|path| agent::read_key(&path))
                .transpose()
                .map_err(anyhow::Error::msg)?;
            agent::run(director, interval, fixed, from_file.as_deref(), count, key)
        })(),
        Command::Ipvs {
            command: IpvsCommand::List { json },
        } => ipvs_list::run(json),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("prober: error: {e:#}");
            if e.downcast_ref::<control::NotRunning>().is_some()
                || e.to_string().starts_with("prober is not running")
            {
                ExitCode::from(3)
            } else if e.downcast_ref::<daemon::InterfaceRemoved>().is_some()
                || matches!(
                    e.downcast_ref::<preflight::PreflightError>(),
                    Some(preflight::PreflightError::UnknownInterface(_))
                )
            {
                ExitCode::from(4)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
