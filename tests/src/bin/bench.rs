//! `cargo xtask bench probe`: what active probing costs, measured here and
//! now against the way keepalived checks (one connect() per check), both
//! against the same real listener across veth. Prints medians of several
//! runs; figures from a shared, noisy machine are only comparable within one
//! run of this program.

use std::{
    net::{SocketAddrV4, TcpStream},
    os::fd::{AsFd, FromRawFd, OwnedFd},
    process::Command,
    sync::{
        atomic::{AtomicBool, Ordering},
        Arc,
    },
    thread,
    time::{Duration, Instant},
};

use anyhow::{bail, Context, Result};
use aya::{
    maps::{MapData, PerCpuArray},
    programs::{ProgramFd, Xdp, XdpMode},
    Ebpf,
};
use prober_common::{
    cookie::probe_cookie, map_names, program_names, BatchCursor, DatapathCounters, ProbeConfig,
    PROBE_FRAME_MAX,
};
use prober_tests::{
    packets::*,
    procfs::{processes, stat_cpu_seconds},
    run, NetNs, PeerXdp, VethPair, VETH,
};
use prober_user::{
    datapath::{load_programs, program_fd, take_probe_maps},
    preflight::interface_index,
    probe::{addr16, reply_key, spec_entry, Path, ProbeMaps, ProbeSpec},
    test_run::{run_xdp, run_xdp_live},
};

const RUNS: usize = 5;
/// Probes per round: one per local port of the default range.
const ROUND: u32 = 4_000;
/// Rounds per CPU measurement.
const ROUNDS: u32 = 25;
const CONNECT_CHECKS: u32 = 4_000;
const SERVICE_PORT: u16 = 8080;

fn main() -> Result<()> {
    let what = std::env::args().nth(1).unwrap_or_default();
    match what.as_str() {
        "probe" => bench_probe(),
        "passive" => bench_passive(),
        other => bail!("unknown benchmark '{other}' (known: probe, passive)"),
    }
}

/// The director side: our programs loaded, the ingress one attached to the
/// client end of the veth pair.
struct Director {
    _ebpf: Ebpf,
    maps: ProbeMaps,
    counters: PerCpuArray<MapData, DatapathCounters>,
    rx: ProgramFd,
    tx: ProgramFd,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

/// CPU time (user + system) of this process so far, in ns. With veth, the
/// kernel does both ends' packet work in the context of the thread that
/// sends, so this counts the checker and the real server's kernel side,
/// and nothing of other processes on this shared machine.
fn process_cpu_ns() -> Result<f64> {
    // SAFETY: getrusage writes into the zeroed struct we pass.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut usage) } != 0 {
        bail!("getrusage: {}", std::io::Error::last_os_error());
    }
    let ns = |t: libc::timeval| t.tv_sec as f64 * 1e9 + t.tv_usec as f64 * 1e3;
    Ok(ns(usage.ru_utime) + ns(usage.ru_stime))
}

