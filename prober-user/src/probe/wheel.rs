//! The send wheel: every target once in `PROBE_BATCH`, ordered by the
//! slot of the interval it goes out in (`schedule::slot_of`), so a slot is
//! one range of the map that `probe_tx` walks, sending what is due. Built
//! again only when targets come or go: sending costs userspace nothing
//! per target.

use std::ops::Range;

use anyhow::{Context, Result};

use super::{schedule, Prober};
use crate::map_batch;

#[derive(Debug, Default)]
pub(super) struct Wheel {
    /// Target ids by slot, as written to `PROBE_BATCH`.
    ids: Vec<u32>,
    /// Where slot i starts in `ids`; one more entry, its length.
    starts: Vec<u32>,
    /// Targets came or went since it was written.
    stale: bool,
}

impl Wheel {
    /// The wheel of `ids`, ordered by slot (ids in order within a slot).
    pub(super) fn of(ids: impl Iterator<Item = u32>) -> Self {
        let mut by_slot: Vec<(u32, u32)> = ids.map(|id| (schedule::slot_of(id), id)).collect();
        by_slot.sort_unstable();
        let mut starts = Vec::with_capacity(schedule::SLOTS as usize + 1);
        let mut at = 0;
        for slot in 0..schedule::SLOTS {
            starts.push(at as u32);
            while at < by_slot.len() && by_slot[at].0 == slot {
                at += 1;
            }
        }
        starts.push(by_slot.len() as u32);
        Self {
            ids: by_slot.into_iter().map(|(_, id)| id).collect(),
            starts,
            stale: false,
        }
    }

    /// The range of `PROBE_BATCH` slot `slot` (modulo the slots) holds.
    pub(super) fn slot(&self, slot: u32) -> Range<u32> {
        let slot = (slot % schedule::SLOTS) as usize;
        match (self.starts.get(slot), self.starts.get(slot + 1)) {
            (Some(&start), Some(&end)) => start..end,
            _ => 0..0,
        }
    }

    /// The target id at entry `index` of `PROBE_BATCH`.
    pub(super) fn id_at(&self, index: u32) -> Option<u32> {
        self.ids.get(index as usize).copied()
    }

    fn len(&self) -> u32 {
        self.ids.len() as u32
    }
}

impl Prober {
    /// Marks the wheel to be built again before the next send.
    pub(super) fn wheel_changed(&mut self) {
        self.wheel.stale = true;
    }

    /// The wheel's length, built and written first if targets changed.
    pub(super) fn wheel_len(&mut self) -> Result<u32> {
        if self.wheel.stale {
            let ids: Vec<u32> = self.targets().map(|(id, _)| id).collect();
            self.wheel = Wheel::of(ids.into_iter());
            map_batch::write_array_prefix(&self.maps.batch, &self.wheel.ids)
                .context("writing the send wheel to PROBE_BATCH")?;
        }
        Ok(self.wheel.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_id_is_in_exactly_one_slot_and_slots_are_ranges_of_the_wheel() {
        let wheel = Wheel::of((0..10_000).rev());
        let mut seen = vec![0u32; 10_000];
        let mut end = 0;
        for slot in 0..schedule::SLOTS {
            let range = wheel.slot(slot);
            assert_eq!(range.start, end, "slot {slot} starts where the last ended");
            end = range.end;
            for &id in &wheel.ids[range.start as usize..range.end as usize] {
                assert_eq!(schedule::slot_of(id), slot);
                seen[id as usize] += 1;
            }
        }
        assert_eq!(end, wheel.len());
        assert!(seen.iter().all(|&n| n == 1));
        // Spread: no slot holds more than twice its share.
        let most = (0..schedule::SLOTS)
            .map(|s| wheel.slot(s).len())
            .max()
            .unwrap();
        assert!(most <= 2 * 10_000 / schedule::SLOTS as usize, "{most}");
        assert_eq!(wheel.slot(schedule::SLOTS), wheel.slot(0));
        assert_eq!(Wheel::default().slot(3), 0..0);
    }
}
