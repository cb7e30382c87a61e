//! Per-target health: a rise/fall state machine (keepalived's and
//! HAProxy's semantics) fed by what the probes observed each interval.

use std::time::Instant;

/// What a target's probes showed since the last look.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Observations {
    /// Positive replies (SYN-ACK, echo reply).
    pub answered: u64,
    /// RSTs: the host is up but nothing listens.
    pub refused: u64,
    /// ICMP unreachable quoting a probe.
    pub unreachable: u64,
    /// Probes that got no reply before the next was sent.
    pub timed_out: u64,
}

impl Observations {
    pub fn failures(&self) -> u64 {
        self.refused + self.unreachable + self.timed_out
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
}

/// Why a target changed state, for logs and alerts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    Answered,
    Refused,
    Unreachable,
    TimedOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    pub to: State,
    pub cause: Cause,
}

/// Consecutive results needed to change state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RiseFall {
    /// Successes in a row that bring a down target up.
    pub rise: u32,
    /// Failures in a row that take an up target down.
    pub fall: u32,
}

impl RiseFall {
    /// What two users of one check both accept: down at the smaller fall,
    /// up only at the larger rise.
    pub fn strictest(self, other: Self) -> Self {
        Self {
            rise: self.rise.max(other.rise),
            fall: self.fall.min(other.fall),
        }
    }
}

impl Default for RiseFall {
    /// HAProxy's defaults (keepalived's retry is 1 by default).
    fn default() -> Self {
        Self { rise: 2, fall: 3 }
    }
}

#[derive(Debug, Clone)]
pub struct Health {
    state: State,
    successes: u32,
    failures: u32,
    since: Instant,
}

impl Health {
    /// A target starting in `state` (on start-up: what IPVS says, so a
    /// restart changes nothing until the probes say otherwise).
    pub fn new(state: State, now: Instant) -> Self {
        Self {
            state,
            successes: 0,
            failures: 0,
            since: now,
        }
    }

    pub fn state(&self) -> State {
        self.state
    }

    /// When the current state began.
    pub fn since(&self) -> Instant {
        self.since
    }

    /// Feeds one interval's observations. The order of results within an
    /// interval is unknown, so a mixed interval counts as its majority (a
    /// tie as failures: a flapping server is not up), each of its results
    /// adding to the run.
    pub fn observe(
        &mut self,
        seen: Observations,
        limits: RiseFall,
        now: Instant,
    ) -> Option<Transition> {
        self.observe_run(seen, u32::MAX, limits, now)
    }

    /// Feeds one outcome the datapath settled, `in_row` being the length
    /// of its run there (this outcome included): the run counted here
    /// never exceeds it, so an outcome lost on the way (a full ring) can
    /// delay a verdict but never make a run look longer than it was. It
    /// can be shorter: failures forgiven here stay forgiven.
    pub fn observe_settled(
        &mut self,
        seen: Observations,
        in_row: u32,
        limits: RiseFall,
        now: Instant,
    ) -> Option<Transition> {
        self.observe_run(seen, in_row.max(1), limits, now)
    }

    fn observe_run(
        &mut self,
        seen: Observations,
        most_in_row: u32,
        limits: RiseFall,
        now: Instant,
    ) -> Option<Transition> {
        let ok = seen.answered;
        let bad = seen.failures();
        if ok == 0 && bad == 0 {
            return None; // no probe settled: no evidence either way
        }
        if ok > bad {
            self.failures = 0;
            self.successes = self
                .successes
                .saturating_add(ok.min(u32::MAX as u64) as u32)
                .min(most_in_row);
            if self.state == State::Down && self.successes >= limits.rise {
                return Some(self.switch(State::Up, Cause::Answered, now));
            }
        } else {
            self.successes = 0;
            self.failures = self
                .failures
                .saturating_add(bad.min(u32::MAX as u64) as u32)
                .min(most_in_row);
            if self.state == State::Up && self.failures >= limits.fall {
                let cause = if seen.refused > 0 {
                    Cause::Refused
                } else if seen.unreachable > 0 {
                    Cause::Unreachable
                } else {
                    Cause::TimedOut
                };
                return Some(self.switch(State::Down, cause, now));
            }
        }
        None
    }

    /// Forgets the failures in the current run (they were the director's
    /// own, not the target's); the state stays.
    pub fn forgive_failures(&mut self) {
        self.failures = 0;
    }

