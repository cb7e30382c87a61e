//! Loads prober's eBPF object, attaches its ingress XDP program to the
//! director's interface, loads the probe transmitter and pins the maps under
//! the pin directory; undoes all of it on [`Datapath::detach`] (or on drop,
//! if the daemon unwinds).

use std::{
    fs::{self, File},
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use anyhow::{anyhow, Context, Result};
use aya::{
    maps::{Array, HashMap, MapData, ProgramArray},
    programs::{
        tc::{self, SchedClassifierLinkId, TcAttachType},
        xdp::XdpLinkId,
        ProgramFd, SchedClassifier, Xdp, XdpMode,
    },
    Ebpf,
};
use prober_common::{map_names, program_names};
use tracing::{info, warn};

use crate::preflight;

/// The eBPF object built by `cargo xtask build-ebpf` (see build.rs).
static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(env!("PROBER_EBPF_OBJECT"));

/// Maps pinned for `prober stats`, `bpftool` and later restarts.
const PINNED_MAPS: &[&str] = &[
    map_names::COUNTERS,
    map_names::PROBE_TARGETS,
    map_names::REPLY_INDEX,
    map_names::PROBE_STATE,
    map_names::PROBE_RESULTS,
    map_names::PROBE_RTT,
    map_names::PROBE_EXPECT,
    map_names::PROBE_CONFIG,
    map_names::PASSIVE_SERVERS,
    map_names::PASSIVE_FLOWS,
    map_names::PASSIVE_CONNS,
    map_names::PASSIVE_STATS,
    map_names::DR_CHECKS,
    map_names::AGENTS,
];

/// Loads the eBPF object and its programs into the kernel, attaching
/// nothing (tests run the programs through BPF_PROG_TEST_RUN); eBPF-side
/// logging off.
pub fn load_programs() -> Result<Ebpf> {
    load_programs_logging(EbpfLog::Off)
}

/// eBPF-side diagnostics (aya-log), by level. The level is a constant in
/// the object's read-only data, fixed at load: the verifier prunes every
/// log statement above it, so `Off` costs nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum EbpfLog {
    Off = 0,
    Error = 1,
    Warn = 2,
    Info = 3,
    Debug = 4,
    Trace = 5,
}

/// Like [`load_programs`], with eBPF-side logging at `level`.
pub fn load_programs_logging(level: EbpfLog) -> Result<Ebpf> {
    load_programs_sized(level, prober_common::MAX_TARGETS)
}

/// The maps with one entry per probe (or per destination), sized at load.
const PER_TARGET_MAPS: &[&str] = &[
    map_names::PROBE_TARGETS,
    map_names::REPLY_INDEX,
    map_names::PROBE_STATE,
    map_names::PROBE_RESULTS,
    map_names::PROBE_RTT,
    map_names::PROBE_EXPECT,
    map_names::PROBE_BATCH,
    map_names::WEIGHT_STATE,
    map_names::HEALTH_STATE,
    // One per real server host: never more hosts than probes.
    map_names::AGENTS,
];

/// The probe event ring: room for one event per target (every target
/// failing in the same interval; the ring is drained every tick), at
/// least 1 MiB, a power of two as the kernel requires.
fn event_ring_bytes(capacity: u32) -> u32 {
    let per_target = std::mem::size_of::<prober_common::ProbeEvent>() as u64;
    (u64::from(capacity) * per_target)
        .clamp(1 << 20, 1 << 30)
        .next_power_of_two() as u32
}

/// Like [`load_programs_logging`], with the per-target maps holding
/// `capacity` probes (and the state maps as many records each).
pub fn load_programs_sized(level: EbpfLog, capacity: u32) -> Result<Ebpf> {
    let level = level as u8;
    let mut loader = aya::EbpfLoader::new();
    loader.override_global("AYA_LOG_LEVEL", &level, false);
    // The change signal leaves out IPVS writes of this process.
    let own_pid = std::process::id();
    loader.override_global("PROBER_TGID", &own_pid, true);
    for &name in PER_TARGET_MAPS {
        loader.map_max_entries(name, capacity);
    }
    loader.map_max_entries(map_names::PROBE_EVENTS, event_ring_bytes(capacity));
    let mut ebpf = loader.load(EBPF_OBJECT).with_context(|| {
        format!("loading prober's eBPF object (maps sized for {capacity} probes)")
    })?;
    for name in [program_names::XDP_INGRESS, program_names::PROBE_TX] {
        let program: &mut Xdp = ebpf
            .program_mut(name)
            .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?
            .try_into()?;
        program
            .load()
            .with_context(|| format!("the kernel rejected XDP program {name}"))?;
    }
    let egress: &mut SchedClassifier = ebpf
        .program_mut(program_names::PASSIVE_EGRESS)
        .ok_or_else(|| {
            anyhow!(
                "the eBPF object has no program {}",
                program_names::PASSIVE_EGRESS
            )
        })?
        .try_into()?;
    egress.load().with_context(|| {
        format!(
            "the kernel rejected TC program {}",
            program_names::PASSIVE_EGRESS
        )
    })?;
    Ok(ebpf)
}

