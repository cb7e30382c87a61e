//! Sending a batch of probes: the ids with a known path go into
//! `PROBE_BATCH` and `probe_tx` writes each one's frame, which leaves as a
//! live XDP frame (a ring's worth a syscall) or through the packet socket;
//! frames the probing interface drops stop the batch there.

use std::{os::fd::AsFd, time::Duration};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, MapData};
use prober_common::BatchCursor;
use tracing::{debug, warn};

use super::{delivery, transmit, Prober, SECRET_ROTATION};
use crate::map_batch;

/// An interface's transmit drops in a /proc/net/dev table: the fourth
/// transmit column, after eight receive columns.
fn tx_dropped_of(table: &str, interface: &str) -> Option<u64> {
    table.lines().find_map(|line| {
        let (name, counters) = line.split_once(':')?;
        (name.trim() == interface).then(|| counters.split_whitespace().nth(11)?.parse().ok())?
    })
}

/// How far `probe_tx` got through the batch.
fn batch_cursor(cursor: &Array<MapData, BatchCursor>) -> std::io::Result<u32> {
    cursor
        .get(&0, 0)
        .map(|c| c.next)
        .map_err(|e| std::io::Error::other(format!("reading BATCH_CURSOR: {e}")))
}

/// What one send did, in positions of the ids it was given.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// The first this many were sent (or had no path); the rest were not:
    /// the interface's ring was full.
    pub attempted: usize,
    /// Those whose frames the interface may have dropped.
    pub lossy: std::ops::Range<usize>,
    /// Frames the interface dropped.
    pub dropped: u64,
}

/// What the transmit path did, in positions of the frames it was given.
#[derive(Debug, Clone, Default)]
struct Transmitted {
    frames: u32,
    lossy: std::ops::Range<u32>,
    dropped: u64,
}

/// What a send reuses from one to the next: nothing allocated per send.
#[derive(Default)]
pub(super) struct SendBuffers {
    round: Vec<u32>,
    ready: Vec<u32>,
    positions: Vec<usize>,
    /// The last /proc/self/net/dev read.
    dev_table: String,
}

impl SendBuffers {
    /// The probing interface's count of frames it could not send (for
    /// XDP frames into a veth: its peer's ring was full). From
    /// /proc/self/net/dev, which follows the daemon's own network
    /// namespace (sysfs follows the one it was mounted in).
    fn tx_dropped(&mut self, interface: &str) -> Option<u64> {
        use std::io::Read;
        self.dev_table.clear();
        std::fs::File::open("/proc/self/net/dev")
            .ok()?
            .read_to_string(&mut self.dev_table)
            .ok()?;
        tx_dropped_of(&self.dev_table, interface)
    }
}

impl Prober {
    /// Sends one probe to every target with a known path.
    pub fn send_round(&mut self) -> Result<Sent> {
        let mut all = std::mem::take(&mut self.send_buffers.round);
        all.clear();
        all.extend(self.targets().map(|(id, _)| id));
        let sent = self.send(&all);
        self.send_buffers.round = all;
        sent
    }

    /// Sends one probe to each of `ids` whose path is known, until the
    /// probing interface drops frames (its ring full: the director's
    /// loss). Says how far it got and which frames may have been lost.
    pub fn send(&mut self, ids: &[u32]) -> Result<Sent> {
        if self.last_rotation.elapsed() >= SECRET_ROTATION {
            self.rotate_secret()?;
        }
        if self.config.agent_auth != 0
            && self
                .agent_window_at
                .is_none_or(|at| at.elapsed() >= Duration::from_secs(1))
        {
            self.move_agent_window()?;
        }
        // The ids with a known path, and where each stands in `ids`, in
        // buffers kept from send to send.
        let mut ready = std::mem::take(&mut self.send_buffers.ready);
        let mut positions = std::mem::take(&mut self.send_buffers.positions);
        ready.clear();
        positions.clear();
        for (position, &id) in ids.iter().enumerate() {
            let known = self
                .targets
                .get(id as usize)
                .and_then(Option::as_ref)
                .is_some_and(|t| t.entry.is_some());
            if known {
                positions.push(position);
                ready.push(id);
            }
        }
        let sent = self.send_ready(ids.len(), &positions, &ready);
        self.send_buffers.ready = ready;
        self.send_buffers.positions = positions;
        sent
    }

    /// Sends `ready`, the ids at `positions` of a send of `asked` ids.
    fn send_ready(&mut self, asked: usize, positions: &[usize], ready: &[u32]) -> Result<Sent> {
        map_batch::write_array_prefix(&self.maps.batch, ready).context("writing PROBE_BATCH")?;
        let len = ready.len() as u32;
        self.maps
            .cursor
            .set(0, BatchCursor { next: 0, len }, 0)
            .context("writing BATCH_CURSOR")?;
        let out = self.transmit(ready)?;
        let in_ids = |k: u32| positions.get(k as usize).copied().unwrap_or(asked);
        // Only XDP's frames vanish on a veth without an XDP peer.
        let live = matches!(self.transmit, transmit::Transmit::Live { .. });
        if live && self.delivery.watching() {
            let sample: Vec<(u64, bool)> = self
                .targets()
                .filter(|(_, t)| t.entry.is_some())
                .take(delivery::SAMPLE)
                .filter_map(|(id, _)| self.maps.state.get(&id, 0).ok())
                .map(|s| (s.sent, s.last_reply_ns != 0))
                .collect();
            if self.delivery.vanished(sample.into_iter()) {
                warn!("{}", delivery::warning(&self.interface));
            }
        }
        Ok(Sent {
            attempted: in_ids(out.frames),
            lossy: if out.lossy.is_empty() {
                0..0
            } else {
                in_ids(out.lossy.start)..in_ids(out.lossy.end)
            },
            dropped: out.dropped,
        })
    }

