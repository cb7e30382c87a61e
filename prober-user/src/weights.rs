//! Response-time weights for one pool (the real servers of one virtual
//! service): an EWMA of latency per server (optionally peak-EWMA, Finagle's
//! and Linkerd's estimator), weight proportional to speed relative to the
//! pool's typical server for those slower than the pool's own spread
//! allows, damped so IPVS sees few, bounded changes.

use std::time::{Duration, Instant};

/// A time-based EWMA of latency with time constant `decay`. In peak mode
/// (Finagle's peak-EWMA) a sample above the estimate replaces it at once,
/// so a slowing server is noticed now; that also makes one slow reply move
/// weights for a whole decay period, which with one probe per interval is
/// mostly noise, so plain EWMA is the default.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LatencyEwma {
    value_ns: f64,
    updated: Instant,
}

impl LatencyEwma {
    pub fn new(sample_ns: f64, now: Instant) -> Self {
        Self {
            value_ns: sample_ns,
            updated: now,
        }
    }

    pub fn value_ns(&self) -> f64 {
        self.value_ns
    }

    pub fn observe(&mut self, sample_ns: f64, now: Instant, decay: Duration, peak: bool) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.updated = now;
        if peak && sample_ns > self.value_ns {
            self.value_ns = sample_ns;
        } else {
            let keep = (-elapsed / decay.as_secs_f64().max(1e-9)).exp();
            self.value_ns = self.value_ns * keep + sample_ns * (1.0 - keep);
        }
    }
}

/// The knobs of the weight policy; every one is a config setting.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WeightPolicy {
    /// Time constant of the latency estimate.
    pub decay: Duration,
    /// Peak-EWMA instead of plain EWMA (see [`LatencyEwma`]).
    pub peak_ewma: bool,
    /// Differences from the pool's typical latency below it are noise and
    /// move no weight; added to every latency before comparing, so those
    /// small against it move little.
    pub latency_slack: Duration,
    /// Lowest weight of a healthy server, as a share of its configured one.
    pub floor: f64,
    /// Changes smaller than this share of the configured weight are not
    /// written (hysteresis).
    pub hysteresis: f64,
    /// Largest change per interval, as a share of the configured weight
    /// (going to 0 on failure is never held back).
    pub max_step: f64,
    /// After recovery a server ramps from its floor to its weight over this.
    pub slow_start: Duration,
    /// When the healthy share of a pool falls below this, keep the last
    /// weights (fail open) instead of emptying the pool: Envoy's panic
    /// threshold. 0 (the default) turns it off: dead servers go to 0,
    /// as keepalived and HAProxy do; failing open is left to evidence
    /// against the director itself (see `director_fault`).
    pub panic_threshold: f64,
}

impl Default for WeightPolicy {
    fn default() -> Self {
        Self {
            decay: Duration::from_secs(10),
            peak_ewma: false,
            latency_slack: Duration::from_millis(5),
            floor: 0.1,
            hysteresis: 0.1,
            max_step: 0.25,
            slow_start: Duration::from_secs(30),
            panic_threshold: 0.0,
        }
    }
}

/// One real server of a pool as the policy sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Member {
    /// The weight the operator gave it (the most it gets).
    pub configured: u32,
    pub up: bool,
    /// When it last came up (for slow start); None if up since start.
    pub up_since: Option<Instant>,
    /// Its latency estimate, if there is one yet.
    pub latency_ns: Option<f64>,
    /// The weight IPVS has now.
    pub current: u32,
    /// Its weight was given outright (an agent's weight or drain, a
    /// command check's weight): written as it is in one step, neither
    /// scaled by latency nor damped.
    pub exact: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct PoolWeights {
    pub weights: Vec<u32>,
    /// The healthy share fell below `panic_threshold`: weights were kept.
    pub panic: bool,
}

/// Whether a pool's healthy share is below the panic threshold. Servers
/// drained on purpose (configured weight 0) count neither way.
pub fn in_panic(members: &[Member], threshold: f64) -> bool {
    let serving = members.iter().filter(|m| m.configured > 0);
    let total = serving.clone().count();
    let healthy = serving.filter(|m| m.up).count();
    // A threshold of 0 turns panic mode off (Envoy's convention).
    threshold > 0.0 && total > 0 && (healthy as f64) < threshold * total as f64
}