fn bench_probe() -> Result<()> {
    println!("[bench probe] topology: director netns <-veth-> real-server netns, listener on 192.0.2.2:{SERVICE_PORT}");
    let pair = VethPair::new()?;
    let _peer = PeerXdp::attach(&pair.server, VETH)?;
    let listener = pair
        .server
        .listen(SocketAddrV4::new(pair.server_addr, SERVICE_PORT))?;
    listener.set_nonblocking(true)?;
    let stop = Arc::new(AtomicBool::new(false));
    let stop_accepting = stop.clone();
    // keepalived's checks complete connections: someone must accept them.
    let acceptor = thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        while !stop_accepting.load(Ordering::Relaxed) && Instant::now() < deadline {
            match listener.accept() {
                Ok((conn, _)) => drop(conn),
                Err(_) => thread::sleep(Duration::from_micros(200)),
            }
        }
    });

    let mut director = attach_director(&pair)?;
    // Each end's receive work in a kernel thread of its own: the real
    // server's (its SYN-ACKs, RSTs, accepts) is then off this process's
    // account, and the director's (prober's XDP on the replies, the
    // socket receive of connect()'s handshake) is counted from its
    // thread, for both ways of checking.
    let receive_threads = threaded_napi(&pair.client, VETH)?;
    threaded_napi(&pair.server, VETH)?;
    let checker_cpu_ns =
        || -> Result<f64> { Ok(process_cpu_ns()? + threads_cpu_ns(&receive_threads)) };
    let client_ifindex = pair.client.enter(|| interface_index(VETH))??;
    let client_mac = mac_bytes(&pair.client.mac(VETH)?)?;
    let server_mac = mac_bytes(&pair.server.mac(VETH)?)?;
    let secret = [0x5eed_5eed, 0x00c0_ffee];
    director.maps.config.set(
        0,
        ProbeConfig {
            secret,
            previous_secret: secret,
            local_port_min: 61000,
            local_port_max: 65535,
            ..Default::default()
        },
        0,
    )?;
    let path = Path {
        ifindex: client_ifindex,
        next_hop: pair.server_addr.into(),
        source: pair.client_addr.into(),
    };
    let spec: ProbeSpec = format!("tcp:{}:{SERVICE_PORT}", pair.server_addr).parse()?;

    // 1. Probes sent per second on one core: 65,536 targets, 16 batches,
    //    into a second veth pair whose far end drops every frame in XDP
    //    (a NIC would put them on the wire; a veth peer otherwise does the
    //    receiver's work on the sender's core).
    let sink = VethPair::new()?;
    let sink_ifindex = sink.client.enter(|| interface_index(VETH))??;
    let drop_program = load_trivial_xdp(XDP_DROP)?;
    let drop_fd = drop_program.try_clone()?;
    let _sink_link = sink.server.enter(move || -> Result<OwnedFd> {
        attach_xdp_link(drop_fd.as_fd(), interface_index(VETH)?)
    })??;
    let sink_path = Path {
        ifindex: sink_ifindex,
        next_hop: sink.server_addr.into(),
        source: sink.client_addr.into(),
    };
    let sink_mac = mac_bytes(&sink.server.mac(VETH)?)?;
    for id in 0..prober_common::MAX_TARGETS {
        let entry = spec_entry(
            &spec,
            61000 + (id % 4536) as u16,
            &sink_path,
            client_mac,
            sink_mac,
        );
        director.maps.targets.set(id, entry, 0)?;
        director.maps.batch.set(id, id, 0)?;
    }
    let mut tx_rates = Vec::new();
    let mut tx_kernel_ns = Vec::new();
    for _ in 0..RUNS {
        let batches = 16;
        let started = Instant::now();
        let mut kernel_ns = 0.0;
        for _ in 0..batches {
            kernel_ns += send_batch(&sink, &mut director, prober_common::MAX_TARGETS)? as f64;
        }
        let probes = batches as f64 * prober_common::MAX_TARGETS as f64;
        tx_rates.push(probes / started.elapsed().as_secs_f64());
        tx_kernel_ns.push(kernel_ns / batches as f64);
    }

    // 2. Full checks against the real listener: SYN out, SYN-ACK matched,
    //    RST back.
    for id in 0..ROUND {
        let port = 61000 + id as u16;
        director.maps.targets.set(
            id,
            spec_entry(&spec, port, &path, client_mac, server_mac),
            0,
        )?;
        director
            .maps
            .reply_index
            .insert(reply_key(&spec, port), id, 0)?;
    }
    let mut prober_cpu = Vec::new();
    let mut prober_answered = Vec::new();
    for _ in 0..RUNS {
        let cpu_before = checker_cpu_ns()?;
        let matched_before = matched(&director)?;
        for _ in 0..ROUNDS {
            let target = matched(&director)? + ROUND as u64;
            send_batch(&pair, &mut director, ROUND)?;
            let deadline = Instant::now() + Duration::from_secs(2);
            while matched(&director)? < target && Instant::now() < deadline {
                thread::sleep(Duration::from_micros(500));
            }
            // The RSTs must leave the real server's SYN queue empty before
            // the same 4-tuples are probed again.
            thread::sleep(Duration::from_millis(2));
        }
        let checks = (ROUND * ROUNDS) as f64;
        prober_cpu.push((checker_cpu_ns()? - cpu_before) / checks);
        prober_answered.push((matched(&director)? - matched_before) as f64 / checks);
    }

    // 3. The keepalived way: connect(), wait for the handshake, close().
    let mut connect_cpu = Vec::new();
    let mut connect_ok = Vec::new();
    let server = SocketAddrV4::new(pair.server_addr, SERVICE_PORT);
    for _ in 0..RUNS {
        let cpu_before = checker_cpu_ns()?;
        let ok = pair.client.enter(move || {
            (0..CONNECT_CHECKS)
                .filter(|_| {
                    TcpStream::connect_timeout(&server.into(), Duration::from_secs(1)).is_ok()
                })
                .count()
        })?;
        connect_cpu.push((checker_cpu_ns()? - cpu_before) / CONNECT_CHECKS as f64);
        connect_ok.push(ok as f64 / CONNECT_CHECKS as f64);
    }
    stop.store(true, Ordering::Relaxed);
    let _ = acceptor.join();

    // 4. Per-frame cost of the ingress program (BPF_PROG_TEST_RUN repeat),
    //    next to an empty XDP program measured the same way.
    let director_addr = pair.client_addr.octets();
    let server_addr = pair.server_addr.octets();
    // The answer to target 0's outstanding probe (its send count is the nonce).
    let nonce = director.maps.state.get(&0, 0)?.sent as u32;
    let ack = probe_cookie(
        secret,
        &addr16(pair.client_addr.into()),
        &addr16(pair.server_addr.into()),
        61000u16.to_be(),
        SERVICE_PORT.to_be(),
        6,
        nonce,
    )
    .wrapping_add(1);
    let reply = tcp_frame(
        server_addr,
        director_addr,
        &Tcp {
            src_port: SERVICE_PORT,
            dst_port: 61000,
            seq: 1,
            ack,
            flags: RST | ACK,
            options: &[],
        },
    );
    let web = tcp_frame(
        server_addr,
        director_addr,
        &Tcp {
            src_port: 443,
            dst_port: 50000,
            seq: 1,
            ack: 1,
            flags: ACK,
            options: &[0u8; 0],
        },
    );
    let udp = ethernet(
        MAC_B,
        MAC_A,
        0x0800,
        &ipv4(
            server_addr,
            director_addr,
            17,
            0,
            &[],
            &[0x01, 0xbb, 0xc3, 0x50, 0, 8, 0, 0],
        ),
    );
    let empty = load_trivial_xdp(XDP_PASS)?;
    let per_frame = |prog: &dyn AsFd, frame: &[u8]| -> Result<f64> {
        let runs: Result<Vec<f64>> = (0..RUNS)
            .map(|_| Ok(run_xdp(prog.as_fd(), frame, 1_000_000)?.duration_ns as f64))
            .collect();
        Ok(median(runs?))
    };
    let empty_ns = per_frame(&empty, &web)?;
    let pass_tcp_ns = per_frame(&director.rx, &web)?;
    let pass_udp_ns = per_frame(&director.rx, &udp)?;
    let reply_ns = per_frame(&director.rx, &reply)?;

    let tx = median(tx_rates);
    let tx_run_ns = median(tx_kernel_ns);
    let prober_per_check = median(prober_cpu);
    let connect_per_check = median(connect_cpu);
    println!();
    println!(
        "prober bench probe: medians of {RUNS} runs, kernel {}",
        kernel_release()
    );
    println!("{:<58} {:>14}", "measure", "value");
    println!(
        "{:<58} {:>14.0}",
        "probes sent per second, one core (65,536-probe batches)", tx
    );
    println!(
        "{:<58} {:>14.1}",
        "  ns per probe_tx run (kernel's count)", tx_run_ns
    );
    println!(
        "{:<58} {:>14.0}",
        "replies matched per second (ns per reply below)",
        1e9 / reply_ns
    );
    println!(
        "{:<58} {:>14.1}",
        "  ns per matched reply (ingress program)", reply_ns
    );
    println!(
        "{:<58} {:>14.1}",
        "ns per passed non-probe TCP frame (ingress program)", pass_tcp_ns
    );
    println!(
        "{:<58} {:>14.1}",
        "ns per passed UDP frame (ingress program)", pass_udp_ns
    );
    println!(
        "{:<58} {:>14.1}",
        "ns per frame, empty XDP program (test-run floor)", empty_ns
    );
    println!(
        "{:<58} {:>14.0}",
        "CPU ns per check, prober SYN probes", prober_per_check
    );
    println!(
        "{:<58} {:>14.0}",
        "CPU ns per check, connect()+close (keepalived way)", connect_per_check
    );
    println!(
        "{:<58} {:>14.1}",
        "ratio: connect() CPU / prober CPU per check",
        connect_per_check / prober_per_check
    );
    println!(
        "{:<58} {:>13.1}%",
        "prober checks answered",
        100.0 * median(prober_answered)
    );
    println!(
        "{:<58} {:>13.1}%",
        "connect() checks succeeded",
        100.0 * median(connect_ok)
    );
    println!("CPU per check: user+system time of this process and of the director end's receive thread (threaded NAPI); the real server's kernel work runs in its end's own thread and is left out");
    println!(
        "goals: >= 1,000,000 probes/s/core; <= 50 ns per passed frame; >= 30x less CPU per check"
    );
    Ok(())
}

