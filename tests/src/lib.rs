//! Test bed shared by prober's integration tests and `cargo xtask demo`:
//! network namespaces joined by veth, traffic sent from inside them, and the
//! `prober` binary run against them. Everything created here is removed on
//! drop, and every wait is bounded.

use std::{
    fs::File,
    io::{Read, Write},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

/// Ethernet + IPv4 + UDP headers, as counted by XDP (no FCS).
pub const UDP_FRAME_OVERHEAD: usize = 14 + 20 + 8;

/// A name unique to this process and call, short enough for an interface
/// or namespace name.
pub fn unique_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}{}-{}",
        std::process::id() % 100_000,
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where [`record`] appends its lines: `cargo xtask reliability` sets it
/// (and `cargo xtask vm-test` points it at its result share in the guest).
pub const RECORDS_ENV: &str = "PROBER_RECORDS";

/// One row of RELIABILITY.md: a fault or hostile input (`what`), how many
/// times it was tried, what was observed and what was lost ("nothing" is
/// the goal). Printed, and appended as a JSON line to `$PROBER_RECORDS`
/// when that is set. Call it after the test's assertions passed, so a row
/// is only written for what held.
pub fn record(area: &str, what: &str, tries: u64, observed: &str, lost: &str) {
    let row = serde_json::json!({
        "area": area,
        "what": what,
        "tries": tries,
        "observed": observed,
        "lost": lost,
    });
    println!("reliability: {row}");
    if let Some(path) = std::env::var_os(RECORDS_ENV) {
        // One write(2) per row: rows of tests running in parallel threads
        // never interleave (O_APPEND).
        let line = format!("{row}\n");
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| f.write_all(line.as_bytes()));
        if let Err(e) = written {
            panic!("appending to {}: {e}", Path::new(&path).display());
        }
    }
}

