//! When each probe goes out: on a grid of its own, spread over the
//! interval, so sends leave in many small batches instead of one burst per
//! interval (a burst of tens of thousands of frames overflows veth's and
//! NICs' rings, and its replies the director's).
//!
//! Probe `id` is due at `epoch + phase(id) + k * interval`. Ids in one
//! block of [`BLOCK`] share a phase, so what comes due together is read back
//! with one batched map read per block; blocks are spread over [`SLOTS`]
//! phases by the golden ratio, evenly however many there are. Being on a
//! grid, a probe is never sent twice in one interval, and a late tick (a
//! stall) makes no burst: a send missed by more than half an interval waits
//! for its next grid point instead of going out with everyone else's.
//!
//! Pure: no clock, no kernel; the controller feeds it instants.

use std::{
    cmp::Reverse,
    collections::BinaryHeap,
    time::{Duration, Instant},
};

/// Target ids that share a phase (and one batched read).
pub const BLOCK: u32 = 64;
/// Phases per interval: the run loop wakes at most this often per
/// interval to send.
pub const SLOTS: u32 = 20;

/// Where in its interval probe `id` goes out.
pub fn phase(id: u32, interval: Duration) -> Duration {
    // The golden ratio's fractional part spreads consecutive blocks
    // evenly over the interval at any count.
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let spread = ((id / BLOCK) as f64 * GOLDEN).fract();
    let slot = (spread * SLOTS as f64) as u32;
    interval * slot / SLOTS
}

/// Probe `id`'s first grid point at or after `after`.
pub fn next_send(epoch: Instant, id: u32, interval: Duration, after: Instant) -> Instant {
    let first = epoch + phase(id, interval);
    if after <= first || interval.is_zero() {
        return first;
    }
    let since = (after - first).as_nanos();
    let step = interval.as_nanos();
    let periods = since.div_ceil(step);
    first + Duration::from_nanos((periods * step) as u64)
}

/// What to do with a send that came due at `grid`, seen at `now`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Send {
    /// Not due yet.
    Wait,
    /// Send now; the following one is due at `next`.
    Now { next: Instant },
    /// Missed by more than half an interval (a stalled tick): no send now,
    /// the next is due at `next`, so a stall's overdue sends do not all go
    /// out at once.
    Skip { next: Instant },
}

/// Whether a send due at `grid` goes now.
pub fn send_due(epoch: Instant, id: u32, interval: Duration, grid: Instant, now: Instant) -> Send {
    if now < grid {
        return Send::Wait;
    }
    // Strictly after this grid point: never twice in one interval.
    let next = next_send(epoch, id, interval, grid + Duration::from_nanos(1));
    if now - grid > interval / 2 {
        Send::Skip {
            next: next_send(epoch, id, interval, now),
        }
    } else {
        Send::Now { next }
    }
}

/// Most sends one tick may make: twice a slot's share of all probes (a
/// late tick may take a slot and a bit), and never fewer than a small
/// batch. The rest waits a slot.
pub fn budget(probes: usize) -> usize {
    (2 * probes).div_ceil(SLOTS as usize).max(256)
}

/// Probe events in time order. An entry is only valid while the probe's
/// own record still names that instant (an entry is never removed, only
/// left behind: see [`Queue::push`]).
#[derive(Debug, Default)]
pub struct Queue {
    heap: BinaryHeap<Reverse<(Instant, u32)>>,
}

impl Queue {
    /// Probe `id` is to be looked at `at`; the caller remembers `at` and
    /// ignores any other instant popped for `id`.
    pub fn push(&mut self, at: Instant, id: u32) {
        self.heap.push(Reverse((at, id)));
    }

    /// The earliest event, if any.
    pub fn next(&self) -> Option<Instant> {
        self.heap.peek().map(|Reverse((at, _))| *at)
    }

    /// Moves every event due by `now` into `out` (cleared first; its
    /// allocation is kept).
    pub fn pop_due(&mut self, now: Instant, out: &mut Vec<(Instant, u32)>) {
        out.clear();
        while let Some(Reverse((at, id))) = self.heap.peek().copied() {
            if at > now {
                break;
            }
            self.heap.pop();
            out.push((at, id));
        }
    }

    /// Drops entries the caller no longer wants, when stale ones pile up.
    pub fn retain(&mut self, keep: impl Fn(Instant, u32) -> bool) {
        self.heap.retain(|Reverse((at, id))| keep(*at, *id));
    }