/// Turns on threaded NAPI for `interface` in `netns` and returns the
/// kernel threads that appeared for it.
fn threaded_napi(netns: &NetNs, interface: &str) -> Result<Vec<u32>> {
    let before = napi_threads();
    run(Command::new("ip")
        .args(["netns", "exec", &netns.name, "sh", "-c"])
        .arg(format!("echo 1 > /sys/class/net/{interface}/threaded")))?;
    let new: Vec<u32> = napi_threads()
        .into_iter()
        .filter(|pid| !before.contains(pid))
        .collect();
    if new.is_empty() {
        bail!(
            "no NAPI thread appeared for {interface} in {}: its receive work would go uncounted",
            netns.name
        );
    }
    Ok(new)
}

/// The kernel's threaded-NAPI threads now.
fn napi_threads() -> Vec<u32> {
    processes()
        .into_iter()
        .filter(|(_, comm)| comm.starts_with("napi/"))
        .map(|(pid, _)| pid)
        .collect()
}

/// User and system CPU time of `pids` so far, in ns.
fn threads_cpu_ns(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| stat_cpu_seconds(&format!("/proc/{pid}/stat")))
        .map(|(_, user, system)| (user + system) * 1e9)
        .sum()
}

fn matched(director: &Director) -> Result<u64> {
    Ok(director
        .counters
        .get(&0, 0)?
        .iter()
        .map(|c| c.replies_matched)
        .sum())
}

