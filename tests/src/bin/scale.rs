//! `cargo xtask bench scale`, its guest side: prober and keepalived checking
//! the same N real servers across the same veth, with real IPVS, one after
//! the other, and what each costs and how fast each reacts.
//!
//! The bed: a director namespace (IPVS, `eth0` 192.0.2.1) joined by veth to
//! a real-server namespace (`eth0` 192.0.2.2) that owns 10.64.0.0/15 as local
//! addresses (an AnyIP route: every address in it answers, as N hosts
//! would) with one listener on 0.0.0.0:80 that accepts and closes. Real
//! server i is 10.64.0.1 + i; NAT services `TCP 10.200.x.y:80` of 50 real
//! servers each. A real server dies by a blackhole route for its address
//! (its SYNs vanish, as when a host dies), turns slow by netem on its
//! replies, and all die at once by a blackhole route for the /15. Checks are
//! counted as SYNs arriving at the real servers (a tc filter), the same
//! counter for both checkers.
//!
//! The real servers' kernel work is kept off the checker's account: both
//! veth ends run threaded NAPI, the real servers' end (their TCP, the
//! SYN-ACKs, the accepts) pinned to the guest's last vCPU with the
//! listener and this program, the director's end (the replies' arrival:
//! prober's XDP, keepalived's socket receive) pinned with the checker to
//! the other vCPUs and counted as the checker's kernel time.
//!
//! Usage: `scale [--runs N] [--cases 1000@1s,10000@1s,...] [--tools
//! prober,keepalived] [--keepalived-most N] [--prober PATH] [--out FILE]
//! [--profile DIR] [--logs DIR]`.

use std::{
    fmt::Write as _,
    fs::File,
    io::Write as _,
    net::{IpAddr, Ipv4Addr, TcpListener},
    os::{fd::AsRawFd, unix::process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread::{self, JoinHandle},
    time::{Duration, Instant, SystemTime},
};

use anyhow::{bail, Context, Result};
use prober_ipvs::{IpvsClient, Protocol, ServiceKey};
use prober_tests::{
    prober_bin,
    procfs::{processes, stat_cpu_seconds},
    run, unique_name, NetNs, PeerXdp, PinDir, READY_LINE,
};

/// Real servers per virtual service.
const PER_SERVICE: usize = 50;
/// Failures in a row that take a real server down, for both checkers.
const FALL: u32 = 3;
/// After a checker is up: time to settle before measuring.
const WARM: Duration = Duration::from_secs(5);
/// The window CPU and checks are measured over.
const STEADY: Duration = Duration::from_secs(10);
/// Delay added to one real server's replies for the latency phase.
const SLOW_BY_MS: u32 = 50;
/// A weight at or below this share of its old value counts as moved by
/// latency (the first step prober takes is 25 %; noise moves less).
const LATENCY_MOVED: f64 = 0.8;
/// The director's end of the veth pair and the real servers' end.
const DIRECTOR_IF: &str = "dir0";
const SERVER_IF: &str = "srv0";
const WEIGHT: u32 = 100;
/// The real servers' addresses, all local to their namespace, and how
/// many of them a case may use.
const REAL_SERVERS_NET: &str = "10.64.0.0/15";
const MOST_SERVERS: usize = 130_000;

fn main() -> Result<()> {
    let options = Options::parse(std::env::args().skip(1))?;
    run_modprobe()?;
    let cpus = Cpus::split()?;
    println!(
        "[scale] director vCPUs {:?} (the checker and its receive thread), real servers' vCPU {}",
        cpus.director, cpus.servers
    );
    // This program (its listener threads, its polling of IPVS) works on
    // the real servers' vCPU; the checker is moved when it starts.
    cpus.pin(0, &[cpus.servers])?;
    let _syslog = Syslog::start()?;
    let mut report = Report::default();
    for case in &options.cases {
        println!(
            "[scale] {} real servers, interval {} ms: building the bed",
            case.servers,
            case.interval.as_millis()
        );
        let bed = Bed::new(case.servers, cpus.clone())?;
        for run in 1..=options.runs {
            for &tool in &options.tools {
                if tool == Tool::Keepalived && case.servers > options.keepalived_most {
                    continue;
                }
                // A run that fails (a checker that never got going at this
                // size) is reported and counted, and the others go on.
                match measure(&bed, tool, case.interval, &options) {
                    Ok(sample) => {
                        println!(
                            "[scale] {} real servers, run {run}/{}, {}: {}",
                            case.servers,
                            options.runs,
                            tool.name(),
                            sample.summary()
                        );
                        report.add(case, tool, sample);
                        // The table so far, in case the run is cut short.
                        if let Some(out) = &options.out {
                            let _ = std::fs::write(out, report.table());
                        }
                    }
                    Err(e) => {
                        println!(
                            "[scale] {} real servers, run {run}/{}, {}: FAILED: {e:#}",
                            case.servers,
                            options.runs,
                            tool.name()
                        );
                        report.failures.push(format!(
                            "{} real servers at {} ms, {} run {run}: {e:#}",
                            case.servers,
                            case.interval.as_millis(),
                            tool.name()
                        ));
                    }
                }
            }
        }
    }
    let table = report.table();
    println!("\n{table}");
    if let Some(out) = &options.out {
        std::fs::write(out, &table).with_context(|| format!("writing {}", out.display()))?;
    }
    Ok(())
}

fn run_modprobe() -> Result<()> {
    run(Command::new("modprobe").arg("ip_vs"))?;
    Ok(())
}

#[derive(Debug, Clone)]
struct Case {
    servers: usize,
    interval: Duration,
}

struct Options {
    cases: Vec<Case>,
    runs: usize,
    prober: PathBuf,
    out: Option<PathBuf>,
    tools: Vec<Tool>,
    /// keepalived is measured only at sizes up to this: at 50,000 it
    /// reached 575 of 50,000 checks/s and never took a dead server out
    /// (BENCHMARKS.md of 2026-11-26), and its start alone takes minutes.
    keepalived_most: usize,
    /// Where `perf report`s of the steady window go (perf on the host).
    profile: Option<PathBuf>,
    /// Where the checkers' logs go (appended run after run).
    logs: Option<PathBuf>,
}

impl Options {
    fn parse(mut args: impl Iterator<Item = String>) -> Result<Self> {
        let mut options = Self {
            cases: parse_cases("1000@1s,10000@1s,50000@1s,100000@1s")?,
            runs: 3,
            prober: prober_bin(),
            out: None,
            tools: vec![Tool::Prober, Tool::Keepalived],
            keepalived_most: 10_000,
            profile: None,
            logs: None,
        };
        while let Some(arg) = args.next() {
            let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
            match arg.as_str() {
                "--runs" => {
                    let text = value()?;
                    options.runs = text
                        .parse()
                        .ok()
                        .filter(|r| *r > 0)
                        .with_context(|| format!("--runs: '{text}' is not a positive count"))?
                }
                "--cases" => options.cases = parse_cases(&value()?)?,
                "--keepalived-most" => {
                    let text = value()?;
                    options.keepalived_most = text.parse().with_context(|| {
                        format!("--keepalived-most: '{text}' is not a count of real servers")
                    })?
                }
                "--prober" => options.prober = value()?.into(),
                "--out" => options.out = Some(value()?.into()),
                "--profile" => options.profile = Some(value()?.into()),
                "--logs" => options.logs = Some(value()?.into()),
                "--tools" => {
                    options.tools = value()?
                        .split(',')
                        .map(|t| match t {
                            "prober" => Ok(Tool::Prober),
                            "keepalived" => Ok(Tool::Keepalived),
                            other => bail!("--tools: unknown checker '{other}' (prober, keepalived)"),
                        })
                        .collect::<Result<_>>()?
                }
                other => bail!(
                    "unknown argument '{other}' (known: --runs, --cases, --tools, --keepalived-most, --prober, --out, --profile, --logs)"
                ),
            }
        }
        Ok(options)
    }
}

/// "1000@1s,50000@200ms": real servers and probe interval per case.
fn parse_cases(text: &str) -> Result<Vec<Case>> {
    text.split(',')
        .map(|case| {
            let (servers, interval) = case
                .split_once('@')
                .with_context(|| format!("--cases: '{case}' is not SERVERS@INTERVAL"))?;
            let servers: usize = servers
                .parse()
                .ok()
                .filter(|n| (1..=MOST_SERVERS).contains(n))
                .with_context(|| {
                    format!("--cases: '{servers}' is not 1 to {MOST_SERVERS} servers")
                })?;
            let interval = if let Some(ms) = interval.strip_suffix("ms") {
                ms.parse().ok().map(Duration::from_millis)
            } else if let Some(s) = interval.strip_suffix('s') {
                s.parse().ok().map(Duration::from_secs_f64)
            } else {
                None
            }
            .filter(|d| *d >= Duration::from_millis(50))
            .with_context(|| {
                format!("--cases: '{interval}' is not an interval like 1s or 200ms")
            })?;
            Ok(Case { servers, interval })
        })
        .collect()
}

fn real_server(i: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 64, 0, 1)) + i as u32)
}

