//! `prober`: health checks and response-time weights for IPVS, with the
//! probing done in eBPF.

mod ipvs_list;

use std::{
    io::IsTerminal,
    net::Ipv4Addr,
    path::{Path, PathBuf},
    process::ExitCode,
    time::{Duration, Instant},
};

use anyhow::Result;
use clap::{Parser, Subcommand, ValueEnum};
use prober_user::{
    agent, agents, checks, config, control, controller, datapath, metrics, passive, preflight,
    probe, stats, targets,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

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
        } => run(&Daemon {
            ebpf_log,
            transmit,
            interface: iface,
            pin_dir: cli.pin_dir.clone(),
            socket,
            probes,
            interval,
            config_path: config,
        }),
        Command::Status { json, watch } => print_status(&socket, json, watch),
        Command::Reload => reload_daemon(&socket),
        Command::Stats { json } => print_stats(&cli.pin_dir, json),
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
            } else if e.downcast_ref::<InterfaceRemoved>().is_some()
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

/// `prober run` stopped because its interface went away: exit status 4,
/// which the systemd unit restarts on (unlike 1).
#[derive(Debug)]
struct InterfaceRemoved {
    interface: String,
    ifindex: u32,
}

impl std::fmt::Display for InterfaceRemoved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "interface '{}' (index {}) was removed while prober ran; IPVS was left as it was; start prober again once it is back",
            self.interface, self.ifindex
        )
    }
}

impl std::error::Error for InterfaceRemoved {}

/// What `prober run` was asked.
struct Daemon {
    ebpf_log: datapath::EbpfLog,
    transmit: probe::transmit::TransmitMode,
    interface: String,
    pin_dir: PathBuf,
    socket: PathBuf,
    probes: Vec<probe::ProbeSpec>,
    interval: Option<Duration>,
    config_path: Option<PathBuf>,
}

impl Daemon {
    /// The configuration file with the command line's overrides.
    fn config(&self) -> Result<config::Config> {
        let mut config = match &self.config_path {
            Some(path) => config::Config::load(path)?,
            None => config::Config::default(),
        };
        if let Some(interval) = self.interval {
            if interval < Duration::from_millis(10) {
                anyhow::bail!("--interval {interval:?} is below the 10ms minimum");
            }
            config.interval = interval;
            config.timeout = config.timeout.min(interval);
        }
        Ok(config)
    }

    /// Where agents report, when the config has `[agent]`.
    fn agent_address(&self, config: &config::Config) -> Result<Option<Ipv4Addr>> {
        let Some(agent) = config.agent else {
            return Ok(None);
        };
        match agent.address {
            Some(address) => Ok(Some(address)),
            None => preflight::interface_ipv4(&self.interface).map(Some).ok_or_else(|| {
                anyhow::anyhow!(
                    "[agent]: interface '{}' has no IPv4 address for agents to report to; set `address`",
                    self.interface
                )
            }),
        }
    }

    /// Re-reads the file and hands it to the controller; the old
    /// configuration stays on any error.
    fn reload(&self, controller: &mut controller::Controller) -> Result<String> {
        let Some(path) = &self.config_path else {
            return Ok("no --config file: nothing to reload".into());
        };
        let config = self.config()?;
        let agent_address = self.agent_address(&config)?;
        if config.metrics != controller.config().metrics {
            warn!("[metrics] changes take effect at the next start");
        }
        controller.reload(config, agent_address, Instant::now())?;
        Ok(format!("configuration {} applied", path.display()))
    }
}

/// What the daemon does each tick.
enum Mode {
    /// Probes from the command line: probe and report only.
    ProbesOnly(Box<probe::Prober>),
    /// Every IPVS service, as the config says.
    Ipvs(Box<controller::Controller>),
}