fn send_batch(pair: &VethPair, director: &mut Director, len: u32) -> Result<u32> {
    director
        .maps
        .cursor
        .set(0, BatchCursor { next: 0, len }, 0)?;
    let fd = director.tx.try_clone()?;
    Ok(pair
        .client
        .enter(move || run_xdp_live(fd.as_fd(), &[0u8; PROBE_FRAME_MAX], len))??)
}

fn attach_director(pair: &VethPair) -> Result<Director> {
    let mut ebpf = pair.client.enter(|| -> Result<Ebpf> {
        let mut ebpf = load_programs()?;
        let program: &mut Xdp = ebpf
            .program_mut(program_names::XDP_INGRESS)
            .context("no ingress program")?
            .try_into()?;
        program.attach(VETH, XdpMode::Default)?;
        Ok(ebpf)
    })??;
    let rx = program_fd(&ebpf, program_names::XDP_INGRESS)?;
    let tx = program_fd(&ebpf, program_names::PROBE_TX)?;
    let maps = take_probe_maps(&mut ebpf)?;
    let counters =
        PerCpuArray::try_from(ebpf.take_map(map_names::COUNTERS).context("no COUNTERS")?)?;
    Ok(Director {
        _ebpf: ebpf,
        maps,
        counters,
        rx,
        tx,
    })
}

