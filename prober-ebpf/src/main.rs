//! prober's eBPF programs.
//!
//! - `prober_xdp` (XDP, ingress of the director's interface): counts frames,
//!   matches probe replies by their cookie, answers SYN-ACKs with a RST,
//!   records agent reports, gives L7 checks of direct-routing real servers
//!   their answers back, and passes every other frame untouched.
//! - `probe_tx` (XDP, never attached): each run writes one target's probe
//!   into the frame and redirects it out. The daemon test-runs the
//!   *attached* `prober_xdp` (BPF_PROG_TEST_RUN with live frames), which
//!   tail-calls `probe_tx` (through `SEND_PATH`) for a frame from the
//!   loopback, a test run's default device: a program the XDP dispatcher
//!   already holds runs without patching the dispatcher, which costs two
//!   RCU grace periods a syscall (84 ms a send under emulation).
//!
//! - `ipvs_changed_netlink`, `ipvs_changed_sockopt` (kretprobes on IPVS's
//!   configuration calls): count the changes other processes make.
//!
//! Every entry point calls a `try_*` function; on error `prober_xdp` passes
//! the frame (the datapath never drops traffic it does not own) and
//! `probe_tx` drops its own scratch frame.
#![no_std]
#![no_main]

mod checks;
mod ipvs_changes;
mod packet;
mod passive;
mod rx;
mod tx;
mod verdict;

use aya_ebpf::{
    bindings::{xdp_action, TC_ACT_UNSPEC},
    btf_maps::{Array, HashMap, LruHashMap, PerCpuArray, ProgramArray, RingBuf},
    macros::{btf_map, classifier, kretprobe, xdp},
    programs::{RetProbeContext, TcContext, XdpContext},
};
use prober_common::{
    AgentReport, BatchCursor, DatapathCounters, DrCheckFlow, DrCheckKey, Expectation, FlowKey,
    FlowState, HealthKey, HealthRecord, IpvsChanges, PassiveStats, ProbeConfig, ProbeEvent,
    ProbeResults, ProbeState, ProbeTarget, ReplyKey, RttHistogram, ServerKey, WeightKey,
    WeightRecord, MAX_AGENTS, MAX_PASSIVE_FLOWS, MAX_PASSIVE_SERVERS, MAX_TARGETS,
    SEND_PATH_PROBE_TX, SEND_REQUEST_IFINDEX,
};

const TARGETS: usize = MAX_TARGETS as usize;
const FLOWS: usize = MAX_PASSIVE_FLOWS as usize;
const SERVERS: usize = MAX_PASSIVE_SERVERS as usize;

#[btf_map]
static COUNTERS: PerCpuArray<DatapathCounters, 1> = PerCpuArray::new();
#[btf_map]
static PROBE_TARGETS: Array<ProbeTarget, TARGETS> = Array::new();
#[btf_map]
static REPLY_INDEX: HashMap<ReplyKey, u32, TARGETS> = HashMap::new();
#[btf_map]
static PROBE_STATE: Array<ProbeState, TARGETS> = Array::new();
#[btf_map]
static PROBE_EXPECT: Array<Expectation, TARGETS> = Array::new();
/// 1 MiB: 21,000 events, a second of every target of a 20,000-target
/// director failing at once, drained every tick.
#[btf_map]
static PROBE_EVENTS: RingBuf<ProbeEvent, { 1 << 20 }> = RingBuf::new();
#[btf_map]
static PROBE_RESULTS: PerCpuArray<ProbeResults, TARGETS> = PerCpuArray::new();
#[btf_map]
static PROBE_RTT: PerCpuArray<RttHistogram, TARGETS> = PerCpuArray::new();
#[btf_map]
static PROBE_CONFIG: Array<ProbeConfig, 1> = Array::new();
#[btf_map]
static PROBE_BATCH: Array<u32, TARGETS> = Array::new();
#[btf_map]
static BATCH_CURSOR: Array<BatchCursor, 1> = Array::new();
// Userspace-only state, declared here so it has BTF and can be pinned:
// the programs never touch it.
#[btf_map]
static WEIGHT_STATE: HashMap<WeightKey, WeightRecord, TARGETS> = HashMap::new();
#[btf_map]
static HEALTH_STATE: HashMap<HealthKey, HealthRecord, TARGETS> = HashMap::new();