/// A loaded program's fd, by name.
pub fn program_fd(ebpf: &Ebpf, name: &str) -> Result<ProgramFd> {
    let program = ebpf
        .program(name)
        .ok_or_else(|| anyhow!("the eBPF object has no program {name}"))?;
    Ok(program.fd()?.try_clone()?)
}

/// Takes the maps the prober writes out of the object.
pub fn take_probe_maps(ebpf: &mut Ebpf) -> Result<crate::probe::ProbeMaps> {
    let mut take = |name: &str| {
        ebpf.take_map(name)
            .ok_or_else(|| anyhow!("the eBPF object has no map {name} (or it was taken)"))
    };
    Ok(crate::probe::ProbeMaps {
        targets: Array::try_from(take(map_names::PROBE_TARGETS)?)?,
        reply_index: HashMap::try_from(take(map_names::REPLY_INDEX)?)?,
        config: Array::try_from(take(map_names::PROBE_CONFIG)?)?,
        batch: Array::try_from(take(map_names::PROBE_BATCH)?)?,
        cursor: Array::try_from(take(map_names::BATCH_CURSOR)?)?,
        state: Array::try_from(take(map_names::PROBE_STATE)?)?,
        results: aya::maps::PerCpuArray::try_from(take(map_names::PROBE_RESULTS)?)?,
        rtt: aya::maps::PerCpuArray::try_from(take(map_names::PROBE_RTT)?)?,
        expect: Array::try_from(take(map_names::PROBE_EXPECT)?)?,
        events: aya::maps::RingBuf::try_from(take(map_names::PROBE_EVENTS)?)?,
    })
}

pub struct Datapath {
    ebpf: Ebpf,
    pin_dir: PathBuf,
    interface: String,
    link: Option<XdpLinkId>,
    egress_link: Option<SchedClassifierLinkId>,
    pinned: Vec<PathBuf>,
    // Held for the daemon's lifetime: one prober per pin directory.
    _pin_dir_lock: File,
    /// `prober_xdp`'s way to `probe_tx`, held open: the kernel empties a
    /// program array when its last descriptor closes.
    send_path: Option<ProgramArray<MapData>>,
}

impl Datapath {
    /// Loads the programs, attaches the XDP program to `interface` and pins
    /// the maps in `pin_dir` (which must be on a bpffs).
    pub fn attach(interface: &str, pin_dir: &Path, log: EbpfLog, capacity: u32) -> Result<Self> {
        preflight::check_privileges()?;
        let bpffs_root = pin_dir.parent().unwrap_or(pin_dir);
        if preflight::ensure_bpffs(bpffs_root)? {
            warn!(
                "no BPF filesystem was mounted at {} (`ip netns exec` remounts /sys without one): mounted one; maps pinned there live as long as this mount",
                bpffs_root.display()
            );
        }
        preflight::probing_interface_index(interface)?;
        let pin_dir_lock = lock_pin_dir(pin_dir)?;

        let mut ebpf = load_programs_sized(log, capacity)?;
        let program: &mut Xdp = ebpf
            .program_mut(program_names::XDP_INGRESS)
            .expect("loaded by load_programs")
            .try_into()?;
        let link = program
            .attach(interface, XdpMode::Default)
            .with_context(|| {
                format!(
                    "attaching XDP program {} to interface '{interface}' \
                 (does it already carry another XDP program? `ip link show {interface}`)",
                    program_names::XDP_INGRESS
                )
            })?;
        info!(
            interface,
            program = program_names::XDP_INGRESS,
            "XDP program attached"
        );
        let egress_link = attach_egress(&mut ebpf, interface)?;

        let mut datapath = Self {
            ebpf,
            interface: interface.to_string(),
            pin_dir: pin_dir.to_path_buf(),
            link: Some(link),
            egress_link: Some(egress_link),
            pinned: Vec::new(),
            _pin_dir_lock: pin_dir_lock,
            send_path: None,
        };
        for &name in PINNED_MAPS {
            datapath.pin_map(name, pin_dir)?;
        }
        Ok(datapath)
    }

