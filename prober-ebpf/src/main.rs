//! prober's eBPF programs.
//!
//! Every entry point calls a `try_*` function and turns any error into the
//! pass-through verdict: the datapath never drops traffic it does not own.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::PerCpuArray,
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use prober_common::InterfaceCounters;

/// Frames and bytes seen on the attached interface (one slot, per CPU).
#[btf_map]
static IFACE_COUNTERS: PerCpuArray<InterfaceCounters, 1> = PerCpuArray::new();

/// Ingress XDP program of the director's interface. For now it counts every
/// frame and passes it on unchanged.
#[xdp]
pub fn prober_xdp(ctx: XdpContext) -> u32 {
    match try_prober_xdp(&ctx) {
        Ok(action) => action,
        Err(()) => xdp_action::XDP_PASS,
    }
}

#[inline(always)]
fn try_prober_xdp(ctx: &XdpContext) -> Result<u32, ()> {
    let counters = IFACE_COUNTERS.get_ptr_mut(0).ok_or(())?;
    let frame_len = (ctx.data_end() - ctx.data()) as u64;
    // SAFETY: the pointer is the current CPU's slot of a per-CPU array:
    // valid for the program's run, and no other CPU writes it.
    unsafe {
        (*counters).packets += 1;
        (*counters).bytes += frame_len;
    }
    Ok(xdp_action::XDP_PASS)
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