fn virtual_ip(service: usize) -> Ipv4Addr {
    Ipv4Addr::from(u32::from(Ipv4Addr::new(10, 200, 0, 1)) + service as u32)
}

fn service_key(service: usize) -> ServiceKey {
    ServiceKey::Address {
        protocol: Protocol::Tcp,
        addr: IpAddr::V4(virtual_ip(service)),
        port: 80,
    }
}

/// Which vCPUs do the director's work and which the real servers'.
#[derive(Debug, Clone)]
struct Cpus {
    director: Vec<usize>,
    servers: usize,
}

impl Cpus {
    /// The last vCPU for the real servers, the others for the director.
    fn split() -> Result<Self> {
        let count = thread::available_parallelism()?.get();
        if count < 2 {
            bail!(
                "the bed needs at least 2 vCPUs (one for the real servers), this guest has {count}"
            );
        }
        Ok(Self {
            director: (0..count - 1).collect(),
            servers: count - 1,
        })
    }

    /// Moves `pid` (0: the calling thread) onto `cpus`.
    fn pin(&self, pid: u32, cpus: &[usize]) -> Result<()> {
        set_affinity(pid, cpus).with_context(|| format!("pinning {pid} to vCPUs {cpus:?}"))
    }

    /// The threaded NAPI kernel threads of both veth ends, each onto its
    /// side's vCPUs; returns the director's (its CPU time is the
    /// checker's receive work).
    fn pin_receive_threads(&self) -> Result<Vec<u32>> {
        let mut director = Vec::new();
        for (pid, comm) in processes() {
            if comm.starts_with(&format!("napi/{SERVER_IF}")) {
                self.pin(pid, &[self.servers])?;
            } else if comm.starts_with(&format!("napi/{DIRECTOR_IF}")) {
                self.pin(pid, &self.director)?;
                director.push(pid);
            }
        }
        if director.is_empty() {
            bail!("no threaded NAPI thread for {DIRECTOR_IF}: the checker's receive work would go uncounted");
        }
        Ok(director)
    }
}

