//! `cargo xtask vm-test`: runs test binaries inside a qemu guest booted
//! from Debian's 6.1 kernel, which has IPVS (this machine's kernel does not).
//!
//! The guest shares the host's root file system read-only over 9p, so test
//! binaries built on the host run there unchanged. Its init (a busybox
//! initramfs built here) mounts that root, a writable 9p share for results,
//! and switches to the host's /bin/sh running a script this module writes:
//! it runs each binary, stores its output and exit status in the share and
//! powers the guest off. Everything is bounded by a host-side timeout.
//! Software emulation (TCG): KVM hangs on this machine kind.

use std::{
    fmt::Write as _,
    fs,
    io::Write as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};

use crate::{
    build_ebpf, run_command,
    setup::{self, cache_dir, command_stdout, require_root},
    workspace_root,
};

/// What the guest needs on the host: the emulator, module tools for the
/// guest kernel's modules, a static busybox for the initramfs, and ipvsadm
/// and keepalived (VRRP for the pair test; run by the tests inside the
/// guest from the shared root).
const VM_PACKAGES: &[&str] = &[
    "qemu-system-x86",
    "kmod",
    "busybox-static",
    "ipvsadm",
    "keepalived",
];

/// Test targets (of the `prober-tests` crate, feature `guest`) that need
/// the guest; `cargo xtask test` runs all of them. Side by side (see
/// [`ALONE`]) they start in this order, the longest first, so that the
/// lanes end together.
pub const GUEST_TESTS: &[&str] = &[
    "guest_scale",
    "guest_controller",
    "guest_faults",
    "guest_operator",
    "guest_checks",
    "guest_probe",
    "guest_passive",
    "guest_pair",
    "guest_ipvs",
];

/// What a full run gives the guest to itself, before the rest runs side
/// by side (a lane per vCPU: most guest tests wait on probe intervals,
/// so two at a time take about half the time): a test target and the one
/// test of it that must be alone, or all of them.
const ALONE: &[(&str, Option<&str>)] = &[
    // Unloads ip_vs, which every other IPVS test uses.
    (
        "guest_faults",
        Some("without_the_ip_vs_module_it_waits_and_follows_ipvs_once_loaded"),
    ),
    // 70,200 probes from a debug build keep both vCPUs busy.
    ("guest_scale", None),
    // Measures RTTs against netem's delay: a neighbour's load adds its
    // own (24 ms for 20 side by side, 21 alone).
    ("guest_probe", None),
    // Counts the IPVS changes the kernel signals, which are signalled from
    // every namespace: another binary's `ipvsadm` counts too.
    ("guest_operator", None),
];

/// Modules the initramfs loads to mount the host's root over virtio 9p
/// (all modular in Debian's kernel); modprobe adds their dependencies.
const INITRAMFS_MODULES: &[&str] = &["virtio_pci", "9pnet_virtio", "9p"];

pub struct VmTestOptions {
    /// Test targets to run; all of [`GUEST_TESTS`] when empty.
    pub tests: Vec<String>,
    /// Arguments for every test binary (filters, `--exact`, ...).
    pub test_args: Vec<String>,
    /// The whole guest run (boot, tests, power-off) must end within this.
    pub timeout: Duration,
}

impl Default for VmTestOptions {
    fn default() -> Self {
        Self {
            tests: Vec::new(),
            test_args: Vec::new(),
            timeout: Duration::from_secs(3000),
        }
    }
}

/// `cargo xtask vm-test`: set-up, eBPF build, then [`test_in_guest`].
pub fn run(options: &VmTestOptions) -> Result<()> {
    require_root()?;
    let tools = setup::run()?;
    build_ebpf::run(&tools)?;
    test_in_guest(options)
}

