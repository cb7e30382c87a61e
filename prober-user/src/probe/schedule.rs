//! Which part of the interval each probe goes out in: the interval is cut
//! into [`SLOTS`] slots and every target has one (its phase), so sends
//! leave in many small batches instead of one burst per interval (a burst
//! of tens of thousands of frames overflows veth's and NICs' rings, and
//! its replies the director's). Ids in one block of [`BLOCK`] share a
//! slot; blocks are spread over the slots by the golden ratio, evenly
//! however many there are. The send wheel (`wheel`) orders the targets by
//! slot; when each is due within its slot's walk is the datapath's call.
//!
//! Pure: no clock, no kernel.

/// Target ids that share a slot.
pub const BLOCK: u32 = 64;
/// Slots per interval: the run loop wakes at most this often per
/// interval to send (100: 20,000 probes at 1 s go 400 every 10 ms, a
/// burst that veth's 256-frame rings and the replies' path absorb even
/// under emulation, where 28,000 at once lost thousands).
pub const SLOTS: u32 = 100;

/// Slots of the send wheel one tick walks at most: a late tick catches
/// up by a few slots, walked as one range (one syscall per device ring's
/// worth, not one per slot), never with a burst of everything due.
pub const MOST_SLOTS_PER_TICK: u32 = 4;

/// Wheel entries one walk takes at most: half a veth peer's 256-frame
/// ring. A slot holding more is walked in parts spread over the slot
/// (see [`part_gap`]): at 100,000 real servers a slot holds 1,000, and
/// sent at once they overflowed the ring on every slot, losing the same
/// targets' probes turn after turn.
pub const MOST_PER_WALK: u32 = 128;

/// How long after a part of a slot the next part goes: what is left of
/// the time until `next_slot_in`, shared among the parts still to walk
/// (`left` entries, [`MOST_PER_WALK`] a part) and the next slot.
pub fn part_gap(next_slot_in: std::time::Duration, left: u32) -> std::time::Duration {
    next_slot_in / (left.div_ceil(MOST_PER_WALK) + 1)
}

/// Which of the [`SLOTS`] of an interval probe `id` goes out in.
pub fn slot_of(id: u32) -> u32 {
    // The golden ratio's fractional part spreads consecutive blocks
    // evenly over the interval at any count.
    const GOLDEN: f64 = 0.618_033_988_749_894_9;
    let spread = ((id / BLOCK) as f64 * GOLDEN).fract();
    ((spread * SLOTS as f64) as u32).min(SLOTS - 1)
}

/// The most targets one slot holds when `targets` ids from 0 up are in
/// use: twice the even share and a block.
pub fn most_in_a_slot(targets: usize) -> usize {
    2 * targets.div_ceil(SLOTS as usize) + BLOCK as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_slot_larger_than_a_walk_goes_in_parts_spread_over_its_time() {
        use std::time::Duration;
        let slot = Duration::from_millis(100);
        // 1,000 entries (100,000 real servers at 10 s): the first part
        // goes at the slot's start, the 872 left in 7 more parts, so 8
        // parts share the slot and the next slot comes last.
        assert_eq!(part_gap(slot, 1_000 - MOST_PER_WALK), slot / 8);
        // Each part takes its share of what is left.
        assert_eq!(part_gap(slot / 2, 4 * MOST_PER_WALK), slot / 10);
        // A last part shorter than a walk: halfway to the next slot.
        assert_eq!(part_gap(slot, 1), slot / 2);
    }

    #[test]
    fn slots_are_spread_over_the_interval_at_every_size() {
        for n in [1_000u32, 10_000, 20_000, 100_000, 200_000] {
            let mut slots = vec![0; SLOTS as usize];
            for id in 0..n {
                slots[slot_of(id) as usize] += 1;
            }
            let most = *slots.iter().max().unwrap();
            assert!(
                most <= most_in_a_slot(n as usize),
                "{n} probes: {slots:?} (the most in a slot: {most})"
            );
            let least = *slots.iter().min().unwrap();
            assert!(least > 0 || n < SLOTS * BLOCK, "{n}: every slot used");
        }
    }
}
