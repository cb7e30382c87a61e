//! Send: the send wheel turned. Each slot's walk (in parts when a slot
//! holds more than a walk takes), the targets that cannot be sent for
//! want of a next hop settled as timeouts, and the sends and the
//! director's own drops counted.

use super::*;

impl Controller {
    /// Walks the send wheel's slots whose time has come, at most
    /// [`MOST_SLOTS_PER_TICK`] in one tick: `probe_tx` sends each target
    /// due in them, and settles the probes before (see
    /// [`Controller::take_probe_events`]); nothing here is per target. A
    /// target whose next hop does not answer ARP cannot be sent: it is
    /// settled here, as a timeout, once per interval.
    pub(super) fn send_due_slots(&mut self, now: Instant) {
        let slot_len = self.slot_len();
        let current = (now.saturating_duration_since(self.epoch).as_nanos()
            / slot_len.as_nanos().max(1)) as u64;
        if current >= self.next_slot + u64::from(schedule::SLOTS) {
            // A whole turn behind (a stall): the missed slots wait for
            // their next turn rather than go out at once.
            let skipped = current - self.next_slot;
            self.totals.slots_skipped += skipped;
            if let Some(skipped) = self.totals.skipped_to_say.add(skipped, now) {
                warn!(
                    skipped,
                    "the daemon fell a whole turn of the send wheel behind (a stall): that many slots were not walked, their targets go at their next turn"
                );
            }
            self.next_slot = current;
        }
        // The rest of the slots walked in part (or that a full ring
        // stopped) goes first, when its time comes.
        if let Some(stopped) = self.slot_left.take() {
            if now < stopped.resume_at && current < self.next_slot {
                self.slot_left = Some(stopped);
                return;
            }
            let sent = self.walk(stopped.first, stopped.count, stopped.left, false, now);
            if sent.left > 0 {
                self.slot_left = Some(SlotsLeft {
                    left: sent.left,
                    resume_at: self.part_resumes_at(sent.left, now),
                    ..stopped
                });
                return;
            }
        }
        let mut walked = 0;
        while self.next_slot <= current && walked < MOST_SLOTS_PER_TICK {
            let first = (self.next_slot % u64::from(schedule::SLOTS)) as u32;
            // The slots due now from here, in one walk: consecutive in the
            // wheel, so one range (not past its end).
            let count = (current - self.next_slot + 1)
                .min(u64::from(MOST_SLOTS_PER_TICK - walked))
                .min(u64::from(schedule::SLOTS - first)) as u32;
            let late = current - self.next_slot > u64::from(schedule::SLOTS / 2);
            let sent = self.walk(first, count, u32::MAX, late, now);
            for slot in first..first + count {
                self.settle_unresolved(slot, now);
            }
            self.next_slot += u64::from(count);
            walked += count;
            if sent.left > 0 {
                // Walked in part (or a full ring): the rest of these slots
                // over what is left of their time.
                self.slot_left = Some(SlotsLeft {
                    first,
                    count,
                    left: sent.left,
                    resume_at: self.part_resumes_at(sent.left, now),
                });
                break;
            }
        }
    }

    /// When the next part of slots with `left` entries still to walk goes.
    fn part_resumes_at(&self, left: u32, now: Instant) -> Instant {
        let next_slot_in = self
            .next_wake()
            .map_or(Duration::ZERO, |at| at.saturating_duration_since(now));
        now + schedule::part_gap(next_slot_in, left)
    }

    /// Walks at most [`schedule::MOST_PER_WALK`] of the last `tail` entries
    /// (all of them: u32::MAX) of `count` slots from `first`.
    fn walk(
        &mut self,
        first: u32,
        count: u32,
        tail: u32,
        late: bool,
        now: Instant,
    ) -> crate::probe::Sent {
        let sent = match self
            .prober
            .send_slots(first, count, tail, schedule::MOST_PER_WALK)
        {
            Ok(sent) => sent,
            Err(e) => {
                warn!("sending probes: {e:#}");
                crate::probe::Sent::default()
            }
        };
        self.note_sends(sent.frames, if late { sent.frames } else { 0 }, now);
        self.note_director_drops(sent.dropped, u64::from(sent.left), now);
        sent
    }

    /// The length of one slot of the wheel's turn (the shortest interval).
    pub(super) fn slot_len(&self) -> Duration {
        self.tick_interval() / schedule::SLOTS
    }

    /// Settles, as timeouts, the probes of slot `slot` that cannot be sent
    /// for want of their next hop's MAC (the host does not answer ARP),
    /// once per interval each; paused ones are not due.
    fn settle_unresolved(&mut self, slot: u32, now: Instant) {
        let mut ids = std::mem::take(&mut self.due_ids);
        ids.clear();
        ids.extend(
            self.prober
                .unresolved_targets()
                .iter()
                .copied()
                .filter(|&id| schedule::slot_of(id) == slot && !self.prober.paused(id)),
        );
        // Targets resolved since are forgotten (the list is in id order).
        let unresolved = self.prober.unresolved_targets();
        if self.unresolved_settled.len() > 2 * unresolved.len() + 64 {
            self.unresolved_settled
                .retain(|id, _| unresolved.binary_search(id).is_ok());
        }
        let turn = self.tick_interval();
        for &id in &ids {
            let Some(spec) = self.prober.spec_of(id) else {
                continue;
            };
            let (Some(_), Some(settings)) = (self.probes.get(id), self.plan.settings_of(&spec))
            else {
                continue;
            };
            // As the datapath does: due half a turn short of its interval.
            let interval = settings.interval;
            let due_after = interval - turn.min(interval) / 2;
            if self
                .unresolved_settled
                .get(&id)
                .is_some_and(|&at| now < at + due_after)
            {
                continue;
            }
            self.unresolved_settled.insert(id, now);
            let timeout = ProbeEvent {
                target_id: id,
                outcome: outcome::TIMED_OUT,
                in_row: u32::MAX,
                ..Default::default()
            };
            self.observe_probe_event(&timeout, now, None);
        }
        self.due_ids = ids;
    }

    /// Counts a slot's sends: a new largest past a power of two, and late
    /// ones (at most once a minute), are said.
    pub(super) fn note_sends(&mut self, sent: u64, late: u64, now: Instant) {
        let totals = &mut self.totals;
        if sent > totals.largest_send {
            if sent.ilog2() > totals.largest_send.max(1).ilog2() {
                info!(
                    probes = sent,
                    "largest probe send so far (sends are spread over each interval)"
                );
            }
            totals.largest_send = sent;
        }
        totals.sends_late += late;
        if let Some(late) = totals.late_to_say.add(late, now) {
            warn!(
                late,
                "probe sends went out over half an interval late (the daemon was stalled or cannot keep up); a slot's sends go at most {MOST_SLOTS_PER_TICK} slots at a time, never all at once"
            );
        }
    }

    /// Counts probe frames the director's own interface dropped (a full
    /// ring when a late batch went out at once). Said at most once a
    /// minute.
    fn note_director_drops(&mut self, dropped: u64, held_back: u64, now: Instant) {
        let totals = &mut self.totals;
        totals.frames_dropped_here += dropped;
        totals.sends_held_back += held_back;
        if let Some(dropped) = totals.drops_to_say.add(dropped, now) {
            warn!(
                dropped,
                interface = %self.prober.interface(),
                held_back = totals.sends_held_back,
                "the probing interface dropped probe frames as they were sent (its ring was full): their probes time out (fall absorbs a lost one), and the rest of the slot waited for the next tick"
            );
        }
    }
}
