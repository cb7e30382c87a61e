//! The kernel's netlink socket as the client's transport, and its
//! options.

use super::*;

/// Where requests go and replies come from: the kernel's netlink socket,
/// or in unit tests a scripted stand-in.
pub(crate) trait Transport: Send {
    fn send(&mut self, datagram: &[u8]) -> std::io::Result<()>;
    /// Receives one datagram into `buffer` (emptied first, filled up to its
    /// capacity) and returns its full length, which exceeds what `buffer`
    /// holds when the datagram was truncated.
    fn receive(&mut self, buffer: &mut Vec<u8>) -> std::io::Result<usize>;
    /// Drops whatever replies are queued, without waiting.
    fn discard_queued(&mut self) {}
}

pub(super) struct KernelSocket(pub(super) Socket);

impl Transport for KernelSocket {
    fn send(&mut self, datagram: &[u8]) -> std::io::Result<()> {
        self.0.send(datagram, 0).map(|_| ())
    }

    fn receive(&mut self, buffer: &mut Vec<u8>) -> std::io::Result<usize> {
        buffer.clear();
        // MSG_TRUNC: the return value is the datagram's real length.
        self.0.recv(buffer, libc::MSG_TRUNC)
    }

    fn discard_queued(&mut self) {
        let mut scratch = Vec::with_capacity(RECEIVE_BUFFER);
        // Bounded: the queue holds at most RECEIVE_QUEUE bytes.
        for _ in 0..RECEIVE_QUEUE / 64 {
            scratch.clear();
            if self
                .0
                .recv(&mut scratch, libc::MSG_TRUNC | libc::MSG_DONTWAIT)
                .is_err()
            {
                break;
            }
        }
    }
}

/// SO_RCVBUFFORCE (root) goes past rmem_max; without it the default stays
/// and [`BATCH_WINDOW`] still fits.
pub(super) fn set_receive_queue(socket: &Socket, bytes: usize) {
    let size = bytes.min(libc::c_int::MAX as usize) as libc::c_int;
    // SAFETY: setsockopt reads an int from a valid pointer.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUFFORCE,
            &size as *const libc::c_int as *const libc::c_void,
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

pub(super) fn set_receive_timeout(socket: &Socket, timeout: Duration) -> std::io::Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_usec: 0,
    };
    // SAFETY: setsockopt reads a timeval from a valid pointer.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}