    fn pin_map(&mut self, name: &str, pin_dir: &Path) -> Result<()> {
        let path = pin_dir.join(name);
        // The directory lock proves no other prober owns this pin: it was
        // left by a daemon that was killed.
        if path.exists() {
            warn!(path = %path.display(), "replacing a pinned map left by an earlier prober");
            fs::remove_file(&path)
                .with_context(|| format!("removing stale pin {}", path.display()))?;
        }
        let map = self
            .ebpf
            .map(name)
            .ok_or_else(|| anyhow!("the eBPF object has no map {name}"))?;
        map.pin(&path)
            .with_context(|| format!("pinning map {name} at {}", path.display()))?;
        info!(path = %path.display(), "map pinned");
        self.pinned.push(path);
        Ok(())
    }

    /// The maps of passive measurement that userspace writes and reads
    /// (call once, after attach has pinned them).
    pub fn passive_maps(&mut self) -> Result<crate::passive::PassiveMaps> {
        let mut take = |name: &str| {
            self.ebpf
                .take_map(name)
                .ok_or_else(|| anyhow!("the eBPF object has no map {name} (or it was taken)"))
        };
        Ok(crate::passive::PassiveMaps {
            servers: HashMap::try_from(take(map_names::PASSIVE_SERVERS)?)?,
            ports: Array::try_from(take(map_names::PASSIVE_PORTS)?)?,
            stats: aya::maps::PerCpuArray::try_from(take(map_names::PASSIVE_STATS)?)?,
            seen: Array::try_from(take(map_names::PASSIVE_SEEN)?)?,
        })
    }

    /// The map that lets L7 checks reach the VIP on direct-routing real
    /// servers (call once).
    pub fn dr_checks_map(
        &mut self,
    ) -> Result<HashMap<aya::maps::MapData, prober_common::DrCheckKey, prober_common::DrCheckFlow>>
    {
        let map = self
            .ebpf
            .take_map(map_names::DR_CHECKS)
            .ok_or_else(|| anyhow!("the eBPF object has no map {}", map_names::DR_CHECKS))?;
        Ok(HashMap::try_from(map)?)
    }

    /// Attaches the kretprobes that signal IPVS configuration changes and
    /// takes their map (call once); they stay attached until detach.
    pub fn ipvs_change_signal(&mut self) -> Result<crate::ipvs_changes::IpvsChangeSignal> {
        crate::ipvs_changes::IpvsChangeSignal::attach(&mut self.ebpf)
    }

    /// The agents' reports (call once).
    pub fn agents_map(
        &mut self,
    ) -> Result<HashMap<aya::maps::MapData, u32, prober_common::AgentReport>> {
        let map = self
            .ebpf
            .take_map(map_names::AGENTS)
            .ok_or_else(|| anyhow!("the eBPF object has no map {}", map_names::AGENTS))?;
        Ok(HashMap::try_from(map)?)
    }