/// How many median absolute deviations above the pool's median latency a
/// server may be before it counts as slow: Hampel's outlier rule, wider
/// than its usual 3 (two standard deviations of a normal spread, which in
/// a pool of 10,000 equal servers finds 2 % of them slow at any moment);
/// 5 is about 3.4 standard deviations.
pub const SLOW_BEYOND_MADS: f64 = 5.0;

/// The latency up to which a server of this pool counts as fast as the
/// pool's typical one: the lower median of the up servers' latencies plus
/// the slack or [`SLOW_BEYOND_MADS`] median absolute deviations, whichever
/// is more. Against the fastest server, as before, noise that every
/// server shares (a busy director, a loaded path) moved weights: in a
/// pool of thousands the fastest estimate is the luckiest, and each
/// estimate's wander past it was written. The median and its deviation
/// hardly move with such noise, and a handful of slow servers move
/// neither. The slack is the scale below which differences are noise: at
/// 100,000 real servers estimates wandering a millisecond past the median
/// flipped 38,000 servers between 100 and 90 in five minutes. None
/// without estimates.
pub fn slow_threshold_ns(members: &[Member], slack_ns: f64) -> Option<f64> {
    let mut latencies: Vec<f64> = members
        .iter()
        .filter(|m| m.up)
        .filter_map(|m| m.latency_ns)
        .filter(|l| *l > 0.0)
        .collect();
    let middle = latencies.len().checked_sub(1)? / 2;
    let median = *latencies.select_nth_unstable_by(middle, f64::total_cmp).1;
    for l in &mut latencies {
        *l = (*l - median).abs();
    }
    let deviation = *latencies.select_nth_unstable_by(middle, f64::total_cmp).1;
    Some(median + (SLOW_BEYOND_MADS * deviation).max(slack_ns))
}

/// The weights a pool should have now.
pub fn pool_weights(members: &[Member], policy: &WeightPolicy, now: Instant) -> PoolWeights {
    if in_panic(members, policy.panic_threshold) {
        return PoolWeights {
            weights: members.iter().map(|m| m.current).collect(),
            panic: true,
        };
    }
    let slack = policy.latency_slack.as_nanos() as f64;
    let fast_enough = slow_threshold_ns(members, slack).map(|t| t + slack);
    let weights = members
        .iter()
        .map(|m| {
            if !m.up {
                return 0;
            }
            if m.exact {
                return m.configured;
            }
            let configured = m.configured as f64;
            let speed = match (m.latency_ns, fast_enough) {
                (Some(l), Some(fast_enough)) if l > 0.0 => {
                    (fast_enough / (l + slack)).clamp(policy.floor, 1.0)
                }
                _ => 1.0, // no evidence yet: full weight
            };
            let mut target = configured * speed;
            if let Some(since) = m.up_since.filter(|_| !policy.slow_start.is_zero()) {
                let ramp = now.saturating_duration_since(since).as_secs_f64()
                    / policy.slow_start.as_secs_f64().max(1e-9);
                let cap = configured * ramp.clamp(policy.floor, 1.0);
                // Slow start holds growth back; it never cuts a weight the
                // server already has (kept, say, through a panic).
                target = target.min(cap.max(m.current as f64));
            } else if m.current == 0 && policy.slow_start.is_zero() {
                // Back in service without slow start: its weight at once,
                // not in max_step writes (that is what slow start is for).
                return (target.round() as u32).clamp(configured.min(1.0) as u32, m.configured);
            }
            damp(m.current, target, configured, policy)
        })
        .collect();
    PoolWeights {
        weights,
        panic: false,
    }
}