/// Prepares the guest (idempotent), builds the test binaries and the
/// daemon, runs the binaries in one boot and fails if any of them failed.
pub fn test_in_guest(options: &VmTestOptions) -> Result<()> {
    let started = Instant::now();
    let guest = prepare_guest()?;
    let tests: Vec<String> = if options.tests.is_empty() {
        GUEST_TESTS.iter().map(|t| t.to_string()).collect()
    } else {
        options.tests.clone()
    };
    // The guest tests run `prober` itself too.
    run_command(cargo().args(["build", "--package", "prober-user"]))?;
    let built = build_test_binaries(&tests)?;
    // Per-test times in the output (libtest's unstable --report-time,
    // allowed at run time by RUSTC_BOOTSTRAP, set in the guest script).
    let mut args: Vec<String> = [
        "--test-threads=1",
        "--show-output",
        "-Z",
        "unstable-options",
        "--report-time",
    ]
    .map(String::from)
    .to_vec();
    args.extend(options.test_args.iter().cloned());
    let full_run = options.tests.is_empty() && options.test_args.is_empty();
    let mut binaries = if full_run {
        side_by_side(built, &args)
    } else {
        // Chosen tests run one after another, as asked.
        built
            .into_iter()
            .map(|binary| GuestProgram {
                args: args.clone(),
                alone: true,
                ..binary
            })
            .collect()
    };
    // The demo checks that it shows what the README says: part of every
    // full run, in the same boot.
    if options.tests.is_empty() {
        run_command(cargo().args(["build", "--package", "prober-tests", "--bin", "demo"]))?;
        binaries.push(GuestProgram {
            name: "demo".into(),
            path: target_dir().join("debug").join("demo"),
            args: Vec::new(),
            alone: !full_run,
        });
    }
    let results = run_guest(&guest, &binaries, options.timeout, GuestShape::TESTS)?;
    let failed: Vec<&str> = results
        .iter()
        .filter(|r| r.status != Some(0))
        .map(|r| r.name.as_str())
        .collect();
    println!(
        "[vm] {} test binaries in the guest, {} failed; vm-test took {:.1} s",
        results.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if !failed.is_empty() {
        bail!("guest tests failed: {}", failed.join(", "));
    }
    Ok(())
}

fn cargo() -> Command {
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.current_dir(workspace_root());
    cmd
}

pub fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

// ------------------------------------------------------------ guest kernel

struct Guest {
    release: String,
    vmlinuz: PathBuf,
    initramfs: PathBuf,
}

/// Packages, the kernel (downloaded once into the cache, its modules under
/// /lib/modules where modprobe in the guest finds them) and the initramfs.
fn prepare_guest() -> Result<Guest> {
    setup::install_debian_packages("[vm]", VM_PACKAGES)?;
    let kernels = cache_dir().join("guest-kernel");
    fs::create_dir_all(&kernels).with_context(|| format!("creating {}", kernels.display()))?;
    let release = match cached_release(&kernels) {
        Some(release) => release,
        None => current_release()?,
    };
    let dir = kernels.join(&release);
    let vmlinuz = dir.join("vmlinuz");
    let modules = Path::new("/lib/modules").join(&release);
    if vmlinuz.exists() && modules.join("modules.dep").exists() {
        println!(
            "[vm] guest kernel {release}: cached ({}, modules in {})",
            vmlinuz.display(),
            modules.display()
        );
    } else {
        install_kernel(&kernels, &release)?;
    }
    let initramfs = build_initramfs(&dir, &release)?;
    Ok(Guest {
        release,
        vmlinuz,
        initramfs,
    })
}

/// The newest 6.1 kernel already in the cache, if any: a rerun needs no
/// package index and no download.
fn cached_release(kernels: &Path) -> Option<String> {
    let mut releases: Vec<String> = fs::read_dir(kernels)
        .ok()?
        .filter_map(|e| e.ok())
        .filter(|e| e.path().join("vmlinuz").exists())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("6.1.") && name.ends_with("-amd64"))
        .collect();
    releases.sort_by_key(|r| abi_number(r));
    releases.pop()
}