    fn switch(&mut self, to: State, cause: Cause, now: Instant) -> Transition {
        self.state = to;
        self.successes = 0;
        self.failures = 0;
        self.since = now;
        Transition { to, cause }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ONE_OK: Observations = Observations {
        answered: 1,
        refused: 0,
        unreachable: 0,
        timed_out: 0,
    };
    const ONE_TIMEOUT: Observations = Observations {
        answered: 0,
        refused: 0,
        unreachable: 0,
        timed_out: 1,
    };
    const ONE_REFUSED: Observations = Observations {
        answered: 0,
        refused: 1,
        unreachable: 0,
        timed_out: 0,
    };

    #[test]
    fn goes_down_after_fall_failures_in_a_row_and_up_after_rise_successes() {
        let now = Instant::now();
        let limits = RiseFall { rise: 2, fall: 3 };
        let mut h = Health::new(State::Up, now);
        assert_eq!(h.observe(ONE_TIMEOUT, limits, now), None);
        assert_eq!(h.observe(ONE_TIMEOUT, limits, now), None);
        assert_eq!(
            h.observe(ONE_TIMEOUT, limits, now),
            Some(Transition {
                to: State::Down,
                cause: Cause::TimedOut
            })
        );
        assert_eq!(h.observe(ONE_OK, limits, now), None);
        assert_eq!(
            h.observe(ONE_OK, limits, now),
            Some(Transition {
                to: State::Up,
                cause: Cause::Answered
            })
        );
    }

    #[test]
    fn a_success_resets_the_failure_count() {
        let now = Instant::now();
        let limits = RiseFall { rise: 2, fall: 3 };
        let mut h = Health::new(State::Up, now);
        for _ in 0..10 {
            assert_eq!(h.observe(ONE_REFUSED, limits, now), None);
            assert_eq!(h.observe(ONE_REFUSED, limits, now), None);
            assert_eq!(h.observe(ONE_OK, limits, now), None);
        }
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn an_empty_interval_is_no_evidence() {
        let now = Instant::now();
        let limits = RiseFall { rise: 1, fall: 1 };
        let mut h = Health::new(State::Up, now);
        assert_eq!(h.observe(Observations::default(), limits, now), None);
        assert_eq!(h.state(), State::Up);
    }

    #[test]
    fn the_cause_names_what_failed() {
        let now = Instant::now();
        let limits = RiseFall { rise: 1, fall: 1 };
        let mut h = Health::new(State::Up, now);
        assert_eq!(
            h.observe(ONE_REFUSED, limits, now).unwrap().cause,
            Cause::Refused
        );
        let mut h = Health::new(State::Up, now);
        let unreachable = Observations {
            unreachable: 1,
            ..Default::default()
        };
        assert_eq!(
            h.observe(unreachable, limits, now).unwrap().cause,
            Cause::Unreachable
        );
    }

    #[test]
    fn several_results_in_one_interval_count_each() {
        let now = Instant::now();
        let limits = RiseFall { rise: 2, fall: 3 };
        let mut h = Health::new(State::Up, now);
        let three = Observations {
            timed_out: 3,
            ..Default::default()
        };
        assert_eq!(
            h.observe(three, limits, now).map(|t| t.to),
            Some(State::Down)
        );
    }

    #[test]
    fn a_settled_run_is_never_longer_than_the_datapath_s() {
        let now = Instant::now();
        let limits = RiseFall { rise: 2, fall: 3 };
        let mut h = Health::new(State::Up, now);
        // Two failures seen; the answer that ended them was lost; a new
        // run of one failure must not make three.
        assert_eq!(h.observe_settled(ONE_TIMEOUT, 1, limits, now), None);
        assert_eq!(h.observe_settled(ONE_TIMEOUT, 2, limits, now), None);
        assert_eq!(h.observe_settled(ONE_TIMEOUT, 1, limits, now), None);
        assert_eq!(h.observe_settled(ONE_TIMEOUT, 2, limits, now), None);
        assert_eq!(
            h.observe_settled(ONE_TIMEOUT, 3, limits, now),
            Some(Transition {
                to: State::Down,
                cause: Cause::TimedOut
            })
        );
        // Forgiven failures stay forgiven though the datapath's run goes on.
        let mut h = Health::new(State::Up, now);
        h.observe_settled(ONE_TIMEOUT, 1, limits, now);
        h.forgive_failures();
        assert_eq!(h.observe_settled(ONE_TIMEOUT, 2, limits, now), None);
        assert_eq!(h.observe_settled(ONE_TIMEOUT, 3, limits, now), None);
        assert!(h.observe_settled(ONE_TIMEOUT, 4, limits, now).is_some());
    }
}