/// Runs a command and fails with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Result<Output> {
    let out = cmd.output().with_context(|| format!("starting {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// A network namespace, deleted (with its interfaces) on drop.
pub struct NetNs {
    pub name: String,
}

impl NetNs {
    pub fn new(prefix: &str) -> Result<Self> {
        let name = unique_name(prefix);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        let ns = Self { name };
        // No IPv6 autoconfiguration chatter: a test counts every frame.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        ns.ip(&["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    pub fn path(&self) -> PathBuf {
        Path::new("/run/netns").join(&self.name)
    }

    /// `ip -n <ns> <args>`.
    pub fn ip(&self, args: &[&str]) -> Result<Output> {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    pub fn sysctl(&self, key: &str, value: &str) -> Result<()> {
        run(Command::new("ip")
            .args(["netns", "exec", &self.name, "sysctl", "-qw"])
            .arg(format!("{key}={value}")))?;
        Ok(())
    }

    /// A command that runs `program` in this network namespace but keeps the
    /// caller's mount namespace (unlike `ip netns exec`, which remounts /sys
    /// and so hides bpffs).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net={}", self.path().display()))
            .arg("--")
            .arg(program);
        cmd
    }

    /// Runs `program args` in this namespace with `input` on its standard
    /// input (`ip -batch -`, `ipvsadm -R`); fails with its stderr unless it
    /// succeeds.
    pub fn run_with_input(&self, program: &str, args: &[&str], input: &str) -> Result<()> {
        use std::io::Write as _;
        let mut child = self
            .command(program)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {program}"))?;
        child
            .stdin
            .take()
            .context("stdin")?
            .write_all(input.as_bytes())?;
        let out = child.wait_with_output()?;
        if !out.status.success() {
            bail!(
                "{program} {args:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Runs `f` on a thread that has entered this namespace; sockets it opens
    /// belong to the namespace.
    pub fn enter<T: Send + 'static>(&self, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
        let ns_file =
            File::open(self.path()).with_context(|| format!("opening netns {}", self.name))?;
        thread::spawn(move || {
            // SAFETY: setns on a thread changes only this thread's netns.
            if unsafe { libc::setns(ns_file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(anyhow::anyhow!(
                    "setns: {}",
                    std::io::Error::last_os_error()
                ));
            }
            Ok(f())
        })
        .join()
        .map_err(|_| anyhow::anyhow!("thread in netns panicked"))?
    }

    /// The MAC address of `interface` in this namespace.
    pub fn mac(&self, interface: &str) -> Result<String> {
        let out = self.ip(&["-br", "link", "show", "dev", interface])?;
        let text = String::from_utf8_lossy(&out.stdout);
        text.split_whitespace()
            .nth(2)
            .map(str::to_string)
            .with_context(|| format!("no MAC in `{text}`"))
    }

    /// The XDP program id attached to `interface`, if any.
    pub fn xdp_program_id(&self, interface: &str) -> Result<Option<u32>> {
        let out = self.ip(&["-d", "-j", "link", "show", "dev", interface])?;
        let links: serde_json::Value = serde_json::from_slice(&out.stdout)?;
        Ok(links[0]["xdp"]["prog"]["id"].as_u64().map(|id| id as u32))
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair, each end called `veth0`, with
/// IPv4 addresses and permanent neighbour entries (no ARP): the only frames
/// on the wire are the ones a test sends.
pub struct VethPair {
    pub client: NetNs,
    pub server: NetNs,
    pub client_addr: Ipv4Addr,
    pub server_addr: Ipv4Addr,
}

pub const VETH: &str = "veth0";

impl VethPair {
    pub fn new() -> Result<Self> {
        let client = NetNs::new("prbc")?;
        let server = NetNs::new("prbs")?;
        // TEST-NET-1: exists only inside these namespaces.
        let client_addr = Ipv4Addr::new(192, 0, 2, 1);
        let server_addr = Ipv4Addr::new(192, 0, 2, 2);
        client.ip(&[
            "link",
            "add",
            VETH,
            "type",
            "veth",
            "peer",
            "name",
            VETH,
            "netns",
            &server.name,
        ])?;
        for (ns, addr) in [(&client, client_addr), (&server, server_addr)] {
            ns.ip(&["addr", "add", &format!("{addr}/24"), "dev", VETH])?;
            ns.ip(&["link", "set", VETH, "up"])?;
        }
        let client_mac = client.mac(VETH)?;
        let server_mac = server.mac(VETH)?;
        client.ip(&[
            "neigh",
            "replace",
            &server_addr.to_string(),
            "lladdr",
            &server_mac,
            "dev",
            VETH,
            "nud",
            "permanent",
        ])?;
        server.ip(&[
            "neigh",
            "replace",
            &client_addr.to_string(),
            "lladdr",
            &client_mac,
            "dev",
            VETH,
            "nud",
            "permanent",
        ])?;
        Ok(Self {
            client,
            server,
            client_addr,
            server_addr,
        })
    }

    /// Sends one UDP datagram of each payload size from client to server and
    /// waits for the server's echo before the next, so no queue can drop one.
    /// Returns how many echoes came back.
    pub fn udp_echo(&self, payload_sizes: Vec<usize>) -> Result<usize> {
        const PORT: u16 = 7007;
        let server_addr = self.server_addr;
        let server = self.server.enter(move || -> Result<UdpSocket> {
            let socket = UdpSocket::bind(SocketAddrV4::new(server_addr, PORT))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            Ok(socket)
        })??;
        let count = payload_sizes.len();
        let echo = thread::spawn(move || -> Result<()> {
            let mut buf = vec![0u8; 65536];
            for _ in 0..count {
                let (len, from) = server.recv_from(&mut buf).context("server: no datagram")?;
                server.send_to(&buf[..len], from)?;
            }
            Ok(())
        });
        let echoed = self.client.enter(move || -> Result<usize> {
            let socket = UdpSocket::bind(SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0))?;
            socket.set_read_timeout(Some(Duration::from_secs(2)))?;
            socket.connect(SocketAddrV4::new(server_addr, PORT))?;
            let mut buf = vec![0u8; 65536];
            let mut echoed = 0;
            for size in payload_sizes {
                let payload: Vec<u8> = (0..size).map(|i| i as u8).collect();
                socket.send(&payload)?;
                let len = socket.recv(&mut buf).context("client: no echo")?;
                if buf[..len] == payload[..] {
                    echoed += 1;
                }
            }
            Ok(echoed)
        })??;
        echo.join()
            .map_err(|_| anyhow::anyhow!("echo thread panicked"))??;
        Ok(echoed)
    }

    /// A TCP connection from client to server that sends `request_len`
    /// bytes and reads a reply of the same length. Returns the bytes read.
    pub fn tcp_exchange(&self, request_len: usize) -> Result<usize> {
        const PORT: u16 = 8008;
        let server_addr = self.server_addr;
        let listener = self
            .server
            .enter(move || TcpListener::bind(SocketAddrV4::new(server_addr, PORT)))??;
        let server = thread::spawn(move || -> Result<()> {
            let (mut conn, _) = listener.accept()?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            let mut request = vec![0u8; request_len];
            conn.read_exact(&mut request)?;
            conn.write_all(&request)?;
            Ok(())
        });
        let read = self.client.enter(move || -> Result<usize> {
            let mut conn = TcpStream::connect_timeout(
                &SocketAddrV4::new(server_addr, PORT).into(),
                Duration::from_secs(2),
            )?;
            conn.set_read_timeout(Some(Duration::from_secs(2)))?;
            conn.write_all(&vec![b'x'; request_len])?;
            let mut reply = vec![0u8; request_len];
            conn.read_exact(&mut reply)?;
            Ok(reply.len())
        })??;
        server
            .join()
            .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
        Ok(read)
    }
}

/// The `prober` binary of this workspace (`PROBER_BIN` overrides).
pub fn prober_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("PROBER_BIN") {
        return PathBuf::from(path);
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let bin = target.join("debug/prober");
    assert!(
        bin.exists(),
        "{} is missing: run the tests with `cargo xtask test`, which builds it",
        bin.display()
    );
    bin
}

/// A pin directory of its own for one test, so tests can run in parallel;
/// removed with whatever a failed test left in it.
pub struct PinDir(PathBuf);

impl PinDir {
    pub fn new() -> Self {
        Self(Path::new("/sys/fs/bpf").join(unique_name("prober-test-")))
    }
}

impl Default for PinDir {
    fn default() -> Self {
        Self::new()
    }
}

impl std::ops::Deref for PinDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<std::ffi::OsStr> for PinDir {
    fn as_ref(&self) -> &std::ffi::OsStr {
        self.0.as_os_str()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What `prober run` logs once attached and pinned.
pub const READY_LINE: &str = "running; stop with SIGINT or SIGTERM";

/// A running `prober run` daemon, stopped with SIGTERM on drop.
pub struct Daemon {
    pub child: Child,
    pub pin_dir: PathBuf,
    stderr_path: PathBuf,
}

impl Daemon {
    /// Starts `prober run --iface <interface>` inside `netns` and waits (at
    /// most 30 s: emulated guests under load are slow) until it says it is running (maps pinned, XDP attached).
    pub fn start(netns: &NetNs, interface: &str, pin_dir: &Path) -> Result<Self> {
        Self::start_with(netns, interface, pin_dir, &[])
    }

    /// `prober run` probing `probes` every `interval` (e.g. "100ms").
    pub fn probing(netns: &NetNs, pin_dir: &Path, interval: &str, probes: &[&str]) -> Result<Self> {
        let mut args = vec!["--interval", interval];
        for probe in probes {
            args.extend(["--probe", probe]);
        }
        Self::start_with(netns, VETH, pin_dir, &args)
    }

    /// Like [`Daemon::start`], with more `prober run` arguments (probes...).
    pub fn start_with(
        netns: &NetNs,
        interface: &str,
        pin_dir: &Path,
        args: &[&str],
    ) -> Result<Self> {
        Self::start_with_env(netns, interface, pin_dir, args, &[])
    }

    /// As [`Daemon::start_with`], with extra environment variables.
    pub fn start_with_env(
        netns: &NetNs,
        interface: &str,
        pin_dir: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Self> {
        let stderr_path =
            std::env::temp_dir().join(format!("{}.log", unique_name("prober-daemon-")));
        let child = netns
            .command(prober_bin())
            .arg("--pin-dir")
            .arg(pin_dir)
            .args(["run", "--iface", interface])
            .args(args)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(File::create(&stderr_path)?)
            .spawn()
            .context("starting prober")?;
        let mut daemon = Self {
            child,
            pin_dir: pin_dir.to_path_buf(),
            stderr_path,
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !daemon.log().contains(READY_LINE) {
            if let Some(status) = daemon.child.try_wait()? {
                bail!("prober exited with {status}: {}", daemon.log());
            }
            if Instant::now() > deadline {
                bail!("prober was not ready within 30 s: {}", daemon.log());
            }
            thread::sleep(Duration::from_millis(20));
        }
        Ok(daemon)
    }

    /// The daemon's log so far, whole lines only: a line being written
    /// (the logger may write it in parts) is left for the next read, so a
    /// test never matches half of one.
    pub fn log(&self) -> String {
        let mut log = std::fs::read_to_string(&self.stderr_path).unwrap_or_default();
        log.truncate(log.rfind('\n').map_or(0, |end| end + 1));
        log
    }

    /// Sends `signal` and waits (at most 10 s) for the daemon to exit.
    pub fn stop(&mut self, signal: i32) -> Result<std::process::ExitStatus> {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait()? {
                return Ok(status);
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                bail!("prober did not exit within 10 s of signal {signal}");
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// `prober status --json` from this daemon's control socket.
    pub fn status(&self) -> Result<serde_json::Value> {
        let out = run(Command::new(prober_bin())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["status", "--json"]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }

    /// `prober stats --json` against this daemon's pins.
    pub fn stats(&self) -> Result<serde_json::Value> {
        let out = run(Command::new(prober_bin())
            .arg("--pin-dir")
            .arg(&self.pin_dir)
            .args(["stats", "--json"]))?;
        Ok(serde_json::from_slice(&out.stdout)?)
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.stop(libc::SIGTERM);
        }
        let _ = std::fs::remove_file(&self.stderr_path);
    }
}
pub mod http;
pub mod packets;
pub mod procfs;

/// prober's ingress XDP program attached to an interface in a namespace by
/// this process, for as long as the value lives. On veth, frames that XDP
/// redirects or transmits into a peer are delivered only when the peer runs
/// an XDP program itself: the real-server side of a test needs one (a
/// physical NIC does not).
pub struct PeerXdp {
    _ebpf: aya::Ebpf,
}

impl PeerXdp {
    pub fn attach(netns: &NetNs, interface: &str) -> Result<Self> {
        let interface = interface.to_string();
        let ebpf = netns.enter(move || -> Result<aya::Ebpf> {
            let mut ebpf = prober_user::datapath::load_programs()?;
            let program: &mut aya::programs::Xdp = ebpf
                .program_mut(prober_common::program_names::XDP_INGRESS)
                .context("no ingress program")?
                .try_into()?;
            program.attach(&interface, aya::programs::XdpMode::Default)?;
            Ok(ebpf)
        })??;
        Ok(Self { _ebpf: ebpf })
    }
}

impl NetNs {
    /// `tc qdisc add dev <interface> root netem <args>` in this namespace.
    pub fn netem(&self, interface: &str, args: &[&str]) -> Result<()> {
        run(Command::new("ip")
            .args([
                "netns", "exec", &self.name, "tc", "qdisc", "add", "dev", interface, "root",
                "netem",
            ])
            .args(args))?;
        Ok(())
    }

    /// A TCP listener inside this namespace (held open by the caller).
    pub fn listen(&self, addr: SocketAddrV4) -> Result<TcpListener> {
        self.enter(move || TcpListener::bind(addr))?
            .with_context(|| format!("listening on {addr}"))
    }

    /// Sends one raw Ethernet frame out of `interface` in this namespace
    /// (AF_PACKET): forged or malformed traffic, as an attacker would.
    pub fn send_frame(&self, interface: &str, frame: Vec<u8>) -> Result<()> {
        self.send_frames(interface, vec![frame])
    }

    /// Sends raw Ethernet frames out of `interface`, in order, from one
    /// socket (many frames cost one namespace switch).
    pub fn send_frames(&self, interface: &str, frames: Vec<Vec<u8>>) -> Result<()> {
        let interface = std::ffi::CString::new(interface)?;
        self.enter(move || -> Result<()> {
            // SAFETY: plain socket calls on a socket we own and close.
            unsafe {
                let ifindex = libc::if_nametoindex(interface.as_ptr());
                if ifindex == 0 {
                    bail!("no interface {interface:?}");
                }
                let fd = libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
                if fd < 0 {
                    bail!("AF_PACKET socket: {}", std::io::Error::last_os_error());
                }
                for frame in &frames {
                    let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                    addr.sll_family = libc::AF_PACKET as u16;
                    addr.sll_ifindex = ifindex as i32;
                    addr.sll_halen = 6;
                    addr.sll_addr[..6].copy_from_slice(&frame[..6]);
                    let sent = libc::sendto(
                        fd,
                        frame.as_ptr().cast(),
                        frame.len(),
                        0,
                        (&addr as *const libc::sockaddr_ll).cast(),
                        std::mem::size_of::<libc::sockaddr_ll>() as u32,
                    );
                    if sent != frame.len() as isize {
                        let error = std::io::Error::last_os_error();
                        libc::close(fd);
                        bail!("sending a raw frame: {error}");
                    }
                }
                libc::close(fd);
            }
            Ok(())
        })?
    }

    /// The MAC address of `interface` as bytes.
    pub fn mac_bytes(&self, interface: &str) -> Result<[u8; 6]> {
        let text = self.mac(interface)?;
        let mut mac = [0u8; 6];
        for (byte, part) in mac.iter_mut().zip(text.split(':')) {
            *byte = u8::from_str_radix(part, 16).context("parsing a MAC")?;
        }
        Ok(mac)
    }

    /// Connections in SYN-RECV state (half-open) in this namespace.
    pub fn half_open_connections(&self) -> Result<usize> {
        let out = run(Command::new("ip").args([
            "netns", "exec", &self.name, "ss", "-Htn", "state", "syn-recv",
        ]))?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| !l.trim().is_empty())
            .count())
    }
}

/// Polls `check` every 20 ms until it returns Some, for at most `limit`.
pub fn wait_for<T>(limit: Duration, mut check: impl FnMut() -> Result<Option<T>>) -> Result<T> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = check()? {
            return Ok(value);
        }
        if Instant::now() > deadline {
            bail!("condition not met within {limit:?}");
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// The target of `stats` whose probe reads `probe`.
pub fn target<'a>(stats: &'a serde_json::Value, probe: &str) -> &'a serde_json::Value {
    find_target(stats, probe).unwrap_or_else(|| panic!("no target {probe} in {stats:#}"))
}

/// The target of `stats` whose probe reads `probe`, if it is a target yet
/// (it is one once its next hop is known).
pub fn find_target<'a>(stats: &'a serde_json::Value, probe: &str) -> Option<&'a serde_json::Value> {
    stats["targets"]
        .as_array()?
        .iter()
        .find(|t| t["probe"] == probe)
}

pub fn field(stats: &serde_json::Value, probe: &str, name: &str) -> u64 {
    target(stats, probe)[name].as_u64().unwrap()
}

/// Waits until every listed probe has had `n` probes sent and settled.
pub fn wait_rounds(daemon: &Daemon, probes: &[&str], n: u64) -> serde_json::Value {
    wait_for(Duration::from_secs(15), || {
        let stats = daemon.stats()?;
        let done = probes.iter().all(|p| {
            // Not a target yet under load (its neighbour being resolved).
            let Some(t) = find_target(&stats, p) else {
                return false;
            };
            let settled = ["answered", "refused", "unreachable", "timed_out"]
                .iter()
                .map(|f| t[f].as_u64().unwrap())
                .sum::<u64>();
            settled >= n
        });
        Ok(done.then_some(stats))
    })
    .unwrap()
}

/// A director and real servers on one LAN: a bridge in a "switch"
/// namespace, each host's `eth0` plugged into it by veth. The director is
/// 192.0.2.1, real server i is 192.0.2.(10 + i); all in TEST-NET-1, which
/// exists only inside these namespaces.
/// Plugs interface `ifname` of `ns`, with address `cidr`, into `bridge` of
/// `switch` as its port `port` (a veth pair).
pub fn plug_into_bridge(
    switch: &NetNs,
    bridge: &str,
    ns: &NetNs,
    ifname: &str,
    port: &str,
    cidr: &str,
) -> Result<()> {
    ns.ip(&[
        "link",
        "add",
        ifname,
        "type",
        "veth",
        "peer",
        "name",
        port,
        "netns",
        &switch.name,
    ])?;
    switch.ip(&["link", "set", port, "master", bridge, "up"])?;
    ns.ip(&["addr", "add", cidr, "dev", ifname])?;
    ns.ip(&["link", "set", ifname, "up"])?;
    Ok(())
}

pub struct Lan {
    pub switch: NetNs,
    pub director: NetNs,
    pub servers: Vec<NetNs>,
    _director_port_xdp: PeerXdp,
}

pub const LAN_IF: &str = "eth0";

impl Lan {
    pub fn new(servers: usize) -> Result<Self> {
        let switch = NetNs::new("prbw")?;
        switch.ip(&["link", "add", "br0", "type", "bridge"])?;
        switch.ip(&["link", "set", "br0", "up"])?;
        let plug = |ns: &NetNs, port: &str, addr: Ipv4Addr| {
            plug_into_bridge(&switch, "br0", ns, LAN_IF, port, &format!("{addr}/24"))
        };
        let director = NetNs::new("prbd")?;
        plug(&director, "d0", Self::director_addr())?;
        let mut hosts = Vec::new();
        for i in 0..servers {
            let ns = NetNs::new("prbr")?;
            plug(&ns, &format!("s{i}"), Self::server_addr(i))?;
            hosts.push(ns);
        }
        // Frames the director's XDP sends into its veth reach the switch
        // only if the switch end runs XDP too (veth's rule).
        let port_xdp = PeerXdp::attach(&switch, "d0")?;
        Ok(Self {
            switch,
            director,
            servers: hosts,
            _director_port_xdp: port_xdp,
        })
    }

    pub fn director_addr() -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 1)
    }

    pub fn server_addr(i: usize) -> Ipv4Addr {
        Ipv4Addr::new(192, 0, 2, 10 + i as u8)
    }

    /// A listener on `port` in every real server (None once dropped: that
    /// server then refuses).
    pub fn listen_everywhere(&self, port: u16) -> Vec<Option<TcpListener>> {
        (0..self.servers.len())
            .map(|i| {
                Some(
                    self.servers[i]
                        .listen(SocketAddrV4::new(Self::server_addr(i), port))
                        .unwrap(),
                )
            })
            .collect()
    }

    /// `ipvsadm <args>` in the director's namespace.
    pub fn ipvsadm(&self, args: &[&str]) -> Result<String> {
        let out = run(Command::new("ip")
            .args(["netns", "exec", &self.director.name, "ipvsadm"])
            .args(args))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// Weights of the real servers of a service, from `ipvsadm -Ln`, keyed
    /// by "ADDR:PORT".
    pub fn weights(&self, service: &str) -> Result<std::collections::BTreeMap<String, u32>> {
        let table = self.ipvsadm(&["-Ln", "-t", service])?;
        Ok(table
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&"->") && f.len() >= 4 && f[1] != "RemoteAddress:Port")
                    .then(|| (f[1].to_string(), f[3].parse().unwrap_or(u32::MAX)))
            })
            .collect())
    }
}