fn mac_bytes(text: &str) -> Result<[u8; 6]> {
    let bytes: Vec<u8> = text
        .split(':')
        .map(|b| u8::from_str_radix(b, 16))
        .collect::<Result<_, _>>()?;
    bytes
        .try_into()
        .map_err(|_| anyhow::anyhow!("bad MAC {text}"))
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .unwrap_or_default()
        .trim()
        .to_string()
}

const XDP_DROP: u32 = 1;
const XDP_PASS: u32 = 2;

/// An XDP program that only returns `action`, loaded with a raw
/// BPF_PROG_LOAD: with XDP_PASS, the floor that BPF_PROG_TEST_RUN itself
/// costs per frame; with XDP_DROP, a sink.
fn load_trivial_xdp(action: u32) -> Result<OwnedFd> {
    load_trivial(BPF_PROG_TYPE_XDP, action)
}

const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;
const BPF_PROG_TYPE_XDP: u32 = 6;

/// A program of `prog_type` that only returns `action`.
fn load_trivial(prog_type: u32, action: u32) -> Result<OwnedFd> {
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoadAttr {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }
    const BPF_PROG_LOAD: libc::c_long = 5;
    // r0 = action; exit
    let insns: [u64; 2] = [0x0000_00b7 | (action as u64) << 32, 0x0000_0000_0000_0095];
    let license = b"GPL\0";
    let mut name = [0u8; 16];
    name[..7].copy_from_slice(b"trivial");
    let attr = ProgLoadAttr {
        prog_type,
        insn_cnt: 2,
        insns: insns.as_ptr() as u64,
        license: license.as_ptr() as u64,
        prog_name: name,
        ..Default::default()
    };
    // SAFETY: a valid attr prefix whose pointers outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            &attr as *const ProgLoadAttr,
            std::mem::size_of::<ProgLoadAttr>() as u32,
        )
    };
    if fd < 0 {
        bail!(
            "loading the empty XDP program: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches an XDP program to an interface of the current netns through a
/// BPF link, which lasts as long as the returned fd.
fn attach_xdp_link(prog: std::os::fd::BorrowedFd<'_>, ifindex: u32) -> Result<OwnedFd> {
    const BPF_LINK_CREATE: libc::c_long = 28;
    const BPF_XDP: u32 = 37;
    let mut attr = [0u32; 16];
    attr[0] = std::os::fd::AsRawFd::as_raw_fd(&prog) as u32;
    attr[1] = ifindex;
    attr[2] = BPF_XDP;
    // SAFETY: a zeroed bpf_attr with the link_create prefix filled in.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_LINK_CREATE,
            attr.as_ptr(),
            std::mem::size_of_val(&attr) as u32,
        )
    };
    if fd < 0 {
        bail!(
            "attaching an XDP program to interface {ifindex}: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: the kernel returned a new fd that we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

// ------------------------------------------------------------------ passive

/// `cargo xtask bench passive`: what following real servers' traffic costs
/// per packet, and a TCP stream's throughput across veth with the programs
/// attached and detached, measured in the same run.
fn bench_passive() -> Result<()> {
    use prober_common::{family, FlowKey, FlowState, ServerKey};

    println!(
        "[bench passive] per-packet cost (BPF_PROG_TEST_RUN, 1,000,000 runs, median of {RUNS})"
    );
    let mut ebpf = load_programs()?;
    let egress = program_fd(&ebpf, program_names::PASSIVE_EGRESS)?;
    let ingress = program_fd(&ebpf, program_names::XDP_INGRESS)?;
    let mut servers: aya::maps::HashMap<MapData, ServerKey, u32> = aya::maps::HashMap::try_from(
        ebpf.take_map(map_names::PASSIVE_SERVERS)
            .context("no map")?,
    )?;
    let mut ports: aya::maps::Array<MapData, u64> =
        aya::maps::Array::try_from(ebpf.take_map(map_names::PASSIVE_PORTS).context("no map")?)?;
    let mut flows: aya::maps::HashMap<MapData, FlowKey, FlowState> =
        aya::maps::HashMap::try_from(ebpf.take_map(map_names::PASSIVE_FLOWS).context("no map")?)?;
    let (client, rs, other) = ([198, 51, 100, 7], [192, 0, 2, 10], [192, 0, 2, 99]);
    servers.insert(
        ServerKey {
            addr: addr16(rs.into()),
            port: 80u16.to_be(),
            family: family::IPV4,
            _pad: 0,
        },
        0,
        0,
    )?;
    ports.set(80 / 64, 1u64 << (80 % 64), 0)?;
    let key = FlowKey {
        server_addr: addr16(rs.into()),
        client_addr: addr16(client.into()),
        server_port: 80u16.to_be(),
        client_port: 40000u16.to_be(),
        family: family::IPV4,
        _pad: [0; 3],
    };
    flows.insert(
        key,
        FlowState {
            syn_ns: 1,
            request_ns: 1,
            server_id: 0,
            flags: prober_common::flow_flags::HANDSHAKE_DONE,
        },
        0,
    )?;
    let data = |src: [u8; 4], dst: [u8; 4], sport: u16, dport: u16| {
        let mut segment = tcp(
            src,
            dst,
            &Tcp {
                src_port: sport,
                dst_port: dport,
                seq: 1,
                ack: 1,
                flags: ACK,
                options: &[],
            },
        );
        segment.extend([b'x'; 100]);
        ethernet(MAC_B, MAC_A, 0x0800, &ipv4(src, dst, 6, 0, &[], &segment))
    };
    let per_packet = |prog: &dyn AsFd, frame: &[u8]| -> Result<f64> {
        let runs: Result<Vec<f64>> = (0..RUNS)
            .map(|_| Ok(run_xdp(prog.as_fd(), frame, 1_000_000)?.duration_ns as f64))
            .collect();
        Ok(median(runs?))
    };
    let tc_floor = load_trivial(BPF_PROG_TYPE_SCHED_CLS, 0)?;
    let xdp_floor = load_trivial_xdp(XDP_PASS)?;
    let to_tracked = data(client, rs, 40000, 80);
    let from_tracked = data(rs, client, 80, 40000);
    let to_untracked = data(client, other, 40001, 443);
    let from_untracked = data(other, client, 443, 40001);
    let rows = [
        (
            "egress (TC), tracked real server, request data",
            per_packet(&egress, &to_tracked)?,
        ),
        (
            "egress (TC), untracked traffic",
            per_packet(&egress, &to_untracked)?,
        ),
        (
            "egress (TC), empty program (test-run floor)",
            per_packet(&tc_floor, &to_untracked)?,
        ),
        (
            "ingress (XDP), tracked real server, response data",
            per_packet(&ingress, &from_tracked)?,
        ),
        (
            "ingress (XDP), untracked traffic",
            per_packet(&ingress, &from_untracked)?,
        ),
        (
            "ingress (XDP), empty program (test-run floor)",
            per_packet(&xdp_floor, &from_untracked)?,
        ),
    ];

    println!(
        "[bench passive] TCP stream across veth, programs attached vs detached ({RUNS} runs each)"
    );
    let pair = VethPair::new()?;
    let server_port: u16 = 8080;
    let server_addr = pair.server_addr;
    let mut detached = Vec::new();
    let mut attached = Vec::new();
    for round in 0..2 * RUNS {
        let with_programs = round % 2 == 1;
        let held = if with_programs {
            // The client plays the director: its egress carries requests to
            // the tracked real server, its ingress the server's answers.
            let ebpf = pair.client.enter(move || -> Result<Ebpf> {
                let mut ebpf = load_programs()?;
                let program: &mut Xdp = ebpf
                    .program_mut(program_names::XDP_INGRESS)
                    .context("no program")?
                    .try_into()?;
                program.attach(VETH, XdpMode::Default)?;
                let _ = aya::programs::tc::qdisc_add_clsact(VETH);
                let program: &mut aya::programs::SchedClassifier = ebpf
                    .program_mut(program_names::PASSIVE_EGRESS)
                    .context("no program")?
                    .try_into()?;
                program.attach(VETH, aya::programs::TcAttachType::Egress)?;
                let mut servers: aya::maps::HashMap<&mut MapData, ServerKey, u32> =
                    aya::maps::HashMap::try_from(
                        ebpf.map_mut(map_names::PASSIVE_SERVERS).context("no map")?,
                    )?;
                servers.insert(
                    ServerKey {
                        addr: addr16(server_addr.into()),
                        port: server_port.to_be(),
                        family: family::IPV4,
                        _pad: 0,
                    },
                    0,
                    0,
                )?;
                let mut ports: aya::maps::Array<&mut MapData, u64> = aya::maps::Array::try_from(
                    ebpf.map_mut(map_names::PASSIVE_PORTS).context("no map")?,
                )?;
                ports.set(server_port as u32 / 64, 1u64 << (server_port % 64), 0)?;
                Ok(ebpf)
            })??;
            Some(ebpf)
        } else {
            None
        };
        let gbits = stream(&pair, server_addr, server_port, 256 << 20)?;
        if with_programs {
            attached.push(gbits);
        } else {
            detached.push(gbits);
        }
        drop(held);
    }
    println!();
    println!(
        "prober bench passive: medians of {RUNS} runs, kernel {}",
        kernel_release()
    );
    println!("{:<58} {:>12}", "measure", "value");
    for (name, ns) in rows {
        println!("{name:<58} {ns:>9.1} ns");
    }
    let (off, on) = (median(detached), median(attached));
    println!(
        "{:<58} {off:>7.2} Gbit/s",
        "TCP stream across veth, programs detached"
    );
    println!(
        "{:<58} {on:>7.2} Gbit/s",
        "TCP stream across veth, programs attached (tracked)"
    );
    println!("{:<58} {:>11.2}x", "ratio attached / detached", on / off);
    println!("goals: <= 100 ns per tracked packet, <= 30 ns per untracked packet");
    Ok(())
}

/// Sends `bytes` over one TCP connection from client to server; Gbit/s.
fn stream(pair: &VethPair, server: std::net::Ipv4Addr, port: u16, bytes: usize) -> Result<f64> {
    use std::io::{Read, Write};
    let listener = pair.server.listen(SocketAddrV4::new(server, port))?;
    let sink = thread::spawn(move || -> Result<usize> {
        let (mut conn, _) = listener.accept()?;
        let mut buf = vec![0u8; 1 << 16];
        let mut total = 0;
        loop {
            let n = conn.read(&mut buf)?;
            if n == 0 {
                return Ok(total);
            }
            total += n;
        }
    });
    let seconds = pair.client.enter(move || -> Result<f64> {
        let mut conn = TcpStream::connect_timeout(
            &SocketAddrV4::new(server, port).into(),
            Duration::from_secs(2),
        )?;
        let chunk = vec![0u8; 1 << 16];
        let started = Instant::now();
        let mut sent = 0;
        while sent < bytes {
            conn.write_all(&chunk)?;
            sent += chunk.len();
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        Ok(started.elapsed().as_secs_f64())
    })??;
    let received = sink
        .join()
        .map_err(|_| anyhow::anyhow!("sink panicked"))??;
    if received < bytes {
        bail!("only {received} of {bytes} bytes arrived");
    }
    Ok(bytes as f64 * 8.0 / seconds / 1e9)
}