    pub fn len(&self) -> usize {
        self.heap.len()
    }

    pub fn is_empty(&self) -> bool {
        self.heap.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: Duration = Duration::from_secs(1);

    /// Sends per slot of one interval when `n` probes each go out once.
    fn per_slot(n: u32, interval: Duration) -> Vec<usize> {
        let mut slots = vec![0; SLOTS as usize];
        for id in 0..n {
            let at = phase(id, interval);
            slots[(at.as_nanos() * SLOTS as u128 / interval.as_nanos()) as usize] += 1;
        }
        slots
    }

    #[test]
    fn sends_are_spread_over_the_interval_at_every_size() {
        for n in [1_000u32, 10_000, 20_000, 100_000, 200_000] {
            let slots = per_slot(n, SECOND);
            let most = *slots.iter().max().unwrap();
            let even = n as usize / SLOTS as usize;
            // No slot holds more than twice its share (and a block more).
            assert!(
                most <= 2 * even + BLOCK as usize,
                "{n} probes: {slots:?} (the most in a slot: {most}, even: {even})"
            );
            assert!(most <= budget(n as usize), "{n}: a slot fits the budget");
        }
    }

    #[test]
    fn a_probe_is_due_once_per_interval_on_its_grid() {
        let epoch = Instant::now();
        for (id, interval) in [
            (0, SECOND),
            (77, SECOND),
            (5_000, Duration::from_millis(200)),
        ] {
            let mut grid = next_send(epoch, id, interval, epoch);
            let mut sends = vec![];
            // Ticks every 7 ms for 10 intervals, each a little late.
            let mut now = epoch;
            while now < epoch + interval * 10 {
                if let Send::Now { next } = send_due(epoch, id, interval, grid, now) {
                    sends.push(now);
                    grid = next;
                }
                now += Duration::from_millis(7);
            }
            assert!((9..=10).contains(&sends.len()), "{id}: {sends:?}");
            for pair in sends.windows(2) {
                // Never two in one interval (less a tick's lateness).
                assert!(
                    pair[1] - pair[0] >= interval - Duration::from_millis(7),
                    "{id}: {pair:?}"
                );
            }
        }
    }

    #[test]
    fn a_stall_makes_no_burst() {
        // 20,000 probes, a tick every 50 ms, and a 3 s stall in the middle:
        // afterwards no tick sends more than the budget, sends that were
        // missed by over half an interval wait for their grid point, and no
        // probe goes out twice within an interval.
        let epoch = Instant::now();
        let n = 20_000u32;
        let interval = SECOND;
        let mut grid: Vec<Instant> = (0..n)
            .map(|id| next_send(epoch, id, interval, epoch))
            .collect();
        let mut last_sent: Vec<Option<Instant>> = vec![None; n as usize];
        let mut now = epoch;
        let mut most = 0;
        let mut skipped = 0;
        while now < epoch + interval * 10 {
            let stalled = now > epoch + interval * 3 && now < epoch + interval * 6;
            if !stalled {
                let mut sent = 0;
                for id in 0..n as usize {
                    match send_due(epoch, id as u32, interval, grid[id], now) {
                        Send::Wait => {}
                        Send::Skip { next } => {
                            skipped += 1;
                            grid[id] = next;
                        }
                        Send::Now { next } => {
                            if let Some(before) = last_sent[id] {
                                assert!(now - before >= interval / 2, "probe {id} twice");
                            }
                            last_sent[id] = Some(now);
                            grid[id] = next;
                            sent += 1;
                        }
                    }
                }
                most = most.max(sent);
            }
            now += Duration::from_millis(50);
        }
        assert!(skipped > 0, "the stall's sends were skipped");
        assert!(most <= budget(n as usize), "most in a tick: {most}");
    }

    #[test]
    fn the_queue_gives_events_in_time_order() {
        let t = Instant::now();
        let mut q = Queue::default();
        q.push(t + SECOND, 1);
        q.push(t, 2);
        q.push(t + SECOND * 2, 3);
        assert_eq!(q.next(), Some(t));
        let mut out = vec![];
        q.pop_due(t + SECOND, &mut out);
        assert_eq!(out, vec![(t, 2), (t + SECOND, 1)]);
        assert_eq!(q.len(), 1);
        q.retain(|_, id| id != 3);
        assert!(q.is_empty());
    }
}
