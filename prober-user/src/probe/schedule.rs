//! When each probe goes out: on a grid of its own, spread over the
//! interval, so sends leave in many small batches instead of one burst per
//! interval (a burst of tens of thousands of frames overflows veth's and
//! NICs' rings, and its replies the director's).
//!
//! Probe `id` is due at `epoch + phase(id) + k * interval`. Ids in one
//! block of [`BLOCK`] share a phase, so what comes due together is read back
//! with one batched map read per block; blocks are spread over [`SLOTS`]
//! phases by the golden ratio, evenly however many there are. A probe
//! sends at most once per grid point, and the one after a late send waits
//! for a grid point at least half an interval away, so it never goes out
//! twice in quick succession. A late tick (a stall, or a daemon that
//! cannot keep up) makes no burst: no tick sends more than [`budget`], the
//! rest waits a slot, oldest first; every probe still goes out.
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
/// interval to send (100: 20,000 probes at 1 s go 400 every 10 ms, a
/// burst that veth's 256-frame rings and the replies' path absorb even
/// under emulation, where 28,000 at once lost thousands).
pub const SLOTS: u32 = 100;

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
    /// Send now; the following one is due at `next`. `late`: more than
    /// half an interval after its grid point (the daemon is behind).
    Now { next: Instant, late: bool },
}

/// Whether a send due at `grid` goes now, and when the next is due.
pub fn send_due(epoch: Instant, id: u32, interval: Duration, grid: Instant, now: Instant) -> Send {
    if now < grid {
        return Send::Wait;
    }
    // The next grid point after this one, and at least half an interval
    // from now: a late send is not followed by another at once.
    let after = (grid + Duration::from_nanos(1)).max(now + interval / 2);
    Send::Now {
        next: next_send(epoch, id, interval, after),
        late: now - grid > interval / 2,
    }
}

/// Most sends one tick may make, `since` the last: twice a slot's share
/// of all probes for each slot gone by (a late tick may take a slot and a
/// bit), up to two slots' worth after a stall, and never fewer than a
/// small batch. The rest waits a slot, so no send is ever a burst of
/// everything.
pub fn budget(probes: usize, since: Duration, interval: Duration) -> usize {
    let slot = interval / SLOTS;
    let slots = if slot.is_zero() {
        1.0
    } else {
        since.div_duration_f64(slot).clamp(1.0, MOST_SLOTS)
    };
    (((2 * probes) as f64 * slots / SLOTS as f64).ceil() as usize).max(LEAST_BUDGET)
}

/// The most slots' worth of sends one late tick may catch up on.
const MOST_SLOTS: f64 = 2.0;

/// The least any tick may send.
pub const LEAST_BUDGET: usize = 256;

/// The budget of one on-time tick: what no tick exceeds on a daemon that
/// keeps up, and at most a quarter of all probes.
pub fn slot_budget(probes: usize) -> usize {
    budget(probes, Duration::ZERO, Duration::from_secs(1)).max(LEAST_BUDGET)
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
            assert!(
                most <= slot_budget(n as usize),
                "{n}: a slot fits the budget"
            );
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
                if let Send::Now { next, .. } = send_due(epoch, id, interval, grid, now) {
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

    /// Simulates the controller's loop for 10 intervals at 1 s: a tick at
    /// every event due (none in `stall`, as a daemon stuck in a netlink
    /// call), oldest first, at most the budget; the rest keep their place
    /// and the next tick waits a slot.
    /// Returns the most sent in a tick, the sends of each probe, and how
    /// many went out late.
    fn simulate(n: u32, stall: std::ops::Range<Duration>) -> (usize, Vec<u32>, usize) {
        let epoch = Instant::now();
        let interval = SECOND;
        let slot = interval / SLOTS;
        let mut queue = Queue::default();
        let mut grid: Vec<Instant> = (0..n)
            .map(|id| next_send(epoch, id, interval, epoch))
            .collect();
        for (id, at) in grid.iter().enumerate() {
            queue.push(*at, id as u32);
        }
        let mut last_sent: Vec<Option<Instant>> = vec![None; n as usize];
        let mut sends = vec![0u32; n as usize];
        let (mut most, mut late_sends) = (0, 0);
        let mut last_tick: Option<Instant> = None;
        let mut popped = Vec::new();
        let mut hold = epoch;
        while let Some(mut now) = queue.next().map(|next| next.max(hold)) {
            if now >= epoch + interval * 10 {
                break;
            }
            if stall.contains(&(now - epoch)) {
                now = epoch + stall.end;
            }
            let since = last_tick.map_or(Duration::ZERO, |at| now - at);
            last_tick = Some(now);
            let budget = budget(n as usize, since, interval);
            queue.pop_due(now, &mut popped);
            let mut sent = 0;
            for &(at, id) in &popped {
                let id = id as usize;
                if sent >= budget {
                    queue.push(at, id as u32);
                    hold = now + slot;
                    continue;
                }
                let Send::Now { next, late } = send_due(epoch, id as u32, interval, grid[id], now)
                else {
                    unreachable!("due")
                };
                if let Some(before) = last_sent[id] {
                    assert!(now - before >= interval / 2, "probe {id} twice at once");
                }
                last_sent[id] = Some(now);
                grid[id] = next;
                queue.push(next, id as u32);
                sends[id] += 1;
                sent += 1;
                late_sends += late as usize;
            }
            most = most.max(sent);
        }
        (most, sends, late_sends)
    }

    #[test]
    fn a_stall_makes_no_burst_and_every_probe_still_goes_out() {
        // 20,000 probes and a 3 s stall in the middle.
        let (most, sends, late) = simulate(20_000, SECOND * 3..SECOND * 6);
        assert!(most <= slot_budget(20_000) * 2, "most in a tick: {most}");
        assert!(most < 20_000 / 10, "no burst of everything: {most}");
        assert!(late > 0, "the stall made sends late");
        // 10 intervals, 3 of them stalled, and the backlog sent at twice
        // the rate (one extra slot's share a slot), so as long again to
        // catch up: each probe at least 4 times, never more than 10.
        let (least, max) = (sends.iter().min().unwrap(), sends.iter().max().unwrap());
        assert!(*least >= 4 && *max <= 10, "sends per probe {least}..{max}");
    }

    #[test]
    fn at_200_000_probes_each_goes_out_every_interval() {
        let (most, sends, late) = simulate(200_000, Duration::ZERO..Duration::ZERO);
        assert!(most <= slot_budget(200_000));
        assert!(sends.iter().all(|&n| n >= 9), "every probe, every interval");
        assert_eq!(late, 0);
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
