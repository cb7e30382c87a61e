//! Passive measurement's map layouts: the real servers followed, their
//! flows, and what their clients' traffic showed.

use crate::RTT_BUCKETS;

/// A tracked real server: address and port as the director forwards to it.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ServerKey {
    pub addr: [u8; 16],
    /// Network byte order.
    pub port: u16,
    /// [`family`].
    pub family: u8,
    pub _pad: u8,
}

/// One client connection to a tracked real server (after IPVS NAT: the
/// server side is the real server, the client side is the client).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct FlowKey {
    pub server_addr: [u8; 16],
    pub client_addr: [u8; 16],
    /// Network byte order.
    pub server_port: u16,
    /// Network byte order.
    pub client_port: u16,
    pub family: u8,
    pub _pad: [u8; 3],
}

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct FlowState {
    /// When the client's SYN was forwarded (0: not seen).
    pub syn_ns: u64,
    /// When the request being answered was forwarded; while half-open with
    /// the SYN-ACK seen, the acknowledgement number the client's ACK must
    /// carry (the real server's sequence number + 1).
    pub request_ns: u64,
    /// The real server's id in `PASSIVE_SERVERS`.
    pub server_id: u32,
    /// [`flow_flags`].
    pub flags: u32,
}

/// What the real server's own traffic showed, one value per CPU.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PassiveStats {
    /// Handshakes measured (SYN forwarded -> SYN-ACK back, SYN not resent).
    pub handshakes: u64,
    pub handshake_rtt_sum_ns: u64,
    /// Requests answered (request data forwarded -> first response data).
    pub responses: u64,
    pub response_time_sum_ns: u64,
    /// When this CPU last took a sample (CLOCK_MONOTONIC).
    pub last_sample_ns: u64,
    /// RSTs sent by the server.
    pub resets: u64,
    /// SYNs the client had to send again: no SYN-ACK came in time.
    pub syn_retransmits: u64,
    pub _pad: u64,
    /// Log2 µs histograms, as [`RttHistogram::log2_us`].
    pub handshake_log2_us: [u64; RTT_BUCKETS],
    pub response_log2_us: [u64; RTT_BUCKETS],
}

impl Default for PassiveStats {
    fn default() -> Self {
        Self {
            handshakes: 0,
            handshake_rtt_sum_ns: 0,
            responses: 0,
            response_time_sum_ns: 0,
            last_sample_ns: 0,
            resets: 0,
            syn_retransmits: 0,
            _pad: 0,
            handshake_log2_us: [0; RTT_BUCKETS],
            response_log2_us: [0; RTT_BUCKETS],
        }
    }
}
