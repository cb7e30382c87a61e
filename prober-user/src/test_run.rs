//! BPF_PROG_TEST_RUN for XDP programs: runs a loaded program on a frame we
//! supply. Used two ways: the daemon sends probe batches with live frames
//! (each run's XDP_REDIRECT really transmits), and tests run programs on
//! built packets and read back verdict and output frame.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::Result;

const BPF_PROG_TEST_RUN: libc::c_long = 10;
/// Frames are real: XDP_TX/XDP_REDIRECT send them (kernel >= 5.18).
const BPF_F_TEST_XDP_LIVE_FRAMES: u32 = 1 << 1;

/// The `test` member of `union bpf_attr` (include/uapi/linux/bpf.h).
#[repr(C, align(8))]
#[derive(Default)]
struct TestRunAttr {
    prog_fd: u32,
    retval: u32,
    data_size_in: u32,
    data_size_out: u32,
    data_in: u64,
    data_out: u64,
    repeat: u32,
    duration: u32,
    ctx_size_in: u32,
    ctx_size_out: u32,
    ctx_in: u64,
    ctx_out: u64,
    flags: u32,
    cpu: u32,
    batch_size: u32,
    _pad: u32,
}

fn bpf_test_run(attr: &mut TestRunAttr) -> std::io::Result<()> {
    // SAFETY: attr is a valid, fully initialised bpf_attr prefix whose
    // pointers outlive the call.
    unsafe { crate::map_batch::bpf(BPF_PROG_TEST_RUN, attr) }
}

/// Verdict, output frame and mean run time of one program run.
#[derive(Debug)]
pub struct XdpRun {
    pub action: u32,
    pub frame: Vec<u8>,
    pub duration_ns: u32,
}

/// Runs an XDP program `repeat` times on `frame` (not live: nothing is
/// transmitted) and returns the last run's verdict and output frame.
pub fn run_xdp(prog: BorrowedFd<'_>, frame: &[u8], repeat: u32) -> Result<XdpRun> {
    let mut out = Vec::new();
    let (action, duration_ns) = run_into(prog, frame, repeat, &mut out)
        .map_err(|e| anyhow::anyhow!("BPF_PROG_TEST_RUN: {e}"))?;
    Ok(XdpRun {
        action,
        frame: out,
        duration_ns,
    })
}

/// Runs an XDP program once on `frame` (not live) and leaves the output
/// frame in `out` (its allocation reused). Returns the verdict.
pub fn run_xdp_into(prog: BorrowedFd<'_>, frame: &[u8], out: &mut Vec<u8>) -> std::io::Result<u32> {
    Ok(run_into(prog, frame, 1, out)?.0)
}

/// Verdict and mean run time; the last run's frame in `out`.
fn run_into(
    prog: BorrowedFd<'_>,
    frame: &[u8],
    repeat: u32,
    out: &mut Vec<u8>,
) -> std::io::Result<(u32, u32)> {
    out.clear();
    out.resize(frame.len() + 4096, 0);
    let mut attr = TestRunAttr {
        prog_fd: prog.as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_size_out: out.len() as u32,
        data_in: frame.as_ptr() as u64,
        data_out: out.as_mut_ptr() as u64,
        repeat,
        ..Default::default()
    };
    bpf_test_run(&mut attr)?;
    out.truncate(attr.data_size_out as usize);
    Ok((attr.retval, attr.duration))
}

/// Runs an XDP program `runs` times on copies of `frame` with live frames:
/// what it redirects or transmits goes on the wire. Returns the kernel's mean
/// time per run in ns. EINVAL: a kernel older than 5.18; EPERM: one whose
/// policy (lockdown, a BPF LSM) forbids live frames.
pub fn run_xdp_live(prog: impl AsFd, frame: &[u8], runs: u32) -> std::io::Result<u32> {
    if runs == 0 {
        return Ok(0);
    }
    let mut attr = TestRunAttr {
        prog_fd: prog.as_fd().as_raw_fd() as u32,
        data_size_in: frame.len() as u32,
        data_in: frame.as_ptr() as u64,
        repeat: runs,
        flags: BPF_F_TEST_XDP_LIVE_FRAMES,
        ..Default::default()
    };
    bpf_test_run(&mut attr)?;
    Ok(attr.duration)
}
