//! How probe frames leave the director. Normally the kernel transmits
//! what `probe_tx` writes: one BPF_PROG_TEST_RUN with live frames sends a
//! whole batch. Some kernels refuse live frames (EPERM: a lockdown or BPF
//! LSM policy); there the same program writes each frame in a plain test
//! run and a packet socket sends it. The socket bypasses the qdisc, so the
//! passive TC program never sees a probe, as it never sees XDP's.

use std::{
    io,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
};

use anyhow::{Context, Result};

/// Live frames sent in one syscall at most: a device ring's worth.
pub const LIVE_CHUNK: u32 = 256;

/// The verdict of a `probe_tx` run that wrote a frame to send.
pub const XDP_REDIRECT: u32 = 4;

/// How to send probe frames, as `prober run --transmit` asks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum TransmitMode {
    /// Live frames, and a packet socket if the kernel refuses them.
    #[default]
    Auto,
    /// Live frames only (fails where the kernel refuses them).
    Live,
    /// A packet socket, even where live frames work.
    Socket,
}

/// The transmit path in use.
pub enum Transmit {
    Live { fallback: bool },
    Socket(PacketSocket),
}

impl Transmit {
    pub fn new(mode: TransmitMode) -> Result<Self> {
        Ok(match mode {
            TransmitMode::Auto => Transmit::Live { fallback: true },
            TransmitMode::Live => Transmit::Live { fallback: false },
            TransmitMode::Socket => Transmit::Socket(PacketSocket::open()?),
        })
    }
}

/// Whether a live-frames run failed because the kernel forbids it (not
/// because of this batch).
pub fn refused(error: &io::Error) -> bool {
    error.raw_os_error() == Some(libc::EPERM)
}

/// An AF_PACKET socket that sends whole Ethernet frames straight to a
/// device's driver, past the qdisc and TC egress.
pub struct PacketSocket {
    fd: OwnedFd,
    /// The frame of the last run, reused: nothing allocated per probe.
    pub frame: Vec<u8>,
}

impl PacketSocket {
    pub fn open() -> Result<Self> {
        // SAFETY: plain socket(2); protocol 0 receives nothing.
        let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error()).context("opening a packet socket for probes");
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let on: libc::c_int = 1;
        // SAFETY: an int option of the right size.
        let r = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                libc::PACKET_QDISC_BYPASS,
                &on as *const libc::c_int as *const libc::c_void,
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error())
                .context("setting PACKET_QDISC_BYPASS on the probe socket");
        }
        Ok(Self {
            fd,
            frame: Vec::with_capacity(prober_common::PROBE_FRAME_MAX + 4096),
        })
    }

    /// Sends `self.frame` (a whole Ethernet frame) out of `ifindex`.
    pub fn send(&self, ifindex: u32) -> io::Result<()> {
        let frame = &self.frame;
        if frame.len() < 14 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "short frame"));
        }
        // SAFETY: sockaddr_ll is plain data; all-zero is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_ifindex = ifindex as i32;
        to.sll_protocol = u16::from_ne_bytes([frame[12], frame[13]]);
        to.sll_halen = 6;
        to.sll_addr[..6].copy_from_slice(&frame[..6]);
        // SAFETY: the frame and the address outlive the call.
        let r = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr() as *const libc::c_void,
                frame.len(),
                0,
                &to as *const libc::sockaddr_ll as *const libc::sockaddr,
                std::mem::size_of::<libc::sockaddr_ll>() as libc::socklen_t,
            )
        };
        if r < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