    /// The reader of eBPF-side log records (none when they are off).
    pub fn logger(
        &mut self,
        log: EbpfLog,
    ) -> Result<Option<aya_log::EbpfLogger<&'static dyn log::Log>>> {
        if log == EbpfLog::Off {
            return Ok(None);
        }
        aya_log::EbpfLogger::init(&mut self.ebpf)
            .map(Some)
            .context("reading eBPF log records (AYA_LOGS)")
    }

    /// The maps the prober uses and the program its sends test-run (call
    /// once): the attached `prober_xdp`, with `probe_tx` put in its send
    /// path, so that a send does not patch the kernel's XDP dispatcher.
    pub fn prober_parts(&mut self) -> Result<(crate::probe::ProbeMaps, ProgramFd)> {
        let probe_tx = program_fd(&self.ebpf, program_names::PROBE_TX)?;
        let mut send_path = ProgramArray::try_from(
            self.ebpf
                .take_map(map_names::SEND_PATH)
                .ok_or_else(|| anyhow!("the eBPF object has no map {}", map_names::SEND_PATH))?,
        )?;
        send_path
            .set(prober_common::SEND_PATH_PROBE_TX, &probe_tx, 0)
            .context("putting probe_tx in SEND_PATH")?;
        self.send_path = Some(send_path);
        let fd = program_fd(&self.ebpf, program_names::XDP_INGRESS)?;
        Ok((take_probe_maps(&mut self.ebpf)?, fd))
    }

    /// The controller's state maps: those an earlier run pinned, else this
    /// object's, pinned now. They stay pinned when the daemon stops.
    pub fn open_state(&mut self) -> Result<crate::state::StateStore> {
        crate::state::StateStore::open(&mut self.ebpf, &self.pin_dir)
    }

    /// The interface is gone and its programs with it: forgets the links
    /// so `detach` only unpins (the programs' links are closed with the
    /// object).
    pub fn interface_removed(&mut self) {
        self.link = None;
        self.egress_link = None;
    }

    /// Detaches the XDP program and removes the pins. Idempotent.
    pub fn detach(&mut self) -> Result<()> {
        if let Some(link) = self.link.take() {
            let program: &mut Xdp = self
                .ebpf
                .program_mut(program_names::XDP_INGRESS)
                .expect("the program was loaded by attach")
                .try_into()?;
            program
                .detach(link)
                .with_context(|| format!("detaching XDP from '{}'", self.interface))?;
            info!(interface = %self.interface, "XDP program detached");
        }
        if let Some(link) = self.egress_link.take() {
            let program: &mut SchedClassifier = self
                .ebpf
                .program_mut(program_names::PASSIVE_EGRESS)
                .expect("the program was loaded by attach")
                .try_into()?;
            program.detach(link).with_context(|| {
                format!("detaching the TC egress program from '{}'", self.interface)
            })?;
            info!(interface = %self.interface, "TC egress program detached");
        }
        for path in self.pinned.drain(..) {
            fs::remove_file(&path).with_context(|| format!("unpinning {}", path.display()))?;
            info!(path = %path.display(), "map unpinned");
        }
        // Only succeeds when empty: pins of other tools stay.
        let _ = fs::remove_dir(&self.pin_dir);
        Ok(())
    }
}

impl Drop for Datapath {
    fn drop(&mut self) {
        if let Err(e) = self.detach() {
            warn!("cleanup on exit: {e:#}");
        }
    }
}

/// Attaches the passive-measurement classifier to the interface's egress.
/// Kernels before 6.6 need a clsact qdisc; an existing one (another tool's)
/// is shared, and prober leaves it in place when it stops.
fn attach_egress(ebpf: &mut Ebpf, interface: &str) -> Result<SchedClassifierLinkId> {
    if let Err(e) = tc::qdisc_add_clsact(interface) {
        let exists = matches!(&e, tc::TcError::NetlinkError(n) if n.raw_os_error() == Some(libc::EEXIST))
            || matches!(e, tc::TcError::AlreadyAttached);
        if !exists {
            return Err(e).with_context(|| format!("adding a clsact qdisc to '{interface}'"));
        }
    }
    let program: &mut SchedClassifier = ebpf
        .program_mut(program_names::PASSIVE_EGRESS)
        .expect("loaded by load_programs")
        .try_into()?;
    let link = program
        .attach(interface, TcAttachType::Egress)
        .with_context(|| {
            format!(
                "attaching TC program {} to the egress of '{interface}'",
                program_names::PASSIVE_EGRESS
            )
        })?;
    info!(
        interface,
        program = program_names::PASSIVE_EGRESS,
        "TC egress program attached"
    );
    Ok(link)
}

/// Creates the pin directory and takes an exclusive lock on it, so a second
/// prober fails clearly instead of stealing the first one's maps.
fn lock_pin_dir(pin_dir: &Path) -> Result<File> {
    fs::create_dir_all(pin_dir).with_context(|| format!("creating {}", pin_dir.display()))?;
    let dir = File::open(pin_dir).with_context(|| format!("opening {}", pin_dir.display()))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(dir.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        anyhow::bail!(
            "another prober is already running with pin directory {} \
             (only one daemon may own it)",
            pin_dir.display()
        );
    }
    Ok(dir)
}
