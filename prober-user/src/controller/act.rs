//! Act: changed weights written to IPVS in batches, each a fresh
//! read-modify-write on the IPVS thread, and what applied recorded in the
//! pinned state.

use super::*;

impl Controller {
    /// Hands a batch of weight changes to the IPVS thread, each a fresh
    /// read-modify-write that yields to a change made by someone else
    /// since the last dump; what applied is recorded when its outcome
    /// comes back ([`Controller::record_written`]). While a batch is being
    /// written, new changes wait for it. Each intent is pinned first, so a
    /// write whose outcome is never learnt (a crash) is known as prober's
    /// own after a restart.
    pub(super) fn write_weights(&mut self, updates: Vec<(WeightChange, String)>) {
        if updates.is_empty() {
            return;
        }
        let Some(store) = self.store.as_mut() else {
            return;
        };
        if self.ipvs.write_in_flight() {
            // Decided again each tick until the batch is back: the latest
            // change of each destination is kept, once.
            for (update, why) in updates {
                self.writes_waiting
                    .insert((update.service, update.destination), (update, why));
            }
            return;
        }
        for (update, _) in &updates {
            let key = (update.service, update.destination);
            if let Some(track) = self.dests.get(&key) {
                let mut intent = record(track);
                intent.pending = update.weight;
                intent.has_pending = 1;
                if let Err(e) = store.set_weight(weight_key(&key.0, &key.1), intent) {
                    warn!("saving state: {e:#}");
                }
            }
        }
        let batch: Vec<WeightChange> = updates.iter().map(|(u, _)| u.clone()).collect();
        self.write_started = Some(std::time::Instant::now());
        self.writing = updates;
        if self.ipvs.write(batch).is_err() {
            // The IPVS thread is gone: nothing was sent.
            let not_sent = (0..self.writing.len()).collect();
            self.record_written(ChangeOutcome {
                not_sent,
                ..ChangeOutcome::default()
            });
        }
    }

    /// The changes that waited for the last batch, each against the weight
    /// that batch left: gone when that is already the weight wanted.
    fn write_waiting(&mut self) {
        if self.writes_waiting.is_empty() {
            return;
        }
        let mut waiting: Vec<(WeightChange, String)> = self
            .writes_waiting
            .drain()
            .map(|(_, change)| change)
            .collect();
        waiting.retain_mut(|(u, _)| match self.dests.get(&(u.service, u.destination)) {
            Some(track) if track.current != u.weight => {
                u.expected = track.current;
                true
            }
            _ => false,
        });
        self.write_weights(waiting);
    }

    /// Records what came of the batch being written, then sends the
    /// changes that waited for it.
    pub(super) fn record_written(&mut self, outcome: ChangeOutcome) {
        let updates = std::mem::take(&mut self.writing);
        // IPVS now holds weights the last dump did not: the next dump's
        // weights are compared one by one (see `reconcile_weights`); its
        // services and destinations are what they were.
        let Some(store) = self.store.as_mut() else {
            return;
        };
        let batch: Vec<&WeightChange> = updates.iter().map(|(u, _)| u).collect();
        // A large batch (a rack down, a mass recovery) gets one line with
        // its rate; single changes have their own lines below.
        if batch.len() >= LARGE_BATCH {
            info!(
                writes = batch.len(),
                "IPVS batch of {} weights written in {:.1} ms",
                batch.len(),
                self.write_started
                    .take()
                    .map_or(0.0, |at| at.elapsed().as_secs_f64() * 1e3)
            );
        }
        let withdraw =
            |store: &mut StateStore, track: &DestTrack, key: &(ServiceKey, DestinationKey)| {
                if let Err(e) = store.set_weight(weight_key(&key.0, &key.1), record(track)) {
                    warn!("saving state: {e:#}");
                }
            };
        for failure in &outcome.failed {
            warn!(service = %failure.service, destination = %failure.destination, "weight not written: {}", failure.error);
            let key = (failure.service, failure.destination);
            if let Some(track) = self.dests.get(&key) {
                withdraw(store, track, &key);
            }
        }
        self.totals.weight_write_errors += outcome.failed.len() as u64;
        for &index in &outcome.not_sent {
            let key = (batch[index].service, batch[index].destination);
            if let Some(track) = self.dests.get(&key) {
                withdraw(store, track, &key);
            }
        }
        for &index in &outcome.gone {
            let key = (batch[index].service, batch[index].destination);
            debug!(service = %key.0, destination = %key.1, "not written: the destination left IPVS");
            if let Some(track) = self.dests.get(&key) {
                withdraw(store, track, &key);
            }
        }
        for (index, fresh) in &outcome.changed_by_others {
            let key = (batch[*index].service, batch[*index].destination);
            let Some(track) = self.dests.get_mut(&key) else {
                continue;
            };
            if track.own_unsure_write(fresh.weight) {
                withdraw(store, track, &key);
                continue;
            }
            if fresh.weight == track.current {
                // A dump taken while the batch waited saw it first.
                withdraw(store, track, &key);
                continue;
            }
            // Someone set this weight since the last dump: theirs stands,
            // as at a discovery; the next tick works from it.
            manual_change(&self.config, &key.0, &fresh.into(), track.current, track);
            track.current = fresh.weight;
            withdraw(store, track, &key);
        }
        if let Some((unknown, error)) = &outcome.unknown {
            warn!(
                "writing weights: {error}; {} writes may or may not have applied (the next discovery tells), {} not sent",
                unknown.len(),
                outcome.not_sent.len()
            );
            self.totals.netlink_errors += 1;
            for &index in unknown {
                let key = (batch[index].service, batch[index].destination);
                if let Some(track) = self.dests.get_mut(&key) {
                    // The intent saved above stays, for a restart too.
                    track.unsure = Some(batch[index].weight);
                }
            }
        }
        let mut written = vec![false; batch.len()];
        for &index in &outcome.applied {
            written[index] = true;
        }
        for (index, (update, why)) in updates.into_iter().enumerate() {
            if !written[index] {
                continue;
            }
            let key = (update.service, update.destination);
            self.totals.weight_writes += 1;
            if let Some(track) = self.dests.get_mut(&key) {
                info!(
                    service = %update.service,
                    destination = %key.1,
                    why = %why,
                    "set weight {} -> {}",
                    track.current,
                    update.weight
                );
                track.last_change = Some(Box::new(change(track.current, update.weight, why)));
                track.current = update.weight;
                track.written = Some(update.weight);
                track.unsure = None;
                if let Err(e) = store.set_weight(weight_key(&key.0, &key.1), record(track)) {
                    warn!("saving state: {e:#}");
                }
            }
        }
        self.write_waiting();
    }
}

fn change(from: u32, to: u32, why: String) -> crate::status::Change {
    crate::status::Change {
        time: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        from,
        to,
        why,
    }
}