#[btf_map]
static PASSIVE_SERVERS: HashMap<ServerKey, u32, SERVERS> = HashMap::new();
#[btf_map]
static PASSIVE_PORTS: Array<u64, 1024> = Array::new();
#[btf_map]
static PASSIVE_FLOWS: LruHashMap<FlowKey, FlowState, FLOWS> = LruHashMap::new();
#[btf_map]
static PASSIVE_CONNS: LruHashMap<FlowKey, FlowState, FLOWS> = LruHashMap::new();
#[btf_map]
static PASSIVE_STATS: PerCpuArray<PassiveStats, SERVERS> = PerCpuArray::new();
#[btf_map]
static PASSIVE_SEEN: Array<u8, SERVERS> = Array::new();

#[btf_map]
static DR_CHECKS: HashMap<DrCheckKey, DrCheckFlow, 1024> = HashMap::new();
/// `probe_tx`, for `prober_xdp` to hand the daemon's send requests to.
#[btf_map]
static SEND_PATH: ProgramArray<1> = ProgramArray::new();
#[btf_map]
static IPVS_CHANGES: Array<IpvsChanges, 1> = Array::new();
#[btf_map]
static AGENTS: HashMap<u32, AgentReport, { MAX_AGENTS as usize }> = HashMap::new();

/// This CPU's datapath counters.
#[inline(always)]
fn counters() -> Option<&'static mut DatapathCounters> {
    // SAFETY: the current CPU's slot of a per-CPU array, valid for the run;
    // no other CPU writes it.
    COUNTERS.get_ptr_mut(0).map(|p| unsafe { &mut *p })
}

#[xdp]
pub fn prober_xdp(ctx: XdpContext) -> u32 {
    // SAFETY: the context the kernel passed.
    if unsafe { (*ctx.ctx).ingress_ifindex } == SEND_REQUEST_IFINDEX {
        // SAFETY: a tail call into probe_tx, which returns for us. With
        // the slot empty (the daemon fills it before it sends; tests that
        // run this program on frames leave it so) the frame is one to
        // receive.
        unsafe { SEND_PATH.tail_call(&ctx, SEND_PATH_PROBE_TX) };
    }
    rx::try_prober_xdp(&ctx).unwrap_or(xdp_action::XDP_PASS)
}

#[xdp]
pub fn probe_tx(ctx: XdpContext) -> u32 {
    match tx::try_probe_tx(&ctx) {
        Ok(action) => action,
        Err(()) => {
            if let Some(c) = counters() {
                c.probe_errors += 1;
            }
            aya_log_ebpf::warn!(
                &ctx,
                "probe_tx: nothing sent (bad target entry or batch overrun)"
            );
            xdp_action::XDP_DROP
        }
    }
}

/// TC egress of the director's interface: passive measurement, and the
/// VIP rewrite of L7 checks to direct-routing real servers (only their
/// own connections); every packet continues to the next filter
/// (TC_ACT_UNSPEC).
#[classifier]
pub fn passive_egress(ctx: TcContext) -> i32 {
    passive::try_passive_egress(&ctx).unwrap_or(TC_ACT_UNSPEC)
}

#[kretprobe]
pub fn ipvs_changed_netlink(ctx: RetProbeContext) -> u32 {
    ipvs_changes::note_ipvs_change(&ctx);
    0
}

#[kretprobe]
pub fn ipvs_changed_sockopt(ctx: RetProbeContext) -> u32 {
    ipvs_changes::note_ipvs_change(&ctx);
    0
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
