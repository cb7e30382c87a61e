//! Sending a slot of the wheel: `probe_tx` walks its range of
//! `PROBE_BATCH` and writes the frame of each target due, which leaves as
//! a live XDP frame (a ring's worth a syscall) or through the packet
//! socket; frames the probing interface drops stop the walk there.

use std::{os::fd::AsFd, time::Duration};

use anyhow::{bail, Context, Result};
use aya::maps::{Array, MapData};
use prober_common::BatchCursor;
use tracing::{debug, warn};

use super::{delivery, transmit, verdicts, Prober, SECRET_ROTATION};

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

/// What one slot's send did.
#[derive(Debug, Clone, Default)]
pub struct Sent {
    /// Frames `probe_tx` wrote (probes, and RSTs before some).
    pub frames: u64,
    /// Wheel entries left unwalked: the interface's ring was full, so
    /// they wait for the next tick.
    pub left: u32,
    /// Frames the interface dropped.
    pub dropped: u64,
}

/// What the transmit path did with a range of the wheel.
#[derive(Debug, Clone, Default)]
struct Transmitted {
    /// Where the walk stopped.
    reached: u32,
    dropped: u64,
    /// The entries of the chunk whose frames were dropped, and when it
    /// began (CLOCK_MONOTONIC ns).
    lossy: Option<(std::ops::Range<u32>, u64)>,
}

/// What a send reuses from one to the next: nothing allocated per send.
#[derive(Default)]
pub(super) struct SendBuffers {
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
    /// Sends one probe to every target with a known path (no interval:
    /// every target is due at every walk).
    pub fn send_round(&mut self) -> Result<Sent> {
        let len = self.wheel_len()?;
        self.send_range(0..len)
    }

    /// Walks at most `most` of the last `tail` entries (all of them:
    /// u32::MAX) of `count` consecutive slots of the send wheel from
    /// `first` (one range of `PROBE_BATCH`; not past the wheel's last
    /// slot): `probe_tx` sends each target that is due and has a path,
    /// until the probing interface drops frames (its ring full: the
    /// director's loss). [`Sent::left`] says what is left of the slots.
    pub fn send_slots(&mut self, first: u32, count: u32, tail: u32, most: u32) -> Result<Sent> {
        self.wheel_len()?;
        let last = (first + count.max(1) - 1).min(super::schedule::SLOTS - 1);
        let (start, end) = (self.wheel.slot(first).start, self.wheel.slot(last).end);
        let start = end.saturating_sub(tail).max(start);
        let stop = end.min(start.saturating_add(most));
        let mut sent = self.send_range(start..stop)?;
        sent.left += end - stop;
        Ok(sent)
    }

    fn send_range(&mut self, range: std::ops::Range<u32>) -> Result<Sent> {
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
        if range.is_empty() {
            return Ok(Sent::default());
        }
        self.maps
            .cursor
            .set(
                0,
                BatchCursor {
                    next: range.start,
                    len: range.end,
                },
                0,
            )
            .context("writing BATCH_CURSOR")?;
        let built_before = self.frames_built();
        let out = self.transmit(range.clone())?;
        if let Some((chunk, since)) = out.lossy.clone() {
            self.mark_lossy(chunk, since);
        }
        // Only XDP's frames vanish on a veth without an XDP peer.
        let live = matches!(self.transmit, transmit::Transmit::Live { .. });
        if live && self.delivery.watching() {
            let sample: Vec<(u64, bool)> = self
                .targets()
                .filter(|(_, t)| t.written_mac.is_some())
                .take(delivery::SAMPLE)
                .filter_map(|(id, _)| self.maps.state.get(&id, 0).ok())
                .map(|s| (s.sent, s.last_reply_ns != 0))
                .collect();
            if self.delivery.vanished(sample.into_iter()) {
                warn!("{}", delivery::warning(&self.interface));
            }
        }
        Ok(Sent {
            frames: self.frames_built().saturating_sub(built_before),
            left: range.end.saturating_sub(out.reached),
            dropped: out.dropped,
        })
    }

    /// Runs `probe_tx` over `range` of the wheel with live frames, at
    /// most [`transmit::LIVE_CHUNK`] runs a syscall with a yield between:
    /// the device's ring (a veth peer's holds 256) is drained by softirq
    /// work that a long run would starve, and what overflows it is lost.
    /// A run walks past entries not due and sends the next that is (a RST
    /// first takes a run of its own), so the cursor says how far each call
    /// got; every entry takes at most two runs.
    fn transmit_live(&mut self, range: std::ops::Range<u32>) -> std::io::Result<Transmitted> {
        let mut done = range.start;
        let mut runs_left = 2 * range.len() as u32;
        let mut before = self.send_buffers.tx_dropped(&self.interface);
        while done < range.end && runs_left > 0 {
            let runs = (range.end - done).min(transmit::LIVE_CHUNK).min(runs_left);
            let chunk_start = done;
            let since = verdicts::monotonic_ns();
            crate::test_run::run_xdp_live(self.sender.as_fd(), &self.frame, runs)?;
            runs_left -= runs;
            done = batch_cursor(&self.maps.cursor)?.min(range.end);
            let after = self.send_buffers.tx_dropped(&self.interface);
            if let (Some(before), Some(after)) = (before, after) {
                if after > before {
                    // The ring is full: the rest waits for its next turn
                    // rather than overflow it too. Which frames of the
                    // chunk were lost is not known.
                    return Ok(Transmitted {
                        reached: done,
                        dropped: after - before,
                        lossy: Some((chunk_start..(done + 1).min(range.end), since)),
                    });
                }
            }
            before = after;
            if done < range.end {
                std::thread::yield_now();
            }
        }
        Ok(Transmitted {
            reached: range.end,
            dropped: 0,
            lossy: None,
        })
    }

    /// How probe frames leave (`prober run --transmit`).
    pub fn set_transmit(&mut self, mode: transmit::TransmitMode) -> Result<()> {
        self.transmit = transmit::Transmit::new(mode)?;
        Ok(())
    }

    /// Walks `range` of the wheel (the cursor at its start): in
    /// live-frames runs, or frame by frame through the packet socket, from
    /// wherever a refused live run left the cursor.
    fn transmit(&mut self, range: std::ops::Range<u32>) -> Result<Transmitted> {
        if let transmit::Transmit::Live { fallback } = self.transmit {
            match self.transmit_live(range.clone()) {
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
        // One frame a run at most; an entry takes one run or two (a RST
        // first). Every target's path leaves by the probing interface.
        let mut next = batch_cursor(&self.maps.cursor)?;
        let mut runs_left = 2 * range.len() as u32;
        while next < range.end && runs_left > 0 {
            runs_left -= 1;
            let (entry, since) = (next, verdicts::monotonic_ns());
            let action =
                crate::test_run::run_xdp_into(self.sender.as_fd(), &self.frame, &mut socket.frame)
                    .context("BPF_PROG_TEST_RUN (writing one probe frame)")?;
            next = batch_cursor(&self.maps.cursor)?;
            if action != transmit::XDP_REDIRECT {
                continue; // nothing due, or counted as a probe error
            }
            if let Err(e) = socket.send(self.ifindex) {
                // A full ring (or a device gone): the director's loss; the
                // rest waits for its next turn.
                debug!("sending a probe frame: {e}");
                return Ok(Transmitted {
                    reached: next,
                    dropped: 1,
                    lossy: Some((entry..(next + 1).min(range.end), since)),
                });
            }
        }
        Ok(Transmitted {
            reached: range.end,
            dropped: 0,
            lossy: None,
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
