//! Weight writes: a fresh read-modify-write per change that yields to an
//! operator's, pipelined in windows, each outcome known by position.

use super::*;

/// A weight to set: the destination as last dumped (its forwarding,
/// thresholds and tunnel settings are sent back unchanged) and its new weight.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightUpdate {
    pub service: ServiceKey,
    pub destination: Destination,
    pub weight: u32,
}

/// One update of a batch that did not apply.
#[derive(Debug)]
pub struct WeightFailure {
    /// Its position in the batch.
    pub index: usize,
    pub service: ServiceKey,
    pub destination: DestinationKey,
    pub error: IpvsError,
}

/// A weight to set only if the destination still holds `expected`: the
/// destination's other settings are read fresh just before the write, so
/// whatever an operator changed since the last dump (forwarding,
/// thresholds, tunnel) is kept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WeightChange {
    pub service: ServiceKey,
    pub destination: DestinationKey,
    /// The weight prober believes IPVS holds.
    pub expected: u32,
    pub weight: u32,
}

/// What came of a batch of [`WeightChange`]s, by position in the batch.
#[derive(Debug, Default)]
pub struct ChangeOutcome {
    /// Written and acknowledged.
    pub applied: Vec<usize>,
    /// Not written: the destination holds another weight than expected
    /// (someone else changed it); it is given as read.
    pub changed_by_others: Vec<(usize, Destination)>,
    /// Not written: the destination or its service is gone.
    pub gone: Vec<usize>,
    /// Refused by the kernel.
    pub failed: Vec<WeightFailure>,
    /// The socket failed: these changes' outcome is unknown (sent, not
    /// acknowledged: some may have applied), and the error.
    pub unknown: Option<(Vec<usize>, IpvsError)>,
    /// Not sent, after the socket failed: not applied.
    pub not_sent: Vec<usize>,
}

impl IpvsClient {
    /// Sets one weight by read-modify-write: reads the destination's
    /// current settings, then writes them back with `weight`.
    pub fn set_weight(
        &mut self,
        service: &ServiceKey,
        destination: &DestinationKey,
        weight: u32,
    ) -> Result<(), IpvsError> {
        check_weight(service, destination, weight)?;
        let current = self
            .destinations(service)?
            .into_iter()
            .find(|d| d.key() == *destination)
            .ok_or_else(|| IpvsError::NoSuchDestination {
                operation: format!("setting the weight of {destination} in {service}"),
                service: *service,
                destination: *destination,
            })?;
        let update = WeightUpdate {
            service: *service,
            destination: current,
            weight,
        };
        match self.set_weights(std::slice::from_ref(&update))?.pop() {
            Some(failure) => Err(failure.error),
            None => Ok(()),
        }
    }

    /// Writes many weights, each by a fresh read-modify-write: the
    /// destinations of every service touched are read once, just before
    /// the batch; a change whose destination no longer holds the expected
    /// weight is not written (an operator's change wins) and one whose
    /// destination is gone is skipped. The rest go out pipelined as in
    /// [`IpvsClient::set_weights`].
    pub fn change_weights(&mut self, changes: &[WeightChange]) -> ChangeOutcome {
        let mut outcome = ChangeOutcome::default();
        let mut fresh: std::collections::HashMap<ServiceKey, Vec<Destination>> =
            std::collections::HashMap::new();
        let mut updates = Vec::with_capacity(changes.len());
        let mut positions = Vec::with_capacity(changes.len());
        for (index, change) in changes.iter().enumerate() {
            if let std::collections::hash_map::Entry::Vacant(slot) = fresh.entry(change.service) {
                match self.destinations(&change.service) {
                    Ok(list) => {
                        slot.insert(list);
                    }
                    Err(IpvsError::NoSuchService { .. }) => {
                        slot.insert(Vec::new());
                    }
                    Err(error) => {
                        // Nothing written yet: the ones queued and the
                        // rest are not applied.
                        outcome.not_sent = positions;
                        outcome.not_sent.extend(index..changes.len());
                        outcome.unknown = Some((Vec::new(), error));
                        return outcome;
                    }
                }
            }
            let current = fresh[&change.service]
                .iter()
                .find(|d| d.key() == change.destination);
            match current {
                None => outcome.gone.push(index),
                Some(d) if d.weight != change.expected => {
                    outcome.changed_by_others.push((index, d.clone()))
                }
                Some(d) => {
                    updates.push(WeightUpdate {
                        service: change.service,
                        destination: d.clone(),
                        weight: change.weight,
                    });
                    positions.push(index);
                }
            }
        }
        // Window by window, so a socket failure leaves exactly one window
        // of unknown outcome: those before it were acknowledged, those
        // after it never sent.
        for (w, window) in updates.chunks(BATCH_WINDOW).enumerate() {
            let at = |i: usize| positions[w * BATCH_WINDOW + i];
            match self.set_weights(window) {
                Ok(failures) => {
                    let refused: std::collections::HashSet<usize> =
                        failures.iter().map(|f| f.index).collect();
                    outcome
                        .applied
                        .extend((0..window.len()).filter(|i| !refused.contains(i)).map(at));
                    outcome.failed.extend(failures.into_iter().map(|mut f| {
                        f.index = at(f.index);
                        f
                    }));
                }
                Err(error) => {
                    outcome.unknown = Some(((0..window.len()).map(at).collect(), error));
                    let next = ((w + 1) * BATCH_WINDOW).min(positions.len());
                    outcome.not_sent = positions[next..].to_vec();
                    break;
                }
            }
        }
        outcome
    }

