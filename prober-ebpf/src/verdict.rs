//! Settling probes in the datapath: each probe's outcome (an answer, a
//! refusal, an ICMP error, a slow answer, or no answer by the next send)
//! extends the target's run of successes or failures and its RTT
//! estimate. Userspace hears only what goes against what it holds of the
//! target ([`Expectation`]), what ends such a run, and RTT moves beyond
//! the band: a steady target costs userspace nothing.

use aya_ebpf::helpers::bpf_ktime_get_ns;
use prober_common::{expected, outcome, Expectation, ProbeConfig, ProbeEvent, ProbeState};

use crate::{counters, PROBE_CONFIG, PROBE_EVENTS, PROBE_EXPECT};

/// The largest RTT difference (ns) and sample gap (µs) the estimate
/// weighs: their product stays below 2^64.
const MOST_RTT_STEP_NS: u64 = 4_000_000_000;
const MOST_SAMPLE_GAP_US: u64 = 4_000_000_000;

/// What userspace holds of the target (nothing known: every outcome is
/// reported).
#[inline(always)]
pub fn expectation(target_id: u32) -> Expectation {
    PROBE_EXPECT.get(target_id).copied().unwrap_or_default()
}

/// Settles the outstanding probe of `target_id` (nonce `nonce`, sent at
/// `state.last_sent_ns`) with `kind`, an [`outcome`] code; `rtt_ns` for
/// answers.
#[inline(always)]
pub fn settle(
    target_id: u32,
    state: &mut ProbeState,
    expect: &Expectation,
    kind: u8,
    nonce: u32,
    rtt_ns: u64,
) {
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    let success = kind == outcome::ANSWERED;
    let (ok_before, bad_before) = (state.successes_in_row, state.failures_in_row);
    let in_row;
    let mut rtt_moved = false;
    if success {
        state.successes_in_row = ok_before.saturating_add(1);
        state.failures_in_row = 0;
        in_row = state.successes_in_row;
        if let Some(config) = PROBE_CONFIG.get(0) {
            let sample_ns = filtered_sample(state, config, rtt_ns);
            state.rtt_ewma_ns = next_estimate(state, config, sample_ns, now);
            state.rtt_ewma_at_ns = now;
            rtt_moved = beyond_band(state.rtt_ewma_ns, state.rtt_reported_ns, config);
        }
    } else {
        state.failures_in_row = bad_before.saturating_add(1);
        state.successes_in_row = 0;
        in_row = state.failures_in_row;
    }
    let against = match expect.state {
        expected::UP => !success || bad_before > 0,
        expected::DOWN => success || ok_before > 0,
        _ => true,
    };
    if !against && !rtt_moved {
        return;
    }
    let Some(mut entry) = PROBE_EVENTS.reserve(0) else {
        if let Some(c) = counters() {
            c.events_lost += 1;
        }
        return;
    };
    entry.write(ProbeEvent {
        target_id,
        outcome: kind,
        _pad: [0; 3],
        in_row,
        nonce,
        sent_ns: state.last_sent_ns,
        rtt_ns,
        rtt_ewma_ns: state.rtt_ewma_ns,
        answered_before_ns: state.last_reply_ns,
    });
    entry.submit(0);
    state.rtt_reported_ns = state.rtt_ewma_ns;
}

/// The sample the estimate takes for an answer of `rtt_ns`: the median of
/// it and the two answers before (the answer itself until there are
/// two). One late answer, the director's own stall (its receive thread
/// waiting for a busy CPU) more often than the server's, then moves the
/// estimate not at all, where it used to move it by a tenth of the
/// spike for a whole decay period; a server that turned slow is taken
/// from its second slow answer. Peak mode takes answers as they come:
/// it is asked for to notice a slowing server at once.
#[inline(always)]
fn filtered_sample(state: &mut ProbeState, config: &ProbeConfig, rtt_ns: u64) -> u64 {
    let now_us = (rtt_ns / 1000).min(u32::MAX as u64) as u32;
    let (before_last, last) = (state.rtt_before_last_us, state.rtt_last_us);
    state.rtt_before_last_us = last;
    state.rtt_last_us = now_us.max(1);
    if before_last == 0 || config.rtt_peak != 0 {
        return rtt_ns;
    }
    let median = before_last.max(last).min(now_us).max(before_last.min(last));
    median as u64 * 1000
}

/// The RTT estimate after an answer of `rtt_ns` at `now`.
#[inline(always)]
fn next_estimate(state: &ProbeState, config: &ProbeConfig, rtt_ns: u64, now: u64) -> u64 {
    let previous = state.rtt_ewma_ns;
    if previous == 0 || config.rtt_decay_us == 0 || (config.rtt_peak != 0 && rtt_ns > previous) {
        return rtt_ns;
    }
    let gap_us = (now.saturating_sub(state.rtt_ewma_at_ns) / 1000).min(MOST_SAMPLE_GAP_US);
    let weight_den = gap_us + config.rtt_decay_us as u64;
    if rtt_ns >= previous {
        let step = (rtt_ns - previous).min(MOST_RTT_STEP_NS);
        previous + step * gap_us / weight_den
    } else {
        let step = (previous - rtt_ns).min(MOST_RTT_STEP_NS);
        previous - step * gap_us / weight_den
    }
}

/// Whether `estimate` left the band around the value userspace last
/// heard (none yet: always).
#[inline(always)]
fn beyond_band(estimate: u64, reported: u64, config: &ProbeConfig) -> bool {
    if reported == 0 {
        return estimate != 0;
    }
    // All far below 2^64 / 2^16 once clamped (no 128-bit multiply in BPF).
    let distance = estimate.abs_diff(reported).min(MOST_RTT_STEP_NS);
    let scale = reported.min(MOST_RTT_STEP_NS) + config.rtt_slack_us as u64 * 1000;
    distance * 1000 > scale * config.rtt_band_permille as u64
}