/// sched_setaffinity for a process or thread (0: the caller).
fn set_affinity(pid: u32, cpus: &[usize]) -> std::io::Result<()> {
    // SAFETY: a zeroed cpu_set_t is an empty set; CPU_SET writes inside it
    // for indexes below CPU_SETSIZE (the guest has a handful).
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in cpus {
            libc::CPU_SET(cpu, &mut set);
        }
        if libc::sched_setaffinity(pid as libc::pid_t, std::mem::size_of_val(&set), &set) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// The director and the real servers, built once per size.
struct Bed {
    director: NetNs,
    servers: NetNs,
    n: usize,
    cpus: Cpus,
    ipvs: std::cell::RefCell<IpvsClient>,
    _listener: Listener,
    _peer_xdp: PeerXdp,
}

impl Bed {
    fn new(n: usize, cpus: Cpus) -> Result<Self> {
        let director = NetNs::new("scd")?;
        let servers = NetNs::new("scs")?;
        director.ip(&[
            "link",
            "add",
            DIRECTOR_IF,
            "type",
            "veth",
            "peer",
            "name",
            SERVER_IF,
            "netns",
            &servers.name,
        ])?;
        director.ip(&["addr", "add", "192.0.2.1/24", "dev", DIRECTOR_IF])?;
        servers.ip(&["addr", "add", "192.0.2.2/24", "dev", SERVER_IF])?;
        director.ip(&["link", "set", DIRECTOR_IF, "up"])?;
        servers.ip(&["link", "set", SERVER_IF, "up"])?;
        servers.ip(&["route", "add", "local", REAL_SERVERS_NET, "dev", "lo"])?;
        director.ip(&["route", "add", REAL_SERVERS_NET, "via", "192.0.2.2"])?;
        // keepalived's connects must not be refused by a full accept queue:
        // that would be the bed failing, not it. The director keeps Linux's
        // ephemeral range (below prober's 61000-65535): a wider one let
        // keepalived's connections leave TIME_WAIT entries on prober's
        // probe ports, and prober's next run saw its servers as dead.
        servers.sysctl("net.core.somaxconn", "65535")?;
        // IPVS's rate estimation walks every service and destination every
        // 2 s in a timer on one CPU (6.1: no kthreads yet): neither
        // checker's work, off for both.
        director.sysctl("net.ipv4.vs.run_estimation", "0")?;
        servers.sysctl("net.ipv4.tcp_max_syn_backlog", "65535")?;
        let tc = |args: &[&str]| run(Command::new("tc").args(["-n", &servers.name]).args(args));
        // Checks, counted as client SYNs (SYN without ACK) arriving.
        tc(&["qdisc", "add", "dev", SERVER_IF, "clsact"])?;
        tc(&[
            "filter", "add", "dev", SERVER_IF, "ingress", "protocol", "ip", "u32", "match", "ip",
            "protocol", "6", "0xff", "match", "u8", "0x02", "0x12", "at", "33", "action", "ok",
        ])?;
        // Replies of the real server the latency phase slows go to band 3.
        tc(&[
            "qdisc", "add", "dev", SERVER_IF, "root", "handle", "1:", "prio",
        ])?;
        tc(&[
            "qdisc",
            "add",
            "dev",
            SERVER_IF,
            "parent",
            "1:3",
            "handle",
            "30:",
            "netem",
            "delay",
            &format!("{SLOW_BY_MS}ms"),
        ])?;
        // Each end's receive work in a kernel thread of its own (pinned
        // per measurement, see `Cpus`). A veth end has NAPI once XDP is
        // attached (the real servers' end: needed anyway for prober's
        // XDP_TX and redirects to reach it) or GRO is on (the director's
        // end, which prober's XDP comes and goes on); veth hands a frame
        // to that NAPI only if GRO could merge it: XDP on the receiver, or
        // TSO off on the sender (the XDP on the real servers' end turns it
        // off on ours; we turn it off on theirs).
        let peer_xdp = PeerXdp::attach(&servers, SERVER_IF)?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &director.name,
            "ethtool",
            "-K",
            DIRECTOR_IF,
            "gro",
            "on",
        ]))?;
        run(Command::new("ip").args([
            "netns",
            "exec",
            &servers.name,
            "ethtool",
            "-K",
            SERVER_IF,
            "tso",
            "off",
        ]))?;
        for (ns, interface) in [(&servers, SERVER_IF), (&director, DIRECTOR_IF)] {
            run(Command::new("ip")
                .args(["netns", "exec", &ns.name, "sh", "-c"])
                .arg(format!("echo 1 > /sys/class/net/{interface}/threaded")))?;
        }
        let listener = Listener::start(&servers)?;
        let ipvs = director.enter(IpvsClient::connect)??;
        Ok(Self {
            director,
            servers,
            n,
            cpus,
            ipvs: std::cell::RefCell::new(ipvs),
            _listener: listener,
            _peer_xdp: peer_xdp,
        })
    }

    fn services(&self) -> usize {
        self.n.div_ceil(PER_SERVICE)
    }

    /// Client SYNs that reached the real servers so far.
    fn syns(&self) -> Result<u64> {
        let out = run(Command::new("tc").args([
            "-n",
            &self.servers.name,
            "-s",
            "filter",
            "show",
            "dev",
            SERVER_IF,
            "ingress",
        ]))?;
        let text = String::from_utf8_lossy(&out.stdout);
        let words: Vec<&str> = text.split_whitespace().collect();
        words
            .windows(5)
            .find(|w| w[0] == "Sent" && w[2] == "bytes" && w[4] == "pkt")
            .and_then(|w| w[3].parse().ok())
            .with_context(|| format!("no packet count in `tc -s filter show`: {text}"))
    }

    fn ipvsadm(&self, args: &[&str], stdin: Option<String>) -> Result<()> {
        let mut child = self
            .director
            .command("ipvsadm")
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .context("starting ipvsadm")?;
        let mut pipe = child.stdin.take().expect("stdin is piped");
        if let Some(text) = stdin {
            pipe.write_all(text.as_bytes())?;
        }
        drop(pipe);
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "ipvsadm {args:?}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The services prober finds in IPVS (keepalived makes its own).
    fn load_services(&self) -> Result<()> {
        let mut rules = String::new();
        for s in 0..self.services() {
            let _ = writeln!(rules, "-A -t {}:80 -s wrr", virtual_ip(s));
        }
        for i in 0..self.n {
            let _ = writeln!(
                rules,
                "-a -t {}:80 -r {}:80 -m -w {WEIGHT}",
                virtual_ip(i / PER_SERVICE),
                real_server(i)
            );
        }
        self.ipvsadm(&["-R"], Some(rules))
    }

    fn flush(&self) -> Result<()> {
        self.ipvsadm(&["-C"], None)
    }

    fn weight(&self, i: usize) -> Result<Option<u32>> {
        let destinations = self
            .ipvs
            .borrow_mut()
            .destinations(&service_key(i / PER_SERVICE))?;
        let addr = IpAddr::V4(real_server(i));
        Ok(destinations
            .iter()
            .find(|d| d.addr == addr)
            .map(|d| d.weight))
    }

    /// Destinations in IPVS, and how many have a weight above 0.
    fn census(&self) -> Result<(usize, usize)> {
        let dump = self.ipvs.borrow_mut().dump()?;
        let all = dump.iter().map(|s| s.destinations.len()).sum();
        let up = dump
            .iter()
            .flat_map(|s| &s.destinations)
            .filter(|d| d.weight > 0)
            .count();
        Ok((all, up))
    }

    fn route(&self, args: &[&str]) -> Result<()> {
        self.servers.ip(&[&["route"], args].concat())?;
        Ok(())
    }

    fn kill(&self, i: usize) -> Result<()> {
        let addr = format!("{}/32", real_server(i));
        self.route(&["add", "blackhole", &addr, "table", "local"])
    }

    fn revive(&self, i: usize) -> Result<()> {
        let addr = format!("{}/32", real_server(i));
        self.route(&["del", "blackhole", &addr, "table", "local"])
    }

    fn kill_all(&self) -> Result<()> {
        self.route(&["replace", "blackhole", REAL_SERVERS_NET, "table", "local"])
    }

    fn revive_all(&self) -> Result<()> {
        self.route(&[
            "replace",
            "local",
            REAL_SERVERS_NET,
            "dev",
            "lo",
            "table",
            "local",
        ])
    }

    fn slow(&self, i: usize) -> Result<()> {
        let addr = format!("{}/32", real_server(i));
        run(Command::new("tc").args([
            "-n",
            &self.servers.name,
            "filter",
            "add",
            "dev",
            SERVER_IF,
            "parent",
            "1:",
            "protocol",
            "ip",
            "prio",
            "1",
            "u32",
            "match",
            "ip",
            "src",
            &addr,
            "flowid",
            "1:3",
        ]))?;
        Ok(())
    }

    fn unslow(&self) -> Result<()> {
        run(Command::new("tc").args([
            "-n",
            &self.servers.name,
            "filter",
            "del",
            "dev",
            SERVER_IF,
            "parent",
            "1:",
            "protocol",
            "ip",
            "prio",
            "1",
        ]))?;
        Ok(())
    }
}