/// Moves from `current` toward `target` by at most `max_step`, and not at
/// all for a change under `hysteresis`.
fn damp(current: u32, target: f64, configured: f64, policy: &WeightPolicy) -> u32 {
    let target = target
        .round()
        .clamp(if configured >= 1.0 { 1.0 } else { 0.0 }, configured);
    let current_f = current as f64;
    let change = target - current_f;
    // Full weight is a resting point, not noise: a ramp or a recovery
    // always gets there.
    let to_full = target >= configured && current_f < configured;
    if change.abs() < (policy.hysteresis * configured).max(1.0) && current != 0 && !to_full {
        return current;
    }
    let step = (policy.max_step * configured).max(1.0);
    let stepped = current_f + change.clamp(-step, step);
    // A last step shorter than the hysteresis goes all the way, so a
    // stepped approach always reaches its target.
    if (target - stepped).abs() < (policy.hysteresis * configured).max(1.0) {
        return target as u32;
    }
    stepped.round() as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn member(latency_ms: f64, current: u32) -> Member {
        Member {
            configured: 100,
            up: true,
            up_since: None,
            latency_ns: Some(latency_ms * 1e6),
            current,
            exact: false,
        }
    }

    /// Runs the policy `n` intervals, feeding its output back as IPVS.
    fn settle(mut members: Vec<Member>, policy: &WeightPolicy, now: Instant, n: usize) -> Vec<u32> {
        for _ in 0..n {
            let out = pool_weights(&members, policy, now);
            for (m, w) in members.iter_mut().zip(out.weights) {
                m.current = w;
            }
        }
        members.iter().map(|m| m.current).collect()
    }

    /// Latencies around `mean_ms`, within `spread_ms` either side (the sum
    /// of three uniform draws, a bell), from a fixed seed (xorshift).
    fn noisy_latencies(n: usize, mean_ms: f64, spread_ms: f64, seed: u64) -> Vec<f64> {
        let mut state = seed | 1;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 11) as f64 / (1u64 << 53) as f64
        };
        (0..n)
            .map(|_| {
                let bell = (uniform() + uniform() + uniform()) / 1.5 - 1.0;
                mean_ms + spread_ms * bell
            })
            .collect()
    }

    #[test]
    fn servers_slower_than_the_pool_s_spread_get_proportionally_less_down_to_the_floor() {
        let now = Instant::now();
        // (pool's latencies in ms, slack, the weights they settle to)
        let table: &[(&[f64], Duration, &[u32])] = &[
            // The median 1 ms, no spread: past it by more than the 5 ms
            // slack, (1 + 5 + 5) / (11 + 5) and the floor.
            (
                &[1.0, 1.0, 1.0, 1.0, 1.0, 11.0, 101.0],
                Duration::from_millis(5),
                &[100, 100, 100, 100, 100, 69, 10],
            ),
            // Within the slack of the typical server: noise.
            (&[1.0, 1.0, 5.5], Duration::from_millis(5), &[100, 100, 100]),
            // Without slack: 1 / 2 of the weight for twice the latency.
            (&[1.0, 1.0, 2.0], Duration::ZERO, &[100, 100, 50]),
            // The demo's pool: a fast server, one 40 ms behind.
            (&[0.1, 40.0], Duration::from_millis(5), &[100, 22]),
            (&[0.1, 0.2, 40.0], Duration::from_millis(5), &[100, 100, 23]),
            // Twice as slow as the typical server, but as far from it as
            // the fastest is: spread, not slowness.
            (&[1.0, 10.0, 20.0], Duration::ZERO, &[100, 100, 100]),
            // Half the pool slow: the typical server is the fast one.
            (&[1.0, 1.0, 41.0, 41.0], Duration::ZERO, &[100, 100, 10, 10]),
            // Most of the pool slow: so is the typical server.
            (&[1.0, 41.0, 41.0], Duration::ZERO, &[100, 100, 100]),
        ];
        for (latencies, slack, expected) in table {
            let pool = latencies.iter().map(|l| member(*l, 100)).collect();
            let policy = WeightPolicy {
                latency_slack: *slack,
                ..WeightPolicy::default()
            };
            assert_eq!(
                settle(pool, &policy, now, 10),
                *expected,
                "latencies {latencies:?} ms, slack {slack:?}"
            );
        }
    }

    #[test]
    fn noise_that_every_server_shares_moves_no_weight() {
        let now = Instant::now();
        let policy = WeightPolicy::default();
        // 2 ms +- 1.5 and (a busy director) 30 ms +- 25: in a pool of 50 the
        // fastest estimate is far below most, but none is slow.
        for (mean, spread, n) in [(2.0, 1.5, 50), (30.0, 25.0, 50), (30.0, 25.0, 10_000)] {
            for seed in 1..=5 {
                let pool: Vec<Member> = noisy_latencies(n, mean, spread, seed)
                    .into_iter()
                    .map(|l| member(l, 100))
                    .collect();
                let moved = pool_weights(&pool, &policy, now)
                    .weights
                    .iter()
                    .filter(|w| **w != 100)
                    .count();
                assert_eq!(
                    moved, 0,
                    "{n} servers at {mean} +- {spread} ms, seed {seed}"
                );
            }
        }
    }

    #[test]
    fn one_slow_server_among_noisy_ones_is_written_down() {
        let now = Instant::now();
        let policy = WeightPolicy::default();
        for n in [50, 10_000] {
            let mut pool: Vec<Member> = noisy_latencies(n, 2.0, 1.5, 7)
                .into_iter()
                .map(|l| member(l, 100))
                .collect();
            pool[0].latency_ns = Some(52e6);
            let weights = settle(pool, &policy, now, 4);
            // The goal: 50 ms slower -> at most 80 % within 3 s.
            assert!(weights[0] <= 35, "{n} servers: {}", weights[0]);
            assert!(weights[1..].iter().all(|w| *w == 100), "{n} servers");
        }
    }

    #[test]
    fn sub_millisecond_jitter_moves_no_weight() {
        let now = Instant::now();
        let weights = settle(
            vec![member(0.5, 100), member(1.0, 100)],
            &WeightPolicy::default(),
            now,
            10,
        );
        assert_eq!(weights, vec![100, 100]);
    }

    #[test]
    fn a_ramp_always_reaches_full_weight() {
        let start = Instant::now();
        let policy = WeightPolicy::default();
        let mut back = member(1.0, 92);
        back.up_since = Some(start);
        let at_end = start + policy.slow_start;
        let out = pool_weights(&[member(1.0, 100), back], &policy, at_end);
        assert_eq!(
            out.weights,
            vec![100, 100],
            "92 is within the hysteresis of 100, but 100 is where it rests"
        );
    }

    #[test]
    fn steps_are_bounded_and_small_changes_are_not_written() {
        let now = Instant::now();
        let policy = WeightPolicy {
            latency_slack: Duration::ZERO,
            hysteresis: 0.05,
            ..WeightPolicy::default()
        };
        let out = pool_weights(&[member(1.0, 100), member(10.0, 100)], &policy, now);
        assert_eq!(
            out.weights,
            vec![100, 75],
            "at most 25 % of the configured weight per interval"
        );
        let out = pool_weights(&[member(1.0, 100), member(1.04, 100)], &policy, now);
        assert_eq!(out.weights, vec![100, 100], "a 4 % difference is noise");
    }

    #[test]
    fn a_down_server_goes_to_zero_at_once_and_ramps_back_with_slow_start() {
        let start = Instant::now();
        let policy = WeightPolicy::default();
        let mut down = member(1.0, 100);
        down.up = false;
        let out = pool_weights(&[member(1.0, 100), member(1.0, 100), down], &policy, start);
        assert_eq!(out.weights[2], 0);

        let mut back = member(1.0, 0);
        back.up_since = Some(start);
        let at = |secs: u64| start + Duration::from_secs(secs);
        let w0 = pool_weights(&[member(1.0, 100), back], &policy, at(0)).weights[1];
        assert_eq!(w0, 10, "slow start begins at the floor");
        back.current = w0;
        let w15 = pool_weights(&[member(1.0, 100), back], &policy, at(15)).weights[1];
        assert_eq!(
            w15, 35,
            "halfway through slow start: 50, reached by steps of 25"
        );
        back.current = 50;
        let w30 = pool_weights(&[member(1.0, 100), back], &policy, at(30)).weights[1];
        assert_eq!(w30, 75);
    }

    #[test]
    fn without_slow_start_a_server_back_in_service_gets_its_weight_in_one_write() {
        let now = Instant::now();
        let policy = WeightPolicy {
            slow_start: Duration::ZERO,
            ..WeightPolicy::default()
        };
        let mut back = member(1.0, 0);
        back.up_since = Some(now);
        let out = pool_weights(&[member(1.0, 100), back], &policy, now);
        assert_eq!(out.weights, vec![100, 100], "not 25 % steps");
        let mut slower = member(20.0, 0);
        slower.up_since = Some(now);
        let out = pool_weights(&[member(1.0, 100), slower], &policy, now);
        // (1 ms + 5 ms slack + 5 ms) / (20 ms + 5 ms) of 100.
        assert_eq!(out.weights[1], 44, "its latency share at once");
    }

    #[test]
    fn by_default_dead_servers_go_to_zero_in_pools_of_any_size() {
        let now = Instant::now();
        let policy = WeightPolicy::default();
        for size in [1usize, 2, 4, 50] {
            for dead in 1..=size {
                let mut pool = vec![member(1.0, 100); size];
                for m in &mut pool[..dead] {
                    m.up = false;
                }
                let out = pool_weights(&pool, &policy, now);
                assert!(!out.panic, "{dead} of {size} down");
                assert!(
                    out.weights[..dead].iter().all(|w| *w == 0),
                    "{dead} of {size} down: {:?}",
                    out.weights
                );
                assert!(out.weights[dead..].iter().all(|w| *w == 100));
            }
        }
    }

    #[test]
    fn a_panic_threshold_keeps_weights_when_the_healthy_share_falls_below_it() {
        let now = Instant::now();
        let policy = WeightPolicy {
            panic_threshold: 0.5,
            ..WeightPolicy::default()
        };
        // Half healthy is not below half: the dead go to 0.
        let mut pool = vec![
            member(1.0, 100),
            member(1.0, 80),
            member(1.0, 100),
            member(1.0, 100),
        ];
        pool[0].up = false;
        pool[1].up = false;
        let out = pool_weights(&pool, &policy, now);
        assert_eq!((out.weights, out.panic), (vec![0, 0, 100, 100], false));
        // A quarter healthy is: fail open.
        pool[2].up = false;
        let out = pool_weights(&pool, &policy, now);
        assert!(out.panic);
        assert_eq!(out.weights, vec![100, 80, 100, 100]);
    }

    #[test]
    fn drained_servers_count_neither_healthy_nor_down_for_panic() {
        let policy = WeightPolicy {
            panic_threshold: 0.5,
            ..WeightPolicy::default()
        };
        let mut pool = vec![
            member(1.0, 100),
            member(1.0, 100),
            member(1.0, 0),
            member(1.0, 0),
        ];
        pool[2].configured = 0;
        pool[3].configured = 0;
        // Two drained, one of the other two down: half of the serving
        // ones are healthy, so no panic (counting the drained as down
        // would have made it three of four).
        pool[0].up = false;
        assert!(!in_panic(&pool, policy.panic_threshold));
        pool[1].up = false;
        assert!(in_panic(&pool, policy.panic_threshold));
    }

    #[test]
    fn a_drain_or_a_given_weight_is_written_in_one_step() {
        let now = Instant::now();
        let policy = WeightPolicy::default();
        let mut drained = member(1.0, 100);
        drained.configured = 0;
        drained.exact = true;
        let out = pool_weights(&[member(1.0, 100), drained], &policy, now);
        assert_eq!(out.weights, vec![100, 0], "not 1 per interval");
        let mut given = member(30.0, 100);
        given.configured = 7;
        given.exact = true;
        let out = pool_weights(&[member(1.0, 100), given], &policy, now);
        assert_eq!(
            out.weights,
            vec![100, 7],
            "not 25 % steps, not scaled by latency"
        );
    }

    #[test]
    fn stable_latencies_give_stable_weights() {
        let now = Instant::now();
        let policy = WeightPolicy {
            latency_slack: Duration::ZERO,
            ..WeightPolicy::default()
        };
        let pool = vec![member(1.0, 100), member(3.0, 33)];
        assert_eq!(pool_weights(&pool, &policy, now).weights, vec![100, 33]);
    }

    #[test]
    fn plain_ewma_barely_moves_for_one_slow_reply() {
        let t0 = Instant::now();
        let decay = Duration::from_secs(10);
        let mut e = LatencyEwma::new(1e6, t0);
        e.observe(8e6, t0 + Duration::from_millis(200), decay, false);
        // One 8 ms reply at 5 probes a second adds about 2 % of the gap.
        assert!(e.value_ns() < 1.2e6, "{}", e.value_ns());
    }

    #[test]
    fn peak_ewma_jumps_up_and_decays_down() {
        let t0 = Instant::now();
        let decay = Duration::from_secs(10);
        let mut e = LatencyEwma::new(1e6, t0);
        e.observe(5e6, t0 + Duration::from_secs(1), decay, true);
        assert_eq!(e.value_ns(), 5e6, "a peak is taken at once");
        e.observe(1e6, t0 + Duration::from_secs(11), decay, true);
        // After one time constant 1/e of the gap remains.
        let expected = 1e6 + 4e6 * (-1.0f64).exp();
        assert!((e.value_ns() - expected).abs() < 1.0, "{}", e.value_ns());
    }
}
