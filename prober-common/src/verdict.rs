//! What the datapath reports of each probe it settles, and what
//! userspace tells it of each target, so that only news is reported.

/// What userspace holds of a target, so the datapath reports only what
/// goes against it (see [`ProbeEvent`]), and how often to probe it.
/// Written only by userspace.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Expectation {
    /// [`expected`].
    pub state: u8,
    pub _pad: [u8; 3],
    /// An answer later than this counts as a timeout (a slow answer);
    /// 0: none does.
    pub timeout_us: u32,
    /// Its probe interval; 0: sent whenever its entry is walked.
    pub interval_us: u32,
    /// The nonce of a probe sent in a chunk whose frames the probing
    /// interface dropped (its ring full): its silence is the director's
    /// loss, not the server's, and is excused once in a row.
    pub lossy_nonce: u32,
}

/// [`Expectation::state`] codes.
pub mod expected {
    /// Nothing known yet: every outcome is reported.
    pub const UNKNOWN: u8 = 0;
    pub const UP: u8 = 1;
    pub const DOWN: u8 = 2;
}

/// [`ProbeEvent::outcome`] codes: how one probe settled.
pub mod outcome {
    /// A SYN-ACK or echo reply within the timeout.
    pub const ANSWERED: u8 = 1;
    /// A RST: the host is up, nothing listens.
    pub const REFUSED: u8 = 2;
    /// An ICMP destination-unreachable quoting the probe.
    pub const UNREACHABLE: u8 = 3;
    /// No reply before the next probe was sent.
    pub const TIMED_OUT: u8 = 4;
    /// An answer later than the target's timeout.
    pub const SLOW: u8 = 5;
}

/// One probe's settled outcome, sent to userspace through the ring buffer
/// when it goes against the target's [`Expectation`] (a failure of an up
/// target, an answer of a down one), when it ends a run of such outcomes
/// (so userspace's runs are the datapath's), when nothing is expected
/// yet, and when an answer moved the RTT estimate beyond the reporting
/// band. A steady target sends nothing.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProbeEvent {
    pub target_id: u32,
    /// [`outcome`].
    pub outcome: u8,
    pub _pad: [u8; 3],
    /// Outcomes of this kind (success or failure) in a row, this one
    /// included: userspace takes the run from here, so a lost event can
    /// delay a verdict but never make a run look longer than it is.
    pub in_row: u32,
    /// The nonce of the probe that settled.
    pub nonce: u32,
    /// When that probe was sent (CLOCK_MONOTONIC).
    pub sent_ns: u64,
    /// The answer's RTT, ns (0 but for answers and slow answers).
    pub rtt_ns: u64,
    /// The RTT estimate after this outcome, ns (0: none yet).
    pub rtt_ewma_ns: u64,
    /// The target's last answer before this outcome (0: never).
    pub answered_before_ns: u64,
}