/// Where keepalived's syslog messages go.
const KEEPALIVED_LOG: &str = "/tmp/scale-keepalived.log";

/// `/dev/log` for keepalived, as a director's syslog daemon has it: one
/// datagram per message, appended to [`KEEPALIVED_LOG`]. The guest has no
/// syslog daemon, and keepalived's `--log-console` writes to the emulated
/// serial console, which stalled it for tens of seconds.
struct Syslog {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl Syslog {
    fn start() -> Result<Self> {
        let _ = std::fs::remove_file("/dev/log");
        let socket = std::os::unix::net::UnixDatagram::bind("/dev/log")
            .context("binding /dev/log for keepalived")?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(KEEPALIVED_LOG)?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = thread::spawn(move || {
            let mut message = vec![0u8; 8192];
            while !stopping.load(Ordering::Relaxed) {
                if let Ok(n) = socket.recv(&mut message) {
                    let _ = file.write_all(&message[..n]);
                    let _ = file.write_all(b"\n");
                }
            }
        });
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for Syslog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
        let _ = std::fs::remove_file("/dev/log");
    }
}

/// The real servers' one listener: accepts and closes, on two threads.
struct Listener {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
}

impl Listener {
    fn start(ns: &NetNs) -> Result<Self> {
        let socket = ns.enter(|| -> Result<TcpListener> {
            let socket = TcpListener::bind("0.0.0.0:80")?;
            let timeout = libc::timeval {
                tv_sec: 0,
                tv_usec: 100_000,
            };
            // SAFETY: listen and setsockopt on a socket we own; a second
            // listen() only raises the backlog. The timeout lets the
            // threads see `stop`.
            unsafe {
                if libc::listen(socket.as_raw_fd(), 65_535) != 0
                    || libc::setsockopt(
                        socket.as_raw_fd(),
                        libc::SOL_SOCKET,
                        libc::SO_RCVTIMEO,
                        (&timeout as *const libc::timeval).cast(),
                        std::mem::size_of::<libc::timeval>() as u32,
                    ) != 0
                {
                    bail!("listener: {}", std::io::Error::last_os_error());
                }
            }
            Ok(socket)
        })??;
        let stop = Arc::new(AtomicBool::new(false));
        let mut threads = Vec::new();
        for _ in 0..2 {
            let socket = socket.try_clone()?;
            let stop = stop.clone();
            threads.push(thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    // Accepted and dropped at once; errors are timeouts.
                    let _ = socket.accept();
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tool {
    Prober,
    Keepalived,
}

impl Tool {
    fn name(self) -> &'static str {
        match self {
            Tool::Prober => "prober",
            Tool::Keepalived => "keepalived",
        }
    }
}

/// A checker running in the director's namespace.
struct Checker {
    child: Child,
    log: PathBuf,
    _files: Vec<PathBuf>,
    /// prober's pins and its binary (to ask it for its status).
    pin_dir: Option<PinDir>,
    prober: PathBuf,
}

fn seconds(interval: Duration) -> String {
    format!("{}", interval.as_secs_f64())
}

impl Checker {
    fn command(bed: &Bed, program: &Path) -> Command {
        let mut command = bed.director.command(program);
        let director_cpus = bed.cpus.director.clone();
        // SAFETY: setrlimit and sched_setaffinity between fork and exec
        // touch only the child and allocate nothing. 50,000 checks in
        // flight need as many sockets in keepalived.
        unsafe {
            command.pre_exec(move || {
                let limit = libc::rlimit {
                    rlim_cur: 1 << 20,
                    rlim_max: 1 << 20,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
                set_affinity(0, &director_cpus)
            });
        }
        command
    }

    fn start(bed: &Bed, tool: Tool, interval: Duration, prober: &Path) -> Result<Self> {
        let log = std::env::temp_dir().join(format!("{}.log", unique_name("scale-")));
        let config = std::env::temp_dir().join(unique_name("scale-conf-"));
        let mut files = vec![log.clone(), config.clone()];
        let (child, pin_dir) = match tool {
            Tool::Prober => {
                bed.load_services()?;
                let i = seconds(interval);
                std::fs::write(
                    &config,
                    format!(
                        "[daemon]\ninterval = \"{i}s\"\ntimeout = \"{i}s\"\nfall = {FALL}\n\
                         diagnose = false\n\n[weights]\npanic_threshold = 0.0\n"
                    ),
                )?;
                let pin_dir = PinDir::new();
                let child = Self::command(bed, prober)
                    .arg("--pin-dir")
                    .arg(&*pin_dir)
                    .args(["run", "--iface", DIRECTOR_IF, "--config"])
                    .arg(&config)
                    .stdout(Stdio::null())
                    .stderr(File::create(&log)?)
                    .spawn()
                    .context("starting prober")?;
                (child, Some(pin_dir))
            }
            Tool::Keepalived => {
                std::fs::write(&config, keepalived_config(bed, interval))?;
                let pid =
                    |name: &str| std::env::temp_dir().join(format!("{}.pid", unique_name(name)));
                let pids = [pid("ka-"), pid("ka-check-"), pid("ka-vrrp-")];
                files.extend(pids.iter().cloned());
                // Its log is what /dev/log receives (see `Syslog`).
                File::create(KEEPALIVED_LOG)?;
                let child = Self::command(bed, Path::new("keepalived"))
                    .args(["--dont-fork", "--check", "--use-file"])
                    .arg(&config)
                    .arg("--pid")
                    .arg(&pids[0])
                    .arg("--checkers_pid")
                    .arg(&pids[1])
                    .arg("--vrrp_pid")
                    .arg(&pids[2])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()
                    .context("starting keepalived")?;
                (child, None)
            }
        };
        let log = match tool {
            Tool::Prober => log,
            Tool::Keepalived => PathBuf::from(KEEPALIVED_LOG),
        };
        Ok(Self {
            child,
            log,
            _files: files,
            pin_dir,
            prober: prober.to_path_buf(),
        })
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The checker's processes: itself and its children (keepalived's
    /// checker process).
    fn pids(&self) -> Vec<u32> {
        let parent = self.child.id();
        let mut pids = vec![parent];
        if let Ok(entries) = std::fs::read_dir("/proc") {
            for entry in entries.flatten() {
                let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse().ok()) else {
                    continue;
                };
                if stat_fields(pid).and_then(|f| f.get(1)?.parse::<u32>().ok()) == Some(parent) {
                    pids.push(pid);
                }
            }
        }
        pids
    }

    /// User and system CPU seconds of the checker's processes so far,
    /// and of the director's receive threads (`receive`): kernel time
    /// spent on the checker's replies.
    fn cpu_seconds(&self, receive: &[u32]) -> CpuSeconds {
        let (user, system) = process_cpu_seconds(self.pids());
        let (_, receive) = process_cpu_seconds(receive.to_vec());
        CpuSeconds {
            user,
            system,
            receive,
        }
    }

    /// Resident memory of the checker's processes, summed, in KiB: now
    /// (`VmRSS`) or at its peak (`VmHWM`).
    fn memory_kib(&self, field: &str) -> u64 {
        self.pids()
            .into_iter()
            .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .filter_map(|status| {
                status
                    .lines()
                    .find(|l| l.starts_with(field))?
                    .split_whitespace()
                    .nth(1)?
                    .parse::<u64>()
                    .ok()
            })
            .sum()
    }

    /// What `prober stats` says (datapath counters), for the logs.
    fn stats_text(&self) -> Option<String> {
        let text = String::from_utf8_lossy(&self.prober_says(&["stats"])?).into_owned();
        // The counters, not the table of every target; and the daemon's
        // own account of its sends.
        let mut said: Vec<String> = text.lines().take(6).map(String::from).collect();
        if let Some(status) = self.status() {
            let fields = [
                "largest_send",
                "sends_late",
                "frames_dropped_here",
                "probe_events",
                "slots_skipped",
                "pools_recomputed",
                "wakes",
            ];
            said.push(
                fields
                    .iter()
                    .map(|f| format!("{f}={}", status[f]))
                    .collect::<Vec<_>>()
                    .join(" "),
            );
        }
        Some(said.join("\n"))
    }

    /// prober's heap as it says in `status` (live allocations, free), KiB.
    fn heap_kib(&self) -> Option<(u64, u64)> {
        let status = self.status()?;
        let memory = &status["memory"];
        Some((
            memory["heap_in_use_kib"].as_u64()?,
            memory["heap_free_kib"].as_u64()?,
        ))
    }

    fn status(&self) -> Option<serde_json::Value> {
        serde_json::from_slice(&self.prober_says(&["status", "--json"])?).ok()
    }

    /// What `prober ARGS` prints against this checker's pins (prober only).
    fn prober_says(&self, args: &[&str]) -> Option<Vec<u8>> {
        let pin_dir = self.pin_dir.as_ref()?;
        let out = Command::new(&self.prober)
            .arg("--pin-dir")
            .arg(&**pin_dir)
            .args(args)
            .output()
            .ok()?;
        Some(out.stdout)
    }

    fn check_alive(&mut self) -> Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("exited with {status}: {}", tail(&self.log(), 20));
        }
        Ok(())
    }

    fn stop(&mut self) -> Result<()> {
        // SAFETY: kill(2) on our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(60);
        while self.child.try_wait()?.is_none() {
            if Instant::now() > deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("did not stop within 60 s of SIGTERM");
            }
            thread::sleep(Duration::from_millis(50));
        }
        Ok(())
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        for file in &self._files {
            let _ = std::fs::remove_file(file);
        }
    }
}

/// Every thread's CPU seconds so far (user + system), by thread id, with
/// its command name.
fn thread_cpu_seconds() -> std::collections::HashMap<u32, (String, f64)> {
    let mut threads = std::collections::HashMap::new();
    for (pid, _) in processes() {
        let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
            continue;
        };
        for task in tasks.flatten() {
            let Some(tid) = task
                .file_name()
                .to_str()
                .and_then(|t| t.parse::<u32>().ok())
            else {
                continue;
            };
            if let Some((comm, user, system)) =
                stat_cpu_seconds(&format!("/proc/{pid}/task/{tid}/stat"))
            {
                threads.insert(tid, (comm, user + system));
            }
        }
    }
    threads
}

/// The `most` threads that used the most CPU between two snapshots.
fn busiest_threads(
    before: &std::collections::HashMap<u32, (String, f64)>,
    after: &std::collections::HashMap<u32, (String, f64)>,
    most: usize,
) -> String {
    let mut used: Vec<(f64, &str, u32)> = after
        .iter()
        .map(|(tid, (comm, seconds))| {
            let earlier = before.get(tid).map_or(0.0, |(_, s)| *s);
            (seconds - earlier, comm.as_str(), *tid)
        })
        .filter(|(seconds, _, _)| *seconds > 0.0)
        .collect();
    used.sort_by(|a, b| b.0.total_cmp(&a.0));
    used.iter()
        .take(most)
        .map(|(seconds, comm, tid)| format!("{comm} ({tid}) {seconds:.2} s"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// CPU seconds so far of a checker: its processes' user and system time,
/// and its receive threads' (all kernel).
#[derive(Debug, Clone, Copy)]
struct CpuSeconds {
    user: f64,
    system: f64,
    receive: f64,
}

/// User and system CPU seconds of `pids`, summed.
fn process_cpu_seconds(pids: Vec<u32>) -> (f64, f64) {
    pids.into_iter()
        .filter_map(|pid| stat_cpu_seconds(&format!("/proc/{pid}/stat")))
        .fold((0.0, 0.0), |(u, s), (_, du, ds)| (u + du, s + ds))
}

/// /proc/PID/stat after the command name: field 3 (state) onwards.
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = &stat[stat.rfind(')')? + 1..];
    Some(rest.split_whitespace().map(str::to_string).collect())
}

/// Busy CPU seconds of each vCPU so far (every process, softirqs), and
/// the softirq part, from the `cpuN` lines of /proc/stat.
fn busy_cpu_seconds() -> Result<Vec<(f64, f64)>> {
    let stat = std::fs::read_to_string("/proc/stat")?;
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let mut busy = Vec::new();
    for line in stat.lines() {
        let mut words = line.split_whitespace();
        let Some(cpu) = words.next().and_then(|w| w.strip_prefix("cpu")) else {
            continue;
        };
        let Ok(index) = cpu.parse::<usize>() else {
            continue; // the "cpu" line: every vCPU summed
        };
        let values: Vec<f64> = words.filter_map(|v| v.parse().ok()).collect();
        // user nice system idle iowait irq softirq steal: all but idle, iowait.
        let seconds: f64 = values
            .iter()
            .take(8)
            .enumerate()
            .filter(|(i, _)| *i != 3 && *i != 4)
            .map(|(_, v)| v)
            .sum::<f64>()
            / ticks;
        let softirq = values.get(6).copied().unwrap_or(0.0) / ticks;
        busy.resize(busy.len().max(index + 1), (0.0, 0.0));
        busy[index] = (seconds, softirq);
    }
    Ok(busy)
}

/// keepalived checking the same servers: a TCP_CHECK each, `retry` making
/// FALL failures in a row (prober's fall), weight 0 on failure (prober's
/// "down": never deleted).
fn keepalived_config(bed: &Bed, interval: Duration) -> String {
    let i = seconds(interval);
    let mut text = String::from("global_defs {\n    router_id scale-bench\n}\n");
    for s in 0..bed.services() {
        let _ = write!(
            text,
            "virtual_server {} 80 {{\n    delay_loop {i}\n    lvs_sched wrr\n    lvs_method NAT\n    \
             protocol TCP\n    inhibit_on_failure\n",
            virtual_ip(s)
        );
        for r in s * PER_SERVICE..((s + 1) * PER_SERVICE).min(bed.n) {
            let _ = write!(
                text,
                "    real_server {} 80 {{\n        weight {WEIGHT}\n        TCP_CHECK {{\n            \
                 connect_timeout {i}\n            retry {}\n            delay_before_retry {i}\n        \
                 }}\n    }}\n",
                real_server(r),
                FALL - 1
            );
        }
        text.push_str("}\n");
    }
    text
}

/// What one run of one checker measured.
#[derive(Debug, Clone, Default)]
struct Sample {
    /// Checker CPU seconds over the steady window (its processes and its
    /// receive threads), the kernel part, and the receive threads' part.
    cpu: f64,
    cpu_system: f64,
    cpu_receive: f64,
    /// Busy CPU seconds over the window of the director's vCPUs (softirqs
    /// and every process on them included) and of the real servers' vCPU.
    director_cpu: f64,
    /// The softirq part of `director_cpu`.
    director_softirq: f64,
    servers_cpu: f64,
    /// SYNs that reached the real servers in the window.
    checks: u64,
    window: f64,
    asked_per_second: f64,
    servers: usize,
    /// Resident memory at the end of the steady window, and the peak over
    /// the whole run (the mass death's batch included).
    rss_kib: u64,
    peak_rss_kib: u64,
    /// Seconds from the checker's start until it checked.
    started: f64,
    death: Option<f64>,
    latency: Option<f64>,
    /// Mass death: all weights 0 after (None: not within the limit; the
    /// count still up then in `left_up`).
    all_down: Option<f64>,
    left_up: usize,
    /// IPVS weight writes per second while all changed.
    write_rate: Option<f64>,
    /// prober's own account of its heap at the end of the window (live
    /// allocations, free), KiB.
    heap_kib: Option<(u64, u64)>,
}

impl Sample {
    fn checks_per_second(&self) -> f64 {
        self.checks as f64 / self.window
    }

    fn cpu_per_10k(&self) -> f64 {
        self.cpu / self.checks.max(1) as f64 * 10_000.0
    }

    fn director_cpu_per_10k(&self) -> f64 {
        self.director_cpu / self.checks.max(1) as f64 * 10_000.0
    }

    fn core_share(&self) -> f64 {
        self.cpu / self.window
    }

    /// The checker's own userspace time, of one core, at rest.
    fn user_share(&self) -> f64 {
        (self.cpu - self.cpu_system) / self.window
    }

    /// The share of the checker's CPU time spent in the kernel.
    fn kernel_share(&self) -> f64 {
        if self.cpu > 0.0 {
            self.cpu_system / self.cpu
        } else {
            0.0
        }
    }

    fn summary(&self) -> String {
        format!(
            "{:.0} checks/s of {:.0} asked, {:.3} CPU s per 10k checks ({:.0} % in the kernel; \
             {:.1} % of a core, {:.1} % in userspace, {:.1} % receiving; director vCPUs {:.3}, {:.0} % busy, {:.0} % in softirq; real servers' vCPU {:.0} % busy), RSS {:.1} MiB (peak {:.1}; heap {}), started in {:.1} s, death -> 0 in {}, \
             latency -> weight in {}, all {} at 0 in {} ({} still up), {} writes/s",
            self.checks_per_second(),
            self.asked_per_second,
            self.cpu_per_10k(),
            self.kernel_share() * 100.0,
            self.core_share() * 100.0,
            self.user_share() * 100.0,
            self.cpu_receive / self.window * 100.0,
            self.director_cpu_per_10k(),
            self.director_cpu / self.window * 100.0,
            self.director_softirq / self.window * 100.0,
            self.servers_cpu / self.window * 100.0,
            self.rss_kib as f64 / 1024.0,
            self.peak_rss_kib as f64 / 1024.0,
            self.heap_kib.map_or("-".to_string(), |(used, free)| format!(
                "{:.1} MiB in use, {:.1} free",
                used as f64 / 1024.0,
                free as f64 / 1024.0
            )),
            self.started,
            secs(self.death),
            secs(self.latency),
            self.servers,
            secs(self.all_down),
            self.left_up,
            self.write_rate
                .map_or("-".to_string(), |r| format!("{r:.0}")),
        )
    }
}

fn secs(value: Option<f64>) -> String {
    value.map_or("never".to_string(), |v| format!("{v:.2} s"))
}

fn measure(bed: &Bed, tool: Tool, interval: Duration, options: &Options) -> Result<Sample> {
    bed.flush()?;
    bed.revive_all()?;
    let started_at = Instant::now();
    let mut checker = Checker::start(bed, tool, interval, &options.prober)?;
    let profile = options.profile.as_ref().map(|dir| {
        dir.join(format!(
            "{}-{}-{}ms.txt",
            tool.name(),
            bed.n,
            interval.as_millis()
        ))
    });
    let result = measure_running(bed, &mut checker, tool, interval, started_at, profile);
    let stopped = checker.stop();
    if let Some(dir) = &options.logs {
        let name = format!("{}-{}-{}ms.log", tool.name(), bed.n, interval.as_millis());
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join(name))?;
        file.write_all(checker.log().as_bytes())?;
    }
    bed.revive_all()?;
    let _ = bed.unslow();
    bed.flush()?;
    let sample = result.with_context(|| tail(&checker.log(), 20))?;
    stopped?;
    Ok(sample)
}

fn measure_running(
    bed: &Bed,
    checker: &mut Checker,
    tool: Tool,
    interval: Duration,
    started_at: Instant,
    profile: Option<PathBuf>,
) -> Result<Sample> {
    let n = bed.n;
    let mut sample = Sample {
        asked_per_second: n as f64 / interval.as_secs_f64(),
        servers: n,
        ..Sample::default()
    };
    // Up: prober said so and SYNs flow; keepalived has put every real
    // server into IPVS and SYNs flow.
    let limit = Duration::from_secs(300);
    let syns_at_start = bed.syns()?;
    loop {
        checker.check_alive()?;
        let up = match tool {
            Tool::Prober => checker.log().contains(READY_LINE),
            Tool::Keepalived => bed.census()?.0 == n,
        };
        if up && bed.syns()? > syns_at_start {
            break;
        }
        if started_at.elapsed() > limit {
            bail!("not checking within {} s", limit.as_secs());
        }
        thread::sleep(Duration::from_millis(100));
    }
    sample.started = started_at.elapsed().as_secs_f64();
    thread::sleep(WARM.max(interval * 3));

    let receive_threads = bed.cpus.pin_receive_threads()?;
    let threads0 = thread_cpu_seconds();
    let (cpu0, busy0, syns0, t0) = (
        checker.cpu_seconds(&receive_threads),
        busy_cpu_seconds()?,
        bed.syns()?,
        Instant::now(),
    );
    match &profile {
        Some(path) => record_profile(checker, path)?,
        None => thread::sleep(STEADY),
    }
    // Everything the window measures is read at its end, before asking
    // prober for its account: at 100,000 that answer took minutes, and
    // the window's figures were spread over them.
    let cpu = checker.cpu_seconds(&receive_threads);
    let busy = busy_cpu_seconds()?;
    let threads = thread_cpu_seconds();
    sample.checks = bed.syns()? - syns0;
    sample.window = t0.elapsed().as_secs_f64();
    sample.cpu_receive = cpu.receive - cpu0.receive;
    sample.cpu_system = cpu.system - cpu0.system + sample.cpu_receive;
    sample.cpu = cpu.user - cpu0.user + sample.cpu_system;
    let busy_of = |cpu: usize| {
        let (now, before) = (busy.get(cpu).copied(), busy0.get(cpu).copied());
        let (now, before) = (now.unwrap_or_default(), before.unwrap_or_default());
        (now.0 - before.0, now.1 - before.1)
    };
    for &cpu in &bed.cpus.director {
        sample.director_cpu += busy_of(cpu).0;
        sample.director_softirq += busy_of(cpu).1;
    }
    sample.servers_cpu = busy_of(bed.cpus.servers).0;
    sample.rss_kib = checker.memory_kib("VmRSS:");
    println!(
        "[scale] busiest threads in the window: {}",
        busiest_threads(&threads0, &threads, 6)
    );
    sample.heap_kib = checker.heap_kib();
    if let Some(stats) = checker.stats_text() {
        println!("[scale] prober stats at the end of the steady window:\n{stats}");
    }
    checker.check_alive()?;

    // One real server dies: the middle service's first.
    let services = bed.services();
    let victim = services / 2 * PER_SERVICE;
    let reaction_limit = interval * (4 * FALL) + Duration::from_secs(20);
    bed.kill(victim)?;
    sample.death = wait_weight(bed, victim, reaction_limit, |w| w == 0)?.map(|d| d.as_secs_f64());
    bed.revive(victim)?;

    // Another one turns slow: the next service's first (or the first's).
    let slow = if services > 1 {
        (services / 2 + 1) % services * PER_SERVICE
    } else {
        1.min(n - 1)
    };
    let before = bed
        .weight(slow)?
        .context("the slow server is not in IPVS")?;
    bed.slow(slow)?;
    let moved = (f64::from(before) * LATENCY_MOVED) as u32;
    sample.latency =
        wait_weight(bed, slow, Duration::from_secs(10), |w| w <= moved)?.map(|d| d.as_secs_f64());
    bed.unslow()?;

    // Every real server dies at once.
    thread::sleep(interval * 2);
    let (_, up_before) = bed.census()?;
    let died_at = SystemTime::now();
    let t0 = Instant::now();
    bed.kill_all()?;
    let mass_limit = interval * (4 * FALL) + Duration::from_secs(40);
    let mut first_down = None;
    loop {
        let (_, up) = bed.census()?;
        if first_down.is_none() && up < up_before {
            first_down = Some(t0.elapsed());
        }
        sample.left_up = up;
        if up == 0 {
            sample.all_down = Some(t0.elapsed().as_secs_f64());
            break;
        }
        if t0.elapsed() > mass_limit {
            break;
        }
        // Each look is a full dump, which holds IPVS's lock against the
        // checker's writes: five a second is resolution enough.
        thread::sleep(Duration::from_millis(200));
    }
    sample.write_rate = match tool {
        // prober: its own account of its batches (writes over netlink time).
        Tool::Prober => prober_write_rate(&checker.log(), died_at),
        // keepalived writes one at a time as each check fails: the rate
        // it reached from the first weight 0 seen to the last.
        Tool::Keepalived => match (first_down, sample.all_down) {
            (Some(first), Some(all)) if all > first.as_secs_f64() => {
                Some(up_before as f64 / (all - first.as_secs_f64()))
            }
            _ => None,
        },
    };
    sample.peak_rss_kib = checker.memory_kib("VmHWM:");
    checker.check_alive()?;
    Ok(sample)
}

/// `perf record` of the checker's processes over the steady window, its
/// report (kernel and user symbols, resolved here in the guest) to `path`.
fn record_profile(checker: &Checker, path: &Path) -> Result<()> {
    let data = path.with_extension("data");
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let pids: Vec<String> = checker.pids().iter().map(u32::to_string).collect();
    run(Command::new("perf")
        .args([
            "record",
            "-q",
            "-e",
            "cpu-clock",
            "-F",
            "199",
            "--call-graph",
            "dwarf,8192",
            "-o",
        ])
        .arg(&data)
        .args(["-p", &pids.join(","), "--", "sleep"])
        .arg(STEADY.as_secs().to_string()))?;
    let report = run(Command::new("perf")
        .args([
            "report",
            "--stdio",
            "--no-children",
            "--percent-limit",
            "0.5",
            "-i",
        ])
        .arg(&data))?;
    std::fs::write(path, &report.stdout)?;
    let _ = std::fs::remove_file(&data);
    Ok(())
}

/// How long until real server `i`'s weight in IPVS satisfies `done`.
fn wait_weight(
    bed: &Bed,
    i: usize,
    limit: Duration,
    done: impl Fn(u32) -> bool,
) -> Result<Option<Duration>> {
    let t0 = Instant::now();
    while t0.elapsed() < limit {
        if bed.weight(i)?.is_some_and(&done) {
            return Ok(Some(t0.elapsed()));
        }
        thread::sleep(Duration::from_millis(5));
    }
    Ok(None)
}

/// Writes per second over prober's logged batches since `since`:
/// "IPVS batch of N weights written in X ms".
fn prober_write_rate(log: &str, since: SystemTime) -> Option<f64> {
    let (mut writes, mut ms) = (0.0, 0.0);
    for line in log.lines().filter(|l| l.contains("IPVS batch of")) {
        let at = line.split_whitespace().next().and_then(parse_rfc3339)?;
        if at < since {
            continue;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        let position = words.iter().position(|w| *w == "batch")?;
        writes += words.get(position + 2)?.parse::<f64>().ok()?;
        let written = words.iter().position(|w| *w == "in")?;
        ms += words.get(written + 1)?.parse::<f64>().ok()?;
    }
    (ms > 0.0).then(|| writes / ms * 1000.0)
}

/// "2026-11-26T06:10:11.123456Z" (the daemon's log timestamps, UTC).
fn parse_rfc3339(text: &str) -> Option<SystemTime> {
    let text = text.strip_suffix('Z')?;
    let (date, time) = text.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, fraction) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|p| p.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let seconds = days * 86_400 + h * 3600 + min * 60 + s;
    let nanos = format!("{fraction:0<9}")[..9].parse::<u64>().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_secs(seconds as u64) + Duration::from_nanos(nanos))
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Every sample, by case and checker; medians in the table.
#[derive(Default)]
struct Report {
    rows: Vec<(Case, Tool, Vec<Sample>)>,
    failures: Vec<String>,
}

fn median(mut values: Vec<f64>) -> Option<f64> {
    values.retain(|v| v.is_finite());
    if values.is_empty() {
        return None;
    }
    values.sort_by(|a, b| a.total_cmp(b));
    Some(values[values.len() / 2])
}

struct Medians {
    cpu_per_10k: f64,
    kernel_share: f64,
    director_per_10k: f64,
    core_share: f64,
    user_share: f64,
    checks_per_second: f64,
    asked: f64,
    rss_mib: f64,
    peak_rss_mib: f64,
    death: Option<f64>,
    latency: Option<f64>,
    all_down: Option<f64>,
    left_up: f64,
    write_rate: Option<f64>,
    runs: usize,
}

impl Medians {
    fn of(samples: &[Sample]) -> Self {
        let m = |f: &dyn Fn(&Sample) -> f64| median(samples.iter().map(f).collect()).unwrap_or(0.0);
        // Missing values sort last, so the median says "never" only when
        // most runs never got there.
        let mo = |f: &dyn Fn(&Sample) -> Option<f64>| {
            let mut values: Vec<f64> = samples
                .iter()
                .map(|s| f(s).unwrap_or(f64::INFINITY))
                .collect();
            values.sort_by(|a, b| a.total_cmp(b));
            Some(values[values.len() / 2]).filter(|v| v.is_finite())
        };
        Self {
            cpu_per_10k: m(&|s| s.cpu_per_10k()),
            kernel_share: m(&|s| s.kernel_share()),
            director_per_10k: m(&|s| s.director_cpu_per_10k()),
            core_share: m(&|s| s.core_share()),
            user_share: m(&|s| s.user_share()),
            checks_per_second: m(&|s| s.checks_per_second()),
            asked: m(&|s| s.asked_per_second),
            rss_mib: m(&|s| s.rss_kib as f64 / 1024.0),
            peak_rss_mib: m(&|s| s.peak_rss_kib as f64 / 1024.0),
            death: mo(&|s| s.death),
            latency: mo(&|s| s.latency),
            all_down: mo(&|s| s.all_down),
            left_up: m(&|s| s.left_up as f64),
            // Write rates: a missing one is the lowest, not the highest.
            write_rate: median(
                samples
                    .iter()
                    .map(|s| s.write_rate.unwrap_or(0.0))
                    .collect(),
            )
            .filter(|r| *r > 0.0),
            runs: samples.len(),
        }
    }
}

impl Report {
    fn add(&mut self, case: &Case, tool: Tool, sample: Sample) {
        let key = |c: &Case| (c.servers, c.interval);
        match self
            .rows
            .iter_mut()
            .find(|(c, t, _)| key(c) == key(case) && *t == tool)
        {
            Some((_, _, samples)) => samples.push(sample),
            None => self.rows.push((case.clone(), tool, vec![sample])),
        }
    }

    fn table(&self) -> String {
        let mut out = String::from(
            "| real servers | interval | checker | CPU s per 10k checks (kernel) | of one core (userspace) | \
             director vCPUs' CPU s per 10k | checks/s (asked) | RSS (peak) | death -> weight 0 | \
             latency -> weight | all weights 0 after | IPVS writes/s |\n\
             |---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let mut cases: Vec<&Case> = Vec::new();
        for (case, _, _) in &self.rows {
            if !cases
                .iter()
                .any(|c| c.servers == case.servers && c.interval == case.interval)
            {
                cases.push(case);
            }
        }
        for case in cases {
            let of = |tool: Tool| {
                self.rows
                    .iter()
                    .find(|(c, t, _)| {
                        c.servers == case.servers && c.interval == case.interval && *t == tool
                    })
                    .map(|(_, _, s)| Medians::of(s))
            };
            let (p, k) = (of(Tool::Prober), of(Tool::Keepalived));
            let interval = format!("{} ms", case.interval.as_millis());
            for (name, m) in [("prober", &p), ("keepalived", &k)] {
                let Some(m) = m else { continue };
                let all_down = match m.all_down {
                    Some(v) => format!("{v:.2} s"),
                    None => format!("not in time ({:.0} up)", m.left_up),
                };
                let _ = writeln!(
                    out,
                    "| {} | {interval} | {name} | {:.4} ({:.0} %) | {:.1} % ({:.1} %) | {:.4} | {:.0} ({:.0}) | {:.1} MiB ({:.1}) | {} | {} | {all_down} | {} |",
                    thousands(case.servers as f64),
                    m.cpu_per_10k,
                    m.kernel_share * 100.0,
                    m.core_share * 100.0,
                    m.user_share * 100.0,
                    m.director_per_10k,
                    m.checks_per_second,
                    m.asked,
                    m.rss_mib,
                    m.peak_rss_mib,
                    secs(m.death),
                    secs(m.latency),
                    m.write_rate.map_or("-".to_string(), thousands),
                );
            }
            let (Some(p), Some(k)) = (p, k) else {
                continue;
            };
            let ratio = |k: f64, p: f64| {
                if p > 0.0 && k > 0.0 {
                    format!("{:.1}x", k / p)
                } else {
                    "-".to_string()
                }
            };
            let ratio_opt = |k: Option<f64>, p: Option<f64>| match (k, p) {
                (Some(k), Some(p)) => ratio(k, p),
                (None, Some(_)) => "keepalived never".to_string(),
                _ => "-".to_string(),
            };
            let _ = writeln!(
                out,
                "| | | keepalived ÷ prober ({} runs) | {} | | {} | {} | {} | {} | {} | {} | {} |",
                p.runs.min(k.runs),
                ratio(k.cpu_per_10k, p.cpu_per_10k),
                ratio(k.director_per_10k, p.director_per_10k),
                ratio(k.checks_per_second, p.checks_per_second),
                ratio(k.rss_mib, p.rss_mib),
                ratio_opt(k.death, p.death),
                ratio_opt(k.latency, p.latency),
                ratio_opt(k.all_down, p.all_down),
                match (p.write_rate, k.write_rate) {
                    (Some(p), Some(k)) => format!("{:.2}x", k / p),
                    _ => "-".to_string(),
                },
            );
        }
        for failure in &self.failures {
            let _ = writeln!(out, "\nFailed run: {}", failure.replace('\n', " "));
        }
        out
    }
}

fn thousands(value: f64) -> String {
    let digits = format!("{:.0}", value);
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}