    /// Runs `probe_tx` over the batch with live frames, at most
    /// [`transmit::LIVE_CHUNK`] frames a syscall with a yield between:
    /// the device's ring (a veth peer's holds 256) is drained by softirq
    /// work that a long run would starve, and what overflows it is lost.
    /// An entry takes one run, or two when a RST goes before its SYN (see
    /// `probe_tx`), so the cursor says how far each call got.
    fn transmit_live(&mut self, len: u32) -> std::io::Result<Transmitted> {
        let mut done = 0;
        let mut runs_left = 2 * len;
        let mut before = self.send_buffers.tx_dropped(&self.interface);
        while done < len && runs_left > 0 {
            let runs = (len - done).min(transmit::LIVE_CHUNK).min(runs_left);
            crate::test_run::run_xdp_live(self.probe_tx.as_fd(), &self.frame, runs)?;
            runs_left -= runs;
            let chunk_start = done;
            done = batch_cursor(&self.maps.cursor)?.min(len);
            let chunk = chunk_start..done;
            let after = self.send_buffers.tx_dropped(&self.interface);
            if let (Some(before), Some(after)) = (before, after) {
                if after > before {
                    // The ring is full: the rest waits for its next grid
                    // point rather than overflow it too.
                    return Ok(Transmitted {
                        frames: done,
                        lossy: chunk,
                        dropped: after - before,
                    });
                }
            }
            before = after;
            if done < len {
                std::thread::yield_now();
            }
        }
        Ok(Transmitted {
            frames: done,
            lossy: 0..0,
            dropped: 0,
        })
    }

    /// How probe frames leave (`prober run --transmit`).
    pub fn set_transmit(&mut self, mode: transmit::TransmitMode) -> Result<()> {
        self.transmit = transmit::Transmit::new(mode)?;
        Ok(())
    }

    /// Sends the batch `ready` (already in `PROBE_BATCH`, the cursor at
    /// its start): in one live-frames run, or frame by frame through the
    /// packet socket, from wherever a refused live run left the cursor.
    fn transmit(&mut self, ready: &[u32]) -> Result<Transmitted> {
        let len = ready.len() as u32;
        if let transmit::Transmit::Live { fallback } = self.transmit {
            match self.transmit_live(len) {
                Ok(out) => return Ok(out),
                Err(e) if fallback && transmit::refused(&e) => {
                    warn!(
                        interface = %self.interface,
                        "this kernel refuses to transmit XDP frames from BPF_PROG_TEST_RUN ({e}: a lockdown or BPF LSM policy); probes are written by the same program and sent through a packet socket instead, one more syscall per probe"
                    );
                    self.transmit = transmit::Transmit::Socket(transmit::PacketSocket::open()?);
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                    bail!("BPF_PROG_TEST_RUN with live frames was refused (EINVAL): the kernel must be >= 5.18")
                }
                Err(e) => bail!("BPF_PROG_TEST_RUN (live frames): {e}"),
            }
        }
        let transmit::Transmit::Socket(socket) = &mut self.transmit else {
            return Ok(Transmitted::default());
        };
        // One frame a run, one run per entry or two (a RST first).
        let mut next = batch_cursor(&self.maps.cursor)?;
        let mut runs_left = 2 * len;
        while next < len && runs_left > 0 {
            runs_left -= 1;
            let entry = next;
            let action = crate::test_run::run_xdp_into(
                self.probe_tx.as_fd(),
                &self.frame,
                &mut socket.frame,
            )
            .context("BPF_PROG_TEST_RUN (writing one probe frame)")?;
            next = batch_cursor(&self.maps.cursor)?;
            if action != transmit::XDP_REDIRECT {
                continue; // counted as a probe error by the program
            }
            let Some(ifindex) = ready
                .get(entry as usize)
                .and_then(|&id| self.targets.get(id as usize))
                .and_then(Option::as_ref)
                .and_then(|t| t.entry.map(|e| e.ifindex))
            else {
                continue;
            };
            if let Err(e) = socket.send(ifindex) {
                // A full ring (or a device gone): the director's loss; the
                // rest waits for its next grid point.
                debug!(probe = ready[entry as usize], "sending a probe frame: {e}");
                return Ok(Transmitted {
                    frames: entry + 1,
                    lossy: entry..entry + 1,
                    dropped: 1,
                });
            }
        }
        Ok(Transmitted {
            frames: len,
            lossy: 0..0,
            dropped: 0,
        })
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn transmit_drops_are_read_from_the_interfaces_row() {
        let table = "Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo:     100       1    0    0    0     0          0         0      100       1    0    0    0     0       0          0
  eth0: 14047072  351190    0    7    0     0          0         0 28442864  526732    0 1221    0     0       0          0
";
        assert_eq!(super::tx_dropped_of(table, "eth0"), Some(1221));
        assert_eq!(super::tx_dropped_of(table, "lo"), Some(0));
        assert_eq!(super::tx_dropped_of(table, "eth1"), None);
    }
}