/// "6.1.0-56-amd64" -> 56
fn abi_number(release: &str) -> u32 {
    release
        .split('-')
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// The 6.1 kernel Debian currently offers: what linux-image-amd64 depends
/// on, or the highest-numbered linux-image-6.1.0-N-amd64.
fn current_release() -> Result<String> {
    for attempt in 0..2 {
        if attempt == 1 {
            println!("[vm] no 6.1 kernel in the package index: apt-get update");
            run_command(Command::new("apt-get").args(["update", "-q"]))?;
        }
        let depends =
            command_stdout(Command::new("apt-cache").args(["depends", "linux-image-amd64"]))
                .unwrap_or_default();
        let from_meta = depends
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .find(|r| r.starts_with("6.1.") && r.ends_with("-amd64"))
            .map(str::to_string);
        if let Some(release) = from_meta {
            return Ok(release);
        }
        let search = command_stdout(Command::new("apt-cache").args([
            "search",
            "--names-only",
            r"^linux-image-6\.1\.0-[0-9]+-amd64$",
        ]))
        .unwrap_or_default();
        let newest = search
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .filter_map(|name| name.strip_prefix("linux-image-"))
            .max_by_key(|r| abi_number(r))
            .map(str::to_string);
        if let Some(release) = newest {
            return Ok(release);
        }
    }
    bail!("Debian's package index offers no linux-image-6.1.0-*-amd64 (is bookworm in the apt sources?)")
}

/// Downloads linux-image-RELEASE, keeps its vmlinuz in the cache and puts
/// its modules under /lib/modules (with depmod) for modprobe in the guest.
fn install_kernel(kernels: &Path, release: &str) -> Result<()> {
    let package = format!("linux-image-{release}");
    println!("[vm] guest kernel {release}: downloading {package} (about 70 MB, one time)");
    // Per process: two first runs at once must not share a folder.
    let download = kernels.join(format!("download-{}", std::process::id()));
    let _ = fs::remove_dir_all(&download);
    fs::create_dir_all(&download)?;
    // The download folder belongs to root, not to apt's sandbox user.
    run_command(
        Command::new("apt-get")
            .args(["download", "-q", "-o", "APT::Sandbox::User=root", &package])
            .current_dir(&download),
    )
    .with_context(|| format!("downloading {package}"))?;
    let deb = fs::read_dir(&download)?
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "deb"))
        .with_context(|| format!("apt-get download left no .deb in {}", download.display()))?;
    let extracted = download.join("root");
    run_command(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&extracted))?;

    let modules_src = extracted.join("lib/modules").join(release);
    let modules = Path::new("/lib/modules").join(release);
    if !modules.join("modules.dep").exists() {
        println!(
            "[vm] placing the guest kernel's modules in {}",
            modules.display()
        );
        let _ = fs::remove_dir_all(&modules);
        fs::create_dir_all("/lib/modules")?;
        if fs::rename(&modules_src, &modules).is_err() {
            run_command(Command::new("cp").arg("-a").arg(&modules_src).arg(&modules))?;
        }
        run_command(Command::new("depmod").args(["-a", release]))?;
    }
    let dir = kernels.join(release);
    fs::create_dir_all(&dir)?;
    // vmlinuz last: its presence marks a complete install.
    fs::copy(
        extracted.join("boot").join(format!("vmlinuz-{release}")),
        dir.join("vmlinuz.partial"),
    )
    .context("the kernel package has no boot/vmlinuz")?;
    fs::rename(dir.join("vmlinuz.partial"), dir.join("vmlinuz"))?;
    fs::remove_dir_all(&download).ok();
    println!("[vm] guest kernel {release}: installed");
    Ok(())
}

// --------------------------------------------------------------- initramfs

