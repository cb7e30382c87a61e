//! What the controller holds of each probe, in a table indexed by the
//! probe's target id (the datapath's index): a datapath event finds its
//! probe without a hash, and 100,000 real servers cost no key nor hash
//! table slack (keyed by `ProbeSpec`, this was a third of the RSS).

use std::time::Instant;

use crate::{health::Health, weights::LatencyEwma};

/// A probe's health and latency (its settings are the plan's).
pub(super) struct ProbeTrack {
    pub(super) health: Health,
    /// Whether this run has seen any result yet: until then the weights
    /// this probe decides are left as IPVS has them.
    pub(super) evidence: bool,
    /// Its last settled outcome was a failure (see `diagnosis`).
    pub(super) failing: bool,
    /// The latency weights use: the datapath's RTT estimate and the
    /// client handshakes' (see `observe::combined_latency`).
    pub(super) latency: Option<LatencyEwma>,
    /// The datapath's RTT estimate as last reported, ns (0: none yet).
    pub(super) active_rtt_ns: u64,
    /// What clients' traffic showed (NAT servers measured passively):
    /// boxed, as most servers have none and each probe's track is kept
    /// for every one of 100,000 real servers.
    pub(super) clients: Option<Box<ClientTimes>>,
    /// When it last came up in this run (slow start).
    pub(super) came_up_at: Option<Instant>,
    pub(super) latency_saved_at: Instant,
}

impl ProbeTrack {
    /// A probe first seen in this run: `health` as IPVS or an earlier run
    /// left it, nothing heard yet.
    pub(super) fn new(health: Health, latency: Option<LatencyEwma>, now: Instant) -> Self {
        Self {
            health,
            evidence: false,
            failing: false,
            latency,
            active_rtt_ns: 0,
            clients: None,
            came_up_at: None,
            latency_saved_at: now,
        }
    }
}

/// A server's times as its clients see them (passive measurement).
#[derive(Default)]
pub(super) struct ClientTimes {
    /// Client handshakes' RTT.
    pub(super) handshake: Option<LatencyEwma>,
    /// Response time (request -> first response byte), and when it last
    /// had a sample.
    pub(super) response: Option<LatencyEwma>,
    pub(super) response_at: Option<Instant>,
}

/// Probe tracks by target id. Ids are the prober's: a discovery removes
/// the tracks of dropped probes before the prober frees their ids, and
/// adds tracks for new probes after it gives theirs, so an id never
/// carries another probe's track.
#[derive(Default)]
pub(super) struct ProbeTracks {
    by_id: Vec<Option<ProbeTrack>>,
}

impl ProbeTracks {
    pub(super) fn get(&self, id: u32) -> Option<&ProbeTrack> {
        self.by_id.get(id as usize)?.as_ref()
    }

    pub(super) fn get_mut(&mut self, id: u32) -> Option<&mut ProbeTrack> {
        self.by_id.get_mut(id as usize)?.as_mut()
    }

    /// Sets the track of `id`, growing the table to fit exactly: it is
    /// sized at each discovery (see `reserve`), not doubled as it grows.
    pub(super) fn insert(&mut self, id: u32, track: ProbeTrack) {
        let i = id as usize;
        if i >= self.by_id.len() {
            self.by_id.resize_with(i + 1, || None);
        }
        self.by_id[i] = Some(track);
    }

    /// Room for ids up to `ids` (the prober's table size), allocated once.
    pub(super) fn reserve(&mut self, ids: usize) {
        self.by_id
            .reserve_exact(ids.saturating_sub(self.by_id.len()));
    }

    pub(super) fn remove(&mut self, id: u32) -> Option<ProbeTrack> {
        self.by_id.get_mut(id as usize)?.take()
    }

    /// Every track with its id.
    pub(super) fn iter(&self) -> impl Iterator<Item = (u32, &ProbeTrack)> {
        self.by_id
            .iter()
            .enumerate()
            .filter_map(|(id, t)| Some((id as u32, t.as_ref()?)))
    }

    pub(super) fn values_mut(&mut self) -> impl Iterator<Item = &mut ProbeTrack> {
        self.by_id.iter_mut().flatten()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::health::State;

    fn track(now: Instant) -> ProbeTrack {
        ProbeTrack::new(Health::new(State::Up, now), None, now)
    }

    #[test]
    fn tracks_are_found_by_id() {
        let now = Instant::now();
        let mut tracks = ProbeTracks::default();
        tracks.insert(5, track(now));
        tracks.insert(5, track(now));
        tracks.insert(0, track(now));
        assert!(tracks.get(5).is_some() && tracks.get(0).is_some());
        assert!(tracks.get(3).is_none() && tracks.get(99).is_none());
        assert_eq!(tracks.iter().map(|(id, _)| id).collect::<Vec<_>>(), [0, 5]);
        assert!(tracks.remove(5).is_some());
        assert!(tracks.remove(5).is_none());
        assert_eq!(tracks.iter().count(), 1);
    }
}