fn run(daemon: &Daemon) -> Result<()> {
    let config = daemon.config()?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        // Signal handlers first: a signal during attach must not kill us
        // before we can clean up.
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        let mut hangup = signal(SignalKind::hangup())?;
        let interface = daemon.interface.as_str();
        let capacity = datapath_capacity(&config, daemon.probes.len());
        let mut datapath =
            datapath::Datapath::attach(interface, &daemon.pin_dir, daemon.ebpf_log, capacity)?;
        if let Some(logger) = datapath.logger(daemon.ebpf_log)? {
            // Records reach the log as they come (through the `log` facade),
            // drained on a thread of their own: a flood of them (forged
            // replies at debug level) cannot stall the main loop.
            std::thread::Builder::new()
                .name("ebpf-log".into())
                .spawn(move || drain_ebpf_log(logger))?;
        }
        let (maps, probe_tx) = datapath.prober_parts()?;
        let ifindex = preflight::interface_index(interface)?;
        let mut prober = probe::Prober::new(maps, probe_tx, interface, ifindex, &daemon.probes)?;
        prober.set_transmit(daemon.transmit)?;
        let mut mode = if daemon.probes.is_empty() {
            let passive = passive::Passive::new(datapath.passive_maps()?);
            if let (Some(agent), Some(address)) = (config.agent, daemon.agent_address(&config)?) {
                prober.set_agent(address, agent.port, agent.key)?;
                info!(%address, port = agent.port, deadline = ?agent.deadline, "agent reports accepted");
            }
            let extras = controller::Extras {
                gate: Some(checks::dr::Gate::new(datapath.dr_checks_map()?)),
                agents: Some(agents::Agents::new(
                    datapath.agents_map()?,
                    config.agent.map(|a| a.deadline),
                )),
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
        let mut control = control::ControlServer::listen(&daemon.socket)?;
        if let (Some(listen), Mode::Ipvs(_)) = (config.metrics, &mode) {
            metrics::serve(listen, control.sender()).await?;
        }
        let tick_of = |mode: &Mode| match mode {
            Mode::Ipvs(c) => c.tick_interval(),
            Mode::ProbesOnly(_) => config.interval,
        };
        let mut tick = tick_of(&mode);
        info!(
            probes = daemon.probes.len(),
            mode = if matches!(mode, Mode::Ipvs(_)) {
                "IPVS"
            } else {
                "probes only"
            },
            ?tick,
            socket = %daemon.socket.display(),
            "running; stop with SIGINT or SIGTERM"
        );
        let started = Instant::now();
        // The next tick: a regular (full) one every `tick`, or sooner when
        // a probe is due to be settled or sent (its own timeout, its grid).
        let mut next_tick = Instant::now();
        let mut next_regular = next_tick;
        let ifindex = preflight::interface_index(interface)?;
        // IPVS is read and written on a thread of its own; its answers
        // bring the next tick forward.
        let ipvs_answered = match &mode {
            Mode::Ipvs(c) => Some(c.ipvs_wake()),
            Mode::ProbesOnly(_) => None,
        };
        let name = loop {
            let mut reloaded = None;
            tokio::select! {
                _ = interrupt.recv() => break "SIGINT",
                _ = terminate.recv() => break "SIGTERM",
                _ = hangup.recv() => {
                    info!("SIGHUP: reloading the configuration");
                    reloaded = Some(apply_reload(daemon, &mut mode));
                }
                Some((request, reply)) = control.next() => {
                    let response = match (request, &mut mode) {
                        (control::Request::Status, Mode::Ipvs(c)) => control::Response::Status(
                            Box::new(snapshot(daemon, c, started)),
                        ),
                        (control::Request::Metrics, Mode::Ipvs(c)) => control::Response::Metrics(
                            metrics::encode_status(snapshot(daemon, c, started)),
                        ),
                        (control::Request::Reload, _) => {
                            let result = apply_reload(daemon, &mut mode);
                            let response = match &result {
                                Ok(message) => control::Response::Reload { ok: true, message: message.clone() },
                                Err(message) => control::Response::Reload { ok: false, message: message.clone() },
                            };
                            reloaded = Some(result);
                            response
                        }
                        (_, Mode::ProbesOnly(_)) => control::Response::Error(
                            "this daemon only probes (--probe): see `prober stats`".into(),
                        ),
                    };
                    let _ = reply.send(response);
                }
                _ = notified(ipvs_answered.as_deref()) => {
                    next_tick = Instant::now();
                }
                _ = tokio::time::sleep_until(next_tick.into()) => {
                    let woke = Instant::now();
                    // A wake just before the regular tick takes its place.
                    let full = woke + tick / 8 >= next_regular;
                    if full {
                        next_regular = woke + tick;
                    }
                    // Its programs went with it: probes would stop and
                    // every server would look dead. Stop without touching
                    // IPVS; a supervisor restarts us once it is back.
                    if !preflight::interface_exists(ifindex) {
                        break "interface removed";
                    }
                    match &mut mode {
                    Mode::Ipvs(controller) => {
                        let mut open_store = || datapath.open_state();
                        if let Err(e) = controller.tick(Instant::now(), full, &mut open_store) {
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
                    }
                    let wake = match &mode {
                        Mode::Ipvs(controller) => controller.next_wake(),
                        Mode::ProbesOnly(_) => None,
                    };
                    next_tick = next_tick_at(next_regular, wake);
                },
            }
            // A new interval takes effect at once.
            if let Some(Ok(_)) = reloaded {
                let new_tick = tick_of(&mode);
                if new_tick != tick {
                    tick = new_tick;
                    next_regular = next_regular.min(Instant::now() + tick);
                    next_tick = next_tick.min(next_regular);
                }
            }
        };
        drop(control);
        drop(mode);
        if name == "interface removed" {
            error!(
                interface,
                ifindex, "interface removed: stopping, IPVS weights left as they are"
            );
            datapath.interface_removed();
            datapath.detach()?;
            return Err(InterfaceRemoved {
                interface: interface.to_string(),
                ifindex,
            }
            .into());
        }
        info!(signal = name, "stopping");
        datapath.detach()
    })
}

/// Resolves when `notify` is notified; never without one.
async fn notified(notify: Option<&tokio::sync::Notify>) {
    match notify {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// How many probes the datapath is sized for: `max_probes`, else what IPVS
/// needs now with room to grow (an IPVS not readable yet: the least).
fn datapath_capacity(config: &config::Config, command_line_probes: usize) -> u32 {
    if let Some(capacity) = config.max_probes {
        info!(capacity, "datapath sized by max_probes");
        return capacity;
    }
    if command_line_probes > 0 {
        return targets::capacity_for(command_line_probes);
    }
    let dump = prober_ipvs::IpvsClient::connect().and_then(|mut ipvs| ipvs.dump());
    match dump {
        Ok(services) => {
            let needed = targets::plan(&services, config).probes.len();
            let capacity = targets::capacity_for(needed);
            info!(
                needed,
                capacity, "datapath sized for the probes IPVS needs, with room to grow"
            );
            capacity
        }
        Err(e) => {
            let capacity = prober_common::MAX_TARGETS;
            info!(
                capacity,
                "IPVS not readable at start ({e}): datapath sized for the least"
            );
            capacity
        }
    }
}

/// When to tick next: at the regular time, or sooner for a probe that is
/// due.
fn next_tick_at(regular: Instant, wake: Option<Instant>) -> Instant {
    wake.map_or(regular, |w| w.min(regular))
}

/// Waits for eBPF log records and writes them out, until the process ends.
fn drain_ebpf_log(mut logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    use std::os::fd::AsRawFd;
    let fd = logger.as_raw_fd();
    loop {
        let mut poll = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one pollfd we own; the fd lives as long as `logger`.
        if unsafe { libc::poll(&mut poll, 1, 1000) } < 0 {
            std::thread::sleep(Duration::from_millis(100));
            continue;
        }
        // A malformed record must not end eBPF logging for good.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| logger.flush())).is_err() {
            warn!("an eBPF log record could not be read; skipping it");
        }
    }
}

/// Reloads, logging the outcome; the error is the message for the caller.
fn apply_reload(daemon: &Daemon, mode: &mut Mode) -> Result<String, String> {
    let Mode::Ipvs(controller) = mode else {
        return Err("this daemon only probes (--probe): nothing to reload".into());
    };
    match daemon.reload(controller) {
        Ok(message) => {
            info!("reload: {message}");
            Ok(message)
        }
        Err(e) => {
            let message = format!("{e:#}");
            warn!("reload refused, the running configuration stays: {message}");
            Err(message)
        }
    }
}

fn snapshot(
    daemon: &Daemon,
    controller: &controller::Controller,
    started: Instant,
) -> prober_user::status::Status {
    let mut status = controller.status(Instant::now());
    status.pid = std::process::id();
    status.interface = daemon.interface.clone();
    status.config = daemon.config_path.as_ref().map(|p| p.display().to_string());
    status.uptime_s = started.elapsed().as_secs_f64();
    status.interval_ms = controller.config().interval.as_millis() as u64;
    match stats::read_counters(&daemon.pin_dir) {
        Ok(c) => status.datapath = c,
        Err(e) => warn!("reading COUNTERS: {e:#}"),
    }
    status
}

fn print_status(socket: &Path, json: bool, watch: Option<Duration>) -> Result<()> {
    loop {
        let status = match control::request(socket, control::Request::Status)? {
            control::Response::Status(status) => status,
            control::Response::Error(e) => anyhow::bail!("{e}"),
            other => anyhow::bail!("unexpected answer: {other:?}"),
        };
        let text = if json {
            serde_json::to_string_pretty(&status)?
        } else {
            prober_user::status::table(&status)
        };
        match watch {
            None => {
                println!("{text}");
                return Ok(());
            }
            Some(every) => {
                // Home and clear, then the new table: refreshed in place.
                println!("\x1b[H\x1b[2J{text}");
                std::thread::sleep(every);
            }
        }
    }
}

fn reload_daemon(socket: &Path) -> Result<()> {
    match control::request(socket, control::Request::Reload)? {
        control::Response::Reload { ok: true, message } => {
            println!("{message}");
            Ok(())
        }
        control::Response::Reload { ok: false, message } => {
            anyhow::bail!("reload refused, the running configuration stays: {message}")
        }
        control::Response::Error(e) => anyhow::bail!("{e}"),
        other => anyhow::bail!("unexpected answer: {other:?}"),
    }
}

fn print_stats(pin_dir: &Path, json: bool) -> Result<()> {
    let all = stats::read(pin_dir)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&all)?);
        return Ok(());
    }
    let stats = &all.counters;
    println!(
        "ingress: {} frames, {} bytes; replies matched {}, late {}, rejected {}; resets sent {}; probes built {}, errors {}",
        stats.packets,
        stats.bytes,
        stats.replies_matched,
        stats.replies_late,
        stats.replies_rejected,
        stats.resets_sent,
        stats.probes_built,
        stats.probe_errors
    );
    let refused = stats.agent_unauthenticated + stats.agent_replayed;
    if stats.agent_reports + stats.agent_malformed + stats.agent_unknown + refused > 0 {
        println!(
            "agent datagrams: {} recorded, {} malformed, {} from outside the pool, {} with a wrong tag, {} replayed",
            stats.agent_reports,
            stats.agent_malformed,
            stats.agent_unknown,
            stats.agent_unauthenticated,
            stats.agent_replayed
        );
    }
    if !all.targets.is_empty() {
        println!(
            "{:>5}  {:<40} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}",
            "id", "probe", "sent", "answered", "refused", "unreach", "timeout", "last rtt"
        );
        for t in &all.targets {
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
