//! `prober run`: loads the datapath, then one loop takes signals,
//! control requests (status, metrics, reload) and the ticks that probe,
//! judge and write weights.

use std::{
    net::Ipv4Addr,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::Result;
use prober_user::{
    agents, checks, config, control, controller, datapath, metrics, passive, preflight, probe,
    stats, targets,
};
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

/// `prober run` stopped because its interface went away: exit status 4,
/// which the systemd unit restarts on (unlike 1).
#[derive(Debug)]
pub struct InterfaceRemoved {
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
pub struct Daemon {
    pub ebpf_log: datapath::EbpfLog,
    pub transmit: probe::transmit::TransmitMode,
    pub interface: String,
    pub pin_dir: PathBuf,
    pub socket: PathBuf,
    pub probes: Vec<probe::ProbeSpec>,
    pub interval: Option<Duration>,
    pub config_path: Option<PathBuf>,
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

/// IPVS's change signal, or None with a warning saying what it costs.
fn ipvs_change_signal(
    datapath: &mut datapath::Datapath,
) -> Option<prober_user::ipvs_changes::IpvsChangeSignal> {
    if std::env::var_os("PROBER_DEBUG_NO_IPVS_SIGNAL").is_some() {
        return None;
    }
    // Resolving IPVS's netlink family loads the ip_vs module if it is not
    // yet (the kernel's module alias), so the functions to probe exist.
    let _ = prober_ipvs::IpvsClient::connect();
    match datapath.ipvs_change_signal() {
        Ok(signal) => {
            info!(
                "IPVS configuration changes signalled by kretprobes: IPVS is read when it changes"
            );
            Some(signal)
        }
        Err(e) => {
            warn!(
                "no signal of IPVS configuration changes ({e:#}): IPVS is dumped in full every discovery period ({:?} by default) instead",
                config::DEFAULT_DISCOVERY
            );
            None
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

pub fn run(daemon: &Daemon) -> Result<()> {
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
        let (maps, sender) = datapath.prober_parts()?;
        let ifindex = preflight::interface_index(interface)?;
        let mut prober = probe::Prober::new(maps, sender, interface, ifindex, &daemon.probes)?;
        prober.set_transmit(daemon.transmit)?;
        // A second handle on the pinned counters: the replies the datapath
        // matched tell the director path's verdict that answers still come.
        prober.watch_counters(probe::report::open_pinned(
            &daemon.pin_dir,
            prober_common::map_names::COUNTERS,
        )?);
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
                ipvs_changes: ipvs_change_signal(&mut datapath),
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
                        // Nothing judges them here: the ring is kept empty
                        // so `events_lost` means what it says elsewhere.
                        prober.discard_events();
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
    status.memory = prober_user::status::Memory::now();
    match stats::read_counters(&daemon.pin_dir) {
        Ok(c) => status.datapath = c,
        Err(e) => warn!("reading COUNTERS: {e:#}"),
    }
    status
}