/// The guest's PID 1 until it hands over to the host's /bin/sh. Mounts the
/// host root and the workspace (read-only) and the result share (writable),
/// each at the same path as on the host, tmpfs where the guest must write,
/// then switch_root, so
/// the kernel's module loader runs the host's modprobe too.
const GUEST_INIT: &str = r#"#!/bin/busybox sh
/bin/busybox mkdir -p /sbin /usr/bin /usr/sbin /proc /sys /dev /newroot
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
fail() { echo "[guest] $*"; echo b > /proc/sysrq-trigger; }
for module in /modules/*.ko; do insmod "$module" || fail "insmod $module failed"; done
out=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^prober.out=//p')
[ -n "$out" ] || fail "no prober.out= on the kernel command line"
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 hostroot /newroot \
    || fail "cannot mount the host root over 9p"
mount -t tmpfs tmp /newroot/tmp
mount -t tmpfs run /newroot/run
# The workspace again at its own path: a checkout under /tmp would
# otherwise be hidden by the guest's tmpfs.
workspace=$(tr ' ' '\n' < /proc/cmdline | sed -n 's/^prober.workspace=//p')
[ -n "$workspace" ] || fail "no prober.workspace= on the kernel command line"
mkdir -p "/newroot$workspace" 2>/dev/null
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=512000 workspace "/newroot$workspace" \
    || fail "cannot mount the workspace at $workspace"
mkdir -p "/newroot$out"
mount -t 9p -o trans=virtio,version=9p2000.L,msize=512000 out "/newroot$out" \
    || fail "cannot mount the result share at $out"
mount -t proc proc /newroot/proc
mount -t sysfs sys /newroot/sys
mount -t devtmpfs dev /newroot/dev
[ -f "/newroot$out/run.sh" ] || fail "no $out/run.sh"
exec switch_root /newroot /bin/sh "$out/run.sh"
"#;

/// Builds (or reuses) the initramfs: busybox, the 9p modules and the init.
fn build_initramfs(dir: &Path, release: &str) -> Result<PathBuf> {
    let mut modules: Vec<PathBuf> = Vec::new();
    for module in INITRAMFS_MODULES {
        // One module per call: later words would be its parameters.
        let depends = command_stdout(
            Command::new("modprobe")
                .args(["--show-depends", "-S", release])
                .arg(module),
        )
        .with_context(|| format!("finding module {module} of kernel {release}"))?;
        for line in depends.lines() {
            if let Some(path) = line.trim().strip_prefix("insmod ") {
                let path = PathBuf::from(path.trim());
                if !modules.contains(&path) {
                    modules.push(path);
                }
            }
        }
    }
    let busybox = Path::new("/bin/busybox");
    let busybox_bytes = fs::read(busybox).context("reading /bin/busybox (busybox-static)")?;

    // Keyed by everything that goes in, so a change rebuilds it.
    let mut key = GUEST_INIT.as_bytes().to_vec();
    key.extend_from_slice(&busybox_bytes);
    for module in &modules {
        key.extend_from_slice(module.as_os_str().as_encoded_bytes());
    }
    let path = dir.join(format!("initramfs-{:016x}.cpio", fnv1a(&key)));
    if path.exists() {
        println!("[vm] initramfs: cached ({})", path.display());
        return Ok(path);
    }

    let mut archive = Cpio::default();
    for d in ["bin", "modules", "proc", "sys", "dev", "newroot"] {
        archive.dir(d);
    }
    archive.file("bin/busybox", 0o755, &busybox_bytes);
    archive.file("init", 0o755, GUEST_INIT.as_bytes());
    for (i, module) in modules.iter().enumerate() {
        let name = module.file_name().unwrap_or_default().to_string_lossy();
        let bytes = fs::read(module).with_context(|| format!("reading {}", module.display()))?;
        // Numbered: the init loads them in dependency order.
        archive.file(&format!("modules/{i:02}-{name}"), 0o644, &bytes);
    }
    let partial = path.with_extension("partial");
    fs::write(&partial, archive.finish())?;
    fs::rename(&partial, &path)?;
    println!(
        "[vm] initramfs: built {} (busybox and {} modules)",
        path.display(),
        modules.len()
    );
    Ok(path)
}

/// A newc cpio archive, as the kernel unpacks an initramfs.
#[derive(Default)]
struct Cpio {
    bytes: Vec<u8>,
    next_inode: u32,
}

impl Cpio {
    fn dir(&mut self, name: &str) {
        self.entry(name, 0o040_755, &[]);
    }

    fn file(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.entry(name, 0o100_000 | mode, data);
    }

    fn entry(&mut self, name: &str, mode: u32, data: &[u8]) {
        self.next_inode += 1;
        let nlink = if mode & 0o040_000 != 0 { 2 } else { 1 };
        let fields = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            nlink,
            0, // mtime
            data.len() as u32,
            0, // devmajor
            0, // devminor
            0, // rdevmajor
            0, // rdevminor
            name.len() as u32 + 1,
            0, // check
        ];
        let mut header = String::from("070701");
        for field in fields {
            let _ = write!(header, "{field:08x}");
        }
        self.bytes.extend_from_slice(header.as_bytes());
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }

    fn finish(mut self) -> Vec<u8> {
        self.next_inode = 0;
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |hash, b| {
        (hash ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

// -------------------------------------------------------------- test binaries

#[derive(Clone)]
pub struct GuestProgram {
    pub name: String,
    pub path: PathBuf,
    pub args: Vec<String>,
    /// Runs with the guest to itself; programs that need not run side by
    /// side, a lane per vCPU.
    pub alone: bool,
}

/// `cargo test --no-run` for the guest targets; their paths from cargo's
/// JSON messages.
fn build_test_binaries(tests: &[String]) -> Result<Vec<GuestProgram>> {
    let mut cmd = cargo();
    cmd.args([
        "test",
        "--package",
        "prober-tests",
        "--features",
        "guest",
        "--no-run",
        "--message-format=json-render-diagnostics",
    ]);
    for test in tests {
        cmd.args(["--test", test]);
    }
    println!("$ {}", format!("{cmd:?}").replace('"', ""));
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("starting cargo")?;
    if !out.status.success() {
        bail!("building the guest test binaries failed ({})", out.status);
    }
    let mut binaries = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        if message["reason"] != "compiler-artifact" {
            continue;
        }
        let (Some(name), Some(path)) = (
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) else {
            continue;
        };
        if tests.iter().any(|t| t == name) {
            binaries.push(GuestProgram {
                name: name.to_string(),
                path: PathBuf::from(path),
                args: Vec::new(),
                alone: true,
            });
        }
    }
    for test in tests {
        if !binaries.iter().any(|b| &b.name == test) {
            bail!("cargo built no test binary named {test} (a [[test]] of prober-tests?)");
        }
    }
    Ok(binaries)
}

// ------------------------------------------------------------------ the run

pub struct BinaryResult {
    pub name: String,
    /// None: the binary did not finish (guest crashed or timed out).
    pub status: Option<i32>,
}

/// Quotes for sh: the guest script runs host paths and arguments.
fn shell_quote(text: &str) -> String {
    format!("'{}'", text.replace('\'', r"'\''"))
}

/// A full run's programs: [`ALONE`]'s tests first, each by itself, then
/// every target (less what ran alone) side by side in [`GUEST_TESTS`]'
/// order.
fn side_by_side(built: Vec<GuestProgram>, args: &[String]) -> Vec<GuestProgram> {
    let mut programs = Vec::new();
    for (name, only) in ALONE {
        if let Some(binary) = built.iter().find(|b| b.name == *name) {
            let mut args = args.to_vec();
            if let Some(test) = only {
                args.extend(["--exact".to_string(), test.to_string()]);
            }
            programs.push(GuestProgram {
                args,
                alone: true,
                ..binary.clone()
            });
        }
    }
    for name in GUEST_TESTS {
        let Some(binary) = built.iter().find(|b| b.name == *name) else {
            continue;
        };
        match ALONE.iter().find(|(alone, _)| alone == name) {
            Some((_, None)) => {} // all of it ran alone
            Some((_, Some(test))) => {
                let mut args = args.to_vec();
                args.extend(["--skip".to_string(), test.to_string()]);
                programs.push(GuestProgram {
                    args,
                    alone: false,
                    ..binary.clone()
                });
            }
            None => programs.push(GuestProgram {
                args: args.to_vec(),
                alone: false,
                ..binary.clone()
            }),
        }
    }
    programs
}

/// The guest's vCPUs and memory.
#[derive(Debug, Clone, Copy)]
pub struct GuestShape {
    pub cpus: usize,
    pub memory_mib: usize,
}

impl GuestShape {
    /// Tests and the demo: a vCPU per host core (TCG runs a thread per
    /// vCPU), 2 GiB.
    pub const TESTS: Self = Self {
        cpus: 2,
        memory_mib: 2048,
    };
}

/// Boots the guest once, of `shape`, to run `programs` (host binaries,
/// with their arguments) in order, streaming their output, and returns how
/// each ended.
pub fn run_programs(
    programs: &[GuestProgram],
    timeout: Duration,
    shape: GuestShape,
) -> Result<Vec<BinaryResult>> {
    let guest = prepare_guest()?;
    run_guest(&guest, programs, timeout, shape)
}

fn run_guest(
    guest: &Guest,
    binaries: &[GuestProgram],
    timeout: Duration,
    shape: GuestShape,
) -> Result<Vec<BinaryResult>> {
    let out = target_dir().join("vm-test");
    let _ = fs::remove_dir_all(&out);
    fs::create_dir_all(&out)?;
    let out = out.canonicalize()?;
    let out_text = out
        .to_str()
        .context("the target folder's path is not UTF-8")?;
    if out_text.contains([',', ' ', '\t', '\n']) {
        bail!("the guest cannot share {out_text}: commas and spaces break qemu's -virtfs and the kernel command line");
    }

    let mut script = String::from(
        "#!/bin/sh\n# Written by `cargo xtask vm-test`: PID 1 of the guest after switch_root.\n",
    );
    let _ = writeln!(
        script,
        "export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
         HOME=/root RUST_BACKTRACE=1"
    );
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        let _ = writeln!(
            script,
            "export CARGO_TARGET_DIR={}",
            shell_quote(&dir.to_string_lossy())
        );
    }
    let out_q = shell_quote(out_text);
    let _ = writeln!(script, "cut -d' ' -f1 /proc/uptime > {out_q}/booted");
    // Reliability rows of the guest tests (see `prober_tests::record`).
    let _ = writeln!(script, "export PROBER_RECORDS={out_q}/records.jsonl");
    // IPVS checks a real server's address against the routing tables,
    // which exist once an interface is up.
    let _ = writeln!(script, "ip link set lo up");
    let _ = writeln!(script, "mount -t bpf bpf /sys/fs/bpf 2>/dev/null");
    // Test binaries start in their package's folder, as under cargo test.
    let _ = writeln!(
        script,
        "cd {}",
        shell_quote(&workspace_root().join("tests").to_string_lossy())
    );
    // Libtest's unstable options (--report-time) for the test binaries.
    let _ = writeln!(script, "export RUSTC_BOOTSTRAP=1");
    for (i, binary) in binaries.iter().enumerate() {
        let quoted_args: Vec<String> = binary.args.iter().map(|a| shell_quote(a)).collect();
        let _ = writeln!(
            script,
            "run_{i}() {{ {} {} > {out_q}/{i}.log 2>&1; echo $? > {out_q}/{i}.status; }}",
            shell_quote(&binary.path.to_string_lossy()),
            quoted_args.join(" ")
        );
    }
    // Programs alone run in order; a stretch of the others runs in a lane
    // per vCPU, each lane taking the next program not yet taken (mkdir is
    // the atomic claim).
    let mut i = 0;
    while i < binaries.len() {
        if binaries[i].alone {
            let _ = writeln!(script, "run_{i}");
            i += 1;
            continue;
        }
        let stretch: Vec<String> = (i..binaries.len())
            .take_while(|&j| !binaries[j].alone)
            .map(|j| j.to_string())
            .collect();
        let _ = writeln!(
            script,
            "lane_{i}() {{ for j in {}; do mkdir {out_q}/claim-$j 2>/dev/null && run_$j; done; }}",
            stretch.join(" ")
        );
        let lanes = vec![format!("lane_{i} &"); shape.cpus.max(1)].join(" ");
        let _ = writeln!(script, "{lanes} wait");
        i += stretch.len();
    }
    let _ = writeln!(script, "sync\necho b > /proc/sysrq-trigger");
    fs::write(out.join("run.sh"), script)?;

    let console = out.join("console.log");
    let mut qemu = Command::new("qemu-system-x86_64");
    qemu.args(["-accel", "tcg", "-cpu", "max"])
        .args(["-smp", &shape.cpus.to_string()])
        .args(["-m", &format!("{}M", shape.memory_mib)])
        .args(["-nographic", "-nodefaults", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-kernel")
        .arg(&guest.vmlinuz)
        .arg("-initrd")
        .arg(&guest.initramfs)
        .arg("-append")
        .arg(format!(
            "console=ttyS0 quiet panic=-1 mitigations=off prober.out={out_text} prober.workspace={}",
            workspace_root().display()
        ))
        .arg("-virtfs")
        .arg("local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap")
        .arg("-virtfs")
        .arg(format!(
            "local,path={},mount_tag=workspace,security_model=none,readonly=on,multidevs=remap",
            workspace_root().display()
        ))
        .arg("-virtfs")
        .arg(format!(
            "local,path={out_text},mount_tag=out,security_model=none,multidevs=remap"
        ))
        .stdin(Stdio::null())
        .stdout(fs::File::create(out.join("qemu.log"))?)
        .stderr(fs::File::create(out.join("qemu.stderr"))?);
    println!(
        "[vm] booting {} under qemu (TCG) to run {} (timeout {} s; console in {})",
        guest.release,
        binaries
            .iter()
            .map(|b| b.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        timeout.as_secs(),
        console.display()
    );
    let started = Instant::now();
    let mut child = qemu.spawn().context("starting qemu-system-x86_64")?;
    let mut stream = LogStream::new(&out, binaries);
    let status = loop {
        stream.print_new();
        if let Some(status) = child.try_wait()? {
            break status;
        }
        if started.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            bail!(
                "the guest did not finish within {} s and was killed; last console lines:\n{}",
                timeout.as_secs(),
                tail(&console, 30)
            );
        }
        thread::sleep(Duration::from_millis(200));
    };
    let wall = started.elapsed().as_secs_f64();
    if !status.success() {
        bail!(
            "qemu failed ({status}): {}\nconsole:\n{}",
            fs::read_to_string(out.join("qemu.stderr")).unwrap_or_default(),
            tail(&console, 30)
        );
    }
    let booted = fs::read_to_string(out.join("booted")).unwrap_or_default();
    if booted.trim().is_empty() {
        bail!(
            "the guest never reached its test script; last console lines:\n{}",
            tail(&console, 30)
        );
    }
    println!(
        "[vm] guest booted to its test script in {} s of guest time; the guest ran {wall:.1} s in all",
        booted.trim()
    );

    stream.print_new();
    let mut results = Vec::new();
    for (i, binary) in binaries.iter().enumerate() {
        let status = fs::read_to_string(out.join(format!("{i}.status")))
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok());
        if status.is_none() {
            stream.finish(i, None);
            println!("[vm] last console lines:\n{}", tail(&console, 30));
        }
        results.push(BinaryResult {
            name: binary.name.clone(),
            status,
        });
    }
    Ok(results)
}

/// Prints each program's output as the guest writes it (over 9p), with a
/// header before and its verdict after.
struct LogStream<'a> {
    out: &'a Path,
    binaries: &'a [GuestProgram],
    /// The program being printed, and how much of its log is printed.
    current: usize,
    offset: usize,
    header_printed: bool,
}

impl<'a> LogStream<'a> {
    fn new(out: &'a Path, binaries: &'a [GuestProgram]) -> Self {
        Self {
            out,
            binaries,
            current: 0,
            offset: 0,
            header_printed: false,
        }
    }

    fn print_new(&mut self) {
        while self.current < self.binaries.len() {
            let i = self.current;
            let Ok(log) = fs::read(self.out.join(format!("{i}.log"))) else {
                return; // not started yet
            };
            if !self.header_printed {
                println!("[vm] ---- {} (in the guest) ----", self.binaries[i].name);
                self.header_printed = true;
            }
            let mut stdout = std::io::stdout().lock();
            if log.len() > self.offset {
                let _ = stdout.write_all(&log[self.offset..]);
                let _ = stdout.flush();
                self.offset = log.len();
            }
            drop(stdout);
            let status = fs::read_to_string(self.out.join(format!("{i}.status")))
                .ok()
                .and_then(|s| s.trim().parse::<i32>().ok());
            match status {
                Some(code) => self.finish(i, Some(code)),
                None => return,
            }
        }
    }

    fn finish(&mut self, i: usize, status: Option<i32>) {
        if i != self.current {
            return;
        }
        let verdict = match status {
            Some(0) => "passed".to_string(),
            Some(code) => format!("FAILED (exit {code})"),
            None => "did not finish".to_string(),
        };
        println!("[vm] ---- {}: {verdict} ----", self.binaries[i].name);
        self.current += 1;
        self.offset = 0;
        self.header_printed = false;
    }
}

fn tail(path: &Path, lines: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}