    /// Writes many weights, pipelined: up to [`BATCH_WINDOW`] requests per
    /// send, then their acks. Each update carries the destination as dumped,
    /// whose forwarding, thresholds and tunnel settings are sent back as
    /// they are. Returns the updates that failed, each with its error; an
    /// `Err` means the socket itself failed and later updates were not sent.
    pub fn set_weights(
        &mut self,
        updates: &[WeightUpdate],
    ) -> Result<Vec<WeightFailure>, IpvsError> {
        let mut failures = Vec::new();
        for (window_index, window) in updates.chunks(BATCH_WINDOW).enumerate() {
            let first_index = window_index * BATCH_WINDOW;
            let mut datagram = Vec::with_capacity(window.len() * 160);
            // seq -> index in `updates`, for the requests actually sent.
            let mut pending = Vec::with_capacity(window.len());
            for (offset, update) in window.iter().enumerate() {
                let index = first_index + offset;
                let key = update.destination.key();
                if let Err(error) = check_weight(&update.service, &key, update.weight) {
                    failures.push(WeightFailure {
                        index,
                        service: update.service,
                        destination: key,
                        error,
                    });
                    continue;
                }
                let seq = self.seq();
                datagram.extend_from_slice(&netlink::set_destination_request(
                    self.family,
                    seq,
                    &update.service,
                    &update.destination,
                    update.weight,
                ));
                pending.push((seq, index));
            }
            if pending.is_empty() {
                continue;
            }
            const OPERATION: &str = "setting weights";
            self.send(&datagram, OPERATION)?;
            let mut answered = 0;
            let first_seq = pending[0].0;
            let last_seq = pending[pending.len() - 1].0;
            self.receive(OPERATION, |message| {
                // Offsets from the first request, so a window that spans the
                // sequence number's wrap still matches.
                let offset = message.seq.wrapping_sub(first_seq);
                if offset > last_seq.wrapping_sub(first_seq) {
                    return Ok(Flow::Continue); // a stale reply of an earlier request
                }
                let index = pending[offset as usize].1;
                match netlink::reply(message)? {
                    Reply::Ack => answered += 1,
                    Reply::Error { errno } => {
                        answered += 1;
                        let update = &updates[index];
                        let key = update.destination.key();
                        failures.push(WeightFailure {
                            index,
                            service: update.service,
                            destination: key,
                            error: IpvsError::from_errno(
                                errno,
                                &format!(
                                    "setting the weight of {key} in {} to {}",
                                    update.service, update.weight
                                ),
                                Some(&update.service),
                                Some(&key),
                                Some(update.weight),
                            ),
                        });
                    }
                    _ => {}
                }
                Ok(if answered == pending.len() {
                    Flow::Stop
                } else {
                    Flow::Continue
                })
            })?;
        }
        failures.sort_by_key(|f| f.index);
        Ok(failures)
    }
}

fn check_weight(
    service: &ServiceKey,
    destination: &DestinationKey,
    weight: u32,
) -> Result<(), IpvsError> {
    if weight > MAX_WEIGHT {
        return Err(IpvsError::WeightOutOfRange {
            service: *service,
            destination: *destination,
            weight,
        });
    }
    Ok(())
}
